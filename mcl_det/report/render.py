"""Render a ``Report`` as markdown (README-ready), CSV (one tidy row per cell), LaTeX (booktabs)
or JSON. Markdown and LaTeX share one neutral text table; CSV and JSON keep numbers as numbers."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

from .tables import Delta, Group, PretrainSummary, Section, Stat

MINUS = "\u2212"  # a real minus sign: "−1.2" reads better than "-1.2" in a table
NONE = "\u2013"  # en dash for a missing value
FORMATS = ("md", "csv", "latex", "json")


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


def fmt_delta(dl: Delta | None, d: int) -> str:
    """Signed: '+0.4', '−1.2'; a trailing '*' when |Δ| exceeds the trials' spread."""
    if dl is None:
        return ""
    mag = f"{abs(dl.value):.{d}f}"
    sign = MINUS if dl.value < 0 and mag.strip("0.") else "+"
    return sign + mag + ("*" if dl.exceeds else "")


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
                row.append(fmt_delta(g.deltas.get(m), d))
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
                row.append(fmt_delta(g.deltas.get(m), d))
        rows.append(row)
    return header, rows, None


def section_notes(sec: Section) -> list[str]:
    notes = [
        "Cells: mean ± sample std (ddof=1) over the n trials (seeds) of a group; "
        "(n=1): a single trial, no spread."
    ]
    if sec.baseline is not None:
        notes.append(
            f"Δ: group mean minus the mean of the baseline '{sec.baseline}'. "
            "* marks |Δ| > std(group) + std(baseline): the difference exceeds the trials' "
            "spread (a rough check, not a significance test; impossible with n=1)."
        )
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


# ----------------------------------------------------------------------------- markdown


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = [":--"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    lines.append("| " + " | ".join(align) + " |")
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return lines


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

_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    MINUS: r"$-$",
    NONE: "--",
    "·": "--",
    "*": r"$^*$",
    "|": r"$|$",  # pdflatex's default font encoding turns a bare | into a dash
    "<": r"$<$",
    ">": r"$>$",
}


def tex(s: str) -> str:
    """Escape LaTeX specials and map the few Unicode symbols we emit (pdflatex-safe)."""
    return "".join(_TEX.get(c, c) for c in s)


def _tex_table(
    caption: str, header: list[str], rows: list[list[str]], rule_at: int | None, notes: list[str]
) -> list[str]:
    out = [r"\begin{table}[t]", r"\centering", r"\caption{" + tex(caption) + "}"]
    out += [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule"]
    out += [" & ".join(tex(h) for h in header) + r" \\", r"\midrule"]
    for i, r in enumerate(rows):
        if i == rule_at and i > 0:
            out.append(r"\midrule")
        out.append(" & ".join(tex(c) for c in r) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
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


CSV_COLUMNS = [
    "table", "task", "dataset_test", "detector", "iou_type", "group", "published", "n",
    "metric", "mean", "std", "delta", "exceeds_spread", "baseline",
]  # fmt: skip


def render_csv(rep: Report) -> str:
    """One tidy row per (group, metric): easy to load with pandas (comment='#')."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    for sec in rep.sections:
        table = "per_class" if sec.per_class else "detection"
        for g in sec.groups:
            for m in sec.metrics:
                s, dl = g.stats.get(m), g.deltas.get(m)
                w.writerow([
                    table, sec.task, "+".join(sec.dataset_test), sec.detector, sec.iou_type,
                    g.name, int(g.published), s.n if s else 0, m,
                    num(s.mean if s else None), num(s.std if s else None),
                    num(dl.value if dl else None),
                    "" if dl is None or dl.exceeds is None else int(dl.exceeds),
                    sec.baseline or "",
                ])  # fmt: skip
    for p in rep.pretrain:
        for m in p.members:
            for which, v in (("last", m.last), ("best", m.best)):
                metric = f"member{m.member}/{m.metric}/{which}"
                w.writerow(["pretrain", "", "", "", "", p.name, 0, 1, metric, num(v)] + [""] * 4)
    for x in rep.warnings + [x for s in rep.sections for x in s.warnings]:
        buf.write(f"# warning: {x}\n")
    for p, r in rep.skipped:
        buf.write(f"# skipped: {p}: {r}\n")
    return buf.getvalue()


def report_dict(rep: Report) -> dict[str, Any]:
    def stat(s: Stat | None) -> dict[str, Any] | None:
        return None if s is None else {"mean": _r(s.mean), "std": _r(s.std), "n": s.n}

    def dlt(x: Delta) -> dict[str, Any]:
        return {"delta": _r(x.value), "exceeds_spread": x.exceeds}

    sections = []
    for sec in rep.sections:
        groups = []
        for g in sec.groups:
            groups.append({
                "name": g.name,
                "published": g.published,
                "baseline": g.is_baseline,
                "n": g.n,
                "runs": [
                    {"run_name": r.run_name, "seed": r.seed, "path": str(r.path)} for r in g.runs
                ],
                "stats": {m: stat(g.stats.get(m)) for m in sec.metrics},
                "deltas": {m: dlt(x) for m, x in g.deltas.items()},
            })  # fmt: skip
        sections.append({
            "title": sec.title, "task": sec.task, "dataset_test": sec.dataset_test,
            "detector": sec.detector, "iou_type": sec.iou_type, "per_class": sec.per_class,
            "baseline": sec.baseline, "metrics": sec.metrics, "groups": groups,
            "notes": section_notes(sec), "warnings": sec.warnings,
        })  # fmt: skip
    pretrain = [
        {
            "name": p.name, "path": p.path, "epoch": p.epoch, "loss": _r(p.loss),
            "members": [
                {"member": m.member, "metric": m.metric, "last": _r(m.last), "best": _r(m.best),
                 "best_epoch": m.best_epoch}
                for m in p.members
            ],
        }
        for p in rep.pretrain
    ]  # fmt: skip
    return {
        "format": "mcl_det.report/v1",
        "sections": sections,
        "pretraining": pretrain,
        "warnings": rep.warnings,
        "skipped": [{"path": p, "reason": r} for p, r in rep.skipped],
    }


def render_json(rep: Report) -> str:
    return json.dumps(report_dict(rep), indent=2, ensure_ascii=False) + "\n"


def render(rep: Report, fmt: str) -> str:
    return {"md": render_md, "csv": render_csv, "latex": render_latex, "json": render_json}[fmt](
        rep
    )
