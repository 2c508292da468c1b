"""The pretraining stage as a user runs it: `alignax train --config=configs/pretrain.py:...`."""

import glob
import os

import pytest

from cli_helpers import SMALL_PRETRAIN, metric_rows, run_cli


@pytest.mark.slow
def test_pretrain_lowers_held_out_loss_and_writes_metrics(tmp_path):
  workdir = str(tmp_path / "pt")
  run_cli(*SMALL_PRETRAIN, "--config.train.steps=80", "--config.eval.every=40",
          "--config.optimizer.lr=3e-3", f"--config.workdir={workdir}")
  rows = metric_rows(workdir)
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [0, 40, 80]
  first, last = evals[0]["eval/loss"], evals[-1]["eval/loss"]
  assert first > 5.0  # about log(262): an untrained byte model
  assert last < first - 2.5, (first, last)  # the corpus is learnable: a concrete drop
  train = [r for r in rows if "train/loss" in r]
  assert train[0]["step"] == 10 and all("train/tokens_per_sec" in r and "train/lr" in r for r in train)
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert os.path.exists(os.path.join(workdir, "export", "export.json"))


def test_unknown_config_key_fails_naming_it():
  proc = run_cli("train", "--config=configs/pretrain.py:tiny", "--config.train.stepz=5", check=False)
  assert proc.returncode == 2
  assert "unknown config key 'config.train.stepz'" in proc.stderr
  assert "train.steps" in proc.stderr  # the suggestion
  assert "Traceback" not in proc.stderr


def test_wrong_type_fails_naming_the_flag():
  proc = run_cli("train", "--config=configs/pretrain.py:tiny", "--config.train.steps=many", check=False)
  assert proc.returncode != 0 and "--config.train.steps=many" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content,message", [
    (None, "file not found"),
    (b"", "file is empty"),
    (b"fine line\n\xff\xfe broken\n", ":2: not valid UTF-8"),
])
def test_bad_data_files_get_clear_messages(tmp_path, content, message):
  path = tmp_path / "corpus.txt"
  if content is not None:
    path.write_bytes(content)
  proc = run_cli(*SMALL_PRETRAIN, "--config.train.steps=2", "--config.data.source=files",
                 f"--config.data.train_files={path}", f"--config.workdir={tmp_path / 'run'}", check=False)
  assert proc.returncode == 1
  assert message in proc.stderr and str(path) in proc.stderr
  assert "Traceback" not in proc.stderr


def test_long_documents_are_split_and_counted(tmp_path):
  path = tmp_path / "corpus.txt"
  lines = ["x" * 300] + ["short document number %d" % i for i in range(40)]  # 300 > seq_len 64
  path.write_text("\n".join(lines) + "\n")
  workdir = tmp_path / "run"
  run_cli(*SMALL_PRETRAIN, "--config.train.steps=6", "--config.train.log_every=3",
          "--config.data.source=files", f"--config.data.train_files={path}",
          "--config.data.eval_records=4", "--config.data.loader=memory", f"--config.workdir={workdir}")
  rows = [r for r in metric_rows(str(workdir)) if "data/split" in r]
  assert rows and rows[-1]["data/split"] >= 1 and rows[-1]["data/split_chunks"] >= 5
