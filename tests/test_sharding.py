"""The evaluation and the training split over processes with ``accelerate launch`` (gloo on this CPU): N processes
give the numbers of one, and a run killed halfway continues without redoing finished cells (world profile, small)."""
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT

# a small world evaluation: its real models, short LoRA training and few steps, so that CI stays quick
ARGS = ["evaluate", "--profile", "world", "--scenes", "1", "--device", "cpu", "-p", "train_steps", "8", "-p", "steps",
        "6", "-p", "max_retries", "1", "-p", "qa_candidates", "1"]
TIMINGS = {"seconds"}  # the only column that differs between runs: wall-clock time
# accelerate's multi-process launcher (torchrun underneath); with --device cpu the processes talk over gloo. Its
# --cpu flag instead expects mpirun for more than one process.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "--num_processes"]


def launch(out: Path, processes: int, seeds: int = 4) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "helpers", *ARGS, "--seeds", str(seeds), "--out", str(out)]
    else:
        command = [*LAUNCH, str(processes), "-m", "helpers", *ARGS, "--seeds", str(seeds), "--out", str(out)]
    return subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def kill_tree(pid: int) -> None:
    import psutil  # accelerate's own dependency

    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def metrics_without_timings(out: Path) -> list[dict]:
    with open(out / "report" / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    finish(launch(out, 1))
    return out


def test_two_processes_give_the_numbers_of_one(one_process, tmp_path):
    out = tmp_path / "two"
    output = finish(launch(out, 2))
    assert "process 1 of 2" in output and "process 2 of 2" in output
    assert metrics_without_timings(out) == metrics_without_timings(one_process)
    with open(out / "report" / "metrics.csv") as f:
        assert set(next(csv.reader(f))) - set(metrics_without_timings(out)[0]) == TIMINGS


def test_a_killed_run_continues_without_redoing_finished_cells(tmp_path):
    out = tmp_path / "killed"
    process = launch(out, 2, seeds=12)
    runs = out / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and not list(runs.glob("scene*.json")):
        time.sleep(0.05)
    kill_tree(process.pid)  # the launcher and every process it started (they run in sessions of their own)
    process.communicate()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in runs.glob("scene*.json")}
    assert 1 <= len(finished) < 12
    output = finish(launch(out, 2, seeds=12))
    for name, (mtime, content) in finished.items():
        assert (runs / name).stat().st_mtime_ns == mtime and (runs / name).read_bytes() == content, name
    assert len(list(runs.glob("scene*.json"))) == 12
    reused = [int(n) for n in re.findall(r"(\d+) of 6 runs read back", output)]  # each process: its 6 cells
    assert sum(reused) == len(finished)


def test_training_splits_subjects_over_processes(tmp_path):
    out = tmp_path / "train"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*LAUNCH, "2", "-m", "helpers", "train", "--profile", "tiny", "--device", "cpu", "--out", str(out),
               "-p", "train_steps", "4"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cat: trained" in result.stdout and "mug: trained" in result.stdout
    assert all((out / "loras" / n / "pytorch_lora_weights.safetensors").exists() for n in ("cat", "mug"))
    again = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("up to date") == 2, again.stdout[-2000:]
