"""The environment `make test-colab` builds must really hold Colab's versions, or its passing proves nothing."""
from importlib.metadata import PackageNotFoundError, version

import pytest

from helpers.config import PROJECT_ROOT

PINS = PROJECT_ROOT / "constraints" / "colab-gpu.txt"
SHARED_PINS = PROJECT_ROOT.parent / "shared" / "colab-gpu-pins.txt"


def pins() -> dict[str, str]:
    return dict(line.split("==") for line in PINS.read_text().splitlines() if "==" in line and not line.startswith("#"))


def test_the_constraints_file_is_colabs_published_list():
    if not SHARED_PINS.exists():
        pytest.skip(f"{SHARED_PINS} is not beside the repository here")
    assert PINS.read_text() == SHARED_PINS.read_text()


def test_running_on_colabs_versions_when_asked():
    """In `make test-colab` every pinned package this project imports is at Colab's version; elsewhere this skips."""
    try:
        on_colab_pins = version("notebook").startswith("6.") and version("ipywidgets") == pins()["ipywidgets"]
    except PackageNotFoundError:
        on_colab_pins = False
    if not on_colab_pins:
        pytest.skip("not the Colab-pins environment (`make test-colab` builds it)")
    wanted = {name: v for name, v in pins().items() if name in {
        "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "ipywidgets", "ipykernel", "notebook",
        "safetensors", "tokenizers", "numpy", "pillow"}}
    found = {name: version(name) for name in wanted}
    assert found == wanted
