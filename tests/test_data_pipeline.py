"""Grain pipelines: the batch contract by hand, nothing lost, policies, exact resume, shards."""

import collections
import json

import numpy as np
import pytest

from alignax.data import chat, pipeline
from alignax.data.schemas import DataError
from alignax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, EOS, PAD = TOK.bos_id, TOK.eos_id, TOK.pad_id
USER, ASSISTANT, SYSTEM = TOK.role_ids["user"], TOK.role_ids["assistant"], TOK.role_ids["system"]
CONTRACT = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32,
            "loss_mask": np.float32}


def _b(text):
  return list(text.encode())


def _check_contract(batch, shape):
  assert set(batch) == set(CONTRACT)
  for k, dtype in CONTRACT.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, k


def _segments(batches):
  """All (tokens, loss_mask) segments of LM batches, in order, as tuples."""
  out = []
  for b in batches:
    for row in range(b["tokens"].shape[0]):
      seg = b["segment_ids"][row]
      for s in range(1, seg.max() + 1):
        sel = seg == s
        out.append((tuple(b["tokens"][row][sel]), tuple(b["loss_mask"][row][sel])))
  return out


def _rest(it):
  return list(it)


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    flat_x, flat_y = _flatten(x), _flatten(y)
    assert flat_x.keys() == flat_y.keys()
    for k in flat_x:
      np.testing.assert_array_equal(flat_x[k], flat_y[k], err_msg=k)


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


# ----------------------------------------------------------------------------- LM packing


def test_lm_packing_contract_by_hand():
  docs = [{"text": "ab"}, {"text": "cde"}, {"text": "f"}]
  it = pipeline.lm_pipeline(docs, TOK, batch_size=2, seq_len=8, num_packing_bins=2,
                            shuffle=False)
  batches = list(it)
  assert len(batches) == 1
  b = batches[0]
  _check_contract(b, (2, 8))
  # First fit: "ab" (4 tokens) -> row 0; "cde" (5) does not fit next to it -> row 1;
  # "f" (3) fits in row 0 after "ab".
  np.testing.assert_array_equal(b["tokens"], [
      [BOS, *_b("ab"), EOS, BOS, *_b("f"), EOS, PAD],
      [BOS, *_b("cde"), EOS, PAD, PAD, PAD]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0],
                                                   [1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 0, 1, 2, 0],
                                                 [0, 1, 2, 3, 4, 0, 0, 0]])
  np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 1, 0, 1, 1, 0],
                                                 [0, 1, 1, 1, 1, 0, 0, 0]])
  s = it.stats()
  assert s["records"] == 3 and s["examples"] == 3 and s["batches"] == 1
  assert s["tokens"] == 12 and s["loss_tokens"] == 9 and s.get("padding_rows", 0) == 0


def _random_docs(n, seed, max_len):
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  return [{"text": "".join(rng.choice(letters, rng.integers(1, max_len)))} for _ in range(n)]


def _expected_chunks(docs, seq_len):
  chunks = collections.Counter()
  for d in docs:
    ids = [BOS, *_b(d["text"]), EOS]
    for s in range(0, len(ids), seq_len):
      chunks[tuple(ids[s:s + seq_len])] += 1
  return chunks


def test_lm_every_token_once_per_epoch_and_long_docs_split():
  seq_len = 32
  docs = _random_docs(60, 0, 90)  # many longer than seq_len
  it = pipeline.lm_pipeline(docs, TOK, batch_size=4, seq_len=seq_len, seed=7)
  batches = list(it)
  for b in batches:
    _check_contract(b, (4, seq_len))
  segs = _segments(batches)
  assert collections.Counter(t for t, _ in segs) == _expected_chunks(docs, seq_len)
  for _, mask in segs:  # every segment: first token is not a target, the rest are
    assert mask == (0.0,) + (1.0,) * (len(mask) - 1)
  total = sum(len(d["text"]) + 2 for d in docs)
  n_long = sum(len(d["text"]) + 2 > seq_len for d in docs)
  s = it.stats()
  assert n_long > 5
  assert s["tokens"] == total and s["records"] == 60
  assert s["split"] == n_long
  assert s["split_chunks"] == sum(-(-(len(d["text"]) + 2) // seq_len) for d in docs
                                  if len(d["text"]) + 2 > seq_len)
  assert s["examples"] == len(segs)
  assert s["batches"] * 4 == s["rows"] == len(batches) * 4


def test_lm_truncate_long_docs_and_drop_remainder_are_counted():
  seq_len = 16
  docs = _random_docs(25, 1, 40)
  it = pipeline.lm_pipeline(docs, TOK, batch_size=4, seq_len=seq_len, long_docs="truncate",
                            drop_remainder=True, seed=3)
  batches = list(it)
  s = it.stats()
  lengths = [len(d["text"]) + 2 for d in docs]
  assert s["truncated"] == sum(n > seq_len for n in lengths) > 0
  assert s["truncated_tokens"] == sum(max(0, n - seq_len) for n in lengths)
  assert "split" not in s
  # Every kept token is emitted or counted as dropped with the short last batch.
  assert s["tokens"] + s["dropped_tokens"] == sum(min(n, seq_len) for n in lengths)
  assert s["dropped_rows"] > 0 and len(batches) == s["batches"]
  for b in batches:
    _check_contract(b, (4, seq_len))


def test_lm_padded_last_batch_keeps_shape():
  it = pipeline.lm_pipeline([{"text": "hello"}], TOK, batch_size=4, seq_len=8)
  (b,) = list(it)
  _check_contract(b, (4, 8))
  assert (b["segment_ids"][1:] == 0).all() and (b["tokens"][1:] == PAD).all()
  assert it.stats()["padding_rows"] == 3


def test_lm_skips_and_counts_empty_and_invalid_documents():
  docs = [{"text": "a"}, {"text": ""}, {"txt": "typo", "_source": "c.jsonl:3"}]
  with pytest.raises(DataError, match="c.jsonl:3: missing field 'text'"):
    list(pipeline.lm_pipeline(docs, TOK, batch_size=1, seq_len=8))
  it = pipeline.lm_pipeline(docs, TOK, batch_size=1, seq_len=8, bad_records="skip")
  list(it)
  s = it.stats()
  assert s["skipped/empty_text"] == 1 and s["skipped/invalid"] == 1 and s["examples"] == 1


# ----------------------------------------------------------------------------- SFT


CONV = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A22"}]
CONV_IDS = [BOS, SYSTEM, *_b("S"), USER, *_b("U1"), ASSISTANT, *_b("A1"), EOS,
            USER, *_b("U2"), ASSISTANT, *_b("A22"), EOS]
CONV_MASK = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]


def test_sft_loss_mask_on_assistant_tokens_and_eos():
  it = pipeline.sft_pipeline([{"messages": CONV}], TOK, batch_size=1, seq_len=24)
  (b,) = list(it)
  _check_contract(b, (1, 24))
  n = len(CONV_IDS)
  np.testing.assert_array_equal(b["tokens"][0], CONV_IDS + [PAD] * (24 - n))
  np.testing.assert_array_equal(b["loss_mask"][0], CONV_MASK + [0] * (24 - n))
  np.testing.assert_array_equal(b["segment_ids"][0], [1] * n + [0] * (24 - n))


def test_sft_packed_rows_and_too_long_policies():
  recs = [{"messages": CONV}, {"prompt": "q", "response": "r"}]
  it = pipeline.sft_pipeline(recs, TOK, batch_size=1, seq_len=32, packed=True, shuffle=False)
  (b,) = list(it)
  _check_contract(b, (1, 32))
  second = [BOS, USER, *_b("q"), ASSISTANT, *_b("r"), EOS]
  n1, n2 = len(CONV_IDS), len(second)
  np.testing.assert_array_equal(b["tokens"][0, :n1 + n2], CONV_IDS + second)
  np.testing.assert_array_equal(b["segment_ids"][0, :n1 + n2], [1] * n1 + [2] * n2)
  np.testing.assert_array_equal(b["loss_mask"][0, :n1 + n2], CONV_MASK + [0, 0, 0, 0, 1, 1])
  assert b["positions"][0, n1] == 0

  # Truncation keeps the first seq_len tokens and counts them.
  it = pipeline.sft_pipeline([{"messages": CONV}], TOK, batch_size=1, seq_len=12)
  (b,) = list(it)
  np.testing.assert_array_equal(b["loss_mask"][0], CONV_MASK[:12])
  assert it.stats()["truncated"] == 1 and it.stats()["truncated_tokens"] == len(CONV_IDS) - 12

  it = pipeline.sft_pipeline([{"messages": CONV}, {"prompt": "q", "response": "r"}], TOK,
                             batch_size=1, seq_len=12, too_long="skip")
  assert len(list(it)) == 1 and it.stats()["skipped/too_long"] == 1

  # Truncated before any assistant token: a prompt too long for seq_len (a bad record).
  with pytest.raises(DataError, match="record 0: no assistant token within the first 6"):
    list(pipeline.sft_pipeline([{"messages": CONV}], TOK, batch_size=1, seq_len=6))


# ----------------------------------------------------------------------------- preference


def test_preference_shares_prompt_and_masks_response_only():
  rec = {"prompt": "hi", "chosen": "good!", "rejected": "no"}
  it = pipeline.preference_pipeline([rec], TOK, batch_size=1, seq_len=16)
  (b,) = list(it)
  assert set(b) == {"chosen", "rejected", "valid", "margin", "chosen_prob", "gold_label", "index",
                    "prompt_len"}
  prompt = [BOS, USER, *_b("hi"), ASSISTANT]
  np.testing.assert_array_equal(b["prompt_len"], [len(prompt)])
  for side, text in (("chosen", "good!"), ("rejected", "no")):
    x = b[side]
    ids = prompt + _b(text) + [EOS]
    n = len(ids)
    np.testing.assert_array_equal(x["tokens"][0], ids + [PAD] * (16 - n))
    np.testing.assert_array_equal(
        x["loss_mask"][0], [0] * len(prompt) + [1] * (len(text) + 1) + [0] * (16 - n))
    np.testing.assert_array_equal(x["positions"][0, :n], np.arange(n))
    assert x["response_len"][0] == len(text) + 1
    assert x["tokens"].dtype == np.int32 and x["loss_mask"].dtype == np.float32
  np.testing.assert_array_equal(b["chosen"]["tokens"][0, :len(prompt)],
                                b["rejected"]["tokens"][0, :len(prompt)])
  np.testing.assert_array_equal(b["valid"], [1.0])


def test_preference_multiturn_prompt_is_not_a_target():
  prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
  rec = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "d"}],
         "rejected": [{"role": "assistant", "content": "e"}]}
  (b,) = list(pipeline.preference_pipeline([rec], TOK, batch_size=1, seq_len=16))
  ids, _ = chat.encode_chat(TOK, prompt + rec["chosen"])
  mask = b["chosen"]["loss_mask"][0]
  assert np.flatnonzero(mask).tolist() == [len(ids) - 2, len(ids) - 1]  # "d" and its eos


BAD_PAIRS = [
    {"prompt": "p", "chosen": "same", "rejected": "same"},  # identical_pair
    {"prompt": "p", "chosen": "", "rejected": "x"},  # empty_response
    {"prompt": "p" * 40, "chosen": "a", "rejected": "b"},  # prompt_too_long at seq_len 16
    {"prompt": "p", "rejected": "b"},  # invalid
]


@pytest.mark.parametrize("i,reason,message", [
    (0, "identical_pair", "chosen and rejected are identical"),
    (1, "empty_response", "a response is empty"),
    (2, "prompt_too_long", "prompt is 43 tokens, too long for max length 16"),
    (3, "invalid", "missing field 'chosen'"),
])
def test_preference_bad_records_error_names_record(i, reason, message):
  good = {"prompt": "p", "chosen": "a", "rejected": "b", "_source": "pairs.jsonl:1"}
  bad = dict(BAD_PAIRS[i], _source="pairs.jsonl:2")
  with pytest.raises(DataError) as e:
    list(pipeline.preference_pipeline([good, bad], TOK, batch_size=1, seq_len=16,
                                      shuffle=False))
  assert str(e.value).startswith(f"pairs.jsonl:2: {message}")
  assert "bad_records='skip'" in str(e.value)


def test_preference_bad_records_skip_counts():
  good = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
  it = pipeline.preference_pipeline(good + BAD_PAIRS, TOK, batch_size=2, seq_len=16,
                                    bad_records="skip")
  batches = list(it)
  s = it.stats()
  for reason in ("identical_pair", "empty_response", "prompt_too_long", "invalid"):
    assert s[f"skipped/{reason}"] == 1, reason
  assert s["records"] == 7 and s["examples"] == 3
  assert sum(b["valid"].sum() for b in batches) == 3 and s["padding_rows"] == 1
  # max_prompt_len: a prompt that fits T but exceeds the limit is too long as well; with every
  # record too long nothing is usable, which stops at once instead of yielding nothing.
  with pytest.raises(DataError, match=r"no usable records .*prompt_too_long 3"):
    pipeline.preference_pipeline(good, TOK, batch_size=1, seq_len=16, max_prompt_len=4,
                                 bad_records="skip")
  it = pipeline.preference_pipeline(good + [{"prompt": "", "chosen": "a", "rejected": "b"}], TOK,
                                    batch_size=1, seq_len=16, max_prompt_len=4,
                                    bad_records="skip")
  assert len(list(it)) == 1 and it.stats()["skipped/prompt_too_long"] == 3


def test_preference_long_response_truncated_and_counted():
  rec = {"prompt": "p", "chosen": "x" * 30, "rejected": "y"}
  it = pipeline.preference_pipeline([rec], TOK, batch_size=1, seq_len=16)
  (b,) = list(it)
  assert b["chosen"]["segment_ids"][0].sum() == 16 and b["chosen"]["response_len"][0] == 12
  s = it.stats()
  # prompt [bos, <|user|>, "p", <|assistant|>] + 30 bytes + eos = 35 tokens
  assert s["truncated"] == 1 and s["truncated_tokens"] == 35 - 16


# ----------------------------------------------------------------------------- unpaired, prompts


def test_unpaired_labels():
  recs = [{"prompt": "p", "completion": "yes", "label": True},
          {"prompt": "p", "completion": "no", "label": False}]
  (b,) = list(pipeline.unpaired_pipeline(recs, TOK, batch_size=2, seq_len=12, shuffle=False))
  np.testing.assert_array_equal(b["label"], [1.0, 0.0])
  assert b["label"].dtype == np.float32
  np.testing.assert_array_equal(b["response_len"], [4, 3])
  np.testing.assert_array_equal(b["loss_mask"].sum(1), [4, 3])


def test_prompts_left_padded_with_records():
  recs = [{"prompt": "hi", "answer": "1"}, {"prompt": "hello", "answer": "2"},
          {"prompt": "x" * 30, "answer": "3"}]
  it = pipeline.prompts_pipeline(recs, TOK, batch_size=2, prompt_len=10, bad_records="skip")
  (arrays, records), = list(it)
  ids0 = chat.encode_prompt(TOK, "hi")
  ids1 = chat.encode_prompt(TOK, "hello")
  np.testing.assert_array_equal(arrays["tokens"][0], [PAD] * (10 - len(ids0)) + ids0)
  np.testing.assert_array_equal(arrays["tokens"][1], [PAD] * (10 - len(ids1)) + ids1)
  np.testing.assert_array_equal(arrays["mask"][0], [False] * 5 + [True] * 5)
  np.testing.assert_array_equal(arrays["positions"][0], [0] * 5 + [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(arrays["prompt_len"], [5, 8])
  assert [r["answer"] for r in records] == ["1", "2"]
  assert it.stats()["skipped/prompt_too_long"] == 1


# ----------------------------------------------------------------------------- resume


def _resume_check(make, ks):
  """For each k: run k batches, checkpoint (through JSON), restore into a fresh iterator;
  the rest must equal the uninterrupted run, and the final stats must match too."""
  full_it = make()
  full = list(full_it)
  for k in ks:
    assert k < len(full)
    it = make()
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    restored = make()
    restored.set_state(state)
    _assert_same_batches(_rest(restored), full[k:])
    assert restored.stats() == full_it.stats()
  return full


def test_lm_packed_resume_mid_epoch_and_across_epochs():
  docs = _random_docs(23, 2, 70)  # some documents split into up to 3 chunks
  make = lambda: pipeline.lm_pipeline(docs, TOK, batch_size=2, seq_len=24,
                                      num_packing_bins=3, seed=5, num_epochs=3)
  full = _resume_check(make, ks=[1, 2, 3, 5, 8, 13, 21, 30, 34])
  it = make()
  seen = [next(it) for _ in range(len(full))]
  assert it.stats()["epoch"] == 2
  # The three epochs are three different orders of the same documents.
  per_epoch = len(_segments(full)) // 3
  first = [t for t, _ in _segments(seen)]
  assert first[:per_epoch] != first[per_epoch:2 * per_epoch]


def _find(state, key):
  if isinstance(state, dict):
    if key in state:
      return state[key]
    for v in state.values():
      found = _find(v, key)
      if found is not None:
        return found
  return None


def test_resume_state_mid_split_document():
  # One long document: its chunks span several batches, so states are taken mid-document.
  docs = [{"text": "x" * 100}, {"text": "short"}]
  make = lambda: pipeline.lm_pipeline(docs, TOK, batch_size=1, seq_len=16,
                                      num_packing_bins=1, shuffle=False, num_epochs=2)
  it = make()
  for _ in range(3):
    next(it)
  assert _find(it.get_state(), "chunk") == 3  # the state really is mid-document
  full = _resume_check(make, ks=[1, 2, 3, 4, 7, 9])
  # 102 tokens -> 6 full chunks + 6 tokens; the 6-token tail and "short" (7) share a row.
  assert len(full) == 2 * 7


def test_preference_resume_across_epochs():
  pairs = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(7)]
  pairs.append({"prompt": "q", "chosen": "same", "rejected": "same"})
  make = lambda: pipeline.preference_pipeline(pairs, TOK, batch_size=3, seq_len=16, seed=1,
                                              num_epochs=3, bad_records="skip")
  full = _resume_check(make, ks=[1, 2, 3, 4, 6])
  assert make().info["kind"] == "preference" and len(full) == 7  # 21 pairs, last batch padded


def test_repeat_forever_keeps_going():
  it = pipeline.lm_pipeline([{"text": "abc"}], TOK, batch_size=2, seq_len=8, num_epochs=None)
  for _ in range(20):
    next(it)
  assert it.stats()["epoch"] > 10


# ----------------------------------------------------------------------------- shards


def test_shards_are_disjoint_and_cover():
  recs = [{"prompt": f"p{i}"} for i in range(11)]
  seen = []
  for shard in range(3):
    it = pipeline.prompts_pipeline(recs, TOK, batch_size=2, prompt_len=8, shuffle=True,
                                   shard_index=shard, shard_count=3, seed=4)
    idx = [int(i) for arrays, _ in it for i in arrays["index"] if i >= 0]
    assert len(idx) == len(set(idx)) and all(i % 3 == shard for i in idx)
    seen.extend(idx)
  assert sorted(seen) == list(range(11))
  with pytest.raises(DataError, match="shard 3 of 4 is empty"):
    pipeline.lm_pipeline([{"text": "a"}] * 3, TOK, batch_size=1, seq_len=8, shard_index=3,
                         shard_count=4)


def test_same_seed_same_order_other_seed_other_order():
  docs = _random_docs(40, 3, 20)
  run = lambda seed: _segments(list(pipeline.lm_pipeline(docs, TOK, batch_size=2, seq_len=32,
                                                         seed=seed)))
  assert run(1) == run(1)
  assert run(1) != run(2)


def test_preference_cut_off_responses_margins_and_gold_labels():
  """A response marked `*_ended: false` gets no <eos>; margins and gold order pass through."""
  tok = ByteTokenizer()
  records = [
      {"prompt": "Q?", "chosen": "yes", "rejected": "no no", "chosen_ended": True,
       "rejected_ended": False, "margin": 0.5, "chosen_gold": 2.0, "rejected_gold": -1.0},
      {"prompt": "Q?", "chosen": "a", "rejected": "b", "chosen_gold": -3.0, "rejected_gold": 1.0},
      {"prompt": "Q?", "chosen": "c", "rejected": "d"},
  ]
  b = next(pipeline.preference_pipeline(records, tok, batch_size=4, seq_len=32, shuffle=False))
  def response(side, row):
    ids, m = b[side]["tokens"][row], b[side]["loss_mask"][row]
    return [int(t) for t, k in zip(ids, m) if k > 0]
  assert response("chosen", 0) == tok.encode("yes") + [tok.eos_id]
  assert response("rejected", 0) == tok.encode("no no")  # cut off: no <eos>, not a target
  assert b["rejected"]["response_len"][0] == 5
  np.testing.assert_array_equal(b["margin"], [0.5, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(b["chosen_prob"], [1.0, 1.0, 1.0, 0.0])  # absent: hard label
  np.testing.assert_array_equal(b["gold_label"], [1.0, 0.0, -1.0, -1.0])  # last row is filler
  np.testing.assert_array_equal(b["valid"], [1, 1, 1, 0])


def test_preference_extra_fields_are_validated():
  from alignax.data.schemas import DataError, validate
  with pytest.raises(DataError, match="'chosen_ended' must be a boolean"):
    validate("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_ended": "yes"})
  with pytest.raises(DataError, match="'margin' must be finite"):
    validate("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")})


def test_plain_chat_template_masks_only_assistant_text():
  tok = ByteTokenizer()
  records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                           {"role": "assistant", "content": "Bye."}]}]
  b = next(pipeline.sft_pipeline(records, tok, batch_size=1, seq_len=96, shuffle=False,
                                 chat_template="plain"))
  ids = [int(t) for t, s in zip(b["tokens"][0], b["segment_ids"][0]) if s]
  assert tok.decode(ids, skip_special=False) == (
      "<bos>System: Be brief.\nUser: Hi?\nAssistant: Hello.<eos>\nUser: Bye?\nAssistant: Bye.<eos>\n")
  targets = [int(t) for t, m in zip(b["tokens"][0], b["loss_mask"][0]) if m > 0]
  assert tok.decode(targets, skip_special=False) == "Hello.<eos>Bye.<eos>"
  arrays, _ = next(pipeline.prompts_pipeline([{"prompt": "Hi?"}], tok, batch_size=1, prompt_len=32,
                                             chat_template="plain"))
  prompt = [int(t) for t, m in zip(arrays["tokens"][0], arrays["mask"][0]) if m]
  assert tok.decode(prompt, skip_special=False) == "<bos>User: Hi?\nAssistant: "
