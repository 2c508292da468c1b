#!/usr/bin/env bash
# DPO's beta against gold reward, KL to the SFT reference and accuracy, over 3 seeds, on the world.
# Usage: experiments/dpo_beta_sweep.sh [BASE=runs/pipeline_tiny] [extra alignax flags...]
# Runs the pipeline's pretrain, SFT and reward stages into BASE first when they are missing.
set -euo pipefail
base=${1:-runs/pipeline_tiny}
shift || true
alignax pipeline --config=configs/pipeline.py:tiny --config.workdir="$base" \
  --config.stages=pretrain,sft
alignax sweep --config=configs/dpo.py:tiny --config.init.workdir="$base/sft" \
  --out="$base/sweeps/dpo_beta" --grid=dpo.beta=0.03,0.1,0.3,1.0 --grid=seed=0,1,2 \
  --metrics=eval/gold_reward,eval/kl_to_reference,eval/accuracy,eval/refusal_rate "$@"
