"""Every plot and the report page (matplotlib, saved as PNG). Notebooks show these; other modules never plot."""
from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .config import ProjectConfig
from .evaluation import (METRICS, Evaluation, Judges, Run, leakage_matrix, metric_definitions, paired_differences,
                         paired_table, qa_differences, run_masks, summarize, summary_table, write_csv)
from .io import atomic_path, write_text_atomic
from .layout import SUBJECT_COLORS as COLORS
from .layout import Layout, MaskSet
from .scoring import ClipScorer


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def image_grid(images: list[Image.Image], titles: list[str], cols: int | None = None,
               size: float = 2.6) -> plt.Figure:
    cols = cols or len(images)
    rows = int(np.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def mask_overlay(image: Image.Image, masks_: MaskSet, layout: Layout) -> plt.Figure:
    """The image with every subject's feathered mask tinted in its colour and labelled."""
    fig, ax = plt.subplots(figsize=(4, 4 * masks_.height / masks_.width))
    ax.imshow(image.resize((masks_.width, masks_.height)))
    for i, region in enumerate(layout.regions):
        color = matplotlib.colors.to_rgb(COLORS[i % len(COLORS)])
        rgba = np.zeros((masks_.height, masks_.width, 4))
        rgba[..., :3] = color
        rgba[..., 3] = masks_.soft[region.subject] * 0.45
        ax.imshow(rgba)
        cx, cy = region.center
        ax.text(cx * masks_.width, cy * masks_.height, region.subject, color="white", ha="center", va="center",
                fontsize=10, weight="bold", bbox=dict(facecolor=COLORS[i % len(COLORS)], alpha=0.8, lw=0))
    ax.axis("off")
    fig.tight_layout()
    return fig


def loss_curves(histories: dict[str, list[float]]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3))
    for i, (name, losses) in enumerate(histories.items()):
        losses = np.asarray(losses, dtype=float)
        ax.plot(losses, alpha=0.3, color=COLORS[i % len(COLORS)])
        window = max(1, len(losses) // 10)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=name, color=COLORS[i % len(COLORS)])
    ax.set(xlabel="step", ylabel="loss", title="LoRA training loss (faint: per step, solid: moving average)")
    ax.legend()
    fig.tight_layout()
    return fig


def leakage_heatmap(matrix: np.ndarray, names: list[str], title: str = "identity leakage") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 1.2 * len(names) + 1.2))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(names)), [f"{n} refs" for n in names])
    ax.set_yticks(range(len(names)), [f"{n} region" for n in names])
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", color="w" if i != j else "k",
                    weight="bold" if i == j else "normal")
    ax.set_title(f"{title}\n(row = region, column = subject's references; diagonal should win)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def qa_trace(log: list[dict], thresholds: dict[str, float]) -> plt.Figure:
    """Identity score per attempt for every subject, with its threshold and the kept attempt circled."""
    names = list(dict.fromkeys(entry["subject"] for entry in log))
    fig, ax = plt.subplots(figsize=(6, 3))
    for i, name in enumerate(names):
        entries = [e for e in log if e["subject"] == name]
        color = COLORS[i % len(COLORS)]
        ax.plot([e["attempt"] for e in entries], [e["identity"] for e in entries], "o-", color=color, label=name)
        ax.axhline(thresholds[name], color=color, ls="--", lw=1)
        best = max(entries, key=lambda e: (e["passed"], e["identity"]))
        ax.plot(best["attempt"], best["identity"], "o", ms=14, mfc="none", mec=color)
    ax.set(xlabel="attempt (0 = before QA)", ylabel="identity (CLIP-I)", title="QA trace (dashed: threshold)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    fig.tight_layout()
    return fig


def score_bars(summary_rows: list[dict],
               metrics: tuple[str, ...] = ("identity", "class_presence", "leak", "ghost", "split_world")) -> plt.Figure:
    """Mean per method for each metric, with the 95 % interval of the mean as error bars."""
    metrics = tuple(m for m in metrics if summary_rows and f"{m}_mean" in summary_rows[0])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        methods = [r["method"] for r in summary_rows]
        ax.bar(methods, [r[f"{metric}_mean"] for r in summary_rows],
               yerr=[np.nan_to_num(r[f"{metric}_ci95"]) for r in summary_rows], color=COLORS[:len(methods)], capsize=4)
        ax.set_title(metric)
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return fig


def paired_bars(paired: list[dict]) -> plt.Figure:
    """Each method's paired difference to the baseline per metric, with its 95 % interval (0: no difference)."""
    metrics = [m for m in METRICS if paired and f"{m}_diff" in paired[0] and m != "seconds"]
    fig, ax = plt.subplots(figsize=(1.1 * len(metrics) * max(1, len(paired)) + 2, 3.2))
    width = 0.8 / max(1, len(paired))
    for i, entry in enumerate(paired):
        xs = np.arange(len(metrics)) + i * width
        ax.bar(xs, [entry[f"{m}_diff"] for m in metrics], width,
               yerr=[np.nan_to_num(entry[f"{m}_ci95"]) for m in metrics], capsize=3, label=entry["method"],
               color=COLORS[(i + 1) % len(COLORS)])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(paired) - 1) / 2,
                  [f"{m} {METRICS[m][0]}" for m in metrics], rotation=20)
    ax.set_title("paired difference to the baseline (same scene and seed), 95 % interval")
    ax.legend()
    fig.tight_layout()
    return fig


GHOST_COLOR = (255, 30, 30)


def outlined(image: Image.Image, masks_: MaskSet, names: list[str], ghosts: list[list[int]] = (),
             scale: int = 2) -> Image.Image:
    """The picture (enlarged ``scale`` times) with every region's edge in its subject's colour and every ghost
    object boxed in red."""
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    pixels = np.array(big)
    for i, name in enumerate(names):
        support = np.kron(masks_.support[name], np.ones((scale, scale), bool))
        edge = support & ~ndimage.binary_erosion(support, iterations=max(1, scale))
        pixels[edge] = np.array(matplotlib.colors.to_rgb(COLORS[i % len(COLORS)])) * 255
    out = Image.fromarray(pixels)
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in ghosts:
        draw.rectangle((x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1), outline=GHOST_COLOR, width=scale)
    return out


RUN_PICTURES = {"baseline": "baseline", "coarse": "Phase 0", "ours": "ours", "ours_qa": "ours+QA",
                "ours_reroll": "ours+re-rolls"}


def figure_runs(runs: list[Run], count: int = 4) -> list[Run]:
    """``count`` runs for the figures: each scene's first seed, then the next seeds, scene by scene."""
    by_scene: dict[int, list[Run]] = {}
    for run in runs:
        by_scene.setdefault(run.scene_index, []).append(run)
    chosen = []
    for rank in range(max((len(v) for v in by_scene.values()), default=0)):
        chosen += [group[rank] for group in by_scene.values() if rank < len(group)]
    return chosen[:count]


def methods_grid(runs: list[Run], runs_dir: Path, masks_: MaskSet, names: list[str]) -> plt.Figure:
    """One row per (scene, seed): baseline | Phase 0 | ours | ours+QA, regions outlined, ghosts boxed in red."""
    ghost_key = {"baseline": "baseline", "coarse": None, "ours": "ours", "ours_qa": "ours+qa",
                 "ours_reroll": "ours+reroll"}
    images, titles = [], []
    for run in runs:
        for label, title in RUN_PICTURES.items():
            picture = Image.open(Path(runs_dir) / run.name / f"{label}.png")
            images.append(outlined(picture, masks_, names, run.ghosts.get(ghost_key[label]) or []))
            ghosts = len(run.ghosts.get(ghost_key[label]) or []) if ghost_key[label] else None
            note = f", {ghosts} ghost(s)" if ghosts else ""
            titles.append(f"{title}{note}\nscene {run.scene_index}, seed {run.seed}")
    return image_grid(images, titles, cols=len(RUN_PICTURES))


def stages_figure(run: Run, runs_dir: Path, masks_: MaskSet, names: list[str]) -> plt.Figure:
    """Phase 0, the picture after each subject's pass, and after the QA loop, regions outlined."""
    folder = Path(runs_dir) / run.name
    labels = ["coarse", *(p.stem for p in sorted(folder.glob("stage_*.png"))), "ours_qa"]
    titles = ["Phase 0"] + [f"+ {label.split('_', 2)[2]}" for label in labels[1:-1]] + ["after QA"]
    images = [outlined(Image.open(folder / f"{label}.png"), masks_, names) for label in labels]
    return image_grid(images, titles)


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def report_figures(evaluation: Evaluation, summary: list[dict], paired: list[dict], layout: Layout,
                   scorer: ClipScorer, config: ProjectConfig, loss_histories: dict[str, list[float]],
                   folder: Path) -> dict[str, Path]:
    """Every figure of the report, saved under ``folder``, by title: every method's picture for four (scene, seed)
    pairs, the stages of the first, the paired differences and the means, the first run's QA trace, a leakage
    heatmap of its baseline and ours+QA, and the loss curves when recorded."""
    runs_dir = evaluation.folder / "runs"
    masks_ = run_masks(config, layout)
    names = config.subject_names
    shown = figure_runs(evaluation.runs)
    first = shown[0]
    figures = {
        "Every method on the same scenes and seeds (regions outlined, ghosts boxed in red)":
            (methods_grid(shown, runs_dir, masks_, names), "methods_grid.png"),
        "Stages of the first run": (stages_figure(first, runs_dir, masks_, names), "stages.png"),
        "Paired difference to the baseline (95 % interval)": (paired_bars(paired), "paired_differences.png"),
        "Means per method (95 % interval over pictures)": (score_bars(summary), "score_bars.png"),
        "Layout masks": (mask_overlay(Image.open(runs_dir / first.name / "coarse.png"), masks_, layout), "masks.png"),
    }
    if first.qa.get("log"):
        figures["QA trace of the first run"] = (qa_trace(first.qa["log"], first.qa["thresholds"]), "qa_trace.png")
    for label, title in (("baseline", "baseline"), ("ours_qa", "ours+QA")):
        matrix = leakage_matrix(scorer, Image.open(runs_dir / first.name / f"{label}.png"), masks_, names)
        figures[f"Leakage: {title}"] = (leakage_heatmap(matrix, names, f"leakage, {title} (own pixels)"),
                                        f"leakage_{label}.png")
    if loss_histories and all(loss_histories.values()):
        figures["Training loss"] = (loss_curves(loss_histories), "loss_curves.png")
    return {title: save_figure(fig, Path(folder) / name) for title, (fig, name) in figures.items()}


def write_evaluation_report(evaluation: Evaluation, judges: Judges, layout: Layout, config: ProjectConfig,
                            loss_histories: dict[str, list[float]], report_dir: Path) -> dict[str, object]:
    """``metrics.csv`` (one row per method, run and subject; one column per metric), ``qa_ablation.csv``, the
    figures and the report page; returns the summary, the paired differences and the paths."""
    rows = evaluation.rows
    write_csv(rows, report_dir / "metrics.csv")
    if evaluation.qa_ablation:
        write_csv(evaluation.qa_ablation, report_dir / "qa_ablation.csv")
    summary, paired, qa_paired = summarize(rows), paired_differences(rows), qa_differences(rows)
    figures = report_figures(evaluation, summary, paired, layout, judges.scorer, config, loss_histories,
                             report_dir / "figures")
    tables = {"Paired difference to the baseline (same scene and seed; mean over pictures ± 95 % interval)":
              paired_table(paired),
              "The QA loop against ours and against the same passes spent as plain re-rolls (paired)":
              paired_table(qa_paired),
              "Means per method (± 95 % interval over pictures)": summary_table(summary)}
    scenes = sorted({(r.scene_index, r.scene) for r in evaluation.runs})
    seeds = sorted({r.seed for r in evaluation.runs})
    notes = [f"{len(evaluation.runs)} runs: {len(scenes)} scene(s) × {len(seeds)} seed(s) "
             f"({seeds[0]}–{seeds[-1]}); every method made on the same (scene, seed); metrics.csv has one row per "
             f"method, run and subject.",
             *[f"scene {i}: {scene!r}" for i, scene in scenes],
             "Each subject is measured on its own pixels: its region's support without any other region's, the rest "
             "of its crop painted with the scene's background colour (never a box that holds its neighbour).",
             "Pictures are the unit of the intervals (a picture's subjects are averaged first); paired differences "
             "use Student's t over the pictures' differences.",
             *metric_definitions(judges)]
    html_path, md_path = write_report(report_dir, config, tables, figures, notes)
    return {"summary": summary, "paired": paired, "qa_paired": qa_paired, "figures": figures, "html": html_path,
            "markdown": md_path}


def _profile_banner(config: ProjectConfig) -> str:
    if config.profile == "sdxl":
        return "Profile: sdxl (real SDXL weights). Scores below measure these images."
    if config.profile == "world":
        return ("Profile: world. Small SDXL-architecture models and a CLIP scorer trained on a procedurally rendered "
                "world (models/world/MODEL_CARD.md): the pictures and scores are real measurements within that world, "
                "not of SDXL.")
    return (f"PROFILE: {config.profile.upper()}. The images come from RANDOM WEIGHTS and the scores mean NOTHING about "
            f"quality; this report only shows that the whole pipeline runs and its invariants hold. Run the series "
            f"on a GPU with the sdxl profile for real results.")


def write_report(folder: Path, config: ProjectConfig, tables: dict[str, str], figures: dict[str, Path],
                 notes: list[str]) -> tuple[Path, Path]:
    """``index.html`` (opens offline; images referenced by relative path beside it) and ``report.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    rel = {title: Path(path).relative_to(folder).as_posix() for title, path in figures.items()}
    banner = _profile_banner(config)
    md = ["# Multi-subject SDXL report", "", f"> **{banner}**", "", "## Config", "", "```", config.summary(), "```"]
    for title, table in tables.items():
        md += ["", f"## {title}", "", table]
    for title, path in rel.items():
        md += ["", f"## {title}", "", f"![{title}]({path})"]
    md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md_path = folder / "report.md"
    write_text_atomic(md_path, "\n".join(md) + "\n")

    warn_class = "ok" if config.profile in ("sdxl", "world") else "warn"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Multi-subject SDXL report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
        ".warn{background:#fff3cd;border:2px solid #e0a800;padding:1em;font-weight:bold;font-size:1.1em}",
        ".ok{background:#e7f5e9;border:2px solid #3cb44b;padding:1em}",
        "table{border-collapse:collapse;margin:0.5em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px}",
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}pre{background:#f6f6f6;"
        "padding:0.8em}figure{margin:1.5em 0}figcaption{font-weight:bold}",
        "</style></head><body><h1>Multi-subject SDXL report</h1>",
        f"<div class='{warn_class}' id='profile-banner'>{html.escape(banner)}</div>",
        f"<h2>Config</h2><pre>{html.escape(config.summary())}</pre>",
    ]
    for title, table in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_markdown_table_to_html(table)}")
    for title, path in rel.items():
        parts.append(f"<figure><figcaption>{html.escape(title)}</figcaption>"
                     f"<img src='{html.escape(path)}' alt='{html.escape(title)}'></figure>")
    parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append(f"<script type='application/json' id='report-data'>{json.dumps({'figures': rel})}</script>")
    parts.append("</body></html>")
    html_path = folder / "index.html"
    write_text_atomic(html_path, "\n".join(parts))
    return html_path, md_path


def _markdown_table_to_html(table: str) -> str:
    lines = [l for l in table.strip().splitlines() if l.strip().startswith("|")]
    if len(lines) < 2:
        return f"<p>{html.escape(table)}</p>"
    cells = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[2:])
    return f"<table><tr>{head}</tr>{body}</table>"
