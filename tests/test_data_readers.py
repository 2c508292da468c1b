"""Record schemas and file readers: normalization, errors that name file and line, skip counts."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignax.data import readers, schemas
from alignax.data.schemas import DataError


def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


# ----------------------------------------------------------------------------- schemas


def test_sft_forms_normalize_to_messages():
  a = schemas.validate_sft({"prompt": "hi", "response": "yo"})
  b = schemas.validate_sft({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "yo"}]})
  assert a == b == {"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "yo"}]}
  assert schemas.validate_sft(a) == a  # idempotent
  with pytest.raises(DataError, match="missing field 'response'"):
    schemas.validate_sft({"prompt": "hi"})
  with pytest.raises(DataError, match="no assistant message"):
    schemas.validate_sft({"messages": [{"role": "user", "content": "hi"}]})
  with pytest.raises(DataError, match="message 1 has role 'bot'"):
    schemas.validate_sft({"messages": [{"role": "user", "content": "hi"},
                                       {"role": "bot", "content": "yo"}]})


def test_preference_forms():
  s = schemas.validate_preference({"prompt": "p", "chosen": "good", "rejected": "bad"})
  assert s["prompt"] == [{"role": "user", "content": "p"}]
  assert s["chosen"] == [{"role": "assistant", "content": "good"}]
  # Conversational without a prompt: the shared leading messages become the prompt.
  u = {"role": "user", "content": "p"}
  conv = schemas.validate_preference({
      "chosen": [u, {"role": "assistant", "content": "good"}],
      "rejected": [u, {"role": "assistant", "content": "bad"}]})
  assert conv["prompt"] == [u] and conv["chosen"] == s["chosen"]
  assert schemas.validate_preference(conv) == conv
  with pytest.raises(DataError, match="must end with an assistant message"):
    schemas.validate_preference({"prompt": [u], "chosen": [u], "rejected": "x"})
  with pytest.raises(DataError, match="missing field 'chosen'"):
    schemas.validate_preference({"prompt": "p", "rejected": "x"})


def test_unpaired_and_prompts():
  r = schemas.validate_unpaired({"prompt": "p", "completion": "c", "label": 1})
  assert r["label"] is True and r["completion"][0]["role"] == "assistant"
  with pytest.raises(DataError, match="'label' must be a boolean"):
    schemas.validate_unpaired({"prompt": "p", "completion": "c", "label": "yes"})
  p = schemas.validate_prompts({"prompt": "2+2?", "answer": "4", "heldout": False})
  assert p == {"prompt": "2+2?", "answer": "4", "heldout": False}
  with pytest.raises(DataError, match="'prompt' is empty"):
    schemas.validate_prompts({"prompt": "  "})


def test_record_issues():
  same = schemas.validate_preference({"prompt": "p", "chosen": "a", "rejected": "a"})
  assert schemas.record_issue("preference", same) == schemas.IDENTICAL_PAIR
  empty = schemas.validate_preference({"prompt": "p", "chosen": " ", "rejected": "a"})
  assert schemas.record_issue("preference", empty) == schemas.EMPTY_RESPONSE
  ok = schemas.validate_preference({"prompt": "p", "chosen": "b", "rejected": "a"})
  assert schemas.record_issue("preference", ok) is None
  assert schemas.record_issue("sft", schemas.validate_sft(
      {"prompt": "p", "response": ""})) == schemas.EMPTY_RESPONSE


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_bad_record_names_file_and_line(tmp_path):
  path = _write_lines(tmp_path / "sft.jsonl", [
      json.dumps({"prompt": "a", "response": "b"}),
      "",
      json.dumps({"prompt": "c"}),
      json.dumps({"prompt": "d", "response": "e"}),
  ])
  with pytest.raises(DataError) as e:
    readers.read_jsonl(path, "sft")
  assert str(e.value) == f"{path}:3: missing field 'response'"

  recs = readers.read_jsonl(path, "sft", bad_records="skip")
  assert len(recs) == 2
  assert recs.counts == {"records": 2, "invalid": 1, "blank_lines": 1}
  assert recs.problems == [f"{path}:3: missing field 'response'"]
  assert recs[1]["_source"] == f"{path}:4"


def test_jsonl_invalid_json_and_non_object(tmp_path):
  path = _write_lines(tmp_path / "x.jsonl", ['{"text": "ok"}', '{"text": "broken', '[1, 2]'])
  with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
    readers.read_jsonl(path, "text")
  recs = readers.read_jsonl(path, "text", bad_records="skip")
  assert [r["text"] for r in recs] == ["ok"] and recs.counts["invalid"] == 2
  assert "x.jsonl:3: a record must be a JSON object" in recs.problems[1]


def test_missing_empty_and_non_utf8_files(tmp_path):
  with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
    readers.read_jsonl(str(tmp_path / "nope.jsonl"), "text")
  (tmp_path / "empty.jsonl").write_bytes(b"")
  with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
    readers.read_jsonl(str(tmp_path / "empty.jsonl"), "text")
  (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
  with pytest.raises(DataError, match="contains no records"):
    readers.read_jsonl(str(tmp_path / "blank.jsonl"), "text")

  bad = tmp_path / "latin1.jsonl"
  bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(DataError) as e:
    readers.read_jsonl(str(bad), "text")
  # Line 2 starts at byte offset 17; the bad byte is at offset 13 within it.
  assert str(e.value) == f"{bad}:2: not valid UTF-8 (byte offset 13 in the line, 30 in the file)"

  txt = tmp_path / "doc.txt"
  txt.write_bytes(b"line one\nline \xff two\n")
  with pytest.raises(DataError, match=r"doc\.txt:2: not valid UTF-8"):
    readers.read_text(str(txt), mode="file")
  with pytest.raises(DataError, match=r"doc\.txt:2: not valid UTF-8"):
    readers.read_text(str(txt), mode="lines")
  skipped = readers.read_text(str(txt), mode="lines", bad_records="skip")
  assert [r["text"] for r in skipped] == ["line one"] and skipped.counts["invalid"] == 1


def test_text_modes(tmp_path):
  path = _write_lines(tmp_path / "c.txt", ["first doc", "", "second doc"])
  lines = readers.read_text(path, mode="lines")
  assert [r["text"] for r in lines] == ["first doc", "second doc"]
  assert lines.counts["blank_lines"] == 1
  whole = readers.read_text(path, mode="file")
  assert len(whole) == 1 and whole[0]["text"] == "first doc\n\nsecond doc\n"


# ----------------------------------------------------------------------------- Parquet


def test_parquet_reader_names_rows(tmp_path):
  path = str(tmp_path / "pairs.parquet")
  pq.write_table(pa.table({"prompt": ["p0", "p1", "p2"], "chosen": ["a", None, "c"],
                           "rejected": ["x", "y", "z"]}), path)
  with pytest.raises(DataError) as e:
    readers.read_parquet(path, "preference")
  assert str(e.value) == f"{path}: row 1: field 'chosen' is null"
  recs = readers.read_parquet(path, "preference", bad_records="skip")
  assert [r["prompt"][0]["content"] for r in recs] == ["p0", "p2"]
  assert recs.counts["invalid"] == 1 and recs[1]["_source"] == f"{path}: row 2"

  junk = tmp_path / "junk.parquet"
  junk.write_bytes(b"this is not parquet")
  with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
    readers.read_parquet(str(junk), "text")


def test_read_records_dispatch_and_globs(tmp_path):
  _write_lines(tmp_path / "a.jsonl", [json.dumps({"text": "one"})])
  pq.write_table(pa.table({"text": ["two", "three"]}), str(tmp_path / "b.parquet"))
  recs = readers.read_records(str(tmp_path / "*.*"), "text")
  assert [r["text"] for r in recs] == ["one", "two", "three"]
  assert recs.counts["records"] == 3
  with pytest.raises(DataError, match="no files match"):
    readers.read_records(str(tmp_path / "*.csv"), "text")
  with pytest.raises(DataError, match="unknown file type"):
    (tmp_path / "c.csv").write_text("x")
    readers.read_records(str(tmp_path / "c.csv"), "text")


# ----------------------------------------------------------------------------- the ecosystem's formats

USER, BOT = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}


def test_trl_prompt_completion_forms_are_sft_records():
  """TRL's standard and conversational prompt-completion records read as SFT conversations."""
  plain = schemas.validate("sft", {"prompt": "What is 2+2?", "completion": "4."})
  chat = schemas.validate("sft", {"prompt": [USER], "completion": [BOT]})
  assert plain["messages"] == chat["messages"] == [USER, BOT]
  with pytest.raises(DataError, match="field 'completion' must end with an assistant message"):
    schemas.validate("sft", {"prompt": [USER], "completion": [USER]})
  with pytest.raises(DataError, match=r"unpaired \(KTO\) data, not SFT"):
    schemas.validate("sft", {"prompt": "q", "completion": "a", "label": False})


def _save_to_disk(folder, rows_per_file):
  """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards and state.json."""
  folder.mkdir()
  names = []
  for k, rows in enumerate(rows_per_file):
    name = f"data-{k:05d}-of-{len(rows_per_file):05d}.arrow"
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
    names.append(name)
  (folder / "state.json").write_text(json.dumps(
      {"_data_files": [{"filename": n} for n in names], "_fingerprint": "x", "_split": "train"}))
  (folder / "dataset_info.json").write_text("{}")


def test_datasets_folders_and_parquet_shards(tmp_path):
  """A save_to_disk folder (TRL's conversational preference form, implicit prompt) and a folder of
  Parquet shards read in order, with per-row errors naming the shard; a DatasetDict folder asks
  for a split."""
  pairs = [{"chosen": [USER, {"role": "assistant", "content": f"good {i}"}],
            "rejected": [USER, {"role": "assistant", "content": f"bad {i}"}]} for i in range(5)]
  _save_to_disk(tmp_path / "prefs", [pairs[:3], pairs[3:]])
  records = readers.read_records(str(tmp_path / "prefs"), "preference")
  assert [r["chosen"][0]["content"] for r in records] == [f"good {i}" for i in range(5)]
  assert records[0]["prompt"] == [USER] and records.counts["records"] == 5
  assert records[4]["_source"].endswith("data-00001-of-00002.arrow: row 1")

  shards = tmp_path / "sft"
  shards.mkdir()
  for k in range(2):
    pq.write_table(pa.Table.from_pylist([{"prompt": f"q{k}{i}", "completion": f"a{k}{i}"} for i in range(2)]),
                   str(shards / f"train-{k:05d}.parquet"))
  records = readers.read_records(str(shards), "sft")
  assert [r["messages"][1]["content"] for r in records] == ["a00", "a01", "a10", "a11"]

  bad = tmp_path / "bad"
  _save_to_disk(bad, [[{"prompt": "q", "completion": "a"}, {"prompt": "q"}]])
  with pytest.raises(DataError, match=r"data-00000-of-00001.arrow: row 1: field 'completion' must be a string"):
    readers.read_records(str(bad), "sft")
  skipped = readers.read_records(str(bad), "sft", bad_records="skip")
  assert len(skipped) == 1 and skipped.counts["invalid"] == 1

  (tmp_path / "dd").mkdir()
  (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
  for split in ("train", "test"):
    (tmp_path / "dd" / split).mkdir()
  with pytest.raises(DataError, match=r"a datasets.DatasetDict folder \(splits: test, train\); give one "
                                      r"split's folder"):
    readers.read_records(str(tmp_path / "dd"), "sft")


def test_arrow_file_format_and_unreadable_files(tmp_path):
  """The random-access Arrow format reads too; a file that is neither format says so."""
  table = pa.Table.from_pylist([{"text": "one"}, {"text": "two"}])
  with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
    w.write_table(table)
  assert [r["text"] for r in readers.read_records(str(tmp_path / "a.arrow"), "text")] == ["one", "two"]
  (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
  with pytest.raises(DataError, match=r"junk.arrow: not a readable Arrow file"):
    readers.read_records(str(tmp_path / "junk.arrow"), "text")
