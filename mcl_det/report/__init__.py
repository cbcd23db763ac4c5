"""Run folders -> the comparison a paper needs: AP tables (mean ± std over seeds, deltas vs the
baseline), pretraining monitors, plots.

Public API:
    build_report(inputs, baseline=None, per_class=False, reference=None, decimals=1,
                 alpha=0.05, power=0.8, effect=None) -> (Report, Collection)
    render(report, fmt)  # fmt in md | csv | latex | json

The command behind tools/report.py is ``mcl_det.cli.report``.

Grouping rule: runs with the same task, test datasets and detector are one table; inside it, a
run's group is its ``weights_tag``, else its ``run_name`` minus a trailing ``_seedN``/``-sN``
(see ``collect.group_name``). The runs of a group are trials of one setting.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..utils.errors import MCLDetError
from .collect import Collection, collect, group_name
from .render import Report, render
from .stats import ALPHA, POWER, Plan
from .tables import build_sections, load_reference, summarize_pretrain

__all__ = ["build_report", "collect", "group_name", "render", "Report"]


def build_report(
    inputs: Sequence[str],
    baseline: str | None = None,
    per_class: bool = False,
    reference: str | None = None,
    decimals: int = 1,
    alpha: float = ALPHA,
    power: float = POWER,
    effect: float | None = None,
) -> tuple[Report, Collection]:
    """Collect runs under ``inputs`` and compute every table. Raises ``MCLDetError`` when nothing
    usable is found (the message lists what was skipped and why). ``alpha`` and ``power`` set the
    minimum detectable effect of every Δ; ``effect`` (AP points) adds the n needed to detect it."""
    plan = Plan(alpha, power, effect)  # bad values fail before any run is read
    col = collect(list(inputs))
    skipped = [(s.path, s.reason) for s in col.skipped]
    if not col.runs and not col.logs:
        listed = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        more = f" (+{len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise MCLDetError(
            f"no usable results found in {' '.join(inputs)}"
            + (f" [skipped: {listed}{more}]" if listed else "")
            + "; point at OUTPUT_DIRs of finished tools/train_net.py or pretrain/main.py runs"
        )
    ref = load_reference(reference) if reference else None
    sections = build_sections(
        col.runs, baseline=baseline, per_class=per_class, reference=ref, plan=plan
    )
    pretrain = [summarize_pretrain(log) for log in col.logs]
    rep = Report(sections, pretrain, list(col.warnings), skipped, decimals)
    return rep, col
