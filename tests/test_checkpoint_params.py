"""`alignax sample` / `alignax eval` on a run that has checkpoints but no export yet."""

import json
import os
import shutil
import types

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from alignax import checkpoint as ckpt_lib
from alignax.tasks import evaluation
from alignax.checkpoint_params import load_latest_params
from alignax.config import load_config_file, read_config, resolve, save_config
from alignax.data.tokenizer import ByteTokenizer
from alignax.generation import Sampler, SamplingConfig
from alignax.commands.sample import main as sample_main
from alignax.models import abstract_lm, build_lm
from alignax.models.config import ModelConfig
from alignax.commands.eval import main as eval_main
from alignax.train.runner import stage_tokenizer
from alignax.train.state import TrainState
from checkpoint_helpers import ckpt_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The capital of", "Once"]
NOTE = "has no export yet: using its checkpoint at step"


def _configured(stage_file, **values):
  cfg = load_config_file(os.path.join(REPO, "configs", stage_file), "tiny")
  with cfg.unlocked():
    for key, value in values.items():
      *path, last = key.split(".")
      node = cfg
      for part in path:
        node = node[part]
      node[last] = value
  return cfg


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
  """A run directory with checkpoints at steps 1 and 2, config.json and no export, written the
  way training writes them (`Checkpointer.maybe_save` of a TrainState); and step 2's params."""
  workdir = str(tmp_path_factory.mktemp("checkpointed") / "run")
  cfg = _configured("pretrain.py", tokenizer="bytes", workdir=workdir, **{
      "model.vocab_size": ByteTokenizer().vocab_size, "model.d_model": 32, "model.n_layers": 1,
      "model.n_heads": 2, "model.d_ff": 64, "model.max_seq_len": 128})
  save_config(cfg, workdir)
  model = ModelConfig.from_mapping(cfg.model.to_dict())
  checkpointer = ckpt_lib.Checkpointer(workdir, *ckpt_args(cfg))
  for step in (1, 2):
    _, params = build_lm(model, seed=step)
    checkpointer.maybe_save(step, TrainState.create(params, optax.adam(1e-3), jax.random.key(0)))
  checkpointer.close()
  return workdir, jax.device_get(params)


def _sample_flags(workdir, **kw):
  values = dict(workdir=workdir, prompt=PROMPTS, num_samples=1, temperature=0.0, top_k=0, top_p=1.0,
                max_new_tokens=12, seed=0, format="auto")
  values.update(kw)
  return types.SimpleNamespace(**values)


def _expected_output(workdir, params):
  """What `alignax sample` prints for PROMPTS after its header: greedy raw-prompt completions
  of `params`, sampled here directly."""
  cfg = read_config(workdir)
  lm, _ = abstract_lm(ModelConfig.from_mapping(cfg.model.to_dict()))
  sampler = Sampler(lm, stage_tokenizer(resolve(cfg)), SamplingConfig(temperature=0.0, max_new_tokens=12))
  out = evaluation.sample_prompts(sampler, params, PROMPTS, jax.random.key(0), fmt="raw",
                                  batch_size=len(PROMPTS))
  return "".join(f"> {p}\n{t}{'' if e else ' [no <eos>]'}\n\n"
                 for p, t, e in zip(PROMPTS, out.texts, out.ended))


def _samples(stdout):
  """`sample_main`'s output without its "# workdir (...)" header line."""
  header, rest = stdout.split("\n", 1)
  assert header.startswith("# ")
  return rest


def _leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_latest_params_are_the_last_saved_steps(checkpointed):
  workdir, params = checkpointed
  got, step = load_latest_params(workdir)
  assert step == 2
  expected = _leaves(nnx.to_pure_dict(params))
  got = _leaves(got)
  assert sorted(got) == sorted(expected)
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k])


def test_sample_without_export_uses_the_latest_checkpoint_and_says_so(checkpointed, capsys):
  workdir, params = checkpointed
  sample_main(_sample_flags(workdir))
  out = capsys.readouterr()
  assert f"{workdir} {NOTE} 2\n" in out.err
  assert NOTE not in out.out  # stdout holds only the samples
  assert _samples(out.out) == _expected_output(workdir, params)


def test_no_export_and_no_checkpoint_is_one_clear_error(checkpointed, tmp_path):
  workdir, _ = checkpointed
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), bare / "config.json")
  for d in (bare, tmp_path / "missing"):
    with pytest.raises(ckpt_lib.CheckpointError, match="has neither an export nor a checkpoint: train it"):
      sample_main(_sample_flags(str(d)))


def test_params_that_do_not_fit_the_config_are_refused(checkpointed, tmp_path):
  workdir, _ = checkpointed
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other)
  with open(os.path.join(other, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  cfg["model"]["d_ff"] = 96
  with open(os.path.join(other, "config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"do not fit its model config: blocks/mlp/w_gate "
                     r"is \(1, 32, 64\), the model needs \(1, 32, 96\) \(and 2 more\)"):
    sample_main(_sample_flags(other))


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(checkpointed, tmp_path, capsys):
  workdir, _ = checkpointed
  other = str(tmp_path / "damaged")
  shutil.copytree(workdir, other)
  for root, _, files in os.walk(os.path.join(other, "checkpoints", "2", "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 3)
  params, step = load_latest_params(other)
  assert step == 1
  assert "checkpoint step 2" in capsys.readouterr().err
  _, step1 = build_lm(ModelConfig.from_mapping(read_config(other).model.to_dict()), seed=1)
  np.testing.assert_array_equal(params["embed"], np.asarray(step1["embed"][...]))


def test_a_reward_model_checkpoint_samples_its_backbone(checkpointed, tmp_path, capsys):
  """A reward run's params are {"backbone": LM, "head_w", "head_b"}: the LM is its backbone,
  as for a reward export."""
  workdir, lm_params = checkpointed
  rm = str(tmp_path / "rm")
  cfg = read_config(workdir)
  with cfg.unlocked():
    cfg.stage, cfg.workdir = "reward", rm
  save_config(cfg, rm)
  d = int(cfg.model.d_model)
  params = {"backbone": lm_params, "head_w": np.ones(d, np.float32), "head_b": np.zeros((), np.float32)}
  with ocp.CheckpointManager(os.path.join(rm, "checkpoints"), item_names=("state",)) as manager:
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
    manager.wait_until_finished()
  sample_main(_sample_flags(rm, format="raw"))
  out = capsys.readouterr()
  assert f"{rm} {NOTE} 7\n" in out.err
  assert out.out.startswith(f"# {rm} (reward, raw prompts")
  assert _samples(out.out) == _expected_output(workdir, lm_params)


@pytest.mark.slow
def test_a_pretrain_run_stopped_before_its_export_samples_and_evaluates(tmp_path, capsys):
  """End to end: `run_stage` with a checkpoint every step, the export deleted (as if the run
  had been stopped first); sample and eval read the step-2 checkpoint."""
  from alignax.algorithms import run_stage
  workdir = str(tmp_path / "pt")
  result = run_stage(_configured("pretrain.py", workdir=workdir, **{
      "model.d_model": 64, "model.n_layers": 2, "model.d_ff": 128, "train.batch_size": 4,
      "data.seq_len": 64, "data.loader": "memory", "train.progress": False,
      "world.pretrain_bytes": 200000, "optimizer.warmup_steps": 1, "train.steps": 2,
      "eval.every": 0, "eval.batches": 1, "checkpoint.every": 1, "parallel.mesh.data": 1}))
  shutil.rmtree(ckpt_lib.export_path(workdir))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  final = jax.device_get(result.state.params)
  capsys.readouterr()

  sample_main(_sample_flags(workdir))
  out = capsys.readouterr()
  assert out.err.count(f"{workdir} {NOTE} 2\n") == 1
  assert _samples(out.out) == _expected_output(workdir, final)

  metrics = eval_main(types.SimpleNamespace(workdir=workdir, reference=workdir, num_prompts=4, seed=0))
  out = capsys.readouterr()
  assert out.err.count(f"{workdir} {NOTE} 2\n") == 2  # the run and its reference
  assert metrics["stage"] == "pretrain" and metrics["num_prompts"] == 4
  assert metrics["source"] == metrics["reference_source"] == "checkpoint step 2"
  assert metrics["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
  assert json.loads(out.out) == metrics
  with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
    assert json.load(f)["source"] == "checkpoint step 2"
