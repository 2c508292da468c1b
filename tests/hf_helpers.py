"""Tiny random Hugging Face models for the import/export tests, and the logits of both sides."""

import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

V, T_LEN = 300, 24
TOKENS = np.random.RandomState(0).randint(0, V, (2, T_LEN))
SMALL = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
GEMMA = dict(SMALL, num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
             initializer_range=0.2)
# name -> (config class name, kwargs)
MODELS = {
    "gpt2": ("GPT2Config", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0)),
    "gpt2_untied": ("GPT2Config", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", dict(SMALL, rope_theta=5000.0, bos_token_id=0, eos_token_id=1)),
    "llama_tied": ("LlamaConfig", dict(SMALL, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)),
    "qwen2": ("Qwen2Config", dict(SMALL, tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2Config", dict(SMALL)),
    "mistral": ("MistralConfig", dict(SMALL, bos_token_id=0, eos_token_id=1)),
    # Llama 3.x: its RoPE scaling (original context 16, so the blend band falls inside head_dim 16).
    "llama3": ("LlamaConfig", dict(SMALL, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_linear": ("LlamaConfig", dict(SMALL, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama_yarn": ("LlamaConfig", dict(SMALL, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "llama_bias": ("LlamaConfig", dict(SMALL, attention_bias=True, mlp_bias=True)),
    "qwen3": ("Qwen3Config", dict(SMALL, head_dim=16, tie_word_embeddings=True)),
    "qwen3_bias": ("Qwen3Config", dict(SMALL, head_dim=32, attention_bias=True)),
    # Real sliding windows, shorter than the test sequences.
    "mistral_window": ("MistralConfig", dict(SMALL, sliding_window=8)),
    "qwen2_window": ("Qwen2Config", dict(SMALL, use_sliding_window=True, max_window_layers=0,
                                         sliding_window=8)),
    # A window on the top layer only (layers >= max_window_layers slide).
    "qwen2_partial": ("Qwen2Config", dict(SMALL, num_hidden_layers=3, use_sliding_window=True,
                                          max_window_layers=1, sliding_window=8)),
    # Gemma: head_dim independent of d_model / n_heads, query_pre_attn_scalar != head_dim, local
    # layers (window 8) interleaved with global ones, weights large enough (initializer_range)
    # that the soft-caps and the embedding scale move the logits.
    "gemma3": ("Gemma3TextConfig", dict(GEMMA, sliding_window_pattern=3, rope_parameters=dict(
        full_attention=dict(rope_type="default", rope_theta=5000.0),
        sliding_attention=dict(rope_type="default", rope_theta=100.0)))),
    # The 4B+ recipe: linear RoPE scaling (factor 8) on the global layers only; untied, biased.
    "gemma3_scaled": ("Gemma3TextConfig", dict(
        GEMMA, layer_types=["sliding_attention", "full_attention"] * 2, tie_word_embeddings=False,
        attention_bias=True, final_logit_softcapping=3.0, rope_parameters=dict(
            full_attention=dict(rope_type="linear", rope_theta=10000.0, factor=8.0),
            sliding_attention=dict(rope_type="default", rope_theta=10.0)))),
    "gemma2": ("Gemma2Config", dict(GEMMA, num_hidden_layers=3, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0)),
    # OLMo 2: norms after each sublayer only, q/k norms over all heads; with q/k/v/o biases too.
    "olmo2": ("Olmo2Config", dict(SMALL, pad_token_id=0, bos_token_id=0, eos_token_id=1)),
    "olmo2_bias": ("Olmo2Config", dict(SMALL, attention_bias=True, tie_word_embeddings=True,
                                       rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1)),
    # Phi-3: fused projections; RoPE on half of each head (16 -> 8 dims); LongRoPE with the short
    # factors up to position 16 and the long ones past it; and a real sliding window.
    "phi3": ("Phi3Config", dict(SMALL, pad_token_id=0, bos_token_id=0, eos_token_id=1,
                                rope_parameters=dict(rope_type="default", rope_theta=5000.0,
                                                     partial_rotary_factor=0.5))),
    "phi3_longrope": ("Phi3Config", dict(
        SMALL, pad_token_id=0, bos_token_id=0, eos_token_id=1, original_max_position_embeddings=16,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                             short_factor=[1.0, 1.5, 2.0, 3.0], long_factor=[1.0, 4.0, 8.0, 16.0]))),
    "phi3_window": ("Phi3Config", dict(SMALL, sliding_window=8, pad_token_id=0, bos_token_id=0,
                                       eos_token_id=1)),
    # Gemma 3's multimodal checkpoint: a tiny vision tower and projector beside its text model.
    "gemma3_vision": ("Gemma3Config", dict(
        text_config=dict(GEMMA, sliding_window_pattern=3, rope_parameters=dict(
            full_attention=dict(rope_type="default", rope_theta=5000.0),
            sliding_attention=dict(rope_type="default", rope_theta=100.0))),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2)),
}


def require_module(name: str):
  """The module, or a skip naming it (missing or broken: any ImportError, on any pytest)."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    pytest.skip(f"needs {name} (pip install torch==2.13.0 transformers tokenizers safetensors): {e}")


def rel_error(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


def make_hf_model(transformers, name: str, out_dir, seed: int = 0, **overrides):
  """A random HF model saved to `out_dir` with safetensors; returns the torch model.

  Norm scales and biases are perturbed too (they start at 1 and 0), so a swapped or dropped
  vector in the mapping changes the logits.
  """
  import torch
  cls_name, kwargs = MODELS[name]
  config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() == 1:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(out_dir), safe_serialization=True)
  return model


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def alignax_logits(cfg, params, tokens=TOKENS) -> np.ndarray:
  from alignax.models import abstract_lm
  lm, _ = abstract_lm(cfg)
  t = jnp.asarray(tokens)
  positions = jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
  return np.asarray(lm.apply(params, t, positions, jnp.ones_like(t))[0])




def greedy_tokens(model, lm, params, prompts, n: int):
  """(alignax [P, n], transformers [P, n]) greedy tokens: alignax's KV-cache sampler on the
  prompts left-padded in one batch, transformers' `generate(do_sample=False)` on each alone."""
  import jax
  import torch

  from alignax.generation.sampler import SamplingConfig, generate
  expected = []
  for p in prompts:
    with torch.no_grad():
      out = model.generate(torch.tensor(p[None]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                           pad_token_id=0)
    expected.append(out[0, len(p):].numpy())
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for row, p in enumerate(prompts):
    tokens[row, width - len(p):], mask[row, width - len(p):] = p, True
  rollout = jax.jit(lambda prm, t, m: generate(lm, SamplingConfig(temperature=0.0, max_new_tokens=n),
                                               -1, 0, prm, t, m, jax.random.key(0)))(params, tokens, mask)
  return np.asarray(rollout.tokens), np.stack(expected)
