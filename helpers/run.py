"""Run the notebook series end to end with papermill, and keep the notebooks in git clean.

``python -m helpers run [--profile tiny] [-p name value ...]`` executes every ``notebooks/NN_*.ipynb`` in order,
writes executed copies to ``<output>/executed/``, prints seconds per notebook, and stops at the first failure naming
the notebook and the cell.

``python -m helpers evaluate [--profile world] [--scenes 3] [--seeds 32] [--out output/evaluation]`` is the full
evaluation without notebooks: trains the LoRAs when they are missing or stale, then runs baseline / ours / ours+QA on
every (scene, seed) from ``eval_seed_start`` (one file per run: an interrupted evaluation continues) and writes the
report to ``<out>/report``. ``python -m helpers train [--profile world] [--out output]`` trains what is missing or
stale. Both split their work over processes when started with ``accelerate launch --multi_gpu --num_processes N -m
helpers ...`` (NCCL on GPUs; gloo on CPUs with ``--device cpu``): subjects and (scene, seed) cells are dealt out by
rank, every cell writes its own file, the main process merges them; N processes give the numbers of one.
``python -m helpers mirror-check [--profile world]`` says which subjects look the same mirrored (``Subject.mirror``).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import PRESETS, PROJECT_ROOT, ProjectConfig
from .io import atomic_path, remove_leftover_temp_files, write_notebook_atomic, write_text_atomic

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


@dataclass
class NotebookRun:
    name: str
    seconds: float
    ok: bool
    executed_copy: Path


def series_notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))


def notebook_parameters(notebooks: list[Path]) -> set[str]:
    """Every name a notebook's ``parameters`` cell assigns, plus every config setting (``notebook_config`` reads
    those from the notebook's globals, so ``-p guidance_scale 3`` reaches the config too)."""
    import nbformat

    from .config import FIELD_NAMES

    names = set(FIELD_NAMES)
    for path in notebooks:
        for cell in nbformat.read(path, 4).cells:
            if "parameters" in cell.metadata.get("tags", []):
                names |= {t.id for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Assign)
                          for t in node.targets if isinstance(t, ast.Name)}
    return names


def unknown_parameters(parameters: dict, notebooks: list[Path]) -> str | None:
    """One line naming each unknown parameter with the closest known ones, or None."""
    import difflib

    known = notebook_parameters(notebooks)
    unknown = sorted(set(parameters) - known)
    if not unknown:
        return None
    hints = [f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(name, known))
                            else "") for name in unknown]
    return f"unknown parameter {', '.join(hints)}: nothing was run"


def select_notebooks(notebooks: list[Path], only: list[str] | None) -> list[Path] | str:
    """``--only`` accepts 3, 03 and 03_coarse_to_fine; an unknown one is named (a string is the error line)."""
    if not only:
        return notebooks
    chosen = []
    for item in only:
        item = item.strip().removesuffix(".ipynb")
        match = [nb for nb in notebooks if nb.stem == item or (item.isdigit() and int(nb.name[:2]) == int(item))]
        if not match:
            return f"--only {item!r}: no such notebook; choose from {', '.join(nb.stem for nb in notebooks)}"
        chosen += [nb for nb in match if nb not in chosen]
    return sorted(chosen)


def parse_value(text: str):
    """``-p steps 4`` gives an int, ``-p force True`` a bool, anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_series(notebooks_dir: Path = NOTEBOOKS_DIR, output_dir: str | None = None, profile: str | None = None,
               parameters: dict | None = None, only: list[str] | None = None, progress: bool = True,
               stream=sys.stdout) -> tuple[list[NotebookRun], int]:
    """Execute the series; returns the per-notebook runs and an exit code (0 ok, 1 a notebook failed)."""
    try:
        import papermill as pm
        from papermill.exceptions import PapermillExecutionError
    except ImportError:
        print("the runner needs papermill: pip install -e '.[lab]' (or `make run`, which installs it)", file=stream)
        return [], 1

    params = dict(parameters or {})
    if profile:
        params["profile"] = profile
    if output_dir:
        params["output_dir"] = output_dir
        os.environ["HELPERS_OUTPUT_DIR"] = output_dir  # also for code that runs before the parameters cell
    out_root = Path(output_dir) if output_dir else Path(os.environ.get("HELPERS_OUTPUT_DIR", "output"))
    out_root = out_root if out_root.is_absolute() else PROJECT_ROOT / out_root
    executed_dir = out_root / "executed"
    notebooks = select_notebooks(series_notebooks(notebooks_dir), only)
    if isinstance(notebooks, str) or not notebooks:
        print(notebooks or f"no notebooks NN_*.ipynb in {notebooks_dir}", file=stream)
        return [], 1
    if (problem := unknown_parameters(params, notebooks)) is not None:
        print(problem, file=stream)
        return [], 2
    # ipykernel 6's debugger prints a frozen-modules warning at every kernel start on Python >= 3.11
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    if (problem := unwritable(executed_dir)) is not None:
        print(f"FAILED: {problem}; nothing was run", file=stream)
        return [], 1
    if removed := remove_leftover_temp_files(out_root):
        print(f"removed {removed} temp file(s) left by an interrupted run under {out_root}", file=stream)
    runs: list[NotebookRun] = []
    for i, nb in enumerate(notebooks, 1):
        target = executed_dir / nb.name
        print(f"[{i}/{len(notebooks)}] {nb.name} ...", file=stream, flush=True)
        start = time.perf_counter()
        failure = None
        try:
            with atomic_path(target) as partial:  # the previous executed copy stays whole until this one is
                try:
                    pm.execute_notebook(str(nb), str(partial), parameters=params, cwd=str(nb.parent),
                                        progress_bar=progress, log_output=False, kernel_name="python3",
                                        extra_arguments=QUIET_KERNEL)
                except PapermillExecutionError as e:
                    failure = e  # keep the executed copy: it holds the traceback
        except KeyboardInterrupt:
            done = ", ".join(r.name for r in runs) or "none"
            print(f"\ninterrupted during {nb.name}: finished {done}; the executed copies of finished notebooks are "
                  f"in {executed_dir} (that of {nb.name} is unchanged)", file=stream)
            return runs, 130
        except OSError as e:
            runs.append(NotebookRun(nb.name, time.perf_counter() - start, False, target))
            print(f"\nFAILED: {nb.name}: {disk_problem(executed_dir, e, nb)}", file=stream)
            print_table(runs, stream)
            return runs, 1
        except Exception as e:  # a dead kernel, a broken notebook file: one line, never a traceback
            runs.append(NotebookRun(nb.name, time.perf_counter() - start, False, target))
            print(f"\nFAILED: {nb.name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                  file=stream)
            print_table(runs, stream)
            return runs, 1
        runs.append(NotebookRun(nb.name, time.perf_counter() - start, failure is None, target))
        if failure is not None:
            e = failure
            first_line = (e.source or "").strip().splitlines()[0] if (e.source or "").strip() else ""
            evalue = (e.evalue or "").strip().splitlines()[0] if (e.evalue or "").strip() else ""
            print(f"\nFAILED: {nb.name}, cell {e.cell_index} (execution {e.exec_count}: {first_line!r})\n"
                  f"  {e.ename}: {evalue}\n  executed copy with the full traceback: {target}", file=stream)
            print_table(runs, stream)
            return runs, 1
    print_table(runs, stream)
    report = out_root / "report" / "index.html"
    if report.exists():
        print(f"report: {report}", file=stream)
    return runs, 0


# The kernel's own log (ipykernel 7 warns on every start that it talks over local TCP): errors only.
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]


def unwritable(folder: Path) -> str | None:
    """One line when ``folder`` cannot take a file (read-only, full, not a folder), else None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / ".write-probe", "ok")
        (folder / ".write-probe").unlink()
    except OSError as e:
        return f"cannot write to {folder} ({e.strerror or e}); choose another --output-dir or free it"
    return None


def disk_problem(folder: Path, error: OSError, notebook: Path) -> str:
    """What went wrong writing into ``folder``, how much space is free and about how much the notebook needs."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(folder).free / 2**20
    except OSError:
        free = float("nan")
    previous = folder / notebook.name
    need = 2 * max(notebook.stat().st_size, previous.stat().st_size if previous.exists() else 0) / 2**20 + 1
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EROFS: "the folder is read-only", errno.EACCES: "no permission to write"}.get(error.errno, str(error))
    return (f"cannot write to {folder}: {what} ({free:.0f} MiB free; its executed copy needs about {need:.0f} MiB, "
            f"the outputs more). The previous executed copy is unchanged; free space or choose another --output-dir")


def print_table(runs: list[NotebookRun], stream=sys.stdout) -> None:
    width = max([len(r.name) for r in runs] + [8])
    print(f"\n{'notebook':<{width}}  {'seconds':>8}  status", file=stream)
    for r in runs:
        print(f"{r.name:<{width}}  {r.seconds:8.1f}  {'ok' if r.ok else 'FAILED'}", file=stream)
    print(f"{'total':<{width}}  {sum(r.seconds for r in runs):8.1f}", file=stream)


# ----------------------------------------------------------------------------------------------------------------
# keeping notebooks diff-friendly
# ----------------------------------------------------------------------------------------------------------------
def is_checked(cell) -> bool:
    return cell.cell_type == "code" and CHECK_MARK in cell.source


def clean_notebook(nb, checked_outputs: dict[int, list] | None = None):
    """No execution counts, no outputs except the text output of ``# NBVAL_CHECK_OUTPUT`` cells (those keep a fixed
    count of 1: nbval treats a cell with outputs but no count as never run)."""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.execution_count = 1 if is_checked(cell) else None
        outputs = checked_outputs.get(index, cell.outputs) if checked_outputs is not None else cell.outputs
        cell.outputs = [_strip_counts(o) for o in outputs if is_checked(cell) and o.get("output_type") == "stream"
                        and o.get("name") == "stdout"] if is_checked(cell) else []
        cell.metadata.pop("execution", None)
        for key in ("papermill", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
    nb.metadata.pop("papermill", None)
    return nb


def _strip_counts(output):
    output.pop("execution_count", None)
    return output


def refresh_checked_outputs(notebooks_dir: Path, executed_dir: Path) -> list[Path]:
    """Copy the checked cells' outputs from executed copies into the source notebooks (after a deliberate change)."""
    import nbformat

    changed = []
    for nb_path in series_notebooks(notebooks_dir):
        executed_path = executed_dir / nb_path.name
        if not executed_path.exists():
            continue
        source, executed = nbformat.read(nb_path, 4), nbformat.read(executed_path, 4)
        by_source = {c.source: c.outputs for c in executed.cells if c.cell_type == "code"}
        outputs = {i: by_source.get(c.source, []) for i, c in enumerate(source.cells) if is_checked(c)}
        write_notebook_atomic(clean_notebook(source, outputs), nb_path)
        changed.append(nb_path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebook series with papermill")
    run.add_argument("--profile", choices=["auto", "world", "tiny", "sdxl"], default=None,
                     help="model profile (default: the notebooks' 'auto': sdxl with CUDA, else world)")
    run.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                     help="a notebook parameter, e.g. -p steps 8 (repeatable)")
    run.add_argument("--output-dir", default=None, help="output folder (default: output/)")
    run.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help="folder of NN_*.ipynb notebooks")
    run.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,03")
    run.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    clean = sub.add_parser("clean-notebooks", help="strip outputs (except checked cells) and execution counts")
    clean.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR)
    evaluate = sub.add_parser("evaluate", help="the full evaluation: every method on scenes x seeds, resumable")
    evaluate.add_argument("--profile", choices=["auto", "world", "tiny", "sdxl"], default="world")
    evaluate.add_argument("--scenes", type=int, default=3, help="how many of the configured scenes (default 3)")
    evaluate.add_argument("--seeds", type=int, default=32, help="seeds per scene, from eval_seed_start (default 32)")
    evaluate.add_argument("--out", default="output/evaluation", help="folder of the LoRAs, runs and report")
    evaluate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    evaluate.add_argument("--preset", choices=sorted(PRESETS), default=None,
                          help="subjects and scenes of a preset, e.g. two-cats (two subjects of one class)")
    evaluate.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                          help="a setting, e.g. -p inpaint_strength 0.9 (repeatable)")
    train = sub.add_parser("train", help="train every subject's LoRA (what is up to date is skipped); under "
                                         "`accelerate launch --num_processes N` N subjects at once")
    train.add_argument("--profile", choices=["auto", "world", "tiny", "sdxl"], default="world")
    train.add_argument("--out", default="output", help="output folder (LoRAs under <out>/loras)")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    train.add_argument("--preset", choices=sorted(PRESETS), default=None)
    train.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[])
    compare = sub.add_parser("compare", help="an ablation: evaluations that differ in one setting, paired on the "
                                             "same (scene, seed) against a base evaluation")
    compare.add_argument("base", help="the base evaluation's folder (its --out)")
    compare.add_argument("variants", nargs="+", metavar="LABEL=FOLDER",
                         help="a variant's label and folder, e.g. 'no setting rule=output/ablation'")
    compare.add_argument("--by-subject", action="store_true",
                         help="then one table per subject (pairs are that subject's regions)")
    mirror = sub.add_parser("mirror-check", help="whether each subject looks the same mirrored to the scorer "
                                                 "(advice for a subject's \"mirror\": mirrored training views)")
    mirror.add_argument("--profile", choices=["auto", "world", "tiny", "sdxl"], default="world")
    mirror.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    mirror.add_argument("--preset", choices=sorted(PRESETS), default=None)
    refresh = sub.add_parser("refresh-checked-outputs",
                             help="store the outputs of '# NBVAL_CHECK_OUTPUT' cells from executed copies")
    refresh.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR)
    refresh.add_argument("--executed", type=Path, default=PROJECT_ROOT / "output" / "executed")
    args = parser.parse_args(argv)

    if args.command == "run":
        params = {name: parse_value(value) for name, value in args.parameter}
        only = args.only.split(",") if args.only else None
        try:
            _, code = run_series(args.notebooks, args.output_dir, args.profile, params, only, not args.no_progress)
        except KeyboardInterrupt:  # before the first notebook started: nothing to report but that
            print("\ninterrupted before any notebook finished", file=sys.stdout)
            return 130
        return code
    if args.command in ("evaluate", "train"):
        params = {name: parse_value(value) for name, value in args.parameter}
        params = {**(PRESETS[args.preset] if args.preset else {}), **params}
        if args.command == "train":
            from .notebook import make_config

            train_share(make_config(args.profile, output_dir=args.out, **params), process_state(args.device))
            return 0
        return full_evaluation(args.profile, args.out, args.scenes, args.seeds, args.device, params)
    if args.command == "compare":
        return compare_evaluations(args.base, args.variants, args.by_subject)
    if args.command == "mirror-check":
        return print_mirror_checks(args.profile, PRESETS[args.preset] if args.preset else {}, args.device)
    if args.command == "clean-notebooks":
        import nbformat

        for nb_path in series_notebooks(args.notebooks):
            write_notebook_atomic(clean_notebook(nbformat.read(nb_path, 4)), nb_path)
        return 0
    for path in refresh_checked_outputs(args.notebooks, args.executed):
        print(f"refreshed {path}")
    return 0


def print_mirror_checks(profile: str, params: dict, device: str | None) -> int:
    """One line per subject: its photos against each other and mirrored, and whether to mirror its training views."""
    from .notebook import make_config
    from .scoring import ClipScorer, mirror_check

    config = make_config(profile, **params)
    scorer = ClipScorer.for_config(config, device)
    print("| subject | a photo vs its other photos | mirrored | mirror its training views? |\n|---|---|---|---|")
    for subject in config.subjects:
        check = mirror_check(scorer, subject.name)
        advice = ("yes: it looks the same mirrored" if check.looks_the_same_mirrored
                  else "no: mirrored it looks like another subject")
        print(f"| {subject.name} | {check.own:.3f} | {check.mirrored:.3f} | {advice} |")
    print('Set "mirror": True on a subject to mirror half of its training views (notebook 01, subjects).')
    return 0


def compare_evaluations(base: str, variants: list[str], by_subject: bool = False) -> int:
    """Print the paired ablation table (ours and ours+QA of each variant minus the base's); with ``by_subject``, then
    the same table for each subject's regions alone."""
    from . import evaluation as he

    try:
        labelled = dict(v.split("=", 1) if "=" in v else (Path(v).name, v) for v in variants)
        base_rows, variant_rows = he.read_metrics(base), {k: he.read_metrics(v) for k, v in labelled.items()}
        print(he.paired_table(he.ablation_differences(base_rows, variant_rows)))
        for subject in dict.fromkeys(r["subject"] for r in base_rows) if by_subject else []:
            def own(rows: list[dict]) -> list[dict]:
                return [r for r in rows if r["subject"] == subject]

            print(f"\n{subject}:")
            print(he.paired_table(he.ablation_differences(own(base_rows),
                                                          {k: own(v) for k, v in variant_rows.items()})))
    except (FileNotFoundError, ValueError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    return 0


def process_state(device: str | None = None):
    """accelerate's view of the processes: one (plain ``python -m helpers ...``) or the N of ``accelerate launch
    --num_processes N -m helpers ...`` (gloo on CPUs, NCCL on GPUs, set up by accelerate)."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


def train_share(config, state) -> None:
    """Each process trains every N-th subject (skipping what is up to date), then all wait until every LoRA is
    written: N processes train N subjects at once."""
    from .profiles import ensure_tiny_pipeline
    from .training import run_training

    with state.main_process_first():  # one process sweeps what a killed run left and builds the shared cache
        if state.is_main_process and (removed := remove_leftover_temp_files(config.output_path)):
            print(f"removed {removed} temp file(s) left by an interrupted run under {config.output_path}")
        if config.profile == "tiny":
            ensure_tiny_pipeline(config.cache_path)
    mine = [s for i, s in enumerate(config.subjects) if i % state.num_processes == state.process_index]
    if mine:
        run_training(config.replace(subjects=mine), progress=False)  # on this process's device (accelerate sets it)
    state.wait_for_everyone()


def evaluation_inputs(config: ProjectConfig, device: str | None = None) -> tuple:
    """What an evaluation of ``config`` runs on: the models with every subject's LoRA loaded, the layout (and a note
    on where it came from) and the judges."""
    from . import evaluation as he
    from .adapters import load_subject_loras
    from .layout import LAYOUT_FILE, load_or_default_layout
    from .models import load_models
    from .scoring import ClipScorer, optional_dino_scorer

    models = load_models(config, device=device)
    load_subject_loras(models, config)
    layout, note = load_or_default_layout(config.output_path / LAYOUT_FILE, config.subject_names, config.resolution,
                                          config.resolution)
    scorer = ClipScorer.for_config(config, device=device)
    return models, layout, note, he.Judges.for_config(config, scorer, optional_dino_scorer(config, scorer))


def full_evaluation(profile: str, out: str, scenes: int, seeds: int, device: str | None = None,
                    parameters: dict | None = None) -> int:
    """Train what is missing, evaluate every (scene, seed), write the report; prints the paired table last."""
    from . import evaluation as he
    from . import figures as hf
    from .notebook import make_config
    from .training import loss_histories

    config = make_config(profile, output_dir=out, eval_prompts=scenes, eval_seeds=seeds, **(parameters or {}))
    start = time.perf_counter()
    state = process_state(device)
    device = device if state.num_processes == 1 else str(state.device)
    train_share(config, state)
    models, layout, note, judges = evaluation_inputs(config, device)
    shard = (state.process_index, state.num_processes)
    print(f"{config.profile}: {note}; {scenes} scene(s) x {seeds} seed(s) from seed {config.eval_seed_start}"
          + (f"; process {shard[0] + 1} of {shard[1]}" if shard[1] > 1 else ""))
    evaluation = he.run_evaluation(models, config, layout, judges, config.output_path, shard=shard)
    if shard[1] > 1:  # every process has written its cells; the main one reads them all back and reports
        state.wait_for_everyone()
        if not state.is_main_process:
            return 0
        evaluation = he.run_evaluation(models, config, layout, judges, config.output_path, progress=None)
    report = hf.write_evaluation_report(evaluation, judges, layout, config, loss_histories(config),
                                        config.output_path / "report")
    print(f"report: {report['html']} ({time.perf_counter() - start:.0f} s)")
    print(he.summary_table(report["summary"]))
    print(he.paired_table(report["paired"]))
    print(he.paired_table(report["qa_paired"]))
    return 0
