"""AP tables (mean ± std over seeds, deltas vs the baseline), plots and pretraining monitors from
run folders: ``python tools/report.py RUN_DIR_OR_GLOB... [--help]``. The report itself is
``mcl_det.report`` (``build_report``, ``render``); this module is the command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..report import build_report
from ..report.plots import plot_bars, plot_curves
from ..report.render import FORMATS, render
from ..report.stats import ALPHA, POWER
from ..utils.errors import MCLDetError
from ..utils.io import atomic_write_text
from ..utils.rundir import check_output_path
from .run import run_main

_EXT_FORMAT = {".md": "md", ".csv": "csv", ".tex": "latex", ".json": "json"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tools/report.py",
        description="AP tables (mean ± std over seeds, deltas vs the baseline) from run folders.",
    )
    ap.add_argument("inputs", nargs="+", metavar="RUN_DIR_OR_GLOB", help="searched recursively")
    ap.add_argument("--baseline", help="group to compare against (default: the one named baseline)")
    ap.add_argument("--format", choices=FORMATS, help="default: from --output's extension, else md")
    ap.add_argument("--output", help="write the table here (atomically) instead of stdout")
    ap.add_argument("--plot", metavar="FILE.png", help="grouped bars with error bars per metric")
    ap.add_argument("--curves", metavar="FILE.png", help="loss / AP vs iteration (metrics.json)")
    ap.add_argument("--reference", metavar="FILE.yaml", help="published numbers shown beside ours")
    ap.add_argument("--per-class", action="store_true", help="also per-class AP tables")
    ap.add_argument("--decimals", type=int, default=1, help="digits after the point (default 1)")
    ap.add_argument("--effect", type=float, metavar="X", help="add the n to detect Δ=X AP points")
    ap.add_argument("--power", type=float, default=POWER, metavar="P", help="of MDE, n (0.8)")
    ap.add_argument("--alpha", type=float, default=ALPHA, metavar="A", help="two-sided (0.05)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: exit 0 with a table (skipped runs listed on stderr), MCLDetError when nothing usable."""
    a = _parser().parse_args(argv)
    fmt = a.format
    if fmt is None:
        ext = "." + a.output.rsplit(".", 1)[-1].lower() if a.output and "." in a.output else ""
        fmt = _EXT_FORMAT.get(ext, "md")
    if a.decimals < 0 or a.decimals > 6:
        raise MCLDetError(f"--decimals {a.decimals} is out of range; use 0..6")
    for flag, path in (("--output", a.output), ("--plot", a.plot), ("--curves", a.curves)):
        if path is not None:  # before reading any run: a bad path is one line, not a traceback
            check_output_path(path, "file", flag)
    rep, col = build_report(
        a.inputs,
        a.baseline,
        a.per_class,
        a.reference,
        a.decimals,
        alpha=a.alpha,
        power=a.power,
        effect=a.effect,
    )
    text = render(rep, fmt)
    # figures first: a failure there must not leave a fresh table next to a stale figure
    if a.plot:
        plot_bars(rep.sections, a.plot)
    if a.curves:
        plot_curves(col.curves, a.curves)
    for w in rep.warnings + [w for s in rep.sections for w in s.warnings]:
        print(f"warning: {w}", file=sys.stderr)
    for p, r in rep.skipped:
        print(f"skipped: {p}: {r}", file=sys.stderr)
    if a.output:
        atomic_write_text(a.output, text)
        print(f"wrote {a.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    run_main(main)
