"""Kill it anywhere: crash-consistency runs of the tiny profile (SIGKILL at seeded random moments, rerun until done,
every result file compared with an uninterrupted run of the same config).

    python tests/crash_consistency.py --kills 50            # the documented run (README states its last result)
    python tests/crash_consistency.py --target notebooks    # kernel kills mid-cell under papermill (01, 03, 05)

``--target evaluate`` (default) runs ``python -m helpers evaluate --profile tiny`` — LoRA training with its
checkpoints and exports, coarse-to-fine, the QA loop, the re-rolls, the metrics and the report — and kills its whole
process tree; each trial starts from an empty folder and kills the run, then its rerun, before a last rerun
completes. ``--target notebooks`` runs the series notebook by notebook (``python -m helpers run --only NN``) and
kills only the notebook's kernel while a cell runs (what a Colab disconnect does), then reruns that notebook.

Checked after every trial: the same files as the uninterrupted run, each byte-identical, except the values that
record how long something took or how a run went, which ``comparable`` names (``TIMING_KEYS`` in JSON, columns
whose header names them in CSV, Markdown and HTML tables); no temp file or folder left; every LoRA that was finished
before a kill untouched afterwards (same bytes, same modification time: not retrained). Used by
``tests/test_crash_consistency.py`` with a few kills; prints a summary line per trial and a verdict last.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from helpers.io import TEMP_MARK  # noqa: E402  (every temp file and folder is named .<name>.tmp<pid>[<suffix>])

# Values that say how long a step took or how the run went (a resumed training), not what it made.
TIMING_KEYS = frozenset({"seconds", "resumed"})
NOTEBOOKS = ("00", "01", "02", "03", "04", "05")
KERNEL_KILLED = ("01", "03", "05")
# The executed copies of the notebooks carry cell timings and execution metadata by design; results are compared.
NOT_COMPARED = ("executed/",)


def evaluate_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "helpers", "evaluate", "--profile", "tiny", "--scenes", "1", "--seeds", "2",
            "--out", str(out), "--device", "cpu"]


def notebook_command(out: Path, notebook: str) -> list[str]:
    return [sys.executable, "-m", "helpers", "run", "--profile", "tiny", "--output-dir", str(out), "--only",
            notebook, "--no-progress"]


# ----------------------------------------------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------------------------------------------
def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _timing_column(header: str) -> bool:
    return any(key in header for key in TIMING_KEYS)


def _markdown_without_timings(text: str) -> str:
    out, drop = [], set()
    for line in text.splitlines():
        if not line.startswith("|"):
            drop = set()
            out.append(line)
            continue
        cells = line.strip().strip("|").split("|")
        if not drop and not set(line) <= set("|-: "):
            drop = {i for i, c in enumerate(cells) if _timing_column(c)} or {-1}
        out.append("|".join(c for i, c in enumerate(cells) if i not in drop))
    return "\n".join(out)


def _html_without_timings(text: str) -> str:
    def table(match: re.Match) -> str:
        rows = re.findall(r"<tr>(.*?)</tr>", match.group(0), flags=re.S)
        cells = [re.findall(r"<t[hd]>(.*?)</t[hd]>", row, flags=re.S) for row in rows]
        drop = {i for i, c in enumerate(cells[0] if cells else []) if _timing_column(c)}
        return "\n".join("|".join(c for i, c in enumerate(row) if i not in drop) for row in cells)
    return re.sub(r"<table>.*?</table>", table, text, flags=re.S)


def _csv_without_timings(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return text
    keep = [i for i, h in enumerate(rows[0]) if h not in TIMING_KEYS]
    return "\n".join(",".join(row[i] for i in keep if i < len(row)) for row in rows)


def comparable(path: Path, folder: Path | None = None) -> bytes:
    """What must be identical between two runs: the file's bytes, less the values ``TIMING_KEYS`` names (and the
    run's own ``folder``, which a saved config names, written as ``<out>``)."""
    data = path.read_bytes()
    if folder is not None and path.suffix in (".json", ".csv", ".md", ".html", ".txt"):
        data = data.replace(str(folder).encode(), b"<out>")
    if path.suffix == ".json":
        return json.dumps(_without_timings(json.loads(data)), sort_keys=True).encode()
    if path.suffix == ".csv":
        return _csv_without_timings(data.decode()).encode()
    if path.suffix == ".md":
        return _markdown_without_timings(data.decode()).encode()
    if path.suffix == ".html":
        return _html_without_timings(data.decode()).encode()
    return data


def result_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).as_posix().startswith(NOT_COMPARED)}


def differences(reference: Path, folder: Path) -> list[str]:
    """Every way ``folder`` differs from ``reference`` (empty: the same results)."""
    ref, got = result_files(reference), result_files(folder)
    problems = [f"missing: {name}" for name in sorted(set(ref) - set(got))]
    problems += [f"extra: {name}" for name in sorted(set(got) - set(ref))]
    problems += [f"differs: {name}" for name in sorted(set(ref) & set(got))
                 if comparable(ref[name], reference) != comparable(got[name], folder)]
    return problems


def leftovers(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{TEMP_MARK}*"))


def finished_loras(folder: Path) -> dict[str, tuple[int, str]]:
    """LoRAs whose training had finished (their metadata written last): file -> (mtime_ns, sha256)."""
    out = {}
    for meta in folder.glob("loras/*/train_meta.json"):
        for weights in meta.parent.glob("*.safetensors"):
            if weights.name != "checkpoint.safetensors":
                out[weights.relative_to(folder).as_posix()] = (weights.stat().st_mtime_ns,
                                                               hashlib.sha256(weights.read_bytes()).hexdigest())
    return out


# ----------------------------------------------------------------------------------------------------------------
# running and killing
# ----------------------------------------------------------------------------------------------------------------
def _env() -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "0", "HELPERS_PROFILE": "tiny", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    env.pop("HELPERS_OUTPUT_DIR", None)
    return env


def _start(command: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_tree(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_once(command: list[str], log, kill_after: float | None = None, timeout: float = 900) -> bool:
    """Run ``command``; with ``kill_after``, SIGKILL its whole process group then. True when it was killed; a run
    that ends by itself must succeed."""
    process = _start(command, log)
    try:
        process.wait(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process)
        if kill_after is None:
            raise RuntimeError(f"{' '.join(command)} ran over {timeout} s") from None
        return True
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {process.returncode}); see its log")
    return False


def _kernel_of(process: subprocess.Popen):
    import psutil

    try:
        for child in psutil.Process(process.pid).children(recursive=True):
            if any("ipykernel" in part for part in child.cmdline()):
                return child
    except psutil.Error:
        return None
    return None


def run_killing_kernel(command: list[str], log, kill_after: float, timeout: float = 900) -> bool:
    """Run a notebook under papermill and SIGKILL only its kernel ``kill_after`` seconds after the kernel started
    (the runner itself survives and reports the dead kernel). True when the kernel was killed."""
    process = _start(command, log)
    start = time.monotonic()
    kernel = None
    while process.poll() is None and time.monotonic() - start < timeout:
        kernel = kernel or _kernel_of(process)
        if kernel is not None:
            break
        time.sleep(0.05)
    killed = False
    if kernel is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            try:
                kernel.kill()
                killed = True
            except Exception:  # noqa: BLE001 (the kernel ended on its own just then)
                pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process)
        raise RuntimeError(f"{' '.join(command)} did not end after its kernel was killed") from None
    if killed and process.returncode == 0:
        killed = False  # the cell had finished: the kill landed between cells or after the last one
    if not killed and process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {process.returncode}) without a kill; see its log")
    return killed


@dataclass
class Trial:
    kills: list[float] = field(default_factory=list)  # seconds after start at which a run was killed
    killed_in: list[str] = field(default_factory=list)  # what was running then (the command, or the notebook)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def reference_run(target: str, folder: Path, log) -> dict[str, float]:
    """The uninterrupted run; returns how long each part took (the range of the kill moments)."""
    if target == "evaluate":
        start = time.monotonic()
        run_once(evaluate_command(folder), log)
        return {"evaluate": time.monotonic() - start}
    durations = {}
    for notebook in NOTEBOOKS:
        start = time.monotonic()
        run_once(notebook_command(folder, notebook), log)
        durations[notebook] = time.monotonic() - start
    return durations


def evaluate_trial(reference: Path, folder: Path, rng: random.Random, duration: float, kills: int, log) -> Trial:
    """Kill the evaluation at a random moment, then its rerun, up to ``kills`` times (a run that ends before its kill
    moment has completed); then a last rerun if the last run was killed."""
    trial, start = Trial(), time.monotonic()
    finished: dict[str, tuple[int, str]] = {}
    completed = False
    for _ in range(kills):
        delay = rng.uniform(0.5, duration)
        if not run_once(evaluate_command(folder), log, kill_after=delay):
            completed = True
            break
        trial.kills.append(round(delay, 2))
        trial.killed_in.append("evaluate")
        finished.update(finished_loras(folder))
    if not completed:
        run_once(evaluate_command(folder), log)
    trial.problems = _checks(reference, folder, finished)
    trial.seconds = time.monotonic() - start
    return trial


def notebooks_trial(reference: Path, folder: Path, rng: random.Random, durations: dict[str, float], log) -> Trial:
    """The series notebook by notebook; in 01, 03 and 05 the kernel is killed mid-cell, then the notebook rerun."""
    trial, start = Trial(), time.monotonic()
    finished: dict[str, tuple[int, str]] = {}
    for notebook in NOTEBOOKS:
        if notebook in KERNEL_KILLED:
            delay = rng.uniform(0.5, max(1.0, durations[notebook] - 6.0))  # ~6 s of a run is papermill's own start
            if run_killing_kernel(notebook_command(folder, notebook), log, delay):
                trial.kills.append(round(delay, 2))
                trial.killed_in.append(notebook)
            finished.update(finished_loras(folder))
        run_once(notebook_command(folder, notebook), log)
    trial.problems = _checks(reference, folder, finished)
    trial.seconds = time.monotonic() - start
    return trial


def _checks(reference: Path, folder: Path, finished: dict[str, tuple[int, str]]) -> list[str]:
    problems = differences(reference, folder)
    problems += [f"temp left: {name}" for name in leftovers(folder)]
    now = finished_loras(folder)
    problems += [f"retrained after it had finished: {name}" for name, stamp in finished.items()
                 if now.get(name) != stamp]
    return problems


def crash_consistency(target: str, kills: int, seed: int, workdir: Path, kills_per_trial: int = 2,
                      stream=sys.stdout) -> list[Trial]:
    """Trials until ``kills`` kills landed; each trial's folder is removed when it passed."""
    rng = random.Random(seed)
    reference = workdir / "reference"
    with open(workdir / "runs.log", "ab") as log:
        durations = reference_run(target, reference, log)
        print(f"uninterrupted {target} run: {sum(durations.values()):.1f} s", file=stream, flush=True)
        trials: list[Trial] = []
        while sum(len(t.kills) for t in trials) < kills:
            folder = workdir / f"trial{len(trials)}"
            if target == "evaluate":
                trial = evaluate_trial(reference, folder, rng, durations["evaluate"], kills_per_trial, log)
            else:
                trial = notebooks_trial(reference, folder, rng, durations, log)
            trials.append(trial)
            verdict = "same results" if not trial.problems else "; ".join(trial.problems[:5])
            where = ", ".join(f"{w} at {k} s" for w, k in zip(trial.killed_in, trial.kills)) or "no kill landed"
            print(f"trial {len(trials)}: killed {where}; {trial.seconds:.0f} s: {verdict}",
                  file=stream, flush=True)
            if not trial.problems:
                shutil.rmtree(folder, ignore_errors=True)
            if len(trials) > 4 * kills + 4:
                break  # runs that end before every kill moment: report rather than loop
    return trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kills that must land (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (reproducible)")
    parser.add_argument("--target", choices=["evaluate", "notebooks"], default="evaluate")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temp folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crash-consistency-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    trials = crash_consistency(args.target, args.kills, args.seed, workdir)
    landed = sum(len(t.kills) for t in trials)
    failed = [t for t in trials if t.problems]
    print(f"\n{landed} kills in {len(trials)} trials ({args.target}, seed {args.seed}), {time.monotonic() - start:.0f} s: "
          + ("every rerun ended with the uninterrupted run's results, no temp file left, no finished LoRA retrained"
             if not failed and landed >= args.kills else f"{len(failed)} trial(s) differ (folders kept in {workdir})"
             if failed else f"only {landed} kills landed"))
    return 0 if not failed and landed >= args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
