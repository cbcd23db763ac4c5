"""The numbers behind a table cell: mean ± std of a group's trials, and the comparison of a group
with the baseline (difference of means, 95 % confidence interval, t-test p-value, and the power
figures: the minimum detectable effect for the n at hand and the n needed for a given effect).

Runs of a group and of the baseline that share a seed saw the same data order and detection seed,
so their difference removes what the seed alone does: the paired t-test on per-seed differences is
the sharper test when every seed has a partner. Otherwise the trials are independent samples and
Welch's t-test (no equal-variance assumption) is the honest one. scipy.stats provides both.

A p-value alone does not say whether n seeds could have found anything: a Δ of +0.3 with p=0.4
reads the same whether the test could have seen a true 0.3 or only a true 3. The power figures
answer that with the same test: the statistic of a two-sided t-test is noncentral t
(scipy.stats.nct) with noncentrality = true difference / standard error, so power, the minimum
detectable effect (MDE) and the planning n follow from the sd and n. They take the sd observed now
as the true sd: with a few seeds that sd is itself uncertain (from 3 seeds the true sd exceeds
twice the estimate about one time in five: 2 s²/σ² is chi-square with 2 df), so they are a guide
for planning, not a guarantee; a cautious plan puts an upper confidence bound of the sd into
``n_paired``/``n_welch``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import scipy.optimize
import scipy.stats

from ..utils.errors import MCLDetError

PAIRED = "paired_t"  # t-test on the per-seed differences (scipy.stats.ttest_rel)
WELCH = "welch_t"  # Welch's t-test (scipy.stats.ttest_ind, equal_var=False)
CONFIDENCE = 0.95
ALPHA = 0.05  # two-sided significance level the power figures are planned for
POWER = 0.8  # the power of the minimum detectable effect and of the planning n
N_MAX = 1_000_000  # a planning n beyond this is reported as "more than N_MAX", not counted


# ----------------------------------------------------------------------------- power


def t_power(nc: float, df: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided t-test at level ``alpha`` when its statistic is noncentral t with
    ``df`` degrees of freedom and noncentrality ``nc`` (true difference / standard error):
    P(|T| > t_{1-alpha/2, df}).

    Both tails are computed as upper tails, P(T < -c | nc) = P(T > c | -nc): scipy's ``nct.cdf``
    far in the lower tail returns NaN once nc is about 8 or more, its ``sf`` does not.
    """
    c = scipy.stats.t.ppf(1 - alpha / 2, df)
    return float(scipy.stats.nct.sf(c, df, nc) + scipy.stats.nct.sf(c, df, -nc))


def welch_df(sd1: float, n1: int, sd2: float, n2: int) -> float:
    """Welch–Satterthwaite degrees of freedom, as ``ttest_ind(equal_var=False)`` uses them."""
    v1, v2 = sd1 * sd1 / n1, sd2 * sd2 / n2
    return (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))


def power_paired(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the paired t-test on ``n`` pairs to find a true mean difference ``effect`` when
    the per-seed differences have standard deviation ``sd`` (df n-1, nc effect·√n/sd)."""
    return t_power(effect * math.sqrt(n) / sd, n - 1, alpha)


def power_welch(
    effect: float, sd1: float, n1: int, sd2: float, n2: int, alpha: float = ALPHA
) -> float:
    """Power of Welch's t-test to find a true difference ``effect`` between groups of ``n1`` and
    ``n2`` trials with sds ``sd1``, ``sd2`` (Welch–Satterthwaite df, nc effect/√(s1²/n1+s2²/n2))."""
    se = math.sqrt(sd1 * sd1 / n1 + sd2 * sd2 / n2)
    return t_power(effect / se, welch_df(sd1, n1, sd2, n2), alpha)


def _check_levels(alpha: float, power: float) -> None:
    if not (0 < alpha < power < 1):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")


def nc_for_power(df: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """The noncentrality at which the two-sided test with ``df`` reaches ``power``. Power rises
    with nc from ``alpha`` at 0 towards 1, so doubling brackets the root and brentq finds it."""
    _check_levels(alpha, power)
    hi = 1.0
    while t_power(hi, df, alpha) < power:
        hi *= 2
    return float(scipy.optimize.brentq(lambda x: t_power(x, df, alpha) - power, 0.0, hi))


def mde_paired(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """Minimum detectable effect of the paired t-test: the true mean difference (either sign)
    found with ``power`` by ``n`` pairs whose differences have sd ``sd``. None for n < 2 or no
    spread (no test, so nothing to detect with)."""
    if n < 2 or not sd > 0:
        return None
    return sd / math.sqrt(n) * nc_for_power(n - 1, power, alpha)


def mde_welch(
    sd1: float, n1: int, sd2: float, n2: int, alpha: float = ALPHA, power: float = POWER
) -> float | None:
    """Minimum detectable effect of Welch's t-test for these two groups (standard error and df
    from their sds and ns). None when a group has fewer than 2 trials or neither has spread."""
    if n1 < 2 or n2 < 2 or not (sd1 > 0 or sd2 > 0):
        return None
    se = math.sqrt(sd1 * sd1 / n1 + sd2 * sd2 / n2)
    return se * nc_for_power(welch_df(sd1, n1, sd2, n2), power, alpha)


def _smallest_n(reaches: Callable[[int], bool]) -> int | None:
    """Smallest n >= 2 with ``reaches(n)``, for a condition that holds from some n on (power
    rises with n): doubling, then bisection. None when it is not reached by N_MAX."""
    lo, hi = 1, 2  # reaches(lo) is False by convention (no test with one trial)
    while not reaches(hi):
        if hi >= N_MAX:
            return None
        lo, hi = hi, min(2 * hi, N_MAX)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def n_paired(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Pairs needed for the paired t-test to find a true difference ``effect`` with ``power``
    when the per-seed differences have sd ``sd``: the smallest such n. None with no spread, or
    when more than N_MAX pairs would be needed."""
    _check_levels(alpha, power)
    if not effect > 0:
        raise ValueError(f"effect must be > 0, got {effect}")
    if not sd > 0:
        return None
    return _smallest_n(lambda n: power_paired(effect, sd, n, alpha) >= power)


def n_welch(
    effect: float, sd1: float, sd2: float, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Trials per group (the same n in both) for Welch's t-test to find a true difference
    ``effect`` with ``power`` when the groups have sds ``sd1`` and ``sd2``. None when neither has
    spread, or when more than N_MAX per group would be needed."""
    _check_levels(alpha, power)
    if not effect > 0:
        raise ValueError(f"effect must be > 0, got {effect}")
    if not (sd1 > 0 or sd2 > 0):
        return None
    return _smallest_n(lambda n: power_welch(effect, sd1, n, sd2, n, alpha) >= power)


@dataclass(frozen=True)
class Plan:
    """What the power figures are computed for: the two-sided level ``alpha``, the target
    ``power``, and ``effect`` (AP points, every metric), the difference whose planning n is asked
    for (None: no planning n). Checked on construction, before any run is read."""

    alpha: float = ALPHA
    power: float = POWER
    effect: float | None = None

    def __post_init__(self) -> None:
        # the bounds keep scipy's noncentral t in the range where its series converge
        if not 0.001 <= self.alpha <= 0.5:
            raise MCLDetError(f"--alpha {self.alpha} is out of range; use 0.001..0.5")
        if not self.alpha < self.power <= 0.999:
            raise MCLDetError(
                f"--power {self.power} is out of range; use a value above --alpha ({self.alpha}) "
                "and at most 0.999"
            )
        if self.effect is not None and not (math.isfinite(self.effect) and self.effect > 0):
            raise MCLDetError(
                f"--effect {self.effect} is not a positive number; give the difference to "
                "detect in AP points, e.g. --effect 0.5"
            )

    @property
    def label(self) -> str:
        """'MDE80' for power 0.8: the name of the figure in the Δ cells."""
        return f"MDE{self.power * 100:g}"


DEFAULT_PLAN = Plan()


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
    test ``n_group == n_baseline`` is the number of pairs. ``mde`` is the minimum detectable
    effect of that test at the plan's power and level for this n (None with no test);
    ``n_needed`` the pairs (paired) or trials per group (Welch) to detect the plan's effect
    (None with no test, no effect asked, or more than ``N_MAX``).
    """

    value: float
    test: str | None
    n_group: int
    n_baseline: int
    df: float | None = None
    ci: tuple[float, float] | None = None
    p: float | None = None
    no_test: str = ""
    mde: float | None = None
    n_needed: int | None = None


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


def compare(
    group: Sequence[tuple[Any, Any]], base: Sequence[tuple[Any, Any]], plan: Plan = DEFAULT_PLAN
) -> Delta | None:
    """Compare a group's trials with the baseline's, each given as ``(seed, value)`` pairs.

    Paired t-test when both sides have a finite value for exactly the same seeds (each once),
    else Welch's t-test; no test with fewer than two trials (pairs) or when the compared values
    have no spread. None when either side has no finite value. The power figures use the test's
    own spread: the sd of the per-seed differences when paired, the two groups' sds for Welch.
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
        diffs = [gs[s] - bs[s] for s in seeds]
        if _no_spread(diffs):
            d.test, d.no_test = None, "the per-seed differences have no spread"
            return d
        res = scipy.stats.ttest_rel([gs[s] for s in seeds], [bs[s] for s in seeds])
        sd = statistics.stdev(diffs)
        d.mde = mde_paired(sd, n, plan.alpha, plan.power)
        if plan.effect is not None:
            d.n_needed = n_paired(plan.effect, sd, plan.alpha, plan.power)
    else:
        d = Delta(value, WELCH, len(g), len(b))
        if len(g) < 2 or len(b) < 2:
            d.test, d.no_test = None, f"n={len(g)} vs {len(b)}"
            return d
        if _no_spread(g) and _no_spread(b):
            d.test, d.no_test = None, "the trials of both groups have no spread"
            return d
        res = scipy.stats.ttest_ind(g, b, equal_var=False)
        sg, sb = statistics.stdev(g), statistics.stdev(b)
        d.mde = mde_welch(sg, len(g), sb, len(b), plan.alpha, plan.power)
        if plan.effect is not None:
            d.n_needed = n_welch(plan.effect, sg, sb, plan.alpha, plan.power)
    ci = res.confidence_interval(CONFIDENCE)
    d.df, d.ci, d.p = float(res.df), (float(ci.low), float(ci.high)), float(res.pvalue)
    return d
