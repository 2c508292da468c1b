"""The architectures researchers fine-tune now: Llama 3.x RoPE scaling, attention/MLP biases, Qwen3's
q/k norms, real sliding windows (on every layer or some), Gemma 2 and 3 (and Gemma 3's multimodal
checkpoint's text model), OLMo 2, Phi-3 (partial rotary, LongRoPE). Each against `transformers` on tiny random-init configs: logits
(plain, padded and packed batches), greedy decoding, export round trips, parameter counts of the
real configs (shipped as JSON under tests/data/hf_configs)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_helpers import TOKENS, alignax_logits, greedy_tokens, hf_logits, make_hf_model, rel_error

NEW = ("llama3", "llama_linear", "llama_yarn", "llama_bias", "qwen3", "qwen3_bias", "mistral_window",
       "qwen2_window", "qwen2_partial", "gemma3", "gemma3_scaled", "gemma2", "olmo2", "olmo2_bias",
       "phi3", "phi3_longrope", "phi3_window")
# LongRoPE picks its factors by the call's longest position, so a row of 24 positions is not
# the same computation as its 10-token sequence alone (test_phi3_longrope_... covers it).
PACKED = tuple(n for n in NEW if n != "phi3_longrope") + ("gemma3_vision",)
EXPORTED_AS = {"qwen3": "Qwen3ForCausalLM", "qwen3_bias": "Qwen3ForCausalLM",
               "mistral_window": "MistralForCausalLM", "qwen2_window": "Qwen2ForCausalLM",
               "qwen2_partial": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
               "gemma3_scaled": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
               "olmo2": "Olmo2ForCausalLM", "olmo2_bias": "Olmo2ForCausalLM",
               "phi3": "Phi3ForCausalLM", "phi3_longrope": "Phi3ForCausalLM",
               # a plain Phi-3 is a Mistral to alignax (export-hf keeps the source's architecture)
               "phi3_window": "MistralForCausalLM"}
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
  if name.startswith(("gemma", "qwen2_partial", "olmo2", "phi3_longrope")):  # and the same HF config
    def keys(c):  # head_dim None (Qwen2) means hidden_size / heads
      c = c.to_dict()
      return {**{k: c.get(k) for k in ROUND_TRIP_KEYS},
              "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]}
    assert keys(again.config) == keys(model.config)


@pytest.mark.parametrize("name", PACKED)
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
                                  "gemma3", "gemma3_scaled", "gemma2", "olmo2_bias", "phi3",
                                  "phi3_window", "gemma3_vision"))
def test_greedy_decoding_matches_transformers(transformers, name, tmp_path):
  """The KV-cache sampler's greedy tokens equal `generate(do_sample=False)`, prompts left-padded
  in one batch on alignax's side, each alone on transformers'; 16 new tokens run past the
  sliding window (on the local layers only, for the Gemmas and the partial Qwen2 window)."""
  from alignax.models import abstract_lm
  from alignax.models.hf import import_hf
  model = make_hf_model(transformers, name, tmp_path)
  cfg, params, _ = import_hf(str(tmp_path))
  lm, _ = abstract_lm(cfg)
  got, expected = greedy_tokens(model, lm, params, [TOKENS[0, :9], TOKENS[1, :5]], 16)
  np.testing.assert_array_equal(got, expected)


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
  for arch in ("Phi3SmallForCausalLM", "Olmo3ForCausalLM", "Gemma3nForConditionalGeneration",
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


def test_phi3_longrope_short_and_long_factors_match_transformers(transformers, tmp_path):
  """LongRoPE: the short factors while the call's positions stay within the original 16, the long
  ones past it (one choice for the whole call, as transformers makes it), the attention factor
  sqrt(1 + ln(64 / 16) / ln(16)) on cos/sin, and RoPE on the first 8 of each head's 16 dims;
  right-padded rows give transformers' logits for the same padded batch."""
  import math
  import torch
  from alignax.models.hf import import_hf
  model = make_hf_model(transformers, "phi3_longrope", tmp_path)
  cfg, params, _ = import_hf(str(tmp_path))
  assert (cfg.rope_scaling, cfg.rotary_dim, cfg.rope_original_max_len, cfg.rope_factor) == (
      "longrope", 8, 16, 4.0)
  assert cfg.rope_short_factor == (1.0, 1.5, 2.0, 3.0) and cfg.rope_long_factor[-1] == 16.0
  assert math.isclose(cfg.rope_attention_factor, math.sqrt(1 + math.log(4) / math.log(16)))
  for length in (16, 17, 24):  # the last short, the first long, long
    ref = hf_logits(model, TOKENS[:, :length])
    assert rel_error(alignax_logits(cfg, params, TOKENS[:, :length]), ref) <= 1e-4, length
  # The factors matter on each side: all-short / all-long configs move the logits.
  for length, field in ((16, "rope_short_factor"), (24, "rope_long_factor")):
    plain = dataclasses.replace(cfg, **{field: (1.0,) * 4})
    assert rel_error(alignax_logits(plain, params, TOKENS[:, :length]),
                     alignax_logits(cfg, params, TOKENS[:, :length])) > 1e-3, field
  # Right padding: transformers' positions run 0..23 over the padding too, so the long factors.
  mask = np.ones((2, 24), np.int64)
  mask[1, 10:] = 0
  tokens = np.where(mask == 1, TOKENS, 0)
  with torch.no_grad():
    ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.float().numpy()
  out = _alignax_forward(cfg, params, tokens, np.broadcast_to(np.arange(24), (2, 24)),
                         mask.astype(np.int32))
  assert rel_error(out[0], ref[0]) <= 1e-4 and rel_error(out[1, :10], ref[1, :10]) <= 1e-4


def test_phi3_partial_rotary_and_fused_weights(transformers, tmp_path):
  """partial_rotary_factor 0.5 rotates half of each head (the full rotary moves the logits), and
  the fused qkv_proj / gate_up_proj split into alignax's projections and fuse back exactly; any
  Llama-style model exports as Phi3ForCausalLM."""
  from safetensors.numpy import load_file
  from alignax.models.hf import export_hf, import_hf
  make_hf_model(transformers, "phi3", tmp_path / "hf")
  cfg, params, _ = import_hf(str(tmp_path / "hf"))
  assert cfg.rotary_dim == 8 and cfg.dim_per_head == 16
  full = dataclasses.replace(cfg, rotary_dim=0)
  assert rel_error(alignax_logits(full, params), alignax_logits(cfg, params)) > 1e-3
  export_hf(params, cfg, str(tmp_path / "out"))
  src, out = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
  assert set(src) == set(out)
  for name in src:
    np.testing.assert_array_equal(out[name], src[name], err_msg=name)
  ref = hf_logits(make_hf_model(transformers, "llama", tmp_path / "llama"))
  lcfg, lparams, _ = import_hf(str(tmp_path / "llama"))
  export_hf(lparams, lcfg, str(tmp_path / "as_phi3"), architecture="Phi3ForCausalLM")
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "as_phi3")).eval()
  assert type(again).__name__ == "Phi3ForCausalLM"
  assert rel_error(hf_logits(again), ref) <= 1e-4


def test_olmo2_norms_change_the_numbers(transformers, tmp_path):
  """OLMo 2's q/k norms run over all heads at once (per-head norms with the same scales give
  other logits) and its post-norms are the only ones (adding pre-norms of ones moves them)."""
  from flax import nnx
  from alignax.models import abstract_lm
  from alignax.models.hf import import_hf
  make_hf_model(transformers, "olmo2", tmp_path)
  cfg, params, _ = import_hf(str(tmp_path))
  assert (cfg.pre_norms, cfg.post_norms, cfg.qk_norm, cfg.qk_norm_scope, cfg.norm_eps) == (
      False, True, True, "all", 1e-5)
  ref = alignax_logits(cfg, params)
  pure = nnx.to_pure_dict(params)
  per_head = dataclasses.replace(cfg, qk_norm_scope="head")
  heads = {**pure, "blocks": {**pure["blocks"], "attn": {
      **pure["blocks"]["attn"], "q_norm": pure["blocks"]["attn"]["q_norm"][:, 0],
      "k_norm": pure["blocks"]["attn"]["k_norm"][:, 0]}}}
  state = abstract_lm(per_head)[1]
  nnx.replace_by_pure_dict(state, heads)
  assert rel_error(alignax_logits(per_head, state), ref) > 1e-3
  both = dataclasses.replace(cfg, pre_norms=True)
  ones = lambda: {"scale": np.ones((cfg.n_layers, cfg.d_model), np.float32)}
  state = abstract_lm(both)[1]
  nnx.replace_by_pure_dict(state, {**pure, "blocks": {**pure["blocks"], "attn_norm": ones(),
                                                      "mlp_norm": ones()}})
  assert rel_error(alignax_logits(both, state), ref) > 1e-3


def test_gemma3_conditional_generation_imports_its_text_model(transformers, tmp_path):
  """Gemma3ForConditionalGeneration: the text model (text_config, language_model.model.*) is
  imported with logits equal to transformers' on text, the vision tower and projector skipped and
  counted, in either naming of the text weights; the export is the Gemma3ForCausalLM of it."""
  from safetensors.numpy import load_file, save_file
  from alignax.models.hf import HFError, export_hf, import_hf
  model = make_hf_model(transformers, "gemma3_vision", tmp_path / "hf")
  ref = hf_logits(model)
  cfg, params, info = import_hf(str(tmp_path / "hf"))
  assert info["architecture"] == "Gemma3ForConditionalGeneration"
  vision = [n for n, _ in model.named_parameters() if "language_model" not in n and n != "lm_head.weight"]
  assert len(info["skipped_tensors"]) == len(vision) > 0
  assert all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in info["skipped_tensors"])
  assert info["num_params"] == cfg.num_params() == sum(
      p.numel() for p in model.model.language_model.parameters())
  assert info["skipped_params"] == sum(p.numel() for p in model.parameters()) - info["num_params"]
  assert cfg.layer_pattern == "LLGL" and cfg.qk_norm and cfg.tie_embeddings
  assert rel_error(alignax_logits(cfg, params), ref) <= 1e-4

  export_hf(params, cfg, str(tmp_path / "out"), architecture="Gemma3ForConditionalGeneration")
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert type(again).__name__ == "Gemma3ForCausalLM"
  assert rel_error(hf_logits(again), ref) <= 1e-4

  # The module names (model.language_model.*, lm_head.weight) import the same; both is ambiguous.
  weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
  renamed = {("model." + n if n.startswith(("vision_tower.", "multi_modal_projector.")) else
              "model.language_model." + n[len("language_model.model."):]
              if n.startswith("language_model.model.") else n): w for n, w in weights.items()}
  assert len(renamed) == len(weights)
  save_file(renamed, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
  cfg2, params2, info2 = import_hf(str(tmp_path / "hf"))
  assert cfg2 == cfg and len(info2["skipped_tensors"]) == len(vision)
  assert rel_error(alignax_logits(cfg2, params2), ref) <= 1e-4
  save_file({**renamed, **weights}, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(HFError, match="text weights are ambiguous: both of"):
    import_hf(str(tmp_path / "hf"))
  with open(tmp_path / "hf" / "config.json") as f:
    hf = json.load(f)
  from alignax.models.hf import config_from_hf
  with pytest.raises(HFError, match="needs a text_config"):
    config_from_hf({k: v for k, v in hf.items() if k != "text_config"})
  with pytest.raises(HFError, match="text_config model_type 'siglip_vision_model'"):
    config_from_hf({**hf, "text_config": {**hf["text_config"], "model_type": "siglip_vision_model"}})


def test_olmo2_and_phi3_refusals(transformers, tmp_path):
  """What OLMo 2 and Phi-3 have no place for is refused by name, on import and export."""
  from alignax.models import llama_style
  from alignax.models.hf import HFError, config_from_hf, config_to_hf, import_hf
  make_hf_model(transformers, "phi3_longrope", tmp_path)
  with open(tmp_path / "config.json") as f:
    phi3 = json.load(f)
  rope = phi3["rope_parameters"]
  with pytest.raises(HFError, match="RoPE scaling 'linear' is unsupported here"):
    config_from_hf({**phi3, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
  with pytest.raises(HFError, match="'longrope' needs a list long_factor"):
    config_from_hf({**phi3, "rope_parameters": {k: v for k, v in rope.items() if k != "long_factor"}})
  with pytest.raises(HFError, match="partial_rotary_factor=0.1 gives 1 rotary dimensions"):
    config_from_hf({**phi3, "rope_parameters": {**rope, "partial_rotary_factor": 0.1}})
  # A partial rotary or LongRoPE elsewhere: refused (transformers' Llama ignores the former).
  llama = {**phi3, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
  with pytest.raises(HFError, match="partial_rotary_factor=0.5 is unsupported here"):
    config_from_hf(llama)
  with pytest.raises(HFError, match="RoPE scaling 'longrope' is unsupported here"):
    config_from_hf({**llama, "rope_parameters": {**rope, "partial_rotary_factor": 1.0}})
  cfg = import_hf(str(tmp_path))[0]
  with pytest.raises(HFError, match="LlamaForCausalLM has no rotary_dim.*export as Phi3ForCausalLM"):
    config_to_hf(cfg, "LlamaForCausalLM")
  with pytest.raises(HFError, match="Gemma3ForCausalLM has no rotary_dim"):
    config_to_hf(dataclasses.replace(cfg, mlp="geglu", norm_plus_one=True, post_norms=True,
                                     scale_embeddings=True), "Gemma3ForCausalLM")
  olmo = llama_style(n_layers=2, qk_norm=True, qk_norm_scope="all", pre_norms=False, post_norms=True)
  assert config_to_hf(olmo)["architectures"] == ["Olmo2ForCausalLM"]
  for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"):
    with pytest.raises(HFError, match=f"{arch} has no pre_norms.*export as Olmo2ForCausalLM"):
      config_to_hf(olmo, arch)
  with pytest.raises(HFError, match="Olmo2ForCausalLM always has q/k norms over all heads"):
    config_to_hf(llama_style(n_layers=2), "Olmo2ForCausalLM")
  with pytest.raises(HFError, match="Olmo2ForCausalLM has no sliding_window"):
    config_to_hf(dataclasses.replace(olmo, sliding_window=4), "Olmo2ForCausalLM")
  with pytest.raises(ValueError, match="model.pre_norms:"):
    llama_style(pre_norms=False)
  with pytest.raises(ValueError, match="model.rope_short_factor:"):
    dataclasses.replace(cfg, rope_short_factor=(1.0,))
  with pytest.raises(ValueError, match="model.rotary_dim:"):
    dataclasses.replace(cfg, rotary_dim=3)
