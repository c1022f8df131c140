"""Files that are either complete or absent: every write goes to a temp file beside its target and replaces the
target in one rename, so a crash, a kill or a full disk never leaves half a file (or destroys the previous one)."""
from __future__ import annotations

import json
import os
import shutil
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


def set_aside(path: str | Path, why: str) -> Path:
    """Rename a damaged file or folder to ``<name>.damaged-<time>`` beside it (kept for inspection, never deleted)
    and return the new path; ``why`` goes into the one line that says so."""
    import time
    import warnings

    path = Path(path)
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    os.replace(path, target)
    warnings.warn(f"{path}: {why} (the old one is kept as {target.name})", stacklevel=2)
    return target


@contextmanager
def temp_folder(target: str | Path) -> Iterator[Path]:
    """An empty folder beside ``target``, named like the temp files (``.<name>.tmp<pid>``) so that one a killed
    process leaves behind is swept at the next start like them; removed when the block ends."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def leftover_temp_files(folder: str | Path) -> list[Path]:
    """Temp files and folders that a killed process left behind under ``folder`` (``.<name>.tmp<pid>[<suffix>]``
    whose process is gone; a live writer's are left alone)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob(f".*{TEMP_MARK}*") if not _pid_alive(p)]
    return [p for p in found if not any(q in p.parents for q in found)]  # not what lies inside a found folder


def _pid_alive(temp_file: Path) -> bool:
    digits = temp_file.name.split(TEMP_MARK, 1)[1].split(".", 1)[0]
    if not digits.isdigit():
        return False
    try:
        os.kill(int(digits), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftover_temp_files(folder: str | Path) -> int:
    """Remove what ``leftover_temp_files`` finds; returns how many."""
    found = leftover_temp_files(folder)
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(found)


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


def save_safetensors_atomic(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``tensors`` as a safetensors file, written atomically, the same bytes for the same tensors and metadata:
    safetensors writes its metadata map in an order that changes from process to process, so the header's metadata
    is put in key order (a rerun after an interruption must give the file an uninterrupted run gives)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # the same entries reordered: as long as before, padded as safetensors pads
            data = data[:8] + text + b" " * (length - len(text)) + data[8 + length:]
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
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
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (config files are JSON); fix it or delete it") from None
    return ProjectConfig.from_json(text, source=str(path))
