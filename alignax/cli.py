"""`alignax <command> [flags]`: the command-line entry point.

  alignax train     --config=configs/pretrain.py:tiny [--config.key=value ...]
  alignax pipeline  --config=configs/pipeline.py:tiny --config.workdir=DIR
  alignax sweep     --config=configs/dpo.py:tiny --out=DIR --grid=dpo.beta=0.1,0.3 --grid=seed=0,1 [--vectorize]
  alignax sample    --workdir=DIR --prompt="What is the capital of France?"
  alignax eval      --workdir=DIR
  alignax data      world --out=DIR [--config=configs/pretrain.py:tiny]
  alignax import-hf --src=HF_DIR --dst=WORKDIR
  alignax export-hf --workdir=WORKDIR --out=HF_DIR [--dtype=bfloat16]
  alignax studio    --workdir=runs/pipeline_tiny [--port=8765]
  alignax label     --judge=WORKDIR --constitution=world --pairs=FILE --out=FILE
  alignax revise    --policy=WORKDIR --constitution=world --prompts=FILE --out=FILE

Flags follow absl / ml-collections conventions. Config overrides are checked against the config
before absl parses them, so a mistyped key fails with one line naming it (and close matches).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

from absl import app, flags

USAGE = __doc__


def _override_keys(argv: list[str]) -> list[str]:
  """Dotted keys of `--config.a.b=v` / `--config.a.b v` overrides in argv."""
  keys = []
  for arg in argv:
    if arg.startswith("--config."):
      keys.append(arg[len("--config."):].split("=", 1)[0])
  return keys


def _config_arg(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_overrides(argv: list[str]) -> list[str]:
  """`argv` with each `--config.KEY` override spelled as the config's own key (a renamed key's
  new name, with a warning; a pipeline stage's hyperparameter without its section, e.g.
  `--config.dpo.beta`). Exits with a one-line message when an override names no key."""
  from alignax.config import RENAMED, canonical_key, load_config_file, suggest_keys
  spec = _config_arg(argv)
  keys = _override_keys(argv)
  if spec is None:
    if keys:
      _die("--config.* overrides need --config=FILE[:PRESET]")
    return argv
  path, _, preset = spec.partition(":")
  try:
    cfg = load_config_file(path, preset or None)
  except Exception as e:  # a broken config file: say which and why, in one line
    _die(f"cannot load config {spec}: {type(e).__name__}: {e}")
  renamed = {}
  for key in keys:
    canonical = canonical_key(cfg, key)
    if canonical is None:
      close = suggest_keys(cfg, key)
      hint = f" (did you mean: {', '.join(close)}?)" if close else ""
      _die(f"unknown config key 'config.{key}'{hint}")
    if canonical != key:
      renamed[key] = canonical
      if any(key == old or key.endswith("." + old) for old in RENAMED):
        print(f"alignax: warning: config.{key} is deprecated; use config.{canonical}", file=sys.stderr)
  out = []
  for arg in argv:
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config."):].partition("=")
      arg = f"--config.{renamed.get(key, key)}{sep}{value}"
    out.append(arg)
  return out


def _die(message: str, code: int = 2):
  print(f"alignax: error: {message}", file=sys.stderr)
  sys.exit(code)


def user_errors() -> tuple[type[Exception], ...]:
  """Exceptions that describe bad input (config, data, mesh, checkpoint): shown as one line."""
  from alignax.checkpoint import CheckpointError
  from alignax.config import ConfigError
  from alignax.data.schemas import DataError
  from alignax.parallel import ParallelError
  from alignax.algorithms.reward_sources import RewardFunctionError
  from alignax.studio.models import StudioError
  from alignax.train.loop import HaltError
  from alignax.train.workdir_lock import WorkdirLockedError
  return (ConfigError, DataError, ParallelError, CheckpointError, HaltError, RewardFunctionError,
          StudioError, WorkdirLockedError)


def os_error_in(e: BaseException) -> OSError | None:
  """The OSError behind `e` (itself, or its chain of causes: orbax and grain wrap them)."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and e.errno is not None:
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def describe_os_error(e: OSError) -> str:
  """One line naming the path and the cause (a full disk, a read-only or missing directory)."""
  path = e.filename or "a file"
  hint = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
          errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
          errno.EPERM: "operation not permitted", errno.ENOTDIR: "a path component is not a directory",
          errno.EISDIR: "it is a directory"}.get(e.errno, e.strerror or "")
  return (f"cannot use {path}: {hint} ([Errno {e.errno}] {e.strerror}); checkpoints written "
          "before this point are intact")


def _guarded(main: Callable) -> Callable:
  def run(*args):
    try:
      return main(*args)
    except user_errors() as e:
      _die(str(e), code=1)
    except Exception as e:  # an I/O fault: one line with the path and cause, not 800 lines of trace
      cause = os_error_in(e)
      if cause is None or os.environ.get("ALIGNAX_TRACEBACK"):
        raise
      _die(describe_os_error(cause) + " (ALIGNAX_TRACEBACK=1 shows the traceback)", code=1)
  return run


def _run_with_config(prog: str, argv: list[str], main: Callable) -> None:
  from ml_collections import config_flags
  argv = check_overrides(argv)
  config = config_flags.DEFINE_config_file("config", None, "Config file, as path[:preset].",
                                           lock_config=True)
  guarded = _guarded(main)
  app.run(lambda _: guarded(config.value), argv=[prog] + argv)


def cmd_train(prog: str, argv: list[str]) -> None:
  """Trains the stage the config names (`config.stage`)."""
  def main(cfg):
    from alignax.algorithms import run_stage
    if cfg is None:
      _die("--config=FILE[:PRESET] is required")
    run_stage(cfg)
  _run_with_config(prog, argv, main)


def cmd_pipeline(prog: str, argv: list[str]) -> None:
  """Runs the whole pipeline: pretrain -> SFT -> reward model -> PPO and DPO -> report."""
  def main(cfg):
    from alignax.commands.pipeline import run_pipeline
    if cfg is None:
      _die("--config=FILE[:PRESET] is required")
    run_pipeline(cfg)
  _run_with_config(prog, argv, main)


def cmd_sweep(prog: str, argv: list[str]) -> None:
  """One run per point of a grid of overrides, then a table of eval metrics over seeds."""
  flags.DEFINE_string("out", None, "Sweep directory: one run directory per grid point.", required=True)
  flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,... (repeat the flag; the grid is the product).")
  flags.DEFINE_list("metrics", [], "eval metrics in the printed table (default: all), "
                    "e.g. eval/gold_reward,eval/kl_to_reference.")
  flags.DEFINE_bool("vectorize", False, "Train points that differ only in continuous keys and the "
                    "seed as members of one compiled program (vmap over runs); other keys group "
                    "the points into one program each.")

  def main(cfg):
    from alignax.commands.sweep import format_table, run_sweep, run_vectorized_sweep
    if cfg is None:
      _die("--config=FILE[:PRESET] is required")
    sweep = run_vectorized_sweep if flags.FLAGS.vectorize else run_sweep
    _, summary, failed = sweep(cfg, flags.FLAGS.grid, flags.FLAGS.out)
    known = {n for row in summary for n in row["metrics"]}
    unknown = [n for n in flags.FLAGS.metrics if n not in known]
    if unknown and summary:
      _die(f"--metrics: unknown {', '.join(unknown)}; the runs logged: {', '.join(sorted(known))}")
    print(format_table(summary, flags.FLAGS.metrics or None))
    print(f"summary: {flags.FLAGS.out}/summary.json, {flags.FLAGS.out}/summary.csv")
    for name, why in failed:
      print(f"alignax: error: run {name} failed: {why}", file=sys.stderr)
    if failed:
      sys.exit(1)
  _run_with_config(prog, argv, main)


def cmd_sample(prog: str, argv: list[str]) -> None:
  """Prints completions from any stage's checkpoint."""
  flags.DEFINE_string("workdir", None, "A run directory (any stage).", required=True)
  flags.DEFINE_multi_string("prompt", [], "Prompt(s); repeat the flag for several.")
  flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "0 = off.")
  flags.DEFINE_float("top_p", 1.0, "1 = off.")
  flags.DEFINE_integer("max_new_tokens", 64, "Longest completion.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_enum("format", "auto", ["auto", "chat", "raw"],
                    "Prompt format: the chat template, or plain text; auto picks raw for pretraining "
                    "and imported runs, chat otherwise.")

  def main(_):
    from alignax.commands.sample import main as sample_main
    sample_main(flags.FLAGS)
  app.run(_guarded(main), argv=[prog] + argv)


def cmd_eval(prog: str, argv: list[str]) -> None:
  """Evaluates a run on the world task (gold reward, accuracy, refusal, quiz rate, KL to a reference)."""
  flags.DEFINE_string("workdir", None, "A run directory (any stage).", required=True)
  flags.DEFINE_string("reference", "", "Run directory of the reference model for KL (default: none).")
  flags.DEFINE_integer("num_prompts", 64, "Eval prompts.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")

  def main(_):
    from alignax.commands.eval import main as eval_main
    eval_main(flags.FLAGS)
  app.run(_guarded(main), argv=[prog] + argv)


def cmd_data(prog: str, argv: list[str]) -> None:
  """`alignax data world --out=DIR`: writes the world's datasets as JSONL for inspection."""
  if not argv or argv[0] != "world":
    _die("usage: alignax data world --out=DIR [--config=FILE[:PRESET]]")
  argv = argv[1:]
  flags.DEFINE_string("out", None, "Output directory.", required=True)

  def main(cfg):
    from alignax.config import world_config, world_section
    from alignax.tasks.world import build_world
    section = cfg.world if cfg is not None and "world" in cfg else world_section()
    paths = build_world(world_config(section)).write_jsonl(flags.FLAGS.out)
    for name, path in paths.items():
      print(f"{name}: {path}")
  _run_with_config(prog, argv, main)


def cmd_import_hf(prog: str, argv: list[str]) -> None:
  """Imports a local Hugging Face checkpoint directory into an alignax run directory."""
  flags.DEFINE_string("src", None, "Hugging Face checkpoint directory (config.json + safetensors).",
                      required=True)
  flags.DEFINE_string("dst", None, "alignax run directory to create.", required=True)
  flags.DEFINE_string("dtype", "float32", "Parameter dtype to store (or 'auto': the checkpoint's).")
  flags.DEFINE_integer("max_seq_len", None, "Longest sequence to support (default: the checkpoint's); "
                       "needed for sliding-window models, whose window must cover it.")
  flags.DEFINE_string("adapter", "", "A PEFT LoRA adapter directory to merge into --src at import.")

  def main(_):
    from alignax.commands.import_hf import main as import_hf_main
    import_hf_main(flags.FLAGS)
  app.run(_guarded(main), argv=[prog] + argv)


def cmd_export_hf(prog: str, argv: list[str]) -> None:
  """Writes a run's language model as a Hugging Face checkpoint directory."""
  flags.DEFINE_string("workdir", None, "alignax run directory (its export, else latest checkpoint).",
                      required=True)
  flags.DEFINE_string("out", None, "Directory to write (config.json, safetensors, tokenizer).",
                      required=True)
  flags.DEFINE_string("dtype", "", "float32, bfloat16 or float16 (default: the params' own).")
  flags.DEFINE_string("architecture", "", "Hugging Face architecture (default: the one imported "
                      "from, else the one the model's choices imply).")
  flags.DEFINE_string("max_shard_size", "2GB", "Largest safetensors file (e.g. 500MB); 0: one file.")
  flags.DEFINE_enum("lora", "merge", ["merge", "peft"], "A LoRA run: the merged model, or its "
                    "adapters alone as a PEFT directory.")

  def main(_):
    from alignax.commands.export_hf import main as export_hf_main
    export_hf_main(flags.FLAGS)
  app.run(_guarded(main), argv=[prog] + argv)


def cmd_studio(prog: str, argv: list[str]) -> None:
  """A local web app: every model answers a prompt side by side; label pairs into a preference file."""
  flags.DEFINE_string("workdir", "", "A pipeline directory: its policies (base, sft, ppo, ...) are served.")
  flags.DEFINE_multi_string("model", [], "NAME=WORKDIR (repeat); overrides the models found in --workdir.")
  flags.DEFINE_string("labels", "", "Preference JSONL the labels are appended to (default WORKDIR/labels.jsonl).")
  flags.DEFINE_string("rater", "", "Rater id recorded with each label (default: the user name).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (localhost by default).")
  flags.DEFINE_integer("port", 8765, "Port.")
  flags.DEFINE_integer("seed", 0, "Seed of the label page's prompt and order draws.")

  def main(_):
    from alignax.studio.server import studio_main
    studio_main(flags.FLAGS)
  app.run(_guarded(main), argv=[prog] + argv)


def cmd_label(prog: str, argv: list[str]) -> None:
  """AI preference labels: a judge model says which response better follows the constitution."""
  flags.DEFINE_string("judge", None, "Run directory of the judge (any chat model: an SFT run, an "
                      "imported instruct model).", required=True)
  flags.DEFINE_string("constitution", "world", "A constitution file (JSON or YAML) or a built-in name.")
  flags.DEFINE_string("pairs", None, "Preference pairs to label (JSONL, Parquet, a dataset folder).",
                      required=True)
  flags.DEFINE_string("out", None, "Preference JSONL to write (resumed if it exists).", required=True)
  flags.DEFINE_integer("principles_per_pair", 2, "Principles sampled per pair (0: all of them).")
  flags.DEFINE_bool("both_orders", True, "Ask with the responses in both orders and average (cancels "
                    "a position bias).")
  flags.DEFINE_integer("seed", 0, "Seed of the principle draws.")
  flags.DEFINE_integer("batch_size", 64, "Comparisons per compiled forward.")
  flags.DEFINE_integer("limit", 0, "Label only the first N pairs (0: all).")

  def main(_):
    from alignax.commands.feedback import label_main
    label_main(flags.FLAGS)
  app.run(_guarded(main), argv=[prog] + argv)


def cmd_revise(prog: str, argv: list[str]) -> None:
  """Critique and revise: a policy's responses rewritten against the constitution, as SFT records."""
  flags.DEFINE_string("policy", None, "Run directory of the model that answers, critiques and revises.",
                      required=True)
  flags.DEFINE_string("constitution", "world", "A constitution file (JSON or YAML) or a built-in name.")
  flags.DEFINE_string("prompts", None, "Prompts file ({\"prompt\": ...} records).", required=True)
  flags.DEFINE_string("out", None, "SFT JSONL to write (resumed if it exists).", required=True)
  flags.DEFINE_integer("rounds", 1, "Critique-revision rounds per prompt.")
  flags.DEFINE_float("temperature", 0.7, "Sampling temperature of every step.")
  flags.DEFINE_integer("max_new_tokens", 48, "Longest response, critique or revision.")
  flags.DEFINE_integer("seed", 0, "Seed of the principle draws and sampling.")
  flags.DEFINE_integer("batch_size", 64, "Prompts per sampler call.")
  flags.DEFINE_integer("limit", 0, "Revise only the first N prompts (0: all).")
  flags.DEFINE_string("keep_if_critique_starts", "", "Take a revision only when the critique does not "
                      "start with this text (the world's critiques: 'No problem'); empty: always.")

  def main(_):
    from alignax.commands.feedback import revise_main
    revise_main(flags.FLAGS)
  app.run(_guarded(main), argv=[prog] + argv)


COMMANDS: dict[str, Callable[[str, list[str]], None]] = {
    "train": cmd_train,
    "pipeline": cmd_pipeline,
    "sweep": cmd_sweep,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "data": cmd_data,
    "import-hf": cmd_import_hf,
    "export-hf": cmd_export_hf,
    "studio": cmd_studio,
    "label": cmd_label,
    "revise": cmd_revise,
}


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return
  command = argv[1]
  if command not in COMMANDS:
    _die(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
  COMMANDS[command](f"alignax {command}", argv[2:])


if __name__ == "__main__":
  main()
