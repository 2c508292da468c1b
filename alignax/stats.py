"""Statistics for comparisons people can cite: bootstrap intervals, paired tests, fitted curves.

Pure numpy functions of arrays; every random draw comes from the `seed` argument.

  lo, hi = bootstrap_ci(gold, clusters=prompt_ids)            # 95% interval of the mean
  lo, hi = bootstrap_ci(gold, clusters=(seed_ids, prompt_ids))  # seeds, then prompts within
  test = paired_difference(diff, clusters=(seed_ids, prompt_ids))
  alpha, beta = fit_gao(d, reward - reward_at_0, form="rl")   # Gao et al. 2022

Values may hold NaN where a metric does not apply to a sample (accuracy on a harmful prompt);
every statistic ignores them (`np.nanmean`). An infinite value is kept: the mean it makes shows it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
NUM_RESAMPLES = 2000

PAIRED_TEST_NAME = ("paired two-stage bootstrap (resample seeds, then prompts within each seed) of "
                    "the mean per-(seed, prompt) difference; two-sided p, Holm-adjusted over the table")


def t_interval(values: Sequence[float], level: float = LEVEL) -> float:
  """Half-width of the `level` interval of the mean of `values` (Student's t with n - 1 degrees
  of freedom; 0 for a single value)."""
  v = np.asarray(values, np.float64).reshape(-1)
  if len(v) < 2:
    return 0.0
  return float(scipy_stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def wilson_interval(successes: float, n: float, level: float = LEVEL) -> tuple[float, float]:
  """Wilson score interval (lo, hi) of a binomial rate `successes / n` ((nan, nan) for n = 0):
  for rates logged only as counts (a reward model's accuracy over n pairs)."""
  if n <= 0:
    return float("nan"), float("nan")
  z = float(scipy_stats.norm.ppf(0.5 + level / 2))
  p = successes / n
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return float(center - half), float(center + half)


def _as_levels(clusters, n: int) -> list[np.ndarray]:
  if clusters is None:
    return [np.arange(n)]
  if isinstance(clusters, np.ndarray) and clusters.ndim == 1:
    clusters = (clusters,)
  levels = [np.asarray(c) for c in clusters]
  for c in levels:
    if c.shape != (n,):
      raise ValueError(f"cluster ids must have shape ({n},), got {c.shape}")
  return levels


def resample_weights(clusters, n: int, num_resamples: int, seed: int) -> np.ndarray:
  """[num_resamples, n] multiplicities of a (multi-stage) cluster bootstrap.

  Stage 1 draws the units of the first level (seeds, say) with replacement; within each drawn
  unit, stage 2 draws the units of the second level (prompts) with replacement, and so on; a
  sample's weight is how often its innermost unit was drawn. With one level this is the plain
  cluster bootstrap; with no clusters, the bootstrap over samples.
  """
  levels = _as_levels(clusters, n)
  rng = np.random.default_rng(seed)
  weights = np.zeros((num_resamples, n))
  for r in range(num_resamples):
    _draw(levels, np.arange(n), 1.0, weights[r], rng)
  return weights


def _draw(levels, rows: np.ndarray, mult: float, out: np.ndarray, rng) -> None:
  ids = levels[0][rows]
  units, inverse = np.unique(ids, return_inverse=True)
  counts = np.bincount(rng.integers(0, len(units), len(units)), minlength=len(units))
  if len(levels) == 1:
    out[rows] += mult * counts[inverse]
    return
  for u in np.nonzero(counts)[0]:
    for _ in range(counts[u]):  # each draw of a unit resamples its inner units afresh
      _draw(levels[1:], rows[inverse == u], mult, out, rng)


def _weighted_nanmean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
  ok = ~np.isnan(values)
  w = weights * ok
  total = w.sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, (w * np.where(ok, values, 0.0)).sum(axis=-1) / total, np.nan)


def bootstrap_means(values, clusters=None, num_resamples: int = NUM_RESAMPLES,
                    seed: int = 0) -> np.ndarray:
  """[num_resamples] bootstrap replicates of the NaN-ignoring mean of `values` [n]."""
  values = np.asarray(values, np.float64).reshape(-1)
  w = resample_weights(clusters, len(values), num_resamples, seed)
  return _weighted_nanmean(values[None, :], w)


def bootstrap_ci(values, clusters=None, level: float = LEVEL, num_resamples: int = NUM_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval (lo, hi) of the mean of `values` [n], NaNs ignored.

  clusters: None (resample samples), one id array [n] (resample those units: prompts, when a
  prompt has several samples), or a tuple of id arrays [n] (a multi-stage bootstrap, outermost
  first). (nan, nan) when no value is finite.
  """
  values = np.asarray(values, np.float64).reshape(-1)
  if np.isnan(values).all():
    return float("nan"), float("nan")
  reps = bootstrap_means(values, clusters, num_resamples, seed)
  reps = reps[~np.isnan(reps)]
  tail = 100 * (1 - level) / 2
  return float(np.percentile(reps, tail)), float(np.percentile(reps, 100 - tail))


def with_intervals(per_sample: dict[str, np.ndarray], clusters=None, level: float = LEVEL,
                   num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> dict[str, object]:
  """{name: mean, name_ci95: [lo, hi]} for every per-sample array, all from the same resamples
  (so intervals of different metrics are comparable)."""
  out: dict[str, object] = {}
  n = len(next(iter(per_sample.values()))) if per_sample else 0
  w = resample_weights(clusters, n, num_resamples, seed) if n else None
  tail = 100 * (1 - level) / 2
  suffix = f"_ci{round(100 * level)}"
  for name, values in per_sample.items():
    values = np.asarray(values, np.float64).reshape(-1)
    applies = ~np.isnan(values)
    out[name] = float(values[applies].mean()) if applies.any() else float("nan")
    if applies.any():
      reps = _weighted_nanmean(values[None, :], w)
      reps = reps[~np.isnan(reps)]
      out[name + suffix] = [float(np.percentile(reps, tail)), float(np.percentile(reps, 100 - tail))]
    else:
      out[name + suffix] = [float("nan"), float("nan")]
  return out


@dataclasses.dataclass(frozen=True)
class PairedTest:
  """A paired comparison: mean difference (a - b), its interval, and a two-sided p-value."""
  mean: float
  ci: tuple[float, float]
  p_value: float
  n: int


def paired_difference(diff, clusters=None, level: float = LEVEL,
                      num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> PairedTest:
  """Bootstrap test of mean(diff) = 0 for paired differences `diff` [n] (a - b per unit).

  p = 2 * min(P*(mean <= 0), P*(mean >= 0)) over the bootstrap replicates (floored at
  1 / num_resamples): the smallest level at which the percentile interval excludes 0.
  """
  diff = np.asarray(diff, np.float64).reshape(-1)
  reps = bootstrap_means(diff, clusters, num_resamples, seed)
  reps = reps[np.isfinite(reps)]
  tail = 100 * (1 - level) / 2
  p = 2 * min(np.mean(reps <= 0), np.mean(reps >= 0))
  return PairedTest(mean=float(np.nanmean(diff)),
                    ci=(float(np.percentile(reps, tail)), float(np.percentile(reps, 100 - tail))),
                    p_value=float(min(1.0, max(p, 1.0 / num_resamples))), n=int(np.isfinite(diff).sum()))


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values (family-wise error control), in the input order."""
  p = np.asarray(p_values, np.float64)
  order = np.argsort(p)
  m = len(p)
  adjusted = np.empty(m)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adjusted[i] = running
  return [float(x) for x in adjusted]


# ------------------------------------------------------------------------------- fitted curves

GAO_FORMS = ("rl", "bon")


def gao_basis(d, form: str) -> np.ndarray:
  """[n, 2] basis of Gao et al.'s (2022) scaling forms, linear in (alpha, beta):
  RL: R(d) = d (alpha - beta log d); best-of-n: R(d) = d (alpha - beta d); d = sqrt(KL)."""
  d = np.asarray(d, np.float64).reshape(-1)
  if form == "rl":
    with np.errstate(divide="ignore", invalid="ignore"):
      logd = np.where(d > 0, np.log(np.where(d > 0, d, 1.0)), 0.0)
    return np.stack([d, -d * logd], axis=1)
  if form == "bon":
    return np.stack([d, -d * d], axis=1)
  raise ValueError(f"form must be one of {GAO_FORMS}, got {form!r}")


def fit_gao(d, gain, form: str) -> tuple[float, float]:
  """Least-squares (alpha, beta) of `gain` [n] (reward minus its value at d = 0) against
  d = sqrt(KL) [n] in Gao's `form` ("rl" or "bon"). Non-finite points are ignored."""
  d = np.asarray(d, np.float64).reshape(-1)
  gain = np.asarray(gain, np.float64).reshape(-1)
  ok = np.isfinite(d) & np.isfinite(gain)
  if ok.sum() < 2:
    return float("nan"), float("nan")
  coef, *_ = np.linalg.lstsq(gao_basis(d[ok], form), gain[ok], rcond=None)
  return float(coef[0]), float(coef[1])


def gao_curve(d, alpha: float, beta: float, form: str) -> np.ndarray:
  """Gao's form evaluated at d [n]."""
  return gao_basis(d, form) @ np.array([alpha, beta])


def fit_band(d, gain, groups, grid, form: str, level: float = LEVEL,
             num_resamples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
  """A fitted curve over `grid` and its percentile band from resampling `groups` (seeds): each
  replicate draws the groups with replacement, pools their points, and refits.

  Returns {"fit": [G], "lo": [G], "hi": [G], "alpha", "beta"}.
  """
  d = np.asarray(d, np.float64).reshape(-1)
  gain = np.asarray(gain, np.float64).reshape(-1)
  groups = np.asarray(groups).reshape(-1)
  alpha, beta = fit_gao(d, gain, form)
  units = np.unique(groups)
  rng = np.random.default_rng(seed)
  curves = []
  for _ in range(num_resamples):
    pick = rng.choice(units, len(units), replace=True)
    rows = np.concatenate([np.nonzero(groups == u)[0] for u in pick])
    a, b = fit_gao(d[rows], gain[rows], form)
    if np.isfinite(a):
      curves.append(gao_curve(grid, a, b, form))
  curves = np.asarray(curves) if curves else np.full((1, len(grid)), np.nan)
  tail = 100 * (1 - level) / 2
  return {"fit": gao_curve(grid, alpha, beta, form), "lo": np.percentile(curves, tail, axis=0),
          "hi": np.percentile(curves, 100 - tail, axis=0), "alpha": alpha, "beta": beta}


# ---------------------------------------------------------------------------------- best of n

def best_of_n_kl(n: int) -> float:
  """KL(best-of-n || base) in nats, log n - (n - 1) / n (Stiennon et al. 2020; an upper bound
  that is tight when the n samples are distinct)."""
  return float(np.log(n) - (n - 1) / n)


def best_of_n_expectation(proxy, value, n: int) -> np.ndarray:
  """Unbiased estimate, per prompt, of E[value of the sample with the highest proxy among n]
  from m >= n samples per prompt (all n-subsets of the m averaged in closed form).

  proxy, value: [P, m]. Sorting each prompt's samples by proxy ascending, the i-th (1-based) is
  the best of a random n-subset with probability C(i-1, n-1) / C(m, n). Returns [P].
  """
  proxy = np.asarray(proxy, np.float64)
  value = np.asarray(value, np.float64)
  m = proxy.shape[1]
  if not 1 <= n <= m:
    raise ValueError(f"n must be in [1, {m}], got {n}")
  order = np.argsort(proxy, axis=1, kind="stable")
  ranked = np.take_along_axis(value, order, axis=1)
  i = np.arange(1, m + 1)
  # C(i-1, n-1) / C(m, n) in log space (scipy's gammaln), zero below i = n.
  from scipy.special import gammaln
  log_w = (gammaln(i) - gammaln(n) - gammaln(np.maximum(i - n + 1, 1))
           - (gammaln(m + 1) - gammaln(n + 1) - gammaln(m - n + 1)))
  w = np.where(i >= n, np.exp(log_w), 0.0)
  return ranked @ w
