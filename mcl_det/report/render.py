"""Render a ``Report`` as markdown (README-ready), CSV (one tidy row per cell), LaTeX (booktabs)
or JSON. Markdown and LaTeX share one neutral text table laid out by tabulate; CSV and JSON keep
numbers as numbers."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

from tabulate import LATEX_ESCAPE_RULES, SEPARATING_LINE, tabulate

from .stats import CONFIDENCE, DEFAULT_PLAN, N_MAX, PAIRED, WELCH, Delta, Plan, Stat
from .tables import Group, PretrainSummary, Section

MINUS = "\u2212"  # a real minus sign: "−1.2" reads better than "-1.2" in a table
NONE = "\u2013"  # en dash for a missing value
JSON_FORMAT = "mcl_det.report/v3"


@dataclass
class Report:
    sections: list[Section]
    pretrain: list[PretrainSummary]
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    decimals: int = 1


# ----------------------------------------------------------------------------- neutral text


def fmt_num(x: float, d: int) -> str:
    s = f"{x:.{d}f}"
    if s.startswith("-"):
        s = MINUS + s[1:] if s.strip("-0.") else s[1:]  # "-0.0" -> "0.0"
    return s


def fmt_signed(x: float, d: int) -> str:
    """'+0.4', '−1.2'; a value that rounds to zero is '+0.0'."""
    mag = f"{abs(x):.{d}f}"
    return (MINUS if x < 0 and mag.strip("0.") else "+") + mag


def fmt_p(p: float) -> str:
    """Two decimals, three below 0.01, and 'p<0.001' below that."""
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def fmt_stat(s: Stat | None, d: int, row_n: int, published: bool = False) -> str:
    """'55.9 ± 0.3'; '55.9 (n=1)' for a single trial; '(n=k)' also when NaNs left k < row n."""
    if s is None:
        return NONE
    if published:
        return fmt_num(s.mean, d)
    if s.std is None:
        return f"{fmt_num(s.mean, d)} (n={s.n})"
    text = f"{fmt_num(s.mean, d)} ± {fmt_num(s.std, d)}"
    return text + (f" (n={s.n})" if s.n != row_n else "")


def fmt_delta(dl: Delta | None, d: int, mde_label: str = DEFAULT_PLAN.label) -> str:
    """'+2.4 [−0.3, +5.1] p=0.07 MDE80=3.9': the difference, its confidence interval, the
    test's p-value and the minimum detectable effect at that power (the reader sees beside the
    p-value whether n could have found a difference this size); the difference alone when no
    test was possible (the notes say why)."""
    if dl is None:
        return ""
    text = fmt_signed(dl.value, d)
    if dl.ci is None or dl.p is None:
        return text
    lo, hi = (fmt_signed(x, d) for x in dl.ci)
    mde = f" {mde_label}={fmt_num(dl.mde, d)}" if dl.mde is not None else ""
    return f"{text} [{lo}, {hi}] {fmt_p(dl.p)}{mde}"


def _label(g: Group) -> str:
    return f"{g.name} [published]" if g.published else g.name


def section_table(sec: Section, d: int) -> tuple[list[str], list[list[str]], int | None]:
    """Header, rows and the index of the first published row (for a rule above it)."""
    if sec.per_class:
        return _per_class_table(sec, d)
    has_delta = sec.baseline is not None
    header = ["weights", "n"]
    for m in sec.metrics:
        header += [m] + ([f"Δ {m}"] if has_delta else [])
    rows, first_pub = [], None
    for g in sec.groups:
        if g.published and first_pub is None:
            first_pub = len(rows)
        n = g.stats[sec.metrics[0]].n if g.published and g.stats.get(sec.metrics[0]) else g.n
        row = [_label(g), str(n)]
        for m in sec.metrics:
            row.append(fmt_stat(g.stats.get(m), d, g.n, g.published))
            if has_delta:
                row.append(fmt_delta(g.deltas.get(m), d, sec.plan.label))
        rows.append(row)
    return header, rows, first_pub


def _per_class_table(sec: Section, d: int) -> tuple[list[str], list[list[str]], None]:
    # transposed: one row per class, one column per group (20 VOC classes do not fit across)
    groups = [g for g in sec.groups if not g.published]
    header = ["class"]
    for g in groups:
        header.append(f"{g.name} (n={g.n})")
        if sec.baseline is not None and not g.is_baseline:
            header.append(f"Δ {g.name}")
    rows = []
    for m in sec.metrics:
        row = [m.split("-", 1)[1]]
        for g in groups:
            row.append(fmt_stat(g.stats.get(m), d, g.n))
            if sec.baseline is not None and not g.is_baseline:
                row.append(fmt_delta(g.deltas.get(m), d, sec.plan.label))
        rows.append(row)
    return header, rows, None


def describe_test(dl: Delta, metrics: str = "") -> str:
    """How one Δ was tested, with its n (the words of the notes); ``metrics`` names the cells."""
    where = f" for {metrics}" if metrics else ""
    if dl.test == PAIRED:
        return f"paired t-test{where}, n={dl.n_group} pairs"
    if dl.test == WELCH:
        return f"Welch's t-test{where}, n={dl.n_group} vs {dl.n_baseline} (df {dl.df:.1f})"
    return f"no test{where} ({dl.no_test})"


def _test_note(sec: Section, g: Group) -> str:
    """One line per group: the test and n, per metric only where they differ between metrics."""
    same: dict[str, list[str]] = {}
    for m in sec.metrics:
        if m in g.deltas:
            same.setdefault(describe_test(g.deltas[m]), []).append(m)
    if len(same) == 1:
        parts = list(same)
    else:
        parts = [describe_test(g.deltas[ms[0]], ", ".join(ms)) for ms in same.values()]
    return f"{g.name} vs {sec.baseline}: {'; '.join(parts)}."


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


def power_note(plan: Plan) -> str:
    """What the MDE in the Δ cells is, and what it assumes."""
    return (
        f"{plan.label}: the minimum detectable effect, the smallest true difference (either "
        f"sign) that the Δ's test finds with {_pct(plan.power)} power at two-sided "
        f"α={plan.alpha:g} for the n at hand (noncentral t), if the spread seen now is the true "
        "one (the sd of the per-seed differences for the paired test, the two groups' sds for "
        "Welch's); from few seeds that sd is itself uncertain, so take it as a guide. Not shown "
        "where there is no test."
    )


def effect_note(plan: Plan) -> str:
    """How the planning n of ``--effect`` is defined."""
    x = f"{plan.effect:g}"
    return (
        f"n for {x}: the smallest number of pairs (paired test) or of runs per group, the same "
        f"in both (Welch's test), with which the test finds a true difference of {x} with "
        f"{_pct(plan.power)} power at two-sided α={plan.alpha:g}, under the same assumption."
    )


def fmt_n_needed(dl: Delta) -> str:
    """'12 pairs', '9 per group'; '–' with no test (the test note says why)."""
    if dl.test is None:
        return NONE
    unit = "pairs" if dl.test == PAIRED else "per group"
    return f"more than {N_MAX} {unit}" if dl.n_needed is None else f"{dl.n_needed} {unit}"


def _n_needed_note(sec: Section, g: Group) -> str:
    """One line per group: the planning n per metric, once when it is the same for all."""
    assert sec.plan.effect is not None
    ns = {m: fmt_n_needed(g.deltas[m]) for m in sec.metrics if m in g.deltas}
    if len(set(ns.values())) == 1:
        text = next(iter(ns.values())) + (" (no test)" if NONE in ns.values() else "")
    else:
        text = "; ".join(f"{m} {n}" for m, n in ns.items())
    return f"{g.name} vs {sec.baseline}: n for {sec.plan.effect:g}: {text}."


def section_notes(sec: Section) -> list[str]:
    notes = [
        "Cells: mean ± sample std (ddof=1) over the n trials (seeds) of a group; "
        "(n=1): a single trial, no spread."
    ]
    if sec.baseline is not None:
        notes.append(
            f"Δ: group mean minus the mean of the baseline '{sec.baseline}', then its "
            f"{CONFIDENCE:.0%} confidence interval [low, high] (t distribution) and the two-sided "
            "p-value: a paired t-test on the per-seed differences when the group and the "
            "baseline have the same seeds, else Welch's t-test; no test with n=1."
        )
        notes.append(power_note(sec.plan))
        if sec.plan.effect is not None:
            notes.append(effect_note(sec.plan))
        for g in sec.groups:
            if g.deltas:
                notes.append(_test_note(sec, g))
                if sec.plan.effect is not None:
                    notes.append(_n_needed_note(sec, g))
    return notes + sec.notes


def pretrain_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    d = rep.decimals
    header = ["run", "epoch", "loss", "member", "metric", "last", "best (epoch)"]
    rows = []
    for p in rep.pretrain:
        loss = f"{p.loss:.4g}" if p.loss is not None else NONE
        for m in p.members:
            last = fmt_num(m.last, d) if m.last is not None else NONE
            best = f"{fmt_num(m.best, d)} ({m.best_epoch})" if m.best is not None else NONE
            rows.append([p.name, str(p.epoch), loss, m.member, m.metric, last, best])
    return header, rows


PRETRAIN_NOTE = (
    "Pretraining monitors from log.jsonl: per-member kNN top-1 (self-supervised) or top-1 "
    "(supervised) at the last evaluation, and the best over all evaluations."
)


def _layout(header: list[str], rows: list[list[str]], fmt: str) -> str:
    """tabulate with our cells kept as text: first column left, the numbers right."""
    return tabulate(
        rows,
        header,
        tablefmt=fmt,
        colalign=["left"] + ["right"] * (len(header) - 1),
        disable_numparse=True,
    )


# ----------------------------------------------------------------------------- markdown


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")  # tabulate's pipe format leaves a | inside a cell as is


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    cells = [[_md_cell(c) for c in r] for r in rows]
    return _layout([_md_cell(h) for h in header], cells, "pipe").split("\n")


def render_md(rep: Report) -> str:
    out: list[str] = []
    for w in rep.warnings:
        out += [f"> **Warning:** {w}", ""]
    for sec in rep.sections:
        header, rows, _ = section_table(sec, rep.decimals)
        out += [f"**{sec.title}**", ""]
        for w in sec.warnings:  # one paragraph each: consecutive "> " lines would merge
            out += [f"> **Warning:** {w}", ""]
        out += _md_table(header, rows) + [""]
        out += [f"- {n}" for n in section_notes(sec)] + [""]
    if rep.pretrain:
        header, rows = pretrain_table(rep)
        out += ["**Pretraining (cohort members)**", ""] + _md_table(header, rows) + [""]
        out += [f"- {PRETRAIN_NOTE}", ""]
    if rep.skipped:
        out += ["**Skipped (not in the tables)**", ""]
        out += [f"- `{p}`: {r}" for p, r in rep.skipped] + [""]
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- LaTeX

# The symbols we emit that tabulate's LaTeX escaping leaves alone (pdflatex-safe forms).
TEX_SYMBOLS = {
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "α": r"$\alpha$",
    MINUS: r"$-$",
    NONE: "--",
    "·": "--",
    "|": r"$|$",  # pdflatex's default font encoding turns a bare | into a dash
}


def _tex_symbols(s: str) -> str:
    return "".join(TEX_SYMBOLS.get(c, c) for c in s)


def tex(s: str) -> str:
    """Text outside a table (caption, notes) escaped as tabulate escapes cells, plus our symbols."""
    return _tex_symbols("".join(LATEX_ESCAPE_RULES.get(c, c) for c in s))


def _tex_table(
    caption: str, header: list[str], rows: list[list[str]], rule_at: int | None, notes: list[str]
) -> list[str]:
    body: list[list[str]] = [list(r) for r in rows]
    if rule_at:  # a \midrule above the published rows
        body.insert(rule_at, [SEPARATING_LINE])
    # tabulate escapes the LaTeX specials; its markup has none of the symbols mapped afterwards
    table = _tex_symbols(_layout(header, body, "latex_booktabs"))
    out = [r"\begin{table}[t]", r"\centering", r"\caption{" + tex(caption) + "}", table]
    if notes:
        out.append(r"\par\smallskip{\footnotesize " + r" \par ".join(tex(n) for n in notes) + "}")
    return out + [r"\end{table}", ""]


def render_latex(rep: Report) -> str:
    out = ["% generated by tools/report.py (mcl_det); needs \\usepackage{booktabs}"]
    out += [f"% WARNING: {w}" for w in rep.warnings]
    for sec in rep.sections:
        header, rows, first_pub = section_table(sec, rep.decimals)
        out += [f"% WARNING: {w}" for w in sec.warnings]
        out += _tex_table(sec.title, header, rows, first_pub, section_notes(sec))
    if rep.pretrain:
        header, rows = pretrain_table(rep)
        out += _tex_table("Pretraining (cohort members)", header, rows, None, [PRETRAIN_NOTE])
    out += [f"% skipped {p}: {r}" for p, r in rep.skipped]
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- CSV / JSON


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _p(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")  # significant digits: p can be tiny


CSV_COLUMNS = (
    "table,task,dataset_test,detector,iou_type,group,published,n,metric,mean,std,"
    "delta,ci_low,ci_high,p,test,baseline,alpha,power,mde,effect,n_needed"
).split(",")


def render_csv(rep: Report) -> str:
    """One tidy row per (group, metric): easy to load with pandas (comment='#')."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    for sec in rep.sections:
        where = [
            "per_class" if sec.per_class else "detection",
            sec.task,
            "+".join(sec.dataset_test),
            sec.detector,
            sec.iou_type,
        ]
        for g in sec.groups:
            for m in sec.metrics:
                s, dl = g.stats.get(m), g.deltas.get(m)
                cell = [s.n if s else 0, m, num(s.mean if s else None), num(s.std if s else None)]
                test, power = ["", "", "", "", ""], ["", "", "", "", ""]
                if dl is not None:
                    lo, hi = dl.ci if dl.ci else (None, None)
                    p = "" if dl.p is None else f"{dl.p:.4g}"
                    test = [num(dl.value), num(lo), num(hi), p, dl.test or "none"]
                    pl = sec.plan
                    effect = "" if pl.effect is None else f"{pl.effect:g}"
                    n = "" if dl.n_needed is None else str(dl.n_needed)
                    power = [f"{pl.alpha:g}", f"{pl.power:g}", num(dl.mde), effect, n]
                row = where + [g.name, int(g.published)] + cell + test + [sec.baseline or ""]
                w.writerow(row + power)
    for p in rep.pretrain:
        for m in p.members:
            for which, v in (("last", m.last), ("best", m.best)):
                metric = f"member{m.member}/{m.metric}/{which}"
                row = ["pretrain", "", "", "", "", p.name, 0, 1, metric, num(v)]
                w.writerow(row + [""] * (len(CSV_COLUMNS) - len(row)))
    for x in rep.warnings + [x for s in rep.sections for x in s.warnings]:
        buf.write(f"# warning: {x}\n")
    for p, r in rep.skipped:
        buf.write(f"# skipped: {p}: {r}\n")
    return buf.getvalue()


def delta_dict(x: Delta) -> dict[str, Any]:
    """A Δ cell for JSON: the difference, which test (``paired_t``, ``welch_t`` or null), its n,
    degrees of freedom, 95 % interval and p-value, why there is no test when there is none, and
    the power figures (``mde``; ``n_needed`` with an effect: the section's ``power`` says for
    which level, power and effect)."""
    return {
        "delta": _r(x.value),
        "test": x.test,
        "n_group": x.n_group,
        "n_baseline": x.n_baseline,
        "df": _r(x.df),
        "ci95": None if x.ci is None else [_r(x.ci[0]), _r(x.ci[1])],
        "p": _p(x.p),
        "no_test": x.no_test or None,
        "mde": _r(x.mde),
        "n_needed": x.n_needed,
    }


def _group_dict(sec: Section, g: Group) -> dict[str, Any]:
    def stat(s: Stat | None) -> dict[str, Any] | None:
        return None if s is None else {"mean": _r(s.mean), "std": _r(s.std), "n": s.n}

    return {
        "name": g.name,
        "published": g.published,
        "baseline": g.is_baseline,
        "n": g.n,
        "runs": [{"run_name": r.run_name, "seed": r.seed, "path": str(r.path)} for r in g.runs],
        "stats": {m: stat(g.stats.get(m)) for m in sec.metrics},
        "deltas": {m: delta_dict(x) for m, x in g.deltas.items()},
    }


def report_dict(rep: Report) -> dict[str, Any]:
    sections = [
        {
            "title": sec.title,
            "task": sec.task,
            "dataset_test": sec.dataset_test,
            "detector": sec.detector,
            "iou_type": sec.iou_type,
            "per_class": sec.per_class,
            "baseline": sec.baseline,
            "metrics": sec.metrics,
            "power": {"alpha": sec.plan.alpha, "power": sec.plan.power, "effect": sec.plan.effect},
            "groups": [_group_dict(sec, g) for g in sec.groups],
            "notes": section_notes(sec),
            "warnings": sec.warnings,
        }
        for sec in rep.sections
    ]
    pretrain = [
        {
            "name": p.name,
            "path": p.path,
            "epoch": p.epoch,
            "loss": _r(p.loss),
            "members": [
                {
                    "member": m.member,
                    "metric": m.metric,
                    "last": _r(m.last),
                    "best": _r(m.best),
                    "best_epoch": m.best_epoch,
                }
                for m in p.members
            ],
        }
        for p in rep.pretrain
    ]
    return {
        "format": JSON_FORMAT,
        "sections": sections,
        "pretraining": pretrain,
        "warnings": rep.warnings,
        "skipped": [{"path": p, "reason": r} for p, r in rep.skipped],
    }


def render_json(rep: Report) -> str:
    return json.dumps(report_dict(rep), indent=2, ensure_ascii=False) + "\n"


RENDERERS = {"md": render_md, "csv": render_csv, "latex": render_latex, "json": render_json}
FORMATS = tuple(RENDERERS)


def render(rep: Report, fmt: str) -> str:
    return RENDERERS[fmt](rep)
