"""The main job as a script: the same as `alignax pipeline`, for runs launched by path.

  python experiments/pipeline.py --config=configs/pipeline.py:tiny --config.workdir=runs/pipeline_tiny

pretrain -> SFT -> reward model -> PPO and DPO on the world task, then WORKDIR/report.md; see
configs/pipeline.py for the keys and alignax/commands/pipeline.py for how stages chain and resume.
"""

import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from alignax.cli import main
  main(["alignax", "pipeline", *sys.argv[1:]])
