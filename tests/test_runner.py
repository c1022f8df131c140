import io
import json

import nbformat

from helpers.run import CHECK_MARK, NOTEBOOKS_DIR, clean_notebook, parse_value, run_series, series_notebooks


def _notebook(path, sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells = [nbformat.v4.new_code_cell("x = 1")]
    cells[0].metadata["tags"] = ["parameters"]
    nb.cells = cells + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)


def test_runner_stops_at_the_failing_notebook_and_names_the_cell(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _notebook(folder / "00_ok.ipynb", ["print(x)"])
    _notebook(folder / "01_bad.ipynb", ["y = x + 1", "raise RuntimeError('boom in cell two')"])
    _notebook(folder / "02_never.ipynb", ["print('unreachable')"])
    out = io.StringIO()
    runs, code = run_series(folder, str(tmp_path / "out"), parameters={"x": 5}, progress=False, stream=out)
    text = out.getvalue()
    assert code == 1 and [r.name for r in runs] == ["00_ok.ipynb", "01_bad.ipynb"]
    assert "FAILED: 01_bad.ipynb, cell" in text and "RuntimeError: boom in cell two" in text
    assert str(tmp_path / "out" / "executed" / "01_bad.ipynb") in text
    executed = nbformat.read(tmp_path / "out" / "executed" / "00_ok.ipynb", 4)
    assert any("5" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))  # -p reached it


def test_parse_value():
    assert parse_value("4") == 4 and parse_value("True") is True and parse_value("a cat") == "a cat"
    assert parse_value("0.5") == 0.5


def test_series_has_six_notebooks_with_parameters_badge_and_profile():
    notebooks = series_notebooks(NOTEBOOKS_DIR)
    assert [p.name[:2] for p in notebooks] == ["00", "01", "02", "03", "04", "05"]
    for path in notebooks:
        nb = nbformat.read(path, 4)
        assert "colab-badge.svg" in nb.cells[0].source, path.name
        assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1, path.name
        assert any("notebook_config(" in c.source for c in nb.cells), path.name  # prints the profile
        assert any(CHECK_MARK in c.source for c in nb.cells), path.name


def test_notebooks_in_git_are_clean():
    for path in series_notebooks(NOTEBOOKS_DIR):
        nb = nbformat.read(path, 4)
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            assert cell.execution_count == (1 if CHECK_MARK in cell.source else None), path.name
            for output in cell.outputs:
                assert CHECK_MARK in cell.source and output["output_type"] == "stream", path.name
        assert json.dumps(nbformat.writes(clean_notebook(nbformat.read(path, 4)))) == \
            json.dumps(nbformat.writes(nb)), f"{path.name}: run `python -m helpers clean-notebooks`"


def test_checked_cells_have_stored_output():
    for path in series_notebooks(NOTEBOOKS_DIR):
        nb = nbformat.read(path, 4)
        for cell in nb.cells:
            if cell.cell_type == "code" and CHECK_MARK in cell.source:
                assert cell.outputs, f"{path.name}: a checked cell without stored output checks nothing"


def test_notebook_only_journey_trains_and_composes_a_subject_the_repository_does_not_ship(tmp_path):
    """Subjects and photos passed as notebook parameters (as a Colab user sets them in the parameters cell or
    uploads them), nothing edited by hand: the third subject is trained and painted into its own region."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rocket = Image.fromarray(skimage.data.rocket())
    paths = []
    for i, box in enumerate([(0, 0, 400, 400), (100, 27, 500, 427), (200, 0, 600, 400)]):
        path = tmp_path / f"upload_{i}.png"
        rocket.crop(box).resize((256, 256)).save(path)
        paths.append(str(path))
    subjects = [{"name": "cat", "token": "sks", "class_name": "cat"}, {"name": "mug", "token": "zwx", "class_name": "mug"},
                {"name": "rocket", "token": "qwe", "class_name": "rocket", "data_dir": str(tmp_path / "rocket")}]
    out = io.StringIO()
    runs, code = run_series(NOTEBOOKS_DIR, str(tmp_path / "out"), "tiny",
                            {"subjects": subjects, "photos": {"rocket": paths},
                             "scene_prompt": "a cat, a mug and a rocket on a wooden table, soft window light"},
                            only=["00", "01", "02", "03"],
                            progress=False, stream=out)
    assert code == 0, out.getvalue()
    assert len(list((tmp_path / "rocket").glob("rocket_*.png"))) == 3
    assert (tmp_path / "out" / "loras" / "rocket" / "pytorch_lora_weights.safetensors").exists()
    result = json.loads((tmp_path / "out" / "coarse_to_fine" / "result.json").read_text())
    assert [p["subject"] for p in result["passes"]] == ["cat", "mug", "rocket"]
    assert [p["active_adapters"] for p in result["passes"]] == [["cat"], ["mug"], ["rocket"]]
    assert result["passes"][2]["prompt"] == "a qwe rocket on a wooden table, soft window light"
    assert np.asarray(Image.open(tmp_path / "out" / "coarse_to_fine" / "composite.png")).shape == (64, 64, 3)


def test_unknown_parameters_are_refused_with_the_closest_names(tmp_path):
    out = io.StringIO()
    runs, code = run_series(NOTEBOOKS_DIR, str(tmp_path / "out"), "tiny", {"stepz": 30}, progress=False, stream=out)
    assert (runs, code) == ([], 2)
    assert out.getvalue().strip() == "unknown parameter 'stepz' (did you mean steps?): nothing was run"
    assert not (tmp_path / "out" / "executed").exists() or not any((tmp_path / "out" / "executed").iterdir())


def test_only_accepts_numbers_with_or_without_zero_and_names():
    from helpers.run import select_notebooks
    notebooks = series_notebooks(NOTEBOOKS_DIR)
    assert [p.name[:2] for p in select_notebooks(notebooks, ["3", "00", "05_evaluation_and_figures"])] == \
        ["00", "03", "05"]
    assert "no such notebook" in select_notebooks(notebooks, ["9"])
