"""`alignax import-hf --src=HF_DIR --dst=WORKDIR [--dtype=...] [--adapter=PEFT_DIR]`: a Hugging
Face checkpoint directory (with a PEFT LoRA adapter merged into it, if given) -> an alignax export
any stage starts from (`--config.init.workdir=WORKDIR`)."""

from __future__ import annotations

import os
import shutil

from absl import logging

from alignax.errors import DataError
from alignax.models.hf import HFError, import_hf


def _tokenizer_for(src: str):
  """(kind, tokenizer or None, warning or None) for the tokenizer files in `src`."""
  if os.path.isfile(os.path.join(src, "tokenizer.json")):
    from alignax.data.hf_tokenizer import HFTokenizer
    return "tokenizer.json", HFTokenizer(src), None
  if os.path.isfile(os.path.join(src, "tokenizer.model")):
    from alignax.data.sentencepiece_tokenizer import SentencePieceTokenizer
    try:
      return "tokenizer.model", SentencePieceTokenizer(os.path.join(src, "tokenizer.model")), None
    except DataError as e:
      return "tokenizer.model", None, (
          f"alignax's SentencePiece tokenizer cannot use this tokenizer.model ({e}); stages will "
          f"reject it: provide the model's tokenizer.json instead")
  return "bytes", None, (f"{src} has no tokenizer.json or tokenizer.model: using the byte tokenizer, "
                         f"which the pretrained embeddings were not trained with")


def main(flags) -> None:
  """`alignax import-hf`: import `flags.src` and write an alignax export to `flags.dst`.

  The tokenizer spec of the export is `DST/tokenizer.json` (copied, with tokenizer_config.json,
  special_tokens_map.json and chat_template.jinja), else `DST/tokenizer.model`, else "bytes" (with a warning). The
  vocabulary grows to the tokenizer's when it added chat role markers. `flags.adapter` (optional)
  names a PEFT LoRA adapter directory merged into the weights; the export's metadata records it.
  """
  from alignax.checkpoint import save_export
  from alignax.data.tokenizer import ByteTokenizer

  src, dst = os.path.abspath(flags.src), os.path.abspath(flags.dst)
  dtype = flags.dtype or "float32"
  max_seq_len = getattr(flags, "max_seq_len", None) or None  # only if the CLI defines it
  adapter = getattr(flags, "adapter", None) or None
  if not os.path.isdir(src):
    raise HFError(f"--src={flags.src}: not a directory")
  if adapter is not None:
    adapter = os.path.abspath(adapter)
    if not os.path.isdir(adapter):
      raise HFError(f"--adapter={flags.adapter}: not a directory")
  held = [n for n in ("export", "checkpoints", "config.json", "metrics.jsonl")
          if os.path.exists(os.path.join(dst, n))]
  if held:
    raise HFError(f"--dst={flags.dst} already holds a run ({', '.join(held)}): import into a new "
                  "directory (nothing was written)")
  kind, tok, warning = _tokenizer_for(src)
  if kind == "bytes":
    tok = ByteTokenizer()
  added = [tok.role_ids[name[2:-2]] for name in getattr(tok, "added_tokens", [])]
  cfg, params, info = import_hf(src, dtype, pad_vocab_to=tok.vocab_size if tok else None,
                                mean_init_ids=added, max_seq_len=max_seq_len, adapter=adapter)

  os.makedirs(dst, exist_ok=True)
  if kind == "bytes":
    spec = "bytes"
  else:
    spec = os.path.join(dst, kind)
    extras = (("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "generation_config.json")  # its eos ids: the end-of-turn tokens the sampler stops at
              if kind == "tokenizer.json" else ())
    for name in (kind,) + extras:
      if os.path.isfile(os.path.join(src, name)):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
  if warning:
    logging.warning("%s", warning)
  extra = {"hf": {k: info[k] for k in ("architecture", "model_type", "hf_vocab_size")}, "source": src}
  if info.get("adapter"):
    extra["adapter"] = info["adapter"]  # {path, base_model_name_or_path, rank, alpha, targets}
  path = save_export(dst, params, model=cfg, stage="import", tokenizer=spec, extra=extra)

  heads = f"{cfg.n_heads} heads" + (f" / {cfg.kv_heads} kv" if cfg.kv_heads != cfg.n_heads else "")
  vocab = (f"{cfg.vocab_size} (grown from {info['hf_vocab_size']})"
           if cfg.vocab_size != info["hf_vocab_size"] else str(cfg.vocab_size))
  print(f"imported {info['architecture']} from {src}")
  print(f"  model: d_model={cfg.d_model}, n_layers={cfg.n_layers}, {heads}, head_dim={cfg.dim_per_head}, "
        f"d_ff={cfg.d_ff}, vocab_size={vocab}, max_seq_len={cfg.max_seq_len}")
  print(f"  params: {info['num_params']:,} in {info['dtype']} "
        f"(checkpoint: {', '.join(info['source_dtypes'])})")
  if info.get("skipped_tensors"):
    print(f"  skipped: {len(info['skipped_tensors'])} tensors ({info['skipped_params']:,} params) "
          "outside the text model (vision tower, multimodal projector)")
  line = f"  tokenizer: {spec}"
  if tok is not None and kind != "bytes":
    line += f" (vocab {tok.vocab_size}"
    if getattr(tok, "added_tokens", None):
      line += f"; added {', '.join(tok.added_tokens)} at ids {', '.join(map(str, added))}"
    line += ")"
  print(line)
  if info.get("adapter"):
    a = info["adapter"]
    print(f"  adapter: {a['path']} merged (LoRA r={a['rank']}, alpha={a['alpha']:g}, on {a['targets']}"
          + (f"; trained on {a['base_model_name_or_path']}" if a["base_model_name_or_path"] else "") + ")")
  if warning:
    print(f"  warning: {warning}")
  print(f"  export: {path}")
  print(f"  next: start a stage with --config.init.workdir={dst} --config.tokenizer={spec}")
