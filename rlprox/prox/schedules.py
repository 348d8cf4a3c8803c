"""Coefficient schedules: small callables ``f(step) -> float`` (e.g. for a regularizer's λ).

``build_schedule({"type": "linear", "start": 0, "end": 1e-3, "steps": 1000})`` builds one
from a recipe entry; a bare number means a constant.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from rlprox.errors import RegistryError
from rlprox.registry import Registry

__all__ = ["constant", "linear", "cosine", "piecewise_sine", "SCHEDULES", "build_schedule"]


@dataclass(frozen=True)
class constant:
    """λ(t) = value."""

    value: float

    def __call__(self, step: int) -> float:
        return float(self.value)


def _progress(step: int, steps: int) -> float:
    if steps <= 0:
        return 1.0
    return min(max(step / steps, 0.0), 1.0)


@dataclass(frozen=True)
class linear:
    """λ(t) = start + (end − start)·min(t/steps, 1)."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * _progress(step, self.steps)


@dataclass(frozen=True)
class cosine:
    """λ(t) = end + (start − end)·½(1 + cos(π·min(t/steps, 1)))."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        p = _progress(step, self.steps)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))


class piecewise_sine:
    """ProSparse's progressive schedule: stage i raises λ from λ_{i−1} to the peak λ_i
    over (T_{i−1}, T_i] (cumulative ``ends``, T_0 = 0, λ_0 = ``start``):

        λ(t) = λ_{i−1} + η·(λ_i − λ_{i−1}),
        η = ½[sin(−π/2 + π·(t − T_{i−1})/(T_i − T_{i−1})) + 1],

    constant λ_last after the last end, λ_0 before 0.
    """

    def __init__(self, peaks, ends, start: float = 0.0):
        peaks, ends = [float(p) for p in peaks], [int(e) for e in ends]
        if len(peaks) != len(ends) or not peaks:
            raise ValueError(
                f"piecewise_sine: 'peaks' and 'ends' need the same non-zero length (got {len(peaks)} and {len(ends)})"
            )
        if any(b <= a for a, b in zip([0] + ends, ends)):
            raise ValueError(f"piecewise_sine: 'ends' must be positive and increasing (got {ends})")
        self.peaks, self.ends, self.start = peaks, ends, float(start)

    def __call__(self, step: int) -> float:
        if step <= 0:
            return self.start
        if step >= self.ends[-1]:
            return self.peaks[-1]
        i = bisect.bisect_left(self.ends, step)  # stage with T_{i-1} < step <= T_i
        t0 = self.ends[i - 1] if i > 0 else 0
        lam0 = self.peaks[i - 1] if i > 0 else self.start
        frac = (step - t0) / (self.ends[i] - t0)
        eta = 0.5 * (math.sin(-0.5 * math.pi + math.pi * frac) + 1.0)
        return lam0 + eta * (self.peaks[i] - lam0)

    def __repr__(self) -> str:
        return f"piecewise_sine(peaks={self.peaks}, ends={self.ends}, start={self.start})"


SCHEDULES = Registry("schedule")
for _name, _cls in (
    ("constant", constant),
    ("linear", linear),
    ("cosine", cosine),
    ("piecewise_sine", piecewise_sine),
):
    SCHEDULES.register(_name, _cls)


def build_schedule(spec):
    """Build a schedule from ``{"type": name, **kwargs}`` (or a number: constant).
    Raises ``ValueError`` with a one-line message naming the bad field."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return constant(float(spec))
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError("schedule field 'type' is missing")
    name = spec["type"]
    if not isinstance(name, str) or ":" in name:
        raise ValueError(f"schedule field 'type': expected one of {', '.join(SCHEDULES.names())} (got {name!r})")
    try:
        SCHEDULES.get(name)
    except RegistryError as err:
        raise ValueError(f"schedule field 'type': {err}") from None
    try:
        return SCHEDULES.build(name, {k: v for k, v in spec.items() if k != "type"})
    except RegistryError as err:
        raise ValueError(str(err)) from None
