"""`alignax export-hf --workdir=W --out=DIR [--dtype=bfloat16] [--max_shard_size=2GB]
[--lora=merge|peft]`: a run's language model as a Hugging Face checkpoint directory that
`transformers` loads.

What it writes: config.json (the architecture the model was imported from when there is one, so
a Mistral stays a Mistral; else the one its choices imply), safetensors weights cut at the size
limit with an index, generation_config.json with the eos ids, and the tokenizer files with a
chat template `apply_chat_template` renders exactly as the run was trained ("markers": alignax's
role markers as a Jinja template; a run on the checkpoint's own template keeps it).

A LoRA run (model.lora.rank > 0) exports with `--lora=merge` (the default) as an ordinary model,
its adapters folded into the weights. `--lora=peft` writes only its adapters, as a PEFT adapter
directory (adapter_config.json + adapter_model.safetensors, `alignax.models.hf.peft`) for the base
it was trained on, plus the tokenizer with the trained chat template when its ids fit that base
(none when alignax added chat markers the base lacks: load the base's own tokenizer then).
`base_model_name_or_path` is the Hugging Face directory the base was imported from, when the run
started from an import (else null: export that base with `export-hf` and load the adapter on it).
"""

from __future__ import annotations

import json
import os
import re

from alignax import checkpoint as ckpt_lib
from alignax.models.hf import ARCHITECTURES, HFError, export_hf

# alignax's "markers" chat template (alignax.data.chat) in Jinja: the role markers open each turn,
# eos closes an assistant turn, and a generation prompt is the assistant's marker.
MARKERS_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% else %}<|assistant|>{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> int | None:
  """"2GB" -> 2_000_000_000 (decimal units, as transformers' max_shard_size); "" or "0" -> None."""
  if not text or text.strip() == "0":
    return None
  m = _SIZE.match(text)
  if not m:
    raise HFError(f"--max_shard_size={text!r}: expected a size such as 500MB or 2GB")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper() if m.group(2) else None])


def source_architecture(workdir: str, depth: int = 16) -> str | None:
  """The Hugging Face architecture a run's weights came from: its import's, followed back through
  `init.workdir` (SFT from an import, DPO from that SFT, ...); None when none was imported."""
  from alignax.config import read_config
  for _ in range(depth):
    if ckpt_lib.has_export(workdir):
      hf = (ckpt_lib.read_export_meta(workdir).get("extra") or {}).get("hf") or {}
      if hf.get("architecture"):
        return hf["architecture"]
    try:
      parent = read_config(workdir).get("init", {}).get("workdir")
    except Exception:  # no config.json: an import, or not a run
      return None
    if not parent:
      return None
    workdir = parent
  return None


def _template_note(jinja: str | None, template: str) -> str:
  if jinja:
    return "alignax markers (Jinja)"
  if template == "model":
    return "the checkpoint's own, which the run was trained with"
  if template == "plain":
    return ("none written: the 'plain' template tokenizes role names with the text, which a "
            "rendered string would not reproduce")
  return "the source tokenizer's, if it has one"


LORA_MODES = ("merge", "peft")


def _import_base(workdir: str) -> tuple[str | None, dict | None]:
  """(the run's base workdir: its `init.workdir`, that base's export metadata `extra` when the
  base is a plain Hugging Face import, else None)."""
  from alignax.config import read_config
  try:
    parent = read_config(workdir).get("init", {}).get("workdir")
  except Exception:  # no config.json: not a training run
    return None, None
  if not parent or not ckpt_lib.has_export(parent):
    return parent or None, None
  extra = ckpt_lib.read_export_meta(parent).get("extra") or {}
  if not extra.get("hf") or extra.get("adapter"):  # an adapter merged at import: not the HF base
    return parent, None
  return parent, extra


def _write_peft(workdir: str, out: str, adapters, lora_cfg, cfg, tok, jinja, template: str,
                dtype: str | None) -> None:
  """`--lora=peft`: the run's adapters as a PEFT adapter directory in `out` (see the module
  docstring for what goes with them)."""
  import numpy as np

  from alignax.models.hf.peft import CONFIG_FILE, write_peft_adapter
  if os.path.exists(os.path.join(out, CONFIG_FILE)):
    raise HFError(f"--out={out} already holds an adapter ({CONFIG_FILE}): choose a new directory")
  parent, extra = _import_base(workdir)
  base_model = extra.get("source") if extra else None
  # Tokens alignax added at import (new embedding rows, or padded rows reset to the mean) are not
  # in the HF base, and no LoRA tensor carries embedding rows.
  added = bool(extra) and (cfg.vocab_size != extra["hf"].get("hf_vocab_size", cfg.vocab_size)
                           or bool(getattr(tok, "added_tokens", None)))
  if added and template == "markers":
    raise HFError(
        f"{workdir} was trained on alignax's chat markers, which its import added to the "
        f"tokenizer and embeddings of {base_model or parent}: a PEFT adapter on the original base "
        f"cannot carry those rows. Export the merged model (--lora=merge), or export the base "
        f"with the markers too (alignax export-hf --workdir={parent}) and merge there")
  if dtype:
    import jax.numpy as jnp
    adapters = {"blocks": {g: {n: {k: np.asarray(v).astype(jnp.dtype(dtype)) for k, v in ab.items()}
                               for n, ab in group.items()} for g, group in adapters["blocks"].items()}}
  write_peft_adapter(out, adapters, lora_cfg, cfg, base_model)
  names = ", ".join(n for group in adapters["blocks"].values() for n in group)
  print(f"exported the LoRA adapters of {workdir} (r={lora_cfg.rank}, alpha={lora_cfg.alpha:g}, "
        f"on {names}) as a PEFT adapter to {out}")
  if tok is not None and not added:
    tok.save(out, chat_template=jinja)
    print(f"  tokenizer: tokenizer.json, chat template {_template_note(jinja, template)}")
  else:
    print("  tokenizer: none written; use the base's own" + (
        " (alignax added chat markers to it, which the run never trained on)" if added else ""))
  if base_model:
    print(f"  load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_model!r}), {out!r})")
  else:
    print(f"  base: {parent or 'the model the run started from'}; export it with "
          f"`alignax export-hf --workdir={parent or 'BASE'}` and load the adapter on that")


def main(flags) -> None:
  """`alignax export-hf`: the LM of `flags.workdir` (export, else latest checkpoint) to `flags.out`;
  with `flags.lora == "peft"`, a LoRA run's adapters alone."""
  import jax

  from alignax.data.tokenizers import make_tokenizer
  from alignax.run_models import RAW_STAGES, chat_template_of, load_policy_and_source

  workdir, out = os.path.abspath(flags.workdir), os.path.abspath(flags.out)
  if os.path.exists(os.path.join(out, "config.json")):
    raise HFError(f"--out={flags.out} already holds a checkpoint (config.json): choose a new directory")
  lora_mode = getattr(flags, "lora", None) or "merge"
  if lora_mode not in LORA_MODES:
    raise HFError(f"--lora={lora_mode!r}: expected one of {', '.join(LORA_MODES)}")
  adapters = lora_cfg = None
  if lora_mode == "peft":
    from alignax.models.hf.peft import load_adapters
    adapters, lora_cfg = load_adapters(ckpt_lib.export_path(workdir))  # refuses a run trained without adapters, first
  lm, params, stage, spec, source = load_policy_and_source(workdir)
  if stage == "reward":
    raise HFError(f"{workdir} is a reward model (a scalar head), not a causal LM: export-hf writes "
                  "language models (a policy, SFT, DPO or pretraining run)")
  bad = ckpt_lib.nonfinite_leaves(params)
  if bad:
    raise HFError(f"{workdir}: {len(bad)} params are not finite ({', '.join(bad[:3])}): refusing to "
                  "export them")
  cfg = lm.config
  arch = getattr(flags, "architecture", None) or None
  if arch is None:
    found = source_architecture(workdir)
    arch = found if found in ARCHITECTURES else None
  tok = make_tokenizer(spec) if spec else None
  # A pretrained or imported model keeps the source tokenizer's template (it was never trained
  # on alignax's markers); a chat-trained one gets the template it was trained with: alignax's
  # markers as Jinja, or for "model" the source's own template, kept by `save` (jinja None).
  template = "source" if stage in RAW_STAGES else chat_template_of(workdir)
  jinja = MARKERS_JINJA if template == "markers" and getattr(tok, "role_ids", None) else None
  dtype = getattr(flags, "dtype", None) or None
  if tok is not None and not hasattr(tok, "save"):
    tok = None  # bytes / SentencePiece: no tokenizer.json to write
  if lora_mode == "peft":
    _write_peft(workdir, out, adapters, lora_cfg, cfg, tok, jinja, template, dtype)
    return
  export_hf(jax.device_get(params), cfg, out, architecture=arch, tokenizer=tok, dtype=dtype,
            max_shard_bytes=parse_size(getattr(flags, "max_shard_size", "") or ""),
            chat_template=jinja)
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    written = json.load(f)
  shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
  print(f"exported {written['architectures'][0]} ({stage}, from its {source}) to {out}")
  print(f"  weights: {len(shards)} safetensors file(s) in {written.get('torch_dtype')}")
  if tok is None:
    print(f"  tokenizer: {spec} has no Hugging Face form; pass the original tokenizer files yourself")
  else:
    print(f"  tokenizer: tokenizer.json, chat template "
          f"{_template_note(jinja, template)}")
  print(f"  load: AutoModelForCausalLM.from_pretrained({out!r})")
