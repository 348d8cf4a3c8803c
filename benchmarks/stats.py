"""The statistics every benchmark table uses: same-seed paired differences with a Student-t 95%
interval, the per-seed differences beside it, and the minimum detectable effect at 80% power.

For n paired differences d_1..d_n with mean d̄ and sample standard deviation s:

    95% interval    d̄ ± t_{0.975, n−1} · s / √n
    MDE (80% power) (t_{0.975, n−1} + t_{0.8, n−1}) · s / √n

A verdict rests on n ≥ 5 seeds; with fewer, a result is "exploratory" and carries no verdict word
(``is_exploratory``). A percentile bootstrap over 3 seeds is [min, max] of the three, which covers
the mean about 75% of the time, not 95%: it is not used here.

Pure Python (no scipy): the t quantile inverts the t distribution's CDF, written with the
regularized incomplete beta function (a continued fraction, as in Numerical Recipes §6.4).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

MIN_SEEDS_FOR_VERDICT = 5


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1) (got {p})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    """Same-seed differences (mine − theirs) and what they show."""

    diffs: tuple[float, ...]  # one per shared seed, in seed order
    mean: float
    lo: float  # the Student-t 95% interval of the mean (NaN below 2 seeds)
    hi: float
    mde: float  # the minimum detectable effect at 80% power, two-sided 5% (NaN below 2 seeds)

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def exploratory(self) -> bool:
        return is_exploratory(self.n)

    def format(self, digits: int = 3, per_seed: bool = True) -> str:
        """ "+0.028 [+0.011, +0.044] (t 95%, n = 5; per seed +0.01, ...; MDE 0.02)", "exploratory" when n < 5."""
        f = f"+.{digits}f"
        if self.n == 0:
            return "—"
        if self.n == 1:
            return f"{self.mean:{f}} (n = 1, exploratory)"
        text = f"{self.mean:{f}} [{self.lo:{f}}, {self.hi:{f}}] (t 95%, n = {self.n}"
        if per_seed:
            text += "; per seed " + ", ".join(f"{d:{f}}" for d in self.diffs)
        text += f"; MDE {self.mde:.{digits}f}"
        return text + (", exploratory)" if self.exploratory else ")")


def is_exploratory(n: int) -> bool:
    """Fewer than 5 seeds: no verdict word."""
    return n < MIN_SEEDS_FOR_VERDICT


def mean_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The Student-t interval of the mean of ``values`` (NaN, NaN below two values)."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return float("nan"), float("nan")
    n, mean, sd = len(values), statistics.fmean(values), statistics.stdev(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def minimum_detectable_effect(sd: float, n: int, power: float = 0.8, level: float = 0.95) -> float:
    """(t_{(1+level)/2, n−1} + t_{power, n−1})·sd/√n: the smallest true mean difference a paired
    t-test at ``level`` finds with probability ``power`` (NaN below two seeds)."""
    if n < 2:
        return float("nan")
    return (t_quantile(0.5 + level / 2.0, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def paired(diffs) -> Paired:
    """The ``Paired`` summary of same-seed differences."""
    diffs = tuple(float(d) for d in diffs)
    mean = statistics.fmean(diffs) if diffs else float("nan")
    lo, hi = mean_interval(diffs)
    mde = minimum_detectable_effect(statistics.stdev(diffs), len(diffs)) if len(diffs) > 1 else float("nan")
    return Paired(diffs, mean, lo, hi, mde)


def paired_runs(mine: list[dict], theirs: list[dict], key: str) -> Paired:
    """Same-seed differences mine − theirs of ``key`` over runs (dicts with a ``seed``), in seed order."""
    by_seed = {r["seed"]: r[key] for r in theirs}
    pairs = sorted((r["seed"], r[key] - by_seed[r["seed"]]) for r in mine if r["seed"] in by_seed)
    return paired(d for _, d in pairs)
