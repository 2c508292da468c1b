"""The standard CPU workload of ../shared/PERFORMANCE.md (peerbench's), timed through alignax's real
training loop, with the bare jitted step beside it.

  python benchmarks/workload.py [--tasks=sft,reward,dpo,ppo,grpo,rloo] [--steps=0] [--warmup=3]

Workload (peerbench's `common.py`, followed exactly):
  model    Llama-style, 4 layers, 4 heads, d_model 256, MLP 1024, vocab 512, untied, float32, random
           init (4,458,752 params), the same params for the real loop and the bare step.
  tokens   0 <pad>, 1 </s> (eos), 2 <s>, 3 <unk>, 4..511 the words "t4".."t511", one word = one
           token. Records are JSONL text from peerbench's own generators (numpy default_rng,
           seeds 0 sft / 1 preference / 2 prompts): prompt = 64 random ids in 4..511,
           completion = 63 random ids + EOS. They are read with `data.source=files` and a Hugging
           Face WordLevel tokenizer (`tokenizer=<dir>/tokenizer.json`) whose own chat template
           (`data.chat_template="model"`) writes prompt, completion and EOS and nothing else:
           no BOS, no role markers. So every sequence is exactly 64 + 64 = 128 tokens, with no
           padding, and the loss falls on the 64 completion tokens (63 + EOS).
  batch    8 sequences (SFT), 8 pairs (RM, DPO) or 8 prompts (RL; x 4 samples for GRPO/RLOO),
           a fresh batch from the data pipeline every step: 8 x (warm-up + measured steps)
           distinct records, shuffled by the pipeline ("distinct_batches" counts them).
  RL       exactly 64 new tokens: the RL tokenizer's eos is "<stop>", id 512, outside the
           model's 512 outputs, so no row stops early. Temperature 1, no top-k or top-p, KL
           coefficient 0.04 (the reference runs every iteration), one update per iteration.
           The score is `even_fraction` (peerbench's reward: the fraction of even ids in the
           decoded response), named in `rewards.functions` and called on the host from the
           compiled iteration. PPO's value model starts from a reward-model export (a random
           scalar head on the same backbone); `ppo.apply_no_eos_score` is off, so the score is
           the function's.
  optim    AdamW b1 0.9, b2 0.999, eps 1e-8, weight decay 0, clip 1.0, constant lr 1e-5.
  steps    3 warm-up steps (compilation included), then 20 measured (sft/reward/dpo) or 15
           (ppo/grpo/rloo).

What is timed ("seconds", "median_seconds"): the stage as `alignax train` builds it, then driven
by the one training loop. The stage comes from its algorithm record: `configs/<stage>.py:standard`
with the overrides above, validated, with the init export's model and tokenizer adopted, and
`Algorithm.build` makes the Run. The loop is `alignax.train.loop.run_loop` with its defaults:
metrics are fetched every `train.log_every` (10) steps and written to metrics.jsonl and
TensorBoard, and the data pipeline's counters are logged. Step time = the wall time between
consecutive step ends. The Run's `after_step` hook (chained after the stage's own) stamps each
step end once the step's metrics exist, so the step has really finished, as at TRL's synchronous
`on_step_end`. Each interval thus holds the pipeline's next batch (read and tokenized on the fly,
through the chat template), its transfer, the step, the hooks and, every 10th step, the metrics
row. Waiting at each step end takes away the overlap the unsynchronised loop can have between
logging rows, where the host prepares a batch while the device computes. That overlap could hide
at most the host's share of a step, mostly the data time, which is reported as
"data_median_seconds".

Left out: the checkpointer (no restore, no saves), the export, evaluation (eval.every = 0, no eval
split) and the progress bar (train.progress = False, a display option). The loop is driven the
way `alignax.train.runner.run_training` drives it, but not through `run_training` itself, which
refuses this tokenizer: HFTokenizer always adds the three chat role markers after a file's
vocabulary (ids 512-514). That makes the tokenizer's vocabulary 515 ids (516 with the RL
"<stop>"), more than the model's 512 rows, even though the "model" template never emits them.

"bare_seconds": the same stage's `Run.train_step`, jitted by the same placement (`jit_step`, with
the state donated), called on one fixed device batch (the pipeline's first) and timed from call
to call, waiting for its metrics and running the stage's reward-function check. No data pipeline
and no loop: the difference from the real loop is the loop's own cost.

Tokens/s follow peerbench: 1024 input tokens per step for SFT, 2048 for RM and DPO, and 2048
generated tokens for GRPO and RLOO, 512 for PPO. MFU = model FLOPs per step / step time / a
matmul peak measured in the same run (`alignax.flops.measure_matmul_peak`). FLOPs per token are
PaLM's (`train_flops_per_token`; a forward is a third of it) at T = 128, over every model pass
the step makes as alignax runs it (GRPO/RLOO run each prompt once per group): see `step_flops`.
Peak memory is the process's peak RSS: `main` runs every task in its own process, after measuring
the matmul peak once.

Differences from the peers' setups that remain:
  * alignax reads and tokenizes each batch inside the loop; TRL tokenizes the dataset before
    training, so its steps only collate.
  * The step ends are synchronised, as TRL's are. Tunix's offline trainers are timed start to
    start, with up to 2 steps in flight.
  * RM and DPO: each pair is one row of 192 slots, the prompt once and both responses after it
    (`data.pair_len=192`, `alignax.algorithms.shared_prompt`; the same losses as two rows), so
    the model runs 8 x 192 = 1536 slots, not 16 x 128 = 2048; tokens/s still counts the
    workload's 2048 input tokens. `--pair_layout=two_rows` times the two-row layout.
  * RM: alignax's scalar model keeps the unused untied LM head in its params and optimizer
    (peerbench counts 4,327,936 params for the score-head model).
  * GRPO/RLOO: each prompt runs once per group (TRL runs all 32 rows in full). With one update
    per rollout, the sampler's logprobs serve as the old policy's, so no extra forward runs
    (TRL's RLOO runs one). GRPO's loss is averaged per sequence, then per token, as in Tunix
    (TRL's default "dapo" is a token mean); the cost is the same.
  * PPO: policy and value share one loss and one AdamW step (Tunix gives the critic its own
    optimizer).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types

from absl import app, flags

TASKS = ("sft", "reward", "dpo", "ppo", "grpo", "rloo")
RL_TASKS = ("ppo", "grpo", "rloo")
PAIR_TASKS = ("reward", "dpo")

# peerbench's common.py
VOCAB = 512
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
FIRST_WORD_ID = 4
PROMPT_LEN = COMPLETION_LEN = 64
SEQ_LEN = PROMPT_LEN + COMPLETION_LEN
PAIR_LEN = PROMPT_LEN + 2 * COMPLETION_LEN  # a pair in one row, the prompt once (data.pair_len)
PAIR_LAYOUTS = ("shared_prompt", "two_rows")
BATCH = 8
GROUP = 4
KL_COEF = 0.04
LR = 1e-5
SEEDS = {"sft": 0, "preference": 1, "prompts": 2}
NO_STOP_EOS = "<stop>"  # the RL tokenizer's eos, id 512: outside the model's vocabulary
TOKENS_PER_STEP = {
    "sft": (BATCH * SEQ_LEN, "input tokens (8 seq x 128)"),
    "reward": (2 * BATCH * SEQ_LEN, "input tokens (8 pairs x 2 x 128)"),
    "dpo": (2 * BATCH * SEQ_LEN, "input tokens (8 pairs x 2 x 128)"),
    "grpo": (BATCH * GROUP * COMPLETION_LEN, "generated tokens (32 x 64)"),
    "rloo": (BATCH * GROUP * COMPLETION_LEN, "generated tokens (32 x 64)"),
    "ppo": (BATCH * COMPLETION_LEN, "generated tokens (8 x 64)"),
}
# The tokenizer's own chat template: the turns' words, EOS after an assistant turn, nothing else.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
                 "{{ m['content'] }} {{ eos_token }}{% endgeneration %}"
                 "{% else %}{{ m['content'] }} {% endif %}{% endfor %}")
NOTES = {
    "reward": "the scalar model keeps the unused untied LM head in its params and optimizer",
    "ppo": "policy and value in one loss and one shared AdamW step; old-policy, reference and "
           "value forwards every iteration",
    "grpo": "on-policy (one update per rollout): the sampler's logprobs serve as the old policy's",
    "rloo": "on-policy (one update per rollout): the sampler's logprobs serve as the old policy's",
}
COMMON_NOTE = ("real loop: alignax's run_loop over data.source=files records (fresh batch every "
               "step), metrics fetched every 10 steps, no checkpoints/eval/export; driven like "
               "run_training (which refuses the 515-id tokenizer: see the module doc)")

_TASKS = flags.DEFINE_string("tasks", ",".join(TASKS), "Comma-separated tasks.")
_STEPS = flags.DEFINE_integer("steps", 0, "Measured steps per task (0: 20, or 15 for RL).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed warm-up steps (compilation included), >= 1.")
_OUT = flags.DEFINE_string("out", "", "JSON path (default benchmarks/results/workload_<platform>.json).")
_ISOLATE = flags.DEFINE_bool("isolate", True, "Run each task in its own process (clean peak RSS).")
_CHILD_JSON = flags.DEFINE_string("child_json", "", "Internal: write this process's results here.")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Matmul peak FLOP/s for MFU (0: measure it).")
_PAIRS = flags.DEFINE_enum("pair_layout", "shared_prompt", PAIR_LAYOUTS,
                           "RM/DPO pairs: one row with the prompt once (data.pair_len=192) or "
                           "two rows of 128 (data.pair_len=0).")


def default_steps(task: str) -> int:
  return 15 if task in RL_TASKS else 20


# ------------------------------------------------------------------------------------ the data


def ids_to_text(ids) -> str:
  return " ".join(f"t{int(i)}" for i in ids)


def _rand_ids(rng, n: int, length: int):
  import numpy as np
  return rng.integers(FIRST_WORD_ID, VOCAB, size=(n, length), dtype=np.int64)


def workload_rows(kind: str, n: int) -> dict:
  """peerbench's arrays of `n` rows: {"prompt", "completion"} (sft), {"prompt", "chosen",
  "rejected"} (preference) or {"prompt"} (prompts); completions are 64 random ids of which the
  first 63 are used, the 64th token being EOS."""
  import numpy as np
  rng = np.random.default_rng(SEEDS[kind])
  names = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
           "prompts": ("prompt",)}[kind]
  return {name: _rand_ids(rng, n, PROMPT_LEN if name == "prompt" else COMPLETION_LEN) for name in names}


def record_kind(task: str) -> str:
  return "sft" if task == "sft" else "prompts" if task in RL_TASKS else "preference"


def write_records(task: str, path: str, n: int) -> None:
  """JSONL of `n` workload records: the completion's 63 words (the chat template adds EOS)."""
  rows = workload_rows(record_kind(task), n)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      rec = {k: ids_to_text(v[i] if k == "prompt" else v[i][: COMPLETION_LEN - 1]) for k, v in rows.items()}
      f.write(json.dumps(rec) + "\n")


def write_tokenizer(directory: str, rl: bool = False) -> str:
  """The workload's WordLevel tokenizer (ids 0..511) with its chat template; `rl` names an eos
  outside the vocabulary ("<stop>", id 512), so generation never stops early."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, "<s>": BOS_ID, "<unk>": UNK_ID}
  vocab.update({f"t{i}": i for i in range(FIRST_WORD_ID, VOCAB)})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(list(vocab)[:4] + ([NO_STOP_EOS] if rl else []))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = dict(bos_token="<s>", eos_token=NO_STOP_EOS if rl else "</s>", pad_token="<pad>",
                unk_token="<unk>", add_bos_token=False, chat_template=CHAT_TEMPLATE)
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return directory


class WordTokenizer:
  """The peer workload's vocabulary for decoding: id i >= 4 is the word "t<i>"."""

  eos_id, pad_id = EOS_ID, PAD_ID

  def decode(self, ids):
    return ids_to_text(ids)


def even_fraction(prompts, responses):
  """The peer workload's reward: the fraction of even token ids in each decoded completion."""
  import re
  out = []
  for text in responses:
    ids = [int(m) for m in re.findall(r"t(\d+)", text)]
    out.append(sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1))
  return out


def _reward_spec() -> str:
  """`rewards.functions` naming `even_fraction`, importable however this file was loaded
  (as __main__, as benchmarks.workload, or from a path by the peerbench harness)."""
  mod = sys.modules.get(__name__)
  if mod is None or getattr(mod, "even_fraction", None) is not even_fraction:
    mod = types.ModuleType("_alignax_workload_reward")
    mod.even_fraction = even_fraction
    sys.modules[mod.__name__] = mod
  return f"{mod.__name__}:even_fraction"


# ------------------------------------------------------------------------------- the stage run


def _write_exports(root: str, task: str, tokenizer: str) -> None:
  """Random-init exports the stage starts from: the LM (`init/`) and, for PPO's value model, a
  reward model (`rm/`: a random scalar head on the same backbone)."""
  from alignax import checkpoint as ckpt_lib
  from alignax.models import build_lm, llama_style
  from alignax.models.heads import build_scalar_model
  model = llama_style()
  _, params = build_lm(model, 0)
  ckpt_lib.save_export(os.path.join(root, "init"), params, model=model, stage="sft",
                       tokenizer=tokenizer, chat_template="model")
  if task == "ppo":
    _, rm_params = build_scalar_model(model, 1, backbone=params)
    ckpt_lib.save_export(os.path.join(root, "rm"), rm_params, model=model, stage="reward",
                         tokenizer=tokenizer, chat_template="model",
                         extra={"norm_gain": 1.0, "norm_bias": 0.0})


def task_config(task: str, root: str, total_steps: int, pair_layout: str = "shared_prompt"):
  """The stage's `configs/<stage>.py:standard` with the workload's overrides."""
  from alignax.config import load_config_file
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = load_config_file(os.path.join(repo, "configs", f"{task}.py"), "standard")
  rl = task in RL_TASKS
  with cfg.unlocked():
    cfg.workdir = os.path.join(root, "run")
    cfg.tokenizer = os.path.join(root, "tokenizer", "tokenizer.json")
    cfg.data.source = "files"
    cfg.data.train_files = os.path.join(root, "train.jsonl")
    cfg.data.eval_records = 0  # every record trains; no eval split
    cfg.data.tfds_dir = os.path.join(root, "tfds")
    cfg.data.chat_template = "model"
    cfg.data.seq_len = SEQ_LEN
    cfg.train.steps = total_steps
    cfg.train.batch_size = BATCH
    cfg.train.progress = False
    cfg.eval.every = 0
    cfg.eval.batches = 0
    cfg.eval.num_prompts = 0
    o = cfg.optimizer
    o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm = LR, 0.9, 0.999, 1e-8, 0.0, 1.0
    o.schedule, o.warmup_steps = "constant", 0
    cfg.init.workdir = os.path.join(root, "init")
    cfg.init.run_if_missing = False
    if task == "sft":
      cfg.data.packing = False
    if rl:
      cfg.reward_model.workdir = os.path.join(root, "rm")
      cfg.reward_model.run_if_missing = False
      cfg.rewards.model = 0.0
      cfg.rewards.functions = _reward_spec()
      s = cfg[task]
      s.prompt_len, s.max_new_tokens, s.temperature, s.kl_coef = PROMPT_LEN, COMPLETION_LEN, 1.0, KL_COEF
      if task == "ppo":
        s.epochs, s.num_minibatches, s.apply_no_eos_score, s.adaptive_kl = 1, 1, False, False
      else:
        s.group_size, s.num_iterations, s.num_minibatches = GROUP, 1, 1
    if task == "dpo":
      cfg.dpo.loss_type, cfg.dpo.beta, cfg.dpo.precompute_ref = "sigmoid", 0.1, False
    if task in PAIR_TASKS:
      cfg.data.pair_len = PAIR_LEN if pair_layout == "shared_prompt" else 0
  return cfg


def prepare_task(task: str, root: str, total_steps: int, pair_layout: str = "shared_prompt"):
  """Writes the task's tokenizer, records and init exports under `root`; returns its config."""
  write_tokenizer(os.path.join(root, "tokenizer"), rl=task in RL_TASKS)
  write_records(task, os.path.join(root, "train.jsonl"), BATCH * total_steps)
  cfg = task_config(task, root, total_steps, pair_layout)
  _write_exports(root, task, cfg.tokenizer)
  return cfg


def build_stage(cfg):
  """(ctx, run) of the stage `cfg` names, built as `alignax train` builds it: the config
  validated (`validate_chain`), the init export's model and tokenizer adopted, the chat template
  made concrete, then `run_training`'s context (placement, tokenizer, metrics writer) and the
  algorithm record's `build`."""
  from alignax import metrics as metrics_lib
  from alignax import parallel
  from alignax.algorithms import registry, validate_chain
  from alignax.algorithms.common import adopt_export
  from alignax.config import resolve
  from alignax.train import runner
  record = registry.get(cfg.stage)
  validate_chain(cfg)
  cfg = adopt_export(cfg, cfg.init.workdir, chat_stages=registry.chat_stages())
  cfg = runner.with_concrete_chat_template(cfg)
  config = resolve(cfg)
  tokenizer = runner.stage_tokenizer(config)
  placement = parallel.make_placement(config.parallel, config.model, config.train.batch_size)
  writer = metrics_lib.MetricsWriter(config.workdir)
  ctx = runner.StageContext(cfg=cfg, config=config, model=config.model, placement=placement,
                            tokenizer=tokenizer, writer=writer, is_main=True)
  return ctx, record.build(ctx)


class TimedBatches:
  """The Run's batch iterator, passed through, timing each `next` and keeping each host batch
  (fingerprinted after the loop, so a result shows that every step got a fresh one).
  `get_state`/`set_state`/`stats` and the rest reach the wrapped iterator."""

  def __init__(self, inner):
    self._inner = inner
    self.seconds: list[float] = []
    self.batches: list = []

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    batch = next(self._inner)
    self.seconds.append(time.perf_counter() - t0)
    self.batches.append(batch)
    return batch

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def fingerprints(self) -> list[str]:
    import jax
    import numpy as np
    out = []
    for batch in self.batches:
      h = hashlib.sha1()
      for leaf in jax.tree.leaves(batch):
        h.update(np.ascontiguousarray(leaf).tobytes())
      out.append(h.hexdigest())
    return out


class StepClock:
  """`Run.after_step` hook: runs the stage's own hook, waits for the step's metrics, stamps."""

  def __init__(self, inner=None):
    self.inner = inner
    self.ends: list[float] = []

  def __call__(self, step, metrics):
    import jax
    if self.inner is not None:
      self.inner(step, metrics)
    jax.block_until_ready(metrics)
    self.ends.append(time.perf_counter())


def run_real_loop(ctx, run):
  """Drives `run_loop` over the Run, as `run_training` does but with no checkpointer; returns
  (final state, seconds of every step, the first from the loop's start to step 1's end (the
  compilation included), the TimedBatches the loop read)."""
  from alignax.train.loop import run_loop
  clock = StepClock(run.after_step)
  batches = TimedBatches(run.batches)
  run.after_step, run.batches = clock, batches
  config = ctx.config
  t0 = time.perf_counter()
  try:
    state = run_loop(run, config.train, placement=ctx.placement, eval_every=config.eval.every,
                     checkpoint_every=0, checkpointer=None, writer=ctx.writer, is_main=True)
  finally:
    ctx.writer.close()
  ends = [t0] + clock.ends
  seconds = [b - a for a, b in itertools.pairwise(ends)]
  if len(seconds) != run.total_steps:
    raise RuntimeError(f"{len(seconds)} step ends stamped for {run.total_steps} steps")
  return state, seconds, batches


def bare_step_seconds(ctx, run, state, batch, after, warmup: int, steps: int) -> list[float]:
  """Per-call seconds of the Run's own step, jitted by the placement, on one fixed device batch."""
  import jax
  step = ctx.placement.jit_step(run.train_step, state)
  device_batch = ctx.placement.put_batch(batch)
  holder = {"state": state}
  out = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    holder["state"], metrics = step(holder["state"], device_batch)
    if after is not None:
      after(i + 1, metrics)
    jax.block_until_ready(metrics)
    if i >= warmup:
      out.append(time.perf_counter() - t0)
  return out


# --------------------------------------------------------------------------------------- FLOPs


def step_flops(task: str, model=None, pair_layout: str = "shared_prompt") -> float:
  """Model FLOPs of one step, as alignax executes it: PaLM's per-token training count
  (`flops.train_flops_per_token` at T = 128; a forward is a third of it) summed over every pass
  the step makes. SFT trains 8 x 128 tokens; RM trains 16 x 128 (a scalar head instead of the LM
  head); DPO trains 16 x 128 and runs the reference over them. GRPO/RLOO: each prompt runs once
  per group (the sampler's prefill, the grouped reference and update forwards), so a pass is
  8 x 64 prompt + 32 x 64 response tokens: rollout, reference and training passes. PPO, over
  8 x 128 tokens: rollout, old-policy, reference and value forwards, policy and value training.
  With `pair_layout="shared_prompt"` RM and DPO run 8 rows of 192 slots (`data.pair_len`) at
  T = 192 instead of 16 x 128."""
  from alignax import flops
  from alignax.models import llama_style
  model = model or llama_style()
  lm = flops.train_flops_per_token(model, SEQ_LEN)
  rm = lm - 6.0 * model.d_model * model.vocab_size + 6.0 * model.d_model
  fwd = lambda train: train / 3.0
  rows, grouped = BATCH * SEQ_LEN, BATCH * PROMPT_LEN + BATCH * GROUP * COMPLETION_LEN
  pairs, pair_lm, pair_rm = 2 * rows, lm, rm
  if pair_layout == "shared_prompt":
    pair_lm = flops.train_flops_per_token(model, PAIR_LEN)
    pairs, pair_rm = BATCH * PAIR_LEN, pair_lm - lm + rm
  passes = {"sft": [(rows, lm)],
            "reward": [(pairs, pair_rm)],
            "dpo": [(pairs, pair_lm + fwd(pair_lm))],
            "grpo": [(grouped, lm + 2 * fwd(lm))],
            "rloo": [(grouped, lm + 2 * fwd(lm))],
            "ppo": [(rows, lm + 3 * fwd(lm) + rm + fwd(rm))]}[task]
  return float(sum(tokens * per_token for tokens, per_token in passes))


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------- the bench


def bench_task(task: str, steps: int | None = None, warmup: int = 3, *, peak_flops: float | None = None,
               bare: bool = True, workdir: str | None = None,
               pair_layout: str = "shared_prompt") -> dict:
  """Times `task` through the real training loop, then its bare jitted step.

  Args:
    task: one of TASKS.
    steps: measured steps (None: 20, or 15 for RL).
    warmup: untimed steps first (>= 1; the first includes compilation).
    peak_flops: matmul peak FLOP/s for MFU (None: measured here).
    bare: also time the bare jitted step.
    workdir: where the records, exports and run go (default: a temporary directory, removed).
    pair_layout: RM and DPO pairs as one row of 192 with the prompt once ("shared_prompt",
      `data.pair_len`) or as two rows of 128 ("two_rows").

  Returns:
    {"task", "seconds" (real loop, per measured step), "median_seconds", "bare_seconds",
    "bare_median_seconds", "warmup_seconds", "data_median_seconds", "distinct_batches",
    "tokens_per_step", "token_def", "tokens_per_s", "bare_tokens_per_s", "flops_per_step",
    "peak_flops", "mfu", "bare_mfu", "peak_rss_mb", "platform", "note", "settings"}.
  """
  if task not in TASKS:
    raise ValueError(task)
  steps = default_steps(task) if steps is None else int(steps)
  if steps < 1 or warmup < 1:
    raise ValueError(f"need steps >= 1 and warmup >= 1, got {steps}, {warmup}")
  import jax
  import numpy as np
  if workdir is None:
    with tempfile.TemporaryDirectory(prefix=f"alignax_workload_{task}_") as tmp:
      return bench_task(task, steps, warmup, peak_flops=peak_flops, bare=bare, workdir=tmp,
                        pair_layout=pair_layout)
  total = warmup + steps
  if pair_layout not in PAIR_LAYOUTS:
    raise ValueError(f"pair_layout must be one of {PAIR_LAYOUTS}, got {pair_layout!r}")
  cfg = prepare_task(task, workdir, total, pair_layout)
  ctx, run = build_stage(cfg)
  stage_after = run.after_step
  state, seconds, batches = run_real_loop(ctx, run)
  measured = seconds[warmup:]
  bare_s = []
  if bare:
    bare_s = bare_step_seconds(ctx, run, state, batches.batches[0], stage_after, warmup, steps)
  if peak_flops is None:
    from alignax import flops
    peak_flops = flops.measure_matmul_peak()
  tok, tok_def = TOKENS_PER_STEP[task]
  work = step_flops(task, ctx.model, pair_layout)
  med = float(np.median(measured))
  bare_med = float(np.median(bare_s)) if bare_s else None
  return {
      "task": task, "seconds": measured, "median_seconds": med,
      "bare_seconds": bare_s, "bare_median_seconds": bare_med,
      "warmup_seconds": seconds[:warmup],
      "data_median_seconds": float(np.median(batches.seconds[warmup:total])),
      "distinct_batches": len(set(batches.fingerprints())), "steps_run": total,
      "tokens_per_step": tok, "token_def": tok_def, "tokens_per_s": tok / med,
      "bare_tokens_per_s": tok / bare_med if bare_med else None,
      "flops_per_step": work, "peak_flops": peak_flops, "mfu": work / med / peak_flops,
      "bare_mfu": work / bare_med / peak_flops if bare_med else None,
      "peak_rss_mb": peak_rss_mb(), "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "note": "; ".join(n for n in (NOTES.get(task, ""), COMMON_NOTE) if n),
      "settings": {"stage": cfg.stage, "log_every": int(ctx.config.train.log_every),
                   "pair_len": int(ctx.config.data.pair_len),
                   "tokenizer_vocab": int(ctx.tokenizer.vocab_size), "eos_id": int(ctx.tokenizer.eos_id),
                   "optimizer": {k: getattr(ctx.config.optimizer, k) for k in
                                 ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm", "schedule")}},
  }


# -------------------------------------------------------------------------------------- main


def _child(task: str, steps: int, warmup: int, peak: float) -> dict:
  with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
    path = f.name
  try:
    cmd = [sys.executable, os.path.abspath(__file__), f"--tasks={task}", f"--steps={steps}",
           f"--warmup={warmup}", "--noisolate", f"--child_json={path}", f"--peak_flops={peak}",
           f"--pair_layout={_PAIRS.value}"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
      tail = "\n".join(p.stderr.strip().splitlines()[-20:])
      return {"task": task, "error": f"rc={p.returncode}: {tail}"}
    with open(path, encoding="utf-8") as f:
      return json.load(f)[0]
  finally:
    os.remove(path)


def _fmt(v, spec):
  return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(results: list[dict]) -> None:
  ok = [r for r in results if "error" not in r]
  kind = ok[0]["device_kind"] if ok else "?"
  peak = ok[0]["peak_flops"] if ok else float("nan")
  print(f"standard CPU workload on {kind}; matmul peak {peak / 1e9:.0f} GFLOP/s (measured in this run)")
  print("median seconds per step: 'loop' = alignax's training loop (fresh batches), 'bare' = its "
        "jitted step on one fixed batch")
  print(f"{'task':<7} {'loop s':>7} {'bare s':>7} {'loop/bare':>9} {'tokens/s':>9} {'MFU':>6} "
        f"{'bare MFU':>8} {'data s':>7} {'peak MB':>8}")
  for r in results:
    if "error" in r:
      print(f"{r['task']:<7} error: {r['error'].splitlines()[-1] if r['error'] else ''}")
      continue
    ratio = r["median_seconds"] / r["bare_median_seconds"] if r.get("bare_median_seconds") else None
    print(f"{r['task']:<7} {r['median_seconds']:>7.3f} {_fmt(r['bare_median_seconds'], '>7.3f')} "
          f"{_fmt(ratio, '>9.2f')} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} "
          f"{_fmt(r['bare_mfu'], '>8.1%')} {r['data_median_seconds']:>7.4f} {r['peak_rss_mb']:>8.0f}")
  if ok:
    print(f"note: {COMMON_NOTE}")
  for r in ok:
    if NOTES.get(r["task"]):
      print(f"note ({r['task']}): {NOTES[r['task']]}")
  for r in results:
    if "error" in r:
      print(f"error ({r['task']}):\n{r['error']}")


def main(_):
  tasks = [t.strip() for t in _TASKS.value.split(",") if t.strip()]
  for t in tasks:
    if t not in TASKS:
      raise app.UsageError(f"unknown task {t!r}; tasks: {', '.join(TASKS)}")
  steps_of = lambda t: _STEPS.value or default_steps(t)
  peak = _PEAK.value or None
  if _ISOLATE.value:
    if peak is None:
      from alignax import flops
      peak = flops.measure_matmul_peak()  # once, before (never beside) the tasks' processes
    results = [_child(t, steps_of(t), _WARMUP.value, peak) for t in tasks]
  else:
    results = [bench_task(t, steps_of(t), _WARMUP.value, peak_flops=peak,
                          pair_layout=_PAIRS.value) for t in tasks]
  if _CHILD_JSON.value:
    with open(_CHILD_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f)
    return
  print_table(results)
  ok = [r for r in results if "error" not in r]
  platform = ok[0]["platform"] if ok else "unknown"
  out = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"workload_{platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"results": results, "warmup": _WARMUP.value,
               "steps": {t: steps_of(t) for t in tasks}}, f, indent=2)
  print(f"wrote {out}")
  if len(ok) < len(results):
    sys.exit(1)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
