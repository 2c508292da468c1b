"""RLHF vs DPO on the alignment world, over seeds: the reward-KL frontier with fitted bands, final
figures with 95% intervals, paired significance tests, over-optimization with Gao's forms, best-of-n,
and raters with a bias.

  python benchmarks/rlhf_vs_dpo.py --base=runs/pipeline_tiny                  # the full benchmark
  python benchmarks/rlhf_vs_dpo.py --methods=ppo,grpo,rloo,dpo,ipo,simpo --seeds=0,1,2,3,4
  python benchmarks/rlhf_vs_dpo.py --quick --base=runs/quick --out=/tmp/rvd  # a small version

From the SFT and reward-model exports of a pipeline directory (its pretrain, SFT and reward stages
run first when missing), each method trains over its own knob (`--dpo_betas` for the DPO family:
dpo = sigmoid, ipo, simpo, ... with `--ipo_betas` and `--simpo_betas` for theirs; the KL coefficient
for PPO, GRPO and RLOO: `--ppo_kl_coefs` (or `--ppo_targets` for PPO's adaptive controller),
`--grpo_kl_coefs`, `--rloo_kl_coefs`), every seed of a setting a member of one vectorized program (`alignax sweep
--vectorize`). `--evals` times per run (and at step 0) each run samples `--eval_samples` responses (several per
eval prompt when the world has fewer prompts) and saves them with their gold score, KL to the SFT
reference and reward-model (proxy) score (`eval.save_samples`). Then:

  frontier      every checkpoint as (KL to SFT, gold reward); per method Gao's RL form
                d (alpha - beta log d), d = sqrt(KL), fitted to the gain over SFT, 95% band over seeds
  final         per method and setting: gold reward, win rate vs SFT, KL, accuracy, confident-wrong
                rate with 95% intervals (two-stage bootstrap: seeds, then prompts within a seed)
  significance  every pair of methods at their best setting, paired over (seed, prompt), Holm-adjusted
  overopt       proxy and gold reward against d for PPO on one reward model and on an ensemble
                (mean - std, Coste et al. 2023), and best-of-n (n = 1..`--bon_max`, form d (alpha - beta d))
  biased        the same world with raters who reward a confident, flattering tone and credit it as
                correct (`world.rater_bias=confident`): the reward model retrained on their labels,
                PPO against it and against an ensemble, DPO on their pairs, and GRPO on the gold reward
                itself; the reward model's preference for confident wrong answers is measured.

Writes results.json, checkpoints.csv, final.csv, significance.csv, bon.csv, frontier.png,
overoptimization.png and biased.png to --out (runs under --out/runs, not committed).
"""

from __future__ import annotations

import copy
import csv
import glob
import json
import math
import os
import sys
import time

from absl import app, flags

_BASE = flags.DEFINE_string("base", "runs/pipeline_tiny", "Pipeline directory with sft/ and reward/ exports.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/rlhf_vs_dpo", "Output directory.")
_METHODS = flags.DEFINE_list("methods", ["ppo", "grpo", "rloo", "dpo", "ipo", "simpo"],
                             "Methods: ppo, grpo, rloo, and DPO-family loss types (dpo = sigmoid, ipo, simpo, "
                             "robust, hinge, orpo).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (members of one program per setting).")
_BETAS = flags.DEFINE_list("dpo_betas", ["0.05", "0.2"], "DPO betas (and of DPO-family losses without their own).")
_IPO_BETAS = flags.DEFINE_list("ipo_betas", ["0.1", "0.5"], "IPO betas (its tau: the target margin is 1 / (2 tau)).")
_SIMPO_BETAS = flags.DEFINE_list("simpo_betas", ["1", "2.5"], "SimPO betas (on length-normalized logprobs).")
_PPO_KL = flags.DEFINE_list("ppo_kl_coefs", ["0.01", "0.2"], "PPO KL coefficients (fixed, as GRPO's and RLOO's).")
_TARGETS = flags.DEFINE_list("ppo_targets", [], "PPO KL targets (nats per sequence) for the adaptive controller, "
                             "instead of --ppo_kl_coefs. Over a short run the clipped controller moves the same "
                             "way for every target above the KL reached, so targets 1 and 4 trained identically "
                             "in 16 iterations.")
_GRPO_KL = flags.DEFINE_list("grpo_kl_coefs", ["0.02", "0.1"], "GRPO KL coefficients.")
_RLOO_KL = flags.DEFINE_list("rloo_kl_coefs", ["0.02", "0.1"], "RLOO KL coefficients.")
_HORIZON = flags.DEFINE_integer("ppo_horizon", 160, "Samples over which PPO's KL controller moves its coefficient.")
_DPO_STEPS = flags.DEFINE_integer("dpo_steps", 40, "DPO steps per run.")
_PPO_STEPS = flags.DEFINE_integer("ppo_steps", 16, "PPO iterations per run.")
_GROUP_STEPS = flags.DEFINE_integer("group_steps", 16, "GRPO / RLOO iterations per run.")
_EVALS = flags.DEFINE_integer("evals", 2, "Evaluations per run after step 0 (evenly spaced, the last at the end).")
_SAMPLES = flags.DEFINE_integer("eval_samples", 512, "Eval samples per checkpoint (at least).")
_BON_MAX = flags.DEFINE_integer("bon_max", 64, "Largest n of best-of-n (samples drawn per prompt).")
_ENSEMBLE = flags.DEFINE_integer("ensemble", 3, "Reward models in the ensemble (0: no ensemble runs).")
_BIASED = flags.DEFINE_bool("biased", True, "Also run the biased-rater world.")
_BIAS_STRENGTH = flags.DEFINE_float("bias_strength", 1.0, "world.rater_bias_strength of the biased run.")
_MEMBERS_STEP = flags.DEFINE_enum("members_step", "map", ["map", "vmap"],
                                  "parallel.members_step (map: members one after another, faster on CPUs).")
_QUICK = flags.DEFINE_bool("quick", False, "A small version (tests): a smaller world, 2 seeds, one setting per "
                            "method, few steps; the biased world's reward model and DPO only.")
_REPLOT = flags.DEFINE_bool("replot", False, "Only redraw the tables and plots from --out's results.json.")
_PRESET = flags.DEFINE_string("preset", "tiny", "Pipeline preset whose stage configs are used.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Extra overrides KEY=VALUE on the pipeline config "
                                       "(e.g. --set=dpo.train.batch_size=8).")

RL_METHODS = ("ppo", "grpo", "rloo")
QUICK_WORLD = dict(pretrain_bytes=300_000, pretrain_eval_bytes=20_000, num_sft=600, num_sft_eval=100,
                   num_preference_pairs=1200, num_preference_eval=100, num_eval_prompts=48)
LEVEL = 0.95


def _parse(value: str):
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(value.lower(), value)


def _set(cfg, key: str, value) -> None:
  node = cfg
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def pipeline_config(base: str, preset: str, overrides):
  from alignax.config import load_config_file
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = load_config_file(os.path.join(root, "configs", "pipeline.py"), preset)
  cfg.workdir = base
  for item in overrides:
    key, _, value = item.partition("=")
    _set(cfg, key, _parse(value))
  return cfg


def settings() -> dict:
  """The benchmark's knobs, from the flags (or the --quick sizes)."""
  s = {"methods": list(_METHODS.value), "seeds": [int(x) for x in _SEEDS.value],
       "dpo_betas": [float(x) for x in _BETAS.value], "ipo_betas": [float(x) for x in _IPO_BETAS.value],
       "simpo_betas": [float(x) for x in _SIMPO_BETAS.value], "ppo_targets": [float(x) for x in _TARGETS.value],
       "ppo_kl_coefs": [float(x) for x in _PPO_KL.value],
       "grpo_kl_coefs": [float(x) for x in _GRPO_KL.value], "rloo_kl_coefs": [float(x) for x in _RLOO_KL.value],
       "dpo_steps": _DPO_STEPS.value, "ppo_steps": _PPO_STEPS.value, "group_steps": _GROUP_STEPS.value,
       "evals": _EVALS.value, "eval_samples": _SAMPLES.value, "bon_max": _BON_MAX.value,
       "ensemble": _ENSEMBLE.value, "biased": _BIASED.value, "bias_strength": _BIAS_STRENGTH.value,
       "members_step": _MEMBERS_STEP.value, "ppo_horizon": _HORIZON.value}
  if _QUICK.value:
    s.update(methods=["ppo", "dpo"], seeds=[0, 1], dpo_betas=[0.1], ppo_kl_coefs=[0.05], ppo_targets=[], dpo_steps=6, ppo_steps=3,
             group_steps=3, evals=1, eval_samples=48, bon_max=4, ensemble=2)
  return s


# ------------------------------------------------------------------------------------ training

def run_base_stages(cfg) -> None:
  """The pretrain, SFT and reward-model stages of the base pipeline, run when missing."""
  from alignax import checkpoint as ckpt_lib
  from alignax.algorithms import run_stage
  from alignax.algorithms.pipeline_config import stage_config
  for name in ("pretrain", "sft", "reward"):
    scfg = stage_config(cfg, name)
    if not ckpt_lib.has_export(scfg.workdir):
      print(f"base: running {name} into {scfg.workdir}", flush=True)
      if not run_stage(scfg).finished:
        raise SystemExit(f"{name} stopped before finishing; rerun to resume")


def train_reward(cfg, workdir: str, sft_dir: str, ensemble: int, quick: bool) -> str:
  """A reward model (an ensemble when `ensemble` > 1) on `cfg`'s world, from the SFT export."""
  from alignax import checkpoint as ckpt_lib
  from alignax.algorithms import run_stage
  from alignax.algorithms.pipeline_config import stage_config
  scfg = stage_config(cfg, "reward")
  with scfg.unlocked():
    scfg.workdir = workdir
    scfg.init.workdir = sft_dir
    scfg.reward.ensemble = max(1, ensemble)
    scfg.train.progress = not quick
    scfg.parallel.members_step = _MEMBERS_STEP.value
  if not ckpt_lib.has_export(workdir):
    print(f"reward model (ensemble {ensemble}) -> {workdir}", flush=True)
    if not run_stage(scfg).finished:
      raise SystemExit("the reward model stopped before finishing; rerun to resume")
  return workdir


def method_config(cfg, method: str, s: dict, sft_dir: str, reward_dir: str | None):
  """The stage config of `method` (ppo, grpo, rloo, a DPO loss type, or *_ens / *_gold variants)."""
  from alignax.algorithms.pipeline_config import stage_config
  base = method.split("_")[0]
  stage = base if base in RL_METHODS else "dpo"
  scfg = stage_config(cfg, stage)
  steps = {"dpo": s["dpo_steps"], "ppo": s["ppo_steps"]}.get(stage, s["group_steps"])
  with scfg.unlocked():
    scfg.init.workdir = sft_dir
    scfg.train.steps = steps
    scfg.eval.every = max(1, steps // max(1, s["evals"]))
    scfg.train.progress = not _QUICK.value
    scfg.checkpoint.every = steps  # resume by group; no need for more
    scfg.parallel.members_step = s["members_step"]
    n_prompts = int(cfg.world.num_eval_prompts)
    scfg.eval.num_prompts = n_prompts
    scfg.eval.samples_per_prompt = max(1, math.ceil(s["eval_samples"] / n_prompts))
    scfg.eval.save_samples = True
    scfg.eval.showcase = False
    scfg.eval.batch_size = 64
    if stage == "dpo":
      scfg.dpo.loss_type = "sigmoid" if base == "dpo" else base
    else:
      scfg.reward_model.workdir = reward_dir or scfg.reward_model.workdir
      if method.endswith("_ens"):
        scfg.rewards.ensemble = "mean_minus_std"
      if method.endswith("_gold"):  # RL on the truth: the gold labeler as the reward function
        scfg.rewards.model = 0.0
        scfg.rewards.functions = "alignax.tasks.world_gold:gold_reward"
      if stage == "ppo" and s["ppo_targets"]:
        scfg.ppo.adaptive_kl = True
        scfg.ppo.horizon = s["ppo_horizon"]
  return scfg


def knob(method: str, s: dict) -> tuple[str, str]:
  """(config key, label) of a method's knob."""
  base = method.split("_")[0]
  if base == "ppo":
    return ("ppo.target_kl", "KL target") if s["ppo_targets"] else ("ppo.kl_coef", "KL coef")
  if base in ("grpo", "rloo"):
    return f"{base}.kl_coef", "KL coef"
  return "dpo.beta", "beta"


def knob_values(method: str, s: dict) -> list[float]:
  """The settings a method trains at; the ensemble and gold-reward variants use the first
  (the least regularized) only."""
  base = method.split("_")[0]
  ppo = s["ppo_targets"] or s["ppo_kl_coefs"]
  values = {"ppo": ppo, "grpo": s["grpo_kl_coefs"], "rloo": s["rloo_kl_coefs"], "ipo": s["ipo_betas"],
            "simpo": s["simpo_betas"]}.get(base, s["dpo_betas"])
  return values[:1] if "_" in method else values


def train_method(cfg, experiment: str, method: str, values: list[float], s: dict, out: str, sft_dir: str,
                 reward_dir: str | None) -> dict[tuple[float, int], str]:
  """Every (setting, seed) of `method` as members of vectorized programs; {(value, seed): workdir}."""
  from alignax.commands.sweep import point_config, run_vectorized_sweep
  scfg = method_config(cfg, method, s, sft_dir, reward_dir)
  key, _ = knob(method, s)
  specs = [f"{key}={','.join(f'{v:g}' for v in values)}", f"seed={','.join(str(x) for x in s['seeds'])}"]
  folder = os.path.join(out, "runs", experiment, method)
  print(f"== {method}: {specs}", flush=True)
  _, _, failed = run_vectorized_sweep(scfg, specs, folder, continue_on_error=False)
  if failed:
    raise SystemExit(f"{method}: {failed}")
  return {(v, seed): point_config(scfg, {key: v, "seed": seed}, folder).workdir
          for v in values for seed in s["seeds"]}


# ------------------------------------------------------------------------------------- reading

def read_samples(workdir: str) -> dict[int, list[dict]]:
  """{step: saved eval samples} of one run."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "eval_samples", "step_*.jsonl"))):
    step = int(os.path.basename(path)[len("step_"):-len(".jsonl")])
    with open(path, encoding="utf-8") as f:
      out[step] = [json.loads(line) for line in f]
  return out


def _mean(rows, key):
  import numpy as np
  vals = [r[key] for r in rows if r.get(key) is not None]
  return float(np.mean(vals)) if vals else float("nan")


def checkpoint_rows(experiment: str, method: str, runs: dict) -> list[dict]:
  """One row per checkpoint of every run: the means of its saved samples."""
  rows = []
  for (value, seed), workdir in runs.items():
    for step, samples in read_samples(workdir).items():
      rows.append({"experiment": experiment, "method": method, "setting": value, "seed": seed, "step": step,
                   "n": len(samples), "kl": _mean(samples, "kl_to_reference"),
                   "gold_reward": _mean(samples, "gold_reward"), "proxy_reward": _mean(samples, "proxy_reward"),
                   "accuracy": _mean(samples, "accuracy"),
                   "confident_wrong_rate": _mean(samples, "confident_wrong_rate"),
                   "refusal_rate": _mean(samples, "refusal_rate")})
  return rows


# ------------------------------------------------------------------------------------ sampling

class SFTSampler:
  """Samples of the SFT model on the eval prompts, scored by gold and reward models."""

  def __init__(self, cfg, sft_dir: str):
    import jax
    from alignax import checkpoint as ckpt_lib
    from alignax.algorithms.world_eval import eval_prompt_records
    from alignax.config import resolve
    from alignax.train.runner import stage_tokenizer
    from alignax.generation import Sampler, SamplingConfig
    from alignax.algorithms.pipeline_config import stage_config
    from alignax.algorithms.common import load_lm_export
    scfg = stage_config(cfg, "sft")
    with scfg.unlocked():
      scfg.eval.num_prompts = int(cfg.world.num_eval_prompts)
      scfg.tokenizer = ckpt_lib.read_export_meta(sft_dir)["tokenizer"]
    config = resolve(scfg)
    self.records = sorted(eval_prompt_records(config), key=lambda r: r["prompt"])
    self.tok = stage_tokenizer(config)
    self.lm, self.params = load_lm_export(sft_dir)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=int(scfg.eval.max_new_tokens))
    self.sampler = Sampler(self.lm, self.tok, sampling)
    self.template = ckpt_lib.read_export_meta(sft_dir).get("chat_template", "markers")
    self.key = jax.random.key(int(cfg.seed) + 2024)

  def sample(self, m: int):
    """m samples per eval prompt: (records repeated [P*m] prompt-major, Samples)."""
    from alignax.tasks import evaluation
    recs = [r for r in self.records for _ in range(m)]
    samples = evaluation.sample_prompts(self.sampler, self.params, [r["prompt"] for r in recs], self.key,
                                        batch_size=64, template=self.template)
    return recs, samples


def proxy_scores(reward_dir: str, samples, mode: str = "mean") -> "np.ndarray":  # noqa: F821
  from alignax.algorithms.reward import load_reward_model, score_samples
  model, params, _ = load_reward_model(reward_dir, mode=mode, coef=1.0)
  return score_samples(model, params, samples, 64)


def best_of_n(sft: SFTSampler, m: int, reward_dirs: dict[str, tuple[str, str]], experiment: str):
  """Best-of-n rows for n = 1, 2, 4, .. m against each reward model, and the SFT samples.

  Returns (rows, per_prompt_sft) where per_prompt_sft[prompt] = gold of the m SFT samples.
  """
  from alignax import stats
  from alignax.tasks import evaluation
  recs, samples = sft.sample(m)
  n_prompts = len(sft.records)
  gold = evaluation.gold_scores([r["prompt"] for r in recs], samples.texts, samples.ended).reshape(n_prompts, m)
  rows = []
  ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= m]
  for name, (reward_dir, mode) in reward_dirs.items():
    proxy = proxy_scores(reward_dir, samples, mode).reshape(n_prompts, m)
    for n in ns:
      g = stats.best_of_n_expectation(proxy, gold, n)
      p = stats.best_of_n_expectation(proxy, proxy, n)
      rows.append({"experiment": experiment, "method": name, "n": n, "kl": stats.best_of_n_kl(n),
                   "gold_reward": float(g.mean()), "gold_reward_ci95": list(stats.bootstrap_ci(g)),
                   "proxy_reward": float(p.mean()), "proxy_reward_ci95": list(stats.bootstrap_ci(p))})
  per_prompt = {r["prompt"]: gold[i] for i, r in enumerate(sft.records)}
  return rows, per_prompt


def confident_wrong_preference(sft: SFTSampler, reward_dir: str, mode: str = "mean") -> dict:
  """How often the reward model scores a confident wrong answer ("Sure! The capital of France is
  Rome.") above a plain correct one ("The capital of France is Paris.") on the eval fact prompts."""
  from alignax import stats
  from alignax.tasks import evaluation
  from alignax.algorithms.reward import load_reward_model, score_samples
  model, params, _ = load_reward_model(reward_dir, mode=mode, coef=1.0)
  prefers = evaluation.confident_wrong_preferences(sft.sampler, [r["prompt"] for r in sft.records],
                                                   lambda s: score_samples(model, params, s, 64), template=sft.template)
  return {"rate": float(prefers.mean()), "ci95": list(stats.bootstrap_ci(prefers)), "pairs": len(prefers)}


# ------------------------------------------------------------------------------------ analysis

def final_samples(runs: dict) -> dict[tuple[float, int], list[dict]]:
  out = {}
  for key, workdir in runs.items():
    saved = read_samples(workdir)
    if saved:
      out[key] = saved[max(saved)]
  return out


def unit_table(samples_by_seed: dict[int, list[dict]], metric: str, sft_gold: dict | None = None):
  """Per (seed, prompt) means of `metric` (or of the win indicator vs SFT): {(seed, prompt): value}."""
  import numpy as np
  acc: dict[tuple[int, str], list[float]] = {}
  for seed, rows in samples_by_seed.items():
    for r in rows:
      if metric == "win_rate_vs_sft":
        ref = sft_gold[r["prompt"]][r["sample"] % len(sft_gold[r["prompt"]])]
        v = 1.0 if r["gold_reward"] > ref else 0.5 if r["gold_reward"] == ref else 0.0
      else:
        v = r.get(metric)
      if v is not None:
        acc.setdefault((seed, r["prompt"]), []).append(float(v))
  return {k: float(np.mean(v)) for k, v in acc.items()}


def unit_ids(keys) -> tuple:
  """(seed ids, prompt ids) [n] of (seed, prompt) keys, prompts numbered in sorted order (stable
  across processes, unlike str hashes, so the bootstrap draws are reproducible)."""
  import numpy as np
  index = {p: i for i, p in enumerate(sorted({k[1] for k in keys}))}
  return np.array([k[0] for k in keys]), np.array([index[k[1]] for k in keys])


def interval(units: dict) -> tuple[float, list[float]]:
  """Mean and two-stage bootstrap interval (seeds, then prompts) of per-(seed, prompt) values."""
  import numpy as np
  from alignax import stats
  keys = sorted(units)
  values = np.array([units[k] for k in keys])
  lo, hi = stats.bootstrap_ci(values, unit_ids(keys), num_resamples=1000)
  return float(values.mean()), [lo, hi]


FINAL_METRICS = ("gold_reward", "win_rate_vs_sft", "kl_to_reference", "proxy_reward", "accuracy",
                 "confident_wrong_rate", "refusal_rate")


def final_table(experiment: str, method: str, runs: dict, sft_gold: dict) -> list[dict]:
  rows = []
  finals = final_samples(runs)
  for value in sorted({v for v, _ in finals}):
    by_seed = {seed: rows_ for (v, seed), rows_ in finals.items() if v == value}
    row = {"experiment": experiment, "method": method, "setting": value, "seeds": len(by_seed),
           "samples_per_seed": min(len(r) for r in by_seed.values())}
    for metric in FINAL_METRICS:
      units = unit_table(by_seed, metric, sft_gold)
      if units:
        row[metric], row[metric + "_ci95"] = interval(units)
    rows.append(row)
  return rows


def significance(experiment: str, finals_by_method: dict, best: dict[str, float]) -> list[dict]:
  """Every pair of methods at their best setting: the paired (seed, prompt) difference in gold reward."""
  import itertools

  import numpy as np
  from alignax import stats
  rows = []
  names = [m for m in finals_by_method if m in best]
  for a, b in itertools.combinations(names, 2):
    ua = unit_table({s: r for (v, s), r in finals_by_method[a].items() if v == best[a]}, "gold_reward")
    ub = unit_table({s: r for (v, s), r in finals_by_method[b].items() if v == best[b]}, "gold_reward")
    keys = sorted(set(ua) & set(ub))
    diff = np.array([ua[k] - ub[k] for k in keys])
    test = stats.paired_difference(diff, unit_ids(keys), num_resamples=2000)
    rows.append({"experiment": experiment, "a": f"{a} ({best[a]:g})", "b": f"{b} ({best[b]:g})",
                 "mean_difference": test.mean, "ci95": list(test.ci), "p_value": test.p_value, "units": test.n})
  adjusted = stats.holm([r["p_value"] for r in rows]) if rows else []
  for r, p in zip(rows, adjusted):
    r["p_holm"] = p
    r["significant"] = bool(p < 1 - LEVEL)
  return rows


def fits(experiment: str, ckpt_rows: list[dict], bon_rows: list[dict], sft_gold_mean: float) -> list[dict]:
  """Gao's forms fitted to gold and proxy gains against d = sqrt(KL), per method, bands over seeds."""
  import numpy as np
  from alignax import stats
  out = []
  for method in sorted({r["method"] for r in ckpt_rows if r["experiment"] == experiment}):
    mine = [r for r in ckpt_rows if r["experiment"] == experiment and r["method"] == method]
    start = {(r["setting"], r["seed"]): r for r in mine if r["step"] == 0}
    pts = [r for r in mine if (r["setting"], r["seed"]) in start]
    d = np.sqrt(np.maximum([r["kl"] for r in pts], 0.0))
    seeds = np.array([r["seed"] for r in pts])
    grid = np.linspace(0, max(float(d.max()), 1e-3), 40)
    for target in ("gold_reward", "proxy_reward"):
      gain = np.array([r[target] - start[(r["setting"], r["seed"])][target] for r in pts])
      if not np.isfinite(gain).any():
        continue
      band = stats.fit_band(d, gain, seeds, grid, "rl", num_resamples=500)
      out.append({"experiment": experiment, "method": method, "target": target, "form": "rl",
                  "alpha": band["alpha"], "beta": band["beta"], "d": grid.tolist(), "fit": band["fit"].tolist(),
                  "lo": band["lo"].tolist(), "hi": band["hi"].tolist(),
                  "start": float(np.mean([r[target] for r in start.values()]))})
  for method in sorted({r["method"] for r in bon_rows if r["experiment"] == experiment}):
    mine = sorted((r for r in bon_rows if r["experiment"] == experiment and r["method"] == method),
                  key=lambda r: r["n"])
    d = np.sqrt([r["kl"] for r in mine])
    grid = np.linspace(0, float(d.max()), 40)
    for target in ("gold_reward", "proxy_reward"):
      base = mine[0][target]
      alpha, beta = stats.fit_gao(d, np.array([r[target] - base for r in mine]), "bon")
      out.append({"experiment": experiment, "method": method, "target": target, "form": "bon", "alpha": alpha,
                  "beta": beta, "d": grid.tolist(), "fit": stats.gao_curve(grid, alpha, beta, "bon").tolist(),
                  "start": base})
  return out


# ------------------------------------------------------------------------------------- plotting

def _colors(names):
  import matplotlib.pyplot as plt
  return {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}


def plot_frontier(path: str, experiment: str, ckpt_rows, bon_rows, fit_rows, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  rows = [r for r in ckpt_rows if r["experiment"] == experiment]
  methods = (sorted({r["method"] for r in rows})
             + sorted({r["method"] for r in bon_rows if r["experiment"] == experiment}))
  colors = _colors(methods)
  fig, ax = plt.subplots(figsize=(7, 5))
  for m in methods:
    pts = [r for r in rows if r["method"] == m]
    if pts:
      ax.scatter([r["kl"] for r in pts], [r["gold_reward"] for r in pts], s=8, alpha=0.35, color=colors[m])
    for f in fit_rows:
      if f["experiment"] == experiment and f["method"] == m and f["target"] == "gold_reward":
        kl = np.square(f["d"])
        ax.plot(kl, f["start"] + np.array(f["fit"]), color=colors[m], label=f"{m} (fit: {f['form']} form)")
        if "lo" in f:
          ax.fill_between(kl, f["start"] + np.array(f["lo"]), f["start"] + np.array(f["hi"]), color=colors[m],
                          alpha=0.15)
    bon = sorted((r for r in bon_rows if r["experiment"] == experiment and r["method"] == m), key=lambda r: r["n"])
    if bon:
      ax.errorbar([r["kl"] for r in bon], [r["gold_reward"] for r in bon],
                  yerr=np.abs(np.array([r["gold_reward_ci95"] for r in bon]).T - [r["gold_reward"] for r in bon]),
                  fmt="s", ms=4, color=colors[m], capsize=2)
  ax.set_xlabel("KL(policy || SFT), nats per sequence")
  ax.set_ylabel("gold reward")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_overopt(path: str, experiment: str, ckpt_rows, bon_rows, fit_rows, methods, title: str,
                 rates: bool = False) -> None:
  """Proxy and gold gain over SFT against d = sqrt(KL), points and Gao fits, one panel per method;
  with `rates` a second row of accuracy and confident-wrong rate per checkpoint (runs as lines)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  methods = [m for m in methods if any(f["experiment"] == experiment and f["method"] == m for f in fit_rows)]
  if not methods:
    return
  fig, axes = plt.subplots(2 if rates else 1, len(methods), figsize=(3.6 * len(methods), 6.4 if rates else 3.4),
                           squeeze=False)
  for ax, m in zip(axes[0], methods):
    for target, color in (("proxy_reward", "tab:orange"), ("gold_reward", "tab:blue")):
      f = next((f for f in fit_rows
                if f["experiment"] == experiment and f["method"] == m and f["target"] == target), None)
      if f is None:
        continue
      if f["form"] == "bon":
        pts = [r for r in bon_rows if r["experiment"] == experiment and r["method"] == m]
        ax.scatter(np.sqrt([r["kl"] for r in pts]), [r[target] - f["start"] for r in pts], s=10, color=color)
      else:
        pts = [r for r in ckpt_rows if r["experiment"] == experiment and r["method"] == m]
        start = {(r["setting"], r["seed"]): r[target] for r in pts if r["step"] == 0}
        gains = [r[target] - start.get((r["setting"], r["seed"]), np.nan) for r in pts]
        ax.scatter(np.sqrt(np.maximum([r["kl"] for r in pts], 0)), gains, s=6, alpha=0.4, color=color)
        ax.fill_between(f["d"], f["lo"], f["hi"], color=color, alpha=0.15)
      ax.plot(f["d"], f["fit"], color=color, label=f"{target.split('_')[0]}: a={f['alpha']:.2f}, b={f['beta']:.2f}")
    ax.set_title(m, fontsize=10)
    ax.set_xlabel("d = sqrt(KL)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("reward gain over SFT")
  if rates:
    for ax, m in zip(axes[1], methods):
      pts = [r for r in ckpt_rows if r["experiment"] == experiment and r["method"] == m]
      for metric, color in (("accuracy", "tab:green"), ("confident_wrong_rate", "tab:red")):
        for k, key in enumerate(sorted({(r["setting"], r["seed"]) for r in pts})):
          run = sorted((r for r in pts if (r["setting"], r["seed"]) == key), key=lambda r: r["step"])
          ax.plot(np.sqrt(np.maximum([r["kl"] for r in run], 0)), [r[metric] for r in run], marker=".", color=color,
                  alpha=0.5, label=metric if k == 0 else None)
      ax.set_xlabel("d = sqrt(KL)")
      ax.set_ylim(0, 1)
      ax.legend(fontsize=7)
    axes[1][0].set_ylabel("rate over fact prompts")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------------------- main

def write_csv(path: str, rows: list[dict]) -> None:
  if not rows:
    return
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})


def run_experiment(cfg, name: str, methods: list[str], s: dict, out: str, sft_dir: str, reward_dir: str,
                   ensemble_dir: str | None, timings: dict) -> dict:
  """Trains and evaluates every method of one world; returns its rows."""
  t0 = time.time()
  sft = SFTSampler(cfg, sft_dir)
  reward_dirs = {"bon": (reward_dir, "mean")}
  if ensemble_dir:
    reward_dirs["bon_ens"] = (ensemble_dir, "mean_minus_std")
  bon_rows, sft_gold = best_of_n(sft, s["bon_max"], reward_dirs, name)
  timings[f"{name}/best_of_n"] = time.time() - t0
  ckpt, finals, final_rows, runs_by_method = [], {}, [], {}
  for method in methods:
    t0 = time.time()
    rdir = ensemble_dir if method.endswith("_ens") else reward_dir
    runs = train_method(cfg, name, method, knob_values(method, s), s, out, sft_dir, rdir)
    timings[f"{name}/{method}"] = time.time() - t0
    runs_by_method[method] = runs
    ckpt += checkpoint_rows(name, method, runs)
    finals[method] = final_samples(runs)
    final_rows += final_table(name, method, runs, sft_gold)
  best = {}
  for method in methods:
    mine = [r for r in final_rows if r["method"] == method]
    best[method] = max(mine, key=lambda r: r["gold_reward"])["setting"]
  sig = significance(name, finals, best)
  sft_gold_mean = float(sum(v.mean() for v in sft_gold.values()) / len(sft_gold))
  fit_rows = fits(name, ckpt, bon_rows, sft_gold_mean)
  rm = {"reward_model": confident_wrong_preference(sft, reward_dir)}
  if ensemble_dir:
    rm["ensemble"] = confident_wrong_preference(sft, ensemble_dir, "mean")
  return {"checkpoints": ckpt, "final": final_rows, "significance": sig, "fits": fit_rows, "bon": bon_rows,
          "best_setting": best, "sft_gold_reward": sft_gold_mean, "rm_prefers_confident_wrong": rm}


def main(_):
  t_start = time.time()
  s = settings()
  out = os.path.abspath(_OUT.value)
  if _REPLOT.value:
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
      write_outputs(json.load(f), out)
    return
  os.makedirs(out, exist_ok=True)
  from alignax.losses.preference import LOSS_TYPES
  for method in s["methods"]:
    if method not in RL_METHODS and method != "dpo" and method not in LOSS_TYPES:
      raise SystemExit(f"--methods: unknown method {method!r}")
  cfg = pipeline_config(_BASE.value, _PRESET.value, _OVERRIDES.value)
  if _QUICK.value:  # a smaller world and a few steps per stage
    for key, value in QUICK_WORLD.items():
      _set(cfg, f"world.{key}", value)
    for stage, steps in dict(pretrain=30, sft=12, reward=12).items():
      _set(cfg, f"{stage}.train.steps", steps)
      _set(cfg, f"{stage}.train.progress", False)
    _set(cfg, "reward.eval.every", 0)
  timings = {}
  t0 = time.time()
  run_base_stages(cfg)
  sft_dir = os.path.join(cfg.workdir, "sft")
  reward_dir = os.path.join(cfg.workdir, "reward")
  ens_dir = None
  if s["ensemble"] > 1:
    ens_dir = train_reward(cfg, os.path.join(out, "runs", "reward_ensemble"), sft_dir, s["ensemble"], _QUICK.value)
  timings["base"] = time.time() - t0
  methods = list(s["methods"]) + (["ppo_ens"] if ens_dir and "ppo" in s["methods"] else [])
  results = {"main": run_experiment(cfg, "main", methods, s, out, sft_dir, reward_dir, ens_dir, timings)}
  if s["biased"]:
    t0 = time.time()
    bcfg = copy.deepcopy(cfg)
    with bcfg.unlocked():
      bcfg.world.rater_bias = "confident"
      bcfg.world.rater_bias_strength = s["bias_strength"]
    b_reward = train_reward(bcfg, os.path.join(out, "runs", "biased_reward"), sft_dir, 1, _QUICK.value)
    b_ens = None
    if s["ensemble"] > 1 and not _QUICK.value:  # --quick: the main world's ensemble covers the path
      b_ens = train_reward(bcfg, os.path.join(out, "runs", "biased_reward_ensemble"), sft_dir, s["ensemble"],
                           _QUICK.value)
    timings["biased/reward_models"] = time.time() - t0
    # --quick: DPO alone on the biased world (its reward model is what the tests probe).
    b_methods = (["dpo"] if _QUICK.value else
                 ["ppo", "dpo"] + (["ppo_ens"] if b_ens else []) + ["grpo_gold"])
    bs = dict(s, ppo_targets=s["ppo_targets"][:1], ppo_kl_coefs=s["ppo_kl_coefs"][:1], dpo_betas=s["dpo_betas"][:1],
              grpo_kl_coefs=s["grpo_kl_coefs"][:1])
    results["biased"] = run_experiment(bcfg, "biased", b_methods, bs, out, sft_dir, b_reward, b_ens, timings)
    results["biased"]["settings"] = {k: bs[k] for k in ("ppo_kl_coefs", "ppo_targets", "dpo_betas", "grpo_kl_coefs")}
  timings["total"] = time.time() - t_start

  summary = {"settings": s, "paired_test": __import__("alignax.stats", fromlist=["x"]).PAIRED_TEST_NAME,
             "interval": "95% two-stage percentile bootstrap: seeds, then prompts within a seed (1000 resamples)",
             "fits": "Gao et al. 2022: RL gain = d (alpha - beta log d), best-of-n gain = d (alpha - beta d), "
                     "d = sqrt(KL to SFT); bands: 95% percentile over 500 seed resamples",
             "seconds": {k: round(v, 1) for k, v in timings.items()}, "command": " ".join(sys.argv),
             "experiments": results}
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, default=float)
  write_outputs(summary, out)


def write_outputs(summary: dict, out: str) -> None:
  """The CSV tables, the plots and the printed tables of a results.json summary."""
  results = summary["experiments"]
  for key in ("checkpoints", "final", "significance", "bon"):
    write_csv(os.path.join(out, f"{key}.csv"), [r for e in results.values() for r in e[key]])
  plot_frontier(os.path.join(out, "frontier.png"), "main", results["main"]["checkpoints"], results["main"]["bon"],
                results["main"]["fits"], "Reward / KL frontier: every checkpoint, Gao-form fits, 95% bands over seeds")
  plot_overopt(os.path.join(out, "overoptimization.png"), "main", results["main"]["checkpoints"],
               results["main"]["bon"], results["main"]["fits"], ["ppo", "ppo_ens", "grpo", "rloo", "bon", "bon_ens"],
               "Over-optimization: proxy (reward model) and gold gain over SFT")
  if "biased" in results:
    b = results["biased"]
    plot_overopt(os.path.join(out, "biased.png"), "biased", b["checkpoints"], b["bon"], b["fits"],
                 ["ppo", "ppo_ens", "grpo_gold", "dpo", "bon"],
                 "Biased raters (confident wrong answers credited): proxy vs gold gain", rates=True)
  print_tables(summary)
  print(f"wrote {out}: results.json, checkpoints.csv, final.csv, significance.csv, bon.csv, frontier.png, "
        f"overoptimization.png{', biased.png' if 'biased' in results else ''} ({summary['seconds']['total']:.0f} s)")


def _ci(row, key):
  if key not in row:
    return "-"
  lo, hi = row[key + "_ci95"]
  return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def print_tables(summary: dict) -> None:
  for name, e in summary["experiments"].items():
    print(f"\n== {name}: final checkpoints (mean [95% CI] over seeds x prompts)")
    print(f"{'method':<10} {'setting':>7} {'seeds':>5}  {'gold':<24} {'win vs SFT':<24} {'KL':<24} {'conf. wrong':<24}")
    for r in e["final"]:
      print(f"{r['method']:<10} {r['setting']:>7g} {r['seeds']:>5}  {_ci(r, 'gold_reward'):<24} "
            f"{_ci(r, 'win_rate_vs_sft'):<24} {_ci(r, 'kl_to_reference'):<24} {_ci(r, 'confident_wrong_rate'):<24}")
    print(f"SFT gold reward {e['sft_gold_reward']:.3f}; reward model prefers confident wrong answers: "
          + ", ".join(f"{k} {v['rate']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
                      for k, v in e["rm_prefers_confident_wrong"].items()))
    print(f"-- pairwise gold-reward differences at each method's best setting ({summary['paired_test']})")
    for r in e["significance"]:
      mark = "significant" if r["significant"] else "n.s."
      print(f"{r['a']:<18} - {r['b']:<18} {r['mean_difference']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] "
            f"p_holm={r['p_holm']:.4f} {mark}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
