#!/usr/bin/env bash
# Composing two ControlNets (paper Sec. 3.4; experiment 7 of the ablation issue): a sketch and a seg ControlNet of
# experiment 5 (ablation_condition), given the sketch and the seg map of the same held-out sample, composed at scales
# 0.5 / 0.5 and 1 / 1, against each alone at 1 and, as the control for the doubled strength of 1 / 1, each alone at 2;
# training seeds 0, 1, 2 (seed i's sketch net with seed i's seg net).
#   bash experiments/multi_controlnet/run.sh outputs/ablation_condition/multiruns/<time> [<output folder>]
# Five evaluation sweeps (each alone at 1; composed, one per seed: Hydra's sweeper cannot pair two lists; each alone at
# 2), then the tables.
set -euo pipefail
sweep=${1:?"usage: run.sh <multirun folder of experiment=ablation_condition> [<output folder>]"}
out=${2:-outputs/multi_controlnet/multiruns/$(date +%Y-%m-%d_%H-%M-%S)}
python=${PYTHON:-.venv/bin/python}
settings=(eval.num_images=256 "eval.prompt_settings=[none,insufficient,perfect]")

net() {  # the job folder of condition $1, seed $2
  local found=("$sweep"/*_data.condition="$1",seed="$2")
  [[ -d ${found[0]} ]] || { echo "no job data.condition=$1,seed=$2 in $sweep" >&2; exit 1; }
  echo "${found[0]}"
}
for seed in 0 1 2; do net sketch $seed >/dev/null; net seg $seed >/dev/null; done  # all six nets, before any work
alone="'$(net sketch 0)','$(net sketch 1)','$(net sketch 2)','$(net seg 0)','$(net seg 1)','$(net seg 2)'"

"$python" eval/evaluate.py -m "ckpt=$alone" \
  sampling.conditioning_scale=1 "${settings[@]}" "hydra.sweep.dir=$out/alone"
for seed in 0 1 2; do
  "$python" eval/evaluate.py -m "ckpt='$(net sketch $seed)'" "compose=['$(net seg $seed)']" sampling.conditioning_scale=0.5,1 \
    "${settings[@]}" "hydra.sweep.dir=$out/composed_seed$seed"
done
"$python" eval/evaluate.py -m "ckpt=$alone" \
  sampling.conditioning_scale=2 "${settings[@]}" "hydra.sweep.dir=$out/alone_scale2"
"$python" eval/tables.py "sweep=$out/alone" "extra_sweeps=[$out/composed_seed0,$out/composed_seed1,$out/composed_seed2,$out/alone_scale2]" \
  out=experiments/multi_controlnet comparisons=all_pairs correction=bonferroni archive=true
