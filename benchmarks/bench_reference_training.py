"""Our LoRA training step beside diffusers' own ``train_dreambooth_lora_sdxl.py`` on the same full-size SDXL twin
(random weights, saved to disk with ``save_pretrained``), same settings: 1024², batch 1, rank 16, fp16 mixed
precision, AdamW, gradient checkpointing on and off.

The reference script is not part of this project: fetch it from diffusers (``examples/dreambooth/``) into
``.reference/`` (git-ignored) and pass its path. Its seconds per step are measured as the difference in wall time
between a long and a short run divided by the difference in steps, so loading, prompt encoding and the final save
cancel out. Ours come from ``bench_sdxl.bench_training`` on the same twin in the same run. Prints a table last.

    python benchmarks/bench_reference_training.py --script .reference/train_dreambooth_lora_sdxl.py --out r.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sdxl import assert_fp16, bench_training  # noqa: E402
from helpers.config import PROFILE_DEFAULTS, ProjectConfig  # noqa: E402
from helpers.models import load_models  # noqa: E402


def reference_run(script: Path, model: Path, images: Path, steps: int, checkpointing: bool, out: Path) -> float:
    command = [sys.executable, str(script), f"--pretrained_model_name_or_path={model}",
               f"--instance_data_dir={images}", "--instance_prompt=a photo of sks cat", f"--output_dir={out}",
               "--resolution=1024", "--train_batch_size=1", "--rank=16", "--mixed_precision=fp16",
               f"--max_train_steps={steps}", "--learning_rate=1e-5", "--lr_warmup_steps=0", "--seed=0",
               "--checkpointing_steps=100000", "--dataloader_num_workers=0"] + \
              (["--gradient_checkpointing"] if checkpointing else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"reference script failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("reference_training.json"))
    parser.add_argument("--steps", default="5,25", help="short,long step counts of the reference runs")
    args = parser.parse_args()
    short, long = (int(x) for x in args.steps.split(","))
    config = ProjectConfig(profile="sdxl-random", **{**PROFILE_DEFAULTS["sdxl-random"], "learning_rate": 1e-5})
    models = load_models(config)
    assert_fp16(models)
    work = Path(tempfile.mkdtemp(prefix="reference-"))
    model_dir, images = work / "twin", work / "images"
    models.txt2img.save_pretrained(model_dir, safe_serialization=True)  # before training wraps the UNet's layers
    rows: dict = {}
    bench_training(models, config, rows, steps=8)
    ours = {k.replace("LoRA training step, ", ""): v for k, v in rows.items()}
    del models
    torch.cuda.empty_cache()
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(images / f"{i}.png")
    table = []
    for checkpointing in (True, False):
        walls = {n: reference_run(args.script, model_dir, images, n, checkpointing, work / f"out{n}{checkpointing}")
                 for n in (short, long)}
        reference = (walls[long] - walls[short]) / (long - short)
        mine = ours[f"checkpointing {'on' if checkpointing else 'off'}"]
        table.append({"checkpointing": checkpointing, "ours_s_per_step": round(mine[0], 3),
                      "ours_peak_gib": round(mine[1], 2), "reference_s_per_step": round(reference, 3),
                      "ratio": round(mine[0] / reference, 2), "reference_walls_s": walls})
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": table,
              "note": "reference encodes each batch with its float32 VAE every step; ours encodes the photos once"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['gpu']}, full-size SDXL twin, 1024², batch 1, rank 16, fp16 mixed precision")
    print(f"{'checkpointing':<14} {'ours s/step':>11} {'reference s/step':>17} {'ratio':>7}")
    for r in table:
        print(f"{'on' if r['checkpointing'] else 'off':<14} {r['ours_s_per_step']:>11.3f} "
              f"{r['reference_s_per_step']:>17.3f} {r['ratio']:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
