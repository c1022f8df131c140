"""The designer's Python side, on the installed ipywidgets (8.x) and on Colab's 7.7.1 (installed aside)."""
import json
import subprocess
import sys
import textwrap

import pytest

from helpers.config import PROJECT_ROOT

CHECK = textwrap.dedent("""
    import ipywidgets, json, sys
    from pathlib import Path
    from helpers.designer import LayoutDesigner
    path = Path(sys.argv[1])
    d = LayoutDesigner(["cat", "mug"], save_path=path)
    before = d.preview.value
    d.set_region("cat", x=0.12)
    assert d.preview.value != before and d.layout.region("cat").x == 0.12
    assert "layout is valid" in d.message.value and not d.save_button.disabled
    assert d.save() == path and json.loads(path.read_text())["regions"][0]["x"] == 0.12
    d.set_region("mug", x=0.1, shape="box")  # now overlapping the cat
    assert d.save_button.disabled and "overlap by" in d.message.value and d.save() is None
    assert json.loads(path.read_text())["regions"][1]["x"] != 0.1  # a refused save leaves the file alone
    print(ipywidgets.__version__)
""")


def _run(tmp_path, extra_path=None):
    env_path = [str(extra_path)] if extra_path else []
    code = f"import sys; sys.path[:0] = {env_path!r}\n" + CHECK
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "layout.json")], capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=120)


def test_designer_edits_validates_and_saves(tmp_path):
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("8.")


def test_designer_on_ipywidgets_7_7(tmp_path):
    target = tmp_path / "ipywidgets7"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              "ipywidgets==7.7.1", "ipython_genutils"], capture_output=True, text=True, timeout=300)
    if install.returncode != 0:
        pytest.skip(f"could not install ipywidgets 7.7.1 aside: {install.stderr.strip()[-300:]}")
    out = _run(tmp_path, target)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7.7.1"
    assert json.loads((tmp_path / "layout.json").read_text())["regions"][0]["x"] == 0.12
