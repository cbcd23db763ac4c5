"""The power figures of tools/report.py (mcl_det.report.stats): the two-sided t-test's power from
the noncentral t, against a hand integral of its definition, the normal limit and published
sample sizes (G*Power / Cohen); the minimum detectable effect; the planning n; the edge cases."""

from __future__ import annotations

import math

import pytest

from mcl_det.report.stats import (
    N_MAX,
    PAIRED,
    WELCH,
    Plan,
    compare,
    mde_paired,
    mde_welch,
    n_paired,
    n_welch,
    nc_for_power,
    power_paired,
    power_welch,
    t_power,
    welch_df,
)
from mcl_det.utils.errors import MCLDetError

# ----------------------------------------------------------------------------- by hand


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def hand_reject(nc: float, df: float, c: float, steps: int = 4000) -> float:
    """P(|T| > c) for T = (Z + nc) / sqrt(V / df), Z ~ N(0, 1), V ~ chi2(df), straight from that
    definition: condition on u = sqrt(V) (chi density, smooth at 0 for df >= 1), then
    P(|T| > c | u) = Phi(nc - c u / sqrt(df)) + Phi(-nc - c u / sqrt(df)); Simpson's rule in u."""
    lo, hi = max(0.0, math.sqrt(df) - 12.0), math.sqrt(df) + 12.0
    log_k = math.log(2.0) - (df / 2) * math.log(2.0) - math.lgamma(df / 2)

    def f(u: float) -> float:
        if u <= 0.0:
            dens = math.exp(log_k) if df == 1 else 0.0
        else:
            dens = math.exp(log_k + (df - 1) * math.log(u) - u * u / 2)
        s = c * u / math.sqrt(df)
        return dens * (phi(nc - s) + phi(-nc - s))

    h = (hi - lo) / steps
    acc = f(lo) + f(hi)
    for i in range(1, steps):
        acc += (4 if i % 2 else 2) * f(lo + i * h)
    return acc * h / 3


def hand_crit(df: float, alpha: float) -> float:
    """t_{1 - alpha/2, df} by bisection on the central case of the integral above."""
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if hand_reject(0.0, df, mid) > alpha else (lo, mid)
    return (lo + hi) / 2


def hand_power(nc: float, df: float, alpha: float = 0.05) -> float:
    return hand_reject(nc, df, hand_crit(df, alpha))


def test_hand_integral_matches_closed_forms():
    # df 2: P(|T| < t) = t / sqrt(2 + t^2), so t_{0.975, 2} = 0.95 / sqrt(2 * 0.975 * 0.025)
    assert hand_crit(2, 0.05) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-6)
    # df 1 (Cauchy): P(|T| > 1) = 1/2
    assert hand_reject(0.0, 1, 1.0) == pytest.approx(0.5, abs=1e-7)


# ----------------------------------------------------------------------------- power


@pytest.mark.parametrize(
    "nc, df, alpha",
    [
        (0.0, 4, 0.05),
        (1.0, 2, 0.05),
        (2.5, 4, 0.05),
        (3.0, 9, 0.05),
        (2.0, 7.3, 0.05),  # fractional df, as Welch-Satterthwaite gives
        (4.0, 1, 0.05),
        (2.8, 30, 0.01),
        (1.5, 5, 0.2),
        (8.5, 6, 0.05),  # where scipy's nct.cdf of the lower tail is NaN
    ],
)
def test_t_power_matches_hand_integral(nc, df, alpha):
    assert t_power(nc, df, alpha) == pytest.approx(hand_power(nc, df, alpha), abs=2e-6)
    assert t_power(-nc, df, alpha) == pytest.approx(t_power(nc, df, alpha), abs=1e-12)


def test_t_power_limits():
    for df in (1, 3, 40):
        assert t_power(0.0, df) == pytest.approx(0.05, abs=1e-12)  # no effect: alpha
        assert t_power(60.0, df) == pytest.approx(1.0, abs=1e-3)
    # df -> infinity: the z-test, Phi(nc - z) + Phi(-nc - z), z = 1.959964
    z = 1.959963984540054
    for nc in (0.5, 2.0, 2.8):
        assert t_power(nc, 1e7) == pytest.approx(phi(nc - z) + phi(-nc - z), abs=1e-5)


def test_power_paired_and_welch_are_the_t_power_of_their_design():
    # paired: nc = effect sqrt(n) / sd, df n - 1
    assert power_paired(0.3, 0.25, 6) == pytest.approx(t_power(0.3 * math.sqrt(6) / 0.25, 5))
    # Welch: nc = effect / sqrt(s1^2/n1 + s2^2/n2), Welch-Satterthwaite df
    v1, v2 = 0.4**2 / 5, 0.2**2 / 3
    df = (v1 + v2) ** 2 / (v1**2 / 4 + v2**2 / 2)
    assert welch_df(0.4, 5, 0.2, 3) == pytest.approx(df, abs=1e-12)
    assert power_welch(0.5, 0.4, 5, 0.2, 3) == pytest.approx(
        hand_power(0.5 / math.sqrt(v1 + v2), df), abs=2e-6
    )
    # equal sds and n: Welch's df is the pooled test's 2n - 2
    assert welch_df(1.0, 7, 1.0, 7) == pytest.approx(12.0)


# ----------------------------------------------------------------------------- published n


@pytest.mark.parametrize(
    "d, n",
    [(0.5, 34), (0.8, 15), (1.0, 10)],  # G*Power: t-test, matched pairs, two-sided, 0.05, 0.8
)
def test_n_paired_published(d, n):
    assert n_paired(d, 1.0) == n
    assert n_paired(d * 0.37, 0.37) == n  # only effect / sd matters
    # the smallest such n: power crosses 0.8 between n - 1 and n (checked by hand)
    assert hand_power(d * math.sqrt(n - 1), n - 2) < 0.8 <= hand_power(d * math.sqrt(n), n - 1)


@pytest.mark.parametrize(
    "d, n",
    # G*Power two independent means, equal n (Cohen 1988, Table 2.4.1: 64, 26; 393 there is the
    # normal-approximation figure, the exact noncentral t gives 394 as G*Power does)
    [(0.5, 64), (0.8, 26), (0.2, 394)],
)
def test_n_welch_equal_sds_published(d, n):
    assert n_welch(d, 1.0, 1.0) == n
    nc = d * math.sqrt(n / 2)  # two samples of n: se = sd sqrt(2 / n), df 2n - 2
    assert t_power(nc, 2 * n - 2) >= 0.8 > t_power(d * math.sqrt((n - 1) / 2), 2 * n - 4)


def test_moco_voc_example():
    """The issue's example: MoCo's VOC trials, std about 0.2 AP per group, effect 0.3 AP."""
    sd_diff = 0.2 * math.sqrt(2)  # differences of two independent 0.2-sd trials
    # the exact paired t-test needs 10 pairs: 9 give 79.5 %
    assert n_paired(0.3, sd_diff) == 10
    assert power_paired(0.3, sd_diff, 9) == pytest.approx(0.7954, abs=1e-4)
    assert power_paired(0.3, sd_diff, 10) == pytest.approx(0.8464, abs=1e-4)
    # "about 7" is the normal approximation ((z_0.975 + z_0.8) sd / effect)^2 = 6.98
    z = 1.959963984540054 + 0.8416212335729143
    assert math.ceil((z * sd_diff / 0.3) ** 2) == 7
    # seven pairs are enough when the differences' sd is at most 0.2357
    assert n_paired(0.3, 0.235) == 7 and n_paired(0.3, 0.236) == 8
    # independent trials (Welch, same n): 9 per group; AP75's std 0.4: 29 per group
    assert n_welch(0.3, 0.2, 0.2) == 9 and n_welch(0.3, 0.4, 0.4) == 29
    # and what 5 paired seeds can find at 80 %: 0.48 AP
    assert mde_paired(sd_diff, 5) == pytest.approx(0.4757, abs=1e-4)


# ----------------------------------------------------------------------------- MDE


def test_nc_for_power_by_hand():
    # the noncentrality reaching 80 % with df 2 (the 3-pair cells of test_report's tables)
    nc = nc_for_power(2)
    assert nc == pytest.approx(5.653489, abs=1e-6)
    assert hand_power(nc, 2) == pytest.approx(0.8, abs=2e-6)
    assert hand_power(nc_for_power(6, 0.9, 0.01), 6, 0.01) == pytest.approx(0.9, abs=2e-6)


@pytest.mark.parametrize("sd, n", [(0.5, 3), (0.3, 5), (1.7, 2), (0.05, 40)])
def test_mde_paired_reaches_the_power(sd, n):
    mde = mde_paired(sd, n)
    assert mde == pytest.approx(sd / math.sqrt(n) * nc_for_power(n - 1))
    assert power_paired(mde, sd, n) == pytest.approx(0.8, abs=1e-9)
    assert hand_power(mde * math.sqrt(n) / sd, n - 1) == pytest.approx(0.8, abs=2e-6)
    assert power_paired(mde * 0.99, sd, n) < 0.8  # the smallest such effect


def test_mde_welch_reaches_the_power():
    mde = mde_welch(0.4, 5, 0.2, 3, alpha=0.05, power=0.9)
    assert power_welch(mde, 0.4, 5, 0.2, 3) == pytest.approx(0.9, abs=1e-9)
    # equal sds, equal n: the two-sample MDE, sd sqrt(2 / n) nc(2n - 2)
    assert mde_welch(1.0, 8, 1.0, 8) == pytest.approx(math.sqrt(2 / 8) * nc_for_power(14))
    # one group without spread: its variance term is 0 and df is the other's n - 1
    assert mde_welch(0.0, 4, 0.6, 5) == pytest.approx(0.6 / math.sqrt(5) * nc_for_power(4))


def test_more_seeds_smaller_mde_and_n_is_consistent():
    # the n needed for the MDE of n pairs is n itself (the two are inverses)
    for n in (3, 5, 12):
        mde = mde_paired(0.4, n)
        assert n_paired(mde * 1.000001, 0.4) == n
        assert mde_paired(0.4, n + 1) < mde


def test_edge_cases():
    assert mde_paired(0.5, 1) is None  # one pair: no test
    assert mde_paired(0.0, 5) is None  # no spread: no test
    assert mde_welch(0.5, 1, 0.5, 4) is None and mde_welch(0.0, 3, 0.0, 3) is None
    assert n_paired(0.5, 0.0) is None and n_welch(0.5, 0.0, 0.0) is None
    assert n_paired(100.0, 1.0) == 2  # a huge effect: the fewest pairs a test can have
    assert n_paired(1e-3, 1.0) is None  # about 7.85 million pairs: more than N_MAX
    assert n_paired(2.8 / math.sqrt(N_MAX / 2), 1.0) is not None  # about N_MAX / 2
    with pytest.raises(ValueError):
        n_paired(0.0, 1.0)
    with pytest.raises(ValueError):
        mde_paired(1.0, 5, alpha=0.05, power=0.04)  # power must exceed alpha


# ----------------------------------------------------------------------------- in compare


def test_compare_carries_the_power_figures():
    plan = Plan(effect=0.4)
    g = [(0, 30.0), (1, 31.0), (2, 32.0), (3, 30.2)]
    b = [(0, 30.1), (1, 30.5), (2, 31.0), (3, 30.3)]
    diffs = [gv - bv for (_, gv), (_, bv) in zip(g, b)]
    sd = math.sqrt(sum((x - sum(diffs) / 4) ** 2 for x in diffs) / 3)
    d = compare(g, b, plan)
    assert d.test == PAIRED
    assert d.mde == pytest.approx(mde_paired(sd, 4))
    assert d.n_needed == n_paired(0.4, sd)
    # without an effect, no planning n; other mismatched seeds: Welch, the groups' own sds
    d = compare(g, [(s + 10, v) for s, v in b])
    assert d.test == WELCH and d.n_needed is None
    sg = math.sqrt(sum((v - 30.8) ** 2 for _, v in g) / 3)
    sb = math.sqrt(sum((v - 30.475) ** 2 for _, v in b) / 3)
    assert d.mde == pytest.approx(mde_welch(sg, 4, sb, 4))
    assert compare(g, [(s + 10, v) for s, v in b], plan).n_needed == n_welch(0.4, sg, sb)
    # no test: no figures
    d = compare([(0, 30.0)], [(0, 29.0)], plan)
    assert d.test is None and d.mde is None and d.n_needed is None
    d = compare([(0, 31.0), (1, 32.0)], [(0, 30.0), (1, 31.0)], plan)
    assert d.test is None and d.mde is None and d.n_needed is None


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"alpha": 0.0}, "--alpha"),
        ({"alpha": 0.6}, "--alpha"),
        ({"power": 0.05}, "--power"),  # not above alpha
        ({"power": 1.0}, "--power"),
        ({"effect": 0.0}, "--effect"),
        ({"effect": -0.3}, "--effect"),
        ({"effect": float("nan")}, "--effect"),
        ({"effect": float("inf")}, "--effect"),
    ],
)
def test_plan_rejects_bad_values(kw, flag):
    with pytest.raises(MCLDetError, match=flag):
        Plan(**kw)


def test_plan_label():
    assert Plan().label == "MDE80" and Plan(power=0.9).label == "MDE90"
    assert Plan(power=0.95).label == "MDE95"
