"""Grid sweeps: grid parsing, the seed-averaged summary, and `alignax sweep` end to end."""

import json
import os

import numpy as np
import pytest

from alignax.config import ConfigError, load_config_file
from alignax.commands.sweep import (final_eval, format_table, grid_points, parse_grid, point_config,
                           summarize)
from cli_helpers import REPO, SMALL_PRETRAIN, metric_rows, run_cli


@pytest.fixture(scope="module")
def dpo_cfg():
  return load_config_file(os.path.join(REPO, "configs", "dpo.py"), "tiny")


def test_grid_values_take_the_configs_types(dpo_cfg):
  grid = parse_grid(dpo_cfg, ["dpo.beta=0.05, 0.5", "seed=0,1,2", "dpo.loss_type=sigmoid,ipo",
                              "dpo.precompute_ref=false,true"])
  assert grid == {"dpo.beta": [0.05, 0.5], "seed": [0, 1, 2], "dpo.loss_type": ["sigmoid", "ipo"],
                  "dpo.precompute_ref": [False, True]}
  assert isinstance(grid["dpo.beta"][0], float) and isinstance(grid["seed"][0], int)


@pytest.mark.parametrize("spec,message", [
    ("dpo.bta=0.1", "did you mean: dpo.beta"),
    ("seed=0,x", "'x' is not an int"),
    ("dpo.precompute_ref=maybe", "not a bool"),
    ("dpo.beta", "expected KEY=V1,V2"),
    ("dpo=1", "is a section"),
])
def test_bad_grid_specs_name_the_key(dpo_cfg, spec, message):
  with pytest.raises(ConfigError, match=message):
    parse_grid(dpo_cfg, [spec])


def test_repeated_grid_key_is_an_error(dpo_cfg):
  with pytest.raises(ConfigError, match="given twice"):
    parse_grid(dpo_cfg, ["seed=0", "seed=1"])


def test_points_are_the_product_in_given_order_with_own_workdirs(dpo_cfg):
  points = grid_points({"dpo.beta": [0.1, 0.3], "seed": [0, 1]})
  assert points == [{"dpo.beta": 0.1, "seed": 0}, {"dpo.beta": 0.1, "seed": 1},
                    {"dpo.beta": 0.3, "seed": 0}, {"dpo.beta": 0.3, "seed": 1}]
  cfg = point_config(dpo_cfg, points[3], "/tmp/sw")
  assert cfg.dpo.beta == 0.3 and cfg.seed == 1 and cfg.workdir == "/tmp/sw/dpo.beta=0.3,seed=1"
  assert dpo_cfg.dpo.beta != 0.3 or dpo_cfg.seed != 1  # the base config is not modified


def test_summary_matches_numpy_over_seeds():
  rng = np.random.default_rng(0)
  runs, expected = [], {}
  for beta in (0.1, 0.3):
    values = rng.normal(size=(3, 2))
    for seed in range(3):
      runs.append({"point": {"dpo.beta": beta, "seed": seed},
                   "metrics": {"eval/a": values[seed, 0], "eval/b": values[seed, 1]}})
    expected[beta] = values
  summary = summarize(runs)
  assert [row["setting"] for row in summary] == [{"dpo.beta": 0.1}, {"dpo.beta": 0.3}]
  for row in summary:
    values = expected[row["setting"]["dpo.beta"]]
    assert row["n"] == 3
    for j, name in enumerate(("eval/a", "eval/b")):
      np.testing.assert_allclose(row["metrics"][name]["mean"], values[:, j].mean(), rtol=1e-12)
      np.testing.assert_allclose(row["metrics"][name]["std"], values[:, j].std(ddof=1), rtol=1e-12)
      # 95% Student-t interval of the mean, t(0.975, df=2) = 4.302652729911275 (the published table)
      np.testing.assert_allclose(row["metrics"][name]["ci95"],
                                 4.302652729911275 * values[:, j].std(ddof=1) / np.sqrt(3), rtol=1e-9)
  table = format_table(summary, ["eval/a"])
  assert table.splitlines()[0] == "| dpo.beta | n | a |"
  ci = 4.302652729911275 * expected[0.3][:, 0].std(ddof=1) / np.sqrt(3)
  assert f"{expected[0.3][:, 0].mean():.3f} ± {ci:.3f}" in table


def test_final_eval_takes_the_last_finite_value_of_each_eval_metric():
  rows = [{"step": 0, "eval/loss": 3.0, "train/loss": 9.0}, {"step": 5, "eval/loss": float("nan")},
          {"step": 10, "eval/loss": 2.0, "eval/acc": 0.5}, {"step": 11, "train/loss": 1.0}]
  assert final_eval(rows) == {"eval/loss": 2.0, "eval/acc": 0.5}


@pytest.mark.slow
def test_sweep_cli_runs_each_point_once_and_summarizes(tmp_path):
  out = str(tmp_path / "sweep")
  args = ["sweep", *SMALL_PRETRAIN[1:], "--config.train.steps=6", "--config.eval.every=6",
          f"--out={out}", "--grid=optimizer.lr=0.001,0.003", "--grid=seed=0,1",
          "--metrics=eval/loss"]
  proc = run_cli(*args)
  names = sorted(os.listdir(out))
  runs = [n for n in names if n.startswith("optimizer.lr=")]
  assert runs == ["optimizer.lr=0.001,seed=0", "optimizer.lr=0.001,seed=1",
                  "optimizer.lr=0.003,seed=0", "optimizer.lr=0.003,seed=1"]
  with open(os.path.join(out, "optimizer.lr=0.003,seed=1", "config.json")) as f:
    saved = json.load(f)
  assert saved["optimizer"]["lr"] == 0.003 and saved["seed"] == 1
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  assert [row["setting"] for row in summary] == [{"optimizer.lr": 0.001}, {"optimizer.lr": 0.003}]
  for row in summary:
    lr = row["setting"]["optimizer.lr"]
    losses = [[r for r in metric_rows(os.path.join(out, f"optimizer.lr={lr},seed={s}"))
               if "eval/loss" in r][-1]["eval/loss"] for s in (0, 1)]
    assert losses[0] != losses[1]  # the seed reaches the run
    np.testing.assert_allclose(row["metrics"]["eval/loss"]["mean"], np.mean(losses), rtol=1e-9)
    np.testing.assert_allclose(row["metrics"]["eval/loss"]["std"], np.std(losses, ddof=1), rtol=1e-9)
  assert "| optimizer.lr | n | loss |" in proc.stdout
  again = run_cli(*args)  # finished points are not rerun
  assert again.stdout.count("finished, skipped") == 4
  bad = run_cli(*args[:-1], "--metrics=eval/los", check=False)
  assert bad.returncode == 2 and "--metrics: unknown eval/los" in bad.stderr
