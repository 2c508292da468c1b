"""Stage 5, direct preference optimization and its family, from the SFT model.

Policy and frozen reference start from the SFT export (`init.workdir`). Chosen and rejected go
through the policy in one concatenated [2B, T] forward; per-sequence logprob sums over the
response tokens feed `alignax.losses.preference.dpo_loss` (`dpo.loss_type`: sigmoid, robust, ipo,
hinge, simpo, orpo) or, for unpaired data, `kto_loss` (`dpo.loss_type = "kto"`). With
`dpo.soft_labels` (sigmoid) the records' "chosen_prob" soft labels are the target.

Reference logprobs are computed on the fly (one reference forward per step) or, with
`dpo.precompute_ref`, once over the training set before training (cached in
`WORKDIR/reference_logps.npz` with a key of everything they depend on: the reference export,
model, tokenizer, pipeline settings and the records; any change recomputes them) and looked up
by record index: the reference then costs nothing per step and both ways give the same step.

Eval: held-out implicit-reward accuracy and loss; on the world task, gold reward of samples and
the sequence KL to the reference (nats).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from alignax import checkpoint as ckpt_lib
from alignax import parallel
from alignax.algorithms.base import Algorithm
from alignax.algorithms.common import batch_options, load_lm_export, stage_datasets, with_lora
from alignax.algorithms.shared_prompt import packed_pair_logps
from alignax.algorithms.reference_cache import (
  load_cached_reference,
  reference_cache_key,
)
from alignax.algorithms.world_eval import WorldEvaluator
from alignax.config import ConfigDict, ConfigError
from alignax.data import pipeline, sources
from alignax.losses.lm import next_token_logprobs, sequence_logprobs
from alignax.losses.preference import LOSS_TYPES, SOFT_LABEL_LOSS_TYPES, dpo_loss, kto_loss
from alignax.models import lora
from alignax.train.loop import Run
from alignax.train.optimizer import make_optimizer
from alignax.train.runner import StageContext
from alignax.train.state import TrainState
from alignax.train.step import make_train_step

REFERENCE_FREE = ("simpo", "orpo")


def sequence_logps(lm, params, batch) -> jax.Array:
  """[B] sums of response-token logprobs of an LM batch (loss_mask marks the response)."""
  logits, _ = lm.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
  return sequence_logprobs(next_token_logprobs(logits, batch["tokens"]), batch["loss_mask"])


def concat_pairs(batch) -> dict:
  """The chosen and rejected LM batches stacked into one [2B, T] batch (chosen first)."""
  c, r = batch["chosen"], batch["rejected"]
  return {k: jnp.concatenate([c[k], r[k]], axis=0) for k in ("tokens", "positions", "segment_ids", "loss_mask")}


def pair_logps(lm, params, batch, pair_len: int = 0):
  """(chosen [B], rejected [B]) logprob sums from one concatenated [2B, T] forward, or with
  `pair_len` > 0 (`data.pair_len`) from one [B, pair_len] forward of the packed pairs
  (`alignax.algorithms.shared_prompt`)."""
  if pair_len:
    return packed_pair_logps(lm, params, batch, pair_len)
  logps = sequence_logps(lm, params, concat_pairs(batch))
  b = batch["chosen"]["tokens"].shape[0]
  return logps[:b], logps[b:]


def reference_pair_logps(lm, batch, extra, params, pair_len: int = 0):
  """Reference sums: precomputed ones riding in the batch, else a forward of `extra["ref"]`
  (of the base model with the adapters off, for a LoRA run)."""
  if "ref_chosen" in batch:
    return batch["ref_chosen"], batch["ref_rejected"]
  rc, rr = pair_logps(lm, lora.reference(extra["ref"], params), batch, pair_len)
  return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)


def make_dpo_loss(lm, loss_type: str, soft_labels: bool = False, pair_len: int = 0):
  """The preference loss `loss_type` of a pair batch; beta, label_smoothing and gamma come from
  `hparams` (arrays, so one compiled step serves every value). `soft_labels` (sigmoid only)
  fits the batch's "chosen_prob" soft labels, combined with label_smoothing as in
  `soft_label_eps`. `pair_len` > 0 runs policy and reference on the packed pairs."""

  def loss_fn(params, batch, rng, extra, hparams):
    """The `loss_type` loss of a pair batch {"chosen", "rejected": LM rows [B, T] with
    "response_len" [B], "valid" [B], "chosen_prob" [B] (read with soft_labels);
    "ref_chosen"/"ref_rejected" [B] nats when the reference is precomputed, else the reference params in `extra["ref"]`}: (sum, count, metrics) of the batch: `sum` of the per-pair loss in nats, `count` of pairs
    (the step divides the summed sums by the summed counts, so micro-batches and devices weigh
    every pair alike), `metrics` {name: scalar}."""
    pc, pr = pair_logps(lm, params, batch, pair_len)
    rc = rr = None
    if loss_type not in REFERENCE_FREE:
      rc, rr = reference_pair_logps(lm, batch, extra, params, pair_len)
    return dpo_loss(loss_type, pc, pr, rc, rr, beta=hparams["beta"],
                    label_smoothing=hparams["label_smoothing"], gamma=hparams["gamma"],
                    len_chosen=batch["chosen"]["response_len"].astype(jnp.float32),
                    len_rejected=batch["rejected"]["response_len"].astype(jnp.float32),
                    target_prob=batch["chosen_prob"] if soft_labels else None,
                    weights=batch["valid"])
  return loss_fn


# ---------------------------------------------------------------------------------------------
# KTO: unpaired completions; the reference point comes from mismatched (prompt, completion) pairs.


def mismatched_pairs(batch) -> dict:
  """Row i: the prompt of row i followed by the completion of row i + 1 (mod B), right-padded.

  Rows are [prompt | completion | padding] with loss_mask on the completion. Used for KTO's KL
  reference point (Ethayarajh et al. 2024), an estimate of KL(pi || ref) on unrelated pairs.
  """
  tokens, mask = batch["tokens"], batch["loss_mask"]
  b, t = tokens.shape
  starts = jnp.argmax(mask > 0, axis=1)  # first completion token = prompt length
  lengths = jnp.sum(mask > 0, axis=1)
  j = (jnp.arange(b) + 1) % b
  col = jnp.arange(t)[None, :]
  offset = col - starts[:, None]  # position inside the borrowed completion
  in_completion = (offset >= 0) & (offset < lengths[j][:, None])
  src = jnp.clip(starts[j][:, None] + offset, 0, t - 1)
  borrowed = jnp.take_along_axis(tokens[j], src, axis=1)
  is_prompt = col < starts[:, None]
  new_tokens = jnp.where(is_prompt, tokens, jnp.where(in_completion, borrowed, 0))
  segments = (is_prompt & (batch["segment_ids"] > 0)) | in_completion
  return dict(tokens=new_tokens, positions=col * segments, segment_ids=segments.astype(jnp.int32),
              loss_mask=in_completion.astype(jnp.float32))


def make_kto_loss(lm):
  """KTO's loss (Ethayarajh et al. 2024) of unpaired completions, with the KL reference point
  estimated on mismatched (prompt, completion) pairs of the same batch."""
  def loss_fn(params, batch, rng, extra, hparams):
    """KTO loss of an unpaired batch {"tokens", "positions", "segment_ids", "loss_mask" [B, T],
    "label" [B] (1 desirable, 0 undesirable), "valid" [B]}, reference params in `extra["ref"]`:
    (sum, count, metrics) of the batch: `sum` of the per-completion loss in nats, `count` of completions
    (the step divides the summed sums by the summed counts, so micro-batches and devices weigh
    every completion alike), `metrics` {name: scalar}."""
    lm_batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    policy = sequence_logps(lm, params, lm_batch)
    ref_params = lora.reference(extra["ref"], params)
    ref = jax.lax.stop_gradient(sequence_logps(lm, ref_params, lm_batch))
    kl_batch = mismatched_pairs(lm_batch)
    kl_policy = sequence_logps(lm, params, kl_batch)
    kl_ref = sequence_logps(lm, ref_params, kl_batch)
    w = batch["valid"]
    z = jax.lax.stop_gradient(jnp.sum((kl_policy - kl_ref) * w) / jnp.maximum(jnp.sum(w), 1.0))
    return kto_loss(policy, ref, batch["label"], z, beta=hparams["beta"],
                    desirable_weight=hparams["kto_desirable_weight"],
                    undesirable_weight=hparams["kto_undesirable_weight"], weights=w)
  return loss_fn


def pairs_to_unpaired(records) -> list[dict]:
  """Preference pairs -> KTO examples: chosen desirable, rejected undesirable."""
  out = []
  for i in range(len(records)):
    r = records[i]
    out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
    out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
  return out


# ---------------------------------------------------------------------------------------------
# Precomputed reference logprobs.


class WithReference(pipeline.MapBatches):
  """Adds `ref_chosen`/`ref_rejected` [B] to each preference batch by record index."""

  def __init__(self, it, ref_chosen: np.ndarray, ref_rejected: np.ndarray):
    super().__init__(it, self._add)
    self.ref_chosen, self.ref_rejected = ref_chosen, ref_rejected

  def _add(self, batch):
    batch = dict(batch)
    idx = np.asarray(batch["index"])
    ok = idx >= 0
    safe = np.where(ok, idx, 0)
    batch["ref_chosen"] = np.where(ok, self.ref_chosen[safe], 0.0).astype(np.float32)
    batch["ref_rejected"] = np.where(ok, self.ref_rejected[safe], 0.0).astype(np.float32)
    return batch


def precompute_reference(ctx: StageContext, lm, ref_params, source, batching, seq_len: int,
                         path: str, key: dict[str, str], pair_len: int = 0):
  """Reference logprob sums (chosen [N], rejected [N], float32 nats; NaN for records the
  pipeline skipped) of every training pair, by record index.

  Cached at `path` with `key` (`reference_cache_key`): reused only when every part matches.
  """
  cached = load_cached_reference(path, key)
  if cached is not None:
    return cached
  n = len(source)
  fn = parallel.jit_eval(ctx.placement, lambda p, b: pair_logps(lm, p, b, pair_len), ref_params)
  chosen = np.full(n, np.nan, np.float32)
  rejected = np.full(n, np.nan, np.float32)
  # Every process computes all records, in order, once.
  once = dataclasses.replace(batching, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
  it = pipeline.preference_pipeline(source, ctx.tokenizer, once, seq_len=seq_len,
                                    pair_len=pair_len)
  for batch in it:
    c, r = jax.device_get(fn(ref_params, ctx.placement.put_batch(
        {k: batch[k] for k in ("chosen", "rejected", "prompt_len")})))
    idx = np.asarray(batch["index"])
    ok = idx >= 0
    chosen[idx[ok]], rejected[idx[ok]] = np.asarray(c)[ok], np.asarray(r)[ok]
  skipped = int(np.isnan(chosen).sum())
  if skipped:
    logging.info("reference logprobs: %d records were skipped by the pipeline (bad records)", skipped)
  if ctx.is_main:
    tmp = path + ".tmp.npz"
    np.savez(tmp, chosen=chosen, rejected=rejected, num_records=n, key=json.dumps(key, sort_keys=True))
    os.replace(tmp, path)
  return chosen, rejected


# ---------------------------------------------------------------------------------------------


def validate(cfg: ConfigDict) -> None:
  """`dpo.*`: a known loss_type, beta > 0, label_smoothing in [0, 0.5), precompute_ref only for
  losses that use a reference, soft_labels only for the loss types that define them."""
  d = cfg.dpo
  if d.loss_type not in LOSS_TYPES + ("kto",):
    raise ConfigError(f"config.dpo.loss_type: must be one of {LOSS_TYPES + ('kto',)}, got {d.loss_type!r}")
  if d.beta <= 0:
    raise ConfigError(f"config.dpo.beta: must be positive, got {d.beta}")
  if not 0 <= d.label_smoothing < 0.5:
    raise ConfigError(f"config.dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing}")
  if d.precompute_ref and d.loss_type in REFERENCE_FREE + ("kto",):
    raise ConfigError(f"config.dpo.precompute_ref: not used by loss_type={d.loss_type!r}; set it False")
  if d.loss_type == "kto" and cfg.data.get("pair_len", 0):
    raise ConfigError("config.data.pair_len: packs preference pairs; loss_type='kto' reads "
                      "unpaired completions, set it 0")
  if d.get("soft_labels", False) and d.loss_type not in SOFT_LABEL_LOSS_TYPES:
    raise ConfigError(f"config.dpo.soft_labels: defined for loss_type in {SOFT_LABEL_LOSS_TYPES}, "
                      f"not {d.loss_type!r}; set it False")


class PreferenceEval:
  """Held-out loss and implicit-reward accuracy, plus world metrics and KL to the reference."""

  def __init__(self, ctx, lm, loss_fn, eval_batches, world_eval):
    self.ctx, self.lm, self.loss_fn, self.eval_batches, self.world_eval = ctx, lm, loss_fn, eval_batches, world_eval
    self._fn = None

  def __call__(self, state: TrainState) -> dict[str, float]:
    out = {}
    if self.eval_batches:
      if self._fn is None:
        self._fn = jax.jit(lambda p, b, e, h: self.loss_fn(p, b, None, e, h))
      total = count = acc = 0.0
      for batch in self.eval_batches:
        s, c, m = jax.device_get(self._fn(state.params, self.ctx.placement.put_batch(batch), state.extra,
                                          state.hparams))
        total, count = total + float(s), count + float(c)
        acc += float(m.get("rewards/accuracy", np.nan)) * float(c)
      out["loss"] = total / max(count, 1.0)
      if self.ctx.cfg.dpo.loss_type != "kto":
        out["rewards/accuracy"] = acc / max(count, 1.0)
    if self.world_eval is not None:
      out.update(self.world_eval(state.params, int(state.step), reference=(self.lm, lora.reference(state.extra["ref"], state.params))))
    return out


def build_run(ctx: StageContext) -> Run:
  """The DPO-family Run: the `init.workdir` SFT export as the policy's start and the frozen
  reference, preference pairs (unpaired completions for KTO), the `dpo.loss_type` step, and the
  held-out preference metrics plus, on the world, the sampled gold evaluation with KL to the
  reference. With `dpo.precompute_ref`, the reference logprobs are computed once (cached in
  WORKDIR/reference_logps.npz) and ride in the batches."""
  cfg, dcfg = ctx.cfg, ctx.cfg.dpo
  config = ctx.config
  kto = dcfg.loss_type == "kto"
  splits = sources.split_sources(config.data, "preference", config.world)
  if kto and config.data.source == "world":
    splits = {k: (pairs_to_unpaired(v) if v is not None else None) for k, v in splits.items()}
  data = stage_datasets(ctx, "unpaired" if kto else "preference", splits=splits)
  train_iter = data.train
  pair_len = config.data.pair_len
  reference_args = dict(seq_len=config.data.seq_len, bad_records=config.data.bad_records,
                        chat_template=config.data.chat_template, pair_len=pair_len)

  lm, sft_params = load_lm_export(cfg.init.workdir, ctx.model, ctx.placement)
  if dcfg.precompute_ref:
    ref_c, ref_r = precompute_reference(ctx, lm, sft_params, splits["train"],
                                        batch_options(config), config.data.seq_len,
                                        os.path.join(config.workdir, "reference_logps.npz"),
                                        reference_cache_key(ctx, splits["train"], reference_args),
                                        pair_len)
    train_iter = WithReference(train_iter, ref_c, ref_r)
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  # The reference rides in `extra` (needed for on-the-fly reference logprobs, KTO and eval KL);
  # a LoRA run's reference is its own frozen base, so it holds no second copy.
  params, ref = with_lora(config, sft_params)
  state = TrainState.create(params, optimizer, jax.random.key(config.seed),
                            extra={"ref": ref}, hparams=ALGORITHM.hparams_of(cfg))
  state = ctx.placement.put_state(state)
  loss_fn = (make_kto_loss(lm) if kto else
             make_dpo_loss(lm, dcfg.loss_type, bool(dcfg.get("soft_labels", False)), pair_len))
  step = make_train_step(loss_fn, optimizer, accum_steps=config.train.accum_steps,
                         nonfinite_policy=config.train.nonfinite)
  world_eval = (WorldEvaluator(config, lm, ctx.tokenizer, ctx.writer)
                if config.data.source == "world" and config.eval.num_prompts > 0 else None)
  # Eval batches never carry precomputed reference logprobs: the reference forward runs there.
  evaluate = PreferenceEval(ctx, lm, loss_fn, data.eval, world_eval)

  return Run(name=f"dpo[{dcfg.loss_type}]", state=state, train_step=step, batches=train_iter,
             evaluate=evaluate, total_steps=config.train.steps)


def export(ctx: StageContext, state) -> None:
  """Writes WORKDIR/export with the chat template, the loss type and beta."""
  ckpt_lib.save_export(ctx.config.workdir, state.params, model=ctx.model, stage="dpo",
                       tokenizer=ctx.config.tokenizer, chat_template=ctx.config.data.chat_template,
                       extra={"loss_type": ctx.cfg.dpo.loss_type, "beta": float(ctx.cfg.dpo.beta)})


ALGORITHM = Algorithm(name="dpo", records="preference", section="dpo",
                      hparams=("beta", "label_smoothing", "gamma", "kto_desirable_weight",
                               "kto_undesirable_weight"),
                      upstream={"init": "sft"}, build=build_run, export=export, validate=validate)
