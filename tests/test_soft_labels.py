"""Soft preference labels (P(chosen better), as an AI judge gives in RLAIF): the Bradley-Terry and
DPO losses against float64 NumPy, the `chosen_prob` field through schemas and the pipeline, the
stage switches and resuming a run that predates them."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax import checkpoint as ckpt_lib
from alignax.algorithms import dpo, reward
from alignax.config import ConfigError, load_config_file
from alignax.data import pipeline, sources
from alignax.data.config import DataConfig
from alignax.data.schemas import DataError, validate
from alignax.data.tokenizer import ByteTokenizer
from alignax.losses.preference import bradley_terry_loss, dpo_loss, soft_label_eps

TOK = ByteTokenizer()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float64)  # the last pair is filler


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _inputs(seed=0, b=8):
  rng = np.random.default_rng(seed)
  rc, rr = rng.normal(size=b) * 2, rng.normal(size=b) * 2
  margin = rng.uniform(0, 1, b)
  p = rng.uniform(0, 1, b)
  p[:3] = (0.0, 0.5, 1.0)  # the end points and the tie, next to random labels
  return rc, rr, margin, p


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


# ----------------------------------------------------------------------------- Bradley-Terry


def _np_soft_bt(rc, rr, margin, p, coef):
  """Per-pair loss (nats) and its gradient wrt r_c (= -gradient wrt r_r of the pairwise term)."""
  d = rc - rr - margin
  loss = -(p * _log_sigmoid(d) + (1 - p) * _log_sigmoid(-d)) + coef * (rc + rr) ** 2
  g_pair = _sigmoid(d) - p  # d/dd of the cross-entropy
  return loss, g_pair + 2 * coef * (rc + rr), -g_pair + 2 * coef * (rc + rr)


@pytest.mark.parametrize("coef,use_margin", [(0.0, False), (0.0, True), (0.01, True)])
def test_soft_bradley_terry_matches_float64(coef, use_margin):
  rc, rr, margin, p = _inputs()
  m = margin if use_margin else np.zeros_like(margin)
  fn = lambda a, b: bradley_terry_loss(a, b, margin=jnp.asarray(m, jnp.float32) if use_margin else None,
                                       target_prob=jnp.asarray(p, jnp.float32), center_coef=coef,
                                       weights=jnp.asarray(W, jnp.float32))
  total, count, _ = fn(*_f32(rc, rr))
  loss, g_rc, g_rr = _np_soft_bt(rc, rr, m, p, coef)
  np.testing.assert_allclose(float(total), (loss * W).sum(), rtol=1e-5)
  assert float(count) == W.sum()
  grads = jax.grad(lambda a, b: fn(a, b)[0], argnums=(0, 1))(*_f32(rc, rr))
  np.testing.assert_allclose(grads[0], g_rc * W, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[1], g_rr * W, rtol=1e-5, atol=1e-6)


def test_soft_bradley_terry_end_points_and_tie():
  rc, rr, margin, _ = _inputs(1)
  rc, rr, margin = _f32(rc, rr, margin)
  ones, zeros = jnp.ones_like(rc), jnp.zeros_like(rc)
  per_pair = lambda a, b, **kw: bradley_terry_loss(a, b, weights=None, **kw)[0]
  for m in (None, margin):
    hard = bradley_terry_loss(rc, rr, margin=m, center_coef=0.01)
    soft = bradley_terry_loss(rc, rr, margin=m, target_prob=ones, center_coef=0.01)
    assert float(soft[0]) == float(hard[0])  # p = 1 is the hard label, bit for bit
    for k in hard[2]:
      assert float(soft[2][k]) == float(hard[2][k])
  # p = 0 is the swapped pair (chosen and rejected exchanged, hard label), pair by pair.
  for i in range(rc.shape[0]):
    a, b = rc[i:i + 1], rr[i:i + 1]
    np.testing.assert_allclose(float(per_pair(a, b, target_prob=zeros[:1])),
                               float(per_pair(b, a)), rtol=1e-6)
  # p = 0.5 at d = 0: the loss is log 2 and its gradient wrt d is zero.
  d0 = jnp.zeros(4, jnp.float32)
  half = jnp.full(4, 0.5, jnp.float32)
  assert float(per_pair(d0, d0, target_prob=half)) == pytest.approx(4 * np.log(2.0), rel=1e-6)
  g = jax.grad(lambda d: per_pair(d, jnp.zeros_like(d), target_prob=half))(d0)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_soft_bradley_terry_is_finite_for_large_gaps():
  # log(1 - sigmoid(d)) would be log 0 = -inf at d = 100 in float32; log_sigmoid(-d) is -100.
  rc, rr = _f32([100.0, -100.0], [0.0, 0.0])
  p = jnp.asarray([0.9, 0.1], jnp.float32)
  total, _, _ = bradley_terry_loss(rc, rr, target_prob=p)
  d = np.array([100.0, -100.0])
  ref = -(np.array([0.9, 0.1]) * _log_sigmoid(d) + np.array([0.1, 0.9]) * _log_sigmoid(-d))
  np.testing.assert_allclose(float(total), ref.sum(), rtol=1e-5)
  g = jax.grad(lambda a: bradley_terry_loss(a, rr, target_prob=p)[0])(rc)
  assert np.isfinite(np.asarray(g)).all()


# ----------------------------------------------------------------------------- DPO


def _dpo_inputs(seed=0, b=8):
  rng = np.random.default_rng(seed)
  pc, pr = -rng.uniform(1, 30, b), -rng.uniform(1, 30, b)
  rc, rr = pc + rng.normal(size=b) * 3, pr + rng.normal(size=b) * 3
  p = rng.uniform(0, 1, b)
  p[:3] = (0.0, 0.5, 1.0)
  return pc, pr, rc, rr, p


def _np_soft_dpo(pc, pr, rc, rr, p, beta, eps0):
  """Per-pair soft cDPO loss (nats): the judge's p with labels flipped at rate eps0."""
  h = (pc - rc) - (pr - rr)
  q = (1 - eps0) * p + eps0 * (1 - p)  # P(chosen better) after the flips
  return -(q * _log_sigmoid(beta * h) + (1 - q) * _log_sigmoid(-beta * h)), h


@pytest.mark.parametrize("eps0", [0.0, 0.1])
def test_soft_dpo_matches_float64(eps0):
  pc, pr, rc, rr, p = _dpo_inputs()
  beta = 0.3
  def ours(pc_, pr_):
    return dpo_loss("sigmoid", pc_, pr_, *_f32(rc, rr), beta=beta, label_smoothing=eps0,
                    target_prob=jnp.asarray(p, jnp.float32), weights=jnp.asarray(W, jnp.float32))[0]
  loss, h = _np_soft_dpo(pc, pr, rc, rr, p, beta, eps0)
  np.testing.assert_allclose(float(ours(*_f32(pc, pr))), (loss * W).sum(), rtol=1e-5)
  # d loss / d pc = beta (s(beta h) - q) = -d loss / d pr.
  q = (1 - eps0) * p + eps0 * (1 - p)
  g = beta * (_sigmoid(beta * h) - q) * W
  g_pc, g_pr = jax.grad(ours, argnums=(0, 1))(*_f32(pc, pr))
  np.testing.assert_allclose(g_pc, g, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_pr, -g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("eps0", [0.0, 0.1])
def test_soft_dpo_with_p_one_is_the_hard_loss(eps0):
  pc, pr, rc, rr, _ = _dpo_inputs(2)
  args = _f32(pc, pr, rc, rr)
  hard = dpo_loss("sigmoid", *args, beta=0.1, label_smoothing=eps0)
  soft = dpo_loss("sigmoid", *args, beta=0.1, label_smoothing=eps0,
                  target_prob=jnp.ones(pc.shape, jnp.float32))
  assert float(soft[0]) == float(hard[0])
  assert float(soft_label_eps(jnp.ones(1), eps0)[0]) == np.float32(eps0)
  # Without label smoothing the per-pair eps is 1 - p; p = 0 is the swapped pair.
  np.testing.assert_allclose(np.asarray(soft_label_eps(jnp.asarray([0.0, 0.25, 1.0]), 0.0)),
                             [1.0, 0.75, 0.0])
  swapped = dpo_loss("sigmoid", args[1], args[0], args[3], args[2], beta=0.1)
  flipped = dpo_loss("sigmoid", *args, beta=0.1, target_prob=jnp.zeros(pc.shape, jnp.float32))
  np.testing.assert_allclose(float(flipped[0]), float(swapped[0]), rtol=1e-6)


@pytest.mark.parametrize("kind", ["robust", "ipo", "hinge", "simpo", "orpo"])
def test_soft_labels_refused_where_undefined(kind):
  pc, pr, rc, rr, p = (jnp.asarray(x, jnp.float32) for x in _dpo_inputs())
  n = jnp.full(pc.shape, 10.0)
  with pytest.raises(ValueError, match="soft labels"):
    dpo_loss(kind, pc, pr, rc, rr, beta=0.1, target_prob=p, len_chosen=n, len_rejected=n)


# ----------------------------------------------------------------------------- records, batches

PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


def test_schema_keeps_chosen_prob_and_refuses_bad_values():
  assert validate("preference", dict(PAIR, chosen_prob=0.7))["chosen_prob"] == 0.7
  assert validate("preference", dict(PAIR, chosen_prob=1))["chosen_prob"] == 1.0
  assert validate("preference", dict(PAIR, chosen_prob=np.float32(0.0)))["chosen_prob"] == 0.0
  assert "chosen_prob" not in validate("preference", PAIR)
  for bad in (-0.1, 1.5, "x", float("nan"), float("inf"), True):
    with pytest.raises(DataError, match="'chosen_prob'"):
      validate("preference", dict(PAIR, chosen_prob=bad))
  with pytest.raises(DataError, match=r"'chosen_prob' must be in \[0, 1\]"):
    validate("preference", dict(PAIR, chosen_prob=1.5))
  # Validating twice (the pipelines re-validate normalized records) is harmless.
  once = validate("preference", dict(PAIR, chosen_prob=0.25))
  assert validate("preference", once) == once


def test_pipeline_batches_carry_chosen_prob_next_to_margin():
  records = [dict(PAIR, chosen_prob=0.8, margin=0.5), dict(PAIR, chosen="c"),
             dict(PAIR, chosen="d", chosen_prob=0.0)]
  b = next(pipeline.preference_pipeline(records, TOK, batch_size=4, seq_len=16, shuffle=False))
  assert b["chosen_prob"].dtype == np.float32 and b["chosen_prob"].shape == (4,)
  # An absent field is the hard label 1; the filler row holds 0 like margin, and valid 0.
  np.testing.assert_array_equal(b["chosen_prob"], np.float32([0.8, 1.0, 0.0, 0.0]))
  np.testing.assert_array_equal(b["margin"], [0.5, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(b["valid"], [1, 1, 1, 0])


@pytest.mark.parametrize("loader", ["memory", "tfds"])
def test_jsonl_records_reach_the_batch_with_chosen_prob(tmp_path, loader):
  recs = [{"prompt": f"Question {i}?", "chosen": f"Polite answer {i}.", "rejected": f"rude {i}!!",
           "chosen_prob": i / 4} for i in range(4)] + [{"prompt": "Q?", "chosen": "y", "rejected": "n"}]
  path = tmp_path / "prefs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  cfg = DataConfig.from_mapping({"source": "files", "train_files": str(path), "loader": loader,
                                 "tfds_dir": str(tmp_path / "tfds"), "text_mode": "lines",
                                 "eval_records": 0})
  train = sources.split_sources(cfg, "preference")["train"]
  b = next(pipeline.preference_pipeline(train, TOK, batch_size=5, seq_len=48, shuffle=False))
  by_index = dict(zip(b["index"].tolist(), b["chosen_prob"].tolist()))
  assert by_index == {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
  # A bad value in a file is refused as it is read, naming the line and the field.
  path.write_text(json.dumps(dict(recs[0], chosen_prob=2.0)) + "\n")
  memory = DataConfig.from_mapping({"source": "files", "train_files": str(path),
                                    "loader": "memory", "text_mode": "lines", "eval_records": 0})
  with pytest.raises(DataError, match=r"prefs\.jsonl:1: field 'chosen_prob' must be in \[0, 1\]"):
    pipeline.preference_pipeline(sources.split_sources(memory, "preference")["train"], TOK,
                                 batch_size=1, seq_len=48)

# ----------------------------------------------------------------------------- the stages


def test_reward_and_dpo_losses_read_chosen_prob_only_when_switched_on(tiny_llama):
  from alignax.models import build_lm
  from alignax.models.heads import build_scalar_model
  records = [dict(PAIR, chosen=f"answer {i}", chosen_prob=p) for i, p in enumerate((0.0, 0.3, 0.9))]
  batch = next(pipeline.preference_pipeline(records, TOK, batch_size=4, seq_len=24, shuffle=False))
  target = jnp.asarray(batch["chosen_prob"])

  model, params = build_scalar_model(tiny_llama, seed=0)
  rc, rr = reward.pair_rewards(model, params, batch)
  hp = {"center_coef": 0.0}
  for soft in (False, True):
    got = reward.reward_loss(model, False, soft)(params, batch, None, None, hp)
    want = bradley_terry_loss(rc, rr, target_prob=target if soft else None, weights=batch["valid"])
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)

  lm, pol = build_lm(tiny_llama, seed=0)
  _, ref = build_lm(tiny_llama, seed=1)
  pc, pr = dpo.pair_logps(lm, pol, batch)
  qc, qr = dpo.pair_logps(lm, ref, batch)
  hp = dict(beta=0.1, label_smoothing=0.0, gamma=0.0)
  for soft in (False, True):
    got = dpo.make_dpo_loss(lm, "sigmoid", soft)(pol, batch, None, {"ref": ref}, hp)
    want = dpo_loss("sigmoid", pc, pr, qc, qr, beta=0.1, target_prob=target if soft else None,
                    weights=batch["valid"])
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)


def test_config_switches_default_off_and_dpo_refuses_undefined_losses():
  rcfg = load_config_file(os.path.join(REPO, "configs", "reward.py"), "tiny")
  dcfg = load_config_file(os.path.join(REPO, "configs", "dpo.py"), "tiny")
  assert rcfg.reward.soft_labels is False and dcfg.dpo.soft_labels is False
  with dcfg.unlocked():
    dcfg.dpo.soft_labels = True
  dpo.validate(dcfg)  # sigmoid
  with dcfg.unlocked():
    dcfg.dpo.loss_type = "ipo"
  with pytest.raises(ConfigError, match="dpo.soft_labels"):
    dpo.validate(dcfg)


def test_a_run_from_before_soft_labels_resumes():
  cfg = load_config_file(os.path.join(REPO, "configs", "reward.py"), "tiny").to_dict()
  old = json.loads(json.dumps(cfg))
  del old["reward"]["soft_labels"]  # what a checkpoint written before the key saved
  assert ckpt_lib.resume_differences(old, cfg) == []
  cfg["reward"]["soft_labels"] = True  # switching it on is a change
  assert ckpt_lib.resume_differences(old, cfg) == [
      "reward.soft_labels: checkpoint has False, config has True"]
  dcfg = load_config_file(os.path.join(REPO, "configs", "dpo.py"), "tiny").to_dict()
  old = json.loads(json.dumps(dcfg))
  del old["dpo"]["soft_labels"]
  assert ckpt_lib.resume_differences(old, dcfg) == []
