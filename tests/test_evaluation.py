import json

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from helpers import evaluation as he
from helpers import measures as ms
from helpers.layout import default_layout, masks


def test_leakage_matrix_rows_are_the_scorers_identity_on_each_subjects_own_pixels(tiny_config):
    from helpers.scoring import ClipScorer
    rng = np.random.default_rng(3)
    refs = {n: [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
            for n in ("cat", "mug")}
    scorer = ClipScorer.for_config(tiny_config, references=refs)
    image = Image.new("RGB", (64, 64))
    image.paste(refs["cat"][0], (0, 0))
    m = masks(default_layout(["cat", "mug"], 64, 64), 64, 64, 2)
    matrix = he.leakage_matrix(scorer, image, m, ["cat", "mug"])
    crops = ms.own_crops(image, m, ["cat", "mug"])
    expected = [[scorer.identity(crops[r], s) for s in ("cat", "mug")] for r in ("cat", "mug")]
    np.testing.assert_allclose(matrix, expected, rtol=1e-5)


def test_outside_mask_invariant_detects_one_pixel():
    m = masks(default_layout(["cat", "mug"], 64, 64), 64, 64, 2)
    coarse = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    inside = np.asarray(coarse).copy()
    inside[m.support["cat"]] = 0
    assert he.outside_mask_max_diff(Image.fromarray(inside), coarse, m) == 0
    changed = np.asarray(coarse).copy()
    y, x = np.argwhere(~m.union_dilated)[0]
    changed[y, x, 1] = (int(changed[y, x, 1]) + 7) % 256
    assert he.outside_mask_max_diff(Image.fromarray(changed), coarse, m) == 7


def _rows(values: dict[str, list[float]], metric="identity", subjects=("cat", "mug")):
    """Rows of ``method`` for pictures 0..n-1; each picture's subjects get value ± 0.1 (their mean is the value)."""
    rows = []
    for method, per_picture in values.items():
        for seed, v in enumerate(per_picture):
            for k, subject in enumerate(subjects):
                rows.append({"method": method, "scene_index": 0, "seed": seed, "subject": subject,
                             metric: v + (0.1 if k == 0 else -0.1), "seconds": 1.0})
    return rows


def test_paired_differences_are_over_pictures_with_a_t_interval():
    base, ours = [0.1, 0.3, 0.2, 0.5], [0.4, 0.5, 0.6, 0.6]
    rows = _rows({"baseline": base, "ours": ours, "ours+qa": [x + 0.05 for x in ours]})
    paired = {p["method"]: p for p in he.paired_differences(rows)}
    d = np.array(ours) - np.array(base)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert paired["ours"]["identity_diff"] == pytest.approx(d.mean())
    assert paired["ours"]["identity_ci95"] == pytest.approx(half)
    assert paired["ours"]["identity_n"] == 4  # pictures, not regions
    assert paired["ours+qa"]["identity_diff"] == pytest.approx(d.mean() + 0.05)
    assert paired["ours+qa"]["identity_ci95"] == pytest.approx(half)  # a constant shift keeps the spread
    table = he.paired_table(list(paired.values()))
    assert f"| ours − baseline | {d.mean():+.3f} ± {half:.3f} (n=4) |" in table


def test_paired_differences_pair_only_the_same_scene_and_seed():
    rows = _rows({"baseline": [0.0, 1.0], "ours": [0.5]})  # ours only has picture 0
    (entry,) = he.paired_differences(rows)
    assert entry["identity_n"] == 1 and entry["identity_diff"] == pytest.approx(0.5)


def test_an_ablation_pairs_each_method_with_itself_in_the_base_and_reads_metrics_csv_back(tmp_path, capsys):
    from helpers.run import main

    base = _rows({"ours": [0.3, 0.4, 0.5], "ours+qa": [0.4, 0.5, 0.6]})
    variant = _rows({"ours": [0.3, 0.4, 0.5], "ours+qa": [0.3, 0.5, 0.4]})
    for name, rows in (("base", base), ("variant", variant)):
        he.write_csv(rows, tmp_path / name / "report" / "metrics.csv")
    rows = he.ablation_differences(he.read_metrics(tmp_path / "base"), {"v": he.read_metrics(tmp_path / "variant")})
    by_method = {r["method"]: r for r in rows}
    assert by_method["ours [v]"]["identity_diff"] == pytest.approx(0.0)
    assert by_method["ours+qa [v]"]["identity_diff"] == pytest.approx(-0.1)
    assert by_method["ours+qa [v]"]["identity_n"] == 3
    assert main(["compare", str(tmp_path / "base"), f"v={tmp_path / 'variant'}"]) == 0
    mugs_better = [{**r, "identity": r["identity"] + 0.3 * (r["subject"] == "mug")} for r in variant]
    he.write_csv(mugs_better, tmp_path / "mugs" / "report" / "metrics.csv")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "base"), f"m={tmp_path / 'mugs'}", "--by-subject"]) == 0
    overall, cat, mug = capsys.readouterr().out.strip().split("\n\n")
    assert cat.startswith("cat:") and mug.startswith("mug:")
    assert "| ours+qa [m] − ours+qa | +0.050 ± " in overall  # a picture's identity: the mean of its two subjects
    assert "| ours+qa [m] − ours+qa | -0.100 ± " in cat and "| ours+qa [m] − ours+qa | +0.200 ± " in mug
    he.write_csv(_rows({"ours": [0.3], "ours+qa": [0.4]}), tmp_path / "short" / "report" / "metrics.csv")
    with pytest.raises(ValueError, match="other \\(scene, seed\\) pairs"):
        he.ablation_differences(base, {"short": he.read_metrics(tmp_path / "short")})
    assert main(["compare", str(tmp_path / "base"), f"short={tmp_path / 'short'}"]) == 2


def test_summary_means_over_pictures_and_tables():
    rows = _rows({"baseline": [0.2, 0.4], "ours": [0.5, 0.5]})
    summary = he.summarize(rows)
    assert [s["method"] for s in summary] == ["baseline", "ours"]
    assert summary[0]["identity_mean"] == pytest.approx(0.3) and summary[0]["pictures"] == 2
    assert summary[0]["identity_ci95"] == pytest.approx(stats.t.ppf(0.975, 1) * np.std([0.2, 0.4], ddof=1) / np.sqrt(2))
    assert "| baseline | 2 | 0.300 ± " in he.summary_table(summary)
    assert "dino_mean" not in summary[0]
    assert "dino_mean" in he.summarize([{**r, "dino": 0.8} for r in rows])[0]


def test_report_references_only_existing_images_and_states_the_profile(tmp_path, tiny_config):
    import re

    from helpers import figures as hf
    fig = hf.image_grid([Image.new("RGB", (8, 8))], ["x"])
    figs = {"grid": hf.save_figure(fig, tmp_path / "figures" / "grid.png")}
    html_path, md_path = hf.write_report(tmp_path, tiny_config, {"t": "| a | b |\n|---|---|\n| 1 | 2 |"}, figs, ["n"])
    html = html_path.read_text()
    sources = re.findall(r"<img src='([^']+)'", html)
    assert sources == ["figures/grid.png"] and all((tmp_path / s).exists() for s in sources)
    assert "RANDOM WEIGHTS" in html and "RANDOM WEIGHTS" in md_path.read_text()
    assert "<td>1</td>" in html


# -- the evaluation end to end on the tiny profile: files, columns, resuming ----------------------------------------
@pytest.fixture(scope="module")
def evaluation_models(tiny_config):
    """A bundle of its own: the session's bundle stays free of adapters for the tests that load damaged LoRAs."""
    from helpers.adapters import load_subject_loras
    from helpers.models import load_models
    from helpers.training import run_training

    models = load_models(tiny_config)
    run_training(tiny_config, models=models, progress=False)
    load_subject_loras(models, tiny_config)
    return models


@pytest.fixture(scope="module")
def evaluated(evaluation_models, tiny_config, tmp_path_factory):
    from helpers.scoring import ClipScorer

    tiny_models = evaluation_models
    config = tiny_config.replace(max_retries=1)
    layout = default_layout(config.subject_names, config.resolution, config.resolution)
    judges = he.Judges.for_config(config, ClipScorer.for_config(config))
    folder = tmp_path_factory.mktemp("evaluation")
    scenes = [config.scene_prompt, "a cat left of a mug on grass, cool light"]
    seeds = [config.eval_seed_start, config.eval_seed_start + 1]
    evaluation = he.run_evaluation(tiny_models, config, layout, judges, folder, scenes, seeds, progress=None)
    return config, layout, judges, folder, scenes, seeds, evaluation


def test_every_method_runs_on_the_same_scene_and_seed_and_every_metric_is_a_column(evaluated):
    from helpers import figures as hf
    from helpers.training import loss_histories

    config, layout, judges, folder, scenes, seeds, evaluation = evaluated
    rows = evaluation.rows
    assert len(rows) == len(scenes) * len(seeds) * len(he.METHODS) * len(config.subjects)
    pairs = {m: sorted({(r["scene_index"], r["seed"]) for r in rows if r["method"] == m}) for m in he.METHODS}
    assert all(pairs[m] == pairs["baseline"] for m in he.METHODS) and len(pairs["ours"]) == 4
    run = evaluation.runs[-1]
    assert run.prompts["baseline"] == "a sks cat left of a zwx mug on grass, cool light"
    assert all("grass, cool light" in p for p in run.prompts["passes"].values())
    report = hf.write_evaluation_report(evaluation, judges, layout, config, loss_histories(config), folder / "report")
    header = (folder / "report" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert [m for m in he.METRICS if m != "dino"] == [m for m in he.METRICS if m in header]
    markdown = report["markdown"].read_text()
    assert "ours − baseline" in markdown and "ours+qa − baseline" in markdown and "(n=4)" in markdown
    assert "ours+qa − ours |" in markdown and "ours+qa − ours+reroll" in markdown
    assert "not measured on this profile: light_error, dino" in markdown
    assert all(path.exists() for path in report["figures"].values())


def test_stored_runs_are_remade_when_the_world_weights_change(tiny_config, tmp_path, monkeypatch):
    import helpers.models as hm

    weights = tmp_path / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"decoder 1")
    monkeypatch.setattr(hm, "WORLD_DIR", tmp_path)
    world, tiny = tiny_config.replace(profile="world"), tiny_config
    layout = default_layout(tiny.subject_names, tiny.resolution, tiny.resolution)
    before = {c.profile: he.evaluation_fingerprint(c, layout) for c in (world, tiny)}
    weights.write_bytes(b"decoder 2")  # a retrained decoder draws other pictures from the same LoRAs
    after = {c.profile: he.evaluation_fingerprint(c, layout) for c in (world, tiny)}
    assert after["world"] != before["world"] and after["tiny"] == before["tiny"]


def test_an_interrupted_evaluation_continues_and_a_changed_setting_is_measured_again(evaluated, evaluation_models):
    tiny_models = evaluation_models
    config, layout, judges, folder, scenes, seeds, first = evaluated
    again = he.run_evaluation(tiny_models, config, layout, judges, folder, scenes, seeds, progress=None)
    assert again.reused == 4 and json.dumps(again.rows) == json.dumps(first.rows)  # (nan != nan in a dict)
    damaged = folder / "runs" / f"scene1_seed{seeds[0]}.json"
    damaged.write_text(damaged.read_text()[:50])
    (folder / "runs" / f"scene0_seed{seeds[1]}.json").unlink()
    resumed = he.run_evaluation(tiny_models, config, layout, judges, folder, scenes, seeds, progress=None)
    assert resumed.reused == 2 and json.loads(damaged.read_text())["seed"] == seeds[0]
    assert [r["identity"] for r in resumed.rows] == pytest.approx([r["identity"] for r in first.rows])
    changed = he.run_evaluation(tiny_models, config.replace(inpaint_strength=0.6), layout, judges, folder,
                                scenes[:1], seeds[:1], progress=None)
    assert changed.reused == 0
