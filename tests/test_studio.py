"""alignax studio: the server's endpoints with Flask's test client over tiny random exports (the
compare and label flows, the preference file and its schema, the reward signal, bad input), and
the command's start-up errors."""

import json
import os

import pytest

from alignax import checkpoint as ckpt_lib
from alignax.data import schemas
from alignax.models import build_lm, llama_style
from alignax.studio import labels as labels_lib
from alignax.studio.app import create_app
from alignax.studio.models import ModelHub, Settings, StudioError
from alignax.studio.server import check_port, parse_models
from cli_helpers import run_cli

PROMPTS = [{"prompt": "What is the capital of France?", "kind": "fact"},
           {"prompt": "What sound does a cow make?", "kind": "fact"},
           {"prompt": "How do I pick a lock?", "kind": "harmful"}]


def make_runs(root, stages=("pretrain", "sft", "dpo")):
  """Pipeline-shaped run dirs whose exports are tiny random byte-level models."""
  model = llama_style(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                      max_seq_len=192)
  for i, stage in enumerate(stages):
    _, params = build_lm(model, seed=i)
    ckpt_lib.save_export(os.path.join(root, stage), params, model=model, stage=stage, tokenizer="bytes")
  return str(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return make_runs(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture
def client(runs, tmp_path):
  hub = ModelHub(parse_models(runs, []))
  store = labels_lib.LabelStore(str(tmp_path / "labels.jsonl"))
  app = create_app(hub, store, PROMPTS, rater="tester", seed=3)
  app.testing = True
  return app.test_client(), store


def test_models_are_found_in_a_pipeline_dir_named_as_in_the_report(runs):
  assert parse_models(runs, []) == {"base": os.path.join(runs, "pretrain"), "sft": os.path.join(runs, "sft"),
                                    "dpo": os.path.join(runs, "dpo")}
  assert parse_models(runs, ["mine=/x"]) == {"mine": "/x"}


def test_pages_render(client):
  c, _ = client
  for path, marker in (("/", b'id="answer"'), ("/label", b'id="pick-a"'), ("/signal", b'id="signal-chart"')):
    r = c.get(path)
    assert r.status_code == 200 and marker in r.data
  assert b'"base", "sft", "dpo"' in c.get("/").data


def test_compare_answers_every_model_with_gold_scores(client):
  c, _ = client
  r = c.post("/api/answer", json={"prompt": "What is the capital of France?", "max_new_tokens": 8})
  data = r.get_json()
  assert r.status_code == 200 and list(data["results"]) == ["base", "sft", "dpo"]
  for name, result in data["results"].items():
    (answer,) = result["answers"]
    assert isinstance(answer["text"], str) and -5 < answer["score"] < 5
    assert answer["tokens"] <= 8
  # Greedy is deterministic; sampled answers follow the seed; several samples on request.
  again = c.post("/api/answer", json={"prompt": "What is the capital of France?", "max_new_tokens": 8}).get_json()
  assert again["results"] == data["results"]
  many = c.post("/api/answer", json={"prompt": "Hi", "models": ["sft"], "temperature": 1.0, "num_samples": 3,
                                     "max_new_tokens": 8}).get_json()
  assert len(many["results"]["sft"]["answers"]) == 3


def test_prompt_search(client):
  c, _ = client
  data = c.get("/api/prompts?q=cow").get_json()
  assert [p["prompt"] for p in data["prompts"]] == ["What sound does a cow make?"]
  assert c.get("/api/prompts").get_json()["total"] == 3


@pytest.mark.parametrize("body, message", [
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": "x", "temperature": "hot"}, "temperature: 'hot' is not a number"),
    ({"prompt": "x", "top_p": 0}, "top_p: must be in (0, 1]"),
    ({"prompt": "x", "num_samples": 50}, "num_samples: must be in [1, 8]"),
])
def test_bad_requests_get_a_message_not_a_stack_trace(client, body, message):
  c, _ = client
  r = c.post("/api/answer", json=body)
  assert r.status_code == 400 and message in r.get_json()["error"]


def test_a_prompt_longer_than_the_context_is_reported_per_model(client):
  c, _ = client
  r = c.post("/api/answer", json={"prompt": "word " * 200, "models": ["sft"], "max_new_tokens": 8})
  assert r.status_code == 200
  assert "exceeds model.max_seq_len=192" in r.get_json()["results"]["sft"]["error"]
  assert c.post("/api/answer", data="not json").status_code == 400


def test_labels_are_appended_at_once_in_the_preference_schema(client):
  c, store = client
  records = []
  for i, choice in enumerate(["A", "B", "tie", "A"]):
    pair = c.post("/api/pair", json={"model_a": "sft", "model_b": "dpo", "temperature": 1.0,
                                     "max_new_tokens": 8}).get_json()
    assert pair["prompt"] in [p["prompt"] for p in PROMPTS] and "model" not in json.dumps(pair)
    saved = c.post("/api/label", json={"pair_id": pair["pair_id"], "choice": choice, "note": f"n{i}"}).get_json()
    assert sorted(saved["shown"]) == ["dpo", "sft"]
    prefs, ties = store.read()  # on disk before the next pair is even requested
    assert len(prefs) + len(ties) == i + 1
    records.append((pair, choice, saved))
  prefs, ties = store.read()
  assert len(prefs) == 3 and len(ties) == 1 and ties[0]["_choice"] == "tie"
  for (pair, choice, saved), rec in zip([r for r in records if r[1] != "tie"], prefs):
    shown_text = {"A": pair["a"], "B": pair["b"]}
    assert rec["chosen"] == shown_text[choice] and rec["rejected"] == shown_text["B" if choice == "A" else "A"]
    assert rec["_shown"] == saved["shown"] and rec["_rater"] == "tester" and rec["_sampling"]["temperature"] == 1.0
    assert rec["_models"]["chosen"] == rec["_shown"][0 if choice == "A" else 1]
    valid = schemas.validate_preference(rec)  # the file trains a reward model or DPO as is
    assert valid["chosen"][-1]["content"] == rec["chosen"] and "chosen_gold" in valid
  # A pair is labeled once; bad choices are refused.
  assert c.post("/api/label", json={"pair_id": records[0][0]["pair_id"], "choice": "A"}).status_code == 400
  pair = c.post("/api/pair", json={"temperature": 1.0, "max_new_tokens": 4}).get_json()
  r = c.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "C"})
  assert r.status_code == 400 and "choice must be one of" in r.get_json()["error"]
  r = c.post("/api/pair", json={"model_a": "sft", "model_b": "sft", "temperature": 0})
  assert r.status_code == 400 and "temperature > 0" in r.get_json()["error"]


def test_reward_signal_against_a_float64_recount():
  def rec(cg, rg, cc, rc):
    return {"chosen_gold": cg, "rejected_gold": rg, "_chosen_components": cc, "_rejected_components": rc}
  prefs = [rec(1.0, -1.0, {"politeness": 0.5}, {}), rec(0.5, 0.5, {"length": -0.2}, {}),
           rec(-2.0, 1.0, {}, {"politeness": 0.5, "harmful": 2.0}), rec(2.0, 0.0, {"harmful": 2.0}, {"length": -0.1}),
           rec(0.1, 0.0, {}, {}), rec(3.0, 1.0, {"correctness": 2.0}, {"correctness": -1.0})]
  s = labels_lib.reward_signal(prefs, [])
  assert s["ready"] and s["labels"] == 6
  assert s["gold_agreement"] == pytest.approx(4 / 5)  # one pair has equal gold; 4 of the other 5 agree
  assert s["components"]["politeness"] == {"prefers_higher": 0.5, "pairs": 2}
  assert s["components"]["harmful"] == {"prefers_higher": 0.5, "pairs": 2}
  # length: chosen -0.2 vs 0 (lower), chosen 0 vs -0.1 (higher)
  assert s["components"]["length"] == {"prefers_higher": 0.5, "pairs": 2}
  assert s["components"]["correctness"] == {"prefers_higher": 1.0, "pairs": 1}
  assert not labels_lib.reward_signal(prefs[:5], [])["ready"]


def test_signal_endpoint_counts_labels(client):
  c, _ = client
  assert c.get("/api/signal").get_json()["ready"] is False


def test_settings_validation():
  assert Settings.from_mapping({"temperature": "0.7", "max_new_tokens": "12"}) == Settings(temperature=0.7,
                                                                                           max_new_tokens=12)
  with pytest.raises(StudioError, match="max_new_tokens"):
    Settings.from_mapping({"max_new_tokens": 0})


def test_a_model_that_cannot_be_loaded_is_reported(tmp_path):
  broken = tmp_path / "broken"
  (broken / "export").mkdir(parents=True)
  (broken / "export" / "export.json").write_text("{}")
  hub = ModelHub({"broken": str(broken)})
  (row,) = hub.describe()
  assert "cannot be loaded" in row["error"]
  with pytest.raises(StudioError, match="model broken"):
    hub.answer("broken", "hi", Settings())


def test_studio_command_refuses_bad_starts_in_one_line(tmp_path, runs):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = run_cli("studio", f"--workdir={empty}", check=False, timeout=120)
  assert proc.returncode == 1 and "has no finished policy exports" in proc.stderr
  assert "Traceback" not in proc.stderr
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    with pytest.raises(StudioError, match=f"cannot listen on 127.0.0.1:{port}"):
      check_port("127.0.0.1", port)
    proc = run_cli("studio", f"--workdir={runs}", f"--port={port}", check=False, timeout=120)
  assert proc.returncode == 1 and "is another studio running?" in proc.stderr


@pytest.mark.slow
def test_the_labels_file_trains_a_reward_model(client, runs, tmp_path):
  """Label pairs in the studio, then `alignax train` a reward model on the file as is."""
  c, store = client
  for i in range(12):
    pair = c.post("/api/pair", json={"model_a": "sft", "model_b": "dpo", "temperature": 1.0,
                                     "max_new_tokens": 12}).get_json()
    c.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "AB"[i % 2]})
  workdir = tmp_path / "rm"
  run_cli("train", "--config=configs/reward.py:tiny", f"--config.workdir={workdir}",
          f"--config.init.workdir={runs}/sft", "--config.data.source=files",
          f"--config.data.train_files={store.path}", "--config.data.eval_records=4",
          "--config.data.loader=memory", "--config.train.steps=6", "--config.train.batch_size=4",
          "--config.eval.every=0", "--config.train.progress=False", timeout=300)
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r][-1] == 6
  evals = [r for r in rows if "eval/accuracy" in r]
  assert evals and 0.0 <= evals[-1]["eval/accuracy"] <= 1.0
  assert "eval/gold_accuracy" in evals[-1]  # the labels carry the gold scores of both responses
  assert os.path.exists(workdir / "export" / "export.json")
