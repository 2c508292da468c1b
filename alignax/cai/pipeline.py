"""The RLAIF pipeline (Constitutional AI on the world): `configs/pipeline.py:tiny_rlaif`.

  pretrain -> feedback model -> revise -> SL-CAI SFT -> label -> reward model -> PPO, DPO -> report

It is the registry pipeline (`alignax.commands.pipeline`) with three steps added and the
human labels replaced by AI ones:

  feedback  an SFT run (the `feedback` section, from pretrain) on the world's demonstrations
            plus its AI-feedback demonstrations (`world.feedback_demos`): the model that
            critiques, revises and judges (WORKDIR/feedback)
  revise    it answers `rlaif.revise_prompts` SFT prompts of the world, critiques and revises
            its answers against the constitution (WORKDIR/revise/revisions.jsonl)
  sft       SL-CAI: the `sft` stage trains on those revisions instead of the world's demos
  label     it labels `rlaif.label_pairs` of the world's preference pairs, whose simulated
            human labels are set aside (WORKDIR/label/ai_pairs.jsonl), and the held-out pairs
            (ai_pairs_eval.jsonl, where its agreement with gold and with the human labels is
            measured per principle)
  reward, dpo  train on the AI labels with soft labels (`soft_labels=True`); PPO optimizes
            that reward model

Every step is skipped when its output is complete, so rerunning the command resumes. The
report (report.md) adds the judge's agreement per principle and, when the human-label
pipeline has run (`rlaif.human_report`), its models beside the RLAIF ones.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from alignax import checkpoint as ckpt_lib
from alignax.cai.wiring import FEEDBACK, LABELED, files
from alignax.config import ConfigDict, ConfigError


def feedback_config(cfg) -> ConfigDict:
  """The feedback model's SFT config: the `feedback` section with the pipeline's shared keys,
  from the pipeline's pretrain export."""
  from alignax.algorithms.pipeline_config import with_shared_keys
  scfg = with_shared_keys(cfg, FEEDBACK)
  with scfg.unlocked():
    scfg.init.workdir = os.path.join(cfg.workdir, "pretrain")
    scfg.init.run_if_missing = False
  return scfg


def validate(cfg) -> None:
  """Checks the `rlaif` section, the feedback stage and the constitution before anything runs."""
  from alignax.algorithms import registry
  from alignax.cai import constitution
  from alignax.config import resolve
  r = cfg.rlaif
  for key in ("revise_prompts", "label_pairs", "revise_rounds", "max_new_tokens"):
    if int(r[key]) < 1:
      raise ConfigError(f"config.rlaif.{key}: must be >= 1, got {r[key]}")
  if int(r.principles_per_pair) < 0:
    raise ConfigError(f"config.rlaif.principles_per_pair: must be >= 0 (0: all), got {r.principles_per_pair}")
  if int(cfg.world.feedback_demos) < 1:
    raise ConfigError("config.world.feedback_demos: the RLAIF pipeline's feedback model learns to "
                      "critique, revise and judge from these demonstrations; set it >= 1")
  constitution.load(r.constitution)
  names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
  for needed in ("pretrain", "sft"):
    if needed not in names and not ckpt_lib.has_export(os.path.join(cfg.workdir, needed)):
      raise ConfigError(f"config.stages: the RLAIF pipeline needs {needed}")
  scfg = feedback_config(cfg)
  try:
    resolve(scfg)
    if registry.get("sft").validate is not None:
      registry.get("sft").validate(scfg)
  except ConfigError as e:
    raise ConfigError(f"stage {FEEDBACK}: {e}") from None


def _world(cfg):
  from alignax.config import world_config
  from alignax.tasks.world import build_world
  return build_world(world_config(cfg.world))


def _write_jsonl(path: str, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def _finished(path: str, kind: str) -> bool:
  meta = f"{path}.{kind}.json"
  if not os.path.exists(meta):
    return False
  with open(meta, encoding="utf-8") as f:
    return bool(json.load(f).get("finished"))


class Steps:
  """The RLAIF steps the pipeline runs before its registry stages (`before(name)`)."""

  def __init__(self, cfg, clock):
    self.cfg, self.clock, self.paths = cfg, clock, files(cfg)

  def _timed(self, name: str, fn) -> None:
    t0 = time.time()
    fn()
    self.clock.add(name, time.time() - t0)

  def before(self, stage: str) -> bool:
    """Runs the steps `stage` builds on; False when one stopped (a signal) before finishing.
    A finished step's output is checked against this config (`ResumableJsonl` refuses other
    settings) and left as it is."""
    if stage == "pretrain":
      self._reuse_pretrain()
    if stage == "sft":
      if not self._feedback_model():
        return False
      self._timed("revise", self._revise)
    if stage in LABELED:
      if not self._feedback_model():
        return False
      self._timed("label", self._label)
    return True

  def _reuse_pretrain(self) -> None:
    """Copies the pretrain export of `rlaif.reuse_pretrain` (a pipeline on the same world without
    feedback demonstrations: the same corpus, tokenizer and model) instead of pretraining again."""
    src_dir = str(self.cfg.rlaif.get("reuse_pretrain", ""))
    dst = os.path.join(self.cfg.workdir, "pretrain")
    src = os.path.join(src_dir, "pretrain") if src_dir else ""
    if not src or ckpt_lib.has_export(dst) or not ckpt_lib.has_export(src):
      return
    from alignax.algorithms.pipeline_config import stage_config
    from alignax.config import read_config
    theirs, ours = read_config(src), stage_config(self.cfg, "pretrain")

    def plain(v):  # tuples and lists, ConfigDicts and dicts compare alike
      return json.loads(json.dumps(v.to_dict() if hasattr(v, "to_dict") else v))

    world = {k: v for k, v in plain(self.cfg.world).items() if k not in ("feedback_demos", "constitution")}
    same = (all(plain(theirs.get(k)) == plain(ours.get(k)) for k in ("model", "train", "optimizer", "data"))
            and plain(theirs.tokenizer) == plain(ours.tokenizer) and theirs.seed == ours.seed
            and all(plain(theirs.world).get(k) == v for k, v in world.items()))
    if not same:
      print(f"[rlaif] pretrain: not reusing {src} (its model, data, training or world differ)", flush=True)
      return
    os.makedirs(dst, exist_ok=True)
    shutil.copytree(ckpt_lib.export_path(src), ckpt_lib.export_path(dst) + ".tmp", dirs_exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    for name in ("metrics.jsonl",):
      if os.path.exists(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    os.replace(ckpt_lib.export_path(dst) + ".tmp", ckpt_lib.export_path(dst))
    print(f"[rlaif] pretrain: reusing the export of {src} (same world corpus, tokenizer and "
          "config)", flush=True)

  def _feedback_model(self) -> bool:
    from alignax.algorithms import run_stage
    scfg = feedback_config(self.cfg)
    if ckpt_lib.has_export(scfg.workdir):
      return True
    print(f"[rlaif] {FEEDBACK}: SFT with AI-feedback demonstrations -> {scfg.workdir}", flush=True)
    t0 = time.time()
    result = run_stage(scfg)
    self.clock.add(FEEDBACK, time.time() - t0)
    return result.finished

  def _model(self):
    from alignax.cai.judge import load_chat_model
    return load_chat_model(os.path.join(self.cfg.workdir, FEEDBACK))

  def _revise(self) -> None:
    from alignax.cai import constitution
    from alignax.cai.revision import ReviseConfig, Reviser, revise_file
    r = self.cfg.rlaif
    # Written every time (deterministic): a changed config changes the file's hash, which the
    # revisions' settings record, so a resume with other prompts is refused, not mixed.
    demos = [d for d in _world(self.cfg).sft_records("train")
             if not str(d.get("style", "")).startswith("feedback/")]
    _write_jsonl(self.paths["prompts"], [{"prompt": d["prompt"]} for d in demos[: int(r.revise_prompts)]])
    todo = not _finished(self.paths["revisions"], "revise")
    if todo:
      print("[rlaif] revise: critique and revise the feedback model's answers", flush=True)
    reviser = Reviser(self._model(), ReviseConfig(rounds=int(r.revise_rounds),
                                                  temperature=float(r.temperature),
                                                  max_new_tokens=int(r.max_new_tokens),
                                                  seed=int(self.cfg.seed),
                                                  keep_if_critique_starts=str(r.keep_if_critique_starts)))
    summary = revise_file(reviser, constitution.load(r.constitution), self.paths["prompts"],
                          self.paths["revisions"])
    if todo:
      print(f"[rlaif] revise: {summary}", flush=True)

  def _label(self) -> None:
    from alignax.cai import constitution
    from alignax.cai.judge import Judge
    from alignax.cai.labeling import label_file
    r = self.cfg.rlaif
    world = _world(self.cfg)
    for split, key in (("train", "pairs"), ("eval", "pairs_eval")):  # as the prompts above
      rows = world.preference_records(split)
      _write_jsonl(self.paths[key], rows[: int(r.label_pairs)] if split == "train" else rows)
    judge = Judge(self._model())
    const = constitution.load(r.constitution)
    for key, out in (("pairs", "ai_pairs"), ("pairs_eval", "ai_pairs_eval")):
      todo = not _finished(self.paths[out], "label")
      if todo:
        print(f"[rlaif] label: AI preference labels on {self.paths[key]}", flush=True)
      summary = label_file(judge, const, self.paths[key], self.paths[out],
                           principles_per_pair=int(r.principles_per_pair), seed=int(self.cfg.seed),
                           both_orders=bool(r.both_orders))
      if todo:
        print(f"[rlaif] label {out}: {summary}", flush=True)


# ---------------------------------------------------------------------------------------------
# The report's RLAIF section.

def _agreement_with_intervals(rows, constitution) -> dict:
  from alignax import stats
  from alignax.tasks.feedback import label_agreement
  out = label_agreement(rows, constitution)
  for entry in out.values():
    for key in ("gold", "input"):
      n, rate = entry.get(f"{key}_n", 0), entry.get(key)
      if n and rate == rate:
        entry[f"{key}_ci95"] = list(stats.wilson_interval(round(rate * n), n))
  return out


def _settings_summary(path: str, kind: str) -> dict:
  meta = f"{path}.{kind}.json"
  if not os.path.exists(meta):
    return {}
  with open(meta, encoding="utf-8") as f:
    return json.load(f).get("summary", {})


def add_to_report(cfg, report: dict) -> dict:
  """Adds report["rlaif"] (the judge's agreement per principle on held-out pairs, the labels'
  agreement on the training pairs, the revision counts, and the human-label pipeline's models
  when `rlaif.human_report` exists) and its section of report.md; returns the report."""
  from alignax.cai import constitution
  const = constitution.load(cfg.rlaif.constitution)
  paths = files(cfg)
  section: dict = {"constitution": const.name, "principles": list(const.ids)}
  for key, name in (("ai_pairs_eval", "judge_heldout"), ("ai_pairs", "labels_train")):
    if os.path.exists(paths[key]):
      with open(paths[key], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
      section[name] = _agreement_with_intervals(rows, const)
      section[name]["summary"] = _settings_summary(paths[key], "label")
  section["revise"] = _settings_summary(paths["revisions"], "revise")
  human_path = str(cfg.rlaif.get("human_report", ""))
  if human_path and os.path.exists(human_path):
    with open(human_path, encoding="utf-8") as f:
      human = json.load(f)
    section["human_report"] = human_path
    section["human_models"] = human.get("models", {})
    section["human_reward_model"] = human.get("reward_model", {})
  report["rlaif"] = section
  with open(os.path.join(cfg.workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(cfg.workdir, "report.md"), "a", encoding="utf-8") as f:
    f.write(markdown(report))
  return report


def _pct(entry: dict, key: str) -> str:
  rate, ci, n = entry.get(key), entry.get(f"{key}_ci95"), entry.get(f"{key}_n", 0)
  if rate is None or rate != rate or not n:
    return "–"
  return f"{rate:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] (n={n})" if ci else f"{rate:.2f} (n={n})"


def markdown(report: dict) -> str:
  """The RLAIF section of report.md."""
  from alignax.commands.report import _fmt_ci
  s = report["rlaif"]
  lines = ["", "## RLAIF: AI feedback against the constitution", "",
           (f"The feedback model (SFT on the world's demonstrations and its critique, revision and "
            f"comparison demonstrations) labeled the preference pairs against the `{s['constitution']}` "
            "constitution; the reward model and DPO trained on its soft labels, and SFT on its "
            "revisions (SL-CAI). Agreement is the fraction of pairs where the judge prefers the "
            "response gold prefers (per principle: the one its rubric components score higher, "
            "over pairs where they differ) or the simulated human raters chose; brackets are Wilson "
            "95% intervals."), ""]
  for name, title in (("judge_heldout", "held-out pairs"), ("labels_train", "the training pairs")):
    if name not in s:
      continue
    lines += [f"Judge on {title}:", "", "| principle | agreement with gold | agreement with human labels |",
              "|---|---|---|"]
    for pid in s["principles"] + ["overall"]:
      if pid in s[name]:
        lines.append(f"| {pid} | {_pct(s[name][pid], 'gold')} | {_pct(s[name][pid], 'input')} |")
    lines.append("")
  if s.get("revise"):
    r = s["revise"]
    lines += [(f"Revisions: {r.get('prompts', 0)} prompts, {r.get('changed', 0)} answers changed by "
               f"their revision, {r.get('unfinished', 0)} final answers without `<eos>`."), ""]
  models = report["models"]
  human = s.get("human_models")
  # (not win_rate_vs_sft: each pipeline's is against its own SFT model)
  columns = ("gold_reward", "accuracy", "refusal_rate", "confident_wrong_rate", "kl_to_sft")
  if human:
    lines += [f"Models trained on AI labels (this run) and on human labels (`{s['human_report']}`):", "",
              "| model | labels | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name in list(dict.fromkeys(list(models) + list(human))):
      for labels, table in (("AI", models), ("human", human)):
        if name in table:
          lines.append(f"| {name} | {labels} | " + " | ".join(_fmt_ci(table[name], k) for k in columns) + " |")
  else:
    lines += ["No human-label report to compare with: run `alignax pipeline "
              "--config=configs/pipeline.py:tiny` first (its report is `rlaif.human_report`)."]
  return "\n".join(lines) + "\n"
