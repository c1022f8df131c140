import numpy as np
import pytest
from PIL import Image

from helpers import evaluation as he
from helpers.layout import default_layout, masks


def test_leakage_matrix_rows_follow_the_scorers_identity_and_swap_with_the_crops(tiny_config):
    from helpers.scoring import ClipScorer
    rng = np.random.default_rng(3)
    refs = {n: [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
            for n in ("cat", "mug")}
    scorer = ClipScorer.for_config(tiny_config, references=refs)
    image = Image.new("RGB", (64, 64))
    image.paste(refs["cat"][0], (0, 0))
    m = masks(default_layout(["cat", "mug"], 64, 64), 64, 64, 2)
    matrix = he.leakage_matrix(scorer, image, m, ["cat", "mug"], 0.15)
    crops = he.region_crops(image, m, ["cat", "mug"], 0.15)
    expected = [[scorer.identity(crops[r], s) for s in ("cat", "mug")] for r in ("cat", "mug")]
    np.testing.assert_allclose(matrix, expected, rtol=1e-5)
    assert scorer.leakage_row(crops["cat"], "cat") == pytest.approx(dict(zip(("cat", "mug"), expected[0])))


def test_leakage_matrix_of_swapped_crops_is_transposed():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1, 16)), rng.normal(size=(1, 16))
    m = he.leakage_matrix_from_embeddings({"cat": a, "mug": b}, {"cat": b, "mug": a})
    swapped = he.leakage_matrix_from_embeddings({"cat": b, "mug": a}, {"cat": a, "mug": b})
    np.testing.assert_allclose(swapped, m.T)
    same = he.leakage_matrix_from_embeddings({"cat": a, "mug": b}, {"cat": a, "mug": b})
    np.testing.assert_allclose(np.diag(same), [1.0, 1.0])


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


def test_summary_and_tables(tmp_path):
    rows = [{"method": meth, "clip_i": v, "clip_t": 0.1, "leak_max_other": 0.2, "seconds": 1.0}
            for meth, v in [("baseline", 0.2), ("baseline", 0.4), ("ours", 0.5), ("ours+qa", 0.7)]]
    summary = he.summarize(rows)
    assert [s["method"] for s in summary] == ["baseline", "ours", "ours+qa"]
    assert abs(summary[0]["clip_i_mean"] - 0.3) < 1e-9 and abs(summary[0]["clip_i_std"] - 0.1) < 1e-9
    table = he.markdown_table(summary)
    assert table.splitlines()[0].startswith("| method | n | runs | clip_i_mean")
    assert summary[0]["clip_i_ci95"] == pytest.approx(1.96 * 0.1 / np.sqrt(2))
    assert "| baseline | 1 | 2 | 0.300 ± 0.139 |" in he.summary_table(summary)
    path = he.write_csv(rows, tmp_path / "m.csv")
    assert path.read_text().splitlines()[0] == "method,clip_i,clip_t,leak_max_other,seconds"


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


def test_summary_includes_dino_only_when_measured():
    rows = [{"method": "ours", "clip_i": 0.5, "clip_t": 0.1, "leak_max_other": 0.2, "seconds": 1.0}]
    assert "dino_mean" not in he.summarize(rows)[0]
    assert he.summarize([{**rows[0], "dino": 0.8}])[0]["dino_mean"] == 0.8
