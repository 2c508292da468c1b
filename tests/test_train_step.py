"""The shared update: accumulation is exact, the non-finite guard skips or halts, the schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignax.losses.lm import masked_cross_entropy
from alignax.models import build_lm
from alignax.train import optimizer as opt_lib
from alignax.train.config import OptimizerConfig
from alignax.train.state import TrainState
from alignax.train.step import accumulate_gradients, make_train_step


def _opt_cfg(**kw):
  base = dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, warmup_steps=3,
              schedule="cosine", min_lr_ratio=0.1, decay_embeddings_and_norms=False)
  base.update(kw)
  return OptimizerConfig(**base)


def _lm_loss(lm):
  def loss_fn(params, batch, rng, extra, hparams):
    logits, _ = lm.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    return masked_cross_entropy(logits, batch["tokens"], batch["loss_mask"])
  return loss_fn


def _batch(cfg, b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, size=(b, t)).astype(np.int32)
  mask = (rng.random((b, t)) < 0.7).astype(np.float32)  # uneven token counts per micro-batch
  mask[:, 0] = 0
  return dict(tokens=tokens, positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
              segment_ids=np.ones((b, t), np.int32), loss_mask=mask)


def _rel_norm(a, b):
  """Relative error in norm, ||a - b|| / ||b||: the fp32 summation-order-robust criterion."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_accumulated_microbatches_equal_one_big_batch(tiny_llama):
  lm, params = build_lm(tiny_llama, seed=0)
  batch = _batch(tiny_llama)  # uneven loss tokens per micro-batch: exact only with sums and counts
  total1, count1, grads1, _ = accumulate_gradients(_lm_loss(lm), params, batch, jax.random.key(0))
  total4, count4, grads4, _ = jax.jit(
      lambda p, b: accumulate_gradients(_lm_loss(lm), p, b, jax.random.key(0), accum_steps=4))(params, batch)
  assert float(count1) == float(count4) == batch["loss_mask"].sum()
  np.testing.assert_allclose(float(total4), float(total1), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads4)):
    assert _rel_norm(b, a) <= 1e-5
  # Several full steps (plain SGD, which does not amplify rounding the way Adam's 1/sqrt(v) does).
  optimizer = optax.sgd(0.5)
  results = {}
  for k in (1, 4):
    state = TrainState.create(params, optimizer, jax.random.key(0))
    step = jax.jit(make_train_step(_lm_loss(lm), optimizer, accum_steps=k))
    losses = []
    for _ in range(3):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
    results[k] = (losses, state.params)
  np.testing.assert_allclose(results[1][0], results[4][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[4][1])):
    assert _rel_norm(b, a) <= 1e-5


def _poisoned_loss(lm, bad_step):
  base = _lm_loss(lm)
  def loss_fn(params, batch, rng, extra, hparams):
    total, count, m = base(params, batch, rng, extra, hparams)
    return total * jnp.where(batch["poison"][0] > 0, jnp.nan, 1.0), count, m
  return loss_fn


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_nonfinite_guard(policy, tiny_llama):
  lm, params = build_lm(tiny_llama, seed=0)
  optimizer = opt_lib.make_optimizer(_opt_cfg(), total_steps=10)
  state = TrainState.create(params, optimizer, jax.random.key(0))
  step = jax.jit(make_train_step(_poisoned_loss(lm, 1), optimizer, nonfinite_policy=policy))
  snapshots = []
  for i in range(4):
    batch = dict(_batch(tiny_llama, seed=i), poison=np.array([1 if i == 1 else 0] * 8, np.int32))
    before = state.params
    state, m = step(state, batch)
    snapshots.append((before, state.params, float(m["applied"])))
  assert int(state.nonfinite) == 1
  assert int(state.step) == 4
  # The poisoned step (index 1) never changes params.
  for a, b in zip(jax.tree.leaves(snapshots[1][0]), jax.tree.leaves(snapshots[1][1])):
    np.testing.assert_array_equal(a, b)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  if policy == "skip":
    assert int(state.halted_at) == -1
    assert [s[2] for s in snapshots] == [1.0, 0.0, 1.0, 1.0]
  else:
    assert int(state.halted_at) == 1
    assert [s[2] for s in snapshots] == [1.0, 0.0, 0.0, 0.0]  # frozen after the bad step
    for a, b in zip(jax.tree.leaves(snapshots[1][0]), jax.tree.leaves(state.params)):
      np.testing.assert_array_equal(a, b)


def test_schedule_warmup_then_cosine_closed_form():
  cfg = _opt_cfg(lr=2.0, warmup_steps=4, min_lr_ratio=0.25)
  sched = opt_lib.make_schedule(cfg, total_steps=20)
  for s in range(4):
    assert np.isclose(sched(s), 2.0 * s / 4)
  for s in range(4, 21):
    frac = (s - 4) / 16
    ref = 2.0 * (0.25 + 0.75 * 0.5 * (1 + np.cos(np.pi * frac)))
    assert np.isclose(sched(s), ref, rtol=1e-5), s
  lin = opt_lib.make_schedule(_opt_cfg(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 10)
  assert np.isclose(lin(5), 0.5) and np.isclose(lin(10), 0.0)


def test_weight_decay_mask_spares_norms_biases_and_embeddings(tiny_gpt2):
  _, params = build_lm(tiny_gpt2)
  mask = opt_lib.decay_mask(params)
  flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["blocks/attn/wq/value"] and flat["blocks/mlp/w_in/value"]
  assert not flat["embed/value"] and not flat["pos_embed/value"]
  assert not flat["blocks/attn_norm/scale/value"] and not flat["blocks/mlp/b_in/value"]
  assert not flat["final_norm/scale/value"]
