"""Parity with `transformers`, in float32, for every tiny random-init config the HF tests build.

  python benchmarks/hf_parity.py [--names=llama3,gemma3] [--new_tokens=16] [--out=PATH]

Each config of tests/hf_helpers.py (plus the NTK-dynamic Llama of tests/test_hf_architectures.py)
is built with `transformers` (random weights, norm scales and biases perturbed), saved with
`save_pretrained` (safetensors) and imported with `alignax.models.hf.import_hf`. Per config:
- plain: max relative logits error (max |alignax - hf| / max |hf|) on 2 rows of 24 tokens;
- packed: one row holding a 10- and a 14-token sequence (positions restarting, segment ids 1, 2),
  against transformers' logits for each sequence alone;
- padded: the 10-token sequence right-padded to 24 (segment id 0 on the padding), against it alone;
- greedy: tokens identical to `generate(do_sample=False)` out of --new_tokens, per prompt: prompts
  of 9 and 5 tokens left-padded in one batch through alignax's KV-cache sampler, each alone on
  transformers' side;
- export: `alignax import-hf` then `alignax export-hf` (the commands' own code), the output loaded
  with `AutoModelForCausalLM.from_pretrained`: its max relative logits error vs the alignax model;
- params: transformers' parameter count == ModelConfig.num_params().
RoPE variants whose numbers depend on the call's longest position (LongRoPE, dynamic) get the packed
row in a call of its own and the padded row against transformers' padded batch (see notes).
Then the published Llama-3.2-1B, Qwen3-0.6B and Gemma-3-1B configs (tests/data/hf_configs):
transformers' parameter count on the meta device vs alignax's ModelConfig.num_params().
Prints a table and writes JSON (benchmarks/results/hf_parity_<platform>.json).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub

from absl import app, flags  # noqa: E402

_NAMES = flags.DEFINE_string("names", "", "Comma-separated config names (default: all).")
_NEW = flags.DEFINE_integer("new_tokens", 16, "Greedy tokens per prompt.")
_OUT = flags.DEFINE_string("out", "", "JSON path (default benchmarks/results/hf_parity_<platform>.json).")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CONFIGS = os.path.join(_ROOT, "tests", "data", "hf_configs")
# Configs the tests build from a hf_helpers.MODELS entry with overrides: name -> (base,
# make_hf_model overrides, import max_seq_len).
DERIVED = {"llama_dynamic": ("llama", dict(max_position_embeddings=16, rope_parameters=dict(
    rope_type="dynamic", rope_theta=10000.0, factor=2.0)), 64)}
CALL_DEPENDENT = ("longrope", "dynamic")  # RoPE chosen by the call's longest position
TOL = 1e-4  # the tests' bound


def _helpers():
  """tests/hf_helpers.py: the tiny configs (MODELS, TOKENS) and how the tests build them."""
  sys.path.insert(0, os.path.join(_ROOT, "tests"))
  import hf_helpers
  return hf_helpers


def _forward(lm):
  import jax
  return jax.jit(lambda p, t, pos, seg: lm.apply(p, t, pos, seg)[0])


def _greedy(h, model, lm, params, prompts, n: int):
  """Per prompt: (tokens identical, length of the identical prefix) of alignax's batched greedy
  decode vs transformers' `generate` on the prompt alone (`hf_helpers.greedy_tokens`)."""
  import numpy as np
  got, expected = h.greedy_tokens(model, lm, params, prompts, n)
  same = [int(np.sum(g == e)) for g, e in zip(got, expected)]
  prefix = [int(np.argmin(g == e)) if not np.all(g == e) else n for g, e in zip(got, expected)]
  return same, prefix


def measure(transformers, h, name: str, n: int, work: str) -> dict:
  import numpy as np
  import torch

  from alignax.commands.export_hf import main as export_hf_main
  from alignax.commands.import_hf import main as import_hf_main
  from alignax.models import abstract_lm
  from alignax.models.hf import import_hf
  base, overrides, max_seq_len = DERIVED.get(name, (name, {}, None))
  t0 = time.perf_counter()
  src = os.path.join(work, name, "hf")
  model = h.make_hf_model(transformers, base, src, **overrides)
  cfg, params, info = import_hf(src, max_seq_len=max_seq_len)
  lm, _ = abstract_lm(cfg)
  fwd = _forward(lm)
  notes = []
  dependent = cfg.rope_scaling in CALL_DEPENDENT

  def ref(tokens, mask=None):
    # A model fresh from disk for the call-dependent RoPE (transformers keeps dynamic RoPE's
    # frequencies between calls); the built one otherwise.
    m = transformers.AutoModelForCausalLM.from_pretrained(src).eval() if dependent else model
    with torch.no_grad():
      kw = {} if mask is None else dict(attention_mask=torch.tensor(mask))
      return m(torch.tensor(tokens), **kw).logits.float().numpy()

  def ours(tokens, positions, segments):
    return np.asarray(fwd(params, np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
                          np.asarray(segments, np.int32)))

  tokens = h.TOKENS
  t = tokens.shape[1]
  row_pos = np.broadcast_to(np.arange(t), tokens.shape)
  plain_alignax = ours(tokens, row_pos, np.ones_like(tokens))
  plain = h.rel_error(plain_alignax, ref(tokens))

  # Packed and right-padded rows, as tests/test_hf_architectures.py builds them.
  a, b = tokens[0, :10], tokens[1, :14]
  packed = np.concatenate([a, b])[None]
  positions = np.concatenate([np.arange(10), np.arange(14)])[None]
  segments = np.concatenate([np.ones(10), 2 * np.ones(14)])[None]
  padded = np.concatenate([a, np.zeros(14, a.dtype)])[None]
  pad_segments = np.concatenate([np.ones(10), np.zeros(14)])[None]
  ref_a, ref_b = ref(a[None])[0], ref(b[None])[0]
  if dependent:
    out_packed = ours(np.repeat(packed, 2, 0), np.repeat(positions, 2, 0), np.repeat(segments, 2, 0))[0]
    mask = pad_segments.astype(np.int64)
    out_pad = ours(np.repeat(padded, 2, 0), np.repeat(row_pos[:1], 2, 0), np.repeat(pad_segments, 2, 0))[0]
    ref_pad = ref(padded, mask)[0, :10]
    notes.append(f"{cfg.rope_scaling} RoPE follows the call's longest position: packed row in a call "
                 f"of its own (positions < {cfg.rope_original_max_len}), padded row vs transformers' "
                 "padded batch (attention_mask)")
  else:
    out = ours(np.concatenate([packed, padded]), np.concatenate([positions, row_pos[:1]]),
               np.concatenate([segments, pad_segments]))
    out_packed, out_pad, ref_pad = out[0], out[1], ref_a
  packed_err = max(h.rel_error(out_packed[:10], ref_a), h.rel_error(out_packed[10:], ref_b))
  padded_err = h.rel_error(out_pad[:10], ref_pad)

  # Greedy decoding.
  prompts = [tokens[0, :9], tokens[1, :5]]
  same, prefix = _greedy(h, model, lm, params, prompts, n)
  greedy = dict(new_tokens=n, prompt_lens=[len(p) for p in prompts], identical=same, prefix=prefix)
  if dependent:
    original = cfg.rope_original_max_len
    short = original - max(len(p) for p in prompts) + 1  # every forward's positions < original
    s_same, _ = _greedy(h, model, lm, params, prompts, short)
    greedy.update(within_original=short, within_original_identical=s_same)
    what = ("alignax keeps the keys already cached as rotated, transformers recomputes its cache "
            "there" if cfg.rope_scaling == "longrope" else
            "alignax's base follows the batch's longest position, each prompt runs alone on "
            "transformers' side")
    notes.append(f"greedy crosses original_max_position_embeddings={original} ({what}), so equal "
                 f"tokens past it are not guaranteed; the first {short}, every position below it: "
                 f"{s_same[0]}/{short}, {s_same[1]}/{short}")

  # Export round trip through the commands.
  run, out_dir = os.path.join(work, name, "run"), os.path.join(work, name, "out")
  with contextlib.redirect_stdout(io.StringIO()):
    import_hf_main(types.SimpleNamespace(src=src, dst=run, dtype="float32", max_seq_len=max_seq_len))
    export_hf_main(types.SimpleNamespace(workdir=run, out=out_dir, dtype="", architecture="",
                                         max_shard_size="0"))
  again = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  with torch.no_grad():
    export_err = h.rel_error(again(torch.tensor(tokens)).logits.float().numpy(), plain_alignax)
    if dependent:  # and within the original context, where the variant is plain RoPE
      short = tokens[:, :cfg.rope_original_max_len]
      export_within = h.rel_error(again(torch.tensor(short)).logits.float().numpy(),
                                  ours(short, row_pos[:, :short.shape[1]], np.ones_like(short)))

  hf_params = sum(p.numel() for p in model.parameters())
  if info.get("skipped_params"):
    notes.append(f"text model only: {len(info['skipped_tensors'])} vision/projector tensors "
                 f"({info['skipped_params']:,} params) skipped at import")
    hf_params -= info["skipped_params"]
  if dependent and not export_err <= TOL:
    notes.append(f"export: {export_err:.1e} at {t} tokens, {export_within:.1e} within the original "
                 f"{cfg.rope_original_max_len}: config.json has max_position_embeddings="
                 f"{again.config.max_position_embeddings}, which transformers' {cfg.rope_scaling} RoPE "
                 "takes for the original context")
  if type(again).__name__ != info["architecture"]:
    notes.append(f"exports as {type(again).__name__}")
  row = dict(name=name, architecture=info["architecture"], plain=plain, packed=packed_err,
             padded=padded_err, greedy=greedy, export=export_err,
             export_within_original=export_within if dependent else None,
             export_architecture=type(again).__name__, hf_params=hf_params,
             alignax_params=cfg.num_params(), seconds=time.perf_counter() - t0)
  bad = [k for k in ("plain", "packed", "padded", "export") if not row[k] <= TOL]
  if bad:
    notes.append(f"above the tests' 1e-4: {', '.join(bad)}")
  if hf_params != row["alignax_params"]:
    notes.append("parameter counts differ")
  row["notes"] = notes
  return row


def real_config(transformers, file: str) -> dict:
  """A published config's parameter count: transformers' on the meta device (nothing allocated)
  and ModelConfig.num_params() of what `config_from_hf` maps it to."""
  import torch

  from alignax.models.hf import config_from_hf
  with open(os.path.join(REAL_CONFIGS, file)) as f:
    hf = json.load(f)
  cfg, arch = config_from_hf(hf)
  config = transformers.AutoConfig.for_model(**hf)
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
  n = sum(p.numel() for p in model.parameters())
  return dict(config=file.removesuffix(".json"), architecture=arch, hf_params=n,
              alignax_params=cfg.num_params(), equal=n == cfg.num_params())


def _fmt(x: float) -> str:
  return f"{x:.1e}"


def main(_):
  import jax
  from absl import logging
  jax.config.update("jax_default_matmul_precision", "highest")  # as the tests run
  logging.set_verbosity(logging.ERROR)  # the exports' orbax lines, import-hf's byte-tokenizer warning
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  h = _helpers()
  names = [*h.MODELS, *DERIVED]
  if _NAMES.value:
    names = [n for n in _NAMES.value.split(",") if n]
    unknown = sorted(set(names) - set(h.MODELS) - set(DERIVED))
    if unknown:
      raise app.UsageError(f"--names: unknown {', '.join(unknown)}; known: {', '.join([*h.MODELS, *DERIVED])}")
  n = _NEW.value
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as work:
    rows = [measure(transformers, h, name, n, work) for name in names]
  reals = [real_config(transformers, f) for f in sorted(os.listdir(REAL_CONFIGS)) if f.endswith(".json")]
  total = time.perf_counter() - t0

  print(f"alignax vs transformers {transformers.__version__} (torch {torch.__version__}), float32, "
        f"{jax.default_backend()}: max relative logits error; greedy = identical of {n} per prompt")
  print(f"{'architecture':31} {'config':15} {'plain':>8} {'packed':>8} {'padded':>8} {'greedy':>7} "
        f"{'export':>8} {'params':>7}  notes")
  for r in rows:
    g = r["greedy"]["identical"]
    print(f"{r['architecture']:31} {r['name']:15} {_fmt(r['plain']):>8} {_fmt(r['packed']):>8} "
          f"{_fmt(r['padded']):>8} {f'{g[0]},{g[1]}':>7} {_fmt(r['export']):>8} "
          f"{'equal' if r['hf_params'] == r['alignax_params'] else 'DIFFER':>7}  {'; '.join(r['notes'])}")
  print("\npublished configs, parameter counts (transformers on the meta device vs ModelConfig.num_params):")
  for r in reals:
    print(f"{r['config']:14} {r['architecture']:20} {r['hf_params']:>14,} {r['alignax_params']:>14,} "
          f"{'equal' if r['equal'] else 'DIFFER'}")
  print(f"\n{total:.0f} s")
  result = dict(platform=jax.default_backend(), transformers=transformers.__version__,
                torch=torch.__version__, jax=jax.__version__, dtype="float32", tolerance=TOL,
                new_tokens=n, seconds=total, rows=rows, real_configs=reals)
  out = _OUT.value or os.path.join(os.path.dirname(__file__), "results", f"hf_parity_{result['platform']}.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
