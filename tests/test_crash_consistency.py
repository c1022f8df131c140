"""Kill it anywhere (tiny profile): SIGKILL at seeded random moments, rerun until done, compare every result file
with an uninterrupted run (``tests/crash_consistency.py``; ``python tests/crash_consistency.py --kills 50`` is the
long run the README reports)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash_consistency as cc  # noqa: E402


def test_random_kills_of_the_whole_evaluation_end_with_the_uninterrupted_results(tmp_path):
    trials = cc.crash_consistency("evaluate", kills=4, seed=2026, workdir=tmp_path)
    assert sum(len(t.kills) for t in trials) >= 4
    assert [t.problems for t in trials] == [[] for _ in trials]


def test_a_kernel_killed_mid_cell_in_notebooks_01_03_05_reruns_to_the_same_results(tmp_path):
    trials = cc.crash_consistency("notebooks", kills=3, seed=7, workdir=tmp_path)
    assert {notebook for t in trials for notebook in t.killed_in} == {"01", "03", "05"}
    assert [t.problems for t in trials] == [[] for _ in trials]


def test_the_comparison_sees_a_changed_value_and_ignores_only_the_named_timings(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, seconds, identity in ((a, 1.5, 0.9), (b, 7.25, 0.9)):
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps({"seconds": seconds, "rows": [{"identity": identity,
                                                                                   "seconds": seconds}]}))
        (folder / "metrics.csv").write_text(f"method,identity,seconds\nours,{identity},{seconds}\n")
        (folder / "report.md").write_text(f"| method | identity | seconds ↓ |\n|---|---|---|\n| ours | {identity} | "
                                          f"{seconds} |\n")
        (folder / "index.html").write_text(f"<table><tr><th>identity</th><th>Δ seconds ↓</th></tr><tr><td>"
                                           f"{identity}</td><td>{seconds}</td></tr></table>")
    assert cc.differences(a, b) == []
    (b / "run.json").write_text(json.dumps({"seconds": 1.5, "rows": [{"identity": 0.8, "seconds": 1.5}]}))
    (b / "report.md").write_text("| method | identity | seconds ↓ |\n|---|---|---|\n| ours | 0.8 | 1.5 |\n")
    (b / "index.html").write_text("<table><tr><th>identity</th><th>Δ seconds ↓</th></tr><tr><td>0.8</td><td>1.5"
                                  "</td></tr></table>")
    (b / ".x.tmp123.json").write_text("{}")
    assert cc.differences(a, b) == ["extra: .x.tmp123.json", "differs: index.html", "differs: report.md",
                                    "differs: run.json"]
    assert cc.leftovers(b) == [".x.tmp123.json"]


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_a_safetensors_file_with_metadata_has_the_same_bytes_in_every_process(tmp_path, hash_seed):
    script = ("import sys, torch; sys.path.insert(0, sys.argv[2]); from helpers.io import save_safetensors_atomic; "
              "save_safetensors_atomic({'w': torch.arange(6.).reshape(2, 3)}, sys.argv[1], "
              "{f'key{i}': f'value {i}' for i in range(12)})")
    root = str(Path(__file__).resolve().parent.parent)
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", script, str(f), root], check=True, env={"PYTHONHASHSEED": hash_seed,
                                                                                      "PATH": "/usr/bin:/bin"})
    assert len({f.read_bytes() for f in files}) == 1
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {f"key{i}": f"value {i}" for i in range(12)}
