"""A fair comparison of the baseline, ours and ours+QA: every method gets the same scene and seed, every subject is
measured on its own pixels, the seed's claims are metrics, and ours is reported as a paired difference to the baseline
with a 95 % interval.

A run is one (scene, seed): the baseline (one generation with all LoRAs, the scene prompt with every token), ours
(``coarse_to_fine``) and ours+QA (its ``qa_loop``). Each run is written to its own file, so an interrupted evaluation
continues where it stopped. Scores come from ``scoring``, where they are taken from ``measures``; the QA loop is
run through its public ``qa_loop``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .config import ProjectConfig
from .io import save_image_atomic, write_json_atomic, write_text_atomic
from .layout import Layout, MaskSet, masks
from .measures import (class_present, find_ghosts, ghost_finder, own_crops, own_pixels, scene_background_share,
                       split_world_of)
from .models import ModelBundle, weights_digest
from .pipeline import (GenerationResult, PassJob, coarse_to_fine, one_pass_baseline, pass_candidates, subject_seed,
                       with_regions_from)
from .profiles import light_judge
from .prompts import config_scene_prompts, evaluation_scenes
from .qa import qa_loop, subject_thresholds
from .scoring import ClipScorer

METHODS = ("baseline", "ours", "ours+qa", "ours+reroll")
REFERENCE_METHOD = "baseline"
# what the QA loop is compared with: ours, and the same number of passes spent as plain re-rolls (no judge)
QA_COMPARISONS = (("ours+qa", "ours"), ("ours+qa", "ours+reroll"))

# Every metric of the report, in one sentence; "↑"/"↓": which way is better.
METRICS: dict[str, tuple[str, str]] = {
    "identity": ("↑", "CLIP-I of the subject's own pixels (its region without its neighbours') vs its photos."),
    "class_presence": ("↑", "the object located in the subject's own pixels is named as the subject's class."),
    "leak": ("↓", "another subject's photos match the subject's own pixels better than its own photos do."),
    "ghost": ("↓", "an object of a subject's class appears outside every region (per image)."),
    "split_world": ("↓", "under a quarter of the region's inner edge shows the scene's background (the colour just "
                         "outside the region, within 30 RGB levels): another setting was painted in."),
    "light_error": ("↓", "the light the subject's known colour shows differs from the light the scene names "
                         "(world only: it knows its subjects' true colours)."),
    "faded": ("↓", "the subject's identity is below its QA threshold in the final picture."),
    "dino": ("↑", "DINOv2 similarity of the subject's own pixels to its photos (where a DINO model is available)."),
    "scene_prompt_score": ("↑", "CLIP-T of the whole picture vs the scene prompt (Phase 0's prompt)."),
    "seconds": ("↓", "wall-clock seconds to make the picture (ours+QA: ours plus the loop)."),
}


# ----------------------------------------------------------------------------------------------------------------
# judging one picture
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Judges:
    """Everything that measures a picture, built once per evaluation: the scorer, each subject's QA threshold, the
    class vocabulary, the profile's light judge (None where the subjects' colours are unknown) and DINO (or None)."""

    scorer: ClipScorer
    thresholds: dict[str, float]
    classes: list[str]
    light: object | None = None
    dino: object | None = None

    @classmethod
    def for_config(cls, config: ProjectConfig, scorer: ClipScorer, dino=None) -> Judges:
        return cls(scorer, subject_thresholds(scorer, config), config.presence_classes(), light_judge(config), dino)

    def ghost_finder(self, config: ProjectConfig):
        """The pipeline's ghost finder (Phase 0's cleanup) with this scorer and vocabulary."""
        return ghost_finder(self.scorer, config)

    def skipped(self) -> list[str]:
        """Metrics this profile cannot compute, for the report."""
        return [m for m, missing in (("light_error", self.light is None), ("dino", self.dino is None)) if missing]


def judge_picture(judges: Judges, image: Image.Image, masks_: MaskSet, config: ProjectConfig,
                  scene_prompt: str) -> tuple[list[dict], list]:
    """One row per subject with every region metric and the picture's ghosts (also returned, for the figures)."""
    names = config.subject_names
    scorer = judges.scorer
    crops = own_crops(image, masks_, names)
    ghosts = find_ghosts(scorer, image, masks_, [s.class_name for s in config.subjects], judges.classes)
    scene_score = scorer.prompt_score(image, config_scene_prompts(config, scene_prompt).phase0)
    pixels = np.asarray(image.convert("RGB"))
    rows = []
    for subject in config.subjects:
        background_share = scene_background_share(image, masks_, subject.name)
        row_scores = scorer.leakage_row(crops[subject.name], subject.name)
        identity = row_scores[subject.name]
        rivals = {n: v for n, v in row_scores.items() if n != subject.name}
        row = {"subject": subject.name, "identity": identity,
               "rival": max(rivals.values()) if rivals else float("nan"),
               "leak": float(max(rivals.values()) > identity) if rivals else float("nan"),
               "class_presence": float(class_present(scorer, crops[subject.name], subject.class_name,
                                                     judges.classes)),
               "ghost": float(bool(ghosts)), "ghost_count": len(ghosts),
               "split_world": split_world_of(background_share), "background_share": background_share,
               "light_error": (judges.light.light_error(pixels[own_pixels(masks_, subject.name)], subject.name,
                                                        scene_prompt) if judges.light else float("nan")),
               "faded": float(identity < judges.thresholds[subject.name]),
               "scene_prompt_score": scene_score}
        if judges.dino is not None:
            row["dino"] = judges.dino.identity(crops[subject.name], subject.name)
        rows.append(row)
    return rows, ghosts


def outside_mask_max_diff(image: Image.Image, coarse: Image.Image, masks_: MaskSet) -> int:
    """Largest absolute pixel difference to the coarse scene outside every (dilated) subject mask; 0 is the claim."""
    a, b = np.asarray(image, dtype=np.int16), np.asarray(coarse, dtype=np.int16)
    outside = ~masks_.union_dilated
    return int(np.abs(a - b)[outside].max()) if outside.any() else 0


def leakage_matrix(scorer: ClipScorer, image: Image.Image, masks_: MaskSet, names: list[str]) -> np.ndarray:
    """Rows: each subject's own pixels; columns: similarity to subject j's photos. A healthy picture has the
    largest value of every row on the diagonal."""
    crops = own_crops(image, masks_, names)
    rows = {r: scorer.leakage_row(crops[r], r) for r in names}  # one embedding per region
    return np.array([[rows[r][c] for c in names] for r in names])


# ----------------------------------------------------------------------------------------------------------------
# runs: one (scene, seed), every method, one file each
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    scene_index: int
    scene: str
    seed: int
    rows: list[dict]
    ghosts: dict[str, list[list[int]]] = field(default_factory=dict)  # method -> ghost boxes
    prompts: dict[str, object] = field(default_factory=dict)
    qa: dict[str, object] = field(default_factory=dict)  # the loop's thresholds, decisions and per-subject summary

    def to_dict(self, fingerprint: str) -> dict:
        return {"fingerprint": fingerprint, "scene_index": self.scene_index, "scene": self.scene, "seed": self.seed,
                "rows": self.rows, "ghosts": self.ghosts, "prompts": self.prompts, "qa": self.qa}

    @classmethod
    def from_dict(cls, data: dict) -> Run:
        return cls(data["scene_index"], data["scene"], data["seed"], data["rows"], data.get("ghosts", {}),
                   data.get("prompts", {}), data.get("qa", {}))

    @property
    def name(self) -> str:
        return f"scene{self.scene_index}_seed{self.seed}"


def rerolls(models: ModelBundle, config: ProjectConfig, result: GenerationResult,
            passes: dict[str, int]) -> Image.Image:
    """The QA loop's passes spent without its judgement: for each subject as many new passes as the loop ran for it,
    in the loop's rounds and with its seeds, but with the first pass's prompt and strength; the last one is kept."""
    prompts = config_scene_prompts(config, result.scene_prompt)
    subjects = [config.subject(region.subject) for region in result.layout.regions]
    last: dict[str, Image.Image] = {}
    for attempt in range(1, max(passes.values(), default=0) + 1):
        jobs = [PassJob(s, subject_seed(result.seed, index, attempt), config.inpaint_strength, prompts.passes[s.name])
                for index, s in enumerate(subjects) if passes.get(s.name, 0) >= attempt]
        start = with_regions_from(result.final, last, result.masks, result.layout, config.region_margin)
        for job, (picture, _) in zip(jobs, pass_candidates(models, config, start, result.masks, jobs)):
            last[job.subject.name] = picture
    return with_regions_from(result.final, last, result.masks, result.layout, config.region_margin)


def evaluate_run(models: ModelBundle, config: ProjectConfig, layout: Layout, judges: Judges, scene_index: int,
                 scene: str, seed: int, folder: Path | None = None) -> Run:
    """Baseline, ours and ours+QA on one (scene, seed), judged alike; the pictures (and ours' stages) go to
    ``folder/<run name>/`` when a folder is given."""
    prompts = config_scene_prompts(config, scene)
    t0 = time.perf_counter()
    baseline = one_pass_baseline(models, config, seed=seed, scene_prompt=scene)
    t_base = time.perf_counter() - t0
    result = coarse_to_fine(models, config, layout, scene, seed, judges.ghost_finder(config))
    outcome = qa_loop(models, result, config, judges.scorer, judges.thresholds)
    t0 = time.perf_counter()
    rerolled = rerolls(models, config, result, {n: s["refinements"] for n, s in outcome.summary.items()})
    t_reroll = time.perf_counter() - t0
    pictures = {"baseline": (baseline, t_base), "ours": (result.final, result.seconds["total"]),
                "ours+qa": (outcome.final, result.seconds["total"] + outcome.seconds),
                "ours+reroll": (rerolled, result.seconds["total"] + t_reroll)}
    run = Run(scene_index, scene, seed, [], prompts={"phase0": prompts.phase0, "baseline": prompts.baseline,
                                                     "passes": prompts.passes, "ghosts_removed": result.ghosts_removed},
              qa={"thresholds": outcome.thresholds, "log": outcome.log,
                  "ablation": [{"scene_index": scene_index, "seed": seed, **a} for a in outcome.ablation_rows()]})
    for method, (image, seconds) in pictures.items():
        rows, ghosts = judge_picture(judges, image, result.masks, config, scene)
        outside = outside_mask_max_diff(image, result.coarse, result.masks) if method != "baseline" else float("nan")
        run.ghosts[method] = [list(g.box) for g in ghosts]
        for row in rows:
            run.rows.append({"method": method, "scene_index": scene_index, "scene": scene, "seed": seed, **row,
                             "seconds": seconds, "outside_max_diff": outside})
    if folder is not None:
        target = Path(folder) / run.name
        images = {"baseline": baseline, "coarse": result.coarse, "ours": result.final, "ours+qa": outcome.final,
                  "ours+reroll": rerolled}
        if result.scene is not None:
            images["phase0_with_ghosts"] = result.scene
        images.update({f"stage_{i + 1}_{p.subject}": stage for i, (p, stage) in
                       enumerate(zip(result.passes, result.stages))})
        for label, image in images.items():
            save_image_atomic(image, target / f"{label.replace('+', '_')}.png")
    return run


# bumped whenever a measure or the method's pictures change, so stored runs are remade rather than mixed in
RESULTS_VERSION = 3  # 2: split-world by the share of the scene's background; the QA loop in rounds; 3: a region's
# object located as the box around every area that differs (a patterned object is one object)


def evaluation_fingerprint(config: ProjectConfig, layout: Layout) -> str:
    """What a stored run must have been made with to be reused: ``RESULTS_VERSION``, every setting but paths and
    evaluation counts, the layout, the base weights (``models.weights_digest``) and each subject's LoRA file."""
    settings = {k: v for k, v in config.to_dict().items()
                if k not in ("output_dir", "cache_dir", "eval_seeds", "eval_prompts", "extra_scene_prompts")}
    digest = hashlib.sha256(json.dumps([RESULTS_VERSION, settings, layout.to_dict(), weights_digest(config.profile)],
                                       sort_keys=True, default=str).encode())
    for subject in config.subjects:
        lora = config.lora_file_path(subject)
        digest.update(lora.read_bytes() if lora.exists() else b"no lora")
    return digest.hexdigest()[:16]


@dataclass
class Evaluation:
    runs: list[Run]
    folder: Path
    reused: int = 0

    @property
    def rows(self) -> list[dict]:
        return [row for run in self.runs for row in run.rows]

    @property
    def qa_ablation(self) -> list[dict]:
        return [row for run in self.runs for row in run.qa.get("ablation", [])]


def run_evaluation(models: ModelBundle, config: ProjectConfig, layout: Layout, judges: Judges, folder: Path,
                   scenes: list[str] | None = None, seeds: list[int] | None = None,
                   progress: Callable[[str], None] | None = print, shard: tuple[int, int] = (0, 1)) -> Evaluation:
    """Every (scene, seed): a stored run made with the same settings, layout and LoRAs is read back, any other is
    made and written at once (``folder/runs/<run>.json`` + its pictures), so an interrupted evaluation continues.
    ``shard=(rank, processes)``: only the cells whose index is ``rank`` modulo ``processes`` (one process of several
    under ``accelerate launch``; a cell's pictures depend on its seeds only, so the split changes no number)."""
    scenes = scenes or evaluation_scenes(config)
    seeds = seeds or [config.eval_seed_start + i for i in range(config.eval_seeds)]
    fingerprint = evaluation_fingerprint(config, layout)
    runs_dir = Path(folder) / "runs"
    runs, reused, start = [], 0, time.perf_counter()
    rank, processes = shard
    cells = [(i, scene, seed) for i, scene in enumerate(scenes) for seed in seeds]
    cells = [cell for index, cell in enumerate(cells) if index % processes == rank]
    total = len(cells)
    for scene_index, scene, seed in cells:
        path = runs_dir / f"scene{scene_index}_seed{seed}.json"
        stored = _stored_run(path, fingerprint, scene)
        if stored is not None:
            runs.append(stored)
            reused += 1
            continue
        run = evaluate_run(models, config, layout, judges, scene_index, scene, seed, runs_dir)
        write_json_atomic(path, run.to_dict(fingerprint))
        runs.append(run)
        if progress:
            done = len(runs)
            made = done - reused
            eta = (time.perf_counter() - start) / made * (total - done)
            progress(f"run {done}/{total} ({scene!r}, seed {seed}) done; ~{eta:.0f} s left")
    if progress and reused:
        progress(f"{reused} of {total} runs read back from {runs_dir} (same settings, layout and LoRAs)")
    return Evaluation(runs, Path(folder), reused)


def _stored_run(path: Path, fingerprint: str, scene: str) -> Run | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged file is made again (and replaced atomically)
    if data.get("fingerprint") != fingerprint or data.get("scene") != scene:
        return None
    return Run.from_dict(data)


def load_runs(folder: Path) -> list[Run]:
    """Every stored run under ``folder/runs`` (for figures made after the fact)."""
    runs = []
    for path in sorted((Path(folder) / "runs").glob("scene*_seed*.json")):
        runs.append(Run.from_dict(json.loads(path.read_text())))
    return runs


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------
def report_metrics(rows: list[dict]) -> list[str]:
    """The metrics present in ``rows`` (a metric no row measured, e.g. DINO offline, is left out)."""
    return [m for m in METRICS if any(m in r and np.isfinite(float(r[m])) for r in rows)]


def per_image(rows: list[dict], metrics: list[str]) -> dict[tuple, dict[str, float]]:
    """(method, scene_index, seed) -> each metric's mean over that picture's subjects: pictures, not regions, are
    the independent units (two subjects of one picture share its seed and scene)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["scene_index"], r["seed"]), []).append(r)
    out = {}
    for key, group in groups.items():
        out[key] = {}
        for m in metrics:
            values = np.array([float(r.get(m, np.nan)) for r in group], float)
            values = values[np.isfinite(values)]
            out[key][m] = float(values.mean()) if len(values) else float("nan")
    return out


def mean_interval(values: np.ndarray) -> tuple[float, float, int]:
    """Mean, half-width of its 95 % interval (Student t) and n, over the finite values."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(values[0]), float("nan"), 1
    from scipy.stats import t

    return float(values.mean()), float(t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)), n


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: each metric's mean over pictures with its 95 % interval, the pictures and regions counted, and
    the largest pixel change outside the masks (the invariant; nan for the baseline, which has no coarse scene)."""
    metrics = report_metrics(rows)
    images = per_image(rows, metrics)
    out = []
    for method in METHODS:
        keys = [k for k in images if k[0] == method]
        if not keys:
            continue
        entry = {"method": method, "pictures": len(keys), "regions": sum(r["method"] == method for r in rows)}
        for m in metrics:
            entry[f"{m}_mean"], entry[f"{m}_ci95"], _ = mean_interval(np.array([images[k][m] for k in keys]))
        outside = [r["outside_max_diff"] for r in rows if r["method"] == method and "outside_max_diff" in r]
        entry["outside_max_diff"] = float(np.nanmax(outside)) if outside and np.isfinite(outside).any() \
            else float("nan")
        out.append(entry)
    return out


def paired_differences(rows: list[dict], reference: str = REFERENCE_METHOD,
                       methods: tuple[str, ...] | None = None) -> list[dict]:
    """For every other method (or ``methods``) and metric: the mean over pictures of (method − reference) on the
    same (scene, seed), the half-width of its 95 % interval and the number of pairs."""
    metrics = report_metrics(rows)
    images = per_image(rows, metrics)
    out = []
    for method in methods or METHODS:
        if method == reference or not any(k[0] == method for k in images):
            continue
        entry = {"method": method, "reference": reference}
        for m in metrics:
            diffs = [images[k][m] - images[(reference, *k[1:])][m] for k in images
                     if k[0] == method and (reference, *k[1:]) in images]
            entry[f"{m}_diff"], entry[f"{m}_ci95"], entry[f"{m}_n"] = mean_interval(np.array(diffs))
        out.append(entry)
    return out


def qa_differences(rows: list[dict]) -> list[dict]:
    """ours+QA against ours and against the same passes spent as plain re-rolls, paired."""
    return [entry for method, reference in QA_COMPARISONS
            for entry in paired_differences(rows, reference, (method,))]


def read_metrics(path: str | Path) -> list[dict]:
    """A report's ``metrics.csv`` back as rows: metric columns and the seed as numbers, the rest as text."""
    path = Path(path)
    if path.is_dir():
        path = path / "report" / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.csv there; run `python -m helpers evaluate --out <folder>` first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key in METRICS or key in ("seed", "scene_index", "outside_max_diff"):
                row[key] = float(value) if value not in ("", None) else float("nan")
    return rows


def ablation_differences(base: list[dict], variants: dict[str, list[dict]],
                         methods: tuple[str, ...] = ("ours", "ours+qa")) -> list[dict]:
    """An ablation, paired: each method of each variant evaluation (the same command with one setting changed)
    against the same method of ``base`` on the same (scene, seed). Raises ``ValueError`` when a variant was not made
    on the base's (scene, seed) pairs."""
    def pairs(rows: list[dict]) -> set[tuple]:
        return {(r["scene_index"], r["seed"]) for r in rows if r["method"] in methods}

    out = []
    for label, rows in variants.items():
        if pairs(rows) != pairs(base):
            raise ValueError(f"variant {label!r}: made on other (scene, seed) pairs than the base "
                             f"({len(pairs(rows))} vs {len(pairs(base))}); run it with the base's --scenes, --seeds "
                             f"and eval_seed_start")
        renamed = [{**r, "method": f"{r['method']} [{label}]"} for r in rows if r["method"] in methods]
        mine = [r for r in base if r["method"] in methods] + renamed
        out += [entry for m in methods for entry in paired_differences(mine, m, (f"{m} [{label}]",))]
    return out


def _fmt(mean: float, half: float, signed: bool = False) -> str:
    if not np.isfinite(mean):
        return "–"
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return f"{text} ± {half:.3f}" if np.isfinite(half) else text


def summary_table(summary: list[dict]) -> str:
    """Per method: every metric as "mean ± 95 % half-width" over pictures (markdown)."""
    rows = []
    for entry in summary:
        row = {"method": entry["method"], "pictures": entry["pictures"]}
        for m, (better, _) in METRICS.items():
            if f"{m}_mean" in entry:
                row[f"{m} {better}"] = _fmt(entry[f"{m}_mean"], entry[f"{m}_ci95"])
        row["outside-mask max diff"] = "–" if np.isnan(entry["outside_max_diff"]) else int(entry["outside_max_diff"])
        rows.append(row)
    return markdown_table(rows)


def paired_table(paired: list[dict]) -> str:
    """Per method: every metric's paired difference to its reference, "Δ ± 95 % half-width (n pairs)"."""
    rows = []
    for entry in paired:
        row = {"method": f"{entry['method']} − {entry['reference']}"}
        for m, (better, _) in METRICS.items():
            if f"{m}_diff" in entry:
                row[f"Δ {m} {better}"] = f"{_fmt(entry[f'{m}_diff'], entry[f'{m}_ci95'], True)} (n={entry[f'{m}_n']})"
        rows.append(row)
    return markdown_table(rows)


def metric_definitions(judges: Judges | None = None) -> list[str]:
    """One sentence per metric, and what this profile skipped."""
    lines = [f"{m} ({better}): {text}" for m, (better, text) in METRICS.items()]
    if judges is not None and judges.skipped():
        lines.append(f"not measured on this profile: {', '.join(judges.skipped())}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# tables and files
# ----------------------------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path) -> Path:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
    return path


def markdown_table(rows: list[dict], digits: int = 3) -> str:
    if not rows:
        return "_no rows_"
    keys = list(rows[0])

    def fmt(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def run_masks(config: ProjectConfig, layout: Layout) -> MaskSet:
    return masks(layout, config.resolution, config.resolution, config.effective_feather_px)


__all__ = ["METHODS", "METRICS", "Judges", "judge_picture", "outside_mask_max_diff", "leakage_matrix",
           "Run", "evaluate_run", "rerolls", "qa_differences", "run_evaluation", "load_runs",
           "Evaluation", "summarize", "paired_differences", "summary_table", "paired_table", "metric_definitions",
           "write_csv", "markdown_table", "per_image", "mean_interval", "run_masks", "read_metrics",
           "ablation_differences"]
