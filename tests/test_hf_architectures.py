"""The architectures researchers fine-tune now: Llama 3.x RoPE scaling, attention/MLP biases, Qwen3's
q/k norms, real sliding windows (on every layer or some), Gemma 2 and 3. Each against `transformers` on tiny random-init configs: logits
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
       "qwen2_window", "qwen2_partial", "gemma3", "gemma3_scaled", "gemma2")
EXPORTED_AS = {"qwen3": "Qwen3ForCausalLM", "qwen3_bias": "Qwen3ForCausalLM",
               "mistral_window": "MistralForCausalLM", "qwen2_window": "Qwen2ForCausalLM",
               "qwen2_partial": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
               "gemma3_scaled": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}
# Config keys an export must give back as transformers read them from the source (the tokens'
# ids, dtype and training-only keys aside).
ROUND_TRIP_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                   "hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types",
                   "attn_logit_softcapping", "final_logit_softcapping", "attention_bias",
                   "tie_word_embeddings", "rope_parameters", "use_sliding_window",
                   "max_position_embeddings")
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
  if name.startswith(("gemma", "qwen2_partial")):  # and the same HF config, as transformers reads it
    def keys(c):  # head_dim None (Qwen2) means hidden_size / heads
      c = c.to_dict()
      return {**{k: c.get(k) for k in ROUND_TRIP_KEYS},
              "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]}
    assert keys(again.config) == keys(model.config)


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


@pytest.mark.parametrize("name", ("llama3", "qwen3", "mistral_window", "llama_yarn", "qwen2_partial",
                                  "gemma3", "gemma3_scaled", "gemma2"))
def test_greedy_decoding_matches_transformers(transformers, name, tmp_path):
  """The KV-cache sampler's greedy tokens equal `generate(do_sample=False)`, prompts left-padded
  in one batch on alignax's side, each alone on transformers'; 16 new tokens run past the
  sliding window (on the local layers only, for the Gemmas and the partial Qwen2 window)."""
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
                                       ("qwen3-0.6b.json", "Qwen3ForCausalLM"),
                                       ("gemma-3-1b.json", "Gemma3ForCausalLM")])
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
  if arch == "Gemma3ForCausalLM":  # five local layers to one global, each with its RoPE base
    assert cfg.layer_pattern == "".join("L" if t == "sliding_attention" else "G"
                                        for t in config.layer_types) == "LLLLLG" * 4 + "LL"
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar,
            cfg.head_dim, cfg.tie_embeddings) == (512, 1e6, 1e4, 256, 256, True)


def test_gemma_choices_change_the_numbers(transformers, tmp_path):
  """Each Gemma choice moves these logits, so the parity tests above would catch one dropped:
  the soft-caps, the attention scalar, the local RoPE base, the local/global interleave (a window
  shorter than the sequence), the (1 + w) norms, the post-norms and the embedding scale."""
  from alignax.models.hf import import_hf
  for name, changes in (
      ("gemma2", dict(attn_softcap=0.0, final_softcap=0.0, query_pre_attn_scalar=0.0,
                      layer_pattern="GGG", scale_embeddings=False)),
      ("gemma3", dict(rope_local_theta=0.0, layer_pattern="LLLL", norm_plus_one=False)),
      ("gemma3_scaled", dict(rope_scaling="none", final_softcap=0.0))):
    make_hf_model(transformers, name, tmp_path / name)
    cfg, params, _ = import_hf(str(tmp_path / name))
    ref = alignax_logits(cfg, params)
    for field, value in changes.items():
      changed = dataclasses.replace(cfg, **{field: value})
      assert rel_error(alignax_logits(changed, params), ref) > 1e-3, (name, field)
  # post_norms off: the same params less the post-norm scales.
  from flax import nnx
  from alignax.models import abstract_lm
  cfg, params, _ = import_hf(str(tmp_path / "gemma2"))
  plain = dataclasses.replace(cfg, post_norms=False)
  pure = nnx.to_pure_dict(params)
  for norm in ("attn_out_norm", "mlp_out_norm"):
    del pure["blocks"][norm]
  fewer = abstract_lm(plain)[1]
  nnx.replace_by_pure_dict(fewer, pure)
  assert rel_error(alignax_logits(plain, fewer), alignax_logits(cfg, params)) > 1e-3


def test_transformers_4_configs_map_the_same(transformers, tmp_path):
  """Configs written before transformers 5 (Gemma 3's rope_theta / rope_local_base_freq /
  rope_scaling / sliding_window_pattern, Qwen2's max_window_layers without layer_types) give the
  ModelConfigs their transformers-5 forms give."""
  from alignax.models.hf import config_from_hf
  for name in ("gemma3", "gemma3_scaled", "qwen2_partial"):
    make_hf_model(transformers, name, tmp_path / name)
    with open(tmp_path / name / "config.json") as f:
      hf = json.load(f)
    old = {k: v for k, v in hf.items() if k not in ("layer_types", "rope_parameters")}
    if name.startswith("gemma3"):
      rope = hf["rope_parameters"]
      full = {k: v for k, v in rope["full_attention"].items() if k != "rope_theta"}
      pattern = hf.get("sliding_window_pattern")
      if pattern is None:  # gemma3_scaled names its layers: find the period they follow
        pattern = hf["layer_types"].index("full_attention") + 1
      old.update(rope_theta=rope["full_attention"]["rope_theta"], sliding_window_pattern=pattern,
                 rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                 rope_scaling=None if full["rope_type"] == "default" else full)
    assert config_from_hf(old)[0] == config_from_hf(hf)[0], name


def test_layer_kinds_are_scanned_not_unrolled():
  """A local/global interleave is data scanned with the layers: the forward's program has the
  same size at 2 layers as at 12 (compile time flat in depth), with one scan."""
  from alignax.models import abstract_lm, llama_style
  sizes = []
  for n in (2, 12):
    cfg = llama_style(vocab_size=64, d_model=32, n_layers=n, n_heads=2, d_ff=64, max_seq_len=32,
                      sliding_window=4, layer_pattern="LG" * (n // 2), rope_local_theta=100.0)
    lm, params = abstract_lm(cfg)
    tokens = jnp.zeros((1, 16), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: lm.apply(p, tokens, tokens, tokens + 1)[0])(params)
    sizes.append(len(str(jaxpr).splitlines()))
    assert str(jaxpr).count(" scan[") == 1
  assert sizes[0] == sizes[1]


def test_new_model_fields_validate_and_count():
  from alignax.models import ModelConfig, llama_style
  for kwargs, field in ((dict(layer_pattern="LG"), "layer_pattern"),
                        (dict(n_layers=2, layer_pattern="LX", sliding_window=4), "layer_pattern"),
                        (dict(n_layers=2, layer_pattern="LG"), "layer_pattern"),
                        (dict(attn_softcap=-1.0), "attn_softcap"), (dict(mlp="reglu"), "mlp"),
                        (dict(position="learned", rope_local_theta=10.0), "rope_local_theta")):
    with pytest.raises(ValueError, match=f"model.{field}:"):
      llama_style(**kwargs)
  base = llama_style()
  # GeGLU has SwiGLU's three matrices; post-norms add two d-vectors per layer; the rest no params.
  assert dataclasses.replace(base, mlp="geglu").num_params() == base.num_params()
  assert (dataclasses.replace(base, post_norms=True).num_params()
          == base.num_params() + 2 * base.n_layers * base.d_model)
  gemma = dataclasses.replace(base, norm_plus_one=True, scale_embeddings=True, final_softcap=30.0,
                              attn_softcap=50.0, query_pre_attn_scalar=256.0, sliding_window=4,
                              layer_pattern="LLLG", rope_local_theta=1e4)
  assert gemma.num_params() == base.num_params()
  # Defaults build what alignax built before these fields existed.
  assert ModelConfig().local_layers == (False,) * 4 and ModelConfig().attn_scale is None


def test_refusals_that_remain(transformers, tmp_path):
  from alignax.models.hf import HFError, config_from_hf, import_hf
  make_hf_model(transformers, "qwen2", tmp_path, use_sliding_window=True, max_window_layers=1,
                sliding_window=8)
  cfg = import_hf(str(tmp_path))[0]  # a window on some layers: supported now
  assert (cfg.sliding_window, cfg.layer_pattern) == (8, "GL")
  # A window covering every position is full attention: no pattern needed.
  assert import_hf(str(tmp_path), max_seq_len=8)[0].layer_pattern == ""
  with open(tmp_path / "config.json") as f:
    hf = json.load(f)
  hf.update(layer_types=None, use_sliding_window=False, rope_parameters={
      "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]})
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(HFError, match="RoPE scaling 'longrope' is unsupported"):
    import_hf(str(tmp_path))
  for arch in ("Phi3ForCausalLM", "Olmo2ForCausalLM", "Gemma3ForConditionalGeneration",
               "GemmaForCausalLM"):
    with pytest.raises(HFError, match=f"unsupported architecture '{arch}'.*Gemma3ForCausalLM"):
      config_from_hf({"architectures": [arch]})
  with open(os.path.join(CONFIGS, "gemma-3-1b.json")) as f:
    gemma = json.load(f)
  with pytest.raises(HFError, match="use_bidirectional_attention"):
    config_from_hf({**gemma, "use_bidirectional_attention": True})
  with pytest.raises(HFError, match="sliding-window layers"):
    config_from_hf({**gemma, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}})
