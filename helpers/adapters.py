"""Subject LoRAs as named adapters on the shared UNet: their file names, loading them, and switching which one is
active; plus the one text-to-image call of the project, which takes the adapter to use as an argument.

Used by ``training`` (class images, previews), ``pipeline`` (Phase 0, subject passes, the baseline) and so by ``qa``.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from types import MethodType
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from .config import LORA_WEIGHTS_FILE, ProjectConfig  # noqa: F401 (LORA_WEIGHTS_FILE: named here for the callers)
from .models import ModelBundle

ALL_ADAPTERS = "<all>"  # ``adapter=ALL_ADAPTERS``: every loaded subject LoRA at once (the naive baseline)


class MissingLoraError(FileNotFoundError):
    """A subject has no trained LoRA yet."""


def load_subject_loras(models: ModelBundle, config: ProjectConfig) -> list[str]:
    """Load every subject's LoRA as an adapter named after the subject (once; later calls are no-ops): the one
    notebook 01 trained, or the subject's own ``lora_file``."""
    loaded = set(adapter_names(models))
    for subject in config.subjects:
        if subject.name in loaded:
            continue
        path = config.lora_file_path(subject)
        if not path.exists():
            raise MissingLoraError(
                f"subject {subject.name!r}: its lora_file {path} does not exist; fix the path in notebook 01's "
                f"subjects" if subject.lora_file else
                f"subject {subject.name!r} has no trained LoRA at {path}; run notebooks/01_train_subject_loras.ipynb "
                f"first")
        try:
            if note := load_lora_file(models, path, subject.name):
                warnings.warn(f"subject {subject.name!r}: {note}", stacklevel=2)
        except LoraFileError as e:
            raise MissingLoraError(f"subject {subject.name!r}: {e}; " + (
                "use a LoRA made for this base model" if subject.lora_file else
                "rerun notebooks/01_train_subject_loras.ipynb, which retrains a damaged LoRA (force=True retrains it "
                "in any case)")) from None
    return adapter_names(models)


class LoraFileError(ValueError):
    """A LoRA file that does not load into this UNet (damaged, or made for another base model)."""


def load_lora_file(models: ModelBundle, path: Path, adapter_name: str) -> str:
    """``path`` (diffusers, kohya or A1111/ComfyUI layout: diffusers' own loader reads and converts them) as the UNet
    adapter ``adapter_name``; returns a note ("" or what was left out). Only the UNet part is loaded: the subject
    passes switch LoRAs on the UNet alone, so a text-encoder part would stay active for every subject. Raises
    ``LoraFileError`` naming the file, with nothing of it left loaded, when it does not fit this UNet."""
    from safetensors import SafetensorError

    pipe = models.txt2img
    path = Path(path)
    try:
        with warnings.catch_warnings():  # one adapter per subject on one UNet is the design, not an accident
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            state, alphas, metadata = pipe.lora_state_dict(str(path.parent), weight_name=path.name,
                                                           unet_config=pipe.unet.config, return_lora_metadata=True)
            unet_state = {k: v for k, v in state.items() if k.startswith(f"{pipe.unet_name}.")}
            if not unet_state or not all("lora" in k for k in unet_state):
                raise LoraFileError(f"{path} holds no UNet LoRA weights")
            pipe.load_lora_into_unet(unet_state, network_alphas=alphas, unet=pipe.unet, adapter_name=adapter_name,
                                     metadata=metadata, _pipeline=pipe)
        wanted = sum(1 for k in unet_state if any(m in k for m in (".lora_A.", ".lora.down.", ".lora_down.")))
        fitted = sum(1 for m in _lora_layers(models) if adapter_name in m.lora_A)
        if fitted < wanted:
            raise LoraFileError(f"{path} cannot be loaded (only {fitted} of its {wanted} LoRA layers exist in this "
                                f"UNet: it was made for another base model)")
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # damaged or another base model
        if adapter_name in adapter_names(models):
            pipe.delete_adapters(adapter_name)
        if isinstance(e, LoraFileError):
            raise
        why = ("its tensor shapes do not fit this model: it was made for another base model"
               if "size mismatch" in str(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        raise LoraFileError(f"{path} cannot be loaded ({why})") from None
    left_out = len(state) - len(unet_state)
    return f"{path.name}: its text-encoder part ({left_out} tensors) is not used" if left_out else ""


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
def only_adapter(models: ModelBundle, name: str | None, scale: float = 1.0) -> Iterator[None]:
    """Exactly one subject's adapter active (``None``: none at all; ``ALL_ADAPTERS``: every loaded one) for the
    duration of the block, at ``scale`` times its trained strength."""
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
                models.txt2img.set_adapters(chosen, adapter_weights=[scale] * len(chosen))
        yield
    finally:
        if loaded:
            models.txt2img.enable_lora()
            if name is not None and scale != 1.0:  # peft keeps a weight set this way: the next user expects 1
                models.txt2img.set_adapters(chosen, adapter_weights=[1.0] * len(chosen))


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
def _add_lora_deltas(layers: list, name: str, scale: float = 1.0) -> None:
    """Every layer's weight += scale * scaling * B @ A, as peft's ``merge`` computes it, but one batched matmul per
    group of same-shaped layers instead of one Python round trip per layer (SDXL has 560 of them)."""
    groups: dict[tuple, list] = {}
    for m in layers:
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        groups.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, a.device), []).append(m)
    for members in groups.values():
        a = torch.stack([m.lora_A[name].weight for m in members])
        b = torch.stack([m.lora_B[name].weight for m in members])
        compute = torch.float32 if a.device.type == "cpu" else a.dtype  # CPUs are slow at fp16 matmuls
        deltas = torch.bmm(b.to(compute), a.to(compute))
        scalings = [scale * m.scaling[name] for m in members]
        deltas *= torch.tensor(scalings, dtype=compute, device=a.device)[:, None, None]
        weights = [m.get_base_layer().weight for m in members]
        torch._foreach_add_(weights, [d.to(w.dtype) for d, w in zip(deltas.unbind(), weights)])
        del deltas


# What a fused layer's ``merged_adapters`` holds during a pass: the same for every subject, so a compiled UNet (whose
# guards read that list) keeps one graph for all of them; the active adapter still names the subject.
FUSED_MARK = "<fused>"


@contextmanager
def fused_adapter(models: ModelBundle, name: str, scale: float = 1.0) -> Iterator[None]:
    """Exactly ``name``'s LoRA (times ``scale``) merged into the UNet's base weights for the block, so a pass costs
    what a plain pass costs (an unfused LoRA adds two small matmuls to every attention projection). Every LoRA layer
    is set the way peft's own ``set_adapter`` and ``merge`` leave it (active adapter ``name``, marked merged), so peft
    computes no LoRA branch on top and ``active_adapters`` names the subject; this is done on the layers directly
    because diffusers' model-wide ``set_adapters``/``enable_lora`` walk all 12,570 SDXL modules (~40 ms each, several
    per pass). Afterwards the base weights are restored bit for bit from a copy (subtracting the delta again would leave
    fp16 rounding residue that builds up pass after pass) and every layer's previous state is put back."""
    if name not in adapter_names(models):
        raise MissingLoraError(f"adapter {name!r} is not loaded (loaded: {adapter_names(models) or 'none'}); call "
                               f"load_subject_loras first")
    layers = _lora_layers(models)
    holding = [m for m in layers if name in m.lora_A]
    if not all(_is_plain_lora(m, name) for m in holding):  # DoRA and friends: let diffusers/peft merge them
        with only_adapter(models, name), _diffusers_fused(models, name, scale):
            yield
        return
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:  # a layer without this subject's adapter must not apply another one
        m._active_adapter, m._disable_adapters = [name], name not in m.lora_A
    weights = [m.get_base_layer().weight for m in holding]
    originals = [w.detach().clone() for w in weights]
    _add_lora_deltas(holding, name, scale)
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
def _diffusers_fused(models: ModelBundle, name: str, scale: float = 1.0) -> Iterator[None]:
    """``fuse_lora``/``unfuse_lora`` with the base weights restored exactly from a copy (the general path)."""
    layers = lora_base_layers(models)
    originals = [layer.weight.detach().clone() for layer in layers]
    scalings = [(m, dict(m.scaling)) for m in _lora_layers(models)]  # fuse_lora leaves its lora_scale in them
    models.txt2img.fuse_lora(components=["unet"], adapter_names=[name], lora_scale=scale)
    try:
        yield
    finally:
        models.txt2img.unfuse_lora(components=["unet"])
        for m, scaling in scalings:
            m.scaling.update(scaling)
        with torch.no_grad():
            for layer, weight in zip(layers, originals):
                layer.weight.copy_(weight)


@contextmanager
def per_sample_adapters(models: ModelBundle, names: list[str | None], scale: float = 1.0) -> Iterator[None]:
    """Sample ``i`` of every UNet call in the block sees only adapter ``names[i]`` (None: the base model), at ``scale``
    times its trained strength.

    For the block every LoRA layer's forward is its base layer's output plus, per sample, that sample's own low-rank
    delta: ``x @ A_i @ B_i * scaling`` as two batched matmuls over the samples, with the per-sample A and B
    gathered once on entry (not per step). peft's own mixed-batch path (``adapter_names``) does the same with a
    Python loop over adapters in each of SDXL's 560 layers, which made a batch of two passes slower than the two
    passes one after the other on an H200 (``benchmarks/results``). A batch that is a multiple of ``names``
    (classifier-free guidance stacks [negative..., positive...]) repeats the names in the same order."""
    loaded = adapter_names(models)
    missing = sorted({n for n in names if n is not None and n not in loaded})
    if missing:
        raise MissingLoraError(f"adapter(s) {', '.join(missing)} not loaded (loaded: {loaded or 'none'}); call "
                               f"load_subject_loras first")
    layers = _lora_layers(models)
    if not batchable(models, names):
        raise ValueError("batched subject passes need plain linear LoRAs (no DoRA, no LoRA bias); set "
                         "batch_subject_passes='off'")
    with torch.no_grad():
        for layer in layers:  # the layer's own forward, for the block: base output + each sample's own delta
            layer._sample_a, layer._sample_b = _per_sample_weights(layer, names, scale)
            if "_per_sample_forward" not in vars(layer):  # made once: a compiled UNet keeps its graph
                layer._per_sample_forward = MethodType(_per_sample_forward, layer)
            layer.forward = layer._per_sample_forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's (peft's) forward again
            layer._sample_a = layer._sample_b = None


def batchable(models: ModelBundle, names: list[str | None]) -> bool:
    """Whether these adapters can share one batched call: plain linear LoRAs (a DoRA or a LoRA with a bias, e.g. from
    a user's own file, goes through peft's own forward in a pass of its own)."""
    return all(_is_plain_lora(m, n) for m in _lora_layers(models) for n in set(names) if n in m.lora_A)


def _per_sample_weights(layer, names: list[str | None],
                        scale: float = 1.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(2 x samples, in, rank) and (2 x samples, rank, out): sample i's A and B * scaling (zeros for the base model
    or an adapter this layer lacks), repeated once for classifier-free guidance's [negative..., positive...] batch
    (its first half is the batch without guidance); None when no sample has a delta here."""
    held = [n for n in names if n is not None and n in layer.lora_A]
    if not held:
        return None, None
    rank = max(layer.lora_A[n].weight.shape[0] for n in held)
    weight = layer.get_base_layer().weight
    a_sel = torch.zeros(len(names), weight.shape[1], rank, dtype=weight.dtype, device=weight.device)
    b_sel = torch.zeros(len(names), rank, weight.shape[0], dtype=weight.dtype, device=weight.device)
    for i, n in enumerate(names):
        if n in held:
            a, b = layer.lora_A[n].weight, layer.lora_B[n].weight  # (rank, in), (out, rank)
            a_sel[i, :, :a.shape[0]] = a.T.to(weight.dtype)
            b_sel[i, :b.shape[1], :] = (b.T * (scale * layer.scaling[n])).to(weight.dtype)
    return a_sel.repeat(2, 1, 1), b_sel.repeat(2, 1, 1)


def _per_sample_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA layer's forward inside ``per_sample_adapters``: base output + sample i's delta (two batched matmuls).
    The weights are tensors on the layer, not captured in a closure, so a compiled UNet guards on their shapes only
    and a new set of subjects reuses its graph."""
    out = layer.get_base_layer()(x, *args, **kwargs)
    a, b = layer._sample_a, layer._sample_b
    if a is None:
        return out
    if x.shape[0] != a.shape[0]:  # not a guidance batch: the first half is the samples once, repeated as needed
        samples = a.shape[0] // 2
        times = x.shape[0] // samples
        a, b = a[:samples].repeat(times, 1, 1), b[:samples].repeat(times, 1, 1)
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
    if out.dtype == a.dtype:  # the add inside the second matmul: one pass over the output instead of three
        return torch.baddbmm(out.reshape(flat.shape[0], flat.shape[1], -1), torch.bmm(flat, a), b).reshape(out.shape)
    return out + torch.bmm(torch.bmm(flat, a), b).reshape(out.shape).to(out.dtype)


def generate(models: ModelBundle, config: ProjectConfig, prompt: str | list[str], seed: int | list[int],
             adapter: str | None = None, size: int | None = None) -> Image.Image | list[Image.Image]:
    """Text to image with exactly ``adapter`` active (None: the base model), decoded through the NaN guard.

    ``size`` defaults to the config's resolution; steps, guidance and the negative prompt come from the config. A list
    of seeds is one batched call (sample ``i`` draws its noise from its own seed, as a call with that seed alone
    would) and returns a list, decoded one picture at a time (a batch of full-size decodes is the memory peak);
    ``prompt`` is then one prompt for every sample or one per seed.
    """
    size = size or config.resolution
    seeds = seed if isinstance(seed, list) else [seed]
    prompts = prompt if isinstance(prompt, list) else [prompt] * len(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts for {len(seeds)} seeds; give one prompt or one per seed")
    with only_adapter(models, adapter), torch.no_grad():
        latents = models.txt2img(
            prompt=prompts, negative_prompt=[config.negative_prompt] * len(seeds), height=size,
            width=size, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
            generator=[models.generator(s) for s in seeds], output_type="latent").images
    pictures = [models.decode(latents[i:i + 1])[0] for i in range(len(seeds))]
    return pictures if isinstance(seed, list) else pictures[0]
