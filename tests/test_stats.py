"""The benchmarks' statistics module: the Student-t interval and quantiles against scipy on known
data, the minimum detectable effect's formula, and the interval's coverage on simulated normal
differences (the percentile bootstrap it replaced covered about 75% at n = 3)."""

import sys

import numpy as np
import pytest

from tests.conftest import ROOT

scipy_stats = pytest.importorskip("scipy.stats")
sys.path.insert(0, f"{ROOT}/benchmarks")
import stats  # noqa: E402


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("p", [0.6, 0.8, 0.975, 0.995])
def test_t_quantile_equals_scipys(p, df):
    assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-10)
    assert stats.t_quantile(1 - p, df) == pytest.approx(scipy_stats.t.ppf(1 - p, df), rel=1e-9, abs=1e-10)


def test_interval_and_mde_on_known_data():
    diffs = [0.031, 0.012, 0.044, 0.019, 0.034]
    lo, hi = scipy_stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=scipy_stats.sem(diffs))
    result = stats.paired(diffs)
    assert (result.lo, result.hi) == pytest.approx((lo, hi), rel=1e-9)
    sd, n = np.std(diffs, ddof=1), len(diffs)
    mde = (scipy_stats.t.ppf(0.975, n - 1) + scipy_stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n)
    assert result.mde == pytest.approx(mde, rel=1e-9)
    assert not result.exploratory and stats.paired(diffs[:3]).exploratory
    text = result.format(3)
    assert text.startswith(f"+0.028 [{lo:+.3f}, {hi:+.3f}] (t 95%, n = 5; per seed +0.031, +0.012") and "MDE" in text
    assert "exploratory" in stats.paired(diffs[:3]).format(3) and stats.paired([]).format() == "—"


def test_paired_runs_match_seeds():
    mine = [{"seed": 2, "r": 1.0}, {"seed": 1, "r": 3.0}, {"seed": 3, "r": 0.0}]
    theirs = [{"seed": 1, "r": 1.0}, {"seed": 2, "r": 0.5}]
    assert stats.paired_runs(mine, theirs, "r").diffs == (2.0, 0.5)  # seed order, unshared seed 3 left out


@pytest.mark.parametrize("n", [3, 5])
def test_the_interval_covers_the_true_mean_95_percent_of_the_time(n):
    rng = np.random.default_rng(n)
    draws = rng.normal(0.3, 2.0, size=(20_000, n))
    covered = 0
    for row in draws:
        lo, hi = stats.mean_interval(row)
        covered += lo <= 0.3 <= hi
    assert abs(covered / len(draws) - 0.95) <= 0.01
