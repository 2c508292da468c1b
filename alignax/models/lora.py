"""LoRA: low-rank adapters on a frozen transformer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models").

A targeted weight W (a projection `x @ W`, input width `n_in`, output width `n_out`) becomes

  y = x @ W + (alpha / rank) * dropout(x) @ A @ B,    A [n_in, rank], B [rank, n_out]

with B initialised to zero, so a fresh adapter leaves the model unchanged, and A drawn as PEFT does
(uniform in +-1/sqrt(n_in), Kaiming-uniform with a = sqrt(5)). Only A and B are trained.

In a params pytree, an LM's params (an `nnx.State` with "embed" and "blocks") become a
`LoraParams(base, adapters)` node: `base` is the untouched state, `adapters` mirrors the targeted
leaves, e.g. adapters["blocks"]["attn"]["wq"] = {"a": Param [L, n_in, r], "b": Param [L, r, n_out]}
(stacked over layers like the weights they adapt, with logical axes so meshes shard them).
Models built from such params (`merge_module`) compute the low-rank path beside each targeted
matmul; nothing the size of W is materialised. Everything else about a run sees one pytree:

  trainable, frozen = partition(params)   # adapters (and any heads) / the frozen bases
  params = combine(trainable, frozen)
  reference = adapters_off(params)        # the base model itself: no second copy is held
  plain = merged(params)                  # W + (alpha / rank) A @ B: an ordinary LM's params
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

Array = jax.Array

# alignax's projection leaves, their number of input axes and HF's module name for each.
TARGETS = {
    "wq": ("attn", 1, "q_proj"), "wk": ("attn", 1, "k_proj"), "wv": ("attn", 1, "v_proj"),
    "wo": ("attn", 2, "o_proj"),
    "w_gate": ("mlp", 1, "gate_proj"), "w_in": ("mlp", 1, "up_proj"), "w_out": ("mlp", 1, "down_proj"),
}
HF_NAMES = {hf: name for name, (_, _, hf) in TARGETS.items()}
TARGET_SETS = {"attention": ("wq", "wk", "wv", "wo"), "all-linear": tuple(TARGETS)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`model.lora.*`.

  Attributes:
    rank: adapter rank r; 0 turns LoRA off (full fine-tuning).
    alpha: the update is scaled by alpha / rank (PEFT's `lora_alpha`).
    dropout: dropout rate on the adapter's input during training steps (PEFT's `lora_dropout`).
    targets: comma-separated projections: alignax names (wq, wk, wv, wo, w_gate, w_in, w_out),
      Hugging Face names (q_proj, ..., down_proj), or "attention" / "all-linear".
  """

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = "attention"

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def target_names(self) -> tuple[str, ...]:
    """The targeted alignax leaves, in TARGETS order."""
    names = set()
    for part in (p.strip() for p in self.targets.split(",")):
      if part in TARGET_SETS:
        names.update(TARGET_SETS[part])
      elif part in TARGETS or part in HF_NAMES:
        names.add(HF_NAMES.get(part, part))
      else:
        known = ", ".join(list(TARGET_SETS) + list(TARGETS) + list(HF_NAMES))
        raise ValueError(f"model.lora.targets: unknown target {part!r} (known: {known})")
    return tuple(n for n in TARGETS if n in names)

  def validate(self) -> None:
    if self.rank < 0:
      raise ValueError(f"model.lora.rank: must be >= 0, got {self.rank}")
    if not self.enabled:
      return
    if self.alpha <= 0:
      raise ValueError(f"model.lora.alpha: must be > 0, got {self.alpha}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.lora.dropout: must be in [0, 1), got {self.dropout}")
    if not self.target_names():
      raise ValueError("model.lora.targets: names no projection")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any] | None) -> "LoraConfig":
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"model.lora.{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
    cfg = cls(**values)
    cfg.validate()
    return cfg


class LoraParams(struct.PyTreeNode):
  """An LM's frozen params with its adapters (see the module docstring).

  Attributes:
    base: the LM's `nnx.State`, frozen.
    adapters: {"blocks": {"attn"|"mlp": {name: {"a": Param, "b": Param}}}}.
    key: a PRNG key for adapter dropout in this forward, or None (no dropout).
    scale: alpha / rank. dropout: the rate.
  """

  base: Any
  adapters: Any
  key: Any = None
  scale: float = struct.field(pytree_node=False, default=1.0)
  dropout: float = struct.field(pytree_node=False, default=0.0)


class LoraWeight(struct.PyTreeNode):
  """A targeted weight inside a module built by `merge_module`: the frozen W, one layer's (or
  all layers') A and B, and the dropout key."""

  w: Array
  a: Array
  b: Array
  key: Any = None
  scale: float = struct.field(pytree_node=False, default=1.0)
  dropout: float = struct.field(pytree_node=False, default=0.0)

  @property
  def shape(self):
    return self.w.shape


def is_lm_state(tree) -> bool:
  return isinstance(tree, (nnx.State, dict)) and "blocks" in tree and "embed" in tree


def _is_lora(x) -> bool:
  return isinstance(x, LoraParams)


def has_lora(params) -> bool:
  return any(_is_lora(x) for x in jax.tree.leaves(params, is_leaf=_is_lora))


def matmul(x: Array, weight, dtype) -> Array:
  """x [N, n_in] @ a weight Variable (or array) of shape [*in, *out] -> [N, n_out], in `dtype`.

  A LoRA-wrapped weight adds its low-rank path (dropout on its input when it carries a key)."""
  value = weight.get_value() if isinstance(weight, nnx.Variable) else weight
  if not isinstance(value, LoraWeight):
    return x @ value.astype(dtype).reshape(x.shape[-1], -1)
  y = x @ value.w.astype(dtype).reshape(x.shape[-1], -1)
  xa = x
  if value.key is not None and value.dropout > 0:
    keep = jax.random.bernoulli(value.key, 1.0 - value.dropout, x.shape)
    xa = jnp.where(keep, x / (1.0 - value.dropout), 0).astype(x.dtype)
  low = (xa @ value.a.astype(dtype)) @ value.b.astype(dtype)
  return y + (value.scale * low).astype(y.dtype)


def _target_leaves(adapters):
  """[(group, name, {"a", "b"})] of an adapters tree, in TARGETS order."""
  blocks = adapters["blocks"]
  return [(group, name, blocks[group][name]) for name, (group, _, _) in TARGETS.items()
          if group in blocks and name in blocks[group]]


def _value(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def init_adapters(base, cfg: LoraConfig, key: Array):
  """Fresh adapters for an LM's params `base` (arrays or ShapeDtypeStructs): A uniform in
  +-1/sqrt(n_in), B zero, stored in the weights' dtype."""
  blocks = base["blocks"]
  out: dict = {}
  for i, name in enumerate(cfg.target_names()):
    group, n_axes, _ = TARGETS[name]
    if group not in blocks or name not in blocks[group]:
      continue  # e.g. w_gate of a GELU MLP
    w = blocks[group][name]
    axes = w.get_metadata().get("logical_axes") if isinstance(w, nnx.Variable) else None
    shape, dtype = _value(w).shape, _value(w).dtype
    layers, n_in, n_out = shape[0], int(np.prod(shape[1:1 + n_axes])), int(np.prod(shape[1 + n_axes:]))
    bound = 1.0 / np.sqrt(n_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (layers, n_in, cfg.rank), jnp.float32, -bound, bound)
    b = jnp.zeros((layers, cfg.rank, n_out), jnp.float32)
    # Shard A's input rows and B's output columns as the weight's first input / output axis.
    a_axes = b_axes = None
    if axes:
      a_axes = ("layers", axes[0], None)
      b_axes = ("layers", None, axes[n_axes])
    out.setdefault(group, {})[name] = {
        "a": nnx.Param(a.astype(dtype), logical_axes=a_axes),
        "b": nnx.Param(b.astype(dtype), logical_axes=b_axes)}
  if not out:
    raise ValueError(f"model.lora.targets={cfg.targets!r}: this model has none of {cfg.target_names()}")
  return nnx.State({"blocks": out}) if isinstance(base, nnx.State) else {"blocks": out}


def attach(params, cfg: LoraConfig, key: Array):
  """`params` with every LM state inside it (the params themselves, PPO's policy, a reward or
  value model's backbone) wrapped in `LoraParams` with fresh adapters. The arrays of `params`
  are shared, not copied."""
  counter = iter(range(1 << 30))

  def wrap(tree):
    if is_lm_state(tree):
      adapters = init_adapters(tree, cfg, jax.random.fold_in(key, next(counter)))
      return LoraParams(tree, adapters, None, cfg.scale, cfg.dropout)
    if isinstance(tree, (nnx.State, dict)):
      kind = type(tree)
      return kind({k: wrap(v) for k, v in tree.items()})
    return tree
  return wrap(params)


def _map_lora(fn, params):
  return jax.tree.map(lambda x: fn(x) if _is_lora(x) else x, params, is_leaf=_is_lora)


def partition(params):
  """(trainable, frozen): `trainable` has every LoraParams' base replaced by None (so its leaves
  are the adapters and any non-LM params, e.g. a reward head); `frozen` holds the bases, with
  None everywhere else. Without LoRA, (params, None)."""
  if not has_lora(params):
    return params, None
  trainable = _map_lora(lambda x: x.replace(base=None, key=None), params)
  frozen = jax.tree.map(lambda x: x.base if _is_lora(x) else None, params, is_leaf=_is_lora)
  return trainable, frozen


def combine(trainable, frozen):
  """The inverse of `partition`."""
  if frozen is None:
    return trainable
  return jax.tree.map(lambda t, f: t.replace(base=f) if _is_lora(t) else t, trainable, frozen,
                      is_leaf=lambda x: _is_lora(x) or x is None)


def trainable_of(params):
  return partition(params)[0]


def with_dropout_key(params, key: Array):
  """`params` whose adapters drop out with keys derived from `key` (a training forward)."""
  counter = iter(range(1 << 30))
  return _map_lora(lambda x: x.replace(key=jax.random.fold_in(key, next(counter))) if x.dropout > 0 else x,
                   params)


def adapters_off(params):
  """The frozen base models: every LoraParams replaced by its base."""
  return _map_lora(lambda x: x.base, params)


def reference(ref, params):
  """The frozen reference model: `ref` when a run holds one, else (a LoRA run, which holds no
  copy) `params` with the adapters off."""
  return adapters_off(params) if ref is None else ref


def merged(params):
  """Plain params with each adapter folded in: W + scale * A @ B (in W's dtype)."""
  def fold(lp: LoraParams):
    blocks = lp.adapters["blocks"]
    def leaf(path, w):
      names = [getattr(k, "key", None) for k in path]
      if len(names) >= 3 and names[0] == "blocks" and names[1] in blocks and names[2] in blocks[names[1]]:
        ab = blocks[names[1]][names[2]]
        a, b = _value(ab["a"]), _value(ab["b"])
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * lp.scale
        return (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
      return w
    return jax.tree_util.tree_map_with_path(leaf, lp.base)
  return _map_lora(fold, params)


def _wrapped_base(lp: LoraParams):
  """`lp.base` with each targeted weight Variable replaced by one holding a `LoraWeight`."""
  wrapped = {}
  for j, (group, name, ab) in enumerate(_target_leaves(lp.adapters)):
    a, b = _value(ab["a"]), _value(ab["b"])
    key = None
    if lp.key is not None:
      key = jax.random.split(jax.random.fold_in(lp.key, j), a.shape[0])
    wrapped[("blocks", group, name)] = (a, b, key)

  def leaf(path, var):
    names = tuple(getattr(k, "key", None) for k in path)
    if names not in wrapped:
      return var
    a, b, key = wrapped[names]
    return var.replace(LoraWeight(var.get_value(), a, b, key, lp.scale, lp.dropout))
  return jax.tree_util.tree_map_with_path(leaf, lp.base, is_leaf=lambda x: isinstance(x, nnx.Variable))


def merge_module(graphdef: nnx.GraphDef, params):
  """`nnx.merge(graphdef, params)` for params that may hold LoraParams: each targeted weight
  Variable of the module holds a `LoraWeight` (W with its adapters). `params` is not changed."""
  if not has_lora(params):
    return nnx.merge(graphdef, params)
  return nnx.merge(graphdef, _map_lora(_wrapped_base, params))


def adapter_arrays(params) -> list[tuple[tuple, dict]]:
  """[(path of the LM inside params, {"wq": {"a": array, "b": array}, ...})] for export."""
  out = []

  def collect(path, x):
    if _is_lora(x):
      leaves = {name: {"a": _value(ab["a"]), "b": _value(ab["b"])}
                for _, name, ab in _target_leaves(x.adapters)}
      out.append((tuple(getattr(k, "key", None) for k in path), leaves))
    return x
  jax.tree_util.tree_map_with_path(collect, params, is_leaf=_is_lora)
  return out


def count(params) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  trainable, frozen = partition(params)
  n = lambda t: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(t))
  return n(trainable), n(trainable) + (n(frozen) if frozen is not None else 0)


def describe(params) -> dict | None:
  """{"rank", "alpha", "dropout", "targets"} of the first adapters in `params` (None without)."""
  found = [x for x in jax.tree.leaves(params, is_leaf=_is_lora) if _is_lora(x)]
  if not found:
    return None
  lp = found[0]
  leaves = _target_leaves(lp.adapters)
  rank = int(_value(leaves[0][2]["a"]).shape[-1])
  return {"rank": rank, "alpha": float(lp.scale * rank), "dropout": float(lp.dropout),
          "targets": ",".join(name for _, name, _ in leaves)}


def names(targets: Iterable[str]) -> list[str]:
  """HF module names of alignax targets (PEFT's `target_modules`)."""
  return [TARGETS[t][2] for t in targets]
