"""Metrics over generated images: CLIP-I / CLIP-T (/ DINO) per subject, the region x subject leakage matrix, the
outside-mask invariant, and the baseline / ours / ours+QA experiment over seeds and prompts. Scores come from
``scoring``; the QA loop is run through its public ``qa_loop``.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .config import ProjectConfig
from .io import write_text_atomic
from .layout import Layout, MaskSet
from .models import ModelBundle
from .pipeline import GenerationResult, coarse_to_fine, one_pass_baseline
from .qa import QAOutcome, qa_loop, subject_thresholds
from .scoring import ClipScorer

METHODS = ("baseline", "ours", "ours+qa")


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def leakage_matrix_from_embeddings(crops: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> np.ndarray:
    """M[i, j] = mean cosine between region i's crop embedding(s) and subject j's reference embeddings."""
    return np.array([[float(cosine_matrix(np.atleast_2d(c), np.atleast_2d(r)).mean()) for r in references.values()]
                     for c in crops.values()])


def region_crops(image: Image.Image, masks_: MaskSet, names: list[str], margin: float) -> dict[str, Image.Image]:
    return {n: image.crop(masks_.crop_box(n, margin)) for n in names}


def leakage_matrix(scorer: ClipScorer, image: Image.Image, masks_: MaskSet, names: list[str],
                   margin: float) -> np.ndarray:
    """Rows: the region meant for subject i; columns: similarity to subject j's references. A healthy image has its
    largest value of every row on the diagonal."""
    return _leakage_of_crops(scorer, region_crops(image, masks_, names, margin))


def _leakage_of_crops(scorer: ClipScorer, crops: dict[str, Image.Image]) -> np.ndarray:
    crop_emb = {n: scorer.embed_images([c]).cpu().numpy() for n, c in crops.items()}
    ref_emb = {n: scorer.reference_embeddings(n).cpu().numpy() for n in crops}
    return leakage_matrix_from_embeddings(crop_emb, ref_emb)


def outside_mask_max_diff(image: Image.Image, coarse: Image.Image, masks_: MaskSet) -> int:
    """Largest absolute pixel difference to the coarse scene outside every (dilated) subject mask; 0 is the claim."""
    a, b = np.asarray(image, dtype=np.int16), np.asarray(coarse, dtype=np.int16)
    outside = ~masks_.union_dilated
    return int(np.abs(a - b)[outside].max()) if outside.any() else 0


def tint(pixels: np.ndarray) -> float:
    """Warm (> 0) or cool (< 0) cast of some pixels: (mean red - mean blue) / mean brightness."""
    mean = pixels.reshape(-1, 3).astype(np.float64).mean(axis=0)
    return float((mean[0] - mean[2]) / max(mean.sum() / 3, 1e-6))


def light_gap(image: Image.Image, masks_: MaskSet, subject: str) -> float:
    """How far the colour cast inside a subject's region is from the cast of the scene outside every region (a
    proxy for "lit by the same light"; the subject's own colours count in it, so compare methods, not values)."""
    pixels = np.asarray(image)
    outside = ~np.logical_or.reduce(list(masks_.support.values()))
    return abs(tint(pixels[masks_.support[subject]]) - tint(pixels[outside])) if outside.any() else float("nan")


def image_metrics(scorer: ClipScorer, image: Image.Image, masks_: MaskSet, config: ProjectConfig,
                  scene_prompt: str, dino=None) -> list[dict]:
    """Per subject: CLIP-I, CLIP-T of the crop vs its class prompt, the strongest rival's similarity, and the
    whole image's CLIP-T vs the scene prompt (DINO too when a DINO scorer is given)."""
    names = config.subject_names
    crops = region_crops(image, masks_, names, config.region_margin)
    matrix = _leakage_of_crops(scorer, crops)
    scene_score = scorer.prompt_score(image, scene_prompt)
    rows = []
    for i, subject in enumerate(config.subjects):
        rivals = [matrix[i, j] for j in range(len(names)) if j != i]
        best_rival = float(max(rivals)) if rivals else float("nan")
        row = {"subject": subject.name, "clip_i": float(matrix[i, i]),
               "clip_t": scorer.prompt_score(crops[subject.name], subject.class_prompt),
               "leak_max_other": best_rival, "leaked": float(best_rival > matrix[i, i]) if rivals else float("nan"),
               "light_gap": light_gap(image, masks_, subject.name), "clip_t_scene": scene_score}
        if dino is not None:
            row["dino"] = dino.identity(crops[subject.name], subject.name)
        rows.append(row)
    return rows


@dataclass
class Experiments:
    """Metric rows, QA ablation rows, and the images of the first (prompt, seed) for the figures."""

    rows: list[dict]
    ablation: list[dict]
    first_baseline: Image.Image
    first_result: GenerationResult
    first_qa: QAOutcome


def run_experiments(models: ModelBundle, config: ProjectConfig, layout: Layout, scorer: ClipScorer,
                    prompts: list[str], seeds: list[int], dino=None) -> Experiments:
    """Baseline vs ours vs ours+QA for every (prompt, seed)."""
    thresholds = subject_thresholds(scorer, config)
    rows, ablation, first = [], [], None
    for prompt in prompts:
        for seed in seeds:
            t0 = time.perf_counter()
            baseline = one_pass_baseline(models, config, seed=seed)
            t_base = time.perf_counter() - t0
            result: GenerationResult = coarse_to_fine(models, config, layout, prompt, seed)
            outcome = qa_loop(models, result, config, scorer, thresholds)
            images = {"baseline": (baseline, t_base), "ours": (result.final, result.seconds["total"]),
                      "ours+qa": (outcome.final, result.seconds["total"] + outcome.seconds)}
            for method, (image, seconds) in images.items():
                for row in image_metrics(scorer, image, result.masks, config, prompt, dino):
                    outside = outside_mask_max_diff(image, result.coarse, result.masks) if method != "baseline" \
                        else float("nan")
                    rows.append({"method": method, "prompt": prompt, "seed": seed, **row,
                                 "outside_max_diff": outside, "seconds": seconds})
            for a in outcome.ablation_rows():
                ablation.append({"prompt": prompt, "seed": seed, **a})
            first = first or (baseline, result, outcome)
    return Experiments(rows, ablation, *first)


SUMMARY_METRICS = ("clip_i", "clip_t", "leak_max_other", "leaked", "light_gap", "seconds")


def summarize(rows: list[dict], metrics: tuple[str, ...] = SUMMARY_METRICS) -> list[dict]:
    """Per method (over subjects, seeds and prompts): mean, standard deviation and the half-width of a 95 % interval
    of the mean (normal approximation, 1.96 s / sqrt(n)); DINO too when it was measured; the runs counted; and the
    largest pixel change outside the masks (the invariant; nan for the baseline, which has no coarse scene)."""
    if any("dino" in r for r in rows):
        metrics = (*metrics, "dino")
    out = []
    for method in METHODS:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        entry = {"method": method, "n": len(sel), "runs": len({(r.get("prompt"), r.get("seed")) for r in sel})}
        for m in metrics:
            values = np.array([r[m] for r in sel if m in r], dtype=float)
            values = values[np.isfinite(values)]
            mean = float(values.mean()) if len(values) else float("nan")
            std = float(values.std()) if len(values) else float("nan")
            entry[f"{m}_mean"], entry[f"{m}_std"] = mean, std
            entry[f"{m}_ci95"] = 1.96 * std / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        outside = [r["outside_max_diff"] for r in sel if "outside_max_diff" in r]
        entry["outside_max_diff"] = float(np.nanmax(outside)) if outside and np.isfinite(outside).any() \
            else float("nan")
        out.append(entry)
    return out


SUMMARY_COLUMNS = {"clip_i": "identity (CLIP-I)", "clip_t": "prompt (CLIP-T)", "leak_max_other": "best rival",
                   "leaked": "leak rate", "light_gap": "light gap", "seconds": "seconds"}


def summary_table(summary: list[dict]) -> str:
    """The summary as "mean ± 95 % half-width" per metric, one row per method (markdown)."""
    rows = []
    for entry in summary:
        row = {"method": entry["method"], "runs": entry["runs"], "regions": entry["n"]}
        for metric, title in SUMMARY_COLUMNS.items():
            row[title] = f"{entry[f'{metric}_mean']:.3f} ± {entry[f'{metric}_ci95']:.3f}"
        if "dino_mean" in entry:
            row["DINO"] = f"{entry['dino_mean']:.3f} ± {entry['dino_ci95']:.3f}"
        row["outside-mask max diff"] = "-" if np.isnan(entry["outside_max_diff"]) else int(entry["outside_max_diff"])
        rows.append(row)
    return markdown_table(rows)


def write_csv(rows: list[dict], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
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


def experiment_prompts(config: ProjectConfig) -> list[str]:
    """The scene prompt, then the config's extra scenes, ``eval_prompts`` of them in all."""
    classes = " and ".join(f"a {s.class_name}" for s in config.subjects)
    variants = [config.scene_prompt, *(p.format(subjects=classes) for p in config.extra_scene_prompts)]
    return variants[:config.eval_prompts]


__all__ = ["Experiments", "cosine_matrix", "leakage_matrix", "leakage_matrix_from_embeddings", "outside_mask_max_diff",
           "image_metrics", "run_experiments", "summarize", "summary_table", "write_csv", "markdown_table",
           "experiment_prompts", "light_gap", "tint"]
