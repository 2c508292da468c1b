"""The jit sampler: logprobs equal the training forward's, EOS stopping, filters, bucketing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.data.tokenizer import ByteTokenizer
from alignax.generation import Sampler, SamplingConfig, bucket_length
from alignax.generation.sampler import filter_logits
from alignax.generation.scoring import response_logprobs
from alignax.models import build_lm


@pytest.fixture
def model(tiny_llama):
  return build_lm(dataclasses.replace(tiny_llama, max_seq_len=128), seed=0)


def _prompts(n=5, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(0, 256, rng.integers(3, 14))) for _ in range(n)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_training_forward(model, temperature):
  lm, params = model
  tok = ByteTokenizer()
  sampler = Sampler(lm, tok, SamplingConfig(temperature=temperature, max_new_tokens=12))
  tokens, mask = sampler.pad_prompts(_prompts())
  out = jax.device_get(sampler.generate_padded(params, tokens, mask, jax.random.key(1)))
  lp = response_logprobs(lm, params, tokens, mask, out["tokens"], out["mask"], temperature)
  m = out["mask"] > 0
  assert m.sum() > 20
  np.testing.assert_allclose(np.asarray(lp)[m], out["logprobs"][m], rtol=1e-5, atol=1e-5)


def test_bf16_logprob_gap_is_small(model, tiny_llama):
  lm, params = model
  lm16, _ = build_lm(dataclasses.replace(tiny_llama, max_seq_len=128, dtype="bfloat16"), seed=0)
  tok = ByteTokenizer()
  sampler = Sampler(lm16, tok, SamplingConfig(temperature=1.0, max_new_tokens=12))
  tokens, mask = sampler.pad_prompts(_prompts())
  out = jax.device_get(sampler.generate_padded(params, tokens, mask, jax.random.key(2)))
  lp16 = response_logprobs(lm16, params, tokens, mask, out["tokens"], out["mask"])
  lp32 = response_logprobs(lm, params, tokens, mask, out["tokens"], out["mask"])
  m = out["mask"] > 0
  gap16 = np.abs(np.asarray(lp16)[m] - out["logprobs"][m]).max()
  gap32 = np.abs(np.asarray(lp32)[m] - out["logprobs"][m]).max()
  assert gap16 < 0.1 and gap32 < 0.5  # bf16 sampler vs bf16 / fp32 training forwards


def test_rows_stop_at_eos_and_are_masked_after(model):
  lm, params = model
  tok = ByteTokenizer()
  # Make <eos> overwhelmingly likely after a few tokens by biasing the output projection.
  params = jax.tree.map(lambda x: x, params)
  head = params["lm_head"][...]
  params["lm_head"] = params["lm_head"].replace(head.at[:, tok.eos_id].add(0.3))
  sampler = Sampler(lm, tok, SamplingConfig(temperature=1.0, max_new_tokens=40))
  out = sampler.generate(params, _prompts(8), jax.random.key(3))
  for row, n, ended in zip(out["tokens"], out["lengths"], out["ended"]):
    n = int(n)
    if ended:
      assert row[n - 1] == tok.eos_id and tok.eos_id not in row[: n - 1]
      assert np.all(row[n:] == tok.pad_id)
  assert out["ended"].any()
  assert np.all(out["mask"].sum(1) == out["lengths"])


def test_greedy_is_argmax_of_the_training_forward(model):
  lm, params = model
  tok = ByteTokenizer()
  sampler = Sampler(lm, tok, SamplingConfig(temperature=0.0, max_new_tokens=6))
  tokens, mask = sampler.pad_prompts(_prompts(3))
  out = jax.device_get(sampler.generate_padded(params, tokens, mask, jax.random.key(0)))
  from alignax.generation.scoring import join_prompt_response
  t, p, s = join_prompt_response(tokens, mask, out["tokens"], out["mask"])
  logits, _ = lm.apply(params, t, p, s)
  pred = np.asarray(jnp.argmax(logits, -1))[:, tokens.shape[1] - 1:-1]
  m = out["mask"] > 0
  np.testing.assert_array_equal(pred[m], out["tokens"][m])


def test_top_k_and_top_p_filters_closed_form():
  logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
  k2 = np.asarray(filter_logits(logits, SamplingConfig(top_k=2)))
  assert np.isfinite(k2[0, :2]).all() and (k2[0, 2:] < -1e29).all()
  p = np.asarray(filter_logits(logits, SamplingConfig(top_p=0.7)))
  assert (p[0, :2] > -1e29).all() and (p[0, 2:] < -1e29).all()  # 0.5 + 0.25 reaches 0.7
  p = np.asarray(filter_logits(logits, SamplingConfig(top_p=0.5)))
  assert (p[0, :1] > -1e29).all() and (p[0, 1:] < -1e29).all()
  t = np.asarray(filter_logits(logits, SamplingConfig(temperature=0.5)))
  np.testing.assert_allclose(t, np.asarray(logits) / 0.5, rtol=1e-6)


def test_top_k_samples_stay_in_the_top_k(model):
  lm, params = model
  tok = ByteTokenizer()
  sampler = Sampler(lm, tok, SamplingConfig(temperature=1.0, top_k=3, max_new_tokens=1))
  tokens, mask = sampler.pad_prompts(_prompts(4) * 8)
  out = jax.device_get(sampler.generate_padded(params, tokens, mask, jax.random.key(5)))
  from alignax.generation.sampler import prompt_layout
  pos, seg = prompt_layout(jnp.asarray(mask))
  logits, _ = lm.apply(params, tokens, pos, seg)
  top3 = np.argsort(-np.asarray(logits[:, -1]), axis=-1)[:, :3]
  assert all(out["tokens"][i, 0] in top3[i] for i in range(len(top3)))


def test_prompt_lengths_are_bucketed(model):
  lm, params = model
  sampler = Sampler(lm, ByteTokenizer(), SamplingConfig(max_new_tokens=4))
  for n in (3, 9, 15, 16):
    sampler.generate(params, [[1] * n, [2] * 2], jax.random.key(0))
  assert sampler.num_compiles == 1  # every length <= 16 shares the 16 bucket
  sampler.generate(params, [[1] * 17], jax.random.key(0))
  assert sampler.num_compiles == 2  # batch 1 x bucket 32 is the one new shape
  assert [bucket_length(n) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]


def test_rows_stop_at_any_of_the_tokenizers_stop_ids(model):
  """An instruct model's end-of-turn token (generation_config.json's extra eos ids) ends a row
  as its eos does, and the decoded text leaves both out."""
  lm, params = model
  byte = ByteTokenizer()
  end_of_turn = ord("}")

  class TwoStops:
    vocab_size, pad_id, bos_id, eos_id = byte.vocab_size, byte.pad_id, byte.bos_id, byte.eos_id
    stop_ids = (byte.eos_id, end_of_turn)

    def decode(self, ids):
      return byte.decode(ids)

  tok = TwoStops()
  params = jax.tree.map(lambda x: x, params)
  head = params["lm_head"][...]
  params["lm_head"] = params["lm_head"].replace(head.at[:, end_of_turn].add(0.3))
  sampler = Sampler(lm, tok, SamplingConfig(temperature=1.0, max_new_tokens=40))
  out = sampler.generate(params, _prompts(8), jax.random.key(3))
  ends = [int(row[int(n) - 1]) for row, n, e in zip(out["tokens"], out["lengths"], out["ended"]) if e]
  assert end_of_turn in ends  # rows ended at the extra stop id
  for row, n, ended in zip(out["tokens"], out["lengths"], out["ended"]):
    body = [int(t) for t in row[: int(n) - 1]]
    assert end_of_turn not in body and tok.eos_id not in body  # nothing runs past a stop
    assert (int(row[int(n) - 1]) in tok.stop_ids) == bool(ended)
  assert all("}" not in text for text in sampler.decode(out))


def test_decoding_with_presliced_layers_equals_slicing_in_the_loop(tiny_llama):
  """`LanguageModel.with_layers` (each layer's params sliced once, as the sampler does) changes
  no logit and no cache entry of prefill and decode steps."""
  lm, params = build_lm(tiny_llama, seed=0)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 3, 200)
  pos = jnp.tile(jnp.arange(6), (2, 1))
  seg = jnp.ones((2, 6), jnp.int32)
  plain = lm.init_cache(2, 10)
  sliced = lm.with_layers(params, plain)
  assert len(sliced["layers"]) == tiny_llama.n_layers
  out_a, cache_a = lm.apply(params, tokens, pos, seg, plain)
  out_b, cache_b = lm.apply(params, tokens, pos, seg, sliced)
  step = lambda c: lm.apply(params, tokens[:, :1], pos[:, :1] + 6, seg[:, :1], c)
  (a2, cache_a), (b2, cache_b) = step(cache_a), step(cache_b)
  assert "layers" in cache_b  # carried through the step
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))
  np.testing.assert_array_equal(np.asarray(a2), np.asarray(b2))
  for x, y in zip(cache_a["k"] + cache_a["v"], cache_b["k"] + cache_b["v"]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
