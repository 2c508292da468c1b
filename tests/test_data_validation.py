"""The validation pass: bad records found before training, counted once, never a hang.

Every test that could spin if the guards regressed runs under a SIGALRM deadline (or in a
subprocess with a timeout), so a regression fails the test instead of hanging the suite.
"""

import contextlib
import json
import os
import logging
import signal
import subprocess
import sys

import pytest

from alignax.data import pipeline, readers, sources, tfds_builders
from alignax.data.config import DataConfig
from alignax.data.schemas import DataError
from alignax.data.tokenizer import ByteTokenizer
from cli_helpers import REPO, SMALL_PRETRAIN, cli_env, metric_rows, run_cli

TOK = ByteTokenizer()
LOADERS = ("memory", "tfds")


def _pair(i):
  return {"prompt": f"Question {i}?", "chosen": f"Polite answer {i}.", "rejected": f"rude {i}!!"}


IDENTICAL = {"prompt": "Same?", "chosen": "identical", "rejected": "identical"}
EMPTY = {"prompt": "Empty?", "chosen": "", "rejected": "no"}
LONG_PROMPT = {"prompt": "long " * 40, "chosen": "a", "rejected": "b"}


def _write(path, lines):
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                          for line in lines))
  return str(path)


def _mixed(tmp_path, invalid=False):
  """8 good pairs with an identical pair at line 3, an empty response at 6, a long prompt at 9
  (and, with `invalid`, a line missing 'chosen' at 11)."""
  lines = [_pair(0), _pair(1), IDENTICAL, _pair(2), _pair(3), EMPTY, _pair(4), _pair(5),
           LONG_PROMPT, _pair(6)]
  if invalid:
    lines.append({"prompt": "broken", "rejected": "x"})
  lines.append(_pair(7))
  return _write(tmp_path / "prefs.jsonl", lines)


def _cfg(tmp_path, train_files, *, loader, bad_records="error", eval_files="", eval_records=0):
  return DataConfig.from_mapping({
      "source": "files", "train_files": train_files, "eval_files": eval_files,
      "bad_records": bad_records, "loader": loader, "tfds_dir": str(tmp_path / "tfds"),
      "eval_records": eval_records, "text_mode": "lines"})


@contextlib.contextmanager
def deadline(seconds):
  """Raises TimeoutError in the main thread after `seconds` (the pipelines are Python loops, so
  the alarm's handler runs even inside one that spins)."""
  def expired(signum, frame):
    raise TimeoutError(f"still running after {seconds} s: the pipeline spins")
  old = signal.signal(signal.SIGALRM, expired)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- bad_records="error"


@pytest.mark.parametrize("loader", LOADERS)
def test_error_lists_every_kind_with_file_and_line_when_the_pipeline_is_built(tmp_path, loader):
  path = _mixed(tmp_path)
  train = sources.split_sources(_cfg(tmp_path, path, loader=loader), "preference")["train"]
  with pytest.raises(DataError) as e:  # raised by the constructor: no batch, no compile
    pipeline.preference_pipeline(train, TOK, batch_size=2, seq_len=64, num_epochs=None)
  lines = str(e.value).splitlines()
  assert lines[0] == f"{path}:3: chosen and rejected are identical"
  assert lines[1] == f"{path}:6: a response is empty"
  assert lines[2].startswith(f"{path}:9: prompt is ") and "too long for max length 64" in lines[2]
  assert ("3 bad records of 11" in lines[3] and "identical_pair 1, empty_response 1, "
          "prompt_too_long 1" in lines[3] and "bad_records='skip'" in lines[3])


def test_error_on_eval_records_and_other_pipelines(tmp_path):
  # The eval split is validated when its pipeline is built, like the training split.
  train = _write(tmp_path / "train.jsonl", [_pair(i) for i in range(4)])
  evals = _write(tmp_path / "eval.jsonl", [_pair(9), IDENTICAL])
  splits = sources.split_sources(_cfg(tmp_path, train, loader="memory", eval_files=evals),
                                 "preference")
  pipeline.preference_pipeline(splits["train"], TOK, batch_size=2, seq_len=64)
  with pytest.raises(DataError, match=rf"{evals}:2: chosen and rejected are identical"):
    pipeline.preference_pipeline(splits["eval"], TOK, batch_size=2, seq_len=64, shuffle=False)
  # Empty texts (pretraining), prompts too long for the SFT seq_len or the RL prompt_len.
  texts = readers.read_records(_write(tmp_path / "c.jsonl", [{"text": "a"}, {"text": " "}]), "text")
  with pytest.raises(DataError, match=r"c\.jsonl:2: the text is empty"):
    pipeline.lm_pipeline(texts, TOK, batch_size=1, seq_len=8)
  sft = [{"prompt": "p" * 30, "response": "r"}, {"prompt": "q", "response": "r"}]
  with pytest.raises(DataError, match="record 0: no assistant token within the first 16"):
    pipeline.sft_pipeline(sft, TOK, batch_size=1, seq_len=16)
  with pytest.raises(DataError, match="record 1: prompt is 33 tokens, longer than prompt_len 16"):
    pipeline.prompts_pipeline([{"prompt": "ok"}, {"prompt": "x" * 30}], TOK, batch_size=1,
                              prompt_len=16)


def test_error_message_caps_the_listing(tmp_path):
  recs = [dict(IDENTICAL, _source=f"p.jsonl:{i + 1}") for i in range(9)] + [_pair(0)]
  with pytest.raises(DataError) as e:
    pipeline.preference_pipeline(recs, TOK, batch_size=2, seq_len=64)
  lines = str(e.value).splitlines()
  assert len(lines) == 6 and lines[4].startswith("p.jsonl:5: ")
  assert "9 bad records of 10 in p.jsonl: identical_pair 9, the first 5 shown" in lines[5]


# ----------------------------------------------------------------------------- bad_records="skip"


@pytest.mark.parametrize("loader", LOADERS)
def test_skip_counts_distinct_records_over_epochs(tmp_path, loader, caplog):
  path = _mixed(tmp_path, invalid=True)  # 12 lines: 8 good, 3 bad, 1 invalid (left out on read)
  cfg = _cfg(tmp_path, path, loader=loader, bad_records="skip")
  train = sources.split_sources(cfg, "preference")["train"]
  with caplog.at_level(logging.WARNING), deadline(20):
    it = pipeline.preference_pipeline(train, TOK, batch_size=2, seq_len=64, num_epochs=None,
                                      bad_records="skip")
    expected = {"skipped/identical_pair": 1, "skipped/empty_response": 1,
                "skipped/prompt_too_long": 1, "skipped/invalid": 1, "usable_records": 8}
    first = it.stats()
    assert {k: first.get(k) for k in expected} == expected  # known before the first batch
    batches = [next(it) for _ in range(20)]  # 40 pairs: 5 epochs of the 8 usable ones
  s = it.stats()
  assert s["epoch"] >= 3 and {k: s[k] for k in expected} == expected
  assert sum(b["valid"].sum() for b in batches) == 40
  # One warning line per reason, each naming the first bad record's file:line.
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: skipping")]
  assert len(lines) == 4
  assert any("as invalid" in m and f"{path}:11: missing field 'chosen'" in m for m in lines)
  assert any("as identical_pair" in m and f"{path}:3:" in m for m in lines)
  # Resuming keeps the same counts (they are not part of the checkpointed state).
  restored = pipeline.preference_pipeline(train, TOK, batch_size=2, seq_len=64,
                                          num_epochs=None, bad_records="skip")
  restored.set_state(json.loads(json.dumps(it.get_state())))
  assert restored.stats() == s


def test_tfds_keeps_read_counts_when_the_dataset_is_reused(tmp_path):
  path = _mixed(tmp_path, invalid=True)
  files = {"train": path}
  first = tfds_builders.files_sources(str(tmp_path / "tfds"), "preference", files,
                                      bad_records="skip")["train"]
  again = tfds_builders.files_sources(str(tmp_path / "tfds"), "preference", files,
                                      bad_records="skip")["train"]  # prepared: read back
  for src in (first, again):
    assert len(src) == 11 and src.counts["invalid"] == 1
    assert src.problems == [f"{path}:11: missing field 'chosen'"]


# ----------------------------------------------------------------------------- nothing usable


@pytest.mark.parametrize("loader", LOADERS)
def test_all_bad_raises_naming_the_files(tmp_path, loader):
  path = _write(tmp_path / "same.jsonl", [dict(IDENTICAL, prompt=f"q{i}") for i in range(6)])
  cfg = _cfg(tmp_path, path, loader=loader, bad_records="skip", eval_records=2)
  splits = sources.split_sources(cfg, "preference")
  with deadline(20), pytest.raises(DataError, match=rf"no usable records in {path}: all 4 "
                                                    r"records would be skipped \(identical_pair 4"):
    pipeline.preference_pipeline(splits["train"], TOK, batch_size=2, seq_len=64,
                                 num_epochs=None, bad_records="skip")


def test_all_invalid_files_raise_when_read(tmp_path):
  path = _write(tmp_path / "junk.jsonl", ['{"prompt": 1}', "not json"])
  for loader in LOADERS:
    cfg = _cfg(tmp_path, path, loader=loader, bad_records="skip")
    with pytest.raises(DataError, match=rf"{path}: no usable records: all 2 records are invalid"):
      sources.split_sources(cfg, "preference")


def test_a_shard_with_nothing_usable_raises_on_every_process():
  recs = [_pair(0), IDENTICAL, _pair(2), IDENTICAL]  # shard 1 of 2 holds only the bad ones
  for shard in (0, 1):  # shard 0 is fine, but must stop with its peer
    with pytest.raises(DataError, match="shard 1 of 2 has no usable records"):
      pipeline.preference_pipeline(recs, TOK, batch_size=1, seq_len=64, bad_records="skip",
                                   shard_index=shard, shard_count=2)


class _GoesBad:
  """Good records for the validation pass, identical pairs afterwards (a source that changes
  under the pipeline): only the iterator's own guard can stop the spin."""

  def __init__(self, n):
    self.n, self.reads = n, 0

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.reads += 1
    return _pair(i) if self.reads <= self.n else dict(IDENTICAL, _source=f"gone.jsonl:{i + 1}")


def test_an_epoch_without_a_usable_record_raises_instead_of_spinning():
  it = pipeline.preference_pipeline(_GoesBad(5), TOK, batch_size=2, seq_len=64,
                                    num_epochs=None, bad_records="skip")
  with deadline(20), pytest.raises(DataError, match=r"an epoch of 5 records gave no usable "
                                                    r"record \(the last: gone\.jsonl:\d+"):
    next(it)


def test_all_bad_never_hangs_a_process():
  """The reported hang, without a model: a repeating pipeline over only-identical pairs under
  skip, in a subprocess that is killed after 30 s if it spins."""
  code = ("from alignax.data import pipeline\n"
          "from alignax.data.tokenizer import ByteTokenizer\n"
          "recs = [{'prompt': f'q{i}', 'chosen': 's', 'rejected': 's', '_source': f'x.jsonl:{i+1}'}"
          " for i in range(8)]\n"
          "it = pipeline.preference_pipeline(recs, ByteTokenizer(), batch_size=2, seq_len=32,"
          " num_epochs=None, bad_records='skip')\n"
          "next(it)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True,
                        text=True, timeout=30)
  assert proc.returncode == 1 and "DataError: no usable records in x.jsonl" in proc.stderr


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize("loader", LOADERS)
def test_a_directory_says_so(tmp_path, loader):
  folder = tmp_path / "data"
  folder.mkdir()
  _write(folder / "a.jsonl", [_pair(0)])
  with pytest.raises(DataError, match=rf"{folder}: is a directory, expected a data file .*"
                                      rf"{folder}/\*\.jsonl"):
    sources.split_sources(_cfg(tmp_path, str(folder), loader=loader), "preference")
  missing = tmp_path / "nope.jsonl"
  with pytest.raises(DataError, match=rf"{missing}: file not found"):
    sources.split_sources(_cfg(tmp_path, str(missing), loader=loader), "preference")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_dpo_with_only_identical_pairs_stops_at_once(tmp_path):
  """`alignax train` (DPO, files, bad_records=skip) on pairs that are all identical: exits 1
  with the file named, in seconds, instead of looping forever."""
  base = str(tmp_path / "pt")
  run_cli(*SMALL_PRETRAIN, "--config.train.steps=1", f"--config.workdir={base}")
  data = _write(tmp_path / "same.jsonl", [dict(IDENTICAL, prompt=f"q{i}") for i in range(8)])
  proc = run_cli("train", "--config=configs/dpo.py:tiny", "--config.data.source=files",
                 f"--config.data.train_files={data}", "--config.data.bad_records=skip",
                 f"--config.init.workdir={base}", f"--config.workdir={tmp_path / 'dpo'}",
                 "--config.train.steps=3", "--config.train.batch_size=4",
                 "--config.data.seq_len=64", "--config.train.progress=False",
                 "--config.eval.num_prompts=0", "--config.data.eval_records=2",
                 check=False, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert f"no usable records in {data}" in proc.stderr
  assert "alignax: warning: data: skipping 6 of 6 records as identical_pair" in proc.stderr
  assert not metric_rows(str(tmp_path / "dpo"))


def test_building_a_tfds_dataset_leaves_no_temporary_directory(tmp_path):
  import glob
  import tempfile
  from alignax.data import tfds_builders
  data = tmp_path / "prefs.jsonl"
  data.write_text(json.dumps({"prompt": "p?", "chosen": "yes", "rejected": "no"}) + "\n")
  before = set(glob.glob(os.path.join(tempfile.gettempdir(), "*tfds*")))
  tfds_builders.build_files_dataset(str(tmp_path / "tfds"), "preference", {"train": str(data)})
  assert set(glob.glob(os.path.join(tempfile.gettempdir(), "*tfds*"))) == before


def test_a_margin_beyond_float32_is_refused():
  from alignax.data import schemas
  with pytest.raises(schemas.DataError, match="margin.*beyond float32"):
    schemas.validate("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e39})
