"""benchmarks/rlhf_vs_dpo.py --quick end to end: seeds as members, intervals, paired tests, Gao fits,
best-of-n and the biased-rater world."""

import json
import math
import os
import subprocess
import sys

import pytest

from alignax import stats
from cli_helpers import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("rvd")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "rlhf_vs_dpo.py"), "--quick",
                         f"--base={out / 'base'}", f"--out={out / 'bench'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / "bench" / "results.json", encoding="utf-8") as f:
    return out / "bench", json.load(f), proc.stdout


def test_every_output_is_written(quick):
  out, _, stdout = quick
  for name in ("results.json", "checkpoints.csv", "final.csv", "significance.csv", "bon.csv", "frontier.png",
               "overoptimization.png", "biased.png"):
    assert (out / name).stat().st_size > 0, name
  assert "pairwise gold-reward differences" in stdout


def test_final_figures_have_intervals_over_every_seed(quick):
  _, results, _ = quick
  main = results["experiments"]["main"]
  assert {r["method"] for r in main["final"]} == {"ppo", "dpo", "ppo_ens"}
  for row in main["final"]:
    assert row["seeds"] == 2
    assert row["samples_per_seed"] >= results["settings"]["eval_samples"]
    for metric in ("gold_reward", "win_rate_vs_sft", "kl_to_reference"):
      lo, hi = row[f"{metric}_ci95"]
      assert lo <= row[metric] <= hi, (row["method"], metric)
  ppo = next(r for r in main["final"] if r["method"] == "ppo")
  assert "proxy_reward" in ppo and 0 <= ppo["win_rate_vs_sft"] <= 1


def test_significance_table_is_paired_and_holm_adjusted(quick):
  _, results, _ = quick
  sig = results["experiments"]["main"]["significance"]
  assert len(sig) == 3  # three methods, every pair
  assert stats.holm([r["p_value"] for r in sig]) == pytest.approx([r["p_holm"] for r in sig])
  for r in sig:
    assert r["p_holm"] >= r["p_value"]
    assert r["significant"] == (r["p_holm"] < 0.05)
    assert r["units"] == 2 * 48  # seeds x eval prompts (the quick world's), paired
  assert "two-stage bootstrap" in results["paired_test"]


def test_fits_and_best_of_n(quick):
  _, results, _ = quick
  main = results["experiments"]["main"]
  bon = [r for r in main["bon"] if r["method"] == "bon"]
  assert [r["n"] for r in bon] == [1, 2, 4]
  for r in bon:
    assert r["kl"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"])
  assert bon[-1]["proxy_reward"] > bon[0]["proxy_reward"]  # best-of-n picks what the reward model likes
  forms = {(f["method"], f["target"]): f["form"] for f in main["fits"]}
  assert forms[("ppo", "gold_reward")] == "rl" and forms[("ppo", "proxy_reward")] == "rl"
  assert forms[("bon", "gold_reward")] == "bon" and ("bon_ens", "proxy_reward") in forms
  ppo_fit = next(f for f in main["fits"] if f["method"] == "ppo" and f["target"] == "gold_reward")
  assert all(lo <= hi for lo, hi in zip(ppo_fit["lo"], ppo_fit["hi"]))


def test_biased_raters_teach_the_reward_model_to_prefer_confident_wrong_answers(quick):
  _, results, _ = quick
  main, biased = results["experiments"]["main"], results["experiments"]["biased"]
  assert {r["method"] for r in biased["final"]} == {"dpo"}  # --quick: the biased world's DPO only
  fair = main["rm_prefers_confident_wrong"]["reward_model"]
  bent = biased["rm_prefers_confident_wrong"]["reward_model"]
  assert bent["pairs"] == fair["pairs"] > 20
  assert bent["rate"] > fair["rate"] + 0.15
  assert bent["ci95"][0] > fair["ci95"][1]
