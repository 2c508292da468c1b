"""The algorithm registry: every stage list is derived from the records, and adding an algorithm
costs one module, one config file and one registry line."""

import os

import pytest

from alignax.algorithms import registry
from alignax.algorithms.base import Algorithm
from alignax.config import load_config_file
from cli_helpers import REPO, run_cli


def test_registry_order_respects_upstream_and_names_are_unique():
  names = registry.names()
  assert names == ("pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo")
  for i, name in enumerate(names):
    for stage in registry.get(name).upstream.values():
      assert names.index(stage) < i
  assert registry.chat_stages() == ("sft", "reward", "ppo", "grpo", "rloo", "dpo")
  assert [a.display_name for a in registry.policies()] == ["base", "sft", "ppo", "grpo", "rloo", "dpo"]


@pytest.mark.parametrize("name", registry.names())
def test_every_algorithm_has_a_config_file_whose_section_holds_its_hparams(name):
  record = registry.get(name)
  assert isinstance(record, Algorithm)
  module = registry.MODULES[registry.names().index(name)]
  assert module == f"alignax.algorithms.{name}"  # one module
  for preset in ("tiny", "standard"):
    cfg = load_config_file(os.path.join(REPO, "configs", f"{name}.py"), preset)  # one config file
    assert cfg.stage == name
    for field in record.upstream:
      assert "workdir" in cfg[field]
    values = record.hparams_of(cfg)
    assert set(values) == set(record.hparams)
    assert all(isinstance(v, float) for v in values.values())


def test_the_pipeline_config_has_a_section_per_stage():
  cfg = load_config_file(os.path.join(REPO, "configs", "pipeline.py"), "tiny")
  assert cfg.stages.split(",") == list(registry.default_pipeline())
  for name in registry.names():
    assert cfg[name].stage == name


def test_unknown_stage_is_refused_with_the_list():
  from alignax.config import ConfigError
  with pytest.raises(ConfigError, match="unknown stage 'ppoo'.*grpo, rloo"):
    registry.get("ppoo")


@pytest.mark.parametrize("stage, args, message", [
    ("ppo", ["--config.ppo.kl_estimator=k3"], "unbounded"),
    ("grpo", ["--config.grpo.kl_in=loss", "--config.grpo.kl_estimator=k1"], "zero expected gradient"),
    ("rloo", ["--config.rloo.kl_estimator=k2"], "not the gradient of any KL"),
    ("grpo", ["--config.grpo.loss_agg=sum"], "config.grpo.loss_agg"),
    ("grpo", ["--config.rewards.functions=no_such_module:f"], "config.rewards.functions: cannot load"),
    ("rloo", ["--config.rloo.group_size=1"], "config.rloo.group_size"),
])
def test_bad_rl_configs_are_refused_before_anything_runs(tmp_path, stage, args, message):
  proc = run_cli("train", f"--config=configs/{stage}.py:tiny", f"--config.workdir={tmp_path / 'run'}",
                 f"--config.init.workdir={tmp_path / 'missing_sft'}", *args, check=False, timeout=120)
  assert proc.returncode == 1
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "missing_sft")  # the upstream stage was not started
