"""The online RL iteration in pieces: one PPO / GRPO / RLOO iteration on a tiny model, reward
sources (reward model, Python functions, weighted sums, failures), and every layout (pmap and jit
meshes on 8 devices) reaching the 1-device losses."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alignax.algorithms import critic_free, online, ppo, reward_sources
from alignax.data.chat import encode_prompt
from alignax.data.tokenizer import ByteTokenizer
from alignax.generation.sampler import SamplingConfig
from alignax.generation.sampler import generate
from alignax.generation.scoring import grouped_response_logprobs, response_logprobs
from alignax.losses import rl
from alignax.models import build_lm
from alignax.models.heads import build_scalar_model
from alignax.train.state import TrainState
from multihost_worker import rl_losses

TOK = ByteTokenizer()
PROMPTS = [f"Question {i}?" for i in range(8)]
RECORDS = [{"prompt": p} for p in PROMPTS]
P_LEN, N_NEW = 16, 12


def prompt_batch(n=8):
  tokens = np.full((n, P_LEN), TOK.pad_id, np.int32)
  mask = np.zeros((n, P_LEN), bool)
  for i, p in enumerate(PROMPTS[:n]):
    ids = encode_prompt(TOK, p)[-P_LEN:]
    tokens[i, P_LEN - len(ids):], mask[i, P_LEN - len(ids):] = ids, True
  return dict(tokens=tokens, mask=mask, valid=np.ones(n, np.float32), index=np.arange(n, dtype=np.int32))


def count_a(prompts, responses):
  """A Python reward: the number of 'a' characters in the response."""
  return [float(r.count("a")) for r in responses]


def host(*fns, weights=None):
  weights = weights or [1.0] * len(fns)
  return reward_sources.HostRewards([reward_sources.RewardFunction(f"tests:{f.__name__}", f, w, ()) for f, w in zip(fns, weights)],
                            RECORDS, TOK)


def _group_cfg(**kw):
  values = dict(group_size=2, num_iterations=1, num_minibatches=1, loss_agg="seq_mean_token_mean",
                kl_in="loss", kl_estimator="k3_weighted", skip_zero_variance=False)
  values.update(kw)
  return ml_collections.ConfigDict(values)


def _ppo_cfg(**kw):
  values = dict(epochs=1, num_minibatches=1, kl_in="reward", kl_estimator="k1", adaptive_kl=False,
                whiten_rewards=False, apply_no_eos_score=False)
  values.update(kw)
  return ml_collections.ConfigDict(values)


PPO_HP = dict(clip=0.2, vf_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, target_kl=6.0, horizon=10000.0,
              no_eos_score=-1.0)


@pytest.fixture
def models(tiny_llama):
  lm, params = build_lm(tiny_llama, seed=0)
  rm, rm_params = build_scalar_model(tiny_llama, 1, backbone=params)
  return lm, params, rm, rm_params


def _ppo_setup(models, optimizer, sources=None, **kw):
  lm, params, rm, rm_params = models
  sources = sources or reward_sources.RewardSources(rm, 1.0)
  copy = online.copy_tree
  state = TrainState.create({"policy": copy(params), "value": copy(rm_params)}, optimizer, jax.random.key(0),
                            extra=online.RLState(ref=copy(params), reward=rm_params, kl_coef=jnp.float32(0.05)),
                            hparams=PPO_HP)
  step = ppo.make_ppo_iteration(lm, rm, sources, optimizer, _ppo_cfg(**kw),
                                SamplingConfig(temperature=1.0, max_new_tokens=N_NEW), TOK.eos_id, TOK.pad_id,
                                "skip", 8)
  return state, step


def _group_setup(models, optimizer, kind="grpo", sources=None, **kw):
  lm, params, rm, rm_params = models
  sources = sources or reward_sources.RewardSources(rm, 1.0)
  if kind == "grpo":
    adv = lambda r, g, hp: rl.group_advantages(r, g, scale_by_std=True)
    clip = lambda hp: (hp["clip_low"], hp["clip_high"])
    hparams = dict(clip_low=0.2, clip_high=0.28)
  else:
    adv = lambda r, g, hp: rl.rloo_advantages(r, g)
    clip = lambda hp: (hp["clip"], hp["clip"])
    hparams = dict(clip=0.2)
    kw = dict(dict(kl_in="reward", kl_estimator="k1", loss_agg="seq_mean_token_sum_norm"), **kw)
  state = TrainState.create(online.copy_tree(params), optimizer, jax.random.key(0),
                            extra=online.RLState(ref=online.copy_tree(params), reward=rm_params,
                                                 kl_coef=jnp.float32(0.04)), hparams=hparams)
  step = critic_free.make_group_iteration(lm, sources, optimizer, _group_cfg(**kw),
                                     SamplingConfig(temperature=1.0, max_new_tokens=N_NEW), TOK.eos_id,
                                     TOK.pad_id, "skip", adv, clip)
  return state, step


# ------------------------------------------------------------------------------ one iteration


def test_ppo_iteration_on_a_tiny_model(models):
  lm, params, rm, rm_params = models
  optimizer = optax.adam(1e-3)
  state, step = _ppo_setup(models, optimizer)
  new, m = jax.jit(step)(state, prompt_batch())
  assert int(new.step) == 1 and float(m["applied"]) == 1.0
  # Policy == reference at the first rollout: the k1 KL of every sampled token is exactly 0.
  assert float(m["kl"]) == 0.0
  # The score is the reward model's at the last real token of what was sampled.
  assert np.isfinite(float(m["score"])) and float(m["score"]) == pytest.approx(float(m["score_model"]))
  # One update on-policy, one minibatch: the ratio is 1 and nothing is clipped.
  assert float(m["ratio"]) == pytest.approx(1.0, abs=1e-5) and float(m["clipfrac"]) == 0.0
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new.params["policy"]),
                                                          jax.tree.leaves(params))]
  assert max(moved) > 0
  # The reference and the reward model are frozen.
  for a, b in zip(jax.tree.leaves(new.extra.ref), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # lr_scale is a real hyperparameter: 0 freezes the params while the step still advances.
  frozen, _ = jax.jit(step)(state.replace(hparams=dict(state.hparams, lr_scale=jnp.float32(0.0))),
                            prompt_batch())
  assert int(frozen.step) == 1
  for a, b in zip(jax.tree.leaves(frozen.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_ppo_iteration_is_a_pure_function_of_state_and_batch(models):
  optimizer = optax.adam(1e-3)
  state, step = _ppo_setup(models, optimizer, epochs=2, num_minibatches=2)
  a, ma = jax.jit(step)(state, prompt_batch())
  b, mb = jax.jit(step)(state, prompt_batch())
  assert float(ma["loss"]) == float(mb["loss"])
  # A second epoch over the same rollout is off-policy: ratios move away from 1.
  assert float(ma["ratio"]) != 1.0


def test_grpo_iteration_groups_samples_and_uses_the_python_reward(models):
  lm, params, rm, rm_params = models
  optimizer = optax.sgd(1e-2)
  sources = reward_sources.RewardSources(None, 0.0, host(count_a))
  state, step = _group_setup(models, optimizer, sources=sources)
  new, m = jax.jit(step)(state, prompt_batch())
  sources.check()
  assert float(m["reward_ok"]) == 1.0 and int(new.step) == 1
  # Recompute the scores from the same rollout on the host: the mean must match.
  key = jax.random.fold_in(state.step_rng(), 0)
  r, valid, index = online.sample(lm, SamplingConfig(temperature=1.0, max_new_tokens=N_NEW), TOK.eos_id,
                                  TOK.pad_id, state.params, prompt_batch(), key, group_size=2)
  texts = host(count_a)._decode(np.asarray(r.tokens), np.asarray(r.mask))
  expected = np.mean([t.count("a") for t in texts])
  assert float(m["score"]) == pytest.approx(expected, rel=1e-6)
  # Rows of one prompt are adjacent and share its prompt tokens.
  np.testing.assert_array_equal(np.asarray(index), np.repeat(np.arange(8), 2))
  # The sampler's logprobs are the training forward's (on-policy ratios are exactly 1).
  lp = response_logprobs(lm, params, r.prompt_tokens, r.prompt_mask, r.tokens, r.mask)
  np.testing.assert_allclose(np.asarray(r.logprobs), np.asarray(lp), atol=2e-5)


def test_rloo_baseline_excludes_the_sample_and_kl_enters_the_reward(models):
  optimizer = optax.sgd(1e-2)
  state, step = _group_setup(models, optimizer, kind="rloo")
  new, m = jax.jit(step)(state, prompt_batch())
  assert float(m["kl"]) == pytest.approx(0.0, abs=1e-6)  # policy == reference
  assert float(m["reward"]) == pytest.approx(float(m["score"]), abs=1e-6)
  assert int(new.step) == 1 and float(m["applied"]) == 1.0


def test_weighted_reward_sources_add_up(models):
  lm, params, rm, rm_params = models
  sources = reward_sources.RewardSources(rm, 0.5, host(count_a, count_a, weights=[1.0, 2.0]))
  state, step = _group_setup(models, optax.sgd(0.0), sources=sources)
  _, m = jax.jit(step)(state, prompt_batch())
  assert float(m["score"]) == pytest.approx(0.5 * float(m["score_model"]) + float(m["score_functions"]), rel=1e-5)
  single = reward_sources.RewardSources(None, 0.0, host(count_a))
  state1, step1 = _group_setup(models, optax.sgd(0.0), sources=single)
  _, m1 = jax.jit(step1)(state1, prompt_batch())
  assert float(m["score_functions"]) == pytest.approx(3.0 * float(m1["score"]), rel=1e-5)


def test_grouped_forward_equals_the_forward_of_repeated_prompts(models):
  """Each prompt through the model once, its cache repeated for the group: the same logprobs and
  gradients as running every row's prompt (left padding of different lengths included)."""
  lm, params, _, _ = models
  batch = prompt_batch()
  g = 3
  r = generate(lm, SamplingConfig(temperature=1.0, max_new_tokens=N_NEW), TOK.eos_id, TOK.pad_id, params,
               batch["tokens"], batch["mask"], jax.random.key(1), group_size=g)
  assert r.tokens.shape == (8 * g, N_NEW) and float(jnp.min(r.mask[:, 0])) == 1.0
  np.testing.assert_array_equal(r.prompt_tokens, np.repeat(batch["tokens"], g, axis=0))
  full = lambda p: response_logprobs(lm, p, r.prompt_tokens, r.prompt_mask, r.tokens, r.mask)
  grouped = lambda p: grouped_response_logprobs(lm, p, batch["tokens"], batch["mask"], r.tokens, r.mask, g)
  np.testing.assert_allclose(grouped(params), full(params), atol=1e-5)
  np.testing.assert_allclose(r.logprobs, full(params), atol=2e-5)  # the sampler's own logprobs
  weights = jax.random.normal(jax.random.key(2), r.tokens.shape)
  g_full = jax.grad(lambda p: jnp.sum(full(p) * weights))(params)
  g_grp = jax.grad(lambda p: jnp.sum(grouped(p) * weights))(params)
  for a, b in zip(jax.tree.leaves(g_grp), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)


# ------------------------------------------------------------------------------ failures


def _raises_on_question_3(prompts, responses):
  if any(p.endswith("3?") for p in prompts):
    raise ValueError("cannot score this one")
  return [0.0] * len(prompts)


def _wrong_shape(prompts, responses):
  return [0.0] * (len(prompts) + 1)


def _nan_score(prompts, responses):
  return [float("nan") if p.endswith("5?") else 0.0 for p in prompts]


@pytest.mark.parametrize("fn, pattern", [
    (_raises_on_question_3, r"tests:_raises_on_question_3 raised ValueError: cannot score this one on prompt record 3"),
    (_wrong_shape, r"tests:_wrong_shape returned shape \(17,\) for 16 responses"),
    (_nan_score, r"tests:_nan_score returned nan for prompt record 5"),
])
def test_a_failing_reward_function_skips_the_update_and_names_function_and_record(models, fn, pattern):
  sources = reward_sources.RewardSources(None, 0.0, host(fn))
  state, step = _group_setup(models, optax.sgd(1.0), sources=sources)
  new, m = jax.jit(step)(state, prompt_batch())
  assert float(m["reward_ok"]) == 0.0 and float(m["applied"]) == 0.0
  # Skipped, not counted as a non-finite step, and the params are untouched.
  assert int(new.nonfinite) == 0
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(reward_sources.RewardFunctionError, match=pattern):
    sources.check()
  sources.check()  # reported once


def test_reward_function_specs_are_checked_before_compiling():
  from alignax.config import ConfigError
  f = reward_sources.load_reward_function("alignax.tasks.world_gold:gold_reward=0.5")
  assert f.weight == 0.5 and "ended" in f.wants
  scores = f(["What is the capital of France?"], ["The capital of France is Paris."], [True], [{}])
  assert scores[0] > 0
  for bad, msg in [("nomodule_xyz:f", "cannot load"), ("alignax.tasks.world_gold", "module:function"),
                   ("alignax.tasks.world_gold:gold_reward=heavy", "not a number"),
                   ("alignax.tasks.world_gold:nope", "cannot load")]:
    with pytest.raises(ConfigError, match=msg):
      reward_sources.load_reward_function(bad)


# ------------------------------------------------------------------------------ layouts


LAYOUTS = {"pmap over 8": ("pmap", dict(data=8, fsdp=1, tensor=1)),
           "data=8": ("jit", dict(data=8, fsdp=1, tensor=1)),
           "data2 x fsdp2 x tensor2": ("jit", dict(data=2, fsdp=2, tensor=2))}


@pytest.mark.parametrize("kind", ["ppo", "grpo", "rloo"])
def test_rl_iterations_reach_the_one_device_losses_on_every_layout(kind):
  """Sampling keys per global row, whitening and metrics over every device, psum'd gradient
  sums: two iterations on each layout match one device (GRPO with a Python reward too)."""
  host_reward = kind == "grpo"
  reference = np.asarray(rl_losses(kind, "jit", dict(data=1, fsdp=1, tensor=1), host_reward=host_reward))
  for name, (mode, mesh) in LAYOUTS.items():
    got = np.asarray(rl_losses(kind, mode, mesh, host_reward=host_reward))
    np.testing.assert_allclose(got, reference, rtol=2e-4, atol=2e-5, err_msg=f"{kind} on {name}")
