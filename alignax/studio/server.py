"""`alignax studio`: builds the app from flags and serves it on localhost."""

from __future__ import annotations

import getpass
import os
import socket

from alignax.studio.models import ModelHub, StudioError, discover_models, world_prompts


def parse_models(workdir: str, specs: list[str]) -> dict[str, str]:
  """{name: run dir} from `--model=NAME=WORKDIR` flags, else the policies of the pipeline dir."""
  if specs:
    out = {}
    for spec in specs:
      name, sep, path = spec.partition("=")
      if not sep or not name or not path:
        raise StudioError(f"--model: {spec!r} is not NAME=WORKDIR")
      out[name] = path
    return out
  if not workdir:
    raise StudioError("give --workdir=PIPELINE_DIR or --model=NAME=WORKDIR")
  if not os.path.isdir(workdir):
    raise StudioError(f"--workdir: {workdir} is not a directory")
  found = discover_models(workdir)
  if not found:
    raise StudioError(f"--workdir: {workdir} has no finished policy exports (base, sft, ppo, ...); "
                      f"run `alignax pipeline --config.workdir={workdir}` first")
  return found


def check_port(host: str, port: int) -> None:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind((host, port))
    except OSError as e:
      raise StudioError(f"--port: cannot listen on {host}:{port} ({e.strerror}); is another studio "
                        f"running? choose another with --port=N") from None


def build_app(flags):
  from alignax.studio.app import create_app
  from alignax.studio.labels import LabelStore
  models = parse_models(flags.workdir, list(flags.model))
  hub = ModelHub(models)
  labels = flags.labels or os.path.join(flags.workdir or ".", "labels.jsonl")
  store = LabelStore(labels)
  rater = flags.rater or getpass.getuser()
  return create_app(hub, store, world_prompts(flags.workdir), rater=rater, seed=flags.seed), hub, store


def studio_main(flags) -> None:
  check_port(flags.host, flags.port)
  app, hub, store = build_app(flags)
  for row in hub.describe():
    status = row["error"] or f"{row['stage']} ({row['format']} prompts)"
    print(f"  {row['name']:<8} {row['workdir']}: {status}", flush=True)
  print(f"labels: {store.path} (ties: {store.ties_path})", flush=True)
  print(f"alignax studio: http://{flags.host}:{flags.port}/  (Ctrl-C stops)", flush=True)
  app.run(host=flags.host, port=flags.port, threaded=True, use_reloader=False)
