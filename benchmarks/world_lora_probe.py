"""What each subject's LoRA draws, before any QA: text to image with its instance prompt, and its first pass into
its region of Phase 0's scene (the method's own use), each scored on the subject's own pixels against its QA
threshold. One line per (LoRA folder, subject); every folder sees the same scenes and seeds, so folders compare
paired.

    python benchmarks/world_lora_probe.py /tmp/scr/A /tmp/scr/C [--seeds 16 --first 30000]

2026-12-05 (this CPU, development seeds 30,000+; A: the recipe's LoRAs with mirrored training views, C: without):
the mug's text-to-image pictures above its threshold 12 % -> 94 %, its first passes 6 % -> 62 %; the cat's 100 % ->
100 % and 56 % -> 38 % (benchmarks/results/world_lora_flip_cpu_2026-12-05.md).
"""
import argparse
import statistics

from helpers.adapters import generate, load_subject_loras
from helpers.config import PRESETS
from helpers.layout import default_layout, masks
from helpers.measures import own_crops
from helpers.models import load_models
from helpers.notebook import make_config
from helpers.pipeline import region_pass, subject_seed
from helpers.prompts import config_scene_prompts
from helpers.qa import subject_thresholds
from helpers.scoring import ClipScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="output folders, each with loras/<subject>")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--first", type=int, default=30_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="e.g. two-cats")
    args = parser.parse_args()
    seeds = list(range(args.first, args.first + args.seeds))
    preset = PRESETS[args.preset] if args.preset else {}
    base = make_config("world", output_dir=args.folders[0], **preset)
    models = load_models(base, device=args.device)
    scorer = ClipScorer.for_config(base, device=args.device)
    thresholds = subject_thresholds(scorer, base)
    layout = default_layout(base.subject_names, base.resolution, base.resolution)
    masks_ = masks(layout, base.resolution, base.resolution, base.effective_feather_px)
    scenes = generate(models, base, config_scene_prompts(base).phase0, seeds, adapter=None)
    print(f"{'folder':<28}{'subject':<9}{'text to image':>24}{'first pass':>24}")
    for folder in args.folders:
        config = make_config("world", output_dir=folder, **preset)
        for name in list(models.txt2img.get_list_adapters().get("unet", [])):
            models.txt2img.delete_adapters(name)
        load_subject_loras(models, config)
        for index, subject in enumerate(config.subjects):
            drawn = generate(models, config, subject.instance_prompt, [s + 1000 for s in seeds], adapter=subject.name)
            alone = [scorer.identity(p, subject.name) for p in drawn]
            passes = []
            for seed, scene in zip(seeds, scenes):
                picture, _ = region_pass(models, config, scene, masks_, subject, subject_seed(seed, index),
                                         config.inpaint_strength)
                passes.append(scorer.identity(own_crops(picture, masks_, [subject.name])[subject.name], subject.name))
            cells = [f"{statistics.mean(v):.3f} ({sum(x >= thresholds[subject.name] for x in v) / len(v):.0%} pass)"
                     for v in (alone, passes)]
            print(f"{folder:<28}{subject.name:<9}{cells[0]:>24}{cells[1]:>24}", flush=True)


if __name__ == "__main__":
    main()
