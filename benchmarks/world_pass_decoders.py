"""Two world decoders on the same generated passes: does a decoder change what the method's pictures score?

Per seed: Phase 0's scene (decoded by the previous decoder, so both see the same input), then each subject's first
pass (``pipeline.region_pass``, its own LoRA) run twice from the same picture and seed — once decoded by the
previous decoder, once by the shipped one. The encoder, UNet and LoRA are shared, so the pass's latents are the same
and only their decoding differs. Identity of each subject on its own pixels, paired per seed, ± 95 % interval.

    git show fa4f250~1:models/world/pipeline/vae/config.json > /tmp/prev/config.json  (and the .safetensors beside it)
    python benchmarks/world_pass_decoders.py /tmp/prev --loras output/evcarry/main [--seeds 16 --first 20000]

2026-12-05 (this CPU, development seeds 20,000+, the main evaluation's LoRAs): the cat +0.136 ± 0.074, the mug
−0.016 ± 0.022 — the shipped decoder draws a faithful mug's heart, but the mug's LoRA paints none to draw
(benchmarks/results/world_decoder_h200_2026-12-05.md).
"""
import argparse
import math
import statistics

import torch
from diffusers import AutoencoderKL
from PIL import Image

from helpers.adapters import generate, load_subject_loras
from helpers.layout import default_layout, masks
from helpers.measures import own_crops
from helpers.models import load_models
from helpers.notebook import make_config
from helpers.pipeline import region_pass, subject_seed
from helpers.prompts import config_scene_prompts
from helpers.scoring import ClipScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("previous_vae", help="a saved VAE folder (config.json + safetensors) to compare against")
    parser.add_argument("--loras", default="output/evcarry/main", help="an output folder with loras/<subject>")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--first", type=int, default=20_000)
    parser.add_argument("--figure", default=None, help="a PNG: each seed's picture, previous decoder above")
    args = parser.parse_args()
    config = make_config("world", output_dir=args.loras)
    models = load_models(config, device="cpu")
    load_subject_loras(models, config)
    scorer = ClipScorer.for_config(config, device="cpu")
    decoders = {"previous": AutoencoderKL.from_pretrained(args.previous_vae, torch_dtype=torch.float32).state_dict(),
                "shipped": {k: v.clone() for k, v in models.vae.state_dict().items()}}
    layout = default_layout(config.subject_names, config.resolution, config.resolution)
    masks_ = masks(layout, config.resolution, config.resolution, config.effective_feather_px)
    prompts = config_scene_prompts(config)
    identity = {(d, s): [] for d in decoders for s in config.subject_names}
    pictures = []
    for seed in range(args.first, args.first + args.seeds):
        models.vae.load_state_dict(decoders["previous"])
        picture = generate(models, config, prompts.phase0, [seed], adapter=None)[0]
        shown = {}
        for index, subject in enumerate(config.subjects):
            for name, weights in decoders.items():
                models.vae.load_state_dict(weights)
                shown[name], _ = region_pass(models, config, picture, masks_, subject, subject_seed(seed, index),
                                             config.inpaint_strength)
                crop = own_crops(shown[name], masks_, [subject.name])[subject.name]
                identity[name, subject.name].append(scorer.identity(crop, subject.name))
            picture = shown["previous"]  # the next subject's pass starts from the same picture for both
        pictures.append((shown["previous"], shown["shipped"]))
    print(f"{'subject':<10}{'previous':>10}{'shipped':>10}{'shipped - previous':>26}")
    for name in config.subject_names:
        diff = [b - a for a, b in zip(identity["previous", name], identity["shipped", name])]
        half = 1.96 * statistics.stdev(diff) / math.sqrt(len(diff))
        print(f"{name:<10}{statistics.mean(identity['previous', name]):>10.3f}"
              f"{statistics.mean(identity['shipped', name]):>10.3f}{statistics.mean(diff):>+18.3f} ± {half:.3f}")
    if args.figure:
        side = config.resolution
        sheet = Image.new("RGB", (side * len(pictures), 2 * side))
        for i, (previous, shipped) in enumerate(pictures):
            sheet.paste(previous, (i * side, 0))
            sheet.paste(shipped, (i * side, side))
        sheet.save(args.figure)


if __name__ == "__main__":
    main()
