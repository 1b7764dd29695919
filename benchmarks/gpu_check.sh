#!/usr/bin/env bash
# The GPU check of issue 15, run on a lent GPU machine from the repo root: benchmark 3 (step_cost.py: the ControlNet
# step against fine-tuning the UNet) and benchmark 1 (vs_diffusers.py: the harness against diffusers' own script), both
# at 512 px on the SD 1.5-shaped random base (sd15_shaped.py) in bf16 mixed precision. Writes step_cost.json and
# vs_diffusers.json to $OUT (or /tmp/out), which experiments/performance/gpu/ keeps; then, if time is left, an FSDP
# smoke run of the real entry point (fsdp_smoke_results.json).
# Packages missing on that machine travel as wheels in .whl/ (see the device tool's README); diffusers' script
# (../shared/anchors/diffusers_train_controlnet.py here) travels as $ANCHOR. Sized for the device tool's 10-minute call:
# every step's timeout is what is left of 560 s.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
ANCHOR=${ANCHOR:-../shared/anchors/diffusers_train_controlnet.py}
OUTDIR=${OUT:-/tmp/out}
mkdir -p "$OUTDIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, datasets, lightning, hydra, accelerate
print('torch', torch.__version__, torch.cuda.get_device_name(), '| diffusers', diffusers.__version__, '| transformers', transformers.__version__,
      '| datasets', datasets.__version__, '| lightning', lightning.__version__, '| hydra', hydra.__version__, '| accelerate', accelerate.__version__)" || exit 1
echo "== benchmark 3: ControlNet step vs fine-tuning, SD 1.5-shaped UNet, 512 px (latent 64), batch 8, bf16"
timeout 200 python3 benchmarks/step_cost.py --bases sd15 --device cuda --precision bf16 --sd15-latent 64 --sd15-batch 8 --repeats 10 \
  --out "$OUTDIR/step_cost.json"
echo "== benchmark 1: harness vs diffusers' script, SD 1.5-shaped base, 512 px, batch 8, bf16"
timeout $((560 - SECONDS)) python3 benchmarks/vs_diffusers.py --base sd15 --resolution 512 --device cuda --precision bf16 --workers 4 --batch 8 \
  --samples 128 --steps 80 --window 60 --short-steps 0 --rounds 1 --no-warmup --no-compile --anchor "$ANCHOR" --out "$OUTDIR/vs_diffusers.json" \
  --logs "$OUTDIR/logs"
if [ "$SECONDS" -lt 420 ]; then
  echo "== FSDP smoke on one GPU (the ControlNet alone wrapped), after ${SECONDS} s"
  timeout $((540 - SECONDS)) python3 src/train.py experiment=smoke trainer=fsdp trainer.devices=1 logger=csv paths.log_dir=/tmp/runs_fsdp \
    paths.cache_dir=/tmp/cache > "$OUTDIR/fsdp_smoke.log" 2>&1
  echo "exit $?"; tail -n 3 "$OUTDIR/fsdp_smoke.log"
  cp /tmp/runs_fsdp/smoke/runs/*/results.json "$OUTDIR/fsdp_smoke_results.json"
else
  echo "== FSDP smoke: skipped, ${SECONDS} s gone"
fi
