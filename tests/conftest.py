from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT, ProjectConfig
from helpers.models import load_models
from helpers.notebook import make_config


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def tiny_config(session_dir) -> ProjectConfig:
    """Tiny profile, outputs in a session folder, a short training run so LoRA tests stay fast."""
    return make_config("tiny", output_dir=str(session_dir / "out"), train_steps=6, checkpoint_every=3)


@pytest.fixture(scope="session")
def tiny_models(tiny_config):
    return load_models(tiny_config)


@pytest.fixture(scope="session")
def trained(tiny_config, tiny_models):
    """Both demo subjects trained once and loaded as adapters."""
    from helpers.adapters import load_subject_loras
    from helpers.training import run_training

    reports = run_training(tiny_config, models=tiny_models, progress=False)
    load_subject_loras(tiny_models, tiny_config)
    return reports


@pytest.fixture
def subject_dir(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    return folder


@pytest.fixture
def demo_photos(tmp_path) -> Path:
    """A private copy of the demo data, for tests that change photos."""
    target = tmp_path / "data"
    shutil.copytree(PROJECT_ROOT / "data", target, ignore=shutil.ignore_patterns("*.md"))
    return target


class UnetAdapterSpy:
    """Records, at every UNet forward call, which adapters really are active (observed on the UNet's peft layers,
    not taken from what the code under test reports about itself)."""

    def __init__(self, models):
        self.models, self.calls = models, []

    def __enter__(self):
        from helpers.adapters import active_adapters

        self.handle = self.models.unet.register_forward_pre_hook(
            lambda *_: self.calls.append(tuple(active_adapters(self.models))))
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def runs(self) -> list[tuple[str, ...]]:
        """Consecutive calls with the same active set, collapsed: [(), ("cat",), ("mug",)] for coarse-to-fine."""
        return [c for i, c in enumerate(self.calls) if i == 0 or c != self.calls[i - 1]]


@pytest.fixture
def unet_spy(tiny_models):
    with UnetAdapterSpy(tiny_models) as spy:
        yield spy


@pytest.fixture(scope="session")
def corner_layout(tiny_config):
    """Two regions in opposite corners: their crop boxes do not overlap, so their passes can be batched exactly."""
    from helpers.layout import Layout, Region

    side = tiny_config.resolution
    return Layout([Region("cat", 0.03, 0.03, 0.3, 0.36), Region("mug", 0.64, 0.58, 0.3, 0.36)], side, side)
