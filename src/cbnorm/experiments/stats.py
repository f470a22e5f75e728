r"""What a reproduction table says about its seeds: means, 95% confidence intervals and verdicts.

Each row of a table is a layer trained under several seeds. :func:`interval` gives its mean, sample
standard deviation and the half-width of a Student-t confidence interval,
:math:`t_{0.975,\,n-1}\, s / \sqrt{n}`. Each layer is compared with the baseline (BatchNorm or the plain
network) run under the same seeds: :func:`paired` takes the per-seed differences, and :func:`verdict`
reads their interval, so that no table ever states a difference by hand:

- ``better`` / ``worse`` when the interval of the difference excludes 0;
- ``no difference detected (±W)`` otherwise, ``W`` the half-width: the smallest difference the runs
  could have told from none.

:func:`claim_verdict` holds an interval against a gain a paper claims (``confirmed``, ``refuted``,
``inconclusive (±W)``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

__all__ = ["Interval", "claim_verdict", "comparison", "interval", "paired", "verdict"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values with their sample std and the half-width of the confidence interval
    (NaN for fewer than two values)."""

    mean: float
    std: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def cell(self, digits: int = 2) -> str:
        """``mean ± half-width`` for a table cell (``mean`` alone for one value, ``—`` for none)."""
        if not math.isfinite(self.mean):
            return "—"
        if not math.isfinite(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"

    def to_dict(self) -> dict:
        return {**asdict(self), "low": self.low, "high": self.high, "confidence": CONFIDENCE}

    @classmethod
    def from_dict(cls, fields: dict) -> Interval:
        """The interval of a :meth:`to_dict` (as ``summary.json`` holds it)."""
        return cls(**{name: fields[name] for name in ("mean", "std", "half_width", "n")})


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, sample std and the Student-t half-width of the finite ``values``."""
    from scipy.stats import t

    finite = [float(v) for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(finite) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))
    return Interval(mean, std, float(t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n), n)


def paired(values: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The interval of ``values[i] - baseline[i]``, seed ``i`` in both (pairs with a non-finite side are dropped)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired: expected one baseline value per seed, got {len(values)} values and "
                         f"{len(baseline)} baseline values")
    return interval([v - b for v, b in zip(values, baseline) if math.isfinite(v) and math.isfinite(b)], confidence)


def verdict(difference: Interval, higher_is_better: bool = True, digits: int = 2) -> str:
    """``better``, ``worse`` or ``no difference detected (±W)`` from the interval of a paired difference."""
    if difference.n < 2 or not math.isfinite(difference.half_width):
        return f"no interval ({difference.n} paired seed{'s' * (difference.n != 1)})"
    if difference.low > 0 or difference.high < 0:
        return "better" if (difference.low > 0) == higher_is_better else "worse"
    return f"no difference detected (±{difference.half_width:.{digits}f})"


def claim_verdict(difference: Interval, claimed: float, digits: int = 2) -> str:
    """Our interval of a gain against the gain ``claimed`` (> 0, same units).

    ``confirmed``: the interval excludes 0 on the claim's side and does not exclude the claimed gain
    (``confirmed in direction, smaller than claimed`` when it lies wholly below it); ``refuted``: the
    interval lies wholly below the claimed gain and does not exclude 0 or excludes it on the other side;
    ``inconclusive (±W)``: it holds both 0 and the claimed gain.
    """
    if claimed <= 0:
        raise ValueError(f"claim_verdict: expected a claimed gain > 0, got {claimed}")
    if difference.n < 2 or not math.isfinite(difference.half_width):
        return f"inconclusive (no interval: {difference.n} seed{'s' * (difference.n != 1)})"
    if difference.low > 0:
        return "confirmed" if difference.high >= claimed else "confirmed in direction, smaller than claimed"
    if difference.high < claimed:
        return "refuted"
    return f"inconclusive (±{difference.half_width:.{digits}f})"


def comparison(values: Sequence[float], baseline: Optional[Sequence[float]], higher_is_better: bool = True) -> dict:
    """A table row's statistics: its interval and, against ``baseline`` (``None``: the row is the baseline),
    the paired difference and its verdict. JSON-ready, for ``summary.json``."""
    row = {"interval": interval(values).to_dict()}
    if baseline is not None:
        difference = paired(values, baseline)
        row.update(difference=difference.to_dict(), verdict=verdict(difference, higher_is_better))
    return row
