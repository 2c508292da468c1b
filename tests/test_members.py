"""Vectorized sweeps: runs as members of one vmapped program, each exactly a separate run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignax import checkpoint as ckpt_lib
from alignax import parallel
from alignax.config import ConfigDict, ConfigError, load_config_file
from alignax.commands.sweep import parse_grid, plan_groups, run_sweep
from alignax.train import members as members_lib
from alignax.train import member_placement
from alignax.train.state import TrainState
from alignax.train.step import make_train_step
from cli_helpers import REPO, metric_rows, run_cli


def _cfg(stage, **overrides):
  cfg = load_config_file(os.path.join(REPO, "configs", f"{stage}.py"), "tiny")
  with cfg.unlocked():
    for key, value in overrides.items():
      node = cfg
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return cfg


# ------------------------------------------------------------------------------------ planning


def test_continuous_keys_and_seeds_are_members_and_shape_keys_make_groups():
  cfg = _cfg("dpo")
  grid = parse_grid(cfg, ["dpo.loss_type=sigmoid,ipo", "dpo.beta=0.1,0.3", "seed=0,1",
                          "train.batch_size=8,16"])
  groups, vectorized, grouped = plan_groups(cfg, grid)
  assert vectorized == ["dpo.beta", "seed"] and grouped == ["dpo.loss_type", "train.batch_size"]
  assert list(groups) == ["dpo.loss_type=sigmoid,train.batch_size=8", "dpo.loss_type=sigmoid,train.batch_size=16",
                          "dpo.loss_type=ipo,train.batch_size=8", "dpo.loss_type=ipo,train.batch_size=16"]
  assert all(len(points) == 4 for points in groups.values())
  assert {(p["dpo.beta"], p["seed"]) for p in groups["dpo.loss_type=ipo,train.batch_size=8"]} == {
      (0.1, 0), (0.1, 1), (0.3, 0), (0.3, 1)}
  # the optimizer's numbers and an RL stage's state-held KL coefficient are members too
  ppo = _cfg("ppo")
  _, vectorized, grouped = plan_groups(ppo, parse_grid(ppo, ["ppo.kl_coef=0.05,0.1", "optimizer.lr=1e-5,3e-5",
                                                             "ppo.temperature=0.7,1.0"]))
  assert vectorized == ["ppo.kl_coef", "optimizer.lr"] and grouped == ["ppo.temperature"]


@pytest.mark.parametrize("spec,message", [
    ("workdir=a,b", "workdir is fixed for the whole sweep"),
    ("parallel.distributed.num_processes=1,2", "parallel.distributed is fixed"),
])
def test_keys_that_can_be_neither_vectorized_nor_grouped_are_named(spec, message):
  cfg = _cfg("dpo")
  with pytest.raises(ConfigError, match=message):
    plan_groups(cfg, parse_grid(cfg, [spec]))


def test_a_pipeline_config_is_not_one_stage():
  cfg = load_config_file(os.path.join(REPO, "configs", "pipeline.py"), "tiny")
  with pytest.raises(ConfigError, match="trains the members of one stage"):
    plan_groups(cfg, {"seed": [0, 1]})


# ------------------------------------------------------------------------------------ the step


def _toy_problem(m):
  """M linear-regression runs with their own data, init, lr scale and an L2 hyperparameter."""
  def loss_fn(params, batch, rng, extra, hparams):
    err = batch["x"] @ params["w"] + params["b"] - batch["y"]
    total = jnp.sum(err ** 2) + hparams["l2"] * jnp.sum(params["w"] ** 2) * batch["x"].shape[0]
    return total, jnp.float32(batch["x"].shape[0]), {"noise": jax.random.uniform(rng)}
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(
      learning_rate=optax.linear_schedule(0.0, 0.05, 5), weight_decay=0.1))
  step = make_train_step(loss_fn, optimizer)
  keys = jax.random.split(jax.random.key(0), 3 * m)
  states, batches = [], []
  for i in range(m):
    params = {"w": jax.random.normal(keys[i], (16, 8)), "b": jnp.zeros(8)}
    s = TrainState.create(params, optimizer, jax.random.key(i), hparams={"l2": 0.01 * i})
    s = s.replace(hparams=dict(s.hparams, lr_scale=jnp.float32(1.0 + i)))
    states.append(s)
    x = jax.random.normal(keys[m + i], (8, 16))
    batches.append({"x": x, "y": jax.random.normal(keys[2 * m + i], (8, 8))})
  return step, states, batches


@pytest.mark.parametrize("batching,members_axis", [("vmap", 4), ("map", 1)])
def test_the_member_step_is_each_runs_own_step(batching, members_axis):
  """Four members (vmapped over a members=4 x data=2 mesh of 8 devices, or lax.map'd): each
  member's state after three steps equals its own run's; params split over the members axis."""
  mesh_cfg = ConfigDict(dict(members=members_axis, data=-1, fsdp=1, tensor=1))
  inner = parallel.make_placement(ConfigDict(dict(mode="jit", mesh=mesh_cfg)), with_members=True)
  assert dict(inner.mesh.shape) == {"members": members_axis, "data": 8 // members_axis, "fsdp": 1, "tensor": 1}
  placement = member_placement.MemberPlacement(inner, 4, batching)
  step, states, batches = _toy_problem(4)
  stacked = placement.put_state(member_placement.stack(states))
  assert stacked.params["w"].sharding.spec[0] == ("members" if members_axis > 1 else None)
  assert stacked.step.sharding.spec == jax.sharding.PartitionSpec(None)  # scalars stay replicated
  vstep = placement.jit_step(step, stacked)
  alone = jax.jit(step)
  host = jax.tree.map(np.asarray, member_placement.stack(batches))
  for _ in range(3):
    stacked, metrics = vstep(stacked, placement.put_batch(host))
    outs = [alone(s, b) for s, b in zip(states, batches)]
    states = [o[0] for o in outs]
    for i, (_, m) in enumerate(outs):
      np.testing.assert_allclose(np.asarray(metrics["loss"])[i], m["loss"], rtol=1e-6)
      np.testing.assert_allclose(np.asarray(metrics["lr"])[i], m["lr"], rtol=1e-6)
      assert np.asarray(metrics["noise"])[i] == m["noise"]  # each member's own step key
  for i, s in enumerate(states):
    np.testing.assert_allclose(np.asarray(stacked.params["w"])[i], s.params["w"], rtol=1e-5, atol=1e-7)
  assert not np.allclose(np.asarray(stacked.params["w"])[0], np.asarray(stacked.params["w"])[1])


def test_a_group_that_would_not_fit_names_the_member_count_that_would(monkeypatch):
  placement = member_placement.MemberPlacement(
      parallel.make_placement(ConfigDict(dict(mode="jit", mesh=ConfigDict(dict(members=1, data=1, fsdp=1,
                                                                                tensor=1)))),
                              with_members=True), 4)
  _, states, _ = _toy_problem(1)
  state_bytes, params_bytes = member_placement.tree_bytes(states[0]), member_placement.tree_bytes(states[0].params)
  per_member = state_bytes + params_bytes
  monkeypatch.setattr(member_placement, "available_bytes", lambda p: (int(per_member * 2.5), "test memory"))
  with pytest.raises(ConfigError, match="at most 2 members fit"):
    member_placement.check_memory(placement, state_bytes, params_bytes)
  monkeypatch.setattr(member_placement, "available_bytes", lambda p: (int(per_member * 40), "test memory"))
  assert "holds about 40" in member_placement.check_memory(placement, state_bytes, params_bytes)


def test_members_that_differ_in_a_structural_key_are_refused():
  a, b = _cfg("dpo", workdir="a"), _cfg("dpo", workdir="b", **{"dpo.beta": 0.3, "dpo.loss_type": "ipo"})
  with pytest.raises(ConfigError, match="differs from member a in dpo.loss_type, which change the compiled"):
    members_lib.check_differences([a, b], ["a", "b"], ["dpo.beta"])
  members_lib.check_differences([a, _cfg("dpo", workdir="c", **{"dpo.beta": 0.3})], ["a", "c"], ["dpo.beta"])


def test_a_single_run_refuses_a_members_axis():
  with pytest.raises(parallel.ParallelError, match="vectorized sweep"):
    parallel.make_mesh(ConfigDict(dict(members=2, data=-1, fsdp=1, tensor=1)))


# ------------------------------------------------------------------------------------ end to end

SMALL = {"train.batch_size": 4, "data.loader": "memory", "train.progress": False,
         "world.pretrain_bytes": 200000, "eval.every": 0, "parallel.mesh.data": 1}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
  """A small pretrain -> SFT -> reward model chain (in-process)."""
  from alignax.algorithms import run_stage
  root = tmp_path_factory.mktemp("upstream")
  pre = _cfg("pretrain", **SMALL, workdir=str(root / "pretrain"), **{
      "model.d_model": 64, "model.n_layers": 2, "model.d_ff": 128, "data.seq_len": 64,
      "optimizer.warmup_steps": 5, "train.steps": 10})
  run_stage(pre)
  sft = _cfg("sft", **SMALL, workdir=str(root / "sft"), **{"init.workdir": pre.workdir, "train.steps": 10,
                                                          "eval.num_prompts": 0})
  run_stage(sft)
  rm = _cfg("reward", **SMALL, workdir=str(root / "reward"), **{"init.workdir": sft.workdir,
                                                                "train.steps": 10})
  run_stage(rm)
  return {"pretrain": pre.workdir, "sft": sft.workdir, "reward": rm.workdir}


def _losses(workdir):
  return [(r["step"], r["train/loss"]) for r in metric_rows(workdir) if "train/loss" in r]


def _params(workdir):
  params, _ = ckpt_lib.load_export(workdir)
  return jax.tree.leaves(params)


def _assert_same_run(vec, sep, rtol):
  """Member run directory `vec` equals the separate run `sep`: every logged loss to `rtol`, the
  exported params (Adam divides by sqrt(v): where a gradient is ~0, float rounding of vmapped vs
  plain matmuls moves a weight by ~1e-6 of weights ~1e-2, so to an absolute `rtol` as well)."""
  a, b = _losses(vec), _losses(sep)
  assert [s for s, _ in a] == list(range(1, 21)) == [s for s, _ in b]
  np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=rtol)
  for x, y in zip(_params(vec), _params(sep)):
    np.testing.assert_allclose(x, y, rtol=rtol * 10, atol=rtol)
  return [v for _, v in a]


def _stage_cfg(stage, upstream, **overrides):
  init = upstream["pretrain"] if stage == "sft" else upstream["sft"]
  values = {**SMALL, "init.workdir": init, "train.steps": 20, "train.log_every": 1, "eval.num_prompts": 0}
  return _cfg(stage, **{**values, **overrides})


@pytest.mark.slow
def test_sft_members_are_exactly_their_separate_runs_after_a_sigkill(upstream, tmp_path):
  """A 2 x 2 grid (learning rate x seed) as one program from the CLI, SIGKILLed after its step-4
  checkpoint and resumed, against the four separate runs: every loss logged once, equal."""
  import signal
  import time

  from cli_helpers import start_cli
  # The separate runs skip the sampled evaluation (it draws no training randomness).
  cfg = _stage_cfg("sft", upstream)
  specs = ["optimizer.lr=0.001,0.003", "seed=0,1"]
  out = str(tmp_path / "vec")
  flat = {**SMALL, "init.workdir": upstream["pretrain"], "train.steps": 20, "train.log_every": 1,
          "eval.every": 10, "eval.num_prompts": 4, "checkpoint.every": 4}
  args = ["sweep", "--config=configs/sft.py:tiny", f"--out={out}", "--vectorize",
          *[f"--grid={s}" for s in specs], *[f"--config.{k}={v}" for k, v in flat.items()]]
  proc = start_cli(*args, devices=1)
  first = os.path.join(out, "optimizer.lr=0.001,seed=0")
  t0 = time.time()
  # Kill between the step-4 checkpoint and the end (step 10's evaluation, four members sampling,
  # holds the run there for seconds).
  committed = os.path.join(out, "_groups", "all", "checkpoints", "4")  # renamed into place when complete
  while not (any(r.get("step", 0) >= 5 for r in metric_rows(first)) and os.path.isdir(committed)) \
      and proc.poll() is None:
    assert time.time() - t0 < 300, "the sweep did not reach step 5"
    time.sleep(0.02)
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
  run_cli(*args)
  runs = json.load(open(os.path.join(out, "runs.json")))
  separate, _, _ = run_sweep(cfg, specs, str(tmp_path / "sep"), continue_on_error=False)
  assert len(runs) == len(separate) == 4
  with open(tmp_path / "vec" / "_groups" / "all" / "members.json") as f:
    assert json.load(f)["members"] == [r["name"] for r in runs]
  losses = []
  for run in runs:
    vec = os.path.join(out, run["name"])
    losses.append(_assert_same_run(vec, str(tmp_path / "sep" / run["name"]), 1e-5))
    with open(os.path.join(vec, "config.json")) as f:
      saved = json.load(f)
    assert saved["optimizer"]["lr"] == run["point"]["optimizer.lr"] and saved["seed"] == run["point"]["seed"]
    lrs = [r["train/lr"] for r in metric_rows(vec) if "train/lr" in r]
    assert max(lrs) == pytest.approx(run["point"]["optimizer.lr"], rel=0.05)  # the member's own rate
  assert len({tuple(np.round(m, 6)) for m in losses}) == 4  # four different runs, not copies


@pytest.mark.slow
def test_dpo_sweep_vectorized_on_a_members_mesh_equals_the_separate_runs(upstream, tmp_path):
  """`alignax sweep --vectorize`, 2 x 2 (beta x seed), with mesh.members=4 on 8 simulated devices
  (one member per pair of devices), against the four separate 1-device runs."""
  cfg = _stage_cfg("dpo", upstream)
  specs = ["dpo.beta=0.1,0.3", "seed=0,1"]
  out = str(tmp_path / "vec")
  flat = {**SMALL, "init.workdir": upstream["sft"], "train.steps": 20, "train.log_every": 1,
          "eval.num_prompts": 0, "parallel.mesh.members": 4, "parallel.mesh.data": 2}
  proc = run_cli("sweep", "--config=configs/dpo.py:tiny", f"--out={out}", "--vectorize",
                 *[f"--grid={s}" for s in specs], *[f"--config.{k}={v}" for k, v in flat.items()], devices=8)
  assert "4 points as 1 program(s) of 4 members" in proc.stdout
  assert "members differ in: dpo.beta, seed" in proc.stdout and "members: 4 x" in proc.stdout
  separate, _, _ = run_sweep(cfg, specs, str(tmp_path / "sep"), continue_on_error=False)
  for run in separate:
    _assert_same_run(os.path.join(out, run["name"]), str(tmp_path / "sep" / run["name"]), 1e-5)
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert [row["n"] for row in summary] == [2, 2] and "ci95" in summary[0]["metrics"]["eval/loss"]


@pytest.mark.slow
def test_ppo_members_are_exactly_their_separate_runs(upstream, tmp_path):
  """Two PPO members differing in seed and KL coefficient (held in the state's `extra`), as one
  program with sampling, scoring and the minibatch epochs inside, against their separate runs."""
  from alignax.algorithms import run_members, run_stage
  small = {"reward_model.workdir": upstream["reward"], "ppo.max_new_tokens": 16, "ppo.epochs": 2,
           "ppo.num_minibatches": 2}
  points = [("kl=0.05,seed=0", {"ppo.kl_coef": 0.05, "seed": 0}), ("kl=0.2,seed=1", {"ppo.kl_coef": 0.2, "seed": 1})]
  named = [(n, _stage_cfg("ppo", upstream, **small, **p, workdir=str(tmp_path / "vec" / n))) for n, p in points]
  results = run_members(named, str(tmp_path / "vec" / "_group"))
  assert all(r.finished for r in results)
  for name, p in points:
    run_stage(_stage_cfg("ppo", upstream, **small, **p, workdir=str(tmp_path / "sep" / name)))
    _assert_same_run(str(tmp_path / "vec" / name), str(tmp_path / "sep" / name), 1e-4)
  kl = [[r["train/kl_coef"] for r in metric_rows(str(tmp_path / "vec" / n)) if "train/kl_coef" in r] for n, _ in points]
  assert kl[0][0] == pytest.approx(0.05) and kl[1][0] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------ ensembles


@pytest.mark.parametrize("mode", ["mean", "mean_minus_std", "mean_minus_var", "min"])
def test_ensemble_scores_are_the_combination_of_the_members_scores(tiny_llama, mode):
  """A RewardEnsemble's response scores against each member scored alone, combined in float64."""
  from alignax.generation.scoring import response_scores
  from alignax.models.heads import RewardEnsemble, build_scalar_model
  members = [build_scalar_model(tiny_llama, seed) for seed in range(3)]
  ensemble = RewardEnsemble(members[0][0], 3, mode, coef=0.7)
  stacked = member_placement.stack([p for _, p in members])
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(1, 300, (4, 6)), jnp.int32)
  pmask = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1]] * 4), jnp.int32)
  response = jnp.asarray(rng.integers(1, 300, (4, 5)), jnp.int32)
  rmask = jnp.asarray(np.array([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]), jnp.int32)
  got = np.asarray(response_scores(ensemble, stacked, prompt, pmask, response, rmask))
  each = np.stack([np.asarray(response_scores(m, p, prompt, pmask, response, rmask), np.float64)
                   for m, p in members])
  expected = {"mean": each.mean(0), "mean_minus_std": each.mean(0) - 0.7 * each.std(0),
              "mean_minus_var": each.mean(0) - 0.7 * each.var(0), "min": each.min(0)}[mode]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_reward_ensemble_trains_as_members_and_ppo_scores_with_it(upstream, tmp_path):
  """`reward.ensemble=3`: three seeds as one program, each a normal run; the export holds all
  three (stacked), the ensemble's held-out accuracy is logged next to a single member's; PPO
  trains on the ensemble's mean - std."""
  from alignax.algorithms import run_stage
  from alignax.algorithms.reward import load_reward_model
  from alignax.models.heads import RewardEnsemble
  workdir = str(tmp_path / "reward")
  cfg = _cfg("reward", **SMALL, workdir=workdir, **{"init.workdir": upstream["sft"], "train.steps": 10,
                                                    "reward.ensemble": 3, "eval.num_prompts": 8,
                                                    "reward.normalize_prompts": 4})
  assert run_stage(cfg).finished
  model, params, meta = load_reward_model(workdir, mode="mean_minus_std")
  assert isinstance(model, RewardEnsemble) and model.size == 3 and meta["extra"]["members"] == [
      "seed=0", "seed=1", "seed=2"]
  for i in range(3):
    own, _ = ckpt_lib.load_export(os.path.join(workdir, "members", f"seed={i}"))
    for x, y in zip(jax.tree.leaves(own), jax.tree.leaves(jax.tree.map(lambda a: a[i], params))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  heads = [np.asarray(params["head_w"][...])[i] for i in range(3)]
  assert not np.allclose(heads[0], heads[1])  # three seeds, three models
  (row,) = [r for r in metric_rows(workdir) if "eval/ensemble_size" in r]
  for name in ("accuracy", "gold_accuracy", "gold_agreement"):
    assert 0 <= row[f"eval/{name}"] <= 1 and 0 <= row[f"eval/single/{name}"] <= 1
  member0 = [r for r in metric_rows(os.path.join(workdir, "members", "seed=0")) if "eval/accuracy" in r][-1]
  assert row["eval/single/accuracy"] == pytest.approx(member0["eval/accuracy"])
  ppo = _stage_cfg("ppo", upstream, workdir=str(tmp_path / "ppo"), **{
      "reward_model.workdir": workdir, "rewards.ensemble": "mean_minus_std", "train.steps": 2,
      "ppo.max_new_tokens": 8, "ppo.epochs": 1, "ppo.num_minibatches": 1})
  assert run_stage(ppo).finished
  rows = [r for r in metric_rows(ppo.workdir) if "train/score_model" in r]
  assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) and r["train/applied"] == 1.0 for r in rows)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_rl_members_are_their_own_iterations(kind):
  """GRPO and RLOO iterations (grouped sampling, the reward model, the update) of two members with
  their own keys and KL coefficients, vmapped, against each member's own iteration."""
  from multihost_worker import rl_problem
  model, state, step, batch = rl_problem(kind)
  members = [state.replace(rng=jax.random.key(i), extra=state.extra.replace(kl_coef=jnp.float32(c)))
             for i, c in enumerate((0.05, 0.3))]
  placement = member_placement.MemberPlacement(parallel.make_placement(
      ConfigDict(dict(mode="jit", mesh=ConfigDict(dict(members=2, data=1, fsdp=1, tensor=1)))), model,
      with_members=True), 2)
  stacked = placement.put_state(member_placement.stack(members))
  vstep, alone = placement.jit_step(step, stacked), jax.jit(step)
  host = jax.tree.map(lambda x: np.stack([x, x]), batch)
  for _ in range(2):
    stacked, got = vstep(stacked, placement.put_batch(host))
    outs = [alone(m, batch) for m in members]
    members = [o[0] for o in outs]
    for i, (_, want) in enumerate(outs):
      for name in ("loss", "score", "kl", "grad_norm", "kl_coef"):
        np.testing.assert_allclose(np.asarray(got[name])[i], want[name], rtol=1e-4, atol=1e-6)
  assert np.asarray(got["kl_coef"]).tolist() == pytest.approx([0.05, 0.3])
