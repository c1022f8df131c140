"""The notebooks' first cell: install what the project needs and the runtime lacks, and nothing else.

Colab's kernel, front end and their libraries (ipykernel, jupyter_client, tornado, notebook, ipywidgets, ...) are
already imported when the cell runs; upgrading them breaks the running session in ways pip does not report (it prints
a dependency ERROR and exits 0). So: every distribution already installed is pinned to its installed version while
the missing ones are installed; a requirement that is present but older than the project asks is reported, not
upgraded; the project itself is installed without dependencies. Standard library only (this runs before the
project's dependencies exist).
"""
from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")


def runtime_requirements(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> list[str]:
    """``[project] dependencies`` of the pyproject (no extras)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import pip._vendor.tomli as tomllib  # type: ignore[no-redef]
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _minimum(spec: str) -> str | None:
    match = re.search(r">=\s*([0-9][0-9.]*)", spec)
    return match.group(1) if match else None


def installed_versions() -> dict[str, str]:
    return {_normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def plan(requirements: list[str], installed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(requirements to install because they are missing, notes on present ones older than asked for)."""
    missing, too_old = [], []
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if not match:
            continue
        name, spec = _normalize(match.group(1)), match.group(2)
        if name not in installed:
            missing.append(requirement)
        elif (minimum := _minimum(spec)) and _version_tuple(installed[name]) < _version_tuple(minimum):
            too_old.append(f"{name} {installed[name]} is older than the {minimum} this project is tested with; "
                           f"left as it is (upgrade it yourself and restart the runtime if something fails)")
    return missing, too_old


def ensure_installed(root: Path = PROJECT_ROOT, quiet: bool = True) -> list[str]:
    """Install the missing requirements (every installed distribution held at its version) and the project without
    dependencies; returns what was installed. Prints one line per action and whether a restart is needed."""
    installed = installed_versions()
    missing, too_old = plan(runtime_requirements(root / "pyproject.toml"), installed)
    for note in too_old:
        print(f"note: {note}")
    pip = [sys.executable, "-m", "pip", "install", *(["-q"] if quiet else [])]
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
            pins.write("\n".join(f"{name}=={version}" for name, version in sorted(installed.items())))
        print(f"installing what this runtime lacks: {', '.join(missing)}")
        subprocess.run([*pip, "-c", pins.name, *missing], check=True)
        Path(pins.name).unlink(missing_ok=True)
    if _normalize("multisubject-sdxl") not in installed:
        subprocess.run([*pip, "--no-deps", "-e", str(root)], check=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    print("environment ready: no package that was already installed has changed; no restart needed")
    return missing
