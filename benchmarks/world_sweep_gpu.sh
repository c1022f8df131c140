#!/usr/bin/env bash
# Settings compared on development seeds (1000+, never the report's), on one GPU: for each variant
# "name:setting=value,setting=value" one `python -m helpers evaluate --profile world` with those settings; its means
# table goes to $OUT/<name>.md as soon as it ends (a run cut off by the time limit keeps the finished ones).
# Usage on the device machine: bash benchmarks/world_sweep_gpu.sh SEEDS name:train_steps=1000 name2:...
set -eu
python3 -m pip install -q --no-deps .device-wheels/*.whl 2>/dev/null
OUT=${OUT:-/tmp/out}
seeds=$1; shift
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
for variant in "$@"; do
  name=${variant%%:*}; settings=${variant#*:}
  params=(-p eval_seed_start 1000)
  if [ "$settings" != "$variant" ] && [ -n "$settings" ]; then
    IFS=',' read -ra pairs <<< "$settings"
    for pair in "${pairs[@]}"; do params+=(-p "${pair%%=*}" "${pair#*=}"); done
  fi
  start=$(date +%s)
  python3 -m helpers evaluate --profile world --scenes 3 --seeds "$seeds" --out "/tmp/sweep/$name" --device cuda \
    "${params[@]}" > "$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log"; continue; }
  cp "/tmp/sweep/$name/report/report.md" "$OUT/$name.md"
  cp "/tmp/sweep/$name/report/figures/methods_grid.png" "$OUT/${name}_grid.png"
  echo "== $name ($settings): $(( $(date +%s) - start )) s"
  grep -A6 "^| method | pictures" "$OUT/$name.md" | cut -d'|' -f2,4,5,6,8,10 | tail -4
done
