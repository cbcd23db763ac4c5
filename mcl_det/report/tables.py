"""Turn validated runs into comparison sections: mean ± std per group, deltas vs a baseline
with their t-test (``stats.compare``), published reference rows, and the fairness checks.

A *section* is one table: runs with the same task, test datasets, detector and IoU type
(``bbox``/``segm``). Inside a section, runs are grouped by ``collect.group_name`` (the weights
identity); the seeds of a group are its trials.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..utils.errors import MCLDetError
from .collect import DetRun, PretrainLog
from .stats import DEFAULT_PLAN, Delta, Plan, Stat, compare, mean_std

VOC_METRICS = ("AP50", "AP", "AP75")  # the order of the MoCo/MCL VOC tables
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PER_CLASS_PREFIX = {"voc": "AP50-", "coco": "AP-"}  # detectron2's per-class metric keys

# Settings that must be equal for a comparison to be fair. Weights and seed are what we vary.
FAIRNESS_FIELDS = (
    "dataset_train",
    "max_iter",
    "ims_per_batch",
    "min_size_train",
    "min_size_test",
    "mask_on",
)


@dataclass
class Group:
    name: str
    runs: list[DetRun]
    stats: dict[str, Stat | None]
    deltas: dict[str, Delta] = field(default_factory=dict)
    is_baseline: bool = False
    published: bool = False  # a row from --reference, not our run

    @property
    def n(self) -> int:
        return len(self.runs)


@dataclass
class Section:
    task: str
    dataset_test: list[str]
    detector: str
    iou_type: str
    metrics: list[str]
    groups: list[Group]
    per_class: bool = False
    baseline: str | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan: Plan = DEFAULT_PLAN  # level, power and effect of the Δs' power figures

    @property
    def title(self) -> str:
        kind = f"{self.iou_type}, per-class" if self.per_class else self.iou_type
        return f"{self.task.upper()} {'+'.join(self.dataset_test)} · {self.detector} ({kind})"


@dataclass
class Reference:
    """Published numbers (``--reference`` YAML), shown beside ours and never used for deltas."""

    source: str
    task: str
    iou_type: str
    dataset: str
    setup: str
    trials: int | None
    metrics: list[str]
    rows: list[tuple[str, dict[str, float]]]


_REF_KEYS = {"source", "task", "iou_type", "dataset", "setup", "trials", "metrics", "rows"}


def load_reference(path: str) -> Reference:
    """Read and strictly validate a reference YAML (unknown keys are an error, as in configs)."""
    what = "see tools/references/moco_voc07_r50_c4.yaml for the format"
    if not os.path.isfile(path):
        raise MCLDetError(f"reference file not found: {path}; check the --reference path")
    try:
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise MCLDetError(f"cannot parse reference file {path}: {msg}; {what}") from None
    if not isinstance(d, dict):
        raise MCLDetError(f"reference file {path} is not a YAML mapping; {what}")
    unknown = sorted(set(d) - _REF_KEYS)
    if unknown:
        raise MCLDetError(f"reference file {path}: unknown key(s) {', '.join(unknown)}; {what}")
    missing = sorted({"source", "task", "metrics", "rows"} - set(d))
    if missing:
        raise MCLDetError(f"reference file {path}: missing key(s) {', '.join(missing)}; {what}")
    metrics = d["metrics"]
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise MCLDetError(f"reference file {path}: metrics must be a list of names; {what}")
    rows = []
    for i, row in enumerate(d["rows"] if isinstance(d["rows"], list) else [None]):
        ok = isinstance(row, dict) and set(row) == {"name", "values"}
        ok = ok and isinstance(row["values"], dict) and set(row["values"]) <= set(metrics)
        ok = ok and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in row["values"].values()
        )
        if not ok:
            raise MCLDetError(
                f"reference file {path}: row {i} must be {{name: ..., values: {{metric: number}}}} "
                f"with metrics among {metrics}; {what}"
            )
        rows.append((str(row["name"]), {k: float(v) for k, v in row["values"].items()}))
    trials = d.get("trials")
    return Reference(
        source=str(d["source"]),
        task=str(d["task"]),
        iou_type=str(d.get("iou_type", "bbox")),
        dataset=str(d.get("dataset", "")),
        setup=str(d.get("setup", "")),
        trials=int(trials) if trials is not None else None,
        metrics=list(metrics),
        rows=rows,
    )


def _looks_like_baseline(name: str, runs: list[DetRun]) -> bool:
    texts = [name] + [str(r.data.get("weights_tag") or "") for r in runs]
    texts += [Path(str(r.data.get("weights") or "")).name for r in runs]
    return any("baseline" in t.lower() for t in texts)


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def _fairness_warnings(title: str, groups: list[Group]) -> list[str]:
    """One warning per setting that differs between runs of a section (beyond weights/seed)."""
    runs = [(g.name, r) for g in groups for r in g.runs]
    out = []
    for key in (*FAIRNESS_FIELDS, "config_digest"):
        if key == "config_digest" and out:
            continue  # a differing field above already explains a differing digest
        values: dict[str, list[str]] = defaultdict(list)
        for gname, r in runs:
            v = r.data.get(key)
            if key == "config_digest" and v is None:
                continue  # not every writer can define it; absence is not a difference
            values[_canon(v) if v is not None else "missing"].append(f"{gname}/seed{r.seed}")
        if len(values) > 1:
            detail = "; ".join(f"{v} in {', '.join(who)}" for v, who in values.items())
            extra = " (some other config setting differs: compare the saved configs)"
            out.append(
                f"unfair comparison in {title}: {key} differs: {detail}"
                + (extra if key == "config_digest" else "")
            )
    for g in groups:
        seeds = [r.seed for r in g.runs]
        dup = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if dup:
            out.append(
                f"group {g.name} in {title} has several runs with seed {', '.join(dup)}: "
                "trials should differ in seed (a run copied twice?)"
            )
    return out


def _metric_list(task: str, iou_type: str, runs: list[DetRun], per_class: bool) -> list[str]:
    if per_class:
        prefix = PER_CLASS_PREFIX[task]
        names: list[str] = []
        for r in runs:
            names += [k for k in r.metrics(iou_type) if k.startswith(prefix) and k not in names]
        return names
    order = VOC_METRICS if task == "voc" else COCO_METRICS
    present = {k for r in runs for k in r.metrics(iou_type)}
    return [m for m in order if m in present]


def build_sections(
    runs: list[DetRun],
    baseline: str | None = None,
    per_class: bool = False,
    reference: Reference | None = None,
    plan: Plan = DEFAULT_PLAN,
) -> list[Section]:
    """Group runs into sections and compute every cell. ``baseline`` (a group name) overrides
    the default choice, the group whose name or weights say "baseline"; ``plan`` sets the power
    figures of the Δs."""
    by_section: dict[tuple, list[DetRun]] = defaultdict(list)
    for r in runs:
        iou_types = ["bbox"] + (["segm"] if r.task == "coco" and r.metrics("segm") else [])
        for iou in iou_types:
            key = (
                r.task,
                tuple(r.data.get("dataset_test") or []),
                str(r.data.get("detector")),
                iou,
            )
            by_section[key].append(r)

    all_names = sorted({r.group for r in runs})
    if baseline is not None and baseline not in all_names:
        raise MCLDetError(
            f"--baseline {baseline!r} is not a run group; use one of: {', '.join(all_names)}"
        )

    sections: list[Section] = []
    for (task, dtest, detector, iou), sruns in sorted(by_section.items()):
        for pc in (False, True) if per_class else (False,):
            metrics = _metric_list(task, iou, sruns, pc)
            if pc and not metrics:
                continue
            sections.append(
                _section(task, list(dtest), detector, iou, metrics, sruns, baseline, pc, plan)
            )

    if reference is not None:
        _add_reference(sections, reference)
    return sections


def _trials(g: Group, iou: str, metric: str) -> list[tuple[Any, Any]]:
    return [(r.seed, r.metrics(iou).get(metric)) for r in g.runs]


def _section(
    task: str,
    dtest: list[str],
    detector: str,
    iou: str,
    metrics: list[str],
    runs: list[DetRun],
    baseline: str | None,
    per_class: bool,
    plan: Plan,
) -> Section:
    grouped: dict[str, list[DetRun]] = defaultdict(list)
    for r in runs:
        grouped[r.group].append(r)
    groups = []
    for name, gruns in grouped.items():
        gruns.sort(key=lambda r: (str(r.seed), str(r.path)))
        stats = {m: mean_std([r.metrics(iou).get(m) for r in gruns]) for m in metrics}
        groups.append(Group(name, gruns, stats))
    sec = Section(task, dtest, detector, iou, metrics, groups, per_class=per_class, plan=plan)

    if baseline is not None:
        base = [g for g in groups if g.name == baseline]
        if not base:
            sec.notes.append(f"No deltas: the baseline group '{baseline}' has no runs here.")
    else:
        base = [g for g in groups if _looks_like_baseline(g.name, g.runs)]
        if len(base) > 1:
            names = ", ".join(g.name for g in base)
            sec.notes.append(
                f"No deltas: several groups look like a baseline ({names}); pass --baseline NAME."
            )
            base = []
        elif not base:
            sec.notes.append(
                "No deltas: no group is named or tagged 'baseline'; pass --baseline NAME."
            )
    if base:
        b = base[0]
        b.is_baseline = True
        sec.baseline = b.name
        for g in groups:
            if g is b:
                continue
            for m in metrics:
                dl = compare(_trials(g, iou, m), _trials(b, iou, m), plan)
                if dl is not None:
                    g.deltas[m] = dl
    # baseline first, then by name: the reader compares every row against the first one
    sec.groups.sort(key=lambda g: (not g.is_baseline, g.name))
    if not per_class and iou == "bbox":  # segm runs are the same runs: warn once
        sec.warnings = _fairness_warnings(sec.title, sec.groups)
    return sec


def _add_reference(sections: list[Section], ref: Reference) -> None:
    """Append published rows to every matching (task, IoU type) table, or to a table of their
    own when none of our runs matches."""
    targets = [
        s for s in sections if s.task == ref.task and s.iou_type == ref.iou_type and not s.per_class
    ]
    if not targets:
        targets = [Section(ref.task, [ref.dataset], ref.setup, ref.iou_type, list(ref.metrics), [])]
        sections.append(targets[0])
    trials = f"means of {ref.trials} trials" if ref.trials else "means"
    for s in targets:
        for name, values in ref.rows:
            stats = {
                m: (Stat(values[m], None, ref.trials or 1) if m in values else None)
                for m in s.metrics
            }
            s.groups.append(Group(name, [], stats, published=True))
        setup = f" ({ref.setup})" if ref.setup else ""
        s.notes.append(
            f"[published] rows: {trials} from {ref.source}; their setup{setup} differs from "
            "ours, so they are context, not a controlled comparison (no delta)."
        )


@dataclass
class MemberSummary:
    member: str  # "0", "1", ... or "ensemble"
    metric: str
    last: float | None
    best: float | None
    best_epoch: Any


@dataclass
class PretrainSummary:
    name: str
    path: str
    epoch: Any
    loss: float | None
    members: list[MemberSummary]


def summarize_pretrain(log: PretrainLog) -> PretrainSummary:
    """Last and best monitor metric per member (kNN top-1 in selfsup, top-1 in supervised)."""
    members: dict[int, MemberSummary] = {}
    ens = MemberSummary("ensemble", "top1", None, None, None)
    for ev in log.evals:
        for k, mm in enumerate(ev["member_metrics"]):
            if not isinstance(mm, dict):
                continue
            v = mm.get("value")
            v = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
            s = members.setdefault(
                k, MemberSummary(str(k), str(mm.get("name", "?")), None, None, None)
            )
            s.metric = str(mm.get("name", s.metric))
            s.last = v
            if v is not None and (s.best is None or v > s.best):
                s.best, s.best_epoch = v, ev.get("epoch")
        e = ev.get("ensemble_top1")
        if isinstance(e, (int, float)) and not isinstance(e, bool):
            ens.last = float(e)
            if ens.best is None or e > ens.best:
                ens.best, ens.best_epoch = float(e), ev.get("epoch")
    rows = [members[k] for k in sorted(members)] + ([ens] if ens.last is not None else [])
    loss = log.last_train.get("loss") if log.last_train else None
    loss = float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None
    return PretrainSummary(log.name, str(log.path), log.evals[-1].get("epoch"), loss, rows)
