"""alignax.stats against independent references: closed forms, enumeration, float64 re-derivations."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from alignax import stats


def test_bootstrap_interval_of_a_large_normal_sample_matches_the_t_interval():
  x = np.random.default_rng(0).normal(1.0, 2.0, 2000)
  lo, hi = stats.bootstrap_ci(x, num_resamples=4000)
  half = stats.t_interval(x)
  assert lo == pytest.approx(x.mean() - half, abs=0.02)
  assert hi == pytest.approx(x.mean() + half, abs=0.02)


def test_bootstrap_ignores_nan_and_keeps_clusters_together():
  rng = np.random.default_rng(1)
  # 50 prompts x 4 samples, the prompt effect dominating: resampling samples as if independent
  # understates the interval; resampling prompts does not.
  prompt_effect = np.repeat(rng.normal(0, 1, 50), 4)
  x = prompt_effect + rng.normal(0, 0.1, 200)
  clusters = np.repeat(np.arange(50), 4)
  naive = np.subtract(*stats.bootstrap_ci(x)[::-1])
  clustered = np.subtract(*stats.bootstrap_ci(x, clusters)[::-1])
  assert clustered > 1.6 * naive  # ~ sqrt(4) for perfectly correlated samples
  with_nan = np.concatenate([x, [np.nan] * 20])
  assert stats.bootstrap_ci(with_nan, seed=3)[0] == pytest.approx(stats.bootstrap_ci(x, seed=3)[0], abs=0.05)
  assert np.isnan(stats.bootstrap_ci([np.nan, np.nan])[0])


def test_resample_weights_are_a_two_stage_draw():
  seeds = np.repeat(np.arange(3), 4)
  prompts = np.tile(np.arange(4), 3)
  w = stats.resample_weights((seeds, prompts), 12, 500, seed=0)
  # every replicate draws 3 seeds x 4 prompts = 12 samples' worth of weight
  np.testing.assert_array_equal(w.sum(axis=1), np.full(500, 12.0))
  # a replicate that never draws a seed gives none of its samples weight
  per_seed = w.reshape(500, 3, 4).sum(axis=2)
  assert set(np.unique(per_seed)) <= {0.0, 4.0, 8.0, 12.0}
  assert (per_seed == 0).any()


def test_with_intervals_means_equal_nanmeans_and_bracket_them():
  rng = np.random.default_rng(2)
  per = {"a": rng.normal(size=100), "b": np.where(rng.random(100) < 0.5, np.nan, rng.random(100)),
         "none": np.full(100, np.nan)}
  out = stats.with_intervals(per)
  for name in ("a", "b"):
    assert out[name] == pytest.approx(float(np.nanmean(per[name])), abs=1e-12)
    lo, hi = out[name + "_ci95"]
    assert lo < out[name] < hi
  assert math.isnan(out["none"]) and all(math.isnan(v) for v in out["none_ci95"])


def test_wilson_interval_matches_its_closed_form():
  lo, hi = stats.wilson_interval(80, 100)
  z = scipy_stats.norm.ppf(0.975)
  p, n = 0.8, 100
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  assert (lo, hi) == pytest.approx((center - half, center + half), abs=1e-12)
  assert stats.wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def test_paired_difference_detects_a_shift_and_not_noise():
  rng = np.random.default_rng(4)
  shifted = stats.paired_difference(rng.normal(0.3, 1.0, 400))
  assert shifted.p_value < 0.01 and shifted.ci[0] > 0
  null = [stats.paired_difference(rng.normal(0, 1, 200), num_resamples=500, seed=s).p_value for s in range(40)]
  assert np.mean(np.asarray(null) < 0.05) < 0.2  # about 5% false positives


def test_holm_adjustment_matches_a_worked_example():
  # Holm (1979): sorted p 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
  assert stats.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
  assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("form", ["rl", "bon"])
def test_gao_fit_recovers_its_parameters(form):
  d = np.linspace(0.05, 3.0, 40)
  gain = stats.gao_curve(d, 1.3, 0.4, form)
  alpha, beta = stats.fit_gao(d, gain, form)
  assert (alpha, beta) == pytest.approx((1.3, 0.4), abs=1e-9)
  expected = d * (1.3 - 0.4 * (np.log(d) if form == "rl" else d))
  np.testing.assert_allclose(gain, expected, rtol=1e-12)


def test_fit_band_brackets_the_fit_and_narrows_with_less_noise():
  rng = np.random.default_rng(5)
  d = np.tile(np.linspace(0.1, 2.0, 10), 5)
  groups = np.repeat(np.arange(5), 10)
  grid = np.linspace(0.1, 2.0, 7)
  widths = []
  for noise in (0.3, 0.03):
    gain = stats.gao_curve(d, 1.0, 0.5, "rl") + rng.normal(0, noise, len(d))
    band = stats.fit_band(d, gain, groups, grid, "rl", num_resamples=300)
    assert np.all(band["lo"] <= band["fit"] + 1e-9) and np.all(band["fit"] <= band["hi"] + 1e-9)
    widths.append(float(np.mean(band["hi"] - band["lo"])))
  assert widths[1] < widths[0] / 3


def test_best_of_n_expectation_equals_enumerating_every_subset():
  rng = np.random.default_rng(6)
  proxy = rng.normal(size=(3, 7))
  value = rng.normal(size=(3, 7))
  for n in (1, 2, 3, 7):
    got = stats.best_of_n_expectation(proxy, value, n)
    for p in range(3):
      subsets = list(itertools.combinations(range(7), n))
      ref = np.mean([value[p, max(s, key=lambda j: proxy[p, j])] for s in subsets])
      assert got[p] == pytest.approx(ref, abs=1e-12)
  np.testing.assert_allclose(stats.best_of_n_expectation(proxy, value, 1), value.mean(axis=1), atol=1e-12)


def test_best_of_n_kl_closed_form():
  assert stats.best_of_n_kl(1) == 0.0
  assert stats.best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)
