#!/usr/bin/env bash
# World ablations on one GPU: every variant evaluated on the same (scene, seed) cells with the same LoRAs, all
# variants at once (the world's small UNet leaves a GPU mostly idle, so they overlap), then the paired table of each
# against the first. Each writes its report under $OUT/<label>/report.
#
#   LORAS=path/to/loras SEED_START=20000 SCENES=3 SEEDS=16 \
#     bash benchmarks/world_ablation_gpu.sh "base|" "scale 1.3|-p subject_lora_scale 1.3" ...
#
# A variant is "label|settings" (settings as `python -m helpers evaluate` takes them). GPU and CPU pictures differ in
# their last bits, so compare variants measured on the same device only.
set -euo pipefail
: "${LORAS:?LORAS: a folder of trained subject LoRAs (the loras/ folder of an evaluation)}"
SEED_START=${SEED_START:-20000} SCENES=${SCENES:-3} SEEDS=${SEEDS:-16}
OUT=${OUT:-output/ablation} WORK=${WORK:-/tmp/world_ablation}
threads=$(( $(nproc) / $# > 0 ? $(nproc) / $# : 1 ))
start=$SECONDS labels=() pids=()
for variant in "$@"; do
  label=${variant%%|*} settings=${variant#*|}
  folder="$WORK/$label"
  mkdir -p "$folder" && cp -r "$LORAS" "$folder/loras"
  # shellcheck disable=SC2086  # the settings are words on purpose
  OMP_NUM_THREADS=$threads python -m helpers evaluate --profile world --scenes "$SCENES" --seeds "$SEEDS" \
    --out "$folder" -p eval_seed_start "$SEED_START" $settings > "$folder.log" 2>&1 &
  pids+=($!) labels+=("$label")
done
done_labels=()
for i in "${!pids[@]}"; do
  label=${labels[$i]}
  if wait "${pids[$i]}"; then
    # the table and its rows only: a lent GPU sends back a limited number of files
    mkdir -p "$OUT/$label/report" && cp "$WORK/$label/report/"{metrics.csv,report.md} "$OUT/$label/report/"
    done_labels+=("$label")
    echo "$label: done after $((SECONDS - start)) s"
  else
    echo "$label: failed"; tail -5 "$WORK/$label.log"
    cp "$WORK/$label.log" "$OUT/$label.log" 2>/dev/null || true  # only a failure's log: every file counts
  fi
done
args=()
for label in "${done_labels[@]:1}"; do args+=("$label=$OUT/$label"); done
if (( ${#args[@]} )); then python -m helpers compare "$OUT/${done_labels[0]}" "${args[@]}"; fi
