"""How good the ``world`` models are, measured on freshly rendered held-out scenes: ``python -m helpers.world.evaluate``.

* scorer: zero-shot class and colour accuracy on single-object crops (cropped as the QA loop crops a region);
* generator: for prompts "a {colour} {class} {on background}", the scorer's zero-shot class and colour of the picture
  (two-object prompts are reported too: does the scorer prefer the prompt over the same prompt with the two objects'
  colours swapped?);
* VAE: reconstruction PSNR on held-out renders;
* inpainting: what the method asks of the base model, "a {class} {setting}" inpainted into an empty region through
  the method's own pass, recognised as that class on the region's own pixels (5 classes x 3 region sizes).
  The same measure on rendered truth (an object of the class rendered in the region) says how much of it the measure
  can confirm at best.

The quality gates in ``tests/test_world.py`` (the world's gates) call these functions with fixed seeds.
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .. import world
from ..adapters import generate
from ..config import ProjectConfig
from ..measures import locate_object, object_crop, zero_shot
from ..models import ModelBundle

HELD_OUT_SEED = 10_000_000  # the trainer renders seeds from 0 up; evaluation scenes start far above


@dataclass
class Accuracy:
    correct: int
    total: int

    @property
    def rate(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return f"{self.rate:.1%} ({self.correct}/{self.total})"


def classify_object(scorer, image: Image.Image, where: str) -> str:
    """Zero-shot class of a single-object picture: on the located object's crop when it can be found (the scorer's
    strength), else on the whole picture with the background named."""
    box = locate_object(image)
    if box is None:
        return world.CLASSES[zero_shot(scorer, image, [f"a {k} {where}" for k in world.CLASSES])]
    return world.CLASSES[zero_shot(scorer, object_crop(image, box), [f"a {k}" for k in world.CLASSES])]


def scorer_accuracy(scorer, n: int = 200, first_seed: int = HELD_OUT_SEED) -> dict[str, Accuracy]:
    """Class among the five and colour among the eight (given the class), on ``n`` single-object crops."""
    hits = {"class": 0, "color": 0, "pattern": 0, "class_located": 0}
    for seed in range(first_seed, first_seed + n):
        scene = world.render_scene(seed, n_objects=1)
        obj, crop = scene.spec.objects[0], object_crop(scene.image, scene.boxes[0])
        hits["class"] += world.CLASSES[zero_shot(scorer, crop, [f"a {c}" for c in world.CLASSES])] == obj.cls
        colors = list(world.COLORS)
        hits["color"] += colors[zero_shot(scorer, crop, [world.with_article(f"{c} {obj.cls}") for c in colors])] \
            == obj.color
        patterns = [world.with_article(replace(obj, pattern=p).describe()) for p in world.PATTERNS]
        hits["pattern"] += world.PATTERNS[zero_shot(scorer, crop, patterns)] == obj.pattern
        # the protocol the generator is judged by, checked on renders whose class is known
        hits["class_located"] += classify_object(scorer, scene.image, world.BACKGROUNDS[scene.spec.background]) \
            == obj.cls
    return {k: Accuracy(v, n) for k, v in hits.items()}


def single_object_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """``n`` (prompt, class, colour, background) with every class, colour and background about equally often."""
    rng = random.Random(seed)
    combos = [(c, k, b) for c in world.COLORS for k in world.CLASSES for b in world.BACKGROUNDS]
    rng.shuffle(combos)
    return [(f"{world.with_article(f'{c} {k}')} {world.BACKGROUNDS[b]}", k, c, b) for c, k, b in combos[:n]]


def generator_accuracy(models: ModelBundle, config: ProjectConfig, scorer, n: int = 32,
                       seed: int = 0) -> dict[str, Accuracy]:
    """Generate each prompt once (seed = its index; 16 prompts per batched call) and ask the scorer for its class and
    colour."""
    hits = {"class": 0, "color": 0}
    prompts = single_object_prompts(n, seed)
    images = [image for start in range(0, n, 16)
              for image in generate(models, config, [p[0] for p in prompts[start:start + 16]],
                                    seed=list(range(start, min(n, start + 16))))]
    for image, (prompt, cls, color, background) in zip(images, prompts):
        where = world.BACKGROUNDS[background]
        hits["class"] += classify_object(scorer, image, where) == cls
        colors = list(world.COLORS)
        texts = [f"{world.with_article(f'{c} {cls}')} {where}" for c in colors]
        hits["color"] += colors[zero_shot(scorer, image, texts)] == color
    return {k: Accuracy(v, n) for k, v in hits.items()}


def two_object_binding(models: ModelBundle, config: ProjectConfig, scorer, n: int = 16,
                       seed: int = 1) -> Accuracy:
    """How often the scorer prefers "a red cat left of a blue mug ..." over the same caption with the colours
    swapped, on generated pictures of the first (a measure of attribute binding; reported, not gated)."""
    rng = random.Random(seed)
    correct = 0
    for i in range(n):
        (c1, c2), (k1, k2) = rng.sample(list(world.COLORS), 2), rng.sample(world.CLASSES, 2)
        where = world.BACKGROUNDS[rng.choice(list(world.BACKGROUNDS))]
        prompt = f"{world.with_article(f'{c1} {k1}')} left of {world.with_article(f'{c2} {k2}')} {where}"
        swapped = f"{world.with_article(f'{c2} {k1}')} left of {world.with_article(f'{c1} {k2}')} {where}"
        image = generate(models, config, prompt, seed=1000 + i)
        correct += zero_shot(scorer, image, [prompt, swapped]) == 0
    return Accuracy(correct, n)


INPAINT_REGION_WIDTHS = (0.32, 0.44, 0.56)  # three region sizes, as fractions of the picture's side


@dataclass
class InpaintCase:
    """One region of the inpainting measure: an empty rendered scene, a region in it and the class to paint there."""

    width: float
    cls: str
    masks: object  # layout.MaskSet of the one region, named "region"
    empty: world.SceneSpec
    prompt: str
    seed: int


def inpaint_cases(config: ProjectConfig, seeds: int, first_seed: int = HELD_OUT_SEED):
    """5 classes x 3 region widths per seed: a region placed at random (its bottom in the lower part of the picture,
    where the world puts objects), a background and a light; the same cases for the model and for rendered truth."""
    from ..layout import Layout, Region, masks

    for s in range(seeds):
        rng = random.Random(first_seed + s)
        for width in INPAINT_REGION_WIDTHS:
            height = min(0.9, 1.35 * width)
            for cls in world.CLASSES:
                left, top = rng.uniform(0.02, 0.98 - width), rng.uniform(max(0.02, 0.6 - height), 0.98 - height)
                layout = Layout([Region("region", left, top, width, height)], config.resolution, config.resolution)
                m = masks(layout, config.resolution, config.resolution, config.effective_feather_px)
                background, light = rng.choice(list(world.BACKGROUNDS)), rng.choice(list(world.LIGHTS))
                empty = world.SceneSpec(background, light, rng.uniform(0.9, 1.05), (), rng.randrange(2**31))
                yield InpaintCase(width, cls, m, empty, f"a {cls} {world.BACKGROUNDS[background]}, {light} light",
                                  rng.randrange(2**31))


def _rates(hits: dict[float, list[bool]]) -> dict[str, Accuracy]:
    out = {f"width {w}": Accuracy(sum(v), len(v)) for w, v in hits.items()}
    out["all"] = Accuracy(sum(sum(v) for v in hits.values()), sum(len(v) for v in hits.values()))
    return out


INPAINT_BATCH = 15  # one seed's cases per inpainting call: each sample paints what it paints alone (its own seed)


def inpaint_accuracy(models: ModelBundle, config: ProjectConfig, scorer, seeds: int = 8,
                     first_seed: int = HELD_OUT_SEED) -> dict[str, Accuracy]:
    """What the method asks of the base model, measured: "a {class} {setting}" inpainted into an empty region of a
    rendered scene (no object anywhere), at the pass's strength, recognised as that class on the region's own
    pixels; per region size and in all. Needs a bundle without subject LoRAs (the base model paints). The cases
    run as batched passes (``pipeline.batched_pass``), each with its own layout and seed."""
    from ..config import Subject
    from ..measures import class_present, own_crop
    from ..pipeline import PassJob, batched_pass

    hits: dict[float, list[bool]] = {w: [] for w in INPAINT_REGION_WIDTHS}
    cases = list(inpaint_cases(config, seeds, first_seed))
    for start in range(0, len(cases), INPAINT_BATCH):
        batch = cases[start:start + INPAINT_BATCH]
        jobs = [PassJob(Subject("region", "", case.cls, "", "region"), case.seed, config.inpaint_strength,
                        case.prompt) for case in batch]
        painted = batched_pass(models, config, [world.render(case.empty, config.resolution) for case in batch],
                               [case.masks for case in batch], jobs)
        for case, (picture, _) in zip(batch, painted):
            hits[case.width].append(class_present(scorer, own_crop(picture, case.masks, "region"), case.cls,
                                                  list(world.CLASSES)))
    return _rates(hits)


def inpaint_measure_on_truth(config: ProjectConfig, scorer, seeds: int = 8, first_seed: int = HELD_OUT_SEED,
                             decoded_by: ModelBundle | None = None) -> dict[str, Accuracy]:
    """The inpainting measure on rendered truth: the same cases with an object of the class rendered in the region
    (a world colour and pattern, 70-95 % of the region's width). What the measure can confirm at best: an object in
    the background's own colour (a black cat under a night sky) cannot be located. With ``decoded_by``, every
    picture is first sent through that bundle's VAE (``vae_round_trip``), as every generated picture is."""
    from ..measures import class_present, own_crop
    from ..pipeline import vae_round_trip

    hits: dict[float, list[bool]] = {w: [] for w in INPAINT_REGION_WIDTHS}
    for case in inpaint_cases(config, seeds, first_seed):
        rng = random.Random(case.seed)
        ys, xs = np.nonzero(case.masks.support["region"])
        size = (xs.max() + 1 - xs.min()) / config.resolution * rng.uniform(0.7, 0.95)
        obj = replace(world.sample_object(rng, (xs.min() + xs.max() + 1) / 2 / config.resolution,
                                          (ys.min() + ys.max() + 1) / 2 / config.resolution, size), cls=case.cls)
        image = world.render(replace(case.empty, objects=(obj,)), config.resolution)
        if decoded_by is not None:
            image = vae_round_trip(decoded_by, image)
        hits[case.width].append(class_present(scorer, own_crop(image, case.masks, "region"), case.cls,
                                              list(world.CLASSES)))
    return _rates(hits)


FADED_TRUTH_SEED = 700_000  # the scenes of tests/test_measures.py


def _subjects_through_passes(models: ModelBundle, config: ProjectConfig, scenes: int, first_seed: int):
    """Per scene ``first_seed..``: the config's subjects rendered in their regions of the default layout (its
    ``SceneSpec`` and picture) and that picture with every region sent through the VAE as a pass paints it
    (``pipeline.region_round_trip``); first the layout's masks."""
    from ..layout import default_layout, masks
    from ..pipeline import region_round_trip

    layout = default_layout(config.subject_names, config.resolution, config.resolution)
    masks_ = masks(layout, config.resolution, config.resolution, config.effective_feather_px)
    yield masks_
    regions = {r.subject: (r.x, r.y, r.w, r.h) for r in layout.regions}
    for seed in range(first_seed, first_seed + scenes):
        spec = world.subjects_in_regions(regions, seed)
        image = decoded = world.render(spec, config.resolution)
        for name in config.subject_names:
            decoded = region_round_trip(models, config, decoded, masks_, name)
        yield spec, image, decoded


def faded_on_truth(models: ModelBundle, config: ProjectConfig, scorer, scenes: int = 60,
                   first_seed: int = FADED_TRUTH_SEED) -> dict[str, dict[str, float]]:
    """The report's "faded" (identity on a subject's own pixels under its QA threshold) on rendered truth: the
    config's subjects rendered in their regions of the default layout, judged as rendered and with every region sent
    through the VAE as a pass paints it (``pipeline.region_round_trip``). Share faded per subject, and mean identity:
    what a faithful generator would score."""
    from ..measures import own_crops
    from ..qa import subject_thresholds

    names = config.subject_names
    thresholds = subject_thresholds(scorer, config)
    scores: dict[tuple[str, str], list[float]] = {(k, n): [] for k in ("rendered", "decoded as a pass") for n in names}
    truth = _subjects_through_passes(models, config, scenes, first_seed)
    masks_ = next(truth)
    for _, image, decoded in truth:
        for kind, picture in (("rendered", image), ("decoded as a pass", decoded)):
            crops = own_crops(picture, masks_, names)
            for name in names:
                scores[kind, name].append(scorer.identity(crops[name], name))
    return {f"{kind} {name}": {"faded": float(np.mean([v < thresholds[name] for v in values])),
                               "identity": float(np.mean(values))} for (kind, name), values in scores.items()}


def marks_kept_on_truth(models: ModelBundle, config: ProjectConfig, scenes: int = 20,
                       first_seed: int = FADED_TRUTH_SEED) -> dict[str, float]:
    """How much of each subject's mark (the cat's star, the mug's heart: what no base object has) comes back when
    its region goes through the VAE as a pass paints it, per subject: 1 − (error on the mark's pixels) / (the error
    of the same subject drawn without its mark). 1: the mark as rendered; 0: erased, as if never there."""
    errors: dict[str, list[float]] = {n: [] for n in config.subject_names}
    truth = _subjects_through_passes(models, config, scenes, first_seed)
    masks_ = next(truth)
    for spec, image, decoded in truth:
        rendered, decoded = np.asarray(image, np.float32), np.asarray(decoded, np.float32)
        unmarked = np.asarray(world.render(replace(spec, objects=tuple(replace(o, mark=None) for o in spec.objects)),
                                           config.resolution), np.float32)
        mark = np.abs(rendered - unmarked).sum(-1) > 60  # the mark's pixels (its colour differs from the body's)
        for name in config.subject_names:
            on_mark = mark & masks_.support[name]
            if on_mark.any():
                erased = np.abs(unmarked - rendered)[on_mark].mean()
                errors[name].append(1 - np.abs(decoded - rendered)[on_mark].mean() / erased)
    return {name: float(np.mean(values)) for name, values in errors.items() if values}


@torch.no_grad()
def vae_psnr(models: ModelBundle, n: int = 64, first_seed: int = HELD_OUT_SEED) -> float:
    from ..pipeline import vae_round_trip

    images = [world.render_scene(s).image for s in range(first_seed, first_seed + n)]
    decoded = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255) for im in vae_round_trip(models, images)])
    original = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255) for im in images])
    mse = ((decoded - original) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


def main(argv: list[str] | None = None) -> int:
    from ..models import load_models
    from ..notebook import make_config
    from ..scoring import ClipScorer

    parser = argparse.ArgumentParser(prog="python -m helpers.world.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--inpaint-seeds", type=int, default=8, help="seeds of the inpainting measure (0: skip it)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    config = make_config("world", output_dir="output/world-eval")
    models = load_models(config)
    scorer = ClipScorer.for_config(config)
    results = {"scorer": scorer_accuracy(scorer, args.objects),
               "generator": generator_accuracy(models, config, scorer, args.prompts),
               "two_objects_colour_binding": two_object_binding(models, config, scorer), "vae_psnr_db": vae_psnr(models)}
    if args.inpaint_seeds:
        results["inpaint_base_model"] = inpaint_accuracy(models, config, scorer, args.inpaint_seeds)
        results["inpaint_measure_on_truth"] = inpaint_measure_on_truth(config, scorer, args.inpaint_seeds)
        results["inpaint_measure_on_decoded_truth"] = inpaint_measure_on_truth(config, scorer, args.inpaint_seeds,
                                                                               decoded_by=models)
    faded = faded_on_truth(models, config, scorer)
    marks_kept = marks_kept_on_truth(models, config)
    print(f"{'measure':<40} value")
    for group, value in results.items():
        if isinstance(value, dict):
            for key, acc in value.items():
                print(f"{group + ' ' + key + ' accuracy':<40} {acc}")
        else:
            print(f"{group:<40} {value if isinstance(value, Accuracy) else f'{value:.2f}'}")
    for key, value in faded.items():
        print(f"{'faded on truth ' + key:<40} {value['faded']:.3f} (identity {value['identity']:.3f})")
    for name, kept in marks_kept.items():
        print(f"{'mark kept, decoded as a pass ' + name:<40} {kept:.2f}")
    if args.json:
        plain = {g: ({k: a.rate for k, a in v.items()} if isinstance(v, dict) else
                     (v.rate if isinstance(v, Accuracy) else v)) for g, v in results.items()}
        plain["faded_on_truth"], plain["marks_kept_on_truth"] = faded, marks_kept
        from ..io import write_json_atomic

        write_json_atomic(args.json, plain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
