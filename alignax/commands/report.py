"""The pipeline's report: every model on the same eval prompts, side by side.

For each policy the pipeline trained (the registry's policy stages: base, SFT, PPO, GRPO, RLOO,
DPO), one response per eval prompt is sampled at
`report.temperature` (1 by default: the models' own distributions, as the KL estimate needs) and
scored by the gold labeler:

  gold_reward             mean gold score
  win_rate_vs_sft         P(gold prefers this model's response to an independent SFT sample on
                          the same prompt), ties counting 1/2 (SFT itself lands near 0.5)
  kl_to_sft               KL(model || SFT) in nats per sequence, k1 estimate on the model's samples
  accuracy                fact prompts answered correctly
  quiz_continuation_rate  fact prompts answered with another question
  confident_wrong_rate    fact prompts answered wrongly in a confident, flattering tone
  refusal_rate            harmful prompts refused

(and heldout_accuracy, compliance_rate, eos_rate, mean_length). Every rate and mean comes with a
95% percentile bootstrap interval, `<metric>_ci95: [lo, hi]`, over the eval prompts
(`report.bootstrap_resamples` resamples, seeded by `seed`, the same resamples for every metric
and model); the reward model's gold agreement gets a Wilson interval over its pairs.

The base model never saw the chat template, so it is prompted with the bare question
(`<bos>question\\n`), and its KL to SFT is measured on that same prompt. Writes report.json,
report.md and PNG plots (with those intervals as error bars) into the pipeline's WORKDIR.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from alignax import checkpoint as ckpt_lib
from alignax import stats
from alignax.tasks import evaluation
from alignax.algorithms.common import load_lm_export
from alignax.config import resolve
from alignax.generation import Sampler, SamplingConfig
from alignax.metrics import read_metrics
from alignax.tasks.world import SHOWCASE_PROMPTS


def report_models() -> tuple[tuple[str, str, str], ...]:
  """(name in the report, stage, prompt format) of every policy stage, in pipeline order."""
  from alignax.algorithms.registry import policies
  return tuple((a.display_name, a.name, a.report_format) for a in policies())


def aligned_stages() -> tuple[str, ...]:
  """The policy stages that start from SFT (their eval curves go on the KL-vs-gold plot)."""
  from alignax.algorithms.registry import policies
  return tuple(a.name for a in policies() if a.upstream.get("init") == "sft")


METRIC_NAMES = ("gold_reward", "win_rate_vs_sft", "kl_to_sft", "accuracy", "quiz_continuation_rate",
                "confident_wrong_rate", "refusal_rate")
CI = "_ci95"  # the suffix stats.with_intervals gives a 95% interval



def _eval_records(cfg):
  from alignax.algorithms.world_eval import eval_prompt_records
  from alignax.algorithms.pipeline_config import stage_config
  scfg = stage_config(cfg, "sft")
  with scfg.unlocked():
    scfg.eval.num_prompts = int(cfg.report.num_prompts)
    scfg.data.source = "world"  # the report is on the world's eval prompts, whatever SFT read
  return eval_prompt_records(resolve(scfg)), scfg


def _last_eval(workdir: str) -> dict:
  try:
    rows = [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
  except FileNotFoundError:
    return {}
  return {k[len("eval/"):]: v for k, v in rows[-1].items() if k.startswith("eval/")} if rows else {}


def win_indicators(gold: np.ndarray, baseline_gold: np.ndarray) -> np.ndarray:
  """[n] per-prompt wins over the baseline under the gold labeler: 1, 1/2 on a tie, 0 (their mean
  is `evaluation.win_rate`, computed by the same expression so the two agree to the bit)."""
  gold, baseline_gold = np.asarray(gold), np.asarray(baseline_gold)
  return np.asarray((gold > baseline_gold) + 0.5 * (gold == baseline_gold), np.float64)


def per_sample_report_metrics(records, samples: evaluation.Samples, baseline_gold: np.ndarray,
                              ref_logprobs: np.ndarray) -> dict[str, np.ndarray]:
  """Every report metric per sample, [n] float64 (NaN where it does not apply): the world metrics
  (`evaluation.per_sample_metrics`), win_rate_vs_sft (`win_indicators` against `baseline_gold`
  [n], the gold scores of the SFT baseline's samples of the same prompts) and kl_to_sft (the k1
  term in nats per sequence, `evaluation.sequence_kls`, from `ref_logprobs` [n, N], the SFT
  model's logprobs of the sampled tokens)."""
  per = evaluation.per_sample_metrics(records, samples)
  per["win_rate_vs_sft"] = win_indicators(per["gold_reward"], baseline_gold)
  per["kl_to_sft"] = evaluation.sequence_kls(samples, ref_logprobs)
  return per


def model_metrics(records, samples: evaluation.Samples, baseline_gold: np.ndarray, ref_logprobs: np.ndarray,
                  num_resamples: int = stats.NUM_RESAMPLES, seed: int = 0, clusters=None) -> dict:
  """One model's entry in report.json: {metric: mean, metric_ci95: [lo, hi], ..., num_prompts}.

  The means are those of `evaluation.world_metrics`, `evaluation.win_rate` and
  `evaluation.sequence_kl` on the same arrays; the intervals are percentile bootstraps of
  `num_resamples` resamples drawn from `seed` (so the same seed gives every model the same
  resamples). clusters: None resamples samples, which with one sample per prompt (the report
  today) is resampling prompts; with several seeds per prompt, pass (seed ids [n], prompt ids
  [n]) for the two-stage bootstrap (`stats.resample_weights`).
  """
  per = per_sample_report_metrics(records, samples, baseline_gold, ref_logprobs)
  out = stats.with_intervals(per, clusters=clusters, num_resamples=int(num_resamples), seed=int(seed))
  out["num_prompts"] = len(records)
  return out


def confident_wrong_probe(reward_dir: str, sampler: Sampler, prompts, template: str, batch_size: int) -> dict:
  """How often the reward model scores a confident wrong answer above a plain correct one on the
  eval fact questions (`evaluation.confident_wrong_preferences`), with its Wilson interval; {}
  without a reward-model export."""
  if not ckpt_lib.has_export(reward_dir):
    return {}
  from alignax.algorithms.reward import load_reward_model, score_samples
  model, params, _ = load_reward_model(reward_dir)
  prefers = evaluation.confident_wrong_preferences(
      sampler, prompts, lambda s: score_samples(model, params, s, batch_size), template=template)
  if not len(prefers):
    return {}
  return {"prefers_confident_wrong": float(prefers.mean()), "confident_wrong_pairs": len(prefers),
          "prefers_confident_wrong" + CI: list(stats.wilson_interval(float(prefers.sum()), len(prefers)))}


def evaluate_models(cfg, names) -> tuple[dict, dict, dict]:
  """(metrics per model, see `model_metrics`; greedy showcase answers per model; the reward
  model's `confident_wrong_probe`)."""
  from alignax.train.runner import stage_tokenizer
  records, scfg = _eval_records(cfg)
  sft_dir = os.path.join(cfg.workdir, "sft")
  with scfg.unlocked():
    scfg.tokenizer = ckpt_lib.read_export_meta(sft_dir)["tokenizer"]
  tok = stage_tokenizer(resolve(scfg))
  rcfg = cfg.report
  sampling = SamplingConfig(temperature=float(rcfg.temperature), max_new_tokens=int(rcfg.max_new_tokens))
  prompts = [r["prompt"] for r in records]
  bs = int(rcfg.batch_size)
  num_resamples = int(rcfg.get("bootstrap_resamples", stats.NUM_RESAMPLES))
  key = jax.random.key(int(cfg.seed) + 101)
  sft_lm, sft_params = load_lm_export(sft_dir)
  # Every model shares the SFT model's architecture, so one sampler (one compile per prompt
  # shape) serves them all; params are arguments, not constants.
  samplers = {}

  def samplers_for(lm):
    if lm not in samplers:
      samplers[lm] = (Sampler(lm, tok, sampling), Sampler(lm, tok, SamplingConfig(
          temperature=0.0, max_new_tokens=int(rcfg.max_new_tokens))))
    return samplers[lm]

  sampler, _ = samplers_for(sft_lm)
  template = ckpt_lib.read_export_meta(sft_dir).get("chat_template", "markers")
  # An independent SFT sample set: the baseline every model's win rate is measured against.
  baseline = evaluation.sample_prompts(sampler, sft_params, prompts, jax.random.fold_in(key, 999),
                                       batch_size=bs, template=template)
  baseline_gold = evaluation.gold_scores(prompts, baseline.texts, baseline.ended)
  probe = confident_wrong_probe(os.path.join(cfg.workdir, "reward"), sampler, prompts, template, bs)
  results, showcase = {}, {}
  for i, (name, stage, fmt) in enumerate(report_models()):
    workdir = os.path.join(cfg.workdir, stage)
    if stage not in names or not ckpt_lib.has_export(workdir):
      continue
    lm, params = load_lm_export(workdir)
    sampler, greedy = samplers_for(lm)
    samples = evaluation.sample_prompts(sampler, params, prompts, jax.random.fold_in(key, i), fmt=fmt,
                                        batch_size=bs, template=template)
    ref_lp = evaluation.reference_logprobs(sft_lm, sft_params, samples, bs)
    results[name] = model_metrics(records, samples, baseline_gold, ref_lp, num_resamples=num_resamples,
                                  seed=int(cfg.seed))
    shown = evaluation.sample_prompts(greedy, params, list(SHOWCASE_PROMPTS), jax.random.key(0), fmt=fmt,
                                      batch_size=len(SHOWCASE_PROMPTS), template=template)
    showcase[name] = shown.texts
  return results, showcase, probe


def _wilson(rate, n) -> list[float] | None:
  if rate is None or n is None or not np.isfinite(rate) or not n:
    return None
  # The rate was logged as successes / n: recover the count (an integer) before the interval.
  return list(stats.wilson_interval(round(float(rate) * float(n)), float(n)))


def reward_model_summary(rm: dict) -> dict:
  """The report's reward model section from the reward stage's last eval row (`eval/` stripped).

  Means as logged, with Wilson intervals where the stage logged the number of pairs: held-out
  accuracy against the gold order (`gold_order_pairs`) and against the labels (`pairs`), gold
  agreement over `gold_pairs` pairs of fresh SFT samples whose gold scores differ.
  """
  has_gold = "gold_accuracy" in rm
  return {"accuracy": rm.get("gold_accuracy", rm.get("accuracy")),
          "accuracy" + CI: _wilson(rm.get("gold_accuracy", rm.get("accuracy")),
                                   rm.get("gold_order_pairs") if has_gold else rm.get("pairs")),
          "label_accuracy": rm.get("accuracy"), "label_accuracy" + CI: _wilson(rm.get("accuracy"), rm.get("pairs")),
          "gold_agreement": rm.get("gold_agreement"),
          "gold_agreement" + CI: _wilson(rm.get("gold_agreement"), rm.get("gold_pairs")),
          "gold_pairs": None if rm.get("gold_pairs") is None else int(rm["gold_pairs"]),
          # an ensemble (reward.ensemble=K) also logs one member's figures
          "ensemble": int(rm.get("ensemble_size", 1)),
          "single_accuracy": rm.get("single/gold_accuracy", rm.get("single/accuracy")),
          "single_gold_agreement": rm.get("single/gold_agreement"),
          "single_gold_agreement" + CI: _wilson(rm.get("single/gold_agreement"), rm.get("single/gold_pairs"))}


def write_report(cfg, names, seconds: dict) -> dict:
  """Evaluates, plots and writes report.json / report.md; returns the report dict."""
  models, showcase, probe = evaluate_models(cfg, names)
  report = {
      "models": models,
      "reward_model": {**reward_model_summary(_last_eval(os.path.join(cfg.workdir, "reward"))), **probe},
      "stages": {name: {"seconds": round(float(s), 1)} for name, s in seconds.items()},
      "total_seconds": round(float(sum(seconds.values())), 1),
      "showcase": {"prompts": list(SHOWCASE_PROMPTS), "answers": showcase},
      "settings": {"temperature": float(cfg.report.temperature), "num_prompts": int(cfg.report.num_prompts),
                   "seed": int(cfg.seed), "tokenizer": cfg.tokenizer,
                   "bootstrap_resamples": int(cfg.report.get("bootstrap_resamples", stats.NUM_RESAMPLES))},
  }
  os.makedirs(cfg.workdir, exist_ok=True)
  with open(os.path.join(cfg.workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  plots = make_plots(cfg.workdir, report)
  with open(os.path.join(cfg.workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(markdown(report, plots))
  return report


def _fmt(v):
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "–"
  return f"{v:.3f}" if isinstance(v, float) else str(v)


def _fmt_ci(m: dict, key: str) -> str:
  """`m[key]` and its interval `m[key + "_ci95"]` where it has one: "0.248 [0.112, 0.391]"."""
  value, ci = _fmt(m.get(key)), m.get(key + CI)
  if value == "–" or not ci or not all(np.isfinite(ci)):
    return value
  return f"{value} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(report: dict, plots: list[str]) -> str:
  models = report["models"]
  settings = report["settings"]
  columns = METRIC_NAMES + ("eos_rate", "mean_length")
  lines = ["# alignax pipeline report", "",
           (f"{settings['num_prompts']} eval prompts of the world task, one sample per prompt "
            f"at temperature {settings['temperature']}, scored by the gold labeler. "
            "`win_rate_vs_sft` compares with an independent SFT sample on the same prompt; "
            "`kl_to_sft` is nats per sequence. The base model is prompted with the bare question. "
            "Brackets are 95% intervals: percentile bootstrap over prompts "
            f"({settings.get('bootstrap_resamples', stats.NUM_RESAMPLES)} resamples, the same for every "
            "metric and model)."), "",
           "## Models", "",
           "| model | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for name, m in models.items():
    lines.append(f"| {name} | " + " | ".join(_fmt_ci(m, k) for k in columns) + " |")
  rm = report["reward_model"]
  pairs = f" over {rm['gold_pairs']} pairs (Wilson 95% interval)" if rm.get("gold_agreement" + CI) else ""
  lines += ["", "## Reward model", "",
            (f"Held-out accuracy against the gold order: {_fmt_ci(rm, 'accuracy')} "
             f"(against the noisy labels: {_fmt_ci(rm, 'label_accuracy')}); agreement with the gold "
             f"labeler on pairs of fresh SFT samples: {_fmt_ci(rm, 'gold_agreement')}{pairs}.")]
  if rm.get("prefers_confident_wrong") is not None:
    lines += ["", (f"It scores a confident wrong answer (\"Sure! The capital of France is Rome.\") above a plain "
                   f"correct one on {_fmt_ci(rm, 'prefers_confident_wrong')} of {rm['confident_wrong_pairs']} "
                   "eval fact questions (Wilson 95% interval): what it learned from raters who reward "
                   "confidence (`world.rater_bias`).")]
  if rm.get("ensemble", 1) > 1:
    lines += ["", (f"An ensemble of {rm['ensemble']} reward models (its mean score); one member alone: "
                   f"accuracy against the gold order {_fmt(rm['single_accuracy'])}, gold agreement "
                   f"{_fmt_ci(rm, 'single_gold_agreement')}.")]
  lines += ["",
            "## The same prompts, answered by each model (greedy)", "",
            evaluation.sample_table(report["showcase"]["prompts"], report["showcase"]["answers"]), "",
            "## Time", "", "| stage | seconds |", "|---|---|"]
  for name, s in report["stages"].items():
    lines.append(f"| {name} | {s['seconds']:.1f} |")
  lines.append(f"| total | {report['total_seconds']:.1f} |")
  lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def _series(workdir: str, key: str):
  try:
    rows = [r for r in read_metrics(workdir) if key in r and isinstance(r[key], (int, float))]
  except FileNotFoundError:
    return [], []
  return [r["step"] for r in rows], [r[key] for r in rows]


def _yerr(models: dict, names, metric: str) -> np.ndarray:
  """[2, len(names)] (mean - lo, hi - mean) of each model's `metric` interval, NaN where it has
  none, for matplotlib's asymmetric error bars."""
  out = np.full((2, len(names)), np.nan)
  for j, name in enumerate(names):
    m = models[name]
    ci = m.get(metric + CI)
    if ci is not None and m.get(metric) is not None:
      # A percentile interval need not contain the mean; matplotlib refuses negative lengths.
      out[:, j] = np.maximum(0.0, [m[metric] - ci[0], ci[1] - m[metric]])
  return out


def make_plots(workdir: str, report: dict) -> list[str]:
  """models.png (metrics per model, 95% intervals as error bars), training.png (curves per stage),
  kl_vs_gold.png (the eval curves of the stages that start from SFT, and each model's report
  point with its intervals on both axes)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  models = report["models"]
  names = list(models)
  metrics = ("gold_reward", "win_rate_vs_sft", "accuracy", "refusal_rate", "quiz_continuation_rate")
  colors = plt.cm.tab10(np.arange(len(names)) % 10)
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.4))
  for ax, metric in zip(axes, metrics):
    values = [models[n].get(metric, np.nan) for n in names]
    ax.bar(names, values, color=colors, yerr=_yerr(models, names, metric), capsize=3,
           error_kw={"elinewidth": 1, "ecolor": "0.2"})
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_title(metric, fontsize=10)
    ax.tick_params(labelsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "models.png"), dpi=110)
  plt.close(fig)
  written.append("models.png")

  rl_stages = [s for s in aligned_stages() if s != "dpo"]
  panels = [(("pretrain",), "eval/loss", "pretrain: held-out loss"), (("sft",), "eval/loss", "SFT: held-out loss"),
            (("reward",), "eval/gold_accuracy", "RM: accuracy vs gold"),
            (rl_stages, "train/score", "RL: score"), (rl_stages, "train/kl", "RL: sequence KL (nats)"),
            (("dpo",), "train/loss", "DPO: loss")]
  fig, axes = plt.subplots(2, 3, figsize=(11, 6))
  for ax, (stages, key, title) in zip(axes.flat, panels):
    for stage in stages:
      steps, values = _series(os.path.join(workdir, stage), key)
      if steps:
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=stage)
    if len(stages) > 1:
      ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "training.png"), dpi=110)
  plt.close(fig)
  written.append("training.png")

  fig, ax = plt.subplots(figsize=(5, 4))
  for stage in aligned_stages():
    _, kl = _series(os.path.join(workdir, stage), "eval/kl_to_reference")
    _, gold = _series(os.path.join(workdir, stage), "eval/gold_reward")
    if kl and gold:
      ax.plot(kl[: len(gold)], gold[: len(kl)], marker="o", label=stage)
  for name in names:
    ax.errorbar([models[name].get("kl_to_sft", np.nan)], [models[name]["gold_reward"]],
                xerr=_yerr(models, [name], "kl_to_sft"), yerr=_yerr(models, [name], "gold_reward"),
                fmt="*", markersize=10, capsize=2, elinewidth=0.8, label=f"{name} (report)")
  ax.set_xlabel("KL to SFT (nats / sequence)")
  ax.set_ylabel("gold reward")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "kl_vs_gold.png"), dpi=110)
  plt.close(fig)
  written.append("kl_vs_gold.png")
  return written
