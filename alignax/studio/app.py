"""The studio's web app (Flask): pages and a JSON API over a ModelHub and a LabelStore.

  GET  /                compare: every model answers one prompt, side by side
  GET  /label           label: two blind responses to a random world prompt, pick A, B or tie
  GET  /signal          your reward signal: what the labels reward, against the world's rubric
  GET  /api/models      the models (and why one cannot be loaded)
  GET  /api/prompts     the world's eval prompts, ?q= filters
  POST /api/answer      {"prompt", "models": [...], settings} -> answers per model
  POST /api/pair        {"model_a", "model_b", settings} -> a pair to label (models hidden)
  POST /api/label       {"pair_id", "choice": "A" | "B" | "tie", "note", "rater"} -> appended
  GET  /api/signal      reward_signal of the labels so far

Errors come back as `{"error": message}` with a 4xx status, never a stack trace.
"""

from __future__ import annotations

import random
import threading
import uuid

import flask
from werkzeug.exceptions import HTTPException

from alignax.studio import labels as labels_lib
from alignax.studio.models import ModelHub, Settings, StudioError


def create_app(hub: ModelHub, store: labels_lib.LabelStore, prompts: list[dict], *, rater: str = "rater",
               seed: int = 0) -> flask.Flask:
  app = flask.Flask(__name__)
  app.json.sort_keys = False  # models in the order given
  pending: dict[str, dict] = {}
  app.config["STUDIO_PENDING"] = pending  # pairs shown and not yet labeled, by id
  lock = threading.Lock()
  rng = random.Random(seed)
  state = {"pairs": 0}

  @app.errorhandler(StudioError)
  def studio_error(e):
    return flask.jsonify(error=str(e)), 400

  @app.errorhandler(Exception)
  def unexpected(e):
    if isinstance(e, HTTPException):
      return flask.jsonify(error=f"{e.code} {e.name}: {e.description}"), e.code
    app.logger.exception("studio request failed")
    return flask.jsonify(error=f"{type(e).__name__}: {e}"), 500

  def body() -> dict:
    data = flask.request.get_json(silent=True)
    if not isinstance(data, dict):
      raise StudioError("the request body must be a JSON object")
    return data

  def page(name: str, **context):
    return flask.render_template(f"{name}.html", page=name, models=hub.names, rater=rater, **context)

  @app.get("/")
  def compare_page():
    return page("compare")

  @app.get("/label")
  def label_page():
    return page("label", labels_path=store.path)

  @app.get("/signal")
  def signal_page():
    return page("signal", labels_path=store.path)

  @app.get("/api/models")
  def api_models():
    return flask.jsonify(models=hub.describe())

  @app.get("/api/prompts")
  def api_prompts():
    q = flask.request.args.get("q", "").strip().lower()
    found = [p for p in prompts if q in p["prompt"].lower()] if q else prompts
    return flask.jsonify(prompts=found[:200], total=len(found))

  @app.post("/api/answer")
  def api_answer():
    data = body()
    settings = Settings.from_mapping(data)
    names = data.get("models") or hub.names
    if isinstance(names, str):
      names = [names]
    out = {}
    for i, name in enumerate(names):
      try:
        out[name] = {"answers": hub.answer(name, data.get("prompt", ""), settings, seed_offset=i)}
      except StudioError as e:
        if "prompt is empty" in str(e):
          raise
        out[name] = {"error": str(e)}
    return flask.jsonify(prompt=data.get("prompt", ""), results=out)

  @app.post("/api/pair")
  def api_pair():
    data = body()
    settings = Settings.from_mapping({**data, "num_samples": 1})
    if settings.temperature == 0 and data.get("model_a") == data.get("model_b"):
      raise StudioError("two samples of one model need temperature > 0 (greedy answers are equal)")
    if not prompts:
      raise StudioError("no world prompts to label")
    names = [data.get("model_a") or hub.names[0], data.get("model_b") or hub.names[-1]]
    with lock:
      state["pairs"] += 1
      prompt = rng.choice(prompts)["prompt"]
      order = [0, 1]
      rng.shuffle(order)
      n = state["pairs"]
    responses = []
    for k, name in enumerate(names):
      a = hub.answer(name, prompt, Settings(**{**settings.__dict__, "seed": settings.seed + n}),
                     seed_offset=k)[0]
      responses.append({**a, "model": name})
    shown = [responses[i] for i in order]
    pair = {"prompt": prompt, "responses": shown,
            "sampling": {k: v for k, v in settings.__dict__.items() if k != "num_samples"}}
    pair_id = uuid.uuid4().hex
    with lock:
      pending[pair_id] = pair
    return flask.jsonify(pair_id=pair_id, prompt=prompt, a=shown[0]["text"], b=shown[1]["text"])

  @app.post("/api/label")
  def api_label():
    data = body()
    choice = data.get("choice")
    if choice not in labels_lib.CHOICES:
      raise StudioError(f"choice must be one of {labels_lib.CHOICES}, got {choice!r}")
    with lock:
      pair = pending.pop(str(data.get("pair_id")), None)
    if pair is None:
      raise StudioError("unknown or already labeled pair (reload the page for a new one)")
    record = labels_lib.make_record(pair, choice, str(data.get("rater") or rater), str(data.get("note") or ""))
    store.append(record, tie=choice == "tie")
    prefs, ties = store.read()
    return flask.jsonify(saved=store.ties_path if choice == "tie" else store.path, labels=len(prefs),
                         ties=len(ties), shown=record["_shown"])

  @app.get("/api/signal")
  def api_signal():
    return flask.jsonify(labels_lib.reward_signal(*store.read()))

  return app
