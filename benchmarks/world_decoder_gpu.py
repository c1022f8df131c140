"""The world's VAE decoder fine-tuned alone on one GPU, then measured against the shipped one (an experiment).

The encoder, and so the latent space the UNet and the subject LoRAs work in, is kept; only the decoder (and its
post-quant conv) learns (``train.train_decoder``: L1 + MSE, latents sampled as the encoder gives them, as SD's ft-MSE
VAE was made), on scenes and close-ups with random marks on some objects (``world.with_random_marks``). Why: a mug
rendered in its region and sent through the shipped VAE the way a pass paints it is "faded" in ~40 % of regions, and
its blue heart does not come back at all — no base scene carries a mark, so the decoder never learned to draw one,
though the encoder's latents hold it (benchmarks/results/world_decoder_cpu_2026-12-05.md). Measured before and after,
all on rendered truth: PSNR on held-out renders, marks kept, faded on truth decoded as a pass, naming on VAE-decoded
truth, and the base model's inpainting gate (whole-object settings).

Usage on the device machine (the views are rendered once, then any number of runs share them and the GPU):
  python3 benchmarks/world_decoder_gpu.py render [SCENES]            # SCENES scenes + as many close-ups (20,000)
  python3 benchmarks/world_decoder_gpu.py before                      # the shipped VAE's measures
  python3 benchmarks/world_decoder_gpu.py train TAG SECONDS [LR BATCH] # -> $OUT/vae-TAG.tar, $OUT/decoder-TAG.json
"""
import json
import os
import sys
import tarfile
import time

import numpy as np
import torch

from helpers.models import load_models
from helpers.notebook import make_config
from helpers.scoring import ClipScorer
from helpers.world import evaluate as we
from helpers.world import train as wt

OUT = os.environ.get("OUT", "/tmp/out")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VAE = "models/world/pipeline/vae"
VIEWS = "/tmp/decoder_views.npy"


def measure(tag: str, vae=None) -> dict:
    config = make_config("world", output_dir=f"/tmp/ev/{tag}")
    models = load_models(config, device=DEVICE)
    if vae is not None:
        models.vae.load_state_dict(vae.state_dict())
    scorer = ClipScorer.for_config(config, device=DEVICE)
    whole = config.replace(inpaint_strength=1.0, inpaint_resample=5, region_attention=4.0)
    result = {"vae_psnr_db": round(we.vae_psnr(models), 2),
              "marks_kept": we.marks_kept_on_truth(models, config),
              "faded_on_truth": we.faded_on_truth(models, config, scorer),
              "decoded_truth": str(we.inpaint_measure_on_truth(config, scorer, 16, decoded_by=models)["all"]),
              "gate_whole_object": str(we.inpaint_accuracy(models, whole, scorer, 8)["all"])}
    print(tag, json.dumps(result), flush=True)
    with open(f"{OUT}/measures-{tag}.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def render(scenes: int = 20_000) -> None:
    data = wt.render_dataset(scenes, first_seed=0, workers=max(1, (os.cpu_count() or 2) - 1), closeups=scenes,
                             marks=True)  # the measures use scenes far above these seeds
    np.save(VIEWS + ".tmp.npy", data["images"])
    os.replace(VIEWS + ".tmp.npy", VIEWS)


def step_seconds(vae, batch: int) -> float:
    """Seconds one decoder step takes here (timed on a copy, so the run's steps fit ``seconds``)."""
    import copy

    probe = copy.deepcopy(vae)
    x = torch.zeros(2 * batch, 128, 128, 3, dtype=torch.uint8)
    wt.train_decoder(probe, x, 2, batch, torch.device(DEVICE), lambda _: None)
    start = time.perf_counter()
    wt.train_decoder(probe, x, 3, batch, torch.device(DEVICE), lambda _: None)
    return (time.perf_counter() - start) / 3


def train(tag: str, seconds: float, lr: float = wt.DECODER_LR, batch: int = 128) -> None:
    from diffusers import AutoencoderKL

    images = torch.from_numpy(np.load(VIEWS))
    vae = AutoencoderKL.from_pretrained(VAE, torch_dtype=torch.float32)
    steps = max(1, int(seconds / step_seconds(vae, batch)))
    start = time.perf_counter()
    wt.train_decoder(vae, images, steps, batch, torch.device(DEVICE), print, lr=lr)
    run = {"steps": steps, "batch": batch, "views": len(images), "marks": True, "lr": lr,
           "seconds": round(time.perf_counter() - start, 1)}
    saved = f"/tmp/decoder-{tag}/vae"
    vae.eval().to(torch.float16).save_pretrained(saved, safe_serialization=True)
    with tarfile.open(f"{OUT}/vae-{tag}.tar", "w") as tar:
        tar.add(saved, arcname="vae")
    run["after"] = measure(tag, vae)
    with open(f"{OUT}/decoder-{tag}.json", "w") as f:
        json.dump(run, f, indent=1)


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "render":
        render(*(int(a) for a in rest))
    elif what == "before":
        measure("before")
    else:
        tag, seconds, *more = rest
        lr = float(more[0]) if more else wt.DECODER_LR
        batch = int(more[1]) if len(more) > 1 else 128
        train(tag, float(seconds), lr, batch)
