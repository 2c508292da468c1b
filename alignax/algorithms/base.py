"""An algorithm is a record of pure pieces, not a trainer class (optax's `GradientTransformation`
idea applied to training stages).

  ALGORITHM = Algorithm(
      name="grpo", records="prompts", section="grpo",
      hparams=("clip_low", "clip_high", "kl_coef"),
      upstream={"init": "sft", "reward_model": "reward"},
      build=build_run, export=export, validate=validate)

`build(ctx) -> Run` returns the initial state, the pure step `(state, batch) -> (state, metrics)`,
the checkpointable batch iterator and the evaluation; the shared runner does everything with side
effects (placement, jit, the loop, checkpoints, signals) and then calls `export(ctx, state)`.
`alignax.algorithms.registry` holds one line per algorithm and derives every stage list from the
records (the CLI's `config.stage`, the pipeline's order and wiring, the report's models, which
exports carry a chat template); `alignax.algorithms.run_stage` trains one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

RECORD_FORMATS = ("text", "sft", "preference", "unpaired", "prompts")
# Keys every stage can vectorize: the seed (init, data order, sampling keys live in the state and
# the data iterator) and the optimizer's numbers (the learning rate through `lr_scale`, the rest
# in optax's injected hyperparameters, which are optimizer state).
COMMON_VECTORIZED = ("seed", "optimizer.lr", "optimizer.weight_decay", "optimizer.b1",
                     "optimizer.b2", "optimizer.eps")


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One training stage.

  Attributes:
    name: the stage name (`config.stage`, the pipeline's section and subdirectory).
    records: the record schema it trains on (`alignax.data.schemas`): "text", "sft",
      "preference" (or "unpaired" for KTO), "prompts".
    section: the config section holding its own hyperparameters ("dpo", "ppo", ...), or None.
    hparams: keys of `section` that are continuous: they enter the step as float32 arrays in
      `TrainState.hparams` (never as Python constants), so one compiled step serves any value
      and a sweep can vmap over them. Every run also has `lr_scale`.
    upstream: config field -> the stage whose export it names, e.g. {"init": "sft",
      "reward_model": "reward"}; `init` is the export the model (and tokenizer) comes from.
    build: `(StageContext) -> Run`: initial state, pure step, batches, evaluation.
    export: `(StageContext, TrainState) -> None`: writes WORKDIR/export when training finishes.
    validate: `(ConfigDict) -> None`, stage-specific checks raising ConfigError naming the key.
    chat: trains on chat-formatted conversations (its export carries the chat template, which
      the stages built on it keep).
    policy: its export is a language-model policy (the report samples it).
    report_name: the policy's name in the report (default: `name`).
    report_format: how the report prompts it: "chat" (the chat template) or "raw" (bare text).
    optional: not run by default in the pipeline (a user adds it to `config.stages`).
    needs: `(cfg) -> fields of upstream` this config actually uses (default: all of them; e.g.
      GRPO without a reward-model source needs no reward-model run).
    state_keys: keys of `section` that are not hparams but still enter the run only through its
      state (e.g. PPO's initial `kl_coef`, which the adaptive controller updates in `extra`).
    members_of: `(cfg) -> [(name, member cfg)] | None`: when the config asks for several runs
      trained together as one (a reward-model ensemble), their configs; `run_stage` trains them
      as members of one vectorized program, then calls `combine(cfg, member workdirs)`.
    combine: writes the stage's export (and evaluation) from its members' runs.
  """

  name: str
  records: str
  section: str | None
  hparams: tuple[str, ...]
  upstream: Mapping[str, str]
  build: Callable
  export: Callable
  validate: Callable | None = None
  chat: bool = True
  policy: bool = True
  report_name: str | None = None
  report_format: str = "chat"
  optional: bool = False
  needs: Callable | None = None
  state_keys: tuple[str, ...] = ()
  members_of: Callable | None = None
  combine: Callable | None = None

  def __post_init__(self):
    if self.records not in RECORD_FORMATS:
      raise ValueError(f"algorithm {self.name}: records must be one of {RECORD_FORMATS}")
    if self.hparams and self.section is None:
      raise ValueError(f"algorithm {self.name}: continuous hparams need a config section")
    if (self.members_of is None) != (self.combine is None):
      raise ValueError(f"algorithm {self.name}: members_of and combine come together")
    if self.report_format not in ("chat", "raw"):
      raise ValueError(f"algorithm {self.name}: report_format must be 'chat' or 'raw'")

  @property
  def display_name(self) -> str:
    return self.report_name or self.name

  def hparams_of(self, cfg) -> dict[str, float]:
    """The continuous hyperparameters' values in `cfg` (for `TrainState.create(hparams=...)`)."""
    if not self.hparams:
      return {}
    section = cfg[self.section]
    return {key: float(section[key]) for key in self.hparams}

  def vectorized_keys(self) -> tuple[str, ...]:
    """Config keys whose values reach the step only as data, so runs differing in them alone
    can be members of one vmapped program (`alignax sweep --vectorize`)."""
    own = () if self.section is None else tuple(f"{self.section}.{k}"
                                                for k in self.hparams + self.state_keys)
    return COMMON_VECTORIZED + own

  def needed_upstream(self, cfg) -> tuple[str, ...]:
    return tuple(self.needs(cfg)) if self.needs is not None else tuple(self.upstream)
