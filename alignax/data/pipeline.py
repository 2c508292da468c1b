"""Grain pipelines, one per record format: records -> fixed-shape numpy batches for one process.

Every pipeline is the same spine (`alignax.data.batching`, set by one `BatchOptions`) with
its format's encoder (`alignax.data.encoders`) and row layout; its iterator and counters are
in `alignax.data.iterators`. Each pipeline takes a `BatchOptions`, or its fields as keywords
(`batch_size=8, shuffle=False`), which replace the given options' fields.

A validation pass (`screen_source`), when the pipeline is built and before any batch, runs every record through the same validate/encode the
map runs, once, so bad records are known before training compiles anything:
  * bad_records="error": any record the pipeline could not use raises one DataError listing
    the first few with file:line and the count per reason;
  * bad_records="skip": each reason is logged once (absl WARNING, one line per reason, with
    the first file:line), and `stats()` reports the distinct records per reason from the
    first batch on; later epochs skip those records without counting them again;
  * nothing usable at all (or a shard with nothing usable) raises DataError naming the
    files, whatever the policy: a repeating pipeline would otherwise spin forever.
The pass covers the whole source on every process (not just its shard), so every process
stops on the same error and reports the same counts.

Conversations (SFT, preference, unpaired, prompts) go through `chat_template` ("markers", the
default, or "plain"; see `alignax.data.chat`).

`source` is anything with `len()` and `[i]` giving a record dict: a list (e.g. from
`readers.read_records` or `World.splits()`), or a TFDS data source from `tfds_builders`.

Batch contract (all `[B, T]`, B = `batch_size` per process):
  tokens int32, positions int32, segment_ids int32, loss_mask float32.
  segment_ids == 0 is padding; packed documents in a row get ids 1, 2, 3, ...; positions
  restart at 0 for each document (or chunk); loss_mask[t] = 1 where predicting tokens[t] from
  tokens[<t] counts, so it is 0 on the first token of every segment and on padding.

Shapes never change: with `drop_remainder=False` (default) a short last batch is filled with
empty rows (segment_ids 0, loss_mask 0; "valid" 0 and "index" -1 where those exist), so
pair/prompt losses must weight rows by "valid". With `drop_remainder=True` it is dropped.
Either way it is counted.
"""

from __future__ import annotations

from alignax.data import batching as spine
from alignax.data.batching import BatchOptions
from alignax.data.config import LONG_DOC_POLICIES, TOO_LONG_POLICIES
from alignax.data.encoders import (lm_encoder, packed_to_contract, preference_encoder,
                                   prompt_encoder, sft_encoder, unpaired_encoder)
from alignax.data.iterators import DataIterator, MapBatches, PromptIterator
from alignax.data.tokenizer import Tokenizer
from alignax.errors import DataError

__all__ = ["BatchOptions", "DataIterator", "MapBatches", "PromptIterator", "lm_pipeline",
           "sft_pipeline", "preference_pipeline", "unpaired_pipeline", "prompts_pipeline"]


def _bins(num_packing_bins: int | None, opts: BatchOptions) -> int:
  return num_packing_bins or max(opts.batch_size, 64)


def lm_pipeline(source, tok: Tokenizer, batching: BatchOptions | None = None, *, seq_len: int,
                long_docs: str = "split", num_packing_bins: int | None = None,
                **options) -> DataIterator:
  """Pretraining: {"text"} documents -> `<bos> text <eos>` -> packed rows.

  Args:
    source: records {"text": str} (len() and [i]).
    tok: tokenizer (bos_id, eos_id, pad_id, encode).
    batching, options: `BatchOptions` (its fields as keywords override it).
    seq_len: T.
    long_docs: "split" a document longer than T into T-token chunks (each its own segment;
      the first token of a chunk is not a target, its context is in the previous chunk) or
      "truncate" it to its first T tokens. Counted as split/split_chunks or
      truncated/truncated_tokens.
    num_packing_bins: rows the first-fit packer fills at once (default max(batch_size, 64));
      more bins leave less padding, at the cost of reading further ahead.

  Packing runs across the epoch boundary, so a row may hold the end of one epoch and the
  start of the next. Empty documents are bad records ("skipped/empty_text" under "skip").

  Returns:
    DataIterator of {"tokens", "positions", "segment_ids" [B, T] int32, "loss_mask" [B, T]
    float32}.
  """
  opts = BatchOptions.of(batching, **options)
  spine.check_len("seq_len", seq_len)
  if long_docs not in LONG_DOC_POLICIES:
    raise DataError(f"long_docs must be one of {LONG_DOC_POLICIES}, got {long_docs!r}")
  stream = spine.examples(source, "text", lm_encoder(tok, seq_len, long_docs), opts)
  bins = _bins(num_packing_bins, opts)
  return spine.finish(stream, opts, split_len=seq_len,
                         rows=spine.first_fit(seq_len, bins, tok.pad_id), pad_id=tok.pad_id,
                         to_contract=packed_to_contract,
                         info=dict(kind="lm", seq_len=seq_len, long_docs=long_docs,
                                   num_packing_bins=bins, **opts.info()))


def sft_pipeline(source, tok: Tokenizer, batching: BatchOptions | None = None, *, seq_len: int,
                 packed: bool = False, too_long: str = "truncate",
                 num_packing_bins: int | None = None, **options) -> DataIterator:
  """SFT: conversations -> chat template (loss on assistant text + eos) -> packed or padded rows.

  Args:
    source: SFT records ({"prompt", "response"} or {"messages"}).
    packed: first-fit pack several conversations per row (segment ids 1, 2, ...); else one
      conversation per row, right-padded.
    too_long: a conversation longer than T is "truncate"d to T tokens (counted truncated,
      truncated_tokens) or "skip"ped (counted skipped/too_long). If truncation leaves no
      assistant token, it is a prompt_too_long bad record.
    Other arguments: as `lm_pipeline`; bad_records covers invalid records, empty responses and
    prompts too long.

  Returns:
    DataIterator of LM batches {"tokens", "positions", "segment_ids", "loss_mask"} [B, T].
  """
  opts = BatchOptions.of(batching, **options)
  spine.check_len("seq_len", seq_len)
  if too_long not in TOO_LONG_POLICIES:
    raise DataError(f"too_long must be one of {TOO_LONG_POLICIES}, got {too_long!r}")
  encode = sft_encoder(tok, seq_len, too_long, opts.chat_template)
  stream = spine.examples(source, "sft", encode, opts)
  rows = (spine.first_fit(seq_len, _bins(num_packing_bins, opts), tok.pad_id) if packed
          else spine.one_per_row(seq_len, tok.pad_id))
  return spine.finish(stream, opts, split_len=None, rows=rows, pad_id=tok.pad_id,
                         to_contract=packed_to_contract if packed else None,
                         info=dict(kind="sft", seq_len=seq_len, packed=packed, too_long=too_long,
                                   **opts.info()))


def preference_pipeline(source, tok: Tokenizer, batching: BatchOptions | None = None, *,
                        seq_len: int, max_prompt_len: int | None = None, pair_len: int = 0,
                        **options) -> DataIterator:
  """Preference pairs -> {"chosen": LM batch, "rejected": LM batch, "valid" [B]}.

  Each side is prompt + response through the chat template, one sequence per row,
  right-padded to T; both sides share the prompt tokens. loss_mask is 1 on the response's
  assistant text and its eos only (never on the prompt, even a multi-turn one).

  Bad records (by `bad_records`, counted as skipped/<reason>): invalid, identical_pair
  (chosen == rejected), empty_response, prompt_too_long (the prompt, counted with the
  <|assistant|> marker that opens the response, leaves no room for a response token within
  T, or is longer than `max_prompt_len` if given), and with `pair_len` > 0 pair_too_long (the
  prompt plus both responses, as cut at T, are more than `pair_len` tokens: the one-row layout
  of `alignax.algorithms.shared_prompt` would not hold them). A response that does not
  fit is cut at T (counted once per pair in truncated/truncated_tokens).

  Optional record fields (see schemas.PREFERENCE_FLAGS / PREFERENCE_NUMBERS):
  chosen_ended / rejected_ended = false leave that response without its `<eos>`; margin and
  chosen_prob are passed through; chosen_gold / rejected_gold become `gold_label`.

  Returns:
    DataIterator of {"chosen": {...}, "rejected": {...}, "valid", "margin", "chosen_prob",
    "gold_label": [B] float32, "prompt_len" [B] int32 (the prompt tokens both sides start
    with; 0 on filler rows), "index" [B] int32 (record index in `source`, -1 on filler
    rows)}, each side {"tokens", "positions", "segment_ids" [B, T] int32, "loss_mask" [B, T]
    float32, "response_len" [B] int32 (loss tokens in the row)}. valid is 0 on filler rows
    (margin and chosen_prob are 0 there); chosen_prob is P(chosen is better), 1.0 for a record
    without it; gold_label is 1 (gold prefers chosen), 0 (gold prefers rejected) or -1
    (unknown).
  """
  opts = BatchOptions.of(batching, **options)
  spine.check_len("seq_len", seq_len)
  if pair_len and pair_len < seq_len:
    raise DataError(f"pair_len must be 0 or >= seq_len ({seq_len}), got {pair_len}")
  encode = preference_encoder(tok, seq_len, max_prompt_len, opts.chat_template, pair_len)
  stream = spine.examples(source, "preference", encode, opts, keep_index=True)
  return spine.finish(stream, opts, split_len=None, rows=spine.as_is, pad_id=tok.pad_id,
                         to_contract=None,
                         info=dict(kind="preference", seq_len=seq_len,
                                   max_prompt_len=max_prompt_len, pair_len=pair_len, **opts.info()))


def unpaired_pipeline(source, tok: Tokenizer, batching: BatchOptions | None = None, *,
                      seq_len: int, max_prompt_len: int | None = None,
                      **options) -> DataIterator:
  """Unpaired (KTO) {prompt, completion, label} -> LM batch + label, one sequence per row.

  Returns:
    DataIterator of {"tokens", "positions", "segment_ids" [B, T] int32, "loss_mask" [B, T]
    float32 (completion only), "response_len" [B] int32, "label" [B] float32 (1 desirable,
    0 undesirable), "valid" [B] float32}. Bad records as in `preference_pipeline`.
  """
  opts = BatchOptions.of(batching, **options)
  spine.check_len("seq_len", seq_len)
  encode = unpaired_encoder(tok, seq_len, max_prompt_len, opts.chat_template)
  stream = spine.examples(source, "unpaired", encode, opts)
  return spine.finish(stream, opts, split_len=None, rows=spine.as_is, pad_id=tok.pad_id,
                         to_contract=None, info=dict(kind="unpaired", seq_len=seq_len, **opts.info()))


def prompts_pipeline(source, tok: Tokenizer, batching: BatchOptions | None = None, *,
                     prompt_len: int, **options) -> PromptIterator:
  """Prompts for generation (RL rollouts, evaluation): left-padded ids ending in <|assistant|>.

  A prompt longer than `prompt_len` tokens is a prompt_too_long bad record (`bad_records`).
  Without `batching`, the defaults suit evaluation: no shuffle, one epoch, nothing dropped.

  Returns:
    PromptIterator yielding (arrays, records). arrays: "tokens" [B, P] int32 (left-padded
    with pad_id), "mask" [B, P] bool (True on prompt tokens), "positions" [B, P] int32 (0 at
    each prompt's first token), "segment_ids" [B, P] int32 (1 on prompt tokens),
    "prompt_len" [B] int32, "index" [B] int32 (record index in `source`, -1 on filler rows),
    "valid" [B] float32. records: per row the validated source record (extras included) or
    None for a filler row.
  """
  if batching is None:
    options.setdefault("shuffle", False)
  opts = BatchOptions.of(batching, **options)
  spine.check_len("prompt_len", prompt_len)
  encode = prompt_encoder(tok, prompt_len, opts.chat_template)
  # keep_index: the source index rides along so the host can look the full record up again.
  stream = spine.examples(source, "prompts", encode, opts, keep_index=True)
  return spine.finish(stream, opts, split_len=None, rows=spine.as_is, pad_id=tok.pad_id,
                         to_contract=None, iterator_cls=PromptIterator, source=source,
                         info=dict(kind="prompts", prompt_len=prompt_len, **opts.info()))
