"""The numbers behind a table cell: mean ± std of a group's trials, and the comparison of a group
with the baseline (difference of means, 95 % confidence interval, t-test p-value).

Runs of a group and of the baseline that share a seed saw the same data order and detection seed,
so their difference removes what the seed alone does: the paired t-test on per-seed differences is
the sharper test when every seed has a partner. Otherwise the trials are independent samples and
Welch's t-test (no equal-variance assumption) is the honest one. scipy.stats provides both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import scipy.stats

PAIRED = "paired_t"  # t-test on the per-seed differences (scipy.stats.ttest_rel)
WELCH = "welch_t"  # Welch's t-test (scipy.stats.ttest_ind, equal_var=False)
CONFIDENCE = 0.95


@dataclass
class Stat:
    """Mean and sample std (ddof=1) of one metric over a group's trials; std is None for n<2."""

    mean: float
    std: float | None
    n: int


@dataclass
class Delta:
    """Group mean minus baseline mean, and the test that says how sure that difference is.

    ``test`` is ``PAIRED``, ``WELCH`` or None (no test possible: ``no_test`` says why); ``ci`` is
    the 95 % confidence interval of the difference and ``p`` the two-sided p-value. For a paired
    test ``n_group == n_baseline`` is the number of pairs.
    """

    value: float
    test: str | None
    n_group: int
    n_baseline: int
    df: float | None = None
    ci: tuple[float, float] | None = None
    p: float | None = None
    no_test: str = ""


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence[Any]) -> Stat | None:
    """Mean and sample standard deviation; NaN entries (e.g. COCO APs with no small objects) are
    left out, so ``n`` can be smaller than the number of runs."""
    vals = _finite(values)
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return Stat(statistics.fmean(vals), std, len(vals))


def _no_spread(xs: list[float]) -> bool:
    # exact ties after float subtraction leave a tiny spread; a t statistic from it is noise
    scale = 1.0 + max(abs(x) for x in xs)
    return statistics.stdev(xs) <= 1e-9 * scale


def _by_seed(trials: Sequence[tuple[Any, Any]]) -> dict[Any, float] | None:
    """seed -> value for the finite values; None when a seed is missing or repeated."""
    out: dict[Any, float] = {}
    for seed, v in trials:
        if v is None or not math.isfinite(float(v)):
            continue
        if seed is None or seed in out:
            return None
        out[seed] = float(v)
    return out


def compare(group: Sequence[tuple[Any, Any]], base: Sequence[tuple[Any, Any]]) -> Delta | None:
    """Compare a group's trials with the baseline's, each given as ``(seed, value)`` pairs.

    Paired t-test when both sides have a finite value for exactly the same seeds (each once),
    else Welch's t-test; no test with fewer than two trials (pairs) or when the compared values
    have no spread. None when either side has no finite value.
    """
    g = _finite([v for _, v in group])
    b = _finite([v for _, v in base])
    if not g or not b:
        return None
    value = statistics.fmean(g) - statistics.fmean(b)
    gs, bs = _by_seed(group), _by_seed(base)
    if gs is not None and bs is not None and gs.keys() == bs.keys():
        n = len(gs)
        d = Delta(value, PAIRED, n, n)
        if n < 2:
            d.test, d.no_test = None, "n=1"
            return d
        seeds = sorted(gs, key=str)
        if _no_spread([gs[s] - bs[s] for s in seeds]):
            d.test, d.no_test = None, "the per-seed differences have no spread"
            return d
        res = scipy.stats.ttest_rel([gs[s] for s in seeds], [bs[s] for s in seeds])
    else:
        d = Delta(value, WELCH, len(g), len(b))
        if len(g) < 2 or len(b) < 2:
            d.test, d.no_test = None, f"n={len(g)} vs {len(b)}"
            return d
        if _no_spread(g) and _no_spread(b):
            d.test, d.no_test = None, "the trials of both groups have no spread"
            return d
        res = scipy.stats.ttest_ind(g, b, equal_var=False)
    ci = res.confidence_interval(CONFIDENCE)
    d.df, d.ci, d.p = float(res.df), (float(ci.low), float(ci.high)), float(res.pvalue)
    return d
