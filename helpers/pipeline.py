"""Coarse-to-fine generation and the one-pass baseline.

Phase 0 paints a coherent scene with the base model (no LoRA). Phase 1 inpaints each subject into its region with only
that subject's LoRA active and blends the result back inside the subject's feathered mask, so every pixel outside
all masks stays exactly the coarse scene's. Never trains, never plots.
"""
from __future__ import annotations

import functools
import json
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from .adapters import (ALL_ADAPTERS, active_adapters, adapter_names, batchable, fused_adapter, generate, only_adapter,
                       per_sample_adapters)
from .config import ProjectConfig, Subject
from .io import save_image_atomic, write_json_atomic
from .layout import Layout, LayoutError, MaskSet, masks, validate_layout
from .measures import grown_box_mask
from .models import ModelBundle
from .prompts import ScenePrompts, config_scene_prompts, expand_placeholders, expand_subjects

# (picture, masks) -> the boxes of objects of a subject's class outside every region (``measures.ghost_finder``)
GhostFinder = Callable[[Image.Image, MaskSet], list[tuple[int, int, int, int]]]


# ----------------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def weighted_prompt_embeds(models: ModelBundle, prompt: str, negative_prompt: str, emphasis: list[str],
                           weight: float) -> dict[str, torch.Tensor]:
    """SDXL prompt embeddings with the tokens of ``emphasis`` scaled by ``weight`` (the "(word:1.3)" convention).

    Both SDXL tokenizers share one BPE vocabulary, so token positions agree across the two encoders. The scaled
    embedding is renormalised to its original mean, as A1111 and compel do, so only the relative emphasis changes.
    """
    pipe = models.txt2img
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt, device=models.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=negative_prompt)
    positions = word_positions(pipe.tokenizer, prompt, emphasis)
    if positions and weight != 1.0:
        original_mean = embeds.float().mean()
        scale = torch.ones(embeds.shape[1], device=embeds.device, dtype=torch.float32)
        scale[sorted(positions)] = weight
        scaled = embeds.float() * scale[None, :, None]
        embeds = (scaled * (original_mean / scaled.mean())).to(embeds.dtype)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled)


def word_positions(tokenizer, prompt: str, words: list[str]) -> set[int]:
    """The token positions of every occurrence of each of ``words`` in ``prompt`` as the text encoders see it (start
    token included, truncated to the tokenizer's length). Both SDXL tokenizers share one BPE vocabulary, so one
    tokenizer places them for both encoders."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    positions = set()
    for word in words:
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        for start in range(len(ids) - len(word_ids) + 1):
            if word_ids and ids[start:start + len(word_ids)] == word_ids:
                positions.update(range(start, start + len(word_ids)))
    return positions


# ----------------------------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SubjectPass:
    subject: str
    seed: int
    strength: float
    crop_box: tuple[int, int, int, int]
    active_adapters: list[str]
    seconds: float
    prompt: str


@dataclass
class GenerationResult:
    """Everything a coarse-to-fine run produced; ``stages[i]`` is the image after subject ``i``'s pass."""

    scene_prompt: str
    seed: int
    layout: Layout
    masks: MaskSet
    coarse: Image.Image
    passes: list[SubjectPass] = field(default_factory=list)
    stages: list[Image.Image] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    scene: Image.Image | None = None  # Phase 0 before its ghosts were painted over (None: nothing was painted)
    ghosts_removed: list[list[int]] = field(default_factory=list)  # boxes painted over, round by round

    @property
    def final(self) -> Image.Image:
        return self.stages[-1] if self.stages else self.coarse

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_image_atomic(self.coarse, folder / "coarse.png")
        if self.scene is not None:
            save_image_atomic(self.scene, folder / "scene_with_ghosts.png")
        for i, (p, stage) in enumerate(zip(self.passes, self.stages)):
            save_image_atomic(stage, folder / f"stage_{i + 1}_{p.subject}.png")
        save_image_atomic(self.final, folder / "composite.png")
        write_json_atomic(folder / "result.json", {
            "scene_prompt": self.scene_prompt, "seed": self.seed, "layout": self.layout.to_dict(),
            "passes": [asdict(p) for p in self.passes], "seconds": self.seconds,
            "ghosts_removed": self.ghosts_removed})
        return folder

    @classmethod
    def load(cls, folder: str | Path, feather: int) -> GenerationResult:
        folder = Path(folder)
        if not (folder / "result.json").exists():
            raise FileNotFoundError(f"no coarse-to-fine result in {folder}; run notebooks/03_coarse_to_fine.ipynb "
                                    f"first")
        summary = json.loads((folder / "result.json").read_text())
        layout = Layout.from_dict(summary["layout"], source=str(folder / "result.json"))
        coarse = Image.open(folder / "coarse.png").convert("RGB")
        passes = [SubjectPass(**{**p, "crop_box": tuple(p["crop_box"])}) for p in summary["passes"]]
        stages = [Image.open(folder / f"stage_{i + 1}_{p.subject}.png").convert("RGB") for i, p in enumerate(passes)]
        scene = folder / "scene_with_ghosts.png"
        return cls(summary["scene_prompt"], summary["seed"], layout, masks(layout, *coarse.size, feather), coarse,
                   passes, stages, summary["seconds"], Image.open(scene).convert("RGB") if scene.exists() else None,
                   summary.get("ghosts_removed", []))


# ----------------------------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------------------------
def subject_seed(seed: int, index: int, attempt: int = 0) -> int:
    """A distinct, reproducible seed per subject and per QA attempt."""
    return seed + 1000 * (index + 1) + attempt


def generate_scene(models: ModelBundle, config: ProjectConfig, prompt: str, seed: int) -> Image.Image:
    """Phase 0: the whole scene from the base model with every LoRA off (``{cat}``-style placeholders expanded)."""
    prompt = expand_placeholders(expand_subjects(prompt, config.subjects), config.subjects)
    return generate(models, config, prompt, seed, adapter=None)


def blend_in_mask(base: Image.Image, patch: Image.Image, soft_mask: np.ndarray,
                  box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """``patch`` inside the feathered mask, ``base`` everywhere else (bit-exact where the mask is 0). ``box``: where
    the mask can be non-zero (only those pixels are computed); ``patch`` is either the whole picture or just that
    box."""
    x0, y0, x1, y1 = box or (0, 0, base.width, base.height)
    m = soft_mask[y0:y1, x0:x1]
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    out = np.array(base)
    if not len(rows):
        return Image.fromarray(out)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1  # the mask's own extent inside the box
    p = np.asarray(patch)
    p = p[y0:y1, x0:x1] if patch.size == base.size else p
    b = out[y0 + r0:y0 + r1, x0 + c0:x0 + c1]
    m = m[r0:r1, c0:c1, None]
    # m * p + (1 - m) * b rounded, in place; where m is 0 that is exactly b, so the whole extent is written
    mixed = p[r0:r1, c0:c1] * m
    mixed += (1 - m) * b
    b[...] = np.clip(np.round(mixed, out=mixed), 0, 255, out=mixed).astype(np.uint8)
    return Image.fromarray(out)


def pass_size(models: ModelBundle, config: ProjectConfig, crop_side: int) -> int:
    """The side of a subject pass: the crop's own size rounded up to what the UNet divides evenly, between
    ``subject_pass_min_size`` and the resolution (a small crop is upscaled to a size the model draws well). With a
    compiled UNet a pass runs at whichever of those two bounds is nearer the crop's size (the larger on a tie), so two
    static graphs serve every pass; passes always at the resolution cost what compiling saves (README, runs n and q)."""
    if config.compile_unet:
        return min((config.resolution, config.subject_pass_min_size), key=lambda side: abs(side - crop_side))
    multiple = models.inpaint.vae_scale_factor * 2 ** (len(models.unet.config.block_out_channels) - 1)
    side = -(-crop_side // multiple) * multiple
    return int(min(config.resolution, max(side, config.subject_pass_min_size)))


def focus_tokens(models: ModelBundle, prompts: list[str], words: list[list[str]]) -> torch.Tensor:
    """(samples, 77): 1 at the token positions (``word_positions``) of sample ``i``'s ``words[i]`` in ``prompts[i]``."""
    tokenizer = models.txt2img.tokenizer
    out = torch.zeros(len(prompts), tokenizer.model_max_length)
    for i, (prompt, wanted) in enumerate(zip(prompts, words)):
        out[i, sorted(word_positions(tokenizer, prompt, wanted))] = 1
    return out


class _RegionCrossAttention:
    """A cross-attention processor that adds a bias to the logits: ``+weight`` for the focus tokens of sample ``i`` at
    the query positions inside its mask, ``-weight`` outside (the mask area-averaged to each level's size, so the
    bias fades across the feather); the unconditional half of a guidance batch is left alone. Self-attention goes
    through diffusers' own processor unchanged. The masks are pooled once per level on entry; a call only forms
    the bias from them (plain tensor work, which a compiled UNet traces)."""

    def __init__(self, mask: torch.Tensor, focus: torch.Tensor, weight: float):
        height, width = mask.shape[-2:]
        self.inside = {}  # queries of a level -> (samples, queries): the share of each query's pixels in the mask
        for factor in (2 ** k for k in range(12)):
            if height // factor and width // factor and height % factor == 0 and width % factor == 0:
                pooled = torch.nn.functional.adaptive_avg_pool2d(mask, (height // factor, width // factor))
                self.inside[height // factor * (width // factor)] = pooled.flatten(1)
        from diffusers.models.attention_processor import AttnProcessor2_0  # only when a pass turns it on

        self.focus, self.weight, self.plain = focus.to(mask.device), weight, AttnProcessor2_0()

    def bias(self, queries: int, keys: int, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        inside = self.inside.get(queries)
        if inside is None or keys != self.focus.shape[1] or batch % len(inside):
            return None
        bias = (self.weight * (2 * inside[:, :, None] - 1) * self.focus[:, None, :]).to(like.dtype)
        halves = batch // len(inside)  # [negative..., positive...]: the bias on the positive half only
        return torch.cat([torch.zeros_like(bias)] * (halves - 1) + [bias])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None and attention_mask is None and hidden_states.ndim == 3:
            attention_mask = self.bias(hidden_states.shape[1], encoder_hidden_states.shape[1],
                                       hidden_states.shape[0], hidden_states)
        return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


@contextmanager
def region_attention(models: ModelBundle, mask: torch.Tensor, focus: torch.Tensor, weight: float) -> Iterator[None]:
    """For the block, every cross-attention layer of the UNet biased towards ``focus`` inside ``mask``
    (``_RegionCrossAttention``); the UNet's own processors are put back afterwards."""
    unet = models.unet
    before = unet.attn_processors
    processor = _RegionCrossAttention(mask.float(), focus, weight)
    unet.set_attn_processor({name: processor if name.endswith("attn2.processor") else proc
                             for name, proc in before.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(before)


RESAMPLE_SHARE = 0.3  # the share of an inpainting call's steps that ``inpaint_resample`` repeats: where shapes form


@functools.cache
def resampling_scheduler_class() -> type:
    """``EulerDiscreteScheduler`` with RePaint's resampling (Lugmayr et al. 2022, arXiv 2201.09865) for a plain
    (4-channel) UNet's inpainting: ``plan`` = (first step, steps, times) runs each of those steps ``times`` times. A
    repeat steps down to the next level as Euler does, then back up with fresh noise; the pipeline pastes the known
    picture outside the mask at that level as after any step, noised anew each time as RePaint samples it (a
    hand-written loop on 60 development cases: 73 % with the pipeline's one fixed noise, 85 % with fresh noise), and
    the UNet sees both again. Without it a UNet decides a shape in the first steps from noise and can only keep it;
    with it the shape is revised against what the picture around it has become. In the world, "a {class}" into an
    empty region at strength 1.0 is recognised in 72.5 % instead of 60.8 % with 5 runs (the gate's seeds); with the
    subject LoRAs it changed nothing measurable after QA (benchmarks/results/world_inpaint_resample_2026-12-04.md), so
    ``inpaint_resample`` is off by default."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    class ResamplingEulerScheduler(EulerDiscreteScheduler):
        plan: tuple[int, int, int] | None = None
        generator = None  # the pipeline's generator(s), as its last step was given them

        def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
            super().set_timesteps(num_inference_steps, device, timesteps, sigmas)
            if self.plan is None:
                return
            first, count, times = self.plan
            repeats = torch.ones(len(self.timesteps), dtype=torch.long)
            repeats[first:first + count] = times
            self.timesteps = self.timesteps.repeat_interleave(repeats.to(self.timesteps.device))
            self.sigmas = torch.cat([self.sigmas[:-1].repeat_interleave(repeats.to(self.sigmas.device)),
                                     self.sigmas[-1:]])

        def add_noise(self, original_samples, noise, timesteps):
            if self.step_index is not None:  # in the loop: the picture around the mask noised anew at each level
                noise = randn_tensor(noise.shape, generator=self.generator, device=noise.device, dtype=noise.dtype)
            return super().add_noise(original_samples, noise, timesteps)

        def step(self, model_output, timestep, sample, *args, generator=None, return_dict=True, **kwargs):
            self.generator = generator
            if self.step_index is None:
                self._init_step_index(timestep)
            here = self.step_index
            sigma = self.sigmas[here]
            if self.sigmas[here + 1] != sigma:
                return super().step(model_output, timestep, sample, *args, generator=generator,
                                    return_dict=return_dict, **kwargs)
            lower = self.sigmas[here + 1:][self.sigmas[here + 1:] < sigma][0]
            self.sigmas[here + 1] = lower  # Euler to the next level down ...
            try:
                stepped, original = super().step(model_output, timestep, sample, *args, generator=generator,
                                                 return_dict=False, **kwargs)
            finally:
                self.sigmas[here + 1] = sigma
            noise = randn_tensor(stepped.shape, generator=generator, device=stepped.device, dtype=stepped.dtype)
            resampled = stepped + (sigma ** 2 - lower ** 2).sqrt().to(stepped.dtype) * noise  # ... and back up
            if not return_dict:
                return resampled, original
            return EulerDiscreteSchedulerOutput(prev_sample=resampled, pred_original_sample=original)

    return ResamplingEulerScheduler


@contextmanager
def resampling(pipe, times: int, strength: float, steps: int) -> Iterator[None]:
    """During one inpainting call of ``pipe`` with ``steps`` and ``strength``: the first ``RESAMPLE_SHARE`` of the
    steps it runs, each run ``times`` times (``resampling_scheduler_class``). Nothing changes when ``times`` is 1."""
    if times <= 1:
        yield
        return
    original = pipe.scheduler
    if type(original).__name__ != "EulerDiscreteScheduler":
        raise ValueError(f"inpaint_resample needs SDXL's EulerDiscreteScheduler, the pipeline has "
                         f"{type(original).__name__}; set inpaint_resample to 1 or load the model's own scheduler")
    scheduler = resampling_scheduler_class().from_config(original.config)
    run = min(int(steps * strength), steps)  # the steps the pipeline runs of ``steps`` (its get_timesteps)
    scheduler.plan = (steps - run, max(1, round(RESAMPLE_SHARE * run)), times)
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


def inpaint_latents(models: ModelBundle, config: ProjectConfig, image: Image.Image | list[Image.Image],
                    mask: Image.Image | list[Image.Image], strength: float, seed: int | list[int], size: int,
                    focus: torch.Tensor | None = None, **text) -> torch.Tensor:
    """The project's one inpainting call: ``image`` repainted inside ``mask`` at ``size``, steps and guidance from the
    config; ``text``: a prompt and negative prompt, or their embeddings. Lists make a batch, one seed per sample
    (sample ``i`` draws its noise from its own generator, exactly as a call with that sample alone). ``focus``
    (``focus_tokens``): the words ``config.region_attention`` draws inside the mask. Latents out (decode with the
    NaN guard)."""
    generator = [models.generator(s) for s in seed] if isinstance(seed, list) else models.generator(seed)
    if models.unet.config.in_channels == 4:
        # diffusers VAE-encodes the masked picture for every sample although only a 9-channel inpainting UNet reads
        # it; a placeholder of the right shape skips that encode (the 4-channel path never looks at it)
        count, side = len(image) if isinstance(image, list) else 1, size // models.inpaint.vae_scale_factor
        text["masked_image_latents"] = torch.zeros(count, models.vae.config.latent_channels, side, side,
                                                   dtype=models.dtype, device=models.device)
    image, mask = _pixels(image, models.device), _pixels(mask, models.device)
    with ExitStack() as during_call:
        if focus is not None and config.region_attention > 0:
            during_call.enter_context(region_attention(models, mask, focus, config.region_attention))
        during_call.enter_context(resampling(models.inpaint, config.inpaint_resample, strength,
                                             config.effective_inpaint_steps))
        return models.inpaint(**text, image=image, mask_image=mask, strength=strength, height=size, width=size,
                              num_inference_steps=config.effective_inpaint_steps,
                              guidance_scale=config.guidance_scale, generator=generator, output_type="latent").images


def _pixels(pictures: Image.Image | list[Image.Image], device: torch.device) -> torch.Tensor:
    """Pictures of one size as a (B, C, H, W) tensor in [0, 1] on ``device``, the values diffusers' preprocessing
    computes from them; converted there in one step instead of per picture in numpy (~25 ms of CPU per 800²
    picture, with the GPU waiting)."""
    pictures = [p if p.mode in ("RGB", "L") else p.convert("RGB")
                for p in (pictures if isinstance(pictures, list) else [pictures])]
    pixels = torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).to(device)
    pixels = pixels[:, None] if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    return pixels.float() / 255


def region_pass(models: ModelBundle, config: ProjectConfig, image: Image.Image, masks_: MaskSet, subject: Subject,
                seed: int, strength: float, prompt: str | None = None,
                emphasis_weight: float = 1.0) -> tuple[Image.Image, SubjectPass]:
    """Inpaint ``subject`` into its region of ``image`` with only its adapter active; returns the new full image.
    ``prompt``: the subject's words in the scene's setting (default: its pass prompt from the config's scene). Stages
    carry ``record_function`` labels ("pass/...") so a profiler run can attribute the time."""
    from torch.profiler import record_function

    start = time.perf_counter()
    prompt = prompt or config_scene_prompts(config).passes[subject.name]
    box, size = _region_pass_box(models, config, masks_, subject.name)
    with record_function("pass/crop"):
        crop, mask_crop = _pass_inputs(image, masks_, subject.name, box, size)
    if not adapter_names(models):  # no LoRA loaded at all (plumbing runs): the base model paints the region
        switch = only_adapter(models, None)
    else:  # raises MissingLoraError when this subject's adapter is not loaded
        switch = (fused_adapter if config.fuse_subject_lora else only_adapter)(models, subject.name,
                                                                               config.subject_lora_scale)
    with ExitStack() as during_pass, torch.no_grad():
        with record_function("pass/adapter-switch"):
            during_pass.enter_context(switch)
        adapters_during_pass = active_adapters(models)
        with record_function("pass/prompt"):
            if emphasis_weight != 1.0:
                text = weighted_prompt_embeds(models, prompt, pass_negative_prompt(config, subject),
                                              [subject.token, subject.class_name], emphasis_weight)
            else:
                text = dict(prompt=prompt, negative_prompt=pass_negative_prompt(config, subject))
        focus = focus_tokens(models, [prompt], [[subject.class_name]]) if config.region_attention > 0 else None
        with record_function("pass/inpaint"):
            latents = inpaint_latents(models, config, crop, mask_crop, strength, seed, size, focus, **text)
    with record_function("pass/decode"):
        painted = models.decode(latents)[0]
    with record_function("pass/paste"):
        result = _paste_pass(image, painted, masks_, subject.name, box)
    info = SubjectPass(subject.name, seed, strength, box, adapters_during_pass, time.perf_counter() - start, prompt)
    return result, info


def _region_pass_box(models: ModelBundle, config: ProjectConfig, masks_: MaskSet,
                     name: str) -> tuple[tuple[int, int, int, int], int]:
    """The square a lone pass over ``name``'s region crops, and the side it paints at."""
    box = masks_.crop_box(name, config.region_margin)
    size = pass_size(models, config, _side(box))
    return pass_box(box, size, masks_), size


def vae_round_trip(models: ModelBundle, images: Image.Image | list[Image.Image]) -> Image.Image | list[Image.Image]:
    """``images`` (of one size) encoded and decoded by the model's VAE in one batch: what any generated picture of
    them can be at best."""
    pictures = images if isinstance(images, list) else [images]
    with torch.no_grad():
        pixels = models.txt2img.image_processor.preprocess(pictures).to(models.device, models.vae.dtype)
        latents = models.vae.encode(pixels).latent_dist.mode() * models.vae.config.scaling_factor
    decoded = models.decode(latents)
    return decoded if isinstance(images, list) else decoded[0]


def region_round_trip(models: ModelBundle, config: ProjectConfig, image: Image.Image, masks_: MaskSet,
                      name: str) -> Image.Image:
    """``image`` with ``name``'s region replaced by itself after a VAE round trip, cropped, sized and pasted back as
    a pass paints it: the most faithful picture a pass can return there (measures are checked against it)."""
    box, size = _region_pass_box(models, config, masks_, name)
    crop, _ = _pass_inputs(image, masks_, name, box, size)
    return _paste_pass(image, vae_round_trip(models, crop), masks_, name, box)


PASS_BOX_GROWTH = 1.05  # a box is grown to its pass size by at most this factor instead of being resized


def pass_box(box: tuple[int, int, int, int], size: int, masks_: MaskSet) -> tuple[int, int, int, int]:
    """The square a pass of ``size`` crops: the subject's crop ``box``, grown to ``size`` where that adds under 5 % (a
    798 px box is cropped at 800 px rather than resized there and back); a smaller box is upscaled to the pass size,
    which draws its subject in more detail (in the world, more context instead was worse: README)."""
    side = box[2] - box[0]
    if not side < size <= min(masks_.width, masks_.height, side * PASS_BOX_GROWTH):
        return box
    x0 = int(np.clip(box[0] - (size - side) // 2, 0, masks_.width - size))
    y0 = int(np.clip(box[1] - (size - side) // 2, 0, masks_.height - size))
    return x0, y0, x0 + size, y0 + size


def _pass_inputs(image: Image.Image, masks_: MaskSet, name: str, box: tuple[int, int, int, int],
                 size: int) -> tuple[Image.Image, Image.Image]:
    """A pass's crop of ``image`` and of the subject's support, at the pass size."""
    crop = image.crop(box)
    crop = crop if crop.size == (size, size) else crop.resize((size, size), Image.LANCZOS)
    mask_crop = Image.fromarray(masks_.support[name][box[1]:box[3], box[0]:box[2]].astype(np.uint8) * 255)
    mask_crop = mask_crop if mask_crop.size == (size, size) else mask_crop.resize((size, size), Image.NEAREST)
    return crop, mask_crop


def _paste_pass(image: Image.Image, painted: Image.Image, masks_: MaskSet, name: str,
                box: tuple[int, int, int, int]) -> Image.Image:
    """The painted crop back at its box's size, blended into ``image`` inside the subject's feathered mask only."""
    width = box[2] - box[0]
    painted = painted if painted.size == (width, width) else painted.resize((width, width), Image.LANCZOS)
    return blend_in_mask(image, painted, masks_.soft[name], box)  # the support lies inside the box


@dataclass(frozen=True)
class PassJob:
    """One subject pass to run: who, with which seed, strength and prompt (and emphasis, for QA refinements)."""

    subject: Subject
    seed: int
    strength: float
    prompt: str
    emphasis_weight: float = 1.0


def negative_with_classes(config: ProjectConfig, classes: Iterable[str]) -> str:
    """The configured negative prompt followed by each of ``classes`` once."""
    return ", ".join(filter(None, [config.negative_prompt, *dict.fromkeys(classes)]))


def pass_negative_prompt(config: ProjectConfig, subject: Subject) -> str:
    """A subject pass's negative prompt: the configured one, plus (``pass_negative_classes``) every other class the
    scorer knows, so the region draws its own class rather than a neighbouring one."""
    others = [c for c in config.presence_classes() if c != subject.class_name] if config.pass_negative_classes else []
    return negative_with_classes(config, others)


def _side(box: tuple[int, int, int, int]) -> int:
    return box[2] - box[0]


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _batches(models: ModelBundle, config: ProjectConfig, jobs: list[PassJob], masks_: MaskSet) -> list[list[PassJob]]:
    """``pass_batches``, or one job per batch when the jobs' LoRAs cannot share a call (``adapters.batchable``)."""
    if not batchable(models, [j.subject.name for j in jobs]):
        return [[job] for job in jobs]
    return pass_batches(jobs, masks_, config)


def pass_batches(jobs: list[PassJob], masks_: MaskSet, config: ProjectConfig) -> list[list[PassJob]]:
    """The jobs, in order, cut into batches that run as one call each: consecutive jobs of one strength. With
    ``batch_subject_passes="disjoint"`` a job joins the batch only when its crop box overlaps no member's, so no
    pass reads what another paints and the pixels equal sequential passes'; ``"all"`` batches overlapping crops too
    (each pass then sees its neighbours as they were before the batch: Phase 0's objects, not the other subjects);
    ``"off"``: one job per batch (sequential passes, layout order)."""
    mode = config.batch_subject_passes
    batches: list[list[PassJob]] = []
    for job in jobs:
        current = batches[-1] if batches else None
        box = masks_.crop_box(job.subject.name, config.region_margin)
        fits = (current is not None and mode != "off" and current[0].strength == job.strength
                and job.subject.name not in {j.subject.name for j in current}
                and (mode == "all" or not any(_boxes_overlap(box, masks_.crop_box(j.subject.name, config.region_margin))
                                              for j in current)))
        if fits:
            current.append(job)
        else:
            batches.append([job])
    return batches


def batched_pass(models: ModelBundle, config: ProjectConfig, image: Image.Image | list[Image.Image],
                 masks_: MaskSet | list[MaskSet], jobs: list[PassJob]) -> list[tuple[Image.Image, SubjectPass]]:
    """Several subject passes as one batched inpaint call at one pass size, sample ``i`` with only job ``i``'s LoRA
    (``adapters.per_sample_adapters``: each sample's own LoRA delta, no adapter switch per sample). ``image``: the
    picture every job paints on, or one per job (passes of several composites); ``masks_`` likewise (one per job:
    pictures with layouts of their own, as the world's inpainting gate paints them). Each result is its job's
    picture with only that job's region repainted."""
    from torch.profiler import record_function

    start = time.perf_counter()
    images = image if isinstance(image, list) else [image] * len(jobs)
    mask_sets = masks_ if isinstance(masks_, list) else [masks_] * len(jobs)
    boxes = [m.crop_box(j.subject.name, config.region_margin) for m, j in zip(mask_sets, jobs)]
    size = max(pass_size(models, config, _side(box)) for box in boxes)
    boxes = [pass_box(box, size, m) for box, m in zip(boxes, mask_sets)]
    with record_function("pass/crop"):
        inputs = [_pass_inputs(im, m, j.subject.name, box, size)
                  for im, m, j, box in zip(images, mask_sets, jobs, boxes)]
    names = [j.subject.name for j in jobs] if adapter_names(models) else [None] * len(jobs)
    with per_sample_adapters(models, names, config.subject_lora_scale), torch.no_grad():
        with record_function("pass/prompt"):
            if all(j.emphasis_weight == 1.0 for j in jobs):
                text = dict(prompt=[j.prompt for j in jobs],
                            negative_prompt=[pass_negative_prompt(config, j.subject) for j in jobs])
            else:
                parts = [weighted_prompt_embeds(models, j.prompt, pass_negative_prompt(config, j.subject),
                                                [j.subject.token, j.subject.class_name], j.emphasis_weight)
                         for j in jobs]
                text = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        focus = focus_tokens(models, [j.prompt for j in jobs], [[j.subject.class_name] for j in jobs]) \
            if config.region_attention > 0 else None
        with record_function("pass/inpaint"):
            latents = inpaint_latents(models, config, [c for c, _ in inputs], [m for _, m in inputs],
                                      jobs[0].strength, [j.seed for j in jobs], size, focus, **text)
    with record_function("pass/decode"):  # one at a time: a batch of 1024² decodes is the peak of the whole run
        painted = [models.decode(latents[i:i + 1])[0] for i in range(len(latents))]
    seconds = (time.perf_counter() - start) / len(jobs)
    with record_function("pass/paste"):
        return [(_paste_pass(im, p, m, j.subject.name, box),
                 SubjectPass(j.subject.name, j.seed, j.strength, box, [n] if n else [], seconds, j.prompt))
                for im, m, j, box, p, n in zip(images, mask_sets, jobs, boxes, painted, names)]


def _run_batch(models: ModelBundle, config: ProjectConfig, image: Image.Image | list[Image.Image], masks_: MaskSet,
               batch: list[PassJob]) -> list[tuple[Image.Image, SubjectPass]]:
    """One batch of ``_batches``: more jobs than one share one batched call when their LoRAs can, otherwise (or a
    lone job) plain (fused) passes one after another; ``image``: the picture every job paints on, or one per job.
    Each result is its job's picture with only that job's region repainted."""
    images = image if isinstance(image, list) else [image] * len(batch)
    if len(batch) > 1 and batchable(models, [job.subject.name for job in batch]):
        return batched_pass(models, config, images, masks_, batch)
    return [region_pass(models, config, im, masks_, job.subject, job.seed, job.strength, job.prompt,
                        job.emphasis_weight) for im, job in zip(images, batch)]


def region_passes(models: ModelBundle, config: ProjectConfig, image: Image.Image, masks_: MaskSet,
                  jobs: list[PassJob]) -> tuple[list[Image.Image], list[SubjectPass]]:
    """Every job's pass, in order, each batch (``pass_batches``) as one call; a later batch paints on the picture
    the earlier ones left. Returns the picture after each job (its stage) and what each pass did."""
    return region_passes_of_composites(models, config, [image], masks_, [jobs])[0]


def region_passes_of_composites(models: ModelBundle, config: ProjectConfig, images: list[Image.Image],
                                masks_: MaskSet, jobs: list[list[PassJob]]) \
        -> list[tuple[list[Image.Image], list[SubjectPass]]]:
    """``region_passes`` of several composites of one layout at once (``jobs[k]``: composite ``k``'s passes, the
    same subjects and strengths in the same order, their own seeds): each batch of passes runs as one call for every
    composite together, so N composites cost about as many calls as one. Per composite: its stages and passes."""
    batches = _batches(models, config, jobs[0], masks_)
    done = [([], []) for _ in images]
    images = list(images)
    start = 0
    for batch in batches:
        members = [(k, job) for k in range(len(images)) for job in jobs[k][start:start + len(batch)]]
        painted = _run_batch(models, config, [images[k] for k, _ in members], masks_, [job for _, job in members])
        first = {}
        for (k, job), (picture, info) in zip(members, painted):
            # a pass's picture is the one it painted on with only its region changed: the composite's first pass of
            # the batch is taken whole, the others' regions copied onto it
            images[k] = (_copy_region(images[k], picture, masks_, job.subject.name, config.region_margin)
                         if first.setdefault(k, job) is not job else picture)
            done[k][0].append(images[k])
            done[k][1].append(info)
        start += len(batch)
    return done


def pass_candidates(models: ModelBundle, config: ProjectConfig, image: Image.Image, masks_: MaskSet,
                    jobs: list[PassJob]) -> list[tuple[Image.Image, SubjectPass]]:
    """One candidate per job, each ``image`` with only its job's region repainted (the QA loop's refinements of a
    round): batched where ``pass_batches`` allows, otherwise one pass after another, all from the same ``image``."""
    return [out for batch in _batches(models, config, jobs, masks_)
            for out in _run_batch(models, config, image, masks_, batch)]


def _copy_region(image: Image.Image, picture: Image.Image, masks_: MaskSet, name: str, margin: float) -> Image.Image:
    x0, y0, x1, y1 = masks_.crop_box(name, margin)
    touched = masks_.support[name][y0:y1, x0:x1, None]
    out = np.array(image)
    np.copyto(out[y0:y1, x0:x1], np.asarray(picture)[y0:y1, x0:x1], where=touched)
    return Image.fromarray(out)


def with_regions_from(image: Image.Image, pictures: dict[str, Image.Image], masks_: MaskSet, layout: Layout,
                      margin: float) -> Image.Image:
    """``image`` with each named subject's region copied from its picture (every pixel its feathered mask touches:
    a pass's result is already blended there), in layout order: how the passes of one batch, or the best attempt of
    every subject, are put back together."""
    for region in layout.regions:
        if region.subject in pictures:
            image = _copy_region(image, pictures[region.subject], masks_, region.subject, margin)
    return image


def remove_ghosts(models: ModelBundle, config: ProjectConfig, scene: Image.Image, masks_: MaskSet,
                  prompts: ScenePrompts, seed: int, find_ghosts: GhostFinder) -> tuple[Image.Image, list[list[int]]]:
    """Phase 0's own objects of a subject's class outside every region, painted over with the scene's setting (base
    model, the subjects' classes as negative prompt), at most ``ghost_cleanup_rounds`` rounds; the regions
    themselves are left to the subject passes. Returns the cleaned scene and the boxes painted over."""
    negative = negative_with_classes(config, (s.class_name for s in config.subjects))
    removed: list[list[int]] = []
    for round_ in range(config.ghost_cleanup_rounds):
        boxes = find_ghosts(scene, masks_)
        if not boxes:
            break
        soft = grown_box_mask(boxes, scene.size, grow=0.25, feather=config.effective_feather_px)
        with only_adapter(models, None), torch.no_grad():
            latents = inpaint_latents(models, config, scene, Image.fromarray((soft > 0).astype(np.uint8) * 255), 1.0,
                                      seed + 7919 * (round_ + 1), config.resolution, prompt=prompts.empty_setting,
                                      negative_prompt=negative)
        scene = blend_in_mask(scene, models.decode(latents)[0], soft)
        removed += [list(box) for box in boxes]
    return scene, removed


def coarse_to_fine(models: ModelBundle, config: ProjectConfig, layout: Layout, scene_prompt: str | None = None,
                   seed: int | None = None, find_ghosts: GhostFinder | None = None) -> GenerationResult:
    """Phase 0 (the scene as written, no LoRA; with ``find_ghosts``, its objects of a subject's class outside every
    region painted over with the scene's setting) then Phase 1 (each subject inpainted with only its own LoRA and
    its words in the scene's setting), in layout order."""
    seed = config.seed if seed is None else seed
    return coarse_to_fine_many(models, config, layout, [seed], scene_prompt, find_ghosts)[0]


def coarse_to_fine_many(models: ModelBundle, config: ProjectConfig, layout: Layout, seeds: list[int],
                        scene_prompt: str | None = None, find_ghosts: GhostFinder | None = None) \
        -> list[GenerationResult]:
    """``coarse_to_fine`` for several seeds of one scene and layout, batched: Phase 0 draws every scene in one call
    and each batch of subject passes runs once for all composites (each composite equals its seed's own run, within
    the batch's floating-point noise). ``seconds`` of each result: its share of the batch's time."""
    from torch.profiler import record_function

    scene_prompt = scene_prompt or config.scene_prompt
    prompts = config_scene_prompts(config, scene_prompt)  # a scene that does not name a subject stops here
    check_layout_matches(layout, config)
    masks_ = masks(layout, config.resolution, config.resolution, config.effective_feather_px)
    start = time.perf_counter()
    with record_function("phase0/generate"):
        scenes = generate(models, config, prompts.phase0, list(seeds), adapter=None)
    results = []
    for seed, scene in zip(seeds, scenes):
        coarse, removed = scene, []
        if find_ghosts is not None and config.ghost_cleanup_rounds:
            coarse, removed = remove_ghosts(models, config, scene, masks_, prompts, seed, find_ghosts)
        results.append(GenerationResult(scene_prompt, seed, layout, masks_, coarse,
                                        scene=scene if removed else None, ghosts_removed=removed))
    for result in results:
        result.seconds["phase0"] = (time.perf_counter() - start) / len(seeds)
    jobs = [[PassJob(config.subject(region.subject), subject_seed(seed, index), config.inpaint_strength,
                     prompts.passes[region.subject]) for index, region in enumerate(layout.regions)] for seed in seeds]
    passes = region_passes_of_composites(models, config, [r.coarse for r in results], masks_, jobs)
    for result, (stages, infos) in zip(results, passes):
        result.stages, result.passes = stages, infos
        for info in infos:
            result.seconds[f"phase1_{info.subject}"] = info.seconds
        result.seconds["total"] = (time.perf_counter() - start) / len(seeds)
    return results


def one_pass_baseline(models: ModelBundle, config: ProjectConfig, seed: int | None = None,
                      scene_prompt: str | None = None) -> Image.Image:
    """The naive approach, given the same scene: one generation with every subject LoRA active and the scene prompt
    with each subject's token before its class word."""
    seed = config.seed if seed is None else seed
    return generate(models, config, config_scene_prompts(config, scene_prompt).baseline, seed, adapter=ALL_ADAPTERS)


def with_and_without_lora(models: ModelBundle, config: ProjectConfig, seed: int) \
        -> dict[str, tuple[Image.Image, Image.Image]]:
    """Each subject's instance prompt on the same seed, base model vs its own LoRA (for notebook 01's figure)."""
    return {s.name: (generate(models, config, s.instance_prompt, seed, adapter=None),
                     generate(models, config, s.instance_prompt, seed, adapter=s.name)) for s in config.subjects}


def check_layout_matches(layout: Layout, config: ProjectConfig) -> None:
    """The checks of a layout loaded from JSON or the designer, for one built in code too: one region per configured
    subject, finite and inside the canvas, large enough, overlapping no more than allowed."""
    try:
        validate_layout(layout, config.subject_names)
    except LayoutError as e:
        raise LayoutError(f"{e}. Re-run notebook 02 or fix the layout.") from None
