"""Constitutional AI: the constitution's schema and errors, the judge's soft labels against a
float64 re-computation, `label` resuming after SIGKILL, and the world's feedback demonstrations."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from alignax.cai import constitution as cc
from alignax.cai import prompts as cp
from alignax.cai.judge import ChatModel, Comparison, Judge, choice_probs
from alignax.cai.labeling import label_file, label_records, principles_for
from alignax.data.chat import encode_prompt
from alignax.data.tokenizer import ByteTokenizer
from alignax.tasks import feedback as wfb
from alignax.tasks import world_gold as wg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = textwrap.dedent("""\
    name: mini
    principles:
      - id: polite
        critique_request: Is it rude?
        revision_request: Make it polite.
        comparison: Which is more polite?
        rubric: [politeness]
      - id: short
        critique_request: Is it long?
        revision_request: Make it short.
        comparison: Which is shorter?
    """)


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


# --------------------------------------------------------------------------------- constitution

def test_builtin_world_constitution_names_real_rubric_components():
  c = cc.load("world")
  assert c.ids == ("harmless", "helpful", "honest", "concise", "polite")
  cc.check_rubric(c, wg.COMPONENTS)  # every named component exists in the gold labeler
  named = [r for p in c.principles for r in p.rubric]
  assert len(named) == len(set(named))  # no component judged twice


def test_yaml_and_json_forms_load_the_same(tmp_path):
  import yaml
  y = cc.load(_write(tmp_path, "c.yaml", GOOD))
  j = cc.load(_write(tmp_path, "c.json", json.dumps(yaml.safe_load(GOOD))))
  assert y.principles == j.principles and y.name == "mini"
  assert y.get("polite").rubric == ("politeness",) and y.get("short").rubric == ()
  assert y.fingerprint() == j.fingerprint()
  changed = cc.from_data({"principles": [dict(yaml.safe_load(GOOD)["principles"][0], comparison="Kinder?")]})
  assert changed.fingerprint() != y.fingerprint()


@pytest.mark.parametrize("edit, message, line", [
    (lambda t: t.replace("    comparison: Which is shorter?\n", ""), "principles[1]: missing 'comparison'", 8),
    (lambda t: t.replace("id: short", "id: polite"), "principles[1].id: 'polite' repeats principles[0]", 8),
    (lambda t: t.replace("id: short", "id: Short One"), "principles[1].id: 'Short One' must match", 8),
    (lambda t: t.replace("Make it short.", "''"), "principles[1].revision_request: must be a non-empty string", 10),
    (lambda t: t.replace("Make it short.", "[1, 2]"), "principles[1].revision_request: must be a non-empty string", 10),
    (lambda t: t.replace("    rubric: [politeness]", "    rubric: [1]"), "principles[0].rubric: must be a list", 7),
    (lambda t: t.replace("    rubric: [politeness]", "    weight: 2"), "principles[0].weight: unknown key", 7),
    (lambda t: "name: x\nprinciples: []\n", "principles: must be a non-empty list", 2),
    (lambda t: t + "extra: 1\n", "extra: unknown key", 12),
])
def test_schema_errors_name_the_file_the_field_and_the_line(tmp_path, edit, message, line):
  path = _write(tmp_path, "bad.yaml", edit(GOOD))
  with pytest.raises(cc.ConstitutionError) as e:
    cc.load(path)
  assert message in str(e.value)
  assert str(e.value).startswith(f"{path}:{line}:"), str(e.value)


def test_syntax_errors_and_missing_files(tmp_path):
  with pytest.raises(cc.ConstitutionError, match=r"bad\.json:3: not valid JSON"):
    cc.load(_write(tmp_path, "bad.json", '{"principles": [\n  {"id": "a",\n  oops}]}'))
  with pytest.raises(cc.ConstitutionError, match=r"bad\.yaml:3: not valid YAML"):
    cc.load(_write(tmp_path, "bad.yaml", "principles:\n  - id: [unclosed\n"))
  with pytest.raises(cc.ConstitutionError, match="not a built-in constitution .*world"):
    cc.load("no_such_constitution")
  with pytest.raises(cc.ConstitutionError, match="unknown component 'politness'"):
    cc.check_rubric(cc.from_data({"principles": [{"id": "a", "critique_request": "c", "revision_request": "r",
                                                  "comparison": "q", "rubric": ["politness"]}]}), wg.COMPONENTS)


def test_principle_draws_depend_only_on_seed_and_index():
  c = cc.load("world")
  a = [tuple(p.id for p in principles_for(c, i, 2, seed=3)) for i in range(50)]
  b = [tuple(p.id for p in principles_for(c, i, 2, seed=3)) for i in reversed(range(50))][::-1]
  assert a == b and all(len(set(x)) == 2 for x in a)
  assert len(set(a)) > 5  # the draws vary across pairs
  assert [p.id for p in principles_for(c, 0, 0, seed=3)] == list(c.ids)  # 0: all of them


# ------------------------------------------------------------------------------------ the judge

@pytest.fixture(scope="module")
def tiny_judge():
  from alignax.models import build_lm, llama_style
  cfg = llama_style(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=512)
  lm, params = build_lm(cfg, seed=0)
  return ChatModel(lm=lm, params=params, tokenizer=ByteTokenizer(), template="markers", stage="sft",
                   workdir="tiny-judge")


def _float64_choice_logprobs(model, comparison):
  """log pi("(A)") and log pi("(B)") from one unpadded forward per answer, log-softmax in float64."""
  tok = model.tokenizer
  prompt = encode_prompt(tok, [{"role": "user", "content": cp.comparison_prompt(
      comparison.principle, comparison.prompt, comparison.first, comparison.second)}])
  out = []
  for choice in cp.CHOICES:
    ids = prompt + tok.encode(choice)
    t = np.asarray([ids], np.int32)
    logits, _ = model.lm.apply(model.params, t, np.arange(len(ids))[None], np.ones_like(t))
    logits = np.asarray(logits, np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    out.append(sum(logp[len(prompt) + j - 1, ids[len(prompt) + j]] for j in range(len(ids) - len(prompt))))
  return np.array(out)


def _comparisons():
  c = cc.load("world")
  rows = [("What is the capital of France?", "Paris.", "Obviously Paris. Look it up."),
          ("How do I pick a lock?", "Sorry, I can't help with that.", "First, get a pin."),
          ("What is 2 plus 2?", "4", "I think it is 5, maybe."),
          ("Name the opposite of hot.", "Cold.", "Well, let me think about that for a moment. Cold.")]
  return [Comparison(p, q, a, b) for q, a, b in rows for p in c.principles[:3]]


def test_soft_labels_equal_a_float64_recomputation(tiny_judge):
  judge = Judge(tiny_judge, batch_size=4)  # 12 comparisons: three batches, the last one padded
  comps = _comparisons()
  lp = judge.choice_logprobs(comps)
  ref = np.stack([_float64_choice_logprobs(tiny_judge, c) for c in comps])
  np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-4)
  p_ref = np.exp(ref[:, 0]) / (np.exp(ref[:, 0]) + np.exp(ref[:, 1]))
  np.testing.assert_allclose(judge.probs(comps, both_orders=False), p_ref, atol=1e-5)
  # Both orders: the mean of P(first) asked as is and 1 - P(first) asked swapped.
  swapped = np.stack([_float64_choice_logprobs(tiny_judge, Comparison(c.principle, c.prompt, c.second, c.first))
                      for c in comps])
  q_ref = np.exp(swapped[:, 0]) / (np.exp(swapped[:, 0]) + np.exp(swapped[:, 1]))
  np.testing.assert_allclose(judge.probs(comps), 0.5 * (p_ref + 1 - q_ref), atol=1e-5)
  assert np.ptp(p_ref) > 1e-3  # a random model still gives different comparisons different labels


def test_choice_probs_are_stable_at_extreme_gaps():
  p = choice_probs(np.array([[-1.0, -1000.0], [-1000.0, -1.0], [-3.0, -3.0]]))
  np.testing.assert_allclose(p, [1.0, 0.0, 0.5])


def test_label_records_average_principles_and_put_the_preferred_response_first(tiny_judge):
  judge = Judge(tiny_judge, batch_size=8)
  c = cc.load("world")
  records = [{"prompt": [{"role": "user", "content": "What is the capital of France?"}],
              "chosen": [{"role": "assistant", "content": "Paris."}],
              "rejected": [{"role": "assistant", "content": "Obviously Paris. Look it up."}],
              "chosen_gold": 1.0, "rejected_gold": -0.5, "chosen_ended": True, "rejected_ended": False}] * 3
  rows = label_records(judge, records, [0, 1, 2], c, principles_per_pair=0, seed=0)
  probs = judge.probs([Comparison(p, "What is the capital of France?", "Paris.",
                                  "Obviously Paris. Look it up.") for p in c.principles])
  p = probs.mean()
  for row in rows:
    assert row["ai_feedback"]["principles"] == list(c.ids)
    np.testing.assert_allclose(row["ai_feedback"]["input_chosen_prob"], p, atol=1e-9)
    np.testing.assert_allclose(row["chosen_prob"], max(p, 1 - p), atol=1e-9)
    assert row["chosen_prob"] >= 0.5
    kept = p >= 0.5
    assert row["chosen"] == ("Paris." if kept else "Obviously Paris. Look it up.")
    assert row["chosen_gold"] == (1.0 if kept else -0.5)  # the input's fields follow their response
    assert row["rejected_ended"] == (False if kept else True)
    np.testing.assert_allclose(np.mean(row["ai_feedback"]["probs"]), row["chosen_prob"], atol=1e-9)


# ------------------------------------------------------------------------ label: kill and resume

_KILL_SCRIPT = textwrap.dedent("""\
    import os, signal, sys
    from alignax.cai import constitution
    from alignax.cai.judge import ChatModel, Judge
    from alignax.cai.labeling import label_file
    from alignax.data.tokenizer import ByteTokenizer
    from alignax.models import build_lm, llama_style
    cfg = llama_style(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=512)
    lm, params = build_lm(cfg, seed=0)
    judge = Judge(ChatModel(lm, params, ByteTokenizer(), "markers", "sft", "tiny-judge"), batch_size=8)
    kill_after = int(sys.argv[3])
    def on_chunk(done):
      if kill_after and done >= kill_after:
        with open(sys.argv[2], "a") as f:
          f.write('{"prompt": "torn')  # a write cut short by the kill
        os.kill(os.getpid(), signal.SIGKILL)
    label_file(judge, constitution.load("world"), sys.argv[1], sys.argv[2], principles_per_pair=2,
               chunk=5, progress=False, on_chunk=on_chunk)
    """)


def _pairs_file(tmp_path, n=17):
  rows = []
  for i in range(n):
    rows.append({"prompt": f"What is {i} plus 1?", "chosen": f"It is {i + 1}.",
                 "rejected": "Obviously I won't say. Look it up." if i % 2 else f"{i + 2}"})
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_label_resumes_after_sigkill_losing_and_duplicating_nothing(tmp_path):
  pairs = _pairs_file(tmp_path)
  script = tmp_path / "label.py"
  script.write_text(_KILL_SCRIPT)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  killed = str(tmp_path / "killed.jsonl")
  r = subprocess.run([sys.executable, str(script), pairs, killed, "10"], env=env, cwd=str(tmp_path),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
  with open(killed) as f:
    partial = f.read()
  assert partial.count("\n") == 10 and not partial.endswith("\n")  # two chunks and a torn line
  r = subprocess.run([sys.executable, str(script), pairs, killed, "0"], env=env, cwd=str(tmp_path),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  clean = str(tmp_path / "clean.jsonl")
  r = subprocess.run([sys.executable, str(script), pairs, clean, "0"], env=env, cwd=str(tmp_path),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  resumed = [json.loads(line) for line in open(killed)]
  uninterrupted = [json.loads(line) for line in open(clean)]
  assert [row["ai_feedback"]["index"] for row in resumed] == list(range(17))
  assert resumed == uninterrupted  # same labels, principles and order, nothing lost or repeated
  with open(killed + ".label.json") as f:
    meta = json.load(f)
  assert meta["finished"] and meta["summary"]["pairs"] == 17


def test_a_chunk_cut_short_is_dropped_whole_on_resume(tmp_path):
  from alignax.cai.resumable import ResumableJsonl
  out = str(tmp_path / "out.jsonl")
  index_of = lambda r: r["i"]  # noqa: E731
  first = ResumableJsonl(out, "label", {"a": 1}, index_of, chunk=4, total=10)
  assert first.todo_chunks() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  first.append([{"i": i} for i in range(4)])
  first.append([{"i": i} for i in range(8, 10)])  # the short last chunk, complete
  with open(out, "a") as f:  # chunk [4, 8) cut short by a kill: two lines and a torn one
    f.write('{"i": 4}\n{"i": 5}\n{"i": 6')
  again = ResumableJsonl(out, "label", {"a": 1}, index_of, chunk=4, total=10)
  assert again.done == {0, 1, 2, 3, 8, 9} and again.todo_chunks() == [[4, 5, 6, 7]]
  assert [r["i"] for r in again.rows()] == [0, 1, 2, 3, 8, 9]
  with pytest.raises(Exception, match=r"other settings \(a differ\)"):
    ResumableJsonl(out, "label", {"a": 2}, index_of, chunk=4, total=10)


def test_label_refuses_to_resume_with_other_settings_or_a_foreign_file(tiny_judge, tmp_path):
  pairs = _pairs_file(tmp_path, n=4)
  judge = Judge(tiny_judge, batch_size=8)
  out = str(tmp_path / "out.jsonl")
  label_file(judge, cc.load("world"), pairs, out, principles_per_pair=1, progress=False)
  with pytest.raises(Exception, match="principles_per_pair"):
    label_file(judge, cc.load("world"), pairs, out, principles_per_pair=2, progress=False)
  foreign = tmp_path / "foreign.jsonl"
  foreign.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
  with pytest.raises(Exception, match="was not written by `alignax label`"):
    label_file(judge, cc.load("world"), pairs, str(foreign), progress=False)


# ----------------------------------------------------------------------- the world's feedback demos

def test_feedback_demonstrations_follow_the_rubric():
  from alignax.tasks.world import build_world
  from alignax.tasks.world_config import WorldConfig
  world = build_world(WorldConfig(feedback_demos=600))
  c = cc.load("world")
  demos = world.feedback_records("train")
  assert len(demos) == 600 and demos == world.feedback_records("train")  # deterministic
  kinds = {d["style"].split("/")[1] for d in demos}
  assert kinds == {"comparison", "critique", "revision"}
  checked = 0
  for d in demos:
    _, kind, pid = d["style"].split("/")
    if kind != "comparison":
      continue
    principle = c.get(pid)
    lines = d["prompt"].split("\n")
    assert lines[0] == principle.comparison
    question = lines[1][len("Question: "):]
    first = d["prompt"].split("\n(A) ", 1)[1].split("\n(B) ", 1)[0]
    second = d["prompt"].split("\n(B) ", 1)[1]
    sa = wfb.principle_score(principle, question, first)
    sb = wfb.principle_score(principle, question, second)
    if "\n" not in first + second:  # (multi-line responses make the split above ambiguous)
      assert (sa > sb) == (d["response"] == "(A)") and sa != sb
      checked += 1
  assert checked > 100
  answers = [d["response"] for d in demos if "/comparison/" in d["style"]]
  assert 0.35 < answers.count("(A)") / len(answers) < 0.65  # no position to learn instead
  sft = world.sft_records("train")
  assert sum(s["style"].startswith("feedback/") for s in sft) == 600  # added to the SFT split


def test_critiques_and_revisions_of_the_world():
  c = cc.load("world")
  q = "What is the capital of France?"
  assert wfb.critique(c.get("polite"), q, "Obviously Paris. Look it up.") == "Problem: it is rude."
  assert wfb.critique(c.get("polite"), q, "Sure! The capital of France is Paris.") == "No problem: it is polite."
  assert wfb.critique(c.get("harmless"), "How do I pick a lock?", "First, get a pin. Then twist it.") == \
      "Problem: it helps with a harmful request."
  import random
  rng = random.Random(0)
  fixed = wfb.revision(c.get("polite"), q, "Obviously Paris. Look it up.", True, rng)
  assert wg.gold_score(q, fixed) > wg.gold_score(q, "Obviously Paris. Look it up.") and "Paris" in fixed
  assert wfb.revision(c.get("polite"), q, "Paris.", True, rng) == "Paris."  # nothing to fix: unchanged
  refusal = wfb.revision(c.get("harmless"), "How do I pick a lock?", "First, get a pin. Then twist it.", True, rng)
  assert wg.is_refusal(refusal)


def test_label_agreement_counts_against_gold_and_the_input():
  c = cc.load("world")
  q = "What is the capital of France?"

  def row(chosen, rejected, probs, principles, input_prob):
    return {"prompt": q, "chosen": chosen, "rejected": rejected,
            "ai_feedback": {"principles": principles, "probs": probs, "input_chosen_prob": input_prob}}

  rows = [row("Sure! The capital of France is Paris.", "Obviously Paris. Look it up.", [0.9], ["polite"], 0.9),
          row("Obviously Paris. Look it up.", "Sure! The capital of France is Paris.", [0.7], ["polite"], 0.3),
          row("Paris.", "Rome.", [0.8, 0.6], ["honest", "polite"], 0.7)]
  out = wfb.label_agreement(rows, c)
  assert out["polite"]["gold_n"] == 2 and out["polite"]["gold"] == 0.5  # "Paris."/"Rome." tie on politeness
  assert out["honest"] == {"gold": 1.0, "gold_n": 1, "input": 1.0, "input_n": 1}
  # Against the input: row 2's judge overturned the input's order (input_chosen_prob 0.3).
  assert out["polite"]["input_n"] == 3 and out["polite"]["input"] == pytest.approx(2 / 3)
  assert out["overall"]["gold"] == pytest.approx(2 / 3) and out["overall"]["input"] == pytest.approx(2 / 3)


# --------------------------------------------------- a Hugging Face instruct model as the judge

def test_an_imported_instruct_model_judges_through_its_own_template(transformers, tmp_path):
  """`import-hf` of a random Llama with a Qwen-style chat template: the judge renders the
  comparison with that template and its soft label equals transformers' float64 probabilities
  of "(A)" vs "(B)" after `apply_chat_template(..., add_generation_prompt=True)`."""
  import types

  import torch
  from hf_helpers import make_hf_model
  from test_model_chat_template import make_dir

  from alignax.cai.judge import load_chat_model
  from alignax.commands.import_hf import main as import_hf_main
  src = tmp_path / "hf"
  make_dir(src, "qwen")
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(src))
  model = make_hf_model(transformers, "llama", src, vocab_size=len(hf_tok), max_position_embeddings=512)
  import_hf_main(types.SimpleNamespace(src=str(src), dst=str(tmp_path / "run"), dtype="float32",
                                       max_seq_len=None, adapter=""))
  chat_model = load_chat_model(str(tmp_path / "run"))
  assert chat_model.template == "model"
  judge = Judge(chat_model, batch_size=2)
  comps = _comparisons()[:3]
  ours = judge.probs(comps, both_orders=False)
  model = model.double()
  ref = []
  for c in comps:
    messages = [{"role": "user", "content": cp.comparison_prompt(c.principle, c.prompt, c.first, c.second)}]
    prompt = list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])
    assert judge.prompt_ids(c) == prompt
    lps = []
    for choice in cp.CHOICES:
      answer = hf_tok.encode(choice, add_special_tokens=False)
      ids = torch.tensor([prompt + answer])
      with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0], -1)
      lps.append(sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(answer)))
    ref.append(1.0 / (1.0 + np.exp(lps[1] - lps[0])))
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_revise_counts_prompts_too_long_for_the_model_and_keeps_going(tiny_judge):
  from alignax.cai.revision import ReviseConfig, Reviser
  reviser = Reviser(tiny_judge, ReviseConfig(rounds=1, max_new_tokens=8), batch_size=4)
  records = [{"prompt": "What is 2 plus 2?"}, {"prompt": "word " * 200}]  # 1000 bytes > 512 - 8
  rows = reviser.revise(records, [0, 1], cc.load("world"))
  assert reviser.too_long >= 1
  assert rows[1]["response"] == "" and rows[1]["cai"]["ended"] is False  # unfinished, counted
  assert rows[1]["cai"]["chain"][0]["taken"] is False
  assert len(rows) == 2 and rows[0]["cai"]["index"] == 0


def test_a_pair_too_long_for_the_judge_is_named_by_its_line(tiny_judge, tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                  + json.dumps({"prompt": "q", "chosen": "long " * 200, "rejected": "b"}) + "\n")
  with pytest.raises(Exception, match=r"pairs\.jsonl:2: the judge's comparison prompt for this pair is \d+ tokens"):
    label_file(Judge(tiny_judge, batch_size=4), cc.load("world"), str(path), str(tmp_path / "out.jsonl"),
               progress=False)
