"""`data.*`: where a stage's records come from and how they become rows."""

from __future__ import annotations

import dataclasses

from alignax.sections import Section, one_of, require

SOURCES = ("world", "files")  # the built-in alignment world, or the user's files
BAD_RECORD_POLICIES = ("error", "skip")  # skipped records are counted in the logs
LOADERS = ("tfds", "memory")  # array_record datasets read by grain, or in-memory lists
# "auto": "model" when the tokenizer has a Jinja template of its own, else "markers";
# "model": that template (an imported checkpoint's); role tokens; "User: ...\nAssistant: ...".
CHAT_TEMPLATES = ("auto", "model", "markers", "plain")
TEXT_MODES = ("lines", "file")  # text files: one document per line, or the whole file
LONG_DOC_POLICIES = ("split", "truncate")  # documents longer than seq_len (counted either way)
TOO_LONG_POLICIES = ("truncate", "skip")  # conversations longer than seq_len (counted either way)


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  """Attributes:
    source: "world" or "files".
    train_files: paths or globs (a comma-separated string in the ConfigDict).
    eval_files: the same for evaluation; empty: hold out `eval_records` of the training files.
    seq_len: tokens per row.
    bad_records: "error" (stop, naming the file and line) or "skip" (count and go on).
    loader: "tfds" or "memory".
    tfds_dir: where TFDS datasets are built; "" = $ALIGNAX_DATA_DIR or ~/.cache/alignax/tfds.
    eval_records: records held out for evaluation when `eval_files` is empty.
    chat_template: how conversations are rendered (`alignax.data.chat`): "auto" (the default:
      "model" when the tokenizer carries its own Jinja template, else "markers"), "model" (that
      template, as transformers' apply_chat_template renders it; a tokenizer without one is a
      ConfigError), "markers" or "plain". The stage resolves "auto" once it knows its
      tokenizer, and an export records the template it was trained with.
    text_mode: text files (pretraining): "lines" (one document per line) or "file".
    long_docs: documents longer than `seq_len` (pretraining): "split" into chunks or "truncate".
    packing: SFT rows pack several conversations (False: one per row, padded).
    too_long: conversations longer than `seq_len` (SFT): "truncate" or "skip".
    pair_len: preference pairs (reward model, DPO family): 0 lays chosen and rejected out as two
      rows of `seq_len`; N >= seq_len packs each pair into one row of N tokens, the prompt once
      and both responses after it (`alignax.algorithms.shared_prompt`), which drops the prompt's
      second copy and gives the same losses. Each response is still cut at `seq_len` with its
      prompt; a pair longer than N in one row is a pair_too_long bad record.
  """

  SECTION = "data"
  source: str = "world"
  train_files: tuple[str, ...] = ()
  eval_files: tuple[str, ...] = ()
  seq_len: int = 128
  bad_records: str = "error"
  loader: str = "tfds"
  tfds_dir: str = ""
  eval_records: int = 256
  chat_template: str = "auto"
  text_mode: str = "lines"
  long_docs: str = "split"
  packing: bool = False
  too_long: str = "truncate"
  pair_len: int = 0

  def check(self) -> None:
    one_of(self.source, "data.source", SOURCES)
    require(self.source != "files" or bool(self.train_files), "data.train_files",
            "must name at least one file when data.source='files'")
    require(self.seq_len > 1, "data.seq_len", f"must be > 1, got {self.seq_len}")
    one_of(self.bad_records, "data.bad_records", BAD_RECORD_POLICIES)
    one_of(self.loader, "data.loader", LOADERS)
    one_of(self.chat_template, "data.chat_template", CHAT_TEMPLATES)
    one_of(self.text_mode, "data.text_mode", TEXT_MODES)
    one_of(self.long_docs, "data.long_docs", LONG_DOC_POLICIES)
    one_of(self.too_long, "data.too_long", TOO_LONG_POLICIES)
    require(self.pair_len == 0 or self.pair_len >= self.seq_len, "data.pair_len",
            f"must be 0 (two rows per pair) or >= data.seq_len ({self.seq_len}), got {self.pair_len}")
    require(self.eval_records >= 0, "data.eval_records", f"must be >= 0, got {self.eval_records}")
