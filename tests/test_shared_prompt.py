"""Preference pairs packed into one row (`data.pair_len`): the same logprobs, rewards, losses and
gradients as the two-row layout, and pairs that do not fit are refused or counted."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.algorithms import dpo, reward, shared_prompt
from alignax import checkpoint as ckpt_lib
from alignax.config import ConfigError, load_config_file, resolve
from alignax.data import pipeline
from alignax.data.tokenizer import ByteTokenizer
from alignax.errors import DataError
from alignax.models import build_lm
from alignax.models.heads import build_scalar_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, PAIR_LEN = 40, 64

# Prompts and responses of many lengths; the last pair's chosen is cut at SEQ_LEN (its prompt
# leaves 40 - 22 = 18 response bytes) and the rejected responses share a first word with chosen.
RECORDS = [{"prompt": "Q" * (2 + 3 * i) + "?", "chosen": "yes " + "a" * (1 + 2 * i),
            "rejected": "yes no" + "b" * (i % 4)} for i in range(6)]
RECORDS.append({"prompt": "P" * 10, "chosen": "c" * 30, "rejected": "r"})


def batches(records=RECORDS, pair_len=0, batch_size=8, **kw):
  return next(pipeline.preference_pipeline(records, ByteTokenizer(), batch_size=batch_size,
                                           seq_len=SEQ_LEN, shuffle=False, pair_len=pair_len, **kw))


def to_device(batch):
  return jax.tree.map(jnp.asarray, {k: batch[k] for k in ("chosen", "rejected", "prompt_len")})


def test_pack_layout_by_hand():
  """One pair laid out as the module docstring says: prompt, chosen, rejected, padding."""
  batch = to_device(batches(RECORDS[:1], batch_size=2))  # row 1 is a filler row
  pk = jax.device_get(shared_prompt.pack_pairs(batch, PAIR_LEN))
  c, r = batch["chosen"], batch["rejected"]
  p = int(batch["prompt_len"][0])
  n_c, n_r = int(c["segment_ids"][0].sum()), int(r["segment_ids"][0].sum())
  want = np.concatenate([np.asarray(c["tokens"][0, :n_c]), np.asarray(r["tokens"][0, p:n_r])])
  n = len(want)
  np.testing.assert_array_equal(pk["tokens"][0, :n], want)
  np.testing.assert_array_equal(pk["positions"][0, :n],
                                np.concatenate([np.arange(n_c), np.arange(p, n_r)]))
  np.testing.assert_array_equal(pk["segment_ids"][0], [1] * n_c + [2] * (n - n_c) + [0] * (PAIR_LEN - n))
  assert pk["rejected_start"][0] == n_c and pk["chosen_last"][0] == n_c - 1
  assert pk["rejected_last"][0] == n - 1 and pk["shared_prefix"][0] == p
  assert pk["chosen_mask"][0].sum() == c["loss_mask"][0].sum()
  assert pk["rejected_mask"][0].sum() == r["loss_mask"][0].sum()
  assert not pk["segment_ids"][1].any() and not pk["chosen_mask"][1].any()  # filler row stays empty


def test_mask_lets_the_rejected_response_see_the_prompt_but_not_chosen():
  from alignax.models.transformer import attention_mask
  seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 0]])
  slots = jnp.arange(7)
  m = np.asarray(attention_mask(seg, seg, slots, slots, shared_prefix=jnp.asarray([2])))[0]
  assert m[4].tolist() == [True, True, False, False, True, False, False]  # prompt + itself
  assert m[3].tolist() == [True, True, True, True, False, False, False]  # chosen: causal
  assert not m[6, :6].any()  # padding sees only padding (as without a shared prefix)


@pytest.mark.parametrize("style", ["llama", "gpt2", "llama_window"])
def test_packed_logps_equal_two_rows(tiny_llama, tiny_gpt2, style):
  cfg = {"llama": tiny_llama, "gpt2": tiny_gpt2,
         # A window shorter than the pairs: measured in positions, not packed slots.
         "llama_window": dataclasses.replace(tiny_llama, sliding_window=12)}[style]
  lm, params = build_lm(cfg, seed=0)
  batch = to_device(batches(pair_len=PAIR_LEN))
  assert int(batch["chosen"]["segment_ids"][6].sum()) == SEQ_LEN  # the cut pair is there (row 7: filler)
  two = jax.jit(lambda p, b: dpo.pair_logps(lm, p, b))(params, batch)
  one = jax.jit(lambda p, b: dpo.pair_logps(lm, p, b, PAIR_LEN))(params, batch)
  for a, b in zip(two, one):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-4)
  assert np.all(np.asarray(two[0])[:7] < -1.0) and np.all(np.asarray(two[1])[:7] < -1.0)


def test_packed_dpo_loss_and_gradient_equal_two_rows(tiny_llama):
  lm, params = build_lm(tiny_llama, seed=0)
  _, ref = build_lm(tiny_llama, seed=1)
  batch = batches(pair_len=PAIR_LEN)
  batch = {**to_device(batch), **{k: jnp.asarray(batch[k]) for k in ("valid", "chosen_prob")}}
  hp = dict(beta=jnp.float32(0.1), label_smoothing=jnp.float32(0.0), gamma=jnp.float32(0.0))

  def loss_and_grad(pair_len):
    loss = dpo.make_dpo_loss(lm, "sigmoid", pair_len=pair_len)
    f = lambda p: (lambda s, c, m: s / c)(*loss(p, batch, None, {"ref": ref}, hp))
    return jax.jit(jax.value_and_grad(f))(params)

  (l2, g2), (l1, g1) = loss_and_grad(0), loss_and_grad(PAIR_LEN)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
  flat2, flat1 = jax.tree.leaves(g2), jax.tree.leaves(g1)
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(flat1, flat2))
  den = sum(float(jnp.sum(b ** 2)) for b in flat2)
  assert den > 0 and (num / den) ** 0.5 < 1e-4


def test_packed_rewards_equal_two_rows(tiny_llama):
  lm_params = build_lm(tiny_llama, seed=0)[1]
  model, params = build_scalar_model(tiny_llama, seed=2, backbone=lm_params)
  batch = to_device(batches(pair_len=PAIR_LEN))
  two = jax.jit(lambda p, b: reward.pair_rewards(model, p, b))(params, batch)
  one = jax.jit(lambda p, b: reward.pair_rewards(model, p, b, PAIR_LEN))(params, batch)
  for a, b in zip(two, one):  # the filler row 7 (valid 0) scores an empty row: any value
    np.testing.assert_allclose(np.asarray(b)[:7], np.asarray(a)[:7], rtol=1e-5, atol=1e-5)
  assert np.ptp(np.asarray(two[0])) > 0  # rewards differ across pairs


def test_a_pair_longer_than_pair_len_is_refused_or_counted():
  long = {"prompt": "P" * 10, "chosen": "c" * 25, "rejected": "r" * 25}  # 1 + 10 + ... > 48
  with pytest.raises(DataError, match=r"pair_too_long|data.pair_len 48"):
    batches(RECORDS + [long], pair_len=48)
  it = pipeline.preference_pipeline(RECORDS + [long], ByteTokenizer(), batch_size=8,
                                    seq_len=SEQ_LEN, shuffle=False, pair_len=48,
                                    bad_records="skip")
  batch = next(it)
  assert batch["valid"].sum() == len(RECORDS)
  assert it.stats()["skipped/pair_too_long"] == 1
  # Two rows per pair take it.
  assert batches(RECORDS + [long])["valid"].sum() == len(RECORDS) + 1
  with pytest.raises(DataError, match="pair_len must be 0 or >= seq_len"):
    batches(pair_len=SEQ_LEN - 1)


def test_pair_len_config_checks_and_old_runs_resume():
  cfg = load_config_file(os.path.join(REPO, "configs", "dpo.py"), "tiny")
  assert cfg.data.pair_len == 0
  with cfg.unlocked():
    cfg.workdir = "/tmp/unused"
    for bad in (cfg.data.seq_len - 1, cfg.model.max_seq_len + 1):
      cfg.data.pair_len = bad
      with pytest.raises(ConfigError, match="data.pair_len"):
        resolve(cfg)
    cfg.data.pair_len = cfg.data.seq_len
    resolve(cfg)
    dpo.validate(cfg)
    cfg.dpo.loss_type = "kto"
    with pytest.raises(ConfigError, match="data.pair_len"):
      dpo.validate(cfg)
  new = load_config_file(os.path.join(REPO, "configs", "reward.py"), "tiny").to_dict()
  old = json.loads(json.dumps(new))
  del old["data"]["pair_len"]  # a checkpoint written before the key
  assert ckpt_lib.resume_differences(old, new) == []
  new["data"]["pair_len"] = 192
  assert ckpt_lib.resume_differences(old, new) == ["data.pair_len: checkpoint has 0, config has 192"]
