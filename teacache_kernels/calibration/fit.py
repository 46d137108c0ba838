"""The rescale polynomial fit, and how well each candidate signal predicts the target."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np

from ..coefficients import MAX_COEFFICIENTS


@dataclass(frozen=True)
class PolynomialFit:
    """y ~ poly(x) for one candidate signal: `numpy.polyfit` coefficients, highest power first."""

    signal: str
    coefficients: tuple[float, ...]
    r2: float  # 1 - SS_res / SS_tot of the fit (NaN when y is constant)
    pearson: float  # linear correlation of x and y
    spearman: float  # rank correlation of x and y (any monotonic relation scores 1)
    x_range: tuple[float, float]
    num_pairs: int

    def as_dict(self) -> dict:
        return {
            "signal": self.signal,
            "coefficients": list(self.coefficients),
            "r2": _json_float(self.r2),
            "pearson": _json_float(self.pearson),
            "spearman": _json_float(self.spearman),
            "x_range": [self.x_range[0], self.x_range[1]],
            "num_pairs": self.num_pairs,
        }

    def __call__(self, x):
        return np.polyval(np.asarray(self.coefficients, dtype=np.float64), x)


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None  # JSON has no NaN


def check_degree(degree) -> int:
    if isinstance(degree, bool) or not isinstance(degree, numbers.Integral) or not 1 <= degree < MAX_COEFFICIENTS:
        raise ValueError(
            f"degree must be an integer from 1 to {MAX_COEFFICIENTS - 1} (the runtime evaluates at most "
            f"{MAX_COEFFICIENTS} coefficients), got {degree!r}"
        )
    return int(degree)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    r = np.empty(len(v), dtype=np.float64)
    start = 0
    while start < len(v):
        end = start
        while end + 1 < len(v) and sorted_v[end + 1] == sorted_v[start]:
            end += 1
        r[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


def fit_polynomial(signal: str, x, y, degree: int = 4) -> PolynomialFit:
    """Least-squares polynomial of `degree` through the (x, y) pairs, with R^2 and both correlations."""
    degree = check_degree(degree)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of one length, got shapes {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) <= degree:
        raise ValueError(
            f"signal {signal!r}: {len(x)} finite (x, y) pairs cannot fit a degree-{degree} polynomial "
            f"(needs at least {degree + 1}): use more samples or steps, or a lower degree"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.RankWarning)  # badly conditioned fits show in R^2
        coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    return PolynomialFit(
        signal=signal,
        coefficients=tuple(float(c) for c in coefficients),
        r2=r2,
        pearson=pearson(x, y),
        spearman=spearman(x, y),
        x_range=(float(x.min()), float(x.max())),
        num_pairs=len(x),
    )


def rank_key(fit: PolynomialFit) -> tuple:
    """Sort key: highest R^2 first (NaN last), then Spearman."""
    r2 = fit.r2 if math.isfinite(fit.r2) else -math.inf
    rho = fit.spearman if math.isfinite(fit.spearman) else -math.inf
    return (-r2, -rho)
