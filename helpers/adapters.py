"""Subject LoRAs as named adapters on the shared UNet: their file names, loading them, and switching which one is
active; plus the one text-to-image call of the project, which takes the adapter to use as an argument.

Used by ``training`` (class images, previews), ``pipeline`` (Phase 0, subject passes, the baseline) and so by ``qa``.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from PIL import Image

from .config import ProjectConfig
from .models import ModelBundle

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
ALL_ADAPTERS = "<all>"  # ``adapter=ALL_ADAPTERS``: every loaded subject LoRA at once (the naive baseline)


class MissingLoraError(FileNotFoundError):
    """A subject has no trained LoRA yet."""


def load_subject_loras(models: ModelBundle, config: ProjectConfig) -> list[str]:
    """Load every subject's LoRA as an adapter named after the subject (once; later calls are no-ops)."""
    from safetensors import SafetensorError

    loaded = set(adapter_names(models))
    for subject in config.subjects:
        if subject.name in loaded:
            continue
        folder = config.lora_path(subject)
        if not (folder / LORA_WEIGHTS_FILE).exists():
            raise MissingLoraError(f"subject {subject.name!r} has no trained LoRA at {folder / LORA_WEIGHTS_FILE}; "
                                   f"run notebooks/01_train_subject_loras.ipynb first")
        try:
            with warnings.catch_warnings():  # one adapter per subject on one UNet is the design, not an accident
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                models.txt2img.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS_FILE, adapter_name=subject.name)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # damaged, or trained on another base model
            if subject.name in adapter_names(models):
                models.txt2img.delete_adapters(subject.name)
            why = ("its tensor shapes do not fit this model: it was made for another base model"
                   if "size mismatch" in str(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            raise MissingLoraError(
                f"subject {subject.name!r}: {folder / LORA_WEIGHTS_FILE} cannot be loaded ({why}); rerun notebooks/01_train_subject_loras.ipynb, which retrains a "
                f"damaged LoRA (force=True retrains it in any case)") from None
    return adapter_names(models)


def adapter_names(models: ModelBundle) -> list[str]:
    return sorted(getattr(models.unet, "peft_config", {}) or {})


def active_adapters(models: ModelBundle) -> list[str]:
    """Adapters that really change the UNet's output right now ([] when LoRA is disabled or none is loaded)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in models.unet.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or all(layer.disable_adapters for layer in layers):
        return []
    active = layers[0].active_adapters
    return sorted(active if isinstance(active, list) else [active])


@contextmanager
def only_adapter(models: ModelBundle, name: str | None) -> Iterator[None]:
    """Exactly one subject's adapter active (``None``: none at all; ``ALL_ADAPTERS``: every loaded one) for the
    duration of the block."""
    loaded = adapter_names(models)
    if name not in (None, ALL_ADAPTERS) and name not in loaded:
        raise MissingLoraError(f"adapter {name!r} is not loaded (loaded: {loaded or 'none'}); call "
                               f"load_subject_loras first")
    try:
        if loaded:
            if name is None:
                models.txt2img.disable_lora()
            else:
                chosen = loaded if name == ALL_ADAPTERS else [name]
                models.txt2img.enable_lora()
                models.txt2img.set_adapters(chosen, adapter_weights=[1.0] * len(chosen))
        yield
    finally:
        if loaded:
            models.txt2img.enable_lora()


def lora_base_layers(models: ModelBundle) -> list[torch.nn.Module]:
    """The UNet layers a LoRA wraps (their ``weight`` is what fusing changes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m.get_base_layer() for m in models.unet.modules() if isinstance(m, BaseTunerLayer)]


def _lora_layers(models: ModelBundle) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in models.unet.modules() if isinstance(m, LoraLayer)]


def _is_plain_lora(layer, name: str) -> bool:
    """A linear LoRA that peft merges as weight += scaling * B @ A (no DoRA, no LoRA bias, no transposed weight)."""
    return (isinstance(layer.get_base_layer(), torch.nn.Linear) and name not in layer.lora_variant
            and not layer.lora_bias.get(name, False) and not getattr(layer, "fan_in_fan_out", False))


@torch.no_grad()
def _add_lora_deltas(layers: list, name: str) -> None:
    """Every layer's weight += scaling * B @ A, as peft's ``merge`` computes it, but one batched matmul per group of
    same-shaped layers instead of one Python round trip per layer (SDXL has 560 of them)."""
    groups: dict[tuple, list] = {}
    for m in layers:
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        groups.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, a.device), []).append(m)
    for members in groups.values():
        a = torch.stack([m.lora_A[name].weight for m in members])
        b = torch.stack([m.lora_B[name].weight for m in members])
        compute = torch.float32 if a.device.type == "cpu" else a.dtype  # CPUs are slow at fp16 matmuls
        deltas = torch.bmm(b.to(compute), a.to(compute))
        deltas *= torch.tensor([m.scaling[name] for m in members], dtype=compute, device=a.device)[:, None, None]
        weights = [m.get_base_layer().weight for m in members]
        torch._foreach_add_(weights, [d.to(w.dtype) for d, w in zip(deltas.unbind(), weights)])
        del deltas


# What a fused layer's ``merged_adapters`` holds during a pass: the same for every subject, so a compiled UNet (whose
# guards read that list) keeps one graph for all of them; the active adapter still names the subject.
FUSED_MARK = "<fused>"


@contextmanager
def fused_adapter(models: ModelBundle, name: str) -> Iterator[None]:
    """Exactly ``name``'s LoRA merged into the UNet's base weights for the block, so a pass costs what a plain pass
    costs (an unfused LoRA adds two small matmuls to every attention projection). Every LoRA layer is set the way
    peft's own ``set_adapter`` and ``merge`` leave it (active adapter ``name``, marked merged), so peft computes no
    LoRA branch on top and ``active_adapters`` names the subject; this is done on the layers directly because
    diffusers' model-wide ``set_adapters``/``enable_lora`` walk all 12,570 SDXL modules (~40 ms each, several per
    pass). Afterwards the base weights are restored bit for bit from a copy (subtracting the delta again would leave
    fp16 rounding residue that builds up pass after pass) and every layer's previous state is put back."""
    if name not in adapter_names(models):
        raise MissingLoraError(f"adapter {name!r} is not loaded (loaded: {adapter_names(models) or 'none'}); call "
                               f"load_subject_loras first")
    layers = _lora_layers(models)
    holding = [m for m in layers if name in m.lora_A]
    if not all(_is_plain_lora(m, name) for m in holding):  # DoRA and friends: let diffusers/peft merge them
        with only_adapter(models, name), _diffusers_fused(models, name):
            yield
        return
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:  # a layer without this subject's adapter must not apply another one
        m._active_adapter, m._disable_adapters = [name], name not in m.lora_A
    weights = [m.get_base_layer().weight for m in holding]
    originals = [w.detach().clone() for w in weights]
    _add_lora_deltas(holding, name)
    for m in holding:
        m.merged_adapters.append(FUSED_MARK)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(weights, originals)
        for m in holding:
            m.merged_adapters.remove(FUSED_MARK)
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


@contextmanager
def _diffusers_fused(models: ModelBundle, name: str) -> Iterator[None]:
    """``fuse_lora``/``unfuse_lora`` with the base weights restored exactly from a copy (the general path)."""
    layers = lora_base_layers(models)
    originals = [layer.weight.detach().clone() for layer in layers]
    models.txt2img.fuse_lora(components=["unet"], adapter_names=[name], lora_scale=1.0)
    try:
        yield
    finally:
        models.txt2img.unfuse_lora(components=["unet"])
        with torch.no_grad():
            for layer, weight in zip(layers, originals):
                layer.weight.copy_(weight)


BASE_MODEL = "__base__"  # peft's name for "no adapter" in a mixed batch


@contextmanager
def per_sample_adapters(models: ModelBundle, names: list[str | None]) -> Iterator[None]:
    """Sample ``i`` of every UNet call in the block sees only adapter ``names[i]`` (None: the base model): peft's
    mixed-batch LoRA forward (``adapter_names``), fed to every LoRA layer by a forward pre-hook, as peft's own
    ``PeftModel`` does it. Each layer computes each adapter's low-rank delta on that adapter's samples only, so a
    batch of subject passes costs one UNet call per step. A batch that is a multiple of ``names`` (classifier-free
    guidance stacks [negative..., positive...]) repeats the names in the same order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    loaded = adapter_names(models)
    missing = sorted({n for n in names if n is not None and n not in loaded})
    if missing:
        raise MissingLoraError(f"adapter(s) {', '.join(missing)} not loaded (loaded: {loaded or 'none'}); call "
                               f"load_subject_loras first")
    routed = [BASE_MODEL if n is None else n for n in names]

    def route(module, args, kwargs):
        batch = args[0].shape[0] if args else kwargs["x"].shape[0]
        kwargs["adapter_names"] = routed * (batch // len(routed))
        return args, kwargs

    layers = [m for m in models.unet.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._disable_adapters for m in layers]
    hooks = [m.register_forward_pre_hook(route, with_kwargs=True) for m in layers]
    for m in layers:  # the routing decides; an adapter disabled for the base model would skip it
        m._disable_adapters = False
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for m, disabled in zip(layers, saved):
            m._disable_adapters = disabled


def generate(models: ModelBundle, config: ProjectConfig, prompt: str, seed: int, adapter: str | None = None,
             size: int | None = None) -> Image.Image:
    """Text to image with exactly ``adapter`` active (None: the base model), decoded through the NaN guard.

    ``size`` defaults to the config's resolution; steps, guidance and the negative prompt come from the config.
    """
    size = size or config.resolution
    with only_adapter(models, adapter), torch.no_grad():
        latents = models.txt2img(
            prompt=prompt, negative_prompt=config.negative_prompt, height=size, width=size,
            num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
            generator=models.generator(seed), output_type="latent").images
    return models.decode(latents)[0]
