"""The world's VAE decoder fine-tuned alone on one GPU, then measured against the shipped one (an experiment).

The encoder, and so the latent space the UNet and the subject LoRAs work in, is kept; only the decoder (and its
post-quant conv) learns, on renders, from latents sampled as the encoder gives them (L1 + MSE), as SD's ft-MSE VAE was
made. Why: a mug rendered in its region and sent through the shipped VAE the way a pass paints it is "faded" in ~40 %
of regions (benchmarks/results/world_scorer_decoded_2026-12-04.md). Measured before and after: PSNR on held-out renders,
faded on truth decoded as a pass, naming on VAE-decoded truth, the base model's inpainting gate (whole-object settings).
The decoder comes back as $OUT/vae.tar. Usage on the device machine: python3 benchmarks/world_decoder_gpu.py SECONDS
[SCENES BATCH] (defaults 20,000 scenes, batch 128; on a CPU it runs too, smaller). Not yet run on a GPU: no device was
lent when it was written (2026-12-04); a CPU trial is in the results file above.
"""
import json
import os
import sys
import tarfile
import time

import torch
import torch.nn.functional as F

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


def main(seconds: float, scenes: int = 20_000, batch: int = 128) -> None:
    from diffusers import AutoencoderKL

    report = {"before": measure("before")}
    data = wt.render_dataset(scenes, first_seed=0, workers=max(1, (os.cpu_count() or 2) - 1))
    train = torch.from_numpy(data["images"])  # vae_psnr and the measures use scenes far above these seeds
    vae = AutoencoderKL.from_pretrained(VAE, torch_dtype=torch.float32).to(DEVICE)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(5)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        x = wt._to_unit(train[torch.randint(0, len(train), (batch,), generator=g)].to(DEVICE))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            recon = vae.decode(z).sample
        loss = F.l1_loss(recon.float(), x) + F.mse_loss(recon.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 500 == 0:
            print(f"decoder step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        step += 1
    report["decoder"] = {"steps": step, "batch": batch, "scenes": scenes, "lr": 1e-4,
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
