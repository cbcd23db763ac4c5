"""PNG figures: grouped AP bars with error bars, and detectron2 training curves.

matplotlib runs on the Agg backend (no display needed); figures are rendered to memory and then
written atomically, so an interrupted run never leaves a half-written PNG.
"""

from __future__ import annotations

import io
import os

from ..utils.errors import MCLDetError
from ..utils.io import atomic_write_bytes
from .collect import Curve
from .tables import Section

# Which AP curve to draw, by preference: VOC's headline metric first, then COCO's.
CURVE_AP_KEYS = ("bbox/AP50", "bbox/AP")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def plot_bars(sections: list[Section], path: str | os.PathLike) -> None:
    """One panel per table: x = metric, one bar per group (mean), error bar = sample std.
    Published rows are hatched and have no error bar (their spread is unknown)."""
    secs = [s for s in sections if not s.per_class and s.groups and s.metrics]
    if not secs:
        raise MCLDetError("--plot: no detection results to plot; drop --plot or add run folders")
    plt = _pyplot()
    width = max(6.0, 1.2 * max(len(s.metrics) * len(s.groups) for s in secs) / 2)
    fig, axes = plt.subplots(len(secs), 1, figsize=(width, 3.6 * len(secs)), squeeze=False)
    try:
        for ax, sec in zip(axes[:, 0], secs):
            k = len(sec.groups)
            bw = 0.8 / k
            for i, g in enumerate(sec.groups):
                xs, ys, es = [], [], []
                for j, m in enumerate(sec.metrics):
                    s = g.stats.get(m)
                    if s is None:
                        continue
                    xs.append(j - 0.4 + bw * (i + 0.5))
                    ys.append(s.mean)
                    es.append(0.0 if s.std is None else s.std)
                label = f"{g.name} [published]" if g.published else f"{g.name} (n={g.n})"
                ax.bar(
                    xs,
                    ys,
                    bw,
                    yerr=None if g.published else es,
                    capsize=3,
                    label=label,
                    hatch="//" if g.published else None,
                )
            ax.set_xticks(range(len(sec.metrics)))
            ax.set_xticklabels(sec.metrics)
            ax.set_ylabel("AP (%)")
            ax.set_title(sec.title, fontsize=9)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_curves(curves: list[Curve], path: str | os.PathLike) -> None:
    """Two panels: total_loss vs iteration, and the AP evaluations vs iteration; one line per run,
    one colour per group (seeds of a group share a colour)."""
    if not curves:
        raise MCLDetError(
            "--curves: no detectron2 metrics.json found under the given folders; "
            "point at the training OUTPUT_DIRs or drop --curves"
        )
    plt = _pyplot()
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        groups = sorted({c.group for c in curves})
        colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}
        ap_key = next(
            (k for k in CURVE_AP_KEYS if any(k in p for c in curves for p in c.points.values())),
            None,
        )
        labelled: set[str] = set()
        for c in sorted(curves, key=lambda c: c.name):
            its = sorted(c.points)
            label = None if c.group in labelled else c.group
            labelled.add(c.group)
            loss = [(i, c.points[i]["total_loss"]) for i in its if "total_loss" in c.points[i]]
            if loss:
                # detectron2 logs every 20 iterations: a short run may have a single point
                marker = "o" if len(loss) < 10 else None
                ax_loss.plot(*zip(*loss), color=colors[c.group], label=label, lw=1, marker=marker)
            if ap_key:
                ap = [(i, c.points[i][ap_key]) for i in its if ap_key in c.points[i]]
                if ap:
                    ax_ap.plot(*zip(*ap), marker="o", color=colors[c.group], label=label, lw=1)
        ax_loss.set_xlabel("iteration")
        ax_loss.set_ylabel("total_loss")
        ax_loss.set_title("training loss")
        ax_ap.set_xlabel("iteration")
        ax_ap.set_ylabel(ap_key or "AP")
        ax_ap.set_title(f"{ap_key} (evaluations)" if ap_key else "no AP evaluations logged")
        for ax in (ax_loss, ax_ap):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)
