"""The world's VAE decoder fine-tuned alone on one GPU, then measured against the shipped one (an experiment).

The encoder, and so the latent space the UNet and the subject LoRAs work in, is kept; only the decoder (and its
post-quant conv) learns (``train.train_decoder``: L1 + MSE, latents sampled as the encoder gives them, as SD's ft-MSE
VAE was made), on scenes and close-ups with random marks on some objects (``world.with_random_marks``). Why: a mug
rendered in its region and sent through the shipped VAE the way a pass paints it is "faded" in ~40 % of regions, and
its blue heart does not come back at all — no base scene carries a mark, so the decoder never learned to draw one,
though the encoder's latents hold it (benchmarks/results/world_decoder_cpu_2026-12-05.md). Measured before and after:
PSNR on held-out renders, faded on truth decoded as a pass, naming on VAE-decoded truth, the base model's inpainting
gate (whole-object settings). The decoder comes back as $OUT/vae.tar. Usage on the device machine:
python3 benchmarks/world_decoder_gpu.py SECONDS [SCENES BATCH] (defaults 20,000 scenes + as many close-ups, batch
128). Not yet run on a GPU (none was lent on 2026-12-04 and 12-05); the CPU runs are in the results file above.
"""
import json
import os
import sys
import tarfile
import time

import torch

from helpers.models import load_models
from helpers.notebook import make_config
from helpers.scoring import ClipScorer
from helpers.world import evaluate as we
from helpers.world import train as wt

OUT = os.environ.get("OUT", "/tmp/out")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VAE = "models/world/pipeline/vae"


def measure(tag: str) -> dict:
    config = make_config("world", output_dir=f"/tmp/ev/{tag}")
    models = load_models(config, device=DEVICE)
    scorer = ClipScorer.for_config(config, device=DEVICE)
    whole = config.replace(inpaint_strength=1.0, inpaint_resample=5, region_attention=4.0)
    result = {"vae_psnr_db": round(we.vae_psnr(models), 2),
              "faded_on_truth": we.faded_on_truth(models, config, scorer),
              "decoded_truth": str(we.inpaint_measure_on_truth(config, scorer, 16, decoded_by=models)["all"]),
              "gate_whole_object": str(we.inpaint_accuracy(models, whole, scorer, 8)["all"])}
    print(tag, json.dumps(result), flush=True)
    return result


def step_seconds(vae, batch: int) -> float:
    """Seconds one decoder step takes here (timed on a copy, so the run's steps fit ``seconds``)."""
    import copy

    probe = copy.deepcopy(vae)
    x = torch.zeros(2 * batch, 128, 128, 3, dtype=torch.uint8)
    wt.train_decoder(probe, x, 2, batch, torch.device(DEVICE), lambda _: None)
    start = time.perf_counter()
    wt.train_decoder(probe, x, 3, batch, torch.device(DEVICE), lambda _: None)
    return (time.perf_counter() - start) / 3


def main(seconds: float, scenes: int = 20_000, batch: int = 128) -> None:
    from diffusers import AutoencoderKL

    report = {"before": measure("before")}
    data = wt.render_dataset(scenes, first_seed=0, workers=max(1, (os.cpu_count() or 2) - 1), closeups=scenes,
                             marks=True)
    train = torch.from_numpy(data["images"])  # vae_psnr and the measures use scenes far above these seeds
    vae = AutoencoderKL.from_pretrained(VAE, torch_dtype=torch.float32)
    steps = max(1, int(seconds / step_seconds(vae, batch)))
    start = time.perf_counter()
    wt.train_decoder(vae, train, steps, batch, torch.device(DEVICE), print)
    report["decoder"] = {"steps": steps, "batch": batch, "scenes": scenes, "closeups": scenes, "marks": True,
                         "lr": wt.DECODER_LR,
                         "seconds": round(time.perf_counter() - start, 1)}
    vae.eval().to(torch.float16).save_pretrained(VAE, safe_serialization=True)
    with tarfile.open(f"{OUT}/vae.tar", "w") as tar:
        tar.add(VAE, arcname="vae")
    report["after"] = measure("after")
    with open(f"{OUT}/decoder_report.json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'':<26}{'before':>28}{'after':>28}")
    for key in ("vae_psnr_db", "decoded_truth", "gate_whole_object"):
        print(f"{key:<26}{str(report['before'][key]):>28}{str(report['after'][key]):>28}")
    for key in report["before"]["faded_on_truth"]:
        b, a = report["before"]["faded_on_truth"][key], report["after"]["faded_on_truth"][key]
        print(f"{'faded ' + key:<26}{b['faded']:>22.3f} {b['identity']:.3f}{a['faded']:>22.3f} {a['identity']:.3f}")


if __name__ == "__main__":
    main(float(sys.argv[1]), *(int(a) for a in sys.argv[2:4]))
