#!/usr/bin/env bash
# PPO's KL penalty coefficient against gold reward and KL to the SFT reference, over 2 seeds.
# Usage: experiments/ppo_kl_sweep.sh [BASE=runs/pipeline_tiny] [extra alignax flags...]
set -euo pipefail
base=${1:-runs/pipeline_tiny}
shift || true
alignax pipeline --config=configs/pipeline.py:tiny --config.workdir="$base" \
  --config.stages=pretrain,sft,reward
alignax sweep --config=configs/ppo.py:tiny --config.init.workdir="$base/sft" \
  --config.reward_model.workdir="$base/reward" \
  --out="$base/sweeps/ppo_kl" --grid=ppo.kl_coef=0.01,0.05,0.2 --grid=seed=0,1 \
  --metrics=eval/gold_reward,eval/proxy_reward,eval/kl_to_reference,eval/accuracy "$@"
