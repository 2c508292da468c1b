"""TFDS builders: build offline into tmp_path (array_record, no TensorFlow), read back via grain."""

import json
import sys

import grain
import pytest

from alignax.data import pipeline, tfds_builders
from alignax.data.schemas import DataError
from alignax.data.tokenizer import ByteTokenizer

CALLS = []


def fake_splits(seed):
  """A small stand-in for `World.splits()` with every split kind."""
  CALLS.append(seed)
  return {
      "pretrain_train": [{"text": f"world {seed} doc {i} ✓"} for i in range(12)],
      "sft_train": [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)],
      "preference_train": [{"prompt": "p", "chosen": f"good {i}", "rejected": f"bad {i}"}
                           for i in range(4)],
      "prompts_eval": [{"prompt": f"what is {i}+{i}?", "kind": "arith", "category": "math",
                        "answer": str(2 * i), "heldout": i % 2 == 0} for i in range(3)],
  }


def test_world_builder_roundtrip_and_seeds(tmp_path):
  CALLS.clear()
  data_dir = str(tmp_path)
  src = tfds_builders.world_sources(data_dir, 3, fake_splits)
  expected = fake_splits(3)
  assert set(src) == set(expected)
  for split, records in expected.items():
    # Same records, same order, through grain's MapDataset.source.
    assert list(grain.MapDataset.source(src[split])) == records
  assert (tmp_path / "alignax_world" / "seed_3" / "1.0.0").is_dir()
  assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)

  # Another seed gets its own directory; the first is reused without regenerating.
  other = tfds_builders.world_sources(data_dir, 4, fake_splits)
  assert other["pretrain_train"][0]["text"].startswith("world 4")
  CALLS.clear()
  again = tfds_builders.world_sources(data_dir, 3)  # no splits_fn needed once prepared
  assert CALLS == [] and again["pretrain_train"][0]["text"].startswith("world 3")

  # Straight into a pipeline, with the extra prompt fields back on the host.
  it = pipeline.prompts_pipeline(src["prompts_eval"], ByteTokenizer(), batch_size=4,
                                 prompt_len=32)
  (arrays, records), = list(it)
  assert [r["answer"] for r in records[:3]] == ["0", "2", "4"] and records[3] is None


def test_world_builder_rejects_bad_records(tmp_path):
  def bad(seed):
    return {"sft_train": [{"prompt": "q", "response": "a"}, {"prompt": "q"}]}
  with pytest.raises(DataError, match="world split 'sft_train' record 1: missing field"):
    tfds_builders.world_sources(str(tmp_path), 0, bad)
  with pytest.raises(DataError, match="no splits_fn"):
    tfds_builders.world_sources(str(tmp_path), 99)


def test_files_builder_roundtrip(tmp_path):
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"r{i}"}) + "\n"
                           for i in range(6)))
  evals = tmp_path / "eval.jsonl"
  evals.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                            {"role": "assistant", "content": "y"}]}) + "\n")
  files = {"train": str(train), "eval": [str(evals)]}
  src = tfds_builders.files_sources(str(tmp_path / "tfds"), "sft", files)
  got = list(grain.MapDataset.source(src["train"]))
  assert len(got) == 6 and got[2]["messages"][1]["content"] == "r2"
  assert got[2]["_source"] == f"{train}:3"
  assert src["eval"][0]["messages"][0] == {"role": "user", "content": "x"}
  it = pipeline.sft_pipeline(src["train"], ByteTokenizer(), batch_size=2, seq_len=16)
  assert len(list(it)) == 3 and it.stats()["records"] == 6

  # A changed file gets a new fingerprint, so a stale build is never reused.
  before = tfds_builders.local_files_config("sft", files).name
  train.write_text(json.dumps({"prompt": "new", "response": "data"}) + "\n")
  after = tfds_builders.local_files_config("sft", files).name
  assert before != after
  assert len(tfds_builders.files_sources(str(tmp_path / "tfds"), "sft", files)["train"]) == 1

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "q"}\n')
  with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'response'"):
    tfds_builders.files_sources(str(tmp_path / "tfds"), "sft", {"train": str(bad)})


_CONCURRENT_BUILD = """
import os, sys, time
from alignax.data import tfds_builders
data_dir, counter = sys.argv[1], sys.argv[2]
def splits(seed):
  with open(counter, "a") as f:
    f.write(f"{os.getpid()}\\n")
  time.sleep(1.0)  # keep the build open while the others arrive
  return {"sft_train": [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(7)]}
src = tfds_builders.world_sources(data_dir, 5, splits)
print(len(src["sft_train"]))
"""


def test_processes_building_one_dataset_at_once_build_it_once(tmp_path):
  """Runs started together (a sweep's processes) wait for one build instead of racing it."""
  import subprocess
  counter = tmp_path / "builds.txt"
  procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_BUILD, str(tmp_path / "data"), str(counter)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == "7"
  assert len(counter.read_text().splitlines()) == 1
