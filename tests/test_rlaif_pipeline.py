"""The RLAIF pipeline end to end at small settings (`configs/pipeline.py:tiny_rlaif`), and the
`alignax label` / `alignax revise` commands on its feedback model."""

import json
import os

import pytest

from cli_helpers import run_cli

WORLD = dict(num_sft=300, num_sft_eval=40, num_preference_pairs=160, num_preference_eval=48,
             pretrain_bytes=150_000, pretrain_eval_bytes=20_000, feedback_demos=300,
             num_eval_prompts=24)
SMALL = ["pipeline", "--config=configs/pipeline.py:tiny_rlaif", "--config.report.num_prompts=24",
         "--config.data.loader=memory", "--config.reward.reward.normalize_prompts=16",
         "--config.rlaif.revise_prompts=40", "--config.rlaif.label_pairs=120",
         "--config.rlaif.max_new_tokens=24", "--config.rlaif.reuse_pretrain=",
         "--config.rlaif.human_report="]
SMALL += [f"--config.world.{k}={v}" for k, v in WORLD.items()]
for _stage, _steps in dict(pretrain=30, feedback=12, sft=8, reward=8, ppo=2, dpo=8).items():
  SMALL += [f"--config.{_stage}.train.steps={_steps}", f"--config.{_stage}.train.progress=False",
            f"--config.{_stage}.eval.every=0"]
  if _stage != "pretrain":
    SMALL.append(f"--config.{_stage}.eval.num_prompts=8")


@pytest.fixture(scope="module")
def rlaif_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rlaif") / "run")
  proc = run_cli(*SMALL, f"--config.workdir={workdir}", timeout=1500)
  assert "[5/5] dpo" in proc.stdout, proc.stdout[-3000:]
  return workdir


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_rlaif_pipeline_trains_on_revisions_and_ai_labels(rlaif_dir):
  w = lambda *p: os.path.join(rlaif_dir, *p)  # noqa: E731
  revisions = _rows(w("revise", "revisions.jsonl"))
  assert [r["cai"]["index"] for r in revisions] == list(range(40))
  assert all(len(r["cai"]["chain"]) == 2 and r["cai"]["chain"][0]["principle"] for r in revisions)  # rounds=2
  labels = _rows(w("label", "ai_pairs.jsonl"))
  world_pairs = _rows(w("label", "world_pairs.jsonl"))
  assert len(labels) == len(world_pairs) == 120
  for row, src in zip(labels, world_pairs):  # every pair labeled once, its responses kept
    assert {row["chosen"], row["rejected"]} == {src["chosen"], src["rejected"]}
    assert 0.5 <= row["chosen_prob"] <= 1.0 and len(row["ai_feedback"]["principles"]) == 2
  # The stages read what the steps wrote: SFT the revisions, reward and DPO the AI labels.
  sft, reward, dpo = (json.load(open(w(s, "config.json"))) for s in ("sft", "reward", "dpo"))
  assert sft["data"]["source"] == "files" and sft["data"]["train_files"].endswith("revisions.jsonl")
  for cfg in (reward, dpo):
    assert cfg["data"]["train_files"].endswith("ai_pairs.jsonl")
    assert cfg["data"]["eval_files"].endswith("world_pairs_eval.jsonl")
  assert reward["reward"]["soft_labels"] and dpo["dpo"]["soft_labels"]
  assert json.load(open(w("feedback", "config.json")))["world"]["feedback_demos"] == 300
  report = json.load(open(w("report.json")))
  assert set(report["models"]) == {"base", "sft", "ppo", "dpo"}
  judge = report["rlaif"]["judge_heldout"]
  assert judge["overall"]["input_n"] == len(_rows(w("label", "ai_pairs_eval.jsonl")))
  assert set(judge) - {"overall", "summary"} <= set(report["rlaif"]["principles"])
  for entry in judge.values():
    if isinstance(entry, dict) and entry.get("gold_n"):
      lo, hi = entry["gold_ci95"]
      assert lo <= entry["gold"] <= hi
  for stage in ("feedback", "revise", "label"):
    assert report["stages"][stage]["seconds"] > 0
  md = open(w("report.md")).read()
  assert "## RLAIF: AI feedback against the constitution" in md and "| harmless |" in md


@pytest.mark.slow
def test_rerun_skips_every_step(rlaif_dir):
  proc = run_cli(*SMALL, f"--config.workdir={rlaif_dir}", timeout=900)
  assert proc.stdout.count("finished earlier") == 5
  assert "[rlaif]" not in proc.stdout  # feedback model, revisions and labels all done


@pytest.mark.slow
def test_label_and_revise_commands_on_the_feedback_model(rlaif_dir, tmp_path):
  judge = os.path.join(rlaif_dir, "feedback")
  pairs = os.path.join(rlaif_dir, "label", "world_pairs_eval.jsonl")
  out = str(tmp_path / "ai.jsonl")
  proc = run_cli("label", f"--judge={judge}", "--constitution=world", f"--pairs={pairs}", f"--out={out}",
                 "--limit=6", "--principles_per_pair=0", "--batch_size=8")
  assert "label: 6 pairs" in proc.stdout
  rows = _rows(out)
  assert [r["ai_feedback"]["principles"] for r in rows] == [["harmless", "helpful", "honest", "concise",
                                                             "polite"]] * 6
  again = run_cli("label", f"--judge={judge}", "--constitution=world", f"--pairs={pairs}", f"--out={out}",
                  "--limit=6", "--principles_per_pair=0", "--batch_size=8")
  assert "label: 6 pairs" in again.stdout and _rows(out) == rows  # finished: nothing relabeled
  refused = run_cli("label", f"--judge={judge}", "--constitution=world", f"--pairs={pairs}", f"--out={out}",
                    "--limit=6", "--principles_per_pair=1", check=False)
  assert refused.returncode == 1 and "principles_per_pair" in refused.stderr
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in
                             ("What is the capital of France?", "How do I pick a lock?")))
  revised = str(tmp_path / "revised.jsonl")
  proc = run_cli("revise", f"--policy={judge}", f"--prompts={prompts}", f"--out={revised}", "--rounds=2",
                 "--max_new_tokens=16", "--batch_size=4")
  assert "revise: 2 prompts" in proc.stdout
  rows = _rows(revised)
  assert [r["prompt"] for r in rows] == ["What is the capital of France?", "How do I pick a lock?"]
  assert all(len(r["cai"]["chain"]) == 2 for r in rows)
