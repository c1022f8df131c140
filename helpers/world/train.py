"""Trains the ``world`` profile's models on rendered scenes: ``python -m helpers.world.train --out <folder>``.

One reproducible command (fixed seeds), meant for one GPU (about 15 minutes on an H100), in four stages that can also
run one at a time (``--stages``) and resume from what an earlier stage wrote into ``--out``, and a fifth run alone:

1. ``data``: render scenes with captions (CPU processes) and tokenize every caption once.
2. ``vae``: an ``AutoencoderKL`` with SDXL's 8x downsampling (16x16 latents at 128 px); reports PSNR on held-out
   renders; sets ``scaling_factor`` so the latents have unit variance, as SD's VAEs do.
3. ``unet``: SDXL's ``UNet2DConditionModel`` (``text_time`` conditioning) at small size, trained with both SDXL text
   encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``, small, with the real CLIP tokenizer). The encoders
   are trained jointly with the UNet: the world's few dozen words need to be told apart, which frozen random
   encoders do poorly; LoRA training later keeps them frozen, as on SDXL. EMA weights are what is saved.
4. ``scorer``: an open_clip model with its own config trained contrastively on (render, caption) pairs and on
   (object crop, "a red striped cat") pairs, each also as the VAE decodes the render (``--scorer-decoded``: generated
   pictures look decoded), saved as safetensors for ``create_model_and_transforms(pretrained=...)``.
5. ``decoder`` (not in the default stages): the VAE's decoder fine-tuned alone, its encoder frozen, so the latents,
   the UNet and every LoRA stay valid; on views it renders itself (``--scenes`` scenes and ``--closeups`` close-ups,
   a pass's look, with random marks on objects, ``world.with_random_marks``: the shipped VAE never saw a mark and
   erases the subjects'). ``--stages decoder --vae-from models/world/pipeline/vae`` starts from the shipped VAE.

The result: ``<out>/pipeline`` (``save_pretrained``, fp16 safetensors) and ``<out>/scorer`` (config + weights) plus
``<out>/training_report.json``; ``helpers.world.evaluate`` measures their quality.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import world
from ..io import write_json_atomic
from ..profiles import EOS_TOKEN, SCHEDULER_CONFIG, clip_tokenizer

RESOLUTION = world.SIZE
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                   projection_dim=32)
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=1, use_linear_projection=True, cross_attention_dim=2 * TEXT_CONFIG["hidden_size"],
    addition_embed_type="text_time", addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=6 * 32 + TEXT_CONFIG["projection_dim"], norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=RESOLUTION, force_upcast=False,
)
SCORER_NAME = "world-clip"
SCORER_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
CAPTION_DROP = 0.2  # each attribute word, a single object's position and the light are left out this often
# the shipped decoder's recipe (NVIDIA H200, benchmarks/results/world_decoder_h200_2026-12-05.md, run b): lr 6e-4 for
# 3,920 steps beat 2e-4 for 2,435 (the same 300 s) on every truth measure (PSNR 28.1 vs 26.9 dB, heart kept 0.36 vs 0.26)
DECODER_LR = 6e-4
UNCOND_RATE = 0.1  # captions replaced by "" so classifier-free guidance has an unconditional model


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def _render_chunk(seeds: range, closeups: bool = False, pairs: bool = False, marks: bool = False) -> tuple:
    images, captions, boxes, descriptions, emptied, removed = [], [], [], [], [], []
    render = world.render_closeup if closeups else world.render_scene
    for seed in seeds:
        scene = render(seed, caption_drop=CAPTION_DROP, marks=marks)
        images.append(np.asarray(scene.image))
        captions.append(scene.caption)
        boxes.append([list(b) for b in scene.boxes])
        descriptions.append([o.describe() for o in scene.spec.objects])
        if pairs and not closeups:  # the same scene with one of its objects left out: where an inpainting pass starts
            gone = random.Random(seed + 1).randrange(len(scene.spec.objects))
            rest = tuple(o for i, o in enumerate(scene.spec.objects) if i != gone)
            emptied.append(np.asarray(world.render(dataclasses.replace(scene.spec, objects=rest))))
            removed.append(list(scene.boxes[gone]))
    return np.stack(images), captions, boxes, descriptions, emptied, removed


def render_dataset(n: int, first_seed: int, workers: int, closeups: int = 0, pairs: bool = False,
                   marks: bool = False) -> dict:
    """``n`` scenes from seeds ``first_seed..`` then ``closeups`` close-ups (``world.render_closeup``, seeds from 0):
    uint8 images (N, 128, 128, 3), captions, boxes, object words; with ``pairs``, for every scene (not the close-ups)
    the same scene with one object left out ("emptied") and that object's box ("removed"), for ``train_unet``'s
    inpainting pairs (empty otherwise: they double the rendering). ``marks``: random marks on objects
    (``world.with_random_marks``), for the decoder stage only."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    chunk = max(1, (n + closeups) // (workers * 4))
    ranges = [range(s, min(s + chunk, first_seed + n)) for s in range(first_seed, first_seed + n, chunk)]
    closeup_ranges = [range(s, min(s + chunk, closeups)) for s in range(0, closeups, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        parts = (list(pool.map(partial(_render_chunk, pairs=pairs, marks=marks), ranges))
                 + list(pool.map(partial(_render_chunk, closeups=True, marks=marks), closeup_ranges)))
    return {"images": np.concatenate([p[0] for p in parts]), "captions": [c for p in parts for c in p[1]],
            "boxes": [b for p in parts for b in p[2]], "descriptions": [d for p in parts for d in p[3]],
            "emptied": np.array([e for p in parts for e in p[4]], np.uint8),
            "removed": [r for p in parts for r in p[5]]}


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids (N, 77) for every distinct text, computed once (the loop never tokenizes)."""
    unique = sorted(set(texts))
    ids = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    index = {t: i for i, t in enumerate(unique)}
    return ids[torch.tensor([index[t] for t in texts])]


# ----------------------------------------------------------------------------------------------------------------
# components
# ----------------------------------------------------------------------------------------------------------------
def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG, scaling_factor=1.0)


def build_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **TEXT_CONFIG)),
            CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **TEXT_CONFIG)))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def encode_captions(te1, te2, ids1: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusionXLPipeline.encode_prompt`` computes: both encoders' penultimate hidden states side by
    side, and the second encoder's projected pooled output."""
    out1 = te1(ids1, output_hidden_states=True)
    out2 = te2(ids2, output_hidden_states=True)
    return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), out2.text_embeds


def _to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.float() for p in self.params], 1 - self.decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ----------------------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------------------
def train_vae(images: torch.Tensor, steps: int, batch: int, device: torch.device, log) -> tuple:
    vae = build_vae().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(1)
    train, held_out = held_out_split(images)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 1e-3, 200)
        x = _to_unit(train[torch.randint(0, len(train), (batch,), generator=g)].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon.float(), x) + F.mse_loss(recon.float(), x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return vae.eval(), heldout_psnr(vae, held_out, device)


def held_out_split(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held out): the last eighth of ``images``, at least one and at most 256, is held out."""
    n = max(1, min(256, len(images) // 8))
    return images[:-n], images[-n:]


@torch.no_grad()
def heldout_psnr(vae, images: torch.Tensor, device: torch.device) -> float:
    """Mean PSNR (dB) of ``images`` (uint8, N x H x W x 3) encoded (posterior mode) and decoded by ``vae``."""
    x = _to_unit(images.to(device))
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2, reduction="none").mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


def train_decoder(vae, images: torch.Tensor, steps: int, batch: int, device: torch.device, log,
                  lr: float = DECODER_LR) -> None:
    """Fine-tunes ``vae``'s decoder (and post-quant conv) in place with its encoder frozen, as SD's ft-MSE VAE was
    made: the latent space the UNet and every LoRA work in stays the same, only what is drawn from it changes. L1 +
    MSE on ``images`` (uint8 renders) from latents sampled as the encoder gives them."""
    vae.to(device).train().requires_grad_(False)  # the encoder and quant conv stay as they are
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(5)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, max(1, steps // 20))
        x = _to_unit(images[torch.randint(0, len(images), (batch,), generator=g)].to(device, non_blocking=True))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            recon = vae.decode(z).sample
        loss = F.l1_loss(recon.float(), x) + F.mse_loss(recon.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    latents = [vae.encode(_to_unit(images[i:i + 512].to(device))).latent_dist.mode().float().cpu()
               for i in range(0, len(images), 512)]
    return torch.cat(latents)


def saved_vae(saved: dict):
    """The VAE that ``vae.pt`` holds (its weights and scaling factor), on the CPU."""
    vae = build_vae()
    vae.load_state_dict(saved["vae"])
    vae.register_to_config(scaling_factor=saved["scaling_factor"])
    return vae


def _emptied_latents(vae, data: dict, device: torch.device) -> torch.Tensor:
    """Scaled latents of the scenes with one object left out (empty tensor for data rendered without them)."""
    if "emptied" not in data or not len(data["emptied"]):
        return torch.zeros(0)
    return encode_latents(vae, torch.as_tensor(data["emptied"]), device) * vae.config.scaling_factor


def train_unet(latents: torch.Tensor, ids1: torch.Tensor, ids2: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor],
               steps: int, batch: int, device: torch.device, log, lr: float = 6e-4, start_from: Path | None = None,
               modules: tuple | None = None, pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
               pair_rate: float = 0.0) -> tuple:
    """Epsilon prediction with SDXL's scheduler; min-SNR-5 weighting; EMA; captions dropped for CFG. With
    ``start_from`` (a saved pipeline folder) or ``modules`` (unet, te1, te2) the training continues from them.

    ``pairs`` (latents of the first scenes with one object left out, and that object's pixel box) with ``pair_rate``:
    that share of each batch starts where an inpainting pass starts. Inside the left-out object's box (grown by 0-2
    latent pixels) the noisy latent is made from the scene *without* the object, at the noise levels a pass starts
    from (t 600-999); the target stays the full scene, its caption names the object. A model trained on whole scenes
    only reads the empty region's faint colour at those levels as "nothing here"; SDXL, trained at scale, paints what
    the prompt names. Expressed as epsilon: noise + sqrt(a / (1 - a)) * (start - x0)."""
    from diffusers import DDPMScheduler

    if modules is not None:
        unet, te1, te2 = modules
    elif start_from is None:
        (te1, te2), unet = build_text_encoders(), build_unet()
    else:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        unet = UNet2DConditionModel.from_pretrained(start_from / "unet", torch_dtype=torch.float32)
        te1 = CLIPTextModel.from_pretrained(start_from / "text_encoder", torch_dtype=torch.float32)
        te2 = CLIPTextModelWithProjection.from_pretrained(start_from / "text_encoder_2", torch_dtype=torch.float32)
    for m in (unet, te1, te2):
        m.to(device).train()
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("interpolation_type",
                                                                                      "use_karras_sigmas")})
    alphas = sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW([{"params": unet.parameters(), "weight_decay": 1e-2},
                             {"params": [*te1.parameters(), *te2.parameters()], "weight_decay": 0.0}], lr=lr,
                            fused=device.type == "cuda")
    ema = EMA([unet, te1, te2], decay=0.999)
    latents, ids1, ids2 = latents.to(device), ids1.to(device), ids2.to(device)
    empty1, empty2 = (e.to(device) for e in empty)
    if pairs is not None:
        emptied, removed = pairs[0].to(device), pairs[1].to(device)
        grid = torch.arange(latents.shape[-1], device=device)
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], device=device).float()
    g = torch.Generator(device=device).manual_seed(2)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, 500)
        index = torch.randint(0, len(latents), (batch,), device=device, generator=g)
        x0 = latents[index]
        drop = torch.rand(batch, device=device, generator=g) < UNCOND_RATE
        b1 = torch.where(drop[:, None], empty1, ids1[index])
        b2 = torch.where(drop[:, None], empty2, ids2[index])
        t = torch.randint(0, 1000, (batch,), device=device, generator=g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        start_latents, target = x0, noise
        if pairs is not None:
            chosen = (torch.rand(batch, device=device, generator=g) < pair_rate) & (index < len(emptied))
            t = torch.where(chosen, torch.randint(600, 1000, (batch,), device=device, generator=g), t)
            row = index.clamp(max=len(emptied) - 1)
            grow = torch.randint(0, 3, (batch, 1), device=device, generator=g)
            low, high = removed[row, :2] // 8 - grow, (removed[row, 2:] + 7) // 8 + grow
            inside = ((grid[None, None, :] >= low[:, 0, None, None]) & (grid[None, None, :] < high[:, 0, None, None])
                      & (grid[None, :, None] >= low[:, 1, None, None]) & (grid[None, :, None] < high[:, 1, None, None]))
            swap = (inside & chosen[:, None, None]).unsqueeze(1).float()
            start_latents = x0 + swap * (emptied[row] - x0)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * start_latents + (1 - a).sqrt() * noise
        if pairs is not None:
            target = noise + (a / (1 - a)).sqrt() * (start_latents - x0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            embeds, pooled = encode_captions(te1, te2, b1, b2)
            pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled,
                                                             "time_ids": time_ids.expand(batch, -1)}).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *te1.parameters(), *te2.parameters()], 1.0)
        opt.step()
        ema.update()
        if step % 250 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    ema.copy_to()
    return unet.eval(), te1.eval(), te2.eval()


@torch.no_grad()
def decoded_views(vae, latents: torch.Tensor, device: torch.device, batch: int = 512) -> np.ndarray:
    """The scenes as the world's VAE decodes their latents (uint8, N x H x W x 3): the look of every generated
    picture, with the rendered scene's caption and boxes still true of it."""
    views = []
    for i in range(0, len(latents), batch):
        x = vae.decode(latents[i:i + batch].to(device) / vae.config.scaling_factor).sample
        views.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(views).numpy()


def object_crops(images: np.ndarray, boxes: list[list], descriptions: list[list[str]], size: int,
                 rng: np.random.Generator, limit: int) -> tuple[np.ndarray, list[str]]:
    """Square crops around single objects (with a margin, as the QA loop crops a region) and their words."""
    from PIL import Image

    crops, texts = [], []
    for i in rng.permutation(len(images))[:limit]:
        j = rng.integers(len(boxes[i]))
        x0, y0, x1, y1 = boxes[i][j]
        side = int(max(x1 - x0, y1 - y0) * rng.uniform(1.1, 1.4))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = int(np.clip(cx - side / 2, 0, world.SIZE - min(side, world.SIZE)))
        top = int(np.clip(cy - side / 2, 0, world.SIZE - min(side, world.SIZE)))
        crop = Image.fromarray(images[i]).crop((left, top, left + side, top + side)).resize((size, size),
                                                                                            Image.BICUBIC)
        crops.append(np.asarray(crop))
        texts.append(world.with_article(descriptions[i][j]))
    return np.stack(crops), texts


def train_scorer(images: np.ndarray, captions: list[str], crops: np.ndarray, crop_texts: list[str], steps: int,
                 batch: int, device: torch.device, log):
    import open_clip

    model = open_clip.create_model(SCORER_NAME, pretrained=None).to(device).train()
    tokenizer = open_clip.get_tokenizer(SCORER_NAME)
    size = SCORER_CONFIG["vision_cfg"]["image_size"]
    scenes = torch.cat([F.interpolate(torch.from_numpy(images[i:i + 4096]).permute(0, 3, 1, 2).float(), size=size,
                                      mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
                        for i in range(0, len(images), 4096)])
    pixels = torch.cat([scenes, torch.from_numpy(crops).permute(0, 3, 1, 2)]).to(device)
    texts = tokenize_open_clip(tokenizer, captions + crop_texts).to(device)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator(device=device).manual_seed(3)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 1e-3, 300)
        index = torch.randint(0, len(pixels), (batch,), device=device, generator=g)
        x = (pixels[index].float() / 255 - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            image_f, text_f, scale = model(x, texts[index])[:3]
        logits = scale * image_f.float() @ text_f.float().T
        same = (texts[index][:, None, :] == texts[index][None, :, :]).all(-1).float()  # duplicate captions agree
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 1000 == 0 or step == steps - 1:
            log(f"scorer step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def tokenize_open_clip(tokenizer, texts: list[str]) -> torch.Tensor:
    unique = sorted(set(texts))
    ids = tokenizer(unique)
    index = {t: i for i, t in enumerate(unique)}
    return ids[torch.tensor([index[t] for t in texts])]


# ----------------------------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------------------------
def save_pipeline(folder: Path, vae, unet, te1, te2) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(EOS_TOKEN),
        tokenizer_2=clip_tokenizer("!"), scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        add_watermarker=False, force_zeros_for_empty_prompt=False)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    # fp16 weights (small), but the encoders' configs say float32: transformers loads a model in the dtype its config
    # names, diffusers its own models in float32, so with "float16" there a bare ``from_pretrained(folder)`` mixed
    # fp16 encoders with an fp32 UNet and failed at the first call. A ``torch_dtype`` given to it still wins.
    for encoder in ("text_encoder", "text_encoder_2"):
        config_file = folder / encoder / "config.json"
        write_json_atomic(config_file, {**json.loads(config_file.read_text()), "dtype": "float32"})


def save_scorer(folder: Path, model) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{SCORER_NAME}.json", SCORER_CONFIG)
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / f"{SCORER_NAME}.safetensors"))


def register_scorer_config() -> None:
    import open_clip
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{SCORER_NAME}.json"
        path.write_text(json.dumps(SCORER_CONFIG))
        open_clip.add_model_config(path)


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.world.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="data,vae,unet,scorer")
    parser.add_argument("--scenes", type=int, default=40_000)
    parser.add_argument("--closeups", type=int, default=0,
                        help="close-ups of one object at a region's scale, beside the scenes (world.render_closeup); "
                             "the shipped weights have none: 20,000 did not lift the inpainting measure (MODEL_CARD)")
    parser.add_argument("--inpaint-pairs", type=float, default=0.0,
                        help="share of each UNet batch that starts where an inpainting pass starts (train_unet's "
                             "pairs; 0: none). The shipped weights have none: 0.5 for 3,000 steps lifted the "
                             "inpainting measure from 52.5 to 55.0 %% only (MODEL_CARD)")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--decoder-steps", type=int, default=3920,
                        help="the decoder stage (not in the default stages): steps of fine-tuning the decoder alone "
                             "(the shipped decoder: 3,920 x 128 on 20,000 scenes + 20,000 close-ups, GPU minutes)")
    parser.add_argument("--decoder-batch", type=int, default=128)
    parser.add_argument("--decoder-lr", type=float, default=DECODER_LR)
    parser.add_argument("--unet-steps", type=int, default=5500)
    parser.add_argument("--unet-lr", type=float, default=6e-4)
    parser.add_argument("--unet-continue-steps", type=int, default=6500,
                        help="then a second cosine cycle of this many steps (0: none)")
    parser.add_argument("--unet-continue-lr", type=float, default=3e-4)
    parser.add_argument("--unet-from", type=Path, default=None,
                        help="continue the UNet and text encoders from this saved pipeline folder")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="skip VAE training: encode with this saved VAE folder (e.g. the shipped one)")
    parser.add_argument("--unet-batch", type=int, default=1024)
    parser.add_argument("--scorer-steps", type=int, default=2500)
    parser.add_argument("--scorer-decoded", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the scorer on every scene and crop as the world's VAE decodes it: the look "
                             "of generated pictures (the shipped scorer has them; without, naming on VAE-decoded "
                             "truth was 85.0 %% against 93.8 %%, MODEL_CARD)")
    parser.add_argument("--batch", type=int, default=64, help="VAE batch (the scorer uses 8x)")
    parser.add_argument("--workers", type=int, default=max(1, (__import__("os").cpu_count() or 2) - 1))
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "training_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.update(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", torch=torch.__version__)

    def log(message: str) -> None:
        print(message, flush=True)

    data_file = out / "data.pt"
    if "data" in stages:
        start = time.perf_counter()
        data = render_dataset(args.scenes, first_seed=0, workers=args.workers, closeups=args.closeups,
                              pairs=args.inpaint_pairs > 0)
        tok1, tok2 = clip_tokenizer(EOS_TOKEN), clip_tokenizer("!")
        data["ids1"], data["ids2"] = tokenize(tok1, data["captions"]), tokenize(tok2, data["captions"])
        data["empty"] = (tokenize(tok1, [""])[0], tokenize(tok2, [""])[0])
        data["images"] = torch.from_numpy(data["images"])
        data["emptied"] = torch.from_numpy(data["emptied"])
        torch.save(data, data_file)
        report["data"] = {"scenes": args.scenes, "closeups": args.closeups, "seconds": round(time.perf_counter() - start, 1),
                          "distinct_captions": len(set(data["captions"]))}
        log(f"data: {args.scenes} scenes in {report['data']['seconds']} s")
    if stages & {"vae", "unet", "scorer"}:  # the decoder stage renders views of its own
        data = torch.load(data_file, weights_only=False)
        images = data["images"]
    if "vae" in stages:
        start = time.perf_counter()
        vae, psnr = train_vae(images, args.vae_steps, args.batch, device, log)
        latents = encode_latents(vae, images, device)
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        torch.save({"vae": vae.state_dict(), "scaling_factor": vae.config.scaling_factor,
                    "latents": latents * vae.config.scaling_factor,
                    "emptied": _emptied_latents(vae, data, device)}, out / "vae.pt")
        report["vae"] = {"steps": args.vae_steps, "psnr_held_out_db": round(psnr, 2),
                         "scaling_factor": round(vae.config.scaling_factor, 5),
                         "seconds": round(time.perf_counter() - start, 1)}
        log(f"vae: PSNR {psnr:.2f} dB on held-out renders, scaling factor {vae.config.scaling_factor:.4f}")
    if args.vae_from and not (out / "vae.pt").exists() and stages & {"unet", "scorer"}:  # encode with a saved VAE
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, torch_dtype=torch.float32).to(device).eval()
        torch.save({"vae": {k: v.cpu() for k, v in vae.state_dict().items()},
                    "scaling_factor": vae.config.scaling_factor,
                    "latents": encode_latents(vae, images, device) * vae.config.scaling_factor,
                    "emptied": _emptied_latents(vae, data, device)}, out / "vae.pt")
        report["vae"] = {**report.get("vae", {}), "from": str(args.vae_from)}
    if "decoder" in stages:
        start = time.perf_counter()
        if (out / "vae.pt").exists():
            saved = torch.load(out / "vae.pt", weights_only=False)
            vae = saved_vae(saved)
        elif args.vae_from:
            from diffusers import AutoencoderKL

            saved, vae = None, AutoencoderKL.from_pretrained(args.vae_from, torch_dtype=torch.float32)
        else:
            raise SystemExit(f"the decoder stage fine-tunes a trained VAE: run the vae stage into {out} first, or pass "
                             f"--vae-from <a saved VAE folder>")
        views = torch.from_numpy(render_dataset(args.scenes, 0, args.workers, args.closeups, marks=True)["images"])
        train, held_out = held_out_split(views)
        before = heldout_psnr(vae.to(device).eval(), held_out, device)
        train_decoder(vae, train, args.decoder_steps, args.decoder_batch, device, log, args.decoder_lr)
        after = heldout_psnr(vae, held_out, device)
        if saved is not None:  # the encoder, so the latents, unchanged
            saved["vae"] = {k: v.cpu() for k, v in vae.state_dict().items()}
            torch.save(saved, out / "vae.pt")
        vae.to(torch.float16).save_pretrained(out / "pipeline" / "vae", safe_serialization=True)
        report["decoder"] = {"steps": args.decoder_steps, "batch": args.decoder_batch, "lr": args.decoder_lr,
                             "scenes": args.scenes, "closeups": args.closeups, "marks": True,
                             "psnr_held_out_db_before": round(before, 2), "psnr_held_out_db": round(after, 2),
                             "seconds": round(time.perf_counter() - start, 1)}
        log(f"decoder: PSNR {before:.2f} -> {after:.2f} dB on held-out renders")
    if "unet" in stages:
        start = time.perf_counter()
        saved = torch.load(out / "vae.pt", weights_only=False)
        pairs = None
        if args.inpaint_pairs:
            if not len(saved.get("emptied", ())):
                raise SystemExit(f"--inpaint-pairs needs the scenes' emptied latents, which {out / 'vae.pt'} lacks: "
                                 f"run the data stage again (and vae, or --vae-from) into a new --out")
            pairs = (saved["emptied"], torch.tensor(data["removed"], dtype=torch.long))
        unet, te1, te2 = train_unet(saved["latents"], data["ids1"], data["ids2"], data["empty"], args.unet_steps,
                                    args.unet_batch, device, log, args.unet_lr, args.unet_from, pairs=pairs,
                                    pair_rate=args.inpaint_pairs)
        if args.unet_continue_steps:  # a second cosine cycle at a lower peak: what the shipped weights had
            unet, te1, te2 = train_unet(saved["latents"], data["ids1"], data["ids2"], data["empty"],
                                        args.unet_continue_steps, args.unet_batch, device, log, args.unet_continue_lr,
                                        modules=(unet, te1, te2), pairs=pairs, pair_rate=args.inpaint_pairs)
        save_pipeline(out / "pipeline", saved_vae(saved), unet, te1, te2)
        report["unet" if args.unet_from is None else "unet_continued"] = {
                          "steps": args.unet_steps, "batch": args.unet_batch, "lr": args.unet_lr,
                          "continued_steps": args.unet_continue_steps, "continued_lr": args.unet_continue_lr,
                          "inpaint_pairs": args.inpaint_pairs,
                          "from": str(args.unet_from) if args.unet_from else "scratch",
                          "seconds": round(time.perf_counter() - start, 1),
                          "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2)}
    if "scorer" in stages:
        start = time.perf_counter()
        register_scorer_config()
        rng = np.random.default_rng(4)
        size = SCORER_CONFIG["vision_cfg"]["image_size"]
        scenes, captions = images.numpy(), list(data["captions"])
        crops, crop_texts = object_crops(scenes, data["boxes"], data["descriptions"], size, rng, len(images))
        if args.scorer_decoded:
            if not (out / "vae.pt").exists():
                raise SystemExit(f"--scorer-decoded needs the scenes' latents in {out / 'vae.pt'}: run the vae stage "
                                 f"(or pass --vae-from) into this --out first, or give --no-scorer-decoded")
            saved = torch.load(out / "vae.pt", weights_only=False)
            decoded = decoded_views(saved_vae(saved).to(device).eval(), saved["latents"], device)
            decoded_crops, decoded_texts = object_crops(decoded, data["boxes"], data["descriptions"], size, rng,
                                                        len(images))
            scenes, captions = np.concatenate([scenes, decoded]), captions + captions
            crops, crop_texts = np.concatenate([crops, decoded_crops]), crop_texts + decoded_texts
        model = train_scorer(scenes, captions, crops, crop_texts, args.scorer_steps, 8 * args.batch, device, log)
        save_scorer(out / "scorer", model)
        report["scorer"] = {"steps": args.scorer_steps, "decoded": args.scorer_decoded,
                            "seconds": round(time.perf_counter() - start, 1)}
    report["gpu_minutes"] = round(sum(v.get("seconds", 0) for v in report.values() if isinstance(v, dict)) / 60, 2)
    write_json_atomic(report_path, report)
    log(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
