"""LoRA: the adapted forward against a float64 re-derivation, what trains and what stays frozen,
adapter-only checkpoints with exact resume, the reference without a copy, meshes."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignax.models import build_lm, llama_style, lora
from alignax.train.state import TrainState
from alignax.train.step import make_train_step
from tests.cli_helpers import SMALL_PRETRAIN, run_cli

CFG = llama_style(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16)


def _inputs(b=2, t=12):
  tokens = jax.random.randint(jax.random.key(5), (b, t), 0, CFG.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  return tokens, positions, jnp.ones((b, t), jnp.int32)


def _random_adapters(params, cfg, seed=3):
  """Adapters with a nonzero B (a fresh one is zero, which would hide a wrong B path)."""
  lp = lora.attach(params, cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(lp.adapters)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return lp.replace(adapters=jax.tree.unflatten(tree, leaves))


def test_fresh_adapters_leave_the_model_unchanged():
  lm, params = build_lm(CFG)
  lp = lora.attach(params, lora.LoraConfig(rank=4, targets="all-linear"), jax.random.key(0))
  base, _ = lm.apply(params, *_inputs())
  adapted, _ = lm.apply(lp, *_inputs())
  np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))


def test_adapted_forward_equals_float64_merged_weights():
  """x W + (alpha/r) x A B per layer == the plain model with W + (alpha/r) A B computed in
  float64 with numpy (an independent fold of the adapters)."""
  lm, params = build_lm(CFG)
  cfg = lora.LoraConfig(rank=3, alpha=6.0, targets="q_proj,v_proj,wo,down_proj,w_gate")
  lp = _random_adapters(params, cfg)
  pure = nnx.to_pure_dict(params)
  for group, name in [("attn", "wq"), ("attn", "wv"), ("attn", "wo"), ("mlp", "w_out"), ("mlp", "w_gate")]:
    w = np.asarray(pure["blocks"][group][name], np.float64)
    a = np.asarray(lp.adapters["blocks"][group][name]["a"].get_value(), np.float64)
    b = np.asarray(lp.adapters["blocks"][group][name]["b"].get_value(), np.float64)
    delta = np.stack([a[i] @ b[i] for i in range(w.shape[0])]) * (6.0 / 3)
    pure["blocks"][group][name] = (w + delta.reshape(w.shape)).astype(np.float32)
  expected, _ = lm.apply(_replace(params, pure), *_inputs())
  got, _ = lm.apply(lp, *_inputs())
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)
  folded, _ = lm.apply(lora.merged(lp), *_inputs())
  np.testing.assert_allclose(np.asarray(folded), np.asarray(expected), rtol=2e-5, atol=2e-5)
  # Only the named targets were adapted.
  assert set(lp.adapters["blocks"]["attn"]) == {"wq", "wv", "wo"}
  assert set(lp.adapters["blocks"]["mlp"]) == {"w_gate", "w_out"}


def _replace(params, pure):
  state = jax.tree.map(lambda x: x, params)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return state


def test_a_train_step_changes_only_the_adapters_and_keeps_optimizer_state_for_them_only():
  lm, params = build_lm(CFG)
  lp = _random_adapters(params, lora.LoraConfig(rank=2, targets="all-linear"))
  tokens, positions, segments = _inputs()

  def loss_fn(p, batch, rng, extra, hparams):
    logits, _ = lm.apply(p, batch["tokens"], batch["positions"], batch["segment_ids"])
    return jnp.sum(jax.nn.logsumexp(logits, -1) - logits[..., 0]), jnp.float32(tokens.size), {}

  opt = optax.adam(1e-2)
  state = TrainState.create(lp, opt, jax.random.key(0))
  trainable, total = lora.count(lp)
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * trainable + 1  # mu, nu, count
  assert trainable < total / 5
  step = jax.jit(make_train_step(loss_fn, opt))
  new, metrics = step(state, dict(tokens=tokens, positions=positions, segment_ids=segments))
  assert float(metrics["applied"]) == 1.0
  before, after = nnx.to_pure_dict(lp.base), nnx.to_pure_dict(new.params.base)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  moved = [not np.allclose(np.asarray(x), np.asarray(y))
           for x, y in zip(jax.tree.leaves(lp.adapters), jax.tree.leaves(new.params.adapters))]
  assert all(moved)


def test_dropout_acts_only_with_a_key_and_at_the_configured_rate():
  lm, params = build_lm(CFG)
  lp = _random_adapters(params, lora.LoraConfig(rank=4, dropout=0.5))
  lp = lp.replace(dropout=0.5)
  clean, _ = lm.apply(lp, *_inputs())
  same, _ = lm.apply(lp.replace(dropout=0.5), *_inputs())
  np.testing.assert_array_equal(np.asarray(clean), np.asarray(same))  # eval: no key, no dropout
  a, _ = lm.apply(lora.with_dropout_key(lp, jax.random.key(1)), *_inputs())
  b, _ = lm.apply(lora.with_dropout_key(lp, jax.random.key(2)), *_inputs())
  assert not np.allclose(np.asarray(a), np.asarray(clean))
  assert not np.allclose(np.asarray(a), np.asarray(b))
  # The mask keeps a fraction 1 - rate of the adapter inputs, rescaled by 1 / (1 - rate).
  w = lora.LoraWeight(jnp.zeros((64, 8)), jnp.eye(64, 8), jnp.eye(8), jax.random.key(0), 1.0, 0.5)
  y = lora.matmul(jnp.ones((4096, 64)), w, jnp.float32)
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 0.5) < 0.02 and np.allclose(np.asarray(y)[kept], 2.0)


def test_partition_and_combine_round_trip_and_refs_share_the_base():
  _, params = build_lm(CFG)
  lp = lora.attach({"policy": params, "value": {"backbone": params, "head_w": jnp.ones(3)}},
                   lora.LoraConfig(rank=2), jax.random.key(0))
  trainable, frozen = lora.partition(lp)
  back = lora.combine(trainable, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(lp)
  assert "head_w" in trainable["value"]  # a head is trained in full
  assert lora.reference(None, lp["policy"]) is lp["policy"].base
  plain, none = lora.partition(params)
  assert plain is params and none is None


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="model.lora.targets"):
    lora.LoraConfig.from_mapping({"rank": 2, "targets": "qproj"})
  with pytest.raises(ValueError, match="model.lora.dropout"):
    lora.LoraConfig.from_mapping({"rank": 2, "dropout": 1.0})
  with pytest.raises(ValueError, match="model.lora.ranks"):
    lora.LoraConfig.from_mapping({"ranks": 2})
  assert lora.LoraConfig(rank=2, targets="attention, down_proj").target_names() == ("wq", "wk", "wv", "wo",
                                                                                 "w_out")


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora") / "pt")
  run_cli(*SMALL_PRETRAIN, "--config.train.steps=2", f"--config.workdir={workdir}")
  return workdir


SFT = ["train", "--config=configs/sft.py:tiny", "--config.train.batch_size=4", "--config.data.seq_len=64",
       "--config.train.progress=False", "--config.eval.num_prompts=0", "--config.eval.every=0",
       "--config.data.loader=memory", "--config.model.lora.rank=4", "--config.model.lora.dropout=0.1",
       "--config.model.lora.targets=all-linear", "--config.checkpoint.every=2"]


def _export(workdir):
  from alignax import checkpoint as ckpt_lib
  params, _ = ckpt_lib.load_export(workdir)
  return params


@pytest.mark.slow
def test_lora_sft_checkpoints_hold_adapters_only_and_resume_exactly(tmp_path, base_run):
  from safetensors.numpy import load_file
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  args = SFT + [f"--config.init.workdir={base_run}"]
  run_cli(*args, "--config.train.steps=4", f"--config.workdir={straight}")
  run_cli(*args, "--config.train.steps=2", f"--config.workdir={resumed}")
  run_cli(*args, "--config.train.steps=4", f"--config.workdir={resumed}")
  for a, b in zip(jax.tree.leaves(_export(straight)), jax.tree.leaves(_export(resumed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The checkpoint holds no frozen weight: its arrays are the adapters' (and optimizer's) size.
  from alignax.checkpoint_params import load_latest_params
  ckpt_params, _ = load_latest_params(resumed)
  leaves = jax.tree.leaves(ckpt_params)
  adapters = load_file(os.path.join(resumed, "export", "lora", "adapters.safetensors"))
  assert sum(np.size(x) for x in leaves) == sum(x.size for x in adapters.values())
  meta = json.load(open(os.path.join(resumed, "export", "export.json")))
  assert meta["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.1,
                          "targets": "wq,wk,wv,wo,w_gate,w_in,w_out"}
  # The export is the merged model, and it differs from the base it started from.
  base, merged = _export(base_run), _export(resumed)
  assert not np.allclose(np.asarray(base["blocks"]["attn"]["wq"]), np.asarray(merged["blocks"]["attn"]["wq"]))
  np.testing.assert_array_equal(np.asarray(base["embed"]), np.asarray(merged["embed"]))


@pytest.mark.slow
def test_lora_sft_on_a_mesh_and_under_pmap_matches_one_device(tmp_path, base_run):
  args = SFT + [f"--config.init.workdir={base_run}", "--config.train.steps=3",
                "--config.model.lora.dropout=0.0"]
  one = str(tmp_path / "one")
  run_cli(*args, f"--config.workdir={one}")
  placements = {"mesh": (8, ["--config.parallel.mesh.data=2", "--config.parallel.mesh.fsdp=2",
                             "--config.parallel.mesh.tensor=2"]),
                "pmap": (4, ["--config.parallel.mode=pmap"])}
  for name, (devices, flags) in placements.items():
    workdir = str(tmp_path / name)
    run_cli(*args, f"--config.workdir={workdir}", *flags, devices=devices)
    for a, b in zip(jax.tree.leaves(_export(one)), jax.tree.leaves(_export(workdir))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_lora_dpo_starts_at_its_base_reference_and_trains_adapters(tmp_path, base_run):
  """Fresh adapters (B = 0) make the policy equal to the frozen base, which is the reference:
  the first step's sigmoid loss is exactly ln 2 and every implicit reward 0."""
  sft = str(tmp_path / "sft")
  run_cli(*SFT, f"--config.init.workdir={base_run}", "--config.train.steps=2", f"--config.workdir={sft}")
  dpo = str(tmp_path / "dpo")
  run_cli("train", "--config=configs/dpo.py:tiny", f"--config.init.workdir={sft}", f"--config.workdir={dpo}",
          "--config.train.steps=3", "--config.train.batch_size=4", "--config.data.seq_len=64",
          "--config.train.progress=False", "--config.eval.num_prompts=0", "--config.eval.every=0",
          "--config.train.log_every=1", "--config.model.lora.rank=4", "--config.optimizer.lr=1e-2",
          "--config.optimizer.warmup_steps=0")
  from tests.cli_helpers import metric_rows
  rows = [r for r in metric_rows(dpo) if "train/loss" in r]
  assert rows[0]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-6)
  assert rows[0]["train/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
  assert rows[-1]["train/loss"] != pytest.approx(np.log(2.0), abs=1e-4)
  assert os.path.exists(os.path.join(dpo, "export", "lora", "adapters.safetensors"))


def test_lora_is_refused_where_it_cannot_work(tmp_path):
  from tests.cli_helpers import run_cli as run
  out = run(*SMALL_PRETRAIN, "--config.train.steps=1", f"--config.workdir={tmp_path / 'pt'}",
            "--config.model.lora.rank=4", check=False)
  assert out.returncode != 0 and "config.model.lora.rank: LoRA adapts a trained model" in out.stderr
  from alignax.algorithms import online
  from alignax.config import ConfigError, load_config_file
  cfg = load_config_file("configs/grpo.py", "tiny")
  cfg.model.lora.rank, cfg.model.lora.dropout = 4, 0.1
  with pytest.raises(ConfigError, match="config.model.lora.dropout: must be 0 in the RL stages"):
    online.common_validate(cfg, "grpo")
