"""The main job as a user runs it: `alignax pipeline`, its report, resuming, and the notebook."""

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import REPO, cli_env, metric_rows, run_cli

SMALL = ["pipeline", "--config=configs/pipeline.py:tiny", "--config.report.num_prompts=24",
         "--config.data.loader=memory", "--config.reward.reward.normalize_prompts=16"]
for _stage, _steps in dict(pretrain=30, sft=12, reward=12, ppo=2, grpo=2, rloo=2, dpo=12).items():
  SMALL += [f"--config.{_stage}.train.steps={_steps}", f"--config.{_stage}.train.progress=False",
            f"--config.{_stage}.eval.every=0"]
  if _stage != "pretrain":
    SMALL.append(f"--config.{_stage}.eval.num_prompts=16")

MODELS = ("base", "sft", "ppo", "grpo", "rloo", "dpo")
STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo")
METRICS = ("gold_reward", "win_rate_vs_sft", "kl_to_sft", "accuracy", "quiz_continuation_rate", "refusal_rate")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pipeline") / "run")
  proc = run_cli(*SMALL, f"--config.workdir={workdir}", timeout=1500)
  assert "[7/7] dpo" in proc.stdout
  return workdir


@pytest.mark.slow
def test_pipeline_report_has_every_model_metric_and_plot(pipeline_dir):
  report = json.load(open(os.path.join(pipeline_dir, "report.json")))
  assert set(report["models"]) == set(MODELS)
  for name in MODELS:
    for metric in METRICS:
      value = report["models"][name][metric]
      assert isinstance(value, float) and value == value, (name, metric)
    lo, hi = report["models"][name]["gold_reward_ci95"]
    assert lo <= report["models"][name]["gold_reward"] <= hi, name
  assert report["models"]["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)  # same model
  assert 0.0 <= report["reward_model"]["accuracy"] <= 1.0
  assert 0.0 <= report["reward_model"]["gold_agreement"] <= 1.0
  probe = report["reward_model"]
  assert probe["confident_wrong_pairs"] >= 10  # the fact questions among the report prompts
  lo, hi = probe["prefers_confident_wrong_ci95"]
  assert lo <= probe["prefers_confident_wrong"] <= hi
  for stage in STAGES:
    assert report["stages"][stage]["seconds"] > 0
  md = open(os.path.join(pipeline_dir, "report.md")).read()
  for prompt in report["showcase"]["prompts"]:
    assert prompt in md
  assert len(report["showcase"]["prompts"]) == 6
  for png in ("models.png", "training.png", "kl_vs_gold.png"):
    assert os.path.getsize(os.path.join(pipeline_dir, png)) > 10_000


@pytest.mark.slow
def test_rerunning_a_finished_pipeline_skips_every_stage(pipeline_dir):
  # Through experiments/pipeline.py, the script form of the same command.
  proc = subprocess.run([sys.executable, "experiments/pipeline.py", *SMALL[1:],
                         f"--config.workdir={pipeline_dir}"], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("finished earlier") == len(STAGES)
  assert "report: up to date" in proc.stdout


@pytest.mark.slow
def test_walkthrough_notebook_executes(pipeline_dir):
  import nbformat
  from nbclient import NotebookClient
  path = os.path.join(REPO, "notebooks", "walkthrough.ipynb")
  nb = nbformat.read(path, as_version=4)
  env = cli_env()
  env["ALIGNAX_PIPELINE_DIR"] = pipeline_dir
  old = dict(os.environ)
  os.environ.update(env)
  try:
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert all(f"{stage:>8}:" in text for stage in ("pretrain", "sft", "ppo", "dpo"))
  assert sum(1 for o in outputs if "image/png" in o.get("data", {})) == 3


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_stages_train_under_pmap_on_8_devices(pipeline_dir, tmp_path, stage):
  """`--config.parallel.mode=pmap` on 8 simulated devices, from the pipeline's SFT and reward
  model; GRPO scores with a weighted sum of the reward model and the gold labeler (a Python
  function called from the compiled iteration)."""
  workdir = str(tmp_path / stage)
  extra = ["--config.rewards.functions=alignax.tasks.world_gold:gold_reward=0.5"] if stage == "grpo" else []
  run_cli("train", f"--config=configs/{stage}.py:tiny", f"--config.workdir={workdir}",
          f"--config.init.workdir={pipeline_dir}/sft", f"--config.reward_model.workdir={pipeline_dir}/reward",
          "--config.parallel.mode=pmap", "--config.train.steps=2", "--config.eval.every=0",
          "--config.eval.num_prompts=16", "--config.data.loader=memory", "--config.train.progress=False",
          *extra, devices=8)
  rows = [r for r in metric_rows(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(r["train/applied"] == 1.0 and r["train/loss"] == r["train/loss"] for r in rows)
  if stage == "grpo":
    assert all("train/score_functions" in r and "train/score_model" in r for r in rows)
  assert os.path.exists(os.path.join(workdir, "export", "export.json"))


@pytest.mark.slow
def test_a_failing_reward_function_stops_the_run_with_its_name_and_record_after_saving(pipeline_dir, tmp_path):
  workdir = str(tmp_path / "grpo")
  env = cli_env()
  env["ALIGNAX_TEST_COUNTER"] = str(tmp_path / "calls")
  args = ["train", "--config=configs/grpo.py:tiny", f"--config.workdir={workdir}",
          f"--config.init.workdir={pipeline_dir}/sft", "--config.rewards.model=0",
          "--config.rewards.functions=tests.reward_fixtures:fails_on_second_batch",
          "--config.train.steps=4", "--config.eval.every=0", "--config.eval.num_prompts=16",
          "--config.data.loader=memory", "--config.train.progress=False"]
  proc = subprocess.run([sys.executable, "-m", "alignax.cli", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("alignax: error: reward function tests.reward_fixtures:fails_on_second_batch "
                         "raised RuntimeError: the scoring service is down on prompt record")
  assert "iteration 2 was not applied" in last and "Traceback" not in proc.stderr
  # Saved at the failing step, with the first iteration's update and no non-finite step counted.
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == 2
  rows = [r for r in metric_rows(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [1]  # the failed step logged nothing
