"""Files that are either complete or absent: every write goes to a temp file beside its target and replaces the
target in one rename, so a crash, a kill or a full disk never leaves half a file (or destroys the previous one)."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from .config import ProjectConfig

TEMP_MARK = ".tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` (same suffix, so writers infer the format); when the block succeeds it replaces
    ``path`` in one rename; on error the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}{TEMP_MARK}{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2))


def save_image_atomic(image: Image.Image, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp)
    return Path(path)


def write_notebook_atomic(notebook, path: str | Path) -> Path:
    import nbformat

    with atomic_path(path) as tmp:
        nbformat.write(notebook, str(tmp))
    return Path(path)


def save_config(config: ProjectConfig, path: str | Path | None = None) -> Path:
    """``<output>/config.json`` unless told otherwise; the next notebook starts from it."""
    return write_text_atomic(Path(path) if path else config.config_file, config.to_json())


def load_config(path: str | Path) -> ProjectConfig:
    path = Path(path)
    return ProjectConfig.from_json(path.read_text(), source=str(path))
