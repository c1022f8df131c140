"""The notebooks' install cell must leave Colab's kernel and front end exactly as they are."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import install
from helpers.config import PROJECT_ROOT

COLAB_PINS = PROJECT_ROOT / "constraints" / "colab-gpu.txt"  # Colab's published versions
JUPYTER_FAMILY = ("ipykernel", "ipython", "ipywidgets", "jupyter_client", "jupyter_core", "jupyter_server",
                  "nbclient", "nbformat", "notebook", "tornado", "traitlets", "widgetsnbextension")


def colab_pins() -> dict[str, str]:
    pins = {}
    for line in COLAB_PINS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[install._normalize(name)] = version.strip()
    return pins


def test_runtime_requirements_leave_the_jupyter_stack_to_the_extras():
    names = {install._normalize(r.split(">")[0].split("=")[0].split("[")[0]) for r in install.runtime_requirements()}
    assert not names & {"jupyterlab", "ipykernel", "papermill", "nbval", "playwright", "notebook", "jupyter-server"}
    assert "ipywidgets" in names  # the designer needs it, and Colab's 7.7.1 satisfies the range


def test_plan_installs_only_what_is_missing_and_never_upgrades():
    installed = colab_pins()
    missing, notes = install.plan(["diffusers>=0.37", "open_clip_torch>=2.24", "ipywidgets>=8.0", "tornado"],
                                  installed)
    assert missing == ["open_clip_torch>=2.24"]
    assert len(notes) == 1 and notes[0].startswith("ipywidgets 7.7.1 is older than the 8.0") and "left as it is" in notes[0]


def _freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--path",
                          subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                         capture_output=True, text=True, check=True).stdout.strip()],
                         capture_output=True, text=True, check=True).stdout
    return {install._normalize(p["name"]): p["version"] for p in json.loads(out)}


@pytest.mark.skipif(os.environ.get("HELPERS_SKIP_NETWORK_TESTS") == "1", reason="HELPERS_SKIP_NETWORK_TESTS=1")
def test_installing_into_colabs_jupyter_pins_changes_none_of_them(tmp_path):
    """A venv holding Colab's jupyter-family pins (from PyPI), with this environment's ML libraries visible behind
    them the way Colab has its own; then both ways a user installs the project: the notebooks' install cell and a
    plain ``pip install -e``. Every pinned version must be the same afterwards."""
    pins = colab_pins()
    family = {name: pins[install._normalize(name)] for name in JUPYTER_FAMILY}
    venv = tmp_path / "colab"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *(f"{n}=={v}" for n, v in family.items())], check=True, timeout=600)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "zz_colab_ml_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = _freeze(python)
    assert {n: before[install._normalize(n)] for n in family} == family
    cell = "import sys; sys.path.insert(0, sys.argv[1]); import helpers.install as i; i.ensure_installed(quiet=True)"
    subprocess.run([str(python), "-c", cell, str(PROJECT_ROOT)], check=True, timeout=600)
    subprocess.run([*pip, "-e", str(PROJECT_ROOT)], check=True, timeout=600)
    after = _freeze(python)
    changed = {n: (before[install._normalize(n)], after.get(install._normalize(n))) for n in family
               if after.get(install._normalize(n)) != before[install._normalize(n)]}
    assert not changed, f"the install changed Colab's pins: {changed}"
