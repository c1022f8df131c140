"""What every notebook does around the method: build the config it runs with (announced, carried over from the
previous notebook, saved for the next), and notebook 00's demonstration of the NaN guard."""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_FILE, FIELD_NAMES, PROFILE_DEFAULTS, ProjectConfig
from .io import remove_leftover_temp_files, save_config, set_aside
from .models import DecodeStats, ModelBundle, decode_latents, resolve_profile
from .profiles import subject_token_problem
from .prompts import scene_prompt_problem


def make_config(profile: str = "auto", output_dir: str | None = None, **overrides: Any) -> ProjectConfig:
    """The config a notebook runs with.

    Starts from ``<output_dir>/config.json`` when an earlier notebook saved one for the same profile (so settings
    flow down the series), else from the profile's defaults; then applies every override that is not None.
    ``HELPERS_OUTPUT_DIR`` redirects the output folder (the tests use it to keep their runs apart).
    """
    return _config_and_carried(profile, output_dir, overrides)[0]


def _config_and_carried(profile: str, output_dir: str | None, overrides: dict[str, Any]) \
        -> tuple[ProjectConfig, dict[str, Any]]:
    profile = resolve_profile(profile)
    output_dir = output_dir or os.environ.get("HELPERS_OUTPUT_DIR") or "output"
    defaults = ProjectConfig(profile=profile, **PROFILE_DEFAULTS[profile])
    saved_file = defaults.path(output_dir) / CONFIG_FILE
    base = _saved_config(saved_file)
    if base is None or base.profile != profile:
        base = defaults
    changes = {k: v for k, v in overrides.items() if v is not None}
    config = base.replace(output_dir=output_dir, **changes)
    carried = {name: getattr(base, name) for name in FIELD_NAMES
               if name not in changes and name != "output_dir" and getattr(base, name) != getattr(defaults, name)}
    return config, carried


def _saved_config(path: Path) -> ProjectConfig | None:
    """The config an earlier notebook saved; a file that is not JSON at all (a crash of another tool, a bad edit) is
    set aside and the defaults are used. A readable file with a wrong value stops with a line naming file and field."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        set_aside(path, "not valid JSON; starting from the profile's defaults")
        return None
    return ProjectConfig.from_dict(data, source=str(path))


# the notebooks that paint the scene: each needs a scene prompt that names every subject (training does not)
SCENE_NOTEBOOKS = ("03", "04", "05")
DRIVE_OUTPUT = "/content/drive/MyDrive/multisubject-sdxl/output"


def drive_output_dir(output_dir: str | None) -> str | None:
    """In Colab: mount Google Drive and keep ``output/`` (LoRAs, checkpoints, results) there, so a disconnect loses
    at most the steps since the last checkpoint. Elsewhere: say so and change nothing."""
    try:
        from google.colab import drive  # type: ignore
    except ImportError:
        print("persist_to_drive: not running in Colab, so there is no Drive to mount; outputs stay in "
              f"{output_dir or 'output/'}")
        return output_dir
    drive.mount("/content/drive")
    return DRIVE_OUTPUT


def notebook_config(notebook: str, parameters: dict[str, Any]) -> ProjectConfig:
    """A notebook's first step: the config from its parameters cell (``globals()``: every name that is a setting
    and not None overrides it), saved for the next notebook; says which profile runs and what was carried over.
    ``persist_to_drive=True`` keeps the output folder on Google Drive (Colab)."""
    overrides = {name: parameters[name] for name in FIELD_NAMES if parameters.get(name) is not None}
    profile, output_dir = overrides.pop("profile", "auto"), overrides.pop("output_dir", None)
    if parameters.get("persist_to_drive"):
        output_dir = drive_output_dir(output_dir)
    config, carried = _config_and_carried(profile, output_dir, overrides)
    if problem := subject_token_problem(config):
        raise ValueError(problem)
    if notebook in SCENE_NOTEBOOKS and (problem := scene_prompt_problem(config)):
        raise ValueError(f"{problem} (scene_prompt is a parameter of notebooks 00, 03 and 05)")
    if removed := remove_leftover_temp_files(config.output_path):  # a Colab disconnect can kill a write halfway
        print(f"[{notebook}] removed {removed} temp file(s) left by an interrupted run in {config.output_path}")
    save_config(config)
    note = {"tiny": " (random weights: pictures are meaningless, the plumbing is real)",
            "world": " (small models trained on a rendered world: offline, and the scores mean something there)",
            "sdxl-random": " (full-size random weights: for speed and memory only)"}.get(config.profile, "")
    print(f"[{notebook}] profile: {config.profile}{note}; output: {config.output_path}")
    if carried:
        names = ", ".join(carried if len(carried) > 4 else [f"{k}={v!r}" for k, v in carried.items()])
        print(f"[{notebook}] carried over from {config.config_file.name} of an earlier notebook: {names} "
              f"(a parameter here wins; delete {config.config_file} to start from the defaults)")
    return config


def demonstrate_nan_guard(models: ModelBundle) -> dict[str, object]:
    """Show the guard at work: a normal decode, then one where a reduced-precision VAE overflows (simulated by
    turning its decoder output to inf whenever it runs below float32) and the guard re-decodes in float32."""
    vae = copy.deepcopy(models.vae)  # a copy: a round trip through bfloat16 would round the real VAE's weights
    size = max(8, models.vae.config.sample_size // 32)
    latents = torch.randn((1, 4, size, size), generator=models.generator(0)).to(models.device)
    stats = DecodeStats()
    normal = decode_latents(vae, latents, stats)
    half = torch.float16 if models.device.type == "cuda" else torch.bfloat16

    def overflow(_module, _inputs, output):
        return output * float("inf") if output.dtype != torch.float32 else output

    vae.decoder.register_forward_hook(overflow)
    vae.to(half)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guarded = decode_latents(vae, latents, stats)
    del vae
    return {"normal_decode_finite": bool(torch.isfinite(normal).all()), "reduced_precision_dtype": str(half),
            "guarded_decode_finite": bool(torch.isfinite(guarded).all()), "float32_fallbacks": stats.float32_fallbacks}
