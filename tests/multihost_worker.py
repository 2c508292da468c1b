"""One process of a multi-process (or emulated) run, for tests/test_multihost.py.

  python tests/multihost_worker.py steps --port=P --process_id=I --num_processes=N --out=F \
      [--layouts=NAME,...]
      jax.distributed on localhost:P; trains the shared 5-step problem (`problem`) on the
      LAYOUTS named (default all), this process feeding its rows of each global batch; process 0
      writes {name: [loss, ...]} to F.
  python tests/multihost_worker.py rl --port=P --process_id=I --num_processes=N --out=F \
      [--layouts=NAME,...] [--kinds=ppo,rloo]
      the same for two iterations of the RL problem (`rl_problem`) of each kind; process 0 writes
      {kind: {name: [[loss, score, kl, grad_norm], ...]}} to F.
  python tests/multihost_worker.py reference --shards=N -- --config=... [--config.key=v ...]
      A single-process `alignax train` whose data iterators read N shards and concatenate them
      in shard order: the global batches an N-process run assembles, as the reference its
      metrics must match.

Set XLA_FLAGS (device count) and JAX_PLATFORMS=cpu in the environment before starting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

B, T, STEPS = 16, 32, 5
# name -> (parallel.mode, parallel.mesh): the layouts the single-process reference also runs.
LAYOUTS = {
    "data=8": ("jit", dict(data=8, fsdp=1, tensor=1)),
    "fsdp=8": ("jit", dict(data=1, fsdp=8, tensor=1)),
    "data=2 x fsdp=2 x tensor=2": ("jit", dict(data=2, fsdp=2, tensor=2)),
    "pmap over 8": ("pmap", dict(data=8, fsdp=1, tensor=1)),
}


def problem():
  """(model config, host params, optimizer, loss_fn, host batches): a small Llama, AdamW with
  clipping, masked cross-entropy on 5 batches of 16 x 32 with uneven loss masks."""
  import jax
  import numpy as np

  from alignax.losses.lm import masked_cross_entropy
  from alignax.models import build_lm, llama_style
  from alignax.train.optimizer import make_optimizer

  model = llama_style(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=64)
  lm, params = build_lm(model, 0)
  params = jax.device_get(params)  # host copies: every layout starts from the same numbers
  from alignax.train.config import OptimizerConfig
  opt_cfg = OptimizerConfig(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, warmup_steps=0,
                            schedule="constant", min_lr_ratio=0.1, decay_embeddings_and_norms=False)
  optimizer = make_optimizer(opt_cfg, 100)

  def loss_fn(p, batch, rng, extra, hparams):
    logits, _ = lm.apply(p, batch["tokens"], batch["positions"], batch["segment_ids"])
    return masked_cross_entropy(logits, batch["tokens"], batch["loss_mask"])

  # The same (memorizable) tokens every step, so the loss falls; fresh masks every step. Rows
  # keep 10%..90% of their targets: per-device token counts differ, so only sums and counts
  # reduced before dividing give the 1-device loss.
  tokens = np.random.default_rng(99).integers(0, model.vocab_size, (B, T)).astype(np.int32)
  batches = []
  for i in range(STEPS):
    rng = np.random.default_rng(100 + i)
    keep = rng.uniform(0.1, 0.9, (B, 1))
    mask = (rng.random((B, T)) < keep).astype(np.float32)
    mask[:, 0] = 0
    batches.append(dict(tokens=tokens, positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
                        segment_ids=np.ones((B, T), np.int32), loss_mask=mask))
  return model, params, optimizer, loss_fn, batches


def train_losses(mode: str, mesh: dict, rows: slice | None = None, devices=None):
  """Losses of STEPS steps of the shared train step on `mesh` in `mode`.

  Args:
    rows: this process's rows of each global batch (None: all of them).
  Returns:
    (losses, placement, final state).
  """
  import jax
  import ml_collections

  from alignax import parallel
  from alignax.train.state import TrainState
  from alignax.train.step import make_train_step

  model, params, optimizer, loss_fn, batches = problem()
  cfg = ml_collections.ConfigDict(dict(mode=mode, mesh=mesh))
  placement = parallel.make_placement(cfg, model, B)
  state = placement.put_state(TrainState.create(params, optimizer, jax.random.key(0)))
  step = placement.jit_step(make_train_step(loss_fn, optimizer), state)
  losses = []
  for batch in batches:
    if rows is not None:
      batch = {k: v[rows] for k, v in batch.items()}
    state, metrics = step(state, placement.put_batch(batch))
    losses.append(float(metrics["loss"]))
  return losses, placement, state


def member_losses(mesh: dict, rows: slice | None = None, members: int = 4):
  """[[loss per step] per member] of `members` runs of the LM problem trained as one vmapped
  program on a mesh with a members axis. Member i has its own key, learning-rate scale
  (1 + i) / 2 and batches (the problem's rows rolled by i)."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from alignax import parallel
  from alignax.train import member_placement
  from alignax.train.state import TrainState
  from alignax.train.step import make_train_step

  model, params, optimizer, loss_fn, batches = problem()
  cfg = ml_collections.ConfigDict(dict(mode="jit", mesh=mesh))
  placement = member_placement.MemberPlacement(parallel.make_placement(cfg, model, B, with_members=True), members)
  states = []
  for i in range(members):
    s = TrainState.create(params, optimizer, jax.random.key(i))
    states.append(s.replace(hparams=dict(s.hparams, lr_scale=jnp.float32((1 + i) / 2))))
  state = placement.put_state(jax.device_get(member_placement.stack(states)))
  step = placement.jit_step(make_train_step(loss_fn, optimizer), state)
  out = [[] for _ in range(members)]
  for batch in batches:
    stacked = {k: np.stack([np.roll(v, i, axis=0) for i in range(members)]) for k, v in batch.items()}
    if rows is not None:
      stacked = {k: v[:, rows] for k, v in stacked.items()}
    state, metrics = step(state, placement.put_batch(stacked))
    for i, loss in enumerate(np.asarray(jax.device_get(metrics["loss"]))):
      out[i].append(float(loss))
  return out


def member_reference(members: int = 4):
  """`member_losses` computed run by run on one device."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from alignax.train.state import TrainState
  from alignax.train.step import make_train_step

  model, params, optimizer, loss_fn, batches = problem()
  step = jax.jit(make_train_step(loss_fn, optimizer))
  out = []
  for i in range(members):
    s = TrainState.create(params, optimizer, jax.random.key(i))
    s = s.replace(hparams=dict(s.hparams, lr_scale=jnp.float32((1 + i) / 2)))
    losses = []
    for batch in batches:
      s, m = step(s, {k: np.roll(v, i, axis=0) for k, v in batch.items()})
      losses.append(float(m["loss"]))
    out.append(losses)
  return out


def main_members(args) -> None:
  import jax
  import ml_collections

  from alignax import parallel

  jax.config.update("jax_default_matmul_precision", "highest")
  parallel.maybe_initialize_distributed(ml_collections.ConfigDict(dict(
      coordinator=f"localhost:{args.port}", num_processes=args.num_processes,
      process_id=args.process_id)))
  n = B // jax.process_count()
  rows = slice(jax.process_index() * n, (jax.process_index() + 1) * n)
  losses = member_losses(dict(members=2, data=-1, fsdp=1, tensor=1), rows)
  if jax.process_index() == 0:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(losses, f)
  jax.distributed.shutdown()


# ------------------------------------------------------------------------------ the RL problem

RL_PROMPTS, RL_PROMPT_LEN, RL_NEW = 8, 16, 12


def count_a(prompts, responses):
  """A Python reward: the number of 'a' characters in the response."""
  return [float(r.count("a")) for r in responses]


def rl_problem(kind: str, host_reward: bool = False):
  """(model config, host state, iteration, host prompt batch) of a tiny PPO / GRPO / RLOO problem:
  the policy, reference and reward model from one small Llama, 8 prompts, 12 new tokens, Adam;
  GRPO adds a Python reward function when `host_reward`."""
  import jax
  import ml_collections
  import numpy as np
  import optax

  from alignax.algorithms import critic_free, online, ppo, reward_sources
  from alignax.data.chat import encode_prompt
  from alignax.data.tokenizer import ByteTokenizer
  from alignax.generation.sampler import SamplingConfig
  from alignax.losses import rl
  from alignax.models import build_lm, llama_style
  from alignax.models.heads import build_scalar_model
  from alignax.train.state import TrainState

  tok = ByteTokenizer()
  model = llama_style(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=64)
  lm, params = build_lm(model, 0)
  rm, rm_params = build_scalar_model(model, 1, backbone=params)
  params, rm_params = jax.device_get((params, rm_params))
  prompts = [f"Question {i}?" for i in range(RL_PROMPTS)]
  tokens = np.full((RL_PROMPTS, RL_PROMPT_LEN), tok.pad_id, np.int32)
  mask = np.zeros((RL_PROMPTS, RL_PROMPT_LEN), bool)
  for i, p in enumerate(prompts):
    ids = encode_prompt(tok, p)[-RL_PROMPT_LEN:]
    tokens[i, RL_PROMPT_LEN - len(ids):], mask[i, RL_PROMPT_LEN - len(ids):] = ids, True
  batch = dict(tokens=tokens, mask=mask, valid=np.ones(RL_PROMPTS, np.float32),
               index=np.arange(RL_PROMPTS, dtype=np.int32))
  host = None
  if host_reward:
    host = reward_sources.HostRewards([reward_sources.RewardFunction("worker:count_a", count_a, 1.0, ())],
                              [{"prompt": p} for p in prompts], tok)
  sources = reward_sources.RewardSources(rm, 1.0, host)
  optimizer = optax.adam(1e-3)
  sampling = SamplingConfig(temperature=1.0, max_new_tokens=RL_NEW)
  extra = online.RLState(ref=params, reward=rm_params, kl_coef=np.float32(0.05))
  if kind == "ppo":
    pcfg = ml_collections.ConfigDict(dict(epochs=1, num_minibatches=1, kl_in="reward", kl_estimator="k1",
                                          adaptive_kl=False, whiten_rewards=False, apply_no_eos_score=False))
    state = TrainState.create({"policy": params, "value": rm_params}, optimizer, jax.random.key(0), extra=extra,
                              hparams=dict(clip=0.2, vf_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
                                           target_kl=6.0, horizon=10000.0, no_eos_score=-1.0))
    step = ppo.make_ppo_iteration(lm, rm, sources, optimizer, pcfg, sampling, tok.eos_id, tok.pad_id,
                                  "skip", RL_PROMPTS)
    return model, state, step, batch
  if kind == "grpo":
    gcfg = dict(kl_in="loss", kl_estimator="k3_weighted", loss_agg="seq_mean_token_mean")
    adv = lambda r, g, hp: rl.group_advantages(r, g, scale_by_std=True)
    clip, hparams = (lambda hp: (hp["clip_low"], hp["clip_high"])), dict(clip_low=0.2, clip_high=0.28)
  else:
    gcfg = dict(kl_in="reward", kl_estimator="k1", loss_agg="seq_mean_token_sum_norm")
    adv = lambda r, g, hp: rl.rloo_advantages(r, g)
    clip, hparams = (lambda hp: (hp["clip"], hp["clip"])), dict(clip=0.2)
  gcfg = ml_collections.ConfigDict(dict(gcfg, group_size=2, num_iterations=1, num_minibatches=1,
                                        skip_zero_variance=False))
  state = TrainState.create(params, optimizer, jax.random.key(0), extra=extra, hparams=hparams)
  step = critic_free.make_group_iteration(lm, sources, optimizer, gcfg, sampling, tok.eos_id, tok.pad_id,
                                     "skip", adv, clip)
  return model, state, step, batch


def rl_losses(kind: str, mode: str, mesh: dict, rows=None, steps: int = 2, host_reward: bool = False):
  """[[loss, score, kl, grad_norm] per iteration] of the RL problem on a layout (this process
  feeding `rows` of the prompt batch)."""
  import jax
  import ml_collections

  from alignax import parallel
  model, state, step, batch = rl_problem(kind, host_reward)
  placement = parallel.make_placement(ml_collections.ConfigDict(dict(mode=mode, mesh=mesh)), model,
                                      RL_PROMPTS)
  state = placement.put_state(state)
  fn = placement.jit_step(step, state)
  if rows is not None:
    batch = {k: v[rows] for k, v in batch.items()}
  out = []
  for _ in range(steps):
    state, m = fn(state, placement.put_batch(batch))
    m = jax.device_get(m)
    out.append([float(m[k]) for k in ("loss", "score", "kl", "grad_norm")])
  return out


def main_rl(args) -> None:
  import jax
  import ml_collections

  from alignax import parallel

  jax.config.update("jax_default_matmul_precision", "highest")
  parallel.maybe_initialize_distributed(ml_collections.ConfigDict(dict(
      coordinator=f"localhost:{args.port}", num_processes=args.num_processes,
      process_id=args.process_id)))
  n = RL_PROMPTS // jax.process_count()
  rows = slice(jax.process_index() * n, (jax.process_index() + 1) * n)
  names = args.layouts.split(",") if args.layouts else ["data=8", "pmap over 8"]
  results = {kind: {name: rl_losses(kind, *LAYOUTS[name], rows) for name in names}
             for kind in args.kinds.split(",")}
  if jax.process_index() == 0:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f)
  jax.distributed.shutdown()


def main_steps(args) -> None:
  import jax
  import ml_collections

  from alignax import parallel

  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  parallel.maybe_initialize_distributed(ml_collections.ConfigDict(dict(
      coordinator=f"localhost:{args.port}", num_processes=args.num_processes,
      process_id=args.process_id)))
  n = B // jax.process_count()
  rows = slice(jax.process_index() * n, (jax.process_index() + 1) * n)
  names = args.layouts.split(",") if args.layouts else list(LAYOUTS)
  results = {name: train_losses(*LAYOUTS[name], rows)[0] for name in names}
  if jax.process_index() == 0:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f)
  jax.distributed.shutdown()


class ConcatShards:
  """Batches of N shard iterators concatenated in shard order (what N processes assemble)."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    import numpy as np
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"shards": [it.get_state() for it in self.iterators]}

  def set_state(self, state):
    for it, s in zip(self.iterators, state["shards"]):
      it.set_state(s)

  def stats(self):
    return self.iterators[0].stats()  # process 0's counters: what an N-process run logs


def main_reference(args, config_argv) -> None:
  from absl import flags
  from ml_collections import config_flags

  from alignax.algorithms import run_stage
  from alignax.data import pipeline

  config = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.FLAGS([sys.argv[0]] + config_argv)
  shards = args.shards

  def sharded(make):
    def wrapper(source, tok, batching, **kw):
      assert batching.shard_count == 1, "the reference runs in one process"
      return ConcatShards([make(source, tok, dataclasses.replace(
          batching, batch_size=batching.batch_size // shards, shard_index=i, shard_count=shards),
          **kw) for i in range(shards)])
    return wrapper

  for name in ("lm_pipeline", "sft_pipeline"):
    setattr(pipeline, name, sharded(getattr(pipeline, name)))
  run_stage(config.value)


def main() -> None:
  argv = sys.argv[1:]
  config_argv = []
  if "--" in argv:
    i = argv.index("--")
    argv, config_argv = argv[:i], argv[i + 1:]
  parser = argparse.ArgumentParser()
  parser.add_argument("command", choices=("steps", "reference", "rl", "members"))
  parser.add_argument("--port", type=int)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--out", default="")
  parser.add_argument("--shards", type=int, default=2)
  parser.add_argument("--layouts", default="", help="comma-separated names from LAYOUTS (default all)")
  parser.add_argument("--kinds", default="ppo,rloo", help="RL problems for the rl command")
  args = parser.parse_args(argv)
  if args.command == "steps":
    main_steps(args)
  elif args.command == "rl":
    main_rl(args)
  elif args.command == "members":
    main_members(args)
  else:
    main_reference(args, config_argv)


if __name__ == "__main__":
  main()
