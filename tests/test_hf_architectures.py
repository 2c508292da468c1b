"""The architectures researchers fine-tune now: Llama 3.x RoPE scaling, attention/MLP biases, Qwen3's
q/k norms, real sliding windows. Each against `transformers` on tiny random-init configs: logits
(plain, padded and packed batches), greedy decoding, export round trips, parameter counts of the
real configs (shipped as JSON under tests/data/hf_configs)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_helpers import TOKENS, alignax_logits, hf_logits, make_hf_model, rel_error

NEW = ("llama3", "llama_linear", "llama_yarn", "llama_bias", "qwen3", "qwen3_bias", "mistral_window",
       "qwen2_window")
EXPORTED_AS = {"qwen3": "Qwen3ForCausalLM", "qwen3_bias": "Qwen3ForCausalLM",
               "mistral_window": "MistralForCausalLM", "qwen2_window": "Qwen2ForCausalLM"}
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf_configs")


def _alignax_forward(cfg, params, tokens, positions, segments):
  from alignax.models import abstract_lm
  lm, _ = abstract_lm(cfg)
  return np.asarray(lm.apply(params, jnp.asarray(tokens), jnp.asarray(positions),
                             jnp.asarray(segments))[0])


@pytest.mark.parametrize("name", NEW)
def test_logits_and_export_match_transformers(transformers, name, tmp_path):
  from alignax.models.hf import export_hf, import_hf
  model = make_hf_model(transformers, name, tmp_path / "hf")
  ref = hf_logits(model)
  cfg, params, info = import_hf(str(tmp_path / "hf"))
  assert info["num_params"] == sum(p.numel() for p in model.parameters()) == cfg.num_params()
  assert rel_error(alignax_logits(cfg, params), ref) <= 1e-4

  export_hf(params, cfg, str(tmp_path / "out"))
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert type(again).__name__ == EXPORTED_AS.get(name, "LlamaForCausalLM")
  assert rel_error(hf_logits(again), ref) <= 1e-4
  # The exported config imports to the same alignax config (RoPE scaling, biases, window).
  explicit = lambda c: dataclasses.replace(c, head_dim=c.dim_per_head)  # 0 means d_model / n_heads
  assert explicit(import_hf(str(tmp_path / "out"))[0]) == explicit(cfg)


@pytest.mark.parametrize("name", NEW)
def test_packed_and_padded_rows_match_each_sequence_alone(transformers, name, tmp_path):
  """A row holding two sequences (positions restarting, segments apart) and a right-padded row
  give each sequence's logits as transformers computes them for it alone."""
  from alignax.models.hf import import_hf
  model = make_hf_model(transformers, name, tmp_path)
  cfg, params, _ = import_hf(str(tmp_path))
  a, b = TOKENS[0, :10], TOKENS[1, :14]
  packed = np.concatenate([a, b])[None]
  positions = np.concatenate([np.arange(10), np.arange(14)])[None]
  segments = np.concatenate([np.ones(10), 2 * np.ones(14)])[None].astype(np.int32)
  padded = np.concatenate([a, np.zeros(14, np.int64)])[None]
  pad_positions = np.arange(24)[None]
  pad_segments = np.concatenate([np.ones(10), np.zeros(14)])[None].astype(np.int32)
  out = _alignax_forward(cfg, params, np.concatenate([packed, padded]),
                         np.concatenate([positions, pad_positions]), np.concatenate([segments, pad_segments]))
  ref_a, ref_b = hf_logits(model, a[None])[0], hf_logits(model, b[None])[0]
  assert rel_error(out[0, :10], ref_a) <= 1e-4
  assert rel_error(out[0, 10:], ref_b) <= 1e-4
  assert rel_error(out[1, :10], ref_a) <= 1e-4


@pytest.mark.parametrize("name", ("llama3", "qwen3", "mistral_window", "llama_yarn"))
def test_greedy_decoding_matches_transformers(transformers, name, tmp_path):
  """The KV-cache sampler's greedy tokens equal `generate(do_sample=False)`, prompts left-padded
  in one batch on alignax's side, each alone on transformers'; 16 new tokens run past the
  sliding window."""
  import torch
  from alignax.generation.sampler import SamplingConfig, generate
  from alignax.models import abstract_lm
  from alignax.models.hf import import_hf
  model = make_hf_model(transformers, name, tmp_path)
  cfg, params, _ = import_hf(str(tmp_path))
  prompts = [TOKENS[0, :9], TOKENS[1, :5]]
  n = 16
  expected = []
  for p in prompts:
    with torch.no_grad():
      out = model.generate(torch.tensor(p[None]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                           pad_token_id=0)
    expected.append(out[0, len(p):].numpy())
  tokens = np.zeros((2, 9), np.int32)
  mask = np.zeros((2, 9), bool)
  for row, p in enumerate(prompts):
    tokens[row, 9 - len(p):], mask[row, 9 - len(p):] = p, True
  lm, _ = abstract_lm(cfg)
  rollout = jax.jit(lambda prm, t, m: generate(lm, SamplingConfig(temperature=0.0, max_new_tokens=n),
                                               -1, 0, prm, t, m, jax.random.key(0)))(params, tokens, mask)
  np.testing.assert_array_equal(np.asarray(rollout.tokens), np.stack(expected))


def test_dynamic_rope_matches_transformers_past_the_original_length(transformers, tmp_path):
  """NTK-aware dynamic RoPE: within the original 16 positions plain RoPE, beyond it a base grown
  with the call's longest position; both as transformers computes them on a fresh model."""
  from alignax.models.hf import export_hf, import_hf
  model = make_hf_model(transformers, "llama", tmp_path / "hf", max_position_embeddings=16,
                        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
  cfg, params, _ = import_hf(str(tmp_path / "hf"), max_seq_len=64)
  assert (cfg.rope_scaling, cfg.rope_original_max_len, cfg.max_seq_len) == ("dynamic", 16, 64)
  for length in (12, 24):  # inside, then past the original context
    fresh = make_hf_model(transformers, "llama", tmp_path / f"ref{length}", max_position_embeddings=16,
                          rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    ref = hf_logits(fresh, TOKENS[:, :length])
    assert rel_error(alignax_logits(cfg, params, TOKENS[:, :length]), ref) <= 1e-4
  plain_cfg = dataclasses.replace(cfg, rope_scaling="none")
  assert rel_error(alignax_logits(plain_cfg, params), hf_logits(model)) > 1e-3  # the scaling matters
  export_hf(params, cfg, str(tmp_path / "out"))
  again = import_hf(str(tmp_path / "out"), max_seq_len=64)[0]
  assert (again.rope_scaling, again.rope_factor) == ("dynamic", 2.0)


def test_scaled_rope_changes_the_numbers(transformers, tmp_path):
  """Each scaled variant differs from plain RoPE on these positions, so the parity tests above
  would catch a variant silently read as plain."""
  from alignax.models.hf import import_hf
  for name in ("llama3", "llama_linear", "llama_yarn"):
    make_hf_model(transformers, name, tmp_path / name)
    cfg, params, _ = import_hf(str(tmp_path / name))
    plain = dataclasses.replace(cfg, rope_scaling="none")
    assert rel_error(alignax_logits(plain, params), alignax_logits(cfg, params)) > 1e-3, name


@pytest.mark.parametrize("file,arch", [("llama-3.2-1b.json", "LlamaForCausalLM"),
                                       ("qwen3-0.6b.json", "Qwen3ForCausalLM")])
def test_parameter_counts_of_the_real_configs(transformers, file, arch):
  """The published configs map to ModelConfigs whose parameter count is transformers' own
  (counted on the meta device: nothing is allocated)."""
  import torch
  from alignax.models.hf import config_from_hf
  with open(os.path.join(CONFIGS, file)) as f:
    hf = json.load(f)
  cfg, found = config_from_hf(hf)
  assert found == arch
  config = transformers.AutoConfig.for_model(**hf)
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
  assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_refusals_that_remain(transformers, tmp_path):
  from alignax.models.hf import HFError, import_hf
  make_hf_model(transformers, "qwen2", tmp_path, use_sliding_window=True, max_window_layers=1,
                sliding_window=8)
  with pytest.raises(HFError, match=r"sliding-window attention on 1 of 2 layers is unsupported"):
    import_hf(str(tmp_path))
  assert import_hf(str(tmp_path), max_seq_len=8)[0].sliding_window == 0  # one window covers all
  with open(tmp_path / "config.json") as f:
    hf = json.load(f)
  hf.update(layer_types=None, use_sliding_window=False, rope_parameters={
      "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]})
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(HFError, match="RoPE scaling 'longrope' is unsupported"):
    import_hf(str(tmp_path))
