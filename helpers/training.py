"""One DreamBooth-style LoRA per subject, after diffusers' ``train_dreambooth_lora_sdxl.py``.

Four pieces, each on a screen: **skip** (the LoRA on disk was trained from this exact fingerprint), **prepare**
(latents and text embeddings computed once, so the loop needs only the UNet), **loop** (steps with atomic
checkpoints every ``checkpoint_every`` steps; an interrupted run resumes bit-exactly) and **export** (the adapter in
diffusers' format, loadable by ``load_lora_weights``, plus ``train_meta.json``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from .adapters import LORA_WEIGHTS_FILE, LoraFileError, generate, load_lora_file
from .config import ProjectConfig, Subject
from .data import augment_with_mask, load_subject_masks, load_subject_photos, mask_paths, subject_photo_paths
from .io import save_image_atomic, save_safetensors_atomic, set_aside, temp_folder, write_json_atomic
from .models import ModelBundle, library_versions, load_models, model_source

META_FILE = "train_meta.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
KOHYA_SUFFIX = "_kohya.safetensors"  # beside the diffusers file: the same LoRA for A1111/ComfyUI
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
VIEWS_PER_PHOTO = 4  # augmented crops/flips per photo, encoded once


@dataclass
class TrainReport:
    subject: str
    status: str  # "trained", "skipped", "resumed", "interrupted", "provided" (the subject's own lora_file)
    steps_done: int
    seconds: float
    loss_history: list[float] = field(default_factory=list)
    lora_path: str = ""
    message: str = ""


# ----------------------------------------------------------------------------------------------------------------
# skip: fingerprints and metadata
# ----------------------------------------------------------------------------------------------------------------
def training_fingerprint(config: ProjectConfig, subject: Subject, base_model: str) -> dict:
    """What decides the LoRA's weights: settings, subject words, base model, the photos' bytes and (where the loss
    reads them) their masks' bytes."""
    paths = subject_photo_paths(config.data_path(subject), subject.name)
    photos = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in paths}
    fingerprint = {"settings": config.hashed_settings(),
                   "subject": {"token": subject.token, "class_name": subject.class_name},
                   "base_model": base_model, "photos": photos}
    masks = mask_paths(paths) if config.mask_background_weight < 1 else None
    if masks:
        fingerprint["masks"] = {p.name: hashlib.sha256(m.read_bytes()).hexdigest()[:16] for p, m in zip(paths, masks)}
        fingerprint["mask_background_weight"] = config.mask_background_weight
    if not subject.mirrors_views(config.random_flip):
        fingerprint["random_flip"] = False
    return fingerprint


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def loss_histories(config: ProjectConfig) -> dict[str, list[float]]:
    """Each subject's recorded training loss ([] when it has not been trained)."""
    return {s.name: (read_meta(config.lora_path(s)) or {}).get("loss_history", []) for s in config.subjects}


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def lora_file_record(path: Path) -> dict:
    """What identifies a LoRA file: its hash, its rank and how many tensors it has (read back, so a file that does
    not open raises here)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        down = next((k for k in keys if any(m in k for m in ("lora_A", "lora.down", "lora_down"))), None)
        rank = int(f.get_slice(down).get_shape()[0]) if down else 0
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16], "rank": rank, "tensors": len(keys)}


def lora_file_problem(folder: Path, meta: dict, config: ProjectConfig) -> str | None:
    """Why the LoRA file in ``folder`` is not the one ``train_meta.json`` describes (None when it is)."""
    path = folder / LORA_WEIGHTS_FILE
    try:
        found = lora_file_record(path)
    except (SafetensorError, OSError, ValueError) as e:
        return f"{path} does not open ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    recorded = meta.get("lora_file")
    if not recorded:
        return f"{path} has no recorded fingerprint (trained by an older version)"
    if found["rank"] != config.lora_rank:
        return f"{path} has rank {found['rank']}, the config asks for {config.lora_rank}"
    if found != recorded:
        return f"{path} is not the file that was trained (hash {found['sha256']}, recorded {recorded['sha256']})"
    return None


def skip_report(config: ProjectConfig, subject: Subject, config_hash: str) -> TrainReport | None:
    """A "skipped" report when the subject's LoRA file exists, matches its recorded fingerprint and was trained with
    this exact config, else None."""
    folder = config.lora_path(subject)
    meta = read_meta(folder)
    if not (folder / LORA_WEIGHTS_FILE).exists() or not meta or meta.get("config_hash") != config_hash:
        return None
    if lora_file_problem(folder, meta, config):
        return None
    return TrainReport(subject.name, "skipped", meta["steps_done"], 0.0, meta.get("loss_history", []),
                       str(folder / LORA_WEIGHTS_FILE), f"{subject.name}: LoRA up to date (hash {config_hash}), skipped")


def retrain_reason(config: ProjectConfig, subject: Subject, fingerprint: dict) -> str:
    """Why an existing LoRA is trained again ("" when there is none yet)."""
    folder = config.lora_path(subject)
    meta = read_meta(folder)
    if not (folder / LORA_WEIGHTS_FILE).exists() or not meta:
        return ""
    what = ", ".join(changed_keys(meta.get("fingerprint", {}), fingerprint))
    if not what and (problem := lora_file_problem(folder, meta, config)):
        return f"{subject.name}: {problem}: retraining"
    return f"{subject.name}: training config changed ({what or 'unknown'}): retraining"


# ----------------------------------------------------------------------------------------------------------------
# prepare: everything the loop reads, computed once
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """Everything the loop reads, precomputed: the VAE and text encoders are not needed while it runs."""

    latents: torch.Tensor  # (N, 4, h, w), already scaled by the VAE factor
    prompt_embeds: torch.Tensor  # (1, 77, 2048)
    pooled_embeds: torch.Tensor  # (1, 1280)
    time_ids: torch.Tensor  # (1, 6)
    # (N, 1, h, w) per-pixel loss weights at latent size: 1 on the subject, mask_background_weight elsewhere
    loss_weights: torch.Tensor | None = None
    class_latents: torch.Tensor | None = None
    class_prompt_embeds: torch.Tensor | None = None
    class_pooled_embeds: torch.Tensor | None = None


def encode_images(models: ModelBundle, images: list[Image.Image]) -> torch.Tensor:
    pixels = models.txt2img.image_processor.preprocess(images).to(models.device, models.vae.dtype)
    with torch.no_grad():
        latents = torch.cat([models.vae.encode(pixels[i:i + 4]).latent_dist.mode() for i in range(0, len(pixels), 4)])
    return latents.float() * models.vae.config.scaling_factor


def encode_text(models: ModelBundle, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        embeds, _, pooled, _ = models.txt2img.encode_prompt(
            prompt, device=models.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return embeds, pooled


def class_images(models: ModelBundle, config: ProjectConfig, subject: Subject) -> list[Image.Image]:
    """Prior-preservation images of the subject's class, generated once by the base model and cached."""
    folder = config.cache_path / "class_images" / f"{subject.class_name.replace(' ', '_')}_{config.train_resolution}"
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))[:config.num_class_images]]
    for i in range(len(images), config.num_class_images):
        image = generate(models, config, subject.class_prompt, 10_000 + i, size=config.train_resolution)
        save_image_atomic(image, folder / f"{i:04d}.png")
        images.append(image)
    return images


def prepare_training_data(models: ModelBundle, config: ProjectConfig, subject: Subject) -> TrainingData:
    photos = load_subject_photos(config, subject)
    masks = load_subject_masks(config, subject) if config.mask_background_weight < 1 else None
    masks = [m.resize(p.size, Image.BILINEAR) for m, p in zip(masks, photos)] if masks else [None] * len(photos)
    rng = random.Random(config.seed)
    flip = subject.mirrors_views(config.random_flip)
    pairs = [augment_with_mask(photo, mask, config.train_resolution, rng, flip)
             for photo, mask in zip(photos, masks) for _ in range(VIEWS_PER_PHOTO)]
    embeds, pooled = encode_text(models, subject.instance_prompt)
    res = config.train_resolution
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=models.device)
    latents = encode_images(models, [view for view, _ in pairs])
    data = TrainingData(latents, embeds, pooled, time_ids)
    if masks[0] is not None:
        data.loss_weights = subject_loss_weights([m for _, m in pairs], latents.shape[-1],
                                                 config.mask_background_weight).to(latents.device)
    if config.prior_preservation and config.num_class_images > 0:
        data.class_latents = encode_images(models, class_images(models, config, subject))
        data.class_prompt_embeds, data.class_pooled_embeds = encode_text(models, subject.class_prompt)
    return data


def subject_loss_weights(masks: list[Image.Image], side: int, background: float) -> torch.Tensor:
    """Per-latent-pixel loss weights (N, 1, side, side): 1 where the mask is white, ``background`` where it is black
    (a mask's grey edge in between), so the LoRA learns the subject rather than its photos' backgrounds."""
    import numpy as np

    cover = torch.stack([torch.from_numpy(np.asarray(m.resize((side, side), Image.BOX), np.float32) / 255)
                         for m in masks])[:, None]
    return background + (1 - background) * cover


def offload_encoders(models: ModelBundle) -> None:
    """On CUDA, park the VAE and both text encoders on the CPU while the loop runs: it only needs the UNet."""
    if models.device.type == "cuda":
        for module in (models.vae, models.txt2img.text_encoder, models.txt2img.text_encoder_2):
            module.to("cpu")
        torch.cuda.empty_cache()


def restore_encoders(models: ModelBundle) -> None:
    if models.device.type == "cuda":
        for module in (models.vae, models.txt2img.text_encoder, models.txt2img.text_encoder_2):
            module.to(models.device)


# ----------------------------------------------------------------------------------------------------------------
# loop: the trainer
# ----------------------------------------------------------------------------------------------------------------
def attach_training_adapter(unet, config: ProjectConfig, adapter_name: str) -> list[torch.nn.Parameter]:
    """A fresh, seeded LoRA on the UNet's attention projections; returns its (float32) trainable parameters."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(adapter_name)
    torch.manual_seed(config.seed)  # LoRA init is random: seed it so a resumed run starts from the same point
    unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                                init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES),
                     adapter_name=adapter_name)
    unet.set_adapters([adapter_name])
    unet.requires_grad_(False)
    params = [p for name, p in unet.named_parameters() if f".{adapter_name}." in name and "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    cast_training_params(unet, dtype=torch.float32)  # trainable weights in fp32, the frozen base in fp16
    return params


SDXL_UNET_PARAMS = 2.5675e9
ACTIVATIONS_GIB_SDXL_1024 = 7.8  # measured: 12.6 GiB peak without checkpointing = 4.8 GiB fp16 UNet + this (H200)
MEMORY_MARGIN_GIB = 1.5


def checkpointing_choice(setting: str, device_type: str, unet_params: float, resolution: int, batch: int,
                         free_gib: float | None) -> tuple[bool, str]:
    """Whether to use gradient checkpointing, and why. Checkpointing halves training memory but costs ~2x per step
    (0.875 vs 0.450 s/step on an H200 for SDXL at 1024^2), so "auto" turns it on only where the faster setting would
    not fit: UNet weights (fp16) + activations (scaled from SDXL's measured 7.8 GiB per 1024^2 sample by UNet size,
    pixels and batch) + a margin, against the free GPU memory."""
    if setting != "auto":
        return setting == "on", f"gradient checkpointing {setting} (set in the config)"
    if device_type != "cuda" or free_gib is None:
        return False, "gradient checkpointing off (CPU: memory is not what limits)"
    scale = unet_params / SDXL_UNET_PARAMS
    need = unet_params * 2 / 2**30 + ACTIVATIONS_GIB_SDXL_1024 * scale * batch * (resolution / 1024) ** 2
    if need + MEMORY_MARGIN_GIB <= free_gib:
        return False, f"gradient checkpointing off: ~{need:.1f} GiB needed, {free_gib:.1f} GiB free (faster)"
    return True, f"gradient checkpointing on: ~{need:.1f} GiB needed without it, only {free_gib:.1f} GiB free"


# Measured with benchmarks/bench_reference_training.py on an NVIDIA H100 (SDXL, 1024², batch 1, rank 16); other
# cards scaled by their dense fp16 tensor throughput relative to it. Estimates, and labelled so.
SDXL_STEP_SECONDS = {False: 0.401, True: 0.769}  # gradient checkpointing off / on
GPU_SPEED_VS_H100 = {"H200": 1.0, "H100": 1.0, "A100": 1 / 3.2, "L4": 1 / 6, "T4": 1 / 15}


def expected_duration(profile: str, gpu_name: str, checkpointing: bool, steps: int, batch: int) -> str | None:
    """One line with the expected training time of an SDXL subject on this GPU, or None where there is no basis."""
    card = next((name for name in GPU_SPEED_VS_H100 if name in gpu_name), None)
    if profile != "sdxl" or card is None or steps <= 0:
        return None
    seconds = SDXL_STEP_SECONDS[checkpointing] * batch * steps / GPU_SPEED_VS_H100[card]
    return (f"expected ~{seconds / 60:.0f} min for {steps} steps on this {card} (estimate: {SDXL_STEP_SECONDS[checkpointing]}"
            f" s/step measured on an H100, scaled by the cards' fp16 throughput)")


class LoraTrainer:
    """A LoRA adapter on the bundle's UNet, its optimizer and its RNG: step, checkpoint, resume, export."""

    def __init__(self, models: ModelBundle, config: ProjectConfig, adapter_name: str, data: TrainingData):
        from diffusers import DDPMScheduler

        self.models, self.config, self.adapter_name, self.data = models, config, adapter_name, data
        self.unet = models.unet
        self.noise_scheduler = DDPMScheduler.from_config(models.txt2img.scheduler.config)
        self.cuda = models.device.type == "cuda"
        self.params = attach_training_adapter(self.unet, config, adapter_name)
        free_gib = torch.cuda.mem_get_info(models.device)[0] / 2**30 if self.cuda else None
        self.checkpointing, self.checkpointing_reason = checkpointing_choice(
            config.gradient_checkpointing, models.device.type, sum(p.numel() for p in self.unet.parameters()),
            config.train_resolution, config.train_batch_size, free_gib)
        if self.checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.optimizer = self._make_optimizer()
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.step_count = 0
        self.loss_history: list[float] = []

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.cuda:
            try:
                import bitsandbytes as bnb  # 8-bit Adam: a quarter of the optimizer memory

                return bnb.optim.AdamW8bit(self.params, lr=self.config.learning_rate)
            except ImportError:
                pass
        return torch.optim.AdamW(self.params, lr=self.config.learning_rate, weight_decay=1e-2)

    def _loss(self, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
              weights: torch.Tensor | None = None) -> torch.Tensor:
        device, sched = self.models.device, self.noise_scheduler
        noise = torch.randn(latents.shape, generator=self.generator).to(device)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],),
                                  generator=self.generator).to(device)
        noisy = sched.add_noise(latents, noise, timesteps)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        n = latents.shape[0]
        with torch.autocast("cuda", dtype=self.models.dtype, enabled=self.cuda and self.models.dtype != torch.float32):
            pred = self.unet(noisy.to(self.unet.dtype), timesteps, embeds.expand(n, -1, -1),
                             added_cond_kwargs={"text_embeds": pooled.expand(n, -1),
                                                "time_ids": self.data.time_ids.expand(n, -1)}).sample
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        if weights is None:
            per_sample = error.mean(dim=(1, 2, 3))
        else:  # a weighted mean over the pixels, so the loss keeps its scale whatever share the subject covers
            per_sample = (error * weights).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * error.shape[1])
        if self.config.min_snr_gamma > 0:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sched, timesteps)
            clamped = torch.clamp(snr, max=self.config.min_snr_gamma)
            per_sample = per_sample * (clamped / (snr + 1) if sched.config.prediction_type == "v_prediction"
                                       else clamped / snr)
        return per_sample.mean()

    def step(self) -> float:
        data, batch = self.data, self.config.train_batch_size
        index = torch.randint(0, data.latents.shape[0], (batch,), generator=self.generator)
        weights = data.loss_weights[index.to(data.loss_weights.device)] if data.loss_weights is not None else None
        loss = self._loss(data.latents[index.to(data.latents.device)], data.prompt_embeds, data.pooled_embeds,
                          weights)
        if data.class_latents is not None:
            class_index = torch.randint(0, data.class_latents.shape[0], (batch,), generator=self.generator)
            loss = loss + self.config.prior_loss_weight * self._loss(
                data.class_latents[class_index.to(data.class_latents.device)], data.class_prompt_embeds,
                data.class_pooled_embeds)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.step_count += 1
        value = float(loss.detach())
        if not torch.isfinite(torch.tensor(value)):
            raise FloatingPointError(f"training loss became {value} at step {self.step_count}: lower the learning "
                                     f"rate ({self.config.learning_rate:g}) or keep mixed precision off")
        self.loss_history.append(value)
        return value

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in diffusers' format (what ``load_lora_weights`` reads)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.unet, adapter_name=self.adapter_name)
        return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}

    def close(self) -> None:
        """Take the training adapter off the shared UNet and restore inference settings."""
        if self.checkpointing:
            self.unet.disable_gradient_checkpointing()
        self.unet.eval()
        self.unet.delete_adapters(self.adapter_name)
        if not getattr(self.unet, "peft_config", None):  # leave no empty peft state for the next add_adapter to warn on
            self.unet.__dict__.pop("peft_config", None)
            self.unet._hf_peft_config_loaded = False
        self.unet.requires_grad_(False)


def save_checkpoint(trainer: LoraTrainer, path: Path, config_hash: str) -> None:
    """LoRA weights, optimizer state and RNG in one safetensors file, written atomically."""
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(trainer.params)}
    opt = trainer.optimizer.state_dict()
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng"] = trainer.generator.get_state()
    scalars = {pid: {k: v for k, v in st.items() if not torch.is_tensor(v)} for pid, st in opt["state"].items()}
    metadata = {"step": str(trainer.step_count), "config_hash": config_hash,
                "loss_history": json.dumps(trainer.loss_history), "param_groups": json.dumps(opt["param_groups"]),
                "opt_scalars": json.dumps(scalars)}
    save_safetensors_atomic(tensors, path, metadata)


def load_checkpoint(trainer: LoraTrainer, path: Path, config_hash: str) -> bool:
    """Restore weights, optimizer and RNG. A checkpoint of another training config is not used (False, a warning);
    a damaged one is set aside (renamed, kept) and training starts from step 0. Everything is checked before the
    trainer is touched, so a bad file never leaves it half restored."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("config_hash") != config_hash:
            warnings.warn(f"{path}: checkpoint is from another training config; starting from step 0")
            return False
        tensors = load_file(str(path))
        params = [tensors[f"param.{i}"] for i in range(len(trainer.params))]
        if [t.shape for t in params] != [p.shape for p in trainer.params]:
            raise ValueError("its LoRA shapes differ from this adapter's")
        state = {}
        for pid, scalars in json.loads(metadata["opt_scalars"]).items():
            state[int(pid)] = dict(scalars)
            for key in [k.split(".", 2)[2] for k in tensors if k.startswith(f"opt.{pid}.")]:
                state[int(pid)][key] = tensors[f"opt.{pid}.{key}"]
        param_groups, step = json.loads(metadata["param_groups"]), int(metadata["step"])
        loss_history = [float(x) for x in json.loads(metadata["loss_history"])]
        rng = tensors["rng"]
        if not 0 < step <= trainer.config.train_steps or len(loss_history) != step:
            raise ValueError(f"step {step} and {len(loss_history)} recorded losses do not fit "
                             f"{trainer.config.train_steps} training steps")
        probe = torch.Generator("cpu")
        probe.set_state(rng)
        # last: it validates the groups before changing anything, so a refusal leaves the optimizer as it was
        trainer.optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as e:
        set_aside(path, f"damaged training checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"training starts from step 0")
        return False
    with torch.no_grad():
        for p, saved in zip(trainer.params, params):
            p.copy_(saved.to(p.device, p.dtype))
    trainer.generator.set_state(rng)
    trainer.step_count = step
    trainer.loss_history = loss_history
    return True


def run_steps(trainer: LoraTrainer, checkpoint: Path, config_hash: str, steps: int, progress: bool,
              label: str) -> None:
    """``steps`` optimizer steps with a progress bar, checkpointing every ``checkpoint_every`` steps and at the end
    of a time-boxed call that stops before ``train_steps``."""
    from tqdm.auto import tqdm

    config = trainer.config
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=config.train_steps, initial=trainer.step_count, desc=f"train {label}",
              disable=not progress, leave=True) as bar:
        for _ in range(steps):
            loss = trainer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if trainer.step_count % config.checkpoint_every == 0 and trainer.step_count < config.train_steps:
                save_checkpoint(trainer, checkpoint, config_hash)
    if trainer.step_count < config.train_steps:
        save_checkpoint(trainer, checkpoint, config_hash)


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------
def export_lora(trainer: LoraTrainer, subject: Subject, folder: Path, fingerprint: dict, seconds: float,
                resumed: bool) -> Path:
    """``save_lora_weights`` into a temp folder, an atomic rename over the final file, then the metadata that the
    skip check reads; the checkpoint is removed last."""
    from diffusers import StableDiffusionXLPipeline

    folder.mkdir(parents=True, exist_ok=True)
    with temp_folder(folder / LORA_WEIGHTS_FILE) as tmp:  # a killed export leaves a folder the next start sweeps
        StableDiffusionXLPipeline.save_lora_weights(tmp, unet_lora_layers=trainer.lora_state_dict(),
                                                    safe_serialization=True)
        os.replace(tmp / LORA_WEIGHTS_FILE, folder / LORA_WEIGHTS_FILE)
    export_kohya(folder / LORA_WEIGHTS_FILE, kohya_path(folder, subject), subject)
    write_json_atomic(folder / META_FILE, {
        "lora_file": lora_file_record(folder / LORA_WEIGHTS_FILE),
        "subject": subject.name, "config_hash": fingerprint_hash(fingerprint), "fingerprint": fingerprint,
        "steps_done": trainer.step_count, "loss_history": trainer.loss_history, "seconds": round(seconds, 3),
        "resumed": resumed, "versions": library_versions(), "device": trainer.models.device.type,
    })
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    return folder / LORA_WEIGHTS_FILE


def kohya_path(folder: Path, subject: Subject) -> Path:
    """Where the kohya-layout copy of a trained LoRA goes: ``<lora_dir>/<subject>_kohya.safetensors``."""
    return folder / f"{subject.name}{KOHYA_SUFFIX}"


def export_kohya(diffusers_file: Path, target: Path, subject: Subject) -> Path:
    """The LoRA of ``diffusers_file`` also in kohya's layout, which AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI read:
    converted by diffusers' own utilities (diffusers -> peft -> kohya keys, alpha = rank as diffusers loads it), the
    trigger words in the safetensors metadata; written atomically."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    state = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(str(diffusers_file))))
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight"))
    metadata = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_output_name": subject.name,
                "modelspec.trigger_phrase": f"{subject.token} {subject.class_name}", "trigger_token": subject.token,
                "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    return save_safetensors_atomic({k: v.contiguous() for k, v in state.items()}, target, metadata)


def use_lora_file(models: Callable[[], ModelBundle], config: ProjectConfig, subject: Subject) -> TrainReport:
    """A subject with its own ``lora_file``: checked against this base model (loaded as a throwaway adapter through
    diffusers' loaders, then removed), recorded in ``train_meta.json`` like a trained LoRA; no training. ``models``
    gives the bundle, called only when the file was not checked before. Raises ``LoraFileError`` (one line naming
    the subject and the file) when it does not fit."""
    path = config.lora_file_path(subject)
    if not path.is_file():
        raise LoraFileError(f"subject {subject.name!r}: lora_file {path} does not exist")
    folder = config.lora_path(subject)
    record = lora_file_record(path)
    meta = read_meta(folder)
    if not (meta and meta.get("source") == str(path) and meta.get("lora_file") == record):
        bundle = models()
        try:
            note = load_lora_file(bundle, path, f"{subject.name}__check")
        except LoraFileError as e:
            raise LoraFileError(f"subject {subject.name!r}: {e}") from None
        bundle.txt2img.delete_adapters(f"{subject.name}__check")
        write_json_atomic(folder / META_FILE, {"lora_file": record, "source": str(path), "subject": subject.name,
                                               "note": note, "steps_done": 0, "loss_history": [],
                                               "versions": library_versions()})
        meta = read_meta(folder)
    message = f"{subject.name}: uses its own LoRA {path.name} (hash {record['sha256']}, rank {record['rank']})"
    if meta.get("note"):
        message += f"; {meta['note']}"
    return TrainReport(subject.name, "provided", 0, 0.0, [], str(path), message)


# ----------------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------------
def train_subject(models: ModelBundle, config: ProjectConfig, subject: Subject, force: bool = False,
                  stop_after_steps: int | None = None, progress: bool = True,
                  fingerprint: dict | None = None) -> TrainReport:
    """Train (or skip, or resume) one subject's LoRA; see the module docstring for the rules."""
    fingerprint = fingerprint or training_fingerprint(config, subject, model_source(config.profile))
    config_hash = fingerprint_hash(fingerprint)
    if not force and (skipped := skip_report(config, subject, config_hash)):
        return skipped
    message = "" if force else retrain_reason(config, subject, fingerprint)
    folder, start = config.lora_path(subject), time.perf_counter()
    meta = read_meta(folder)
    if (folder / LORA_WEIGHTS_FILE).exists() and meta and meta.get("config_hash") == config_hash \
            and (problem := lora_file_problem(folder, meta, config)):
        set_aside(folder / LORA_WEIGHTS_FILE, f"{problem}; retraining")
    data = prepare_training_data(models, config, subject)
    offload_encoders(models)
    trainer = LoraTrainer(models, config, f"{subject.name}__training", data)
    if progress:
        print(f"{subject.name}: {trainer.checkpointing_reason}")
        gpu = torch.cuda.get_device_name(models.device) if models.device.type == "cuda" else ""
        if estimate := expected_duration(config.profile, gpu, trainer.checkpointing, config.train_steps,
                                         config.train_batch_size):
            print(f"{subject.name}: {estimate}")
    try:
        checkpoint = folder / CHECKPOINT_FILE
        resumed = checkpoint.exists() and not force and load_checkpoint(trainer, checkpoint, config_hash)
        steps = config.train_steps - trainer.step_count
        if stop_after_steps is not None:
            steps = min(steps, stop_after_steps)
        run_steps(trainer, checkpoint, config_hash, steps, progress, subject.name)
        seconds = time.perf_counter() - start
        if trainer.step_count < config.train_steps:  # time-boxed call: the checkpoint is there to resume from
            return TrainReport(subject.name, "interrupted", trainer.step_count, seconds, trainer.loss_history, "",
                               f"{subject.name}: stopped at step {trainer.step_count}/{config.train_steps}; "
                               f"run again to resume")
        lora_file = export_lora(trainer, subject, folder, fingerprint, seconds, resumed)
    finally:
        trainer.close()
        restore_encoders(models)
    status = "resumed" if resumed else "trained"
    return TrainReport(subject.name, status, trainer.step_count, seconds, trainer.loss_history, str(lora_file),
                       message or f"{subject.name}: {status}, {trainer.step_count} steps in {seconds:.1f} s")


def run_training(config: ProjectConfig, force: bool = False, models: ModelBundle | None = None,
                 stop_after_steps: int | None = None, progress: bool = True) -> dict[str, TrainReport]:
    """Train one LoRA per subject of ``config``; up-to-date ones are skipped unless ``force``.

    A changed training config (settings, subject words, base model or photos) retrains that subject automatically:
    the old LoRA stays in place until the new one is written, and the message names what changed. The models are
    loaded only when something needs training or a subject's own ``lora_file`` needs checking.
    """
    def bundle() -> ModelBundle:
        nonlocal models
        models = models or load_models(config)
        return models

    # every given LoRA file is checked before anything trains
    reports = {s.name: use_lora_file(bundle, config, s) for s in config.subjects if s.lora_file}
    for subject in config.subjects:
        if subject.lora_file:
            print(reports[subject.name].message)
            continue
        fingerprint = training_fingerprint(config, subject, model_source(config.profile))
        report = None if force else skip_report(config, subject, fingerprint_hash(fingerprint))
        if report is None:
            report = train_subject(bundle(), config, subject, force, stop_after_steps, progress, fingerprint)
        folder = config.lora_path(subject)
        if report.status == "skipped" and not kohya_path(folder, subject).exists():  # trained before the export
            export_kohya(folder / LORA_WEIGHTS_FILE, kohya_path(folder, subject), subject)
        reports[subject.name] = report
        print(report.message)
    return reports
