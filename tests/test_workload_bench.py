"""benchmarks/workload.py: the real-loop workload gets peerbench's exact sequences, fresh every step,
and bench_task times exactly the steps it was asked for."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from cli_helpers import REPO


@pytest.fixture(scope="module")
def W():
  spec = importlib.util.spec_from_file_location("workload_under_test",
                                                os.path.join(REPO, "benchmarks", "workload.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _expected_rows(W, n):
  """Every SFT sequence the workload defines: 64 prompt ids, 63 completion ids, EOS."""
  rows = W.workload_rows("sft", n)
  eos = np.full((n, 1), W.EOS_ID)
  return np.concatenate([rows["prompt"], rows["completion"][:, :63], eos], axis=1)


def test_sft_loop_batches_are_fresh_workload_sequences(W, tmp_path):
  steps = 3
  cfg = W.prepare_task("sft", str(tmp_path), steps)
  ctx, run = W.build_stage(cfg)
  assert ctx.model.vocab_size == 512 and ctx.model.num_params() == 4_458_752
  assert ctx.config.optimizer.b2 == 0.999 and ctx.config.optimizer.weight_decay == 0.0
  expected = {tuple(r) for r in _expected_rows(W, W.BATCH * steps)}
  seen = []
  for _ in range(steps):
    b = next(run.batches)
    tokens = np.asarray(b["tokens"])
    assert tokens.shape == (8, 128)
    np.testing.assert_array_equal(b["segment_ids"], 1)  # no padding anywhere
    np.testing.assert_array_equal(b["positions"], np.tile(np.arange(128), (8, 1)))
    mask = np.asarray(b["loss_mask"])
    np.testing.assert_array_equal(mask[:, :64], 0)  # the prompt is context
    np.testing.assert_array_equal(mask[:, 64:], 1)  # 63 completion tokens + EOS are targets
    assert (tokens[:, :127] >= 4).all() and (tokens[:, :127] < 512).all()
    np.testing.assert_array_equal(tokens[:, 127], W.EOS_ID)
    for row in tokens:
      assert tuple(row) in expected  # exactly peerbench's ids: no BOS, role markers or shift
    seen.extend(tuple(row) for row in tokens)
  assert len(set(seen)) == W.BATCH * steps  # every step a fresh batch, no record twice


def test_preference_and_prompt_records_encode_to_the_workload_lengths(W, tmp_path):
  from alignax.data import encoders, readers
  from alignax.data.tokenizers import make_tokenizer
  tok = make_tokenizer(W.write_tokenizer(str(tmp_path / "tok")))
  W.write_records("dpo", str(tmp_path / "pairs.jsonl"), 4)
  pairs = readers.read_records(str(tmp_path / "pairs.jsonl"), "preference")
  ex = encoders.preference_encoder(tok, 128, None, "model")(pairs[0])
  for side in ("chosen", "rejected"):
    assert int(ex[side]["response_len"]) == 64 and int(ex[side]["segment_ids"].sum()) == 128
  assert not (ex["chosen"]["tokens"] == ex["rejected"]["tokens"]).all()
  assert int(ex["prompt_len"]) == 64  # packed: 64 + 64 + 64 = W.PAIR_LEN, nothing skipped
  assert "_skip" not in encoders.preference_encoder(tok, 128, None, "model", W.PAIR_LEN)(pairs[0])
  rl_tok = make_tokenizer(W.write_tokenizer(str(tmp_path / "rl_tok"), rl=True))
  assert rl_tok.eos_id >= 512  # outside the model's outputs: every response runs 64 tokens
  W.write_records("grpo", str(tmp_path / "prompts.jsonl"), 2)
  prompts = readers.read_records(str(tmp_path / "prompts.jsonl"), "prompts")
  row = encoders.prompt_encoder(rl_tok, 64, "model")(prompts[0])
  assert int(row["prompt_len"]) == 64 and row["mask"].all()
  np.testing.assert_array_equal(row["tokens"], W.workload_rows("prompts", 2)["prompt"][0])


def test_bench_task_times_exactly_the_measured_steps(W):
  r = W.bench_task("sft", steps=2, warmup=1, peak_flops=1e11)
  for key in ("seconds", "bare_seconds"):
    assert len(r[key]) == 2 and all(math.isfinite(s) and s > 0 for s in r[key]), r[key]
  assert r["median_seconds"] == pytest.approx(float(np.median(r["seconds"])))
  assert r["distinct_batches"] == 3 and r["steps_run"] == 3
  assert r["tokens_per_step"] == 1024 and r["tokens_per_s"] == pytest.approx(1024 / r["median_seconds"])
  assert 0 < r["mfu"] and r["peak_rss_mb"] > 0
  json.dumps(r)  # what main writes


@pytest.mark.slow
def test_grpo_real_loop_generates_64_tokens_scored_by_the_function(W, tmp_path):
  r = W.bench_task("grpo", steps=1, warmup=1, peak_flops=1e11, bare=False, workdir=str(tmp_path))
  assert len(r["seconds"]) == 1 and r["bare_seconds"] == []
  with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
    row = [json.loads(line) for line in f][-1]
  assert row["train/response_length"] == 64 and row["train/eos_rate"] == 0
  assert row["train/reward_ok"] == 1 and 0 < row["train/score_functions"] < 1


def test_dpo_runs_its_pairs_packed_through_the_real_loop(W):
  r = W.bench_task("dpo", steps=1, warmup=1, peak_flops=1e11, bare=False)
  assert r["settings"]["pair_len"] == W.PAIR_LEN == 192
  assert len(r["seconds"]) == 1 and r["seconds"][0] > 0
  # FLOPs of 8 rows of 192 slots (policy train + reference forward), less than 16 rows of 128.
  assert r["flops_per_step"] < W.step_flops("dpo", pair_layout="two_rows")
