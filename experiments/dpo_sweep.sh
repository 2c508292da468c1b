#!/usr/bin/env bash
# DPO sweeps on the world, from the SFT model of a pipeline directory (made first when missing):
#   beta        DPO's beta over 3 seeds: gold reward against KL to the SFT reference
#   loss_types  the DPO family side by side over 2 seeds: sigmoid (DPO), robust (cDPO noise
#               correction), IPO, hinge (SLiC), SimPO and ORPO (both reference-free)
# Usage: experiments/dpo_sweep.sh beta|loss_types [BASE=runs/pipeline_tiny] [alignax flags...]
set -euo pipefail
what=${1:?usage: experiments/dpo_sweep.sh beta|loss_types [BASE] [flags...]}
base=${2:-runs/pipeline_tiny}
shift $(( $# < 2 ? $# : 2 ))
case "$what" in
  beta) grid=(--grid=dpo.beta=0.03,0.1,0.3,1.0 --grid=seed=0,1,2) ;;
  loss_types) grid=(--grid=dpo.loss_type=sigmoid,robust,ipo,hinge,simpo,orpo --grid=seed=0,1) ;;
  *) echo "experiments/dpo_sweep.sh: unknown sweep '$what' (beta, loss_types)" >&2; exit 2 ;;
esac
alignax pipeline --config=configs/pipeline.py:tiny --config.workdir="$base" --config.stages=pretrain,sft
alignax sweep --config=configs/dpo.py:tiny --config.init.workdir="$base/sft" --out="$base/sweeps/dpo_$what" \
  "${grid[@]}" --metrics=eval/gold_reward,eval/kl_to_reference,eval/accuracy,eval/refusal_rate "$@"
