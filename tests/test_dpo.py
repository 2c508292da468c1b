"""The DPO stage: reference logprobs precomputed or on the fly, KTO's mismatched pairs, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignax.algorithms import dpo, reference_cache
from alignax.data import pipeline
from alignax.data.batching import BatchOptions
from alignax.data.tokenizer import ByteTokenizer
from alignax.models import build_lm
from alignax.train.state import TrainState
from alignax.train.step import make_train_step
from cli_helpers import SMALL_PRETRAIN, metric_rows, run_cli

RECORDS = [{"prompt": f"Question {i}?", "chosen": f"Polite answer {i}.", "rejected": f"rude {i}!!"}
           for i in range(12)]


def test_precomputed_and_on_the_fly_reference_give_the_same_step(tiny_llama):
  tok = ByteTokenizer()
  lm, params = build_lm(tiny_llama, seed=0)
  _, ref = build_lm(tiny_llama, seed=1)  # a reference different from the policy
  batch = next(pipeline.preference_pipeline(RECORDS, tok, batch_size=8, seq_len=48, shuffle=True, seed=3))
  # Precomputed: sums for every record by index (as `precompute_reference` stores them).
  all_pairs = next(pipeline.preference_pipeline(RECORDS, tok, batch_size=12, seq_len=48, shuffle=False))
  rc_all, rr_all = dpo.pair_logps(lm, ref, all_pairs)
  order = np.asarray(all_pairs["index"])
  ref_c, ref_r = np.zeros(12, np.float32), np.zeros(12, np.float32)
  ref_c[order], ref_r[order] = np.asarray(rc_all), np.asarray(rr_all)
  with_ref = next(dpo.WithReference(iter([batch]), ref_c, ref_r))

  # SGD, so the update is the gradient itself: Adam's first step is ~lr * sign(g) and turns
  # float32 rounding in a near-zero gradient into a whole-lr difference.
  optimizer = optax.sgd(1.0)
  step = jax.jit(make_train_step(dpo.make_dpo_loss(lm, "sigmoid"), optimizer))
  results = []
  for b in (batch, with_ref):
    state = TrainState.create(params, optimizer, jax.random.key(0), extra={"ref": ref},
                              hparams=dict(beta=0.1, label_smoothing=0.0, gamma=0.0))
    state, m = step(state, b)
    results.append((m, state.params))
  (m1, p1), (m2, p2) = results
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
  assert float(m1["loss"]) != pytest.approx(np.log(2.0), rel=1e-3)  # the reference mattered
  for a, b, p0 in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), jax.tree.leaves(params)):
    g1, g2 = np.asarray(p0) - np.asarray(a), np.asarray(p0) - np.asarray(b)
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5 * np.abs(g1).max() + 1e-12)


def test_mismatched_pairs_join_each_prompt_with_the_next_completion():
  tok = ByteTokenizer()
  records = [{"prompt": "Q" * (i + 1), "completion": chr(ord("a") + i) * (3 + i), "label": bool(i % 2)}
             for i in range(4)]
  batch = next(pipeline.unpaired_pipeline(records, tok, batch_size=4, seq_len=32, shuffle=False))
  kl = jax.device_get(dpo.mismatched_pairs({k: jnp.asarray(batch[k]) for k in
                                            ("tokens", "positions", "segment_ids", "loss_mask")}))
  for i in range(4):
    j = (i + 1) % 4
    prompt_len = int(np.argmax(batch["loss_mask"][i] > 0))
    np.testing.assert_array_equal(kl["tokens"][i, :prompt_len], batch["tokens"][i, :prompt_len])
    theirs = batch["tokens"][j][batch["loss_mask"][j] > 0]
    ours = kl["tokens"][i][kl["loss_mask"][i] > 0]
    np.testing.assert_array_equal(ours, theirs)
    n = prompt_len + len(theirs)
    assert np.all(kl["segment_ids"][i, :n] == 1) and np.all(kl["segment_ids"][i, n:] == 0)
    np.testing.assert_array_equal(kl["positions"][i, :n], np.arange(n))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("base") / "pt")
  run_cli(*SMALL_PRETRAIN, "--config.train.steps=2", f"--config.workdir={workdir}")
  return workdir


DPO_ARGS = ["train", "--config=configs/dpo.py:tiny", "--config.data.source=files",
            "--config.data.loader=memory", "--config.train.steps=3", "--config.train.batch_size=4",
            "--config.data.seq_len=64", "--config.train.progress=False", "--config.eval.num_prompts=0",
            "--config.eval.every=0", "--config.data.eval_records=2"]


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.mark.slow
@pytest.mark.parametrize("bad,reason", [
    ({"prompt": "Same?", "chosen": "identical", "rejected": "identical"}, "identical"),
    ({"prompt": "Empty?", "chosen": "", "rejected": "no"}, "empty"),
    ({"prompt": "long " * 40, "chosen": "a", "rejected": "b"}, "too long"),
])
def test_bad_pairs_are_rejected_with_file_and_line_or_skipped_and_counted(tmp_path, base_run, bad, reason):
  data = _write(tmp_path / "prefs.jsonl", RECORDS[:5] + [bad] + RECORDS[5:])
  args = DPO_ARGS + [f"--config.init.workdir={base_run}", f"--config.data.train_files={data}"]
  proc = run_cli(*args, f"--config.workdir={tmp_path / 'err'}", check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert f"{data}:6" in proc.stderr and reason in proc.stderr.lower()
  run_cli(*args, "--config.data.bad_records=skip", f"--config.workdir={tmp_path / 'skip'}")
  rows = [r for r in metric_rows(str(tmp_path / "skip")) if any(k.startswith("data/skipped/") for k in r)]
  assert rows and sum(v for k, v in rows[-1].items() if k.startswith("data/skipped/")) >= 1


# ---------------------------------------------------------------------------------------------
# The precomputed-reference cache: reused only for the same reference, model, tokenizer,
# pipeline and data.

COMMON = dict(batch_size=4, seq_len=48, bad_records="error", chat_template="markers")
BATCHING = BatchOptions(batch_size=4, bad_records="error", chat_template="markers")


def _cache_ctx(model, ref_workdir):
  """What `precompute_reference` and `reference_cache_key` read of a StageContext."""
  import types

  from alignax import parallel
  from alignax.config import ConfigDict
  mesh = ConfigDict(dict(members=1, data=1, fsdp=1, tensor=1))
  return types.SimpleNamespace(
      cfg=ConfigDict(dict(init=dict(workdir=ref_workdir), tokenizer="bytes")), model=model,
      placement=parallel.make_placement(ConfigDict(dict(mode="jit", mesh=mesh))),
      tokenizer=ByteTokenizer(), is_main=True)


def test_reference_cache_is_reused_only_for_the_reference_it_was_computed_with(tmp_path, tiny_llama,
                                                                               caplog, monkeypatch, request):
  import logging

  from absl import logging as absl_logging

  from alignax import checkpoint as ckpt_lib
  # Earlier tests may leave absl quieter or unpropagated; the messages checked here are INFO.
  monkeypatch.setattr(logging.getLogger("absl"), "propagate", True)
  monkeypatch.setattr(logging.getLogger("absl"), "disabled", False)
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  request.addfinalizer(lambda: absl_logging.set_verbosity(previous))
  ref_dir, path = str(tmp_path / "sft"), str(tmp_path / "reference_logps.npz")
  lm, params_a = build_lm(tiny_llama, seed=0)
  _, params_b = build_lm(tiny_llama, seed=1)
  ctx = _cache_ctx(tiny_llama, ref_dir)

  def export(params):
    ckpt_lib.save_export(ref_dir, params, model=tiny_llama, stage="sft", tokenizer="bytes")
    return reference_cache.reference_cache_key(ctx, RECORDS, COMMON)

  def precompute(params, key):
    caplog.clear()
    with caplog.at_level(logging.INFO):
      return dpo.precompute_reference(ctx, lm, params, RECORDS, BATCHING, 48, path, key)

  key_a = export(params_a)
  chosen_a, rejected_a = precompute(params_a, key_a)
  assert np.all(np.isfinite(chosen_a)) and np.all(np.isfinite(rejected_a))

  # Nothing changed: the cache is used, not recomputed (params_b would give other values).
  assert reference_cache.reference_cache_key(ctx, RECORDS, COMMON) == key_a
  chosen, rejected = precompute(params_b, key_a)
  np.testing.assert_array_equal(chosen, chosen_a)
  np.testing.assert_array_equal(rejected, rejected_a)
  assert "using cached reference logprobs" in caplog.text

  # Another SFT model exported into the same workdir: recomputed, and the values are its own.
  key_b = export(params_b)
  assert {k for k in key_a if key_a[k] != key_b[k]} == {"reference"}
  chosen_b, _ = precompute(params_b, key_b)
  assert "was computed for a different reference" in caplog.text
  assert not np.allclose(chosen_b, chosen_a)
  everything = next(pipeline.preference_pipeline(RECORDS, ByteTokenizer(), batch_size=12, seq_len=48,
                                                 shuffle=False))
  expected = np.zeros(len(RECORDS), np.float32)
  expected[np.asarray(everything["index"])] = np.asarray(dpo.pair_logps(lm, params_b, everything)[0])
  np.testing.assert_allclose(chosen_b, expected, rtol=1e-5)

  # A cache written before keys existed (keyed on the record count only) is not trusted.
  np.savez(path, chosen=chosen_a, rejected=rejected_a, num_records=len(RECORDS))
  chosen, _ = precompute(params_b, key_b)
  assert "has no cache key" in caplog.text
  np.testing.assert_array_equal(chosen, chosen_b)


def test_reference_cache_key_covers_data_tokenizer_and_pipeline(tmp_path, tiny_llama):
  import dataclasses

  from alignax import checkpoint as ckpt_lib
  ref_dir = str(tmp_path / "sft")
  _, params = build_lm(tiny_llama, seed=0)
  ckpt_lib.save_export(ref_dir, params, model=tiny_llama, stage="sft", tokenizer="bytes")
  ctx = _cache_ctx(tiny_llama, ref_dir)
  key = reference_cache.reference_cache_key(ctx, RECORDS, COMMON)

  def changed(**kw):
    other = reference_cache.reference_cache_key(kw.get("ctx", ctx), kw.get("records", RECORDS), kw.get("common", COMMON))
    return {k for k in key if key[k] != other[k]}

  edited = [dict(r) for r in RECORDS]
  edited[3]["chosen"] = "Another polite answer."
  assert changed(records=edited) == {"data"}
  assert changed(records=RECORDS[:-1]) == {"data", "num_records"}
  assert changed(common=dict(COMMON, seq_len=64)) == {"pipeline"}
  assert changed(common=dict(COMMON, chat_template="plain")) == {"pipeline"}
  assert changed(common=dict(COMMON, batch_size=8)) == set()  # rows are independent
  bf16 = _cache_ctx(dataclasses.replace(tiny_llama, dtype="bfloat16"), ref_dir)
  assert changed(ctx=bf16) == {"model"}
  other_tok = _cache_ctx(tiny_llama, ref_dir)
  other_tok.cfg.tokenizer = "byte"
  assert changed(ctx=other_tok) == {"tokenizer"}
