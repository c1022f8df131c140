import hashlib
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

from helpers import models as hm
from helpers import profiles as hpr
from helpers.config import PROJECT_ROOT
from helpers.notebook import demonstrate_nan_guard
from helpers.pipeline import generate_scene

PROMPTS = [
    "A photo of a café crème, naïve Zoë",
    "a (cat:1.3) and a [mug], on a table... really?! 50% off; e-mail: x@y.z",
    " ".join(f"word{i}" for i in range(120)),  # > 77 tokens: truncation
    "Ünïcödé ÅNGSTRÖM – em-dash 東京, 'quoted' \"words\"",
]
# Not compared: text that ftfy rewrites (curly quotes -> straight). open_clip runs ftfy; transformers' fast CLIP
# tokenizer, and so the real SDXL tokenizers, do not.


def test_tiny_bundle_shares_components(tiny_models):
    a, b = tiny_models.txt2img, tiny_models.inpaint
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert getattr(a, name) is getattr(b, name), name
    assert type(b).__name__ == "StableDiffusionXLInpaintPipeline"
    assert tiny_models.vae.config.block_out_channels and len(tiny_models.vae.config.block_out_channels) == 4


def test_the_requested_dtype_holds_for_every_component_of_both_pipelines(tiny_config):
    """``from_pipe`` casts shared components to float32 unless told otherwise; an fp16 SDXL must stay fp16."""
    models = hm.load_models(tiny_config, dtype=torch.bfloat16)
    for pipe in (models.txt2img, models.inpaint):
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}, name
    assert models.dtype == torch.bfloat16


def test_tiny_is_loaded_back_with_from_pretrained(tiny_config, tiny_models):
    folder = tiny_config.cache_path / hpr.TINY_VERSION
    assert (folder / "model_index.json").exists()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert tiny_models.source == str(folder)
    assert hpr.ensure_tiny_pipeline(tiny_config.cache_path) == folder  # cached: not rebuilt


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_ids_equal_open_clip(tiny_models, prompt):
    reference = open_clip.get_tokenizer("ViT-L-14")([prompt])[0].tolist()
    ours = tiny_models.txt2img.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    n = reference.index(49407) + 1
    assert ours[:n] == reference[:n]  # tokenizer 1 pads with <|endoftext|>, open_clip with 0
    ours2 = tiny_models.txt2img.tokenizer_2(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    if "!" not in prompt:  # SDXL's tokenizer 2 uses "!" as its pad token, so a literal "!" becomes id 0 there too
        assert ours2 == reference  # ... and its padding, id 0, is exactly open_clip's
    assert len(tiny_models.txt2img.tokenizer) == 49408


def test_nan_guard_falls_back_to_float32(tiny_models):
    report = demonstrate_nan_guard(tiny_models)
    assert report == {"normal_decode_finite": True, "reduced_precision_dtype": "torch.bfloat16",
                      "guarded_decode_finite": True, "float32_fallbacks": 1}
    assert tiny_models.vae.dtype == torch.float32  # restored


def test_nan_guard_refuses_nan_latents_and_broken_float32_vae(tiny_models):
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(hm.NonFiniteError, match="latents"):
        tiny_models.decode(latents)
    hook = tiny_models.vae.decoder.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(hm.NonFiniteError, match="float32"):
            tiny_models.decode(torch.zeros(1, 4, 8, 8))
    finally:
        hook.remove()


def _image_digest(models, config, seed=3) -> str:
    return hashlib.sha256(np.asarray(generate_scene(models, config, config.scene_prompt, seed)).tobytes()).hexdigest()


DIGEST_SCRIPT = """
import hashlib, numpy as np
from helpers.models import load_models
from helpers.notebook import make_config
from helpers.pipeline import generate_scene
c = make_config("tiny", output_dir={out!r})
m = load_models(c)
print(hashlib.sha256(np.asarray(generate_scene(m, c, c.scene_prompt, 3)).tobytes()).hexdigest())
"""


def test_same_seed_same_image_in_process_and_across_processes(tiny_config, tiny_models):
    first, second = _image_digest(tiny_models, tiny_config), _image_digest(tiny_models, tiny_config)
    assert first == second
    assert _image_digest(tiny_models, tiny_config, seed=4) != first
    script = DIGEST_SCRIPT.format(out=tiny_config.output_dir)
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              cwd=PROJECT_ROOT).stdout.strip().splitlines()[-1] for _ in range(2)}
    assert digests == {first}


@pytest.mark.parametrize("offline", ["1", ""])
def test_sdxl_without_network_fails_fast_with_one_line(tmp_path, offline):
    """Fails before any pipeline class is imported or any weight is read: one line that says what to do."""
    env = {**os.environ, "HELPERS_PROFILE": "sdxl", "HF_HUB_OFFLINE": offline, "HF_HOME": str(tmp_path / "hf")}
    script = ("import sys\nfrom helpers.notebook import make_config\nfrom helpers.models import load_models\n"
              "try:\n    load_models(make_config())\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
              "print(any('pipeline_stable_diffusion_xl' in m for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, env=env,
                         cwd=PROJECT_ROOT, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1] == "False", out.stdout + out.stderr
    assert lines[0].startswith("ModelUnavailableError")
    assert hpr.SDXL_VAE_FP16_FIX_ID in lines[0] and "HELPERS_PROFILE=world" in lines[0]
    assert "`hf download" in lines[0]  # today's huggingface_hub CLI (huggingface-cli is gone)


def test_sdxl_loading_code_runs_on_a_local_pipeline_folder(tiny_config, tiny_models, monkeypatch):
    """The sdxl path (fp16-fix VAE swapped in, from_pretrained with safetensors) on a locally saved pipeline: every
    weight of every component arrives."""
    folder = tiny_config.cache_path / hpr.TINY_VERSION
    monkeypatch.setattr(hpr, "SDXL_BASE_ID", str(folder))
    monkeypatch.setattr(hpr, "SDXL_VAE_FP16_FIX_ID", str(folder / "vae"))
    pipe = hpr.load_sdxl_pipeline(torch.float32)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.vae.config.force_upcast is False
    reference_pipe = hpr.tiny_components()  # built afresh: the shared tiny_models may carry LoRA wrappers by now
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded, reference = getattr(pipe, name).state_dict(), reference_pipe[name].state_dict()
        assert loaded.keys() == reference.keys(), name
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), name


def test_sdxl_random_unet_has_the_full_size_parameter_count():
    """Built on the meta device (no memory): the config must give SDXL's 2,567.5 M-parameter UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**hpr.SDXL_UNET_CONFIG)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 2567.5


def test_memory_plan_says_what_fits_before_anything_heavy_starts():
    assert "fits: LoRA training without gradient checkpointing" in hm.memory_plan("sdxl", "NVIDIA L4", 22.0)[1]
    assert "tight" in hm.memory_plan("sdxl", "Tesla T4", 15.0)[1]
    assert "too little memory" in hm.memory_plan("sdxl", "small", 8.0)[1]
    assert "world" in hm.memory_plan("sdxl", "-", None)[0]
    assert hm.memory_plan("world", "-", None) == ["profile world: small models, any machine will do"]
