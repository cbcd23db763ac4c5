"""tools/report.py: synthetic run folders -> exact tables, the math of every cell, fairness
warnings, pretraining summary, PNGs, and bad input (one ``error:`` line, never a traceback)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mcl_det.cli.report import main
from mcl_det.report import build_report, group_name, render
from mcl_det.report.stats import (
    PAIRED,
    WELCH,
    compare,
    mde_paired,
    mde_welch,
    mean_std,
    n_paired,
    n_welch,
)
from mcl_det.report.tables import load_reference
from mcl_det.utils.errors import MCLDetError

ROOT = Path(__file__).resolve().parents[2]
DET = "GeneralizedRCNN/StandardROIHeads/build_resnet_fpn_backbone/R18"


def write_run(folder: Path, tag: str | None, seed: int, bbox: dict, **fields) -> Path:
    """A results.json as tools/train_net.py writes it (docs/DESIGN.md)."""
    data = {
        "format": "mcl_det.detection_results/v1",
        "finished": True,
        "run_name": f"voc_r18_{tag}_seed{seed}",
        "task": "voc",
        "dataset_train": ["voc_2007_trainval"],
        "dataset_test": ["voc_2007_test"],
        "detector": DET,
        "mask_on": False,
        "weights": f"/w/{tag}_member0.pkl",
        "weights_sha256": "0" * 64,
        "weights_tag": tag,
        "seed": seed,
        "max_iter": 200,
        "iteration": 200,
        "world_size": 1,
        "ims_per_batch": 4,
        "min_size_train": [480, 512],
        "min_size_test": 320,
        "wall_time_s": 12.5,
        "config_digest": "d" * 64,
        "metrics": {"bbox": bbox},
    }
    data.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data))
    return folder / "results.json"


def voc(ap50: float, ap: float, ap75: float, **per_class: float) -> dict:
    return {"AP50": ap50, "AP": ap, "AP75": ap75, **{f"AP50-{k}": v for k, v in per_class.items()}}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """baseline and mcl x 3 seeds, plus one untagged single-seed run (group from run_name)."""
    base = [(50, 30, 25), (51, 30.5, 25), (52, 31, 25)]
    mcl = [(53, 30, 24), (54, 31, 24), (55, 32, 24.6)]
    for s, v in enumerate(base):
        write_run(tmp_path / "det_baseline" / f"seed{s}", "baseline", s, voc(*v, cat=v[0] + 1))
    for s, v in enumerate(mcl):
        write_run(tmp_path / "det_mcl" / f"seed{s}", "mcl", s, voc(*v, cat=v[0] - 2))
    write_run(
        tmp_path / "other",
        None,
        3,
        voc(52, 29, 26),
        run_name="voc_r18_other-s3",
        weights="/w/other.pkl",
    )
    return tmp_path


def report_text(paths: list[Path], fmt: str = "md", **kw) -> str:
    rep, _ = build_report([str(p) for p in paths], **kw)
    return render(rep, fmt)


# ----------------------------------------------------------------------------- math


def test_group_name_rule():
    assert group_name({"weights_tag": "mcl", "run_name": "x_seed1"}) == "mcl"
    assert group_name({"weights_tag": "", "run_name": "voc_mcl_seed12"}) == "voc_mcl"
    assert group_name({"run_name": "voc_mcl-s3"}) == "voc_mcl"
    assert group_name({"run_name": "voc_mcl_S0"}) == "voc_mcl"
    assert group_name({"run_name": "voc_mcl_ss"}) == "voc_mcl_ss"  # not a seed suffix
    assert group_name({"weights": "/a/b/mcl_member0_seed2.pkl"}) == "mcl_member0"
    # train_net.py's default run_name is the OUTPUT_DIR folder name, often just "seed0"
    assert group_name({"run_name": "seed0", "weights": "/w/mcl_m0.pkl"}) == "mcl_m0"
    assert group_name({"run_name": "seed0", "weights": ""}, Path("o/det_mcl/seed0/r.json")) == (
        "det_mcl"
    )


def loop_mean_std(xs: list[float]) -> tuple[float, float]:
    m = 0.0
    for x in xs:
        m += x
    m /= len(xs)
    ss = 0.0
    for x in xs:
        ss += (x - m) ** 2
    return m, math.sqrt(ss / (len(xs) - 1))


@pytest.mark.parametrize("xs", [[50.0, 51.0, 52.0], [24.0, 24.0, 24.6], [1.5, -2.25, 7.0, 0.125]])
def test_mean_std_matches_loop(xs):
    s = mean_std(xs)
    m, sd = loop_mean_std(xs)
    assert s.n == len(xs)
    assert s.mean == pytest.approx(m, abs=1e-12)
    assert s.std == pytest.approx(sd, abs=1e-12)


def test_mean_std_single_and_nan():
    one = mean_std([42.0])
    assert (one.mean, one.std, one.n) == (42.0, None, 1)
    s = mean_std([10.0, float("nan"), 14.0])  # COCO APs can be NaN: left out, n says so
    assert (s.mean, s.n) == (12.0, 2) and s.std == pytest.approx(math.sqrt(8.0))
    assert mean_std([float("nan")]) is None


# ----------------------------------------------------------------------------- paired / Welch tests


def t_density(x: float, df: float) -> float:
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def t_central(t: float, df: float, steps: int = 4000) -> float:
    """P(|T| < t) for Student's t with ``df`` degrees of freedom: Simpson's rule on the density."""
    h = t / steps
    acc = t_density(0.0, df) + t_density(t, df)
    for i in range(1, steps):
        acc += (4 if i % 2 else 2) * t_density(i * h, df)
    return 2 * acc * h / 3


def t_quantile_975(df: float) -> float:
    lo, hi = 0.0, 100.0
    for _ in range(60):  # bisection on P(|T| < q) = 0.95
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def by_hand(diff_mean: float, se: float, df: float) -> tuple[float, float, float]:
    """95 % interval and two-sided p of a t statistic, from the density above."""
    q = t_quantile_975(df)
    return diff_mean - q * se, diff_mean + q * se, 1 - t_central(abs(diff_mean / se), df)


def test_t_helpers_match_closed_form_df2():
    # df = 2 has a closed form: P(|T| < t) = t / sqrt(2 + t^2), q(0.975) = 0.95 / sqrt(0.04875)
    assert t_quantile_975(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-7)
    assert t_central(1.5, 2) == pytest.approx(1.5 / math.sqrt(2 + 1.5**2), abs=1e-9)


def test_paired_t_by_hand():
    # three pairs, differences 0, 0.5, 1: mean 0.5, sd 0.5, se 0.5/sqrt(3), t = sqrt(3), df 2
    d = compare([(0, 30.0), (1, 31.0), (2, 32.0)], [(0, 30.0), (1, 30.5), (2, 31.0)])
    assert (d.test, d.n_group, d.n_baseline, d.df) == (PAIRED, 3, 3, 2)
    q = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975, 2} = 4.3027
    se = 0.5 / math.sqrt(3)
    assert d.value == pytest.approx(0.5)
    assert d.ci == pytest.approx((0.5 - q * se, 0.5 + q * se), abs=1e-9)
    assert d.p == pytest.approx(1 - math.sqrt(3) / math.sqrt(5), abs=1e-9)  # 0.2254
    # differences -1, -1, -0.4: mean -0.8, sd sqrt(0.12), se 0.2, t = -4
    d = compare([(0, 24.0), (1, 24.0), (2, 24.6)], [(0, 25.0), (1, 25.0), (2, 25.0)])
    assert d.ci == pytest.approx((-0.8 - 0.2 * q, -0.8 + 0.2 * q), abs=1e-9)
    assert d.p == pytest.approx(1 - 4 / math.sqrt(18), abs=1e-9)  # 0.0572


def test_paired_pairs_by_seed_not_by_position():
    # four pairs (df 3, no closed form: the density integrated above)
    g = [(3, 2.0), (0, 5.5), (2, 4.0), (1, 1.0)]
    b = [(0, 4.0), (1, 1.5), (2, 2.5), (3, 1.0)]
    diffs = [1.5, -0.5, 1.5, 1.0]  # per seed 0..3
    m, sd = loop_mean_std(diffs)
    d = compare(g, b)
    lo, hi, p = by_hand(m, sd / 2, 3)
    assert d.test == PAIRED and d.n_group == 4
    assert d.value == pytest.approx(m)
    assert d.ci == pytest.approx((lo, hi), abs=1e-6) and d.p == pytest.approx(p, abs=1e-7)


def test_welch_by_hand():
    # mismatched seeds: independent samples. Equal n and variances give df = 2(n-1) = 2
    d = compare([(0, 4.0), (1, 6.0)], [(2, 1.0), (3, 3.0)])
    q = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    se = math.sqrt(2 / 2 + 2 / 2)
    assert (d.test, d.n_group, d.n_baseline) == (WELCH, 2, 2)
    assert d.df == pytest.approx(2.0)
    assert d.ci == pytest.approx((3 - q * se, 3 + q * se), abs=1e-9)
    t = 3 / se
    assert d.p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)  # 0.1679
    # unequal n: Welch-Satterthwaite df = (v1 + v2)^2 / (v1^2/(n1-1) + v2^2/(n2-1)), v = s^2/n
    g, b = [4.0, 6.0, 7.0], [1.0, 3.0]
    (mg, sg), (mb, sb) = loop_mean_std(g), loop_mean_std(b)
    v1, v2 = sg**2 / 3, sb**2 / 2
    df = (v1 + v2) ** 2 / (v1**2 / 2 + v2**2 / 1)
    d = compare(list(enumerate(g)), list(enumerate(b)))
    lo, hi, p = by_hand(mg - mb, math.sqrt(v1 + v2), df)
    assert d.test == WELCH and (d.n_group, d.n_baseline) == (3, 2)
    assert d.df == pytest.approx(df, abs=1e-9)
    assert d.ci == pytest.approx((lo, hi), abs=1e-6) and d.p == pytest.approx(p, abs=1e-7)


@pytest.mark.parametrize(
    "group, base",
    [
        ([(0, 4.0), (1, 6.0)], [(0, 1.0), (2, 3.0)]),  # seeds overlap only in part
        ([(0, 4.0), (0, 6.0)], [(0, 1.0), (1, 3.0)]),  # a repeated seed
        ([(None, 4.0), (None, 6.0)], [(None, 1.0), (None, 3.0)]),  # seeds unknown
        ([(0, 4.0), (1, 6.0), (2, float("nan"))], [(0, 1.0), (1, 3.0), (2, 2.0)]),  # NaN: no pair
    ],
)
def test_mismatched_seeds_use_welch(group, base):
    d = compare(group, base)
    welch = compare([(0, 4.0), (1, 6.0)], [(10, v) for _, v in base if not math.isnan(v)])
    assert d.test == WELCH
    assert (d.df, d.ci, d.p) == (welch.df, welch.ci, welch.p)


def test_no_test_cases():
    d = compare([(0, 52.0)], [(0, 50.0)])  # one pair
    assert (d.value, d.test, d.n_group, d.ci, d.p, d.no_test) == (2.0, None, 1, None, None, "n=1")
    d = compare([(3, 52.0)], [(0, 50.0), (1, 51.0), (2, 52.0)])  # one trial against three
    assert (d.value, d.test, d.no_test) == (1.0, None, "n=1 vs 3")
    d = compare([(0, 53.0), (1, 54.0)], [(0, 50.0), (1, 51.0)])  # identical differences
    assert d.test is None and d.value == 3.0 and "no spread" in d.no_test
    d = compare([(0, 5.0), (1, 5.0)], [(2, 1.0), (3, 1.0)])
    assert d.test is None and "no spread" in d.no_test
    assert compare([(0, float("nan"))], [(0, 1.0)]) is None


# ----------------------------------------------------------------------------- exact tables

CELLS = (
    "Cells: mean ± sample std (ddof=1) over the n trials (seeds) of a group; "
    "(n=1): a single trial, no spread."
)
DELTA = (
    "Δ: group mean minus the mean of the baseline 'baseline', then its 95% confidence interval "
    "[low, high] (t distribution) and the two-sided p-value: a paired t-test on the per-seed "
    "differences when the group and the baseline have the same seeds, else Welch's t-test; no "
    "test with n=1."
)
# the minimum detectable effect of the Δ cells (test_report_power.py checks the power math)
POWER_NOTE = (
    "MDE80: the minimum detectable effect, the smallest true difference (either sign) that the "
    "Δ's test finds with 80% power at two-sided α=0.05 for the n at hand (noncentral t), if the "
    "spread seen now is the true one (the sd of the per-seed differences for the paired test, "
    "the two groups' sds for Welch's); from few seeds that sd is itself uncertain, so take it as "
    "a guide. Not shown where there is no test."
)
TESTS = [
    "mcl vs baseline: no test for AP50 (the per-seed differences have no spread); paired t-test "
    "for AP, AP75, n=3 pairs.",
    "voc_r18_other vs baseline: no test (n=1 vs 3).",
]
TITLE = f"VOC voc_2007_test · {DET}"

# paired t, df 2 (test_paired_t_by_hand): AP +0.5 [-0.74, +1.74] p=0.225, AP75 -0.8 [-1.66,
# +0.06] p=0.057; AP50's differences are all +3 (no spread, no test); the single run: no test.
# MDE80 = sd(differences) / sqrt(3) * nc80(df 2), nc80 = 5.65349 (test_report_power.py):
# AP 0.5 / sqrt(3) * 5.65349 = 1.632, AP75 sqrt(0.12) / sqrt(3) * 5.65349 = 1.131
MDE_AP, MDE_AP75 = 0.5 / math.sqrt(3) * 5.653489, math.sqrt(0.12 / 3) * 5.653489
TABLE = (
    "| weights       |   n |       AP50 |   Δ AP50 |         AP "
    "|                               Δ AP |       AP75 |                             Δ AP75 |\n"
    "|:--------------|----:|-----------:|---------:|-----------:"
    "|-----------------------------------:|-----------:|-----------------------------------:|\n"
    "| baseline      |   3 | 51.0 ± 1.0 |          | 30.5 ± 0.5 "
    "|                                    | 25.0 ± 0.0 |                                    |\n"
    "| mcl           |   3 | 54.0 ± 1.0 |     +3.0 | 31.0 ± 1.0 "
    "| +0.5 [−0.7, +1.7] p=0.23 MDE80=1.6 | 24.2 ± 0.3 | −0.8 [−1.7, +0.1] p=0.06 MDE80=1.1 |\n"
    "| voc_r18_other |   1 | 52.0 (n=1) |     +1.0 | 29.0 (n=1) "
    "|                               −1.5 | 26.0 (n=1) |                               +1.0 |"
)
EXPECTED_MD = f"""\
**{TITLE} (bbox)**

{TABLE}

- {CELLS}
- {DELTA}
- {POWER_NOTE}
- {TESTS[0]}
- {TESTS[1]}
"""


def md_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row in ``text`` (layout whitespace stripped)."""
    lines = [x for x in text.splitlines() if x.startswith("|")]
    return [[c.strip() for c in x.strip("|").split("|")] for x in lines]


def test_markdown_exact(runs):
    assert report_text([runs]) == EXPECTED_MD


def test_csv_exact(runs):
    head = "detection,voc,voc_2007_test," + DET + ",bbox,"
    expected = (
        "table,task,dataset_test,detector,iou_type,group,published,n,metric,mean,std,delta,"
        "ci_low,ci_high,p,test,baseline,alpha,power,mde,effect,n_needed\n"
        f"{head}baseline,0,3,AP50,51.0000,1.0000,,,,,,baseline,,,,,\n"
        f"{head}baseline,0,3,AP,30.5000,0.5000,,,,,,baseline,,,,,\n"
        f"{head}baseline,0,3,AP75,25.0000,0.0000,,,,,,baseline,,,,,\n"
        f"{head}mcl,0,3,AP50,54.0000,1.0000,3.0000,,,,none,baseline,0.05,0.8,,,\n"
        f"{head}mcl,0,3,AP,31.0000,1.0000,0.5000,-0.7421,1.7421,0.2254,paired_t,baseline,"
        f"0.05,0.8,{MDE_AP:.4f},,\n"
        f"{head}mcl,0,3,AP75,24.2000,0.3464,-0.8000,-1.6605,0.0605,0.05719,paired_t,baseline,"
        f"0.05,0.8,{MDE_AP75:.4f},,\n"
        f"{head}voc_r18_other,0,1,AP50,52.0000,,1.0000,,,,none,baseline,0.05,0.8,,,\n"
        f"{head}voc_r18_other,0,1,AP,29.0000,,-1.5000,,,,none,baseline,0.05,0.8,,,\n"
        f"{head}voc_r18_other,0,1,AP75,26.0000,,1.0000,,,,none,baseline,0.05,0.8,,,\n"
    )
    assert report_text([runs], "csv") == expected


def test_latex_exact(runs):
    title = TITLE.replace("_", r"\_").replace("·", "--")
    notes = " \\par ".join([CELLS, DELTA, POWER_NOTE, *TESTS]).replace("_", "\\_")
    notes = notes.replace("%", "\\%").replace("±", "$\\pm$").replace("Δ", "$\\Delta$")
    notes = notes.replace("α", "$\\alpha$")
    expected = (
        "% generated by tools/report.py (mcl_det); needs \\usepackage{booktabs}\n"
        "\\begin{table}[t]\n\\centering\n"
        f"\\caption{{{title} (bbox)}}\n"
        "\\begin{tabular}{lrrrrrrr}\n\\toprule\n"
        "weights & n & AP50 & $\\Delta$ AP50 & AP & $\\Delta$ AP & AP75 & $\\Delta$ AP75 \\\\\n"
        "\\midrule\n"
        "baseline & 3 & 51.0 $\\pm$ 1.0 & & 30.5 $\\pm$ 0.5 & & 25.0 $\\pm$ 0.0 & \\\\\n"
        "mcl & 3 & 54.0 $\\pm$ 1.0 & +3.0 & 31.0 $\\pm$ 1.0 & +0.5 [$-$0.7, +1.7] p=0.23 "
        "MDE80=1.6 & 24.2 $\\pm$ 0.3 & $-$0.8 [$-$1.7, +0.1] p=0.06 MDE80=1.1 \\\\\n"
        "voc\\_r18\\_other & 1 & 52.0 (n=1) & +1.0 & 29.0 (n=1) & $-$1.5 & 26.0 (n=1) & +1.0 \\\\\n"
        "\\bottomrule\n\\end{tabular}\n"
        f"\\par\\smallskip{{\\footnotesize {notes}}}\n"
        "\\end{table}\n"
    )
    got = report_text([runs], "latex")
    # tabulate pads cells to align the columns of the source; LaTeX ignores those blanks
    assert "\n".join(" ".join(x.split()) for x in got.split("\n")) == expected


def no_test(delta: float, n_group: int, n_base: int, why: str) -> dict:
    return {
        "delta": delta,
        "test": None,
        "n_group": n_group,
        "n_baseline": n_base,
        "df": None,
        "ci95": None,
        "p": None,
        "no_test": why,
        "mde": None,
        "n_needed": None,
    }


def paired(delta: float, ci: tuple[float, float], p: float, mde: float) -> dict:
    return {
        "delta": delta,
        "test": "paired_t",
        "n_group": 3,
        "n_baseline": 3,
        "df": 2.0,
        "ci95": list(ci),
        "p": p,
        "no_test": None,
        "mde": round(mde, 6),
        "n_needed": None,
    }


def test_json_exact(runs):
    d = json.loads(report_text([runs], "json"))
    assert d["format"] == "mcl_det.report/v3"
    assert (d["pretraining"], d["warnings"], d["skipped"]) == ([], [], [])
    (sec,) = d["sections"]
    assert sec["baseline"] == "baseline" and sec["metrics"] == ["AP50", "AP", "AP75"]
    assert sec["warnings"] == [] and sec["notes"] == [CELLS, DELTA, POWER_NOTE, *TESTS]
    assert sec["power"] == {"alpha": 0.05, "power": 0.8, "effect": None}
    got = {g["name"]: (g["n"], g["stats"], g["deltas"]) for g in sec["groups"]}
    assert [g["name"] for g in sec["groups"]] == ["baseline", "mcl", "voc_r18_other"]
    assert got["baseline"] == (
        3,
        {
            "AP50": {"mean": 51.0, "std": 1.0, "n": 3},
            "AP": {"mean": 30.5, "std": 0.5, "n": 3},
            "AP75": {"mean": 25.0, "std": 0.0, "n": 3},
        },
        {},
    )
    assert got["mcl"] == (
        3,
        {
            "AP50": {"mean": 54.0, "std": 1.0, "n": 3},
            "AP": {"mean": 31.0, "std": 1.0, "n": 3},
            "AP75": {"mean": 24.2, "std": round(math.sqrt(0.12), 6), "n": 3},
        },
        {
            "AP50": no_test(3.0, 3, 3, "the per-seed differences have no spread"),
            "AP": paired(0.5, (-0.742069, 1.742069), 0.225403, MDE_AP),
            "AP75": paired(-0.8, (-1.660531, 0.060531), 0.057191, MDE_AP75),
        },
    )
    assert got["voc_r18_other"][2]["AP"] == no_test(-1.5, 1, 3, "n=1 vs 3")
    runs_of = [r["seed"] for r in sec["groups"][1]["runs"]]
    assert runs_of == [0, 1, 2]  # the three seeds are trials of one group


def test_per_class_table(runs):
    text = report_text([runs / "det_baseline", runs / "det_mcl"], per_class=True)
    expected = f"""\
**{TITLE} (bbox, per-class)**

| class   |   baseline (n=3) |   mcl (n=3) |   Δ mcl |
|:--------|-----------------:|------------:|--------:|
| cat     |       52.0 ± 1.0 |  52.0 ± 1.0 |    +0.0 |

- {CELLS}
- {DELTA}
- {POWER_NOTE}
- mcl vs baseline: no test (the per-seed differences have no spread).
"""
    assert expected in text


def test_baseline_override_and_missing(runs):
    text = report_text([runs], baseline="mcl")
    rows = md_rows(text)
    assert rows[2][:4] == ["mcl", "3", "54.0 ± 1.0", ""]
    assert rows[3] == [
        "baseline",
        "3",
        "51.0 ± 1.0",
        "−3.0",
        "30.5 ± 0.5",
        "−0.5 [−1.7, +0.7] p=0.23 MDE80=1.6",
        "25.0 ± 0.0",
        "+0.8 [−0.1, +1.7] p=0.06 MDE80=1.1",
    ]  # the paired test against 'mcl': signs swap, interval mirrored, same p and MDE
    with pytest.raises(MCLDetError, match="not a run group"):
        build_report([str(runs)], baseline="nope")
    text = report_text([runs / "det_mcl", runs / "other"])
    assert "Δ" not in text.split("\n\n")[1]  # header without delta columns
    assert "No deltas: no group is named or tagged 'baseline'; pass --baseline NAME." in text


def test_reference_rows(runs):
    ref = ROOT / "tools/references/moco_voc07_r50_c4.yaml"
    r = load_reference(str(ref))
    assert r.trials == 5 and "2003.04297" in r.source
    assert r.rows == [
        ("supervised ImageNet", {"AP50": 81.3, "AP": 53.5, "AP75": 58.8}),
        ("MoCo v1 200ep", {"AP50": 81.5, "AP": 55.9, "AP75": 62.6}),
        ("MoCo v2 200ep", {"AP50": 82.4, "AP": 57.0, "AP75": 63.6}),
        ("MoCo v2 800ep", {"AP50": 82.5, "AP": 57.4, "AP75": 64.0}),
    ]
    text = report_text([runs / "det_baseline"], reference=str(ref))
    assert ["MoCo v2 800ep [published]", "5", "82.5", "", "57.4", "", "64.0", ""] in md_rows(text)
    assert "means of 5 trials from" in text
    latex = report_text([runs / "det_baseline"], "latex", reference=str(ref)).split("\n")
    first_pub = next(i for i, x in enumerate(latex) if "[published]" in x)
    assert latex[first_pub - 1] == "\\midrule" and latex.count("\\midrule") == 2


def test_bad_reference(tmp_path, runs):
    bad = tmp_path / "ref.yaml"
    bad.write_text("source: x\ntask: voc\nmetrics: [AP]\nrows: []\ncolour: red\n")
    with pytest.raises(MCLDetError, match="unknown key"):
        build_report([str(runs)], reference=str(bad))


# ----------------------------------------------------------------------------- power figures


def test_effect_notes_csv_json(runs, tmp_path):
    """--effect 0.5: the n to detect it, per metric, in the notes, the CSV and the JSON."""
    # AP: differences' sd 0.5, d = 1: 10 pairs (G*Power); AP75: sd sqrt(0.12), d = 1.44: 6 pairs
    assert (n_paired(0.5, 0.5), n_paired(0.5, math.sqrt(0.12))) == (10, 6)
    effect = (
        "n for 0.5: the smallest number of pairs (paired test) or of runs per group, the same in "
        "both (Welch's test), with which the test finds a true difference of 0.5 with 80% power "
        "at two-sided α=0.05, under the same assumption."
    )
    text = report_text([runs], effect=0.5)
    assert text.endswith(
        f"- {CELLS}\n- {DELTA}\n- {POWER_NOTE}\n- {effect}\n- {TESTS[0]}\n"
        "- mcl vs baseline: n for 0.5: AP50 –; AP 10 pairs; AP75 6 pairs.\n"
        f"- {TESTS[1]}\n"
        "- voc_r18_other vs baseline: n for 0.5: – (no test).\n"
    )
    assert md_rows(text) == md_rows(EXPECTED_MD)  # the table itself does not change
    csv_rows = report_text([runs], "csv", effect=0.5).splitlines()
    assert csv_rows[5].endswith(f",paired_t,baseline,0.05,0.8,{MDE_AP:.4f},0.5,10")
    assert csv_rows[6].endswith(f",paired_t,baseline,0.05,0.8,{MDE_AP75:.4f},0.5,6")
    assert csv_rows[4].endswith(",none,baseline,0.05,0.8,,0.5,")  # AP50: no test, no n
    out = tmp_path / "r.json"
    assert main([str(runs), "--effect", "0.5", "--output", str(out)]) == 0
    (sec,) = json.loads(out.read_text())["sections"]
    assert sec["power"] == {"alpha": 0.05, "power": 0.8, "effect": 0.5}
    mcl = sec["groups"][1]["deltas"]
    assert [mcl[m]["n_needed"] for m in ("AP50", "AP", "AP75")] == [None, 10, 6]
    assert mcl["AP"]["mde"] == round(MDE_AP, 6)


def test_power_and_alpha_options(runs, tmp_path):
    out = tmp_path / "r.md"
    assert main([str(runs), "--power", "0.9", "--alpha", "0.01", "--output", str(out)]) == 0
    text = out.read_text()
    mde = mde_paired(0.5, 3, alpha=0.01, power=0.9)  # larger than MDE80 at 0.05
    assert mde > 2 * MDE_AP
    assert md_rows(text)[3][5] == f"+0.5 [−0.7, +1.7] p=0.23 MDE90={mde:.1f}"
    assert (
        "- MDE90: the minimum detectable effect, the smallest true difference (either sign) "
        "that the Δ's test finds with 90% power at two-sided α=0.01 for the n at hand" in text
    )
    # the CI stays 95 %: --alpha plans the power figures only
    assert "95% confidence interval" in text
    latex = report_text([runs], "latex")
    assert "$\\alpha$=0.05" in latex and "α" not in latex


def test_welch_planning_n_is_per_group(tmp_path):
    for s, v in enumerate([(50, 30, 25), (51, 30.5, 25.5), (52, 31, 25)]):
        write_run(tmp_path / f"b{s}", "baseline", s, voc(*v))
    for s, v in enumerate([(53, 30, 24), (54, 31, 24.4)]):
        write_run(tmp_path / f"m{s}", "mcl", s + 10, voc(*v))  # other seeds: Welch
    text = report_text([tmp_path], effect=1.0)
    sd_b, sd_m = 0.5, math.sqrt(0.5)  # AP: baseline 30, 30.5, 31; mcl 30, 31
    n, n50 = n_welch(1.0, sd_m, sd_b), n_welch(1.0, sd_m, 1.0)  # AP50: sds 1 and sqrt(0.5)
    assert (n, n50) == (8, 13)
    assert f"mcl vs baseline: n for 1: AP50 {n50} per group; AP {n} per group; " in text
    mde = mde_welch(sd_m, 2, sd_b, 3)
    assert md_rows(text)[3][5].endswith(f" p=1.00 MDE80={mde:.1f}")  # AP: equal means


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--alpha", "0"], "--alpha"),
        (["--power", "1.5"], "--power"),
        (["--effect", "0"], "--effect"),
    ],
)
def test_cli_bad_power_options(runs, args, flag):
    r = cli(str(runs), *args)
    assert_one_error(r, flag)
    assert r.stdout == ""


# ----------------------------------------------------------------------------- fairness


def test_unfair_comparison_warning(tmp_path, capsys):
    write_run(tmp_path / "b0", "baseline", 0, voc(50, 30, 25))
    write_run(tmp_path / "m0", "mcl", 0, voc(51, 31, 26), max_iter=100, iteration=100)
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    msg = (
        f"unfair comparison in {TITLE} (bbox): max_iter differs: 200 in baseline/seed0; "
        "100 in mcl/seed0"
    )
    assert f"> **Warning:** {msg}" in out
    assert f"warning: {msg}" in err
    assert "config_digest" not in out  # explained by max_iter already


def test_config_digest_warning_and_fair_runs(tmp_path, capsys):
    write_run(tmp_path / "b0", "baseline", 0, voc(50, 30, 25))
    write_run(tmp_path / "b1", "baseline", 1, voc(50, 30, 25))
    write_run(tmp_path / "m0", "mcl", 0, voc(51, 31, 26))
    main([str(tmp_path)])
    assert "warning" not in capsys.readouterr().err.lower()
    write_run(tmp_path / "m0", "mcl", 0, voc(51, 31, 26), config_digest="e" * 64)
    main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert "config_digest differs" in out and "compare the saved configs" in err


# ----------------------------------------------------------------------------- coco, pretraining


def test_coco_bbox_and_segm(tmp_path):
    for s, (a, m) in enumerate([(40.0, 35.0), (42.0, float("nan"))]):
        # train_net.py writes NaN as null; json.dumps would write NaN: both must mean "missing"
        aps = None if s == 0 else float("nan")
        bbox = {"AP": a, "AP50": a + 20, "AP75": a + 2, "APs": aps, "APm": a, "APl": a}
        segm = {"AP": m, "AP50": 55.0, "AP75": 36.0, "APs": 1.0, "APm": 2.0, "APl": 3.0}
        write_run(
            tmp_path / f"s{s}",
            "baseline",
            s,
            bbox,
            task="coco",
            mask_on=True,
            dataset_test=["coco_2017_val"],
            metrics={"bbox": bbox, "segm": segm},
        )
    text = report_text([tmp_path])
    rows = md_rows(text)
    header = ["weights", "n", "AP", "Δ AP", "AP50", "Δ AP50", "AP75", "Δ AP75", "APs", "Δ APs"]
    assert rows[0][:10] == header
    assert rows[2][:9] == [
        "baseline",
        "2",
        "41.0 ± 1.4",
        "",
        "61.0 ± 1.4",
        "",
        "43.0 ± 1.4",
        "",
        "–",
    ]
    assert "(segm)**" in text and rows[5][:3] == ["baseline", "2", "35.0 (n=1)"]


def write_log(path: Path, lines: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)


def test_pretrain_summary(tmp_path):
    ev = [
        {"type": "train", "epoch": 1, "iteration": 5, "loss": 9.0},
        {
            "type": "eval",
            "epoch": 1,
            "member_metrics": [{"name": "top1", "value": 20.0}] * 2,
            "ensemble_top1": 30.0,
        },
        {"type": "train", "epoch": 2, "iteration": 10, "loss": 7.5},
        {
            "type": "eval",
            "epoch": 2,
            "member_metrics": [{"name": "top1", "value": 25.0}, {"name": "top1", "value": 18.5}],
            "ensemble_top1": 31.25,
        },
    ]
    write_log(tmp_path / "pre_sup" / "log.jsonl", ev, tail='{"type": "tra')  # killed mid-write
    rep, _ = build_report([str(tmp_path / "pre_sup")])
    assert rep.warnings and "partial last line" in rep.warnings[0]
    expected = """\
| run     |   epoch |   loss |   member |   metric |   last |   best (epoch) |
|:--------|--------:|-------:|---------:|---------:|-------:|---------------:|
| pre_sup |       2 |    7.5 |        0 |     top1 |   25.0 |       25.0 (2) |
| pre_sup |       2 |    7.5 |        1 |     top1 |   18.5 |       20.0 (1) |
| pre_sup |       2 |    7.5 | ensemble |     top1 |   31.2 |       31.2 (2) |
"""
    assert expected in render(rep, "md")


# ----------------------------------------------------------------------------- figures


def test_plot_and_curves_are_pngs(runs, tmp_path):
    from PIL import Image

    lines = [{"iteration": i, "total_loss": 2.0 - i / 100} for i in range(0, 100, 10)]
    lines += [{"iteration": 99, "bbox/AP50": 53.0}]
    write_log(runs / "det_mcl" / "seed0" / "metrics.json", lines)
    bars, curves = tmp_path / "figs" / "bars.png", tmp_path / "figs" / "curves.png"
    ref = str(ROOT / "tools/references/moco_voc07_r50_c4.yaml")
    main(
        [
            str(runs),
            "--plot",
            str(bars),
            "--curves",
            str(curves),
            "--reference",
            ref,
            "--output",
            str(tmp_path / "t.md"),
        ]
    )
    for p in (bars, curves):
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 300


# ----------------------------------------------------------------------------- bad input


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools/report.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0]


def test_cli_nothing_usable(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text('{"format": "mcl_det.detection')
    write_run(tmp_path / "unfinished", "mcl", 0, voc(1, 1, 1), finished=False, iteration=50)
    r = cli(str(tmp_path / "empty*"), str(tmp_path))
    assert_one_error(r, "no usable results", "malformed or partial JSON", "unfinished run")
    assert r.stdout == ""


def test_cli_skips_bad_runs_and_keeps_good(tmp_path):
    write_run(tmp_path / "ok", "baseline", 0, voc(50, 30, 25))
    write_run(tmp_path / "unfinished", "mcl", 0, voc(1, 1, 1), finished=False, iteration=50)
    out = tmp_path / "t.csv"
    out.write_text("old")
    r = cli(str(tmp_path), "--output", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert f"skipped: {tmp_path / 'unfinished' / 'results.json'}: unfinished run" in r.stderr
    text = out.read_text()  # format from the extension
    assert (
        text.startswith("table,task,") and "# skipped: " in text and ",baseline,0,1,AP50," in text
    )
    r = cli(str(tmp_path), "--reference", str(tmp_path / "nope.yaml"), "--output", str(out))
    assert_one_error(r, "reference file not found")
    assert out.read_text() == text  # earlier result intact
