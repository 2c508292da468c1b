"""`train.*`, `optimizer.*` and `eval.*`: the loop's, AdamW's and evaluation's typed sections."""

from __future__ import annotations

import dataclasses

from alignax.sections import Section, one_of, require

NONFINITE_POLICIES = ("skip", "halt")  # count a non-finite step and go on, or stop there
RESUME_CHANGED = ("refuse", "allow")  # a resumed run whose config changed: list the keys, or log them
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """Attributes:
    steps: optimizer steps (RL: iterations).
    batch_size: global, in sequences (or pairs, or prompts).
    accum_steps: micro-batches per step; `batch_size` must be divisible by it.
    log_every: steps between metric rows (metrics are fetched from the device only then).
    nonfinite: "skip" or "halt" on a non-finite loss, gradient or update.
    max_nonfinite: under "skip", stop once more steps than this were non-finite (a count >= 1,
      or a fraction < 1 of `steps`), so a run that keeps failing ends with a message.
    resume: continue from WORKDIR's latest checkpoint when there is one.
    resume_changed: "refuse" or "allow" a resume whose config changed in a key that alters the
      data order, the model or the numbers.
    progress: draw a progress bar.
  """

  SECTION = "train"
  steps: int = 300
  batch_size: int = 16
  accum_steps: int = 1
  log_every: int = 10
  nonfinite: str = "skip"
  max_nonfinite: float = 0.1
  resume: bool = True
  resume_changed: str = "refuse"
  progress: bool = True

  def check(self) -> None:
    require(self.steps > 0, "train.steps", f"must be positive, got {self.steps}")
    require(self.batch_size > 0, "train.batch_size", "must be positive")
    require(self.accum_steps > 0, "train.accum_steps", "must be positive")
    require(self.batch_size % self.accum_steps == 0, "train.accum_steps",
            f"batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}")
    require(self.log_every > 0, "train.log_every", "must be positive")
    one_of(self.nonfinite, "train.nonfinite", NONFINITE_POLICIES)
    limit = self.max_nonfinite
    require(limit > 0 and (limit < 1 or limit == int(limit)), "train.max_nonfinite",
            f"must be a fraction in (0, 1) of train.steps or a whole count >= 1, got {limit}")
    one_of(self.resume_changed, "train.resume_changed", RESUME_CHANGED)

  def nonfinite_limit(self, total_steps: int) -> float:
    """Non-finite steps a "skip" run tolerates: `max_nonfinite` as a count, or as a fraction of
    `total_steps` when below 1."""
    limit = self.max_nonfinite
    return limit * total_steps if limit < 1 else limit


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
  """AdamW behind a warmup + decay schedule, with global-norm clipping.

  Attributes:
    lr: peak learning rate.
    b1, b2, eps: Adam's moment decays and denominator epsilon.
    weight_decay: decoupled weight decay (on weight matrices only, unless
      `decay_embeddings_and_norms`).
    clip_norm: global gradient-norm clip; 0 = off.
    warmup_steps: linear warmup from 0 to `lr`.
    schedule: "cosine", "linear" (decays to `lr * min_lr_ratio`) or "constant".
    min_lr_ratio: final lr / peak lr of a decay.
    decay_embeddings_and_norms: weight decay on 1-D params and embeddings too.
  """

  SECTION = "optimizer"
  lr: float = 1e-3
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  warmup_steps: int = 50
  schedule: str = "cosine"
  min_lr_ratio: float = 0.1
  decay_embeddings_and_norms: bool = False

  def check(self) -> None:
    # An infinite lr or eps=0 gives non-finite updates from finite gradients.
    require(self.lr > 0, "optimizer.lr", f"must be positive, got {self.lr}")
    for key in ("b1", "b2"):
      value = getattr(self, key)
      require(0 <= value < 1, f"optimizer.{key}", f"must be in [0, 1), got {value}")
    require(self.eps > 0, "optimizer.eps",
            f"must be positive (it keeps Adam's division finite), got {self.eps}")
    require(self.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")
    require(self.clip_norm >= 0, "optimizer.clip_norm", f"must be >= 0 (0 = off), got {self.clip_norm}")
    require(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "must be in [0, 1]")
    require(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    one_of(self.schedule, "optimizer.schedule", SCHEDULES)


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
  """Every evaluation a run does: loss batches on held-out data and sampled world prompts.

  Attributes:
    every: steps between evaluations (0 = only at the start and the end).
    batches: held-out batches for the loss evaluation.
    num_prompts: world prompts sampled per evaluation (0 = no sampled evaluation).
    temperature: sampling temperature.
    max_new_tokens: response length limit, in tokens.
    batch_size: prompts sampled per call.
    showcase: log a table of sample responses.
    samples_per_prompt: responses sampled per prompt.
    save_samples: write every sample to WORKDIR/eval_samples/step_<step>.jsonl.
  """

  SECTION = "eval"
  every: int = 100
  batches: int = 8
  num_prompts: int = 64
  temperature: float = 1.0
  max_new_tokens: int = 64
  batch_size: int = 32
  showcase: bool = True
  samples_per_prompt: int = 1
  save_samples: bool = False

  def check(self) -> None:
    require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
    require(self.batches >= 0, "eval.batches", f"must be >= 0, got {self.batches}")
    require(self.num_prompts >= 0, "eval.num_prompts", f"must be >= 0, got {self.num_prompts}")
    for key in ("max_new_tokens", "batch_size", "samples_per_prompt"):
      require(getattr(self, key) >= 1, f"eval.{key}", f"must be >= 1, got {getattr(self, key)}")
    require(self.temperature >= 0, "eval.temperature", f"must be >= 0, got {self.temperature}")
