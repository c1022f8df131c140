#!/usr/bin/env bash
# The world's close-up fine-tune on one GPU (the lent H200): the inpainting gate and the generator's class/colour
# accuracy of the shipped models, then the UNet and text encoders continued on scenes + close-ups
# (world.render_closeup), then the same measures on the result; the new pipeline is packed into $OUT/pipeline.tar.gz.
# Usage on the device machine: bash benchmarks/world_closeups_gpu.sh [UNET_STEPS] [LR]
set -eu
python3 -m pip install -q --no-deps .device-wheels/*.whl 2>/dev/null
OUT=${OUT:-/tmp/out}
STEPS=${1:-3000}
LR=${2:-2e-4}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
measure() {
  python3 -c "
from helpers.notebook import make_config; from helpers.models import load_models; from helpers.scoring import ClipScorer
from helpers.world import evaluate as we
config = make_config('world', output_dir='/tmp/ev/gate')
models = load_models(config, device='cuda'); scorer = ClipScorer.for_config(config, device='cuda')
for k, v in we.inpaint_accuracy(models, config, scorer, seeds=8).items(): print('$1 inpaint', k, v)
for k, v in we.generator_accuracy(models, config, scorer, 64).items(): print('$1 generator', k, v)
print('$1 two-object binding', we.two_object_binding(models, config, scorer))
print('$1 vae psnr', round(we.vae_psnr(models), 2))
" | tee -a "$OUT/measures.txt"
}
measure shipped
python3 -m helpers.world.train --out /tmp/w --stages data,unet --vae-from models/world/pipeline/vae \
  --unet-from models/world/pipeline --unet-steps "$STEPS" --unet-lr "$LR" --unet-continue-steps 0 \
  > "$OUT/train.log" 2>&1 || { tail -30 "$OUT/train.log"; exit 1; }
tail -3 "$OUT/train.log"
cp /tmp/w/training_report.json "$OUT/"
for part in unet text_encoder text_encoder_2; do rm -rf "models/world/pipeline/$part"; cp -r "/tmp/w/pipeline/$part" models/world/pipeline/; done
measure closeups
tar czf "$OUT/pipeline.tar.gz" -C /tmp/w pipeline
grep -E "inpaint all|generator class|binding" "$OUT/measures.txt"
