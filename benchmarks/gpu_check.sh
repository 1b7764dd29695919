#!/usr/bin/env bash
# One short GPU check (run on a lent GPU machine, from the repo root): a GPU smoke run of the
# real entry point, the ControlNet-vs-fine-tuning step cost, and the default run's wall time.
# Packages missing on that machine travel as wheels in .whl/ (see the device tool's README).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 WANDB_MODE=disabled
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
OUTDIR=${OUT:-/tmp/out}
echo "== smoke on GPU"
python3 src/train.py experiment=smoke trainer=gpu logger=csv paths.log_dir=/tmp/runs paths.cache_dir=/tmp/cache 2>&1 | tail -n 5
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
echo "== FSDP smoke on one GPU (the ControlNet alone wrapped)"
python3 src/train.py experiment=smoke trainer=fsdp trainer.devices=1 logger=csv paths.log_dir=/tmp/runs_fsdp paths.cache_dir=/tmp/cache 2>&1 | tail -n 3
cat /tmp/runs_fsdp/smoke/runs/*/results.json | python3 -c "import json,sys; r=json.load(sys.stdin); print('fsdp', r['global_step'], r['metrics']['edge_f1'])"
if [ "$GPUS" -ge 2 ]; then
  echo "== DDP smoke on 2 GPUs"
  python3 src/train.py experiment=smoke trainer=ddp trainer.devices=2 logger=csv paths.log_dir=/tmp/runs_ddp paths.cache_dir=/tmp/cache 2>&1 | tail -n 3
else
  echo "== DDP on 2 GPUs: skipped, this machine has $GPUS GPU"
fi
echo "== step cost: tiny, tiny_sd, and the SD 1.5-shaped UNet at 512 px (latent 64), batch 4"
python3 benchmarks/step_cost.py --device cuda --sd15-latent 64 --sd15-batch 4 --repeats 10 --out "$OUTDIR/step_cost.json"
echo "== default run on GPU (cold cache)"
start=$(date +%s)
python3 src/train.py trainer=gpu logger=csv paths.log_dir=/tmp/runs paths.cache_dir=/tmp/cache > "$OUTDIR/default_run.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s"
cp "$(ls -td /tmp/runs/train/runs/* | head -1)/results.json" "$OUTDIR/default_results.json" && cat "$OUTDIR/default_results.json"
