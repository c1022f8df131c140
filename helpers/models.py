"""Profiles -> one bundle of SDXL pipelines that share their components; device and dtype; the NaN-guarded decode.

``profiles`` says where each profile's weights come from; this module loads them into a text-to-image pipeline and an
inpainting pipeline over the same components (``from_pipe``: one UNet in memory) and decodes every latent through
the NaN guard. Knows nothing of layouts, LoRA training or QA.
"""
from __future__ import annotations

import os
import platform
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .config import PROFILES, ProjectConfig
from .profiles import (SDXL_BASE_ID, SDXL_VAE_FP16_FIX_ID, TINY_VERSION, WORLD_DIR, WORLD_VERSION,
                       build_sdxl_random_pipeline, load_pipeline_folder, load_tiny_pipeline, load_sdxl_pipeline,
                       world_pipeline_folder)


class NonFiniteError(RuntimeError):
    """NaN/inf appeared where the NaN guard cannot repair it."""


@dataclass
class DecodeStats:
    decodes: int = 0
    float32_fallbacks: int = 0


@dataclass
class ModelBundle:
    """Text-to-image and inpainting pipelines over one set of components (one UNet in memory)."""

    profile: str
    txt2img: "StableDiffusionXLPipeline"  # noqa: F821
    inpaint: "StableDiffusionXLInpaintPipeline"  # noqa: F821
    device: torch.device
    dtype: torch.dtype
    source: str
    decode_stats: DecodeStats = field(default_factory=DecodeStats)

    @property
    def unet(self):
        return self.txt2img.unet

    @property
    def vae(self):
        return self.txt2img.vae

    def generator(self, seed: int) -> torch.Generator:
        # A CPU generator draws the same noise on every device, so a seed means the same picture on CPU and GPU.
        return torch.Generator("cpu").manual_seed(int(seed))

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> PIL images through the NaN guard (every decode in the project goes through here)."""
        return tensor_to_pil(decode_latents(self.vae, latents, self.decode_stats))

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.unet.parameters()) / 1e6
        return (f"profile={self.profile} device={self.device.type} dtype={str(self.dtype).replace('torch.', '')} "
                f"unet={n_params:.1f}M params source={self.source}")


def resolve_profile(profile: str = "auto") -> str:
    """'auto' means sdxl on a CUDA machine and the offline world elsewhere (tiny when the world's weights are
    missing); HELPERS_PROFILE overrides 'auto'."""
    if profile == "auto":
        profile = os.environ.get("HELPERS_PROFILE", "").strip() or "auto"
    if profile == "auto":
        offline = "world" if (WORLD_DIR / "pipeline" / "model_index.json").exists() else "tiny"
        profile = "sdxl" if torch.cuda.is_available() else offline
    if profile not in PROFILES:
        raise ValueError(f"ProjectConfig.profile: unknown profile {profile!r}; choose one of "
                         f"{', '.join(PROFILES)} or 'auto'")
    return profile


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_models(config: ProjectConfig, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> ModelBundle:
    """Build the pipelines of ``config.profile``; the inpainting pipeline shares every component (``from_pipe``).

    ``dtype`` overrides the profile's choice (fp16 on CUDA for the SDXL profiles, float32 elsewhere)."""
    device = torch.device(device) if device else default_device()
    half_on_gpu = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if config.profile == "tiny":
        dtype = dtype or torch.float32
        txt2img, folder = load_tiny_pipeline(config.cache_path, dtype)
        source = str(folder)
    elif config.profile == "world":
        folder = world_pipeline_folder()
        dtype, source = dtype or torch.float32, str(folder)
        txt2img = load_pipeline_folder(folder, dtype)
    elif config.profile == "sdxl":
        if device.type != "cuda":
            warnings.warn("profile 'sdxl' without CUDA runs in float32 on the CPU: minutes per image.")
        dtype, source = half_on_gpu, SDXL_BASE_ID
        txt2img = load_sdxl_pipeline(dtype)
    elif config.profile == "sdxl-random":
        dtype, source = half_on_gpu, "random full-size SDXL architecture"
        txt2img = build_sdxl_random_pipeline(device, dtype)
    else:
        raise ValueError(f"ProjectConfig.profile: cannot load models for {config.profile!r}")
    if device.type != "cpu":
        txt2img.to(device)
    from diffusers import StableDiffusionXLInpaintPipeline

    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory / 2**30 < 20:
        txt2img.vae.enable_tiling()  # decoding 1024^2 in tiles keeps a 16 GB card out of memory errors
    txt2img.set_progress_bar_config(disable=True)
    # from_pipe casts the (shared!) components to its torch_dtype, float32 unless told: without it an fp16 SDXL
    # silently became float32 here, twice the memory and ~3x slower (the cause of the float32 benchmark twin).
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(txt2img, torch_dtype=dtype)
    inpaint.set_progress_bar_config(disable=True)
    if config.compile_unet:
        # in place (nn.Module.compile): the pipelines and peft keep working on the same module object
        txt2img.unet.to(memory_format=torch.channels_last)
        txt2img.unet.compile(mode="default", dynamic=False)
    return ModelBundle(config.profile, txt2img, inpaint, device, dtype, source)


def weights_digest(profile: str) -> str:
    """The base weights a profile's pictures and scores come from: for ``world`` a digest of every shipped file
    (a retrained decoder or scorer changes it), else ``model_source`` (hub ids and code versions name them)."""
    if profile != "world":
        return model_source(profile)
    import hashlib

    digest = hashlib.sha256(WORLD_VERSION.encode())
    weights = (p for p in WORLD_DIR.rglob("*") if p.is_file() and p.parent != WORLD_DIR  # not the card or report
               and p.suffix in (".safetensors", ".json"))
    for path in sorted(weights):
        digest.update(path.relative_to(WORLD_DIR).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def model_source(profile: str) -> str:
    """Names the base weights of a profile (part of a LoRA's training fingerprint)."""
    return {"tiny": TINY_VERSION, "world": WORLD_VERSION, "sdxl": f"{SDXL_BASE_ID}+{SDXL_VAE_FP16_FIX_ID}",
            "sdxl-random": "sdxl-random"}[profile]


# ----------------------------------------------------------------------------------------------------------------
# NaN guard
# ----------------------------------------------------------------------------------------------------------------
def decode_latents(vae, latents: torch.Tensor, stats: DecodeStats | None = None) -> torch.Tensor:
    """Decode scaled latents to images in [0, 1] (B, 3, H, W, float32), retrying in float32 on NaN/inf.

    The original SDXL VAE overflows in fp16 and returns black/NaN images; the fp16-fix VAE avoids that, and this guard
    catches whatever slips through (another VAE, an unlucky input) by decoding once more in float32.
    """
    if not torch.isfinite(latents).all():
        raise NonFiniteError("the diffusion latents contain NaN/inf before decoding: the UNet diverged. Use float32 "
                             "(or bfloat16), a lower guidance scale, or check the LoRA weights.")
    stats = stats if stats is not None else DecodeStats()
    stats.decodes += 1
    scaled = latents / vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(scaled.to(vae.device, vae.dtype), return_dict=False)[0]
        if not torch.isfinite(image).all():
            if vae.dtype == torch.float32:
                raise NonFiniteError("the VAE decode returned NaN/inf even in float32: the VAE weights are broken.")
            warnings.warn(f"VAE decode in {vae.dtype} produced NaN/inf; decoded again in float32 (NaN guard).")
            stats.float32_fallbacks += 1
            original_dtype = vae.dtype
            vae.to(torch.float32)
            try:
                image = vae.decode(scaled.to(vae.device, torch.float32), return_dict=False)[0]
            finally:
                vae.to(original_dtype)
            if not torch.isfinite(image).all():
                raise NonFiniteError("the VAE decode returned NaN/inf even in float32: the VAE weights are broken.")
    return (image.float() / 2 + 0.5).clamp(0, 1)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL pictures; scaled and rounded where the tensor lives, so a GPU hands over bytes
    (a quarter of the float copy, and no per-picture numpy pass on the CPU while the GPU waits)."""
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def image_is_finite(image: Image.Image | np.ndarray | torch.Tensor) -> bool:
    data = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image, dtype=np.float32))
    return bool(torch.isfinite(data).all())


# ----------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------
# Measured on an H200 with the full-size twin (benchmarks/results/h200_sdxl_twin_fp16.json): peak GiB.
SDXL_PEAK_GIB = {"generation": 9.7, "training, checkpointing off": 12.8, "training, checkpointing on": 6.1}


def memory_plan(profile: str, gpu: str, vram_gib: float | None) -> list[str]:
    """What the series will use on this GPU and what it does about it, before anything heavy starts."""
    if profile != "sdxl":
        return [f"profile {profile}: small models, any machine will do"]
    if vram_gib is None:
        return ["no GPU: sdxl runs in float32 on the CPU, minutes per image; use the world profile to learn offline"]
    lines = [f"{gpu}, {vram_gib:.0f} GiB: generation peaks at ~{SDXL_PEAK_GIB['generation']} GiB (measured, H200)"]
    if vram_gib < SDXL_PEAK_GIB["training, checkpointing on"] + 2:
        lines.append("too little memory for SDXL here: pick a GPU runtime with >= 16 GB (L4, A100) or use profile "
                     "'world'")
    elif vram_gib < SDXL_PEAK_GIB["training, checkpointing off"] + 3:
        lines.append("tight: VAE tiling on, LoRA training with gradient checkpointing (about 2x slower per step)")
    else:
        lines.append(f"fits: LoRA training without gradient checkpointing (~{SDXL_PEAK_GIB['training, checkpointing off']}"
                     f" GiB, the faster setting)")
    return lines


def library_versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def environment_report() -> dict[str, str]:
    report = {"python": platform.python_version(), **library_versions(), "device": "cpu", "gpu": "-", "vram_gib": "-"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report.update(device="cuda", gpu=props.name, vram_gib=f"{props.total_memory / 2**30:.1f}")
    return report
