"""The standard CPU workload of ../shared/PERFORMANCE.md, next to the peers' figures.

  python benchmarks/workload.py [--tasks=sft,reward,dpo,ppo,grpo,rloo] [--steps=10]

Llama-style 4 layers, 4 heads, d_model 256, MLP 1024, vocab 512, untied (4.46M params), float32;
sequences of 64 prompt + 64 completion tokens; batch 8 sequences (SFT) or 8 pairs (RM, DPO);
PPO: 8 prompts x 64 new tokens, one policy/value update per iteration, KL coefficient 0.04 (the
reference runs every iteration); GRPO and RLOO: 8 prompts x 4 samples x 64 new tokens, KL
coefficient 0.04 (reference forward every iteration), reward from a Python function called from
the compiled iteration (the fraction of even token ids, as in peerbench's common.py). AdamW, weight decay 0, clip 1.0, constant lr. Time = median
step after warm-up (compilation excluded). Each step is alignax's own jitted, donated train step
with random params and synthetic batches. Differences from the peers' setup are printed.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_TASKS = flags.DEFINE_string("tasks", "sft,reward,dpo,ppo,grpo,rloo", "Comma-separated tasks.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per task.")
_OUT = flags.DEFINE_string("out", "", "JSON path (default benchmarks/results/workload_<platform>.json).")

PEERS = {  # median seconds per step, PERFORMANCE.md (TRL 1.16 / torch 2.13 CPU; Tunix 0.1.7 / JAX 0.10.2)
    "sft": (0.226, 0.209, 0.12), "reward": (0.445, 0.426, 0.24), "dpo": (0.580, 0.503, 0.30),
    "ppo": (None, 0.730, 0.20),
    "grpo": (1.472, 1.441, 0.43), "rloo": (1.724, 1.447, 0.43),
}
NOTES = {
    "ppo": "reward from alignax's reward model (a transformer forward), plus a value model, "
           "where the peers' workload scores with a Python function",
}


def _setup():
  import ml_collections

  from alignax.models import llama_style
  from alignax.train.config import OptimizerConfig
  model = llama_style()  # the 4.46M workload model
  opt = OptimizerConfig(weight_decay=0.0, clip_norm=1.0, schedule="constant", warmup_steps=0, lr=1e-5)
  return model, opt, ml_collections


def _lm_batch(rng, b, t, vocab, prompt=64):
  import numpy as np
  mask = np.zeros((b, t), np.float32)
  mask[:, prompt:] = 1.0
  return dict(tokens=rng.integers(0, vocab, (b, t)).astype(np.int32),
              positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
              segment_ids=np.ones((b, t), np.int32), loss_mask=mask)


class WordTokenizer:
  """The peer workload's vocabulary for decoding: id i >= 4 is the word "t<i>"."""

  eos_id, pad_id = 1, 0

  def decode(self, ids):
    return " ".join(f"t{int(i)}" for i in ids)


def even_fraction(prompts, responses):
  """The peer workload's reward: the fraction of even token ids in each decoded completion."""
  import re
  out = []
  for text in responses:
    ids = [int(m) for m in re.findall(r"t(\d+)", text)]
    out.append(sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1))
  return out


def _group_step(task, lm, params, optimizer, model, b, rng):
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from alignax.algorithms import critic_free, online, reward_sources
  from alignax.generation import SamplingConfig
  from alignax.losses import rl
  from alignax.train.state import TrainState
  prompts = rng.integers(4, model.vocab_size, (b, 64)).astype(np.int32)
  records = [{"prompt": WordTokenizer().decode(p)} for p in prompts]
  host = reward_sources.HostRewards([reward_sources.RewardFunction("workload:even_fraction", even_fraction, 1.0, ())],
                            records, WordTokenizer())
  sources = reward_sources.RewardSources(None, 0.0, host)
  if task == "grpo":
    gcfg = dict(kl_in="loss", kl_estimator="k3_weighted", loss_agg="seq_mean_token_mean")
    adv = lambda r, g, hp: rl.group_advantages(r, g, scale_by_std=True)
    hparams = dict(clip_low=0.2, clip_high=0.2)
    clip = lambda hp: (hp["clip_low"], hp["clip_high"])
  else:
    gcfg = dict(kl_in="reward", kl_estimator="k1", loss_agg="seq_mean_token_sum_norm")
    adv = lambda r, g, hp: rl.rloo_advantages(r, g)
    hparams = dict(clip=0.2)
    clip = lambda hp: (hp["clip"], hp["clip"])
  gcfg = ml_collections.ConfigDict(dict(gcfg, group_size=4, num_iterations=1, num_minibatches=1,
                                        skip_zero_variance=False))
  sampling = SamplingConfig(temperature=1.0, max_new_tokens=64)
  # eos id outside the vocabulary: every response runs the full 64 tokens, as in the workload.
  step = critic_free.make_group_iteration(lm, sources, optimizer, gcfg, sampling, model.vocab_size + 1, 0,
                                     "skip", adv, clip)
  state = TrainState.create(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(0),
                            extra=online.RLState(ref=jax.tree.map(jnp.copy, params), reward=None,
                                                 kl_coef=jnp.asarray(0.04, jnp.float32)),
                            hparams=hparams)
  batch = dict(tokens=prompts, mask=np.ones((b, 64), bool), valid=np.ones(b, np.float32),
               index=np.arange(b, dtype=np.int32))
  return step, state, batch, sources


def bench_task(task: str, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from alignax import flops
  from alignax.algorithms import dpo, ppo, reward
  from alignax.algorithms.pretrain import lm_loss
  from alignax.generation import SamplingConfig
  from alignax.models import build_lm
  from alignax.models.heads import build_scalar_model
  from alignax.train.optimizer import make_optimizer
  from alignax.train.state import TrainState
  from alignax.train.step import make_train_step

  model, opt_cfg, mlc = _setup()
  optimizer = make_optimizer(opt_cfg, 1000)
  rng = np.random.default_rng(0)
  lm, params = build_lm(model, 0)
  b, t = 8, 128
  if task == "sft":
    step = make_train_step(lm_loss(lm), optimizer)
    state = TrainState.create(params, optimizer, jax.random.key(0))
    batch = _lm_batch(rng, b, t, model.vocab_size)
  elif task in ("reward", "dpo"):
    pair = lambda: {**_lm_batch(rng, b, t, model.vocab_size), "response_len": np.full(b, 64, np.int32)}
    batch = dict(chosen=pair(), rejected=pair(), valid=np.ones(b, np.float32), margin=np.zeros(b, np.float32))
    if task == "reward":
      rm, rm_params = build_scalar_model(model, 1, backbone=params)
      step = make_train_step(reward.reward_loss(rm, False), optimizer)
      state = TrainState.create(rm_params, optimizer, jax.random.key(0), hparams={"center_coef": 0.0})
    else:
      step = make_train_step(dpo.make_dpo_loss(lm, "sigmoid"), optimizer)
      state = TrainState.create(params, optimizer, jax.random.key(0),
                                extra={"ref": jax.tree.map(jnp.copy, params)},
                                hparams=dict(beta=0.1, label_smoothing=0.0, gamma=0.0))
  elif task == "ppo":
    from alignax.algorithms import online, reward_sources
    rm, rm_params = build_scalar_model(model, 1, backbone=params)
    pcfg = mlc.ConfigDict(dict(epochs=1, num_minibatches=1, kl_in="reward", kl_estimator="k1",
                               adaptive_kl=False, whiten_rewards=False, apply_no_eos_score=True))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=64)
    # eos id outside the vocabulary: every response runs the full 64 tokens, as in the workload.
    step = ppo.make_ppo_iteration(lm, rm, reward_sources.RewardSources(rm, 1.0), optimizer, pcfg, sampling,
                                  model.vocab_size + 1, 0, "skip", b)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    state = TrainState.create({"policy": copy(params), "value": copy(rm_params)}, optimizer, jax.random.key(0),
                              extra=online.RLState(ref=copy(params), reward=rm_params,
                                                   kl_coef=jnp.asarray(0.04, jnp.float32)),
                              hparams=dict(clip=0.2, vf_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
                                           target_kl=6.0, horizon=10000.0, no_eos_score=-1.0))
    batch = dict(tokens=rng.integers(0, model.vocab_size, (b, 64)).astype(np.int32),
                 mask=np.ones((b, 64), bool), valid=np.ones(b, np.float32), index=np.arange(b, dtype=np.int32))
  elif task in ("grpo", "rloo"):
    step, state, batch, sources = _group_step(task, lm, params, optimizer, model, b, rng)
  else:
    raise ValueError(task)
  jitted = jax.jit(step, donate_argnums=0)
  holder = {"state": state}

  def run():
    holder["state"], m = jitted(holder["state"], batch)
    jax.block_until_ready(m)
    if task in ("grpo", "rloo"):
      sources.check()

  run()  # compile
  median, times = flops.median_seconds(run, warmup=2, repeats=steps)
  return {"task": task, "median_seconds": median, "seconds": times,
          "platform": jax.devices()[0].platform, "note": NOTES.get(task, "")}


def main(_):
  import jax
  results = [bench_task(t.strip(), _STEPS.value) for t in _TASKS.value.split(",") if t.strip()]
  print(f"standard CPU workload, {jax.devices()[0].device_kind}, median seconds per step")
  print(f"{'task':<8} {'alignax':>8} {'TRL':>7} {'Tunix':>7} {'target':>7}")
  for r in results:
    trl, tunix, target = PEERS[r["task"]]
    fmt = lambda v: f"{v:.3f}" if v is not None else "n/a"
    print(f"{r['task']:<8} {r['median_seconds']:>8.3f} {fmt(trl):>7} {fmt(tunix):>7} {fmt(target):>7}")
  for r in results:
    if r["note"]:
      print(f"note ({r['task']}): {r['note']}")
  out = _OUT.value or os.path.join(os.path.dirname(__file__), "results", f"workload_{results[0]['platform']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"results": results, "peers": PEERS}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
