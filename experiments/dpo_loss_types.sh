#!/usr/bin/env bash
# The DPO family side by side (same SFT start, same data, 2 seeds): sigmoid (DPO), robust (cDPO
# noise correction), IPO, hinge (SLiC), SimPO and ORPO (both reference-free).
# Usage: experiments/dpo_loss_types.sh [BASE=runs/pipeline_tiny] [extra alignax flags...]
set -euo pipefail
base=${1:-runs/pipeline_tiny}
shift || true
alignax pipeline --config=configs/pipeline.py:tiny --config.workdir="$base" \
  --config.stages=pretrain,sft
alignax sweep --config=configs/dpo.py:tiny --config.init.workdir="$base/sft" \
  --out="$base/sweeps/dpo_loss_types" --grid=dpo.loss_type=sigmoid,robust,ipo,hinge,simpo,orpo \
  --grid=seed=0,1 \
  --metrics=eval/gold_reward,eval/kl_to_reference,eval/accuracy,eval/refusal_rate "$@"
