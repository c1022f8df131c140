"""Make every N-th (scene, seed) cell of a world evaluation in this process, into the evaluation's folder.

Several such processes share one GPU: the world's models are small, so one evaluation leaves the GPU mostly idle,
bound by launching kernels. Afterwards ``python -m helpers evaluate`` with the same arguments reads every cell back
(same settings, layout and LoRAs) and writes the report. The LoRAs must be in ``OUT/loras`` already (``python -m
helpers train`` first). Used by ``benchmarks/world_evaluation_gpu.sh`` with ``CELLS=N``.

    python benchmarks/world_evaluation_cells.py RANK N OUT [--preset two-cats] [-p NAME VALUE ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import evaluation as he  # noqa: E402
from helpers.config import PRESETS  # noqa: E402
from helpers.notebook import make_config  # noqa: E402
from helpers.run import evaluation_inputs, parse_value  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rank", type=int)
    parser.add_argument("processes", type=int)
    parser.add_argument("out")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[])
    args = parser.parse_args(argv)
    params = {**(PRESETS[args.preset] if args.preset else {}),
              **{name: parse_value(value) for name, value in args.parameter}}
    config = make_config("world", output_dir=args.out, eval_prompts=args.scenes, eval_seeds=args.seeds, **params)
    models, layout, _, judges = evaluation_inputs(config, args.device)
    he.run_evaluation(models, config, layout, judges, config.output_path, shard=(args.rank, args.processes),
                      progress=lambda line: print(f"[{args.rank}/{args.processes}] {line}", flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
