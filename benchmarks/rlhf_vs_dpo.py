"""RLHF vs DPO on the alignment world: gold reward against KL to the reference, over training.

  python benchmarks/rlhf_vs_dpo.py --base=runs/pipeline_tiny
  python benchmarks/rlhf_vs_dpo.py --base=runs/pipeline_tiny --dpo_betas=0.03,0.1,0.3 \
      --ppo_targets=0.5,1,2 --seeds=0,1
  python benchmarks/rlhf_vs_dpo.py --methods=ppo,grpo,rloo,dpo,ipo,simpo --grpo_kl_coefs=0.02,0.05

From the SFT and reward-model exports of a pipeline directory (its first three stages are run
first when missing), trains each of `--methods` over its own knob, per seed: the DPO family
(dpo, ipo, simpo, ... = `dpo.loss_type`) over `--dpo_betas`, PPO (adaptive KL controller) over
`--ppo_targets`, GRPO and RLOO over their KL coefficients (`--grpo_kl_coefs`, `--rloo_kl_coefs`), evaluating every `--eval_every` steps: gold reward and sequence KL to the SFT reference
of fresh samples (as in the DPO paper's sentiment frontier), and for PPO also the reward model's
(proxy) score of the same samples against their gold reward (over-optimization, Gao et al. 2022).
Writes results.csv, results.json, frontier.png and overoptimization.png to --out.
"""

from __future__ import annotations

import csv
import json
import os
import sys

from absl import app, flags

_BASE = flags.DEFINE_string("base", "runs/pipeline_tiny", "Pipeline directory with sft/ and reward/ exports.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/rlhf_vs_dpo", "Output directory.")
_BETAS = flags.DEFINE_string("dpo_betas", "0.03,0.1,0.3", "DPO betas.")
_TARGETS = flags.DEFINE_string("ppo_targets", "0.5,1,2", "PPO KL targets (nats per sequence).")
_HORIZON = flags.DEFINE_integer("ppo_horizon", 160, "Samples over which PPO's KL controller moves its "
                                "coefficient (Ziegler et al. use 10000 over far longer runs; with "
                                "40 iterations of 32 prompts that would hold it fixed).")
_METHODS = flags.DEFINE_list("methods", ["dpo", "ppo"], "Methods: ppo, grpo, rloo, and DPO-family "
                             "loss types (dpo = sigmoid, ipo, simpo, robust, hinge, orpo).")
_GRPO_KL = flags.DEFINE_string("grpo_kl_coefs", "0.02,0.05", "GRPO KL coefficients.")
_RLOO_KL = flags.DEFINE_string("rloo_kl_coefs", "0.02,0.05", "RLOO KL coefficients.")
_GROUP_STEPS = flags.DEFINE_integer("group_steps", 60, "GRPO / RLOO iterations per run.")
_SEEDS = flags.DEFINE_string("seeds", "0", "Seeds.")
_DPO_STEPS = flags.DEFINE_integer("dpo_steps", 150, "DPO steps per run.")
_PPO_STEPS = flags.DEFINE_integer("ppo_steps", 40, "PPO iterations per run.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 10, "Steps between evaluations (PPO: iterations).")
_PROMPTS = flags.DEFINE_integer("eval_prompts", 64, "Eval prompts per evaluation.")
_PRESET = flags.DEFINE_string("preset", "tiny", "Pipeline preset whose stage configs are used.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Extra overrides KEY=VALUE on the pipeline config "
                                       "(e.g. --set=dpo.train.batch_size=8).")


def _parse(value: str):
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(value.lower(), value)


def pipeline_config(base: str, preset: str, overrides):
  from alignax.config import load_config_file
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = load_config_file(os.path.join(root, "configs", "pipeline.py"), preset)
  cfg.workdir = base
  for item in overrides:
    key, _, value = item.partition("=")
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = _parse(value)
  return cfg


def ensure_base(cfg) -> None:
  """The pretrain, SFT and reward-model stages of the base pipeline, run when missing."""
  from alignax import checkpoint as ckpt_lib
  from alignax.algorithms import run_stage
  from alignax.pipeline import stage_config
  for name in ("pretrain", "sft", "reward"):
    scfg = stage_config(cfg, name)
    if not ckpt_lib.has_export(scfg.workdir):
      print(f"base: running {name} into {scfg.workdir}", flush=True)
      if not run_stage(scfg).finished:
        raise SystemExit(f"{name} stopped before finishing; rerun to resume")


RL_METHODS = ("ppo", "grpo", "rloo")


def stage_of(method: str) -> str:
  return method if method in RL_METHODS else "dpo"


def knob(method: str) -> str:
  return {"ppo": "KL target", "grpo": "KL coef", "rloo": "KL coef"}.get(method, "beta")


def run_setting(cfg, method: str, value: float, seed: int, out: str) -> str:
  """Trains one run of `method` at its knob's `value` (skipped when finished); returns its workdir."""
  from alignax import checkpoint as ckpt_lib
  from alignax.algorithms import run_stage
  from alignax.pipeline import stage_config
  stage = stage_of(method)
  scfg = stage_config(cfg, stage)
  tag = f"{method}_{'kl' if method in RL_METHODS else 'beta'}{value:g}_seed{seed}"
  with scfg.unlocked():
    scfg.workdir = os.path.join(out, "runs", tag)
    scfg.seed = seed
    scfg.train.eval_every = _EVAL_EVERY.value
    scfg.train.progress = True
    scfg.eval.num_prompts = _PROMPTS.value
    scfg.eval.showcase = False
    if stage == "dpo":
      scfg.dpo.loss_type = "sigmoid" if method == "dpo" else method
      scfg.dpo.beta = value
      scfg.train.steps = _DPO_STEPS.value
    elif method in ("grpo", "rloo"):
      scfg[method].kl_coef = value
      scfg.train.steps = _GROUP_STEPS.value
    else:
      scfg.ppo.adaptive_kl = True
      scfg.ppo.target_kl = value
      scfg.ppo.horizon = _HORIZON.value
      scfg.train.steps = _PPO_STEPS.value
  if not ckpt_lib.has_export(scfg.workdir):
    print(f"{tag}: training into {scfg.workdir}", flush=True)
    run_stage(scfg)
  return scfg.workdir


def collect(workdir: str, method: str, value: float, seed: int) -> list[dict]:
  from alignax.metrics import read_metrics
  rows = []
  for r in read_metrics(workdir):
    if "eval/gold_reward" in r:
      rows.append({"method": method, "setting": value, "seed": seed, "step": r["step"],
                   "kl": r.get("eval/kl_to_reference"), "gold_reward": r["eval/gold_reward"],
                   "proxy_reward": r.get("eval/proxy_reward"), "accuracy": r.get("eval/accuracy"),
                   "refusal_rate": r.get("eval/refusal_rate")})
  return rows


def plot(rows: list[dict], out: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  fig, ax = plt.subplots(figsize=(6, 4.5))
  settings = sorted({(r["method"], r["setting"], r["seed"]) for r in rows})
  palette = (plt.cm.Oranges, plt.cm.Greens, plt.cm.Blues, plt.cm.Purples, plt.cm.Reds, plt.cm.Greys)
  methods = list(dict.fromkeys(s[0] for s in settings))
  for m_i, method in enumerate(methods):
    mine = [s for s in settings if s[0] == method]
    for k, key in enumerate(mine):
      pts = sorted((r for r in rows if (r["method"], r["setting"], r["seed"]) == key), key=lambda r: r["step"])
      color = palette[m_i % len(palette)](0.4 + 0.6 * (k + 1) / max(len(mine), 1))
      label = f"{method.upper()} {knob(method)} {key[1]:g} (seed {key[2]})"
      ax.plot([p["kl"] for p in pts], [p["gold_reward"] for p in pts], marker="o", ms=3, color=color, label=label)
  ax.set_xlabel("KL(policy || SFT reference), nats per sequence")
  ax.set_ylabel("gold reward")
  ax.set_title("Reward / KL frontier on the alignment world")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
  plt.close(fig)
  written.append("frontier.png")

  ppo_rows = [r for r in rows if r["method"] == "ppo" and r["proxy_reward"] is not None]
  if ppo_rows:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, key in enumerate(sorted({(r["setting"], r["seed"]) for r in ppo_rows})):
      pts = sorted((r for r in ppo_rows if (r["setting"], r["seed"]) == key), key=lambda r: r["step"])
      color = plt.cm.Oranges(0.4 + 0.6 * (k + 1) / 4)
      label = f"KL target {key[0]:g} (seed {key[1]})"
      axes[0].plot([p["kl"] for p in pts], [p["proxy_reward"] for p in pts], "--", color=color, label=f"proxy, {label}")
      axes[0].plot([p["kl"] for p in pts], [p["gold_reward"] for p in pts], "-", color=color, label=f"gold, {label}")
      axes[1].plot([p["proxy_reward"] for p in pts], [p["gold_reward"] for p in pts], marker="o", ms=3, color=color,
                   label=label)
    axes[0].set_xlabel("KL to SFT (nats)")
    axes[0].set_ylabel("reward")
    axes[0].set_title("proxy (reward model) vs gold, PPO")
    axes[0].legend(fontsize=6)
    axes[1].set_xlabel("proxy reward (reward model)")
    axes[1].set_ylabel("gold reward")
    axes[1].set_title("over-optimization: gold against proxy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "overoptimization.png"), dpi=120)
    plt.close(fig)
    written.append("overoptimization.png")
  return written


def main(_):
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  cfg = pipeline_config(_BASE.value, _PRESET.value, _OVERRIDES.value)
  ensure_base(cfg)
  rows = []
  values = {"ppo": _TARGETS.value, "grpo": _GRPO_KL.value, "rloo": _RLOO_KL.value}
  from alignax.losses.preference import LOSS_TYPES
  for method in _METHODS.value:
    if method not in RL_METHODS and method != "dpo" and method not in LOSS_TYPES:
      raise SystemExit(f"--methods: unknown method {method!r}")
  for seed in (int(s) for s in _SEEDS.value.split(",")):
    for method in _METHODS.value:
      for value in (float(v) for v in values.get(method, _BETAS.value).split(",") if v):
        rows += collect(run_setting(cfg, method, value, seed, out), method, value, seed)
  with open(os.path.join(out, "results.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
  plots = plot(rows, out)
  print(f"{'method':<6} {'setting':>8} {'seed':>4} {'KL':>7} {'gold':>7} {'proxy':>7}")
  for key in sorted({(r["method"], r["setting"], r["seed"]) for r in rows}):
    last = max((r for r in rows if (r["method"], r["setting"], r["seed"]) == key), key=lambda r: r["step"])
    proxy = f"{last['proxy_reward']:.3f}" if last["proxy_reward"] is not None else "-"
    print(f"{key[0]:<6} {key[1]:>8g} {key[2]:>4} {last['kl']:>7.3f} {last['gold_reward']:>7.3f} {proxy:>7}")
  print(f"wrote {out}: results.csv, results.json, " + ", ".join(plots))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
