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
echo "== step cost, tiny base (32 px, batch 32)"
python3 benchmarks/step_cost.py --repeats 20
echo "== step cost, larger UNet (64 px, channels 64 128 256, batch 64)"
python3 benchmarks/step_cost.py --resolution 64 --channels 64 128 256 --batch 64 --repeats 20
echo "== default run on GPU (cold cache)"
start=$(date +%s)
python3 src/train.py trainer=gpu logger=csv paths.log_dir=/tmp/runs paths.cache_dir=/tmp/cache > "$OUTDIR/default_run.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s"
cp "$(ls -td /tmp/runs/train/runs/* | head -1)/results.json" "$OUTDIR/default_results.json" && cat "$OUTDIR/default_results.json"
