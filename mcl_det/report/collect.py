"""Find and validate run outputs: detection ``results.json``, pretraining ``log.jsonl``, and
detectron2 ``metrics.json``.

Nothing here raises on a bad file: a run that cannot be used becomes a ``Skipped`` entry with the
reason, so one broken folder never hides the others. The caller decides whether anything usable
is left (see ``mcl_det.report.main``).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FORMAT = "mcl_det.detection_results/v1"
RESULTS_NAME = "results.json"
PRETRAIN_LOG_NAME = "log.jsonl"
D2_METRICS_NAME = "metrics.json"
TASKS = ("voc", "coco")

# A trailing seed marker on a run name: "_seed3", "-seed3", "_s3", "-s3" (case-insensitive).
SEED_SUFFIX = re.compile(r"[_-](?:seed|s)\d+$", re.IGNORECASE)
SEED_ONLY = re.compile(r"^(?:seed|s)\d+$", re.IGNORECASE)  # a run named after its seed alone


@dataclass
class Skipped:
    """A file (or an input argument) that was not used, and why."""

    path: str
    reason: str


@dataclass
class DetRun:
    """One finished detection run (one seed of one setting)."""

    path: Path  # the results.json
    data: dict[str, Any]

    @property
    def run_name(self) -> str:
        return str(self.data.get("run_name") or self.path.parent.name)

    @property
    def seed(self) -> Any:
        return self.data.get("seed")

    @property
    def task(self) -> str:
        return str(self.data["task"])

    @property
    def group(self) -> str:
        """The setting this run is a trial of; see ``group_name``."""
        return group_name(self.data, self.path)

    def metrics(self, iou_type: str) -> dict[str, float]:
        return self.data["metrics"].get(iou_type) or {}


def group_name(data: dict[str, Any], path: Path | None = None) -> str:
    """Name of the setting a run belongs to; runs with the same name (and table) are trials.

    Rule: ``weights_tag`` when set; else ``run_name`` with a trailing ``_seedN``/``-seedN``/
    ``_sN``/``-sN`` removed; a run_name that is only a seed (``seed0``: train_net.py's default is
    the OUTPUT_DIR folder name) falls through to the weights file's basename (no extension, seed
    suffix removed), then to the name of the folder above the seed folder.
    """
    tag = data.get("weights_tag")
    if isinstance(tag, str) and tag.strip():
        return tag.strip()
    run_name = data.get("run_name")
    if isinstance(run_name, str) and run_name.strip() and not SEED_ONLY.match(run_name.strip()):
        return SEED_SUFFIX.sub("", run_name.strip())
    weights = data.get("weights")
    if isinstance(weights, str) and weights.strip():
        stem = Path(weights).stem
        return SEED_SUFFIX.sub("", stem) or stem
    if path is None:
        return "run"
    folder = path.parent
    if SEED_ONLY.match(folder.name) and folder.parent.name:
        return folder.parent.name
    return SEED_SUFFIX.sub("", folder.name) or folder.name


@dataclass
class PretrainLog:
    """The evaluation history of one pretraining run (one cohort)."""

    path: Path  # the log.jsonl
    name: str
    evals: list[dict[str, Any]]  # the {"type": "eval"} lines, in file order
    last_train: dict[str, Any] | None


@dataclass
class Curve:
    """detectron2 ``metrics.json`` of one run: per-iteration scalars (last write wins)."""

    path: Path
    name: str
    group: str
    points: dict[int, dict[str, float]]


@dataclass
class Collection:
    runs: list[DetRun] = field(default_factory=list)
    logs: list[PretrainLog] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _label(found: Path, root: Path) -> str:
    """Human name of a run folder: the input folder's name plus the path below it."""
    folder = found.parent
    try:
        rel = folder.relative_to(root)
    except ValueError:
        return folder.name or str(folder)
    parts = [root.name] + [p for p in rel.parts if p not in ("", ".")]
    return "/".join(p for p in parts if p) or str(folder)


def discover(inputs: list[str]) -> tuple[list[tuple[Path, Path]], list[Skipped]]:
    """Expand folders/globs/files into (file, input root) pairs of the three known file names."""
    wanted = {RESULTS_NAME, PRETRAIN_LOG_NAME, D2_METRICS_NAME}
    found: list[tuple[Path, Path]] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()

    def add(p: Path, root: Path) -> None:
        key = os.path.realpath(p)
        if key not in seen:  # overlapping globs/folders must not double-count a trial
            seen.add(key)
            found.append((p, root))

    for arg in inputs:
        if _has_glob(arg):
            paths = [Path(p) for p in sorted(glob.glob(arg, recursive=True))]
            if not paths:
                skipped.append(Skipped(arg, "no path matches this glob"))
                continue
        else:
            paths = [Path(arg)]
        for p in paths:
            if p.is_file():
                if p.name in wanted:
                    add(p, p.parent.parent)
                else:
                    skipped.append(Skipped(str(p), f"not a {RESULTS_NAME} or {PRETRAIN_LOG_NAME}"))
            elif p.is_dir():
                n_before = len(found)
                for dirpath, dirnames, filenames in os.walk(p):
                    dirnames.sort()
                    for name in sorted(filenames):
                        if name in wanted:
                            add(Path(dirpath) / name, p)
                if not any(f.name != D2_METRICS_NAME for f, _ in found[n_before:]):
                    skipped.append(
                        Skipped(str(p), f"no {RESULTS_NAME} or {PRETRAIN_LOG_NAME} under it")
                    )
            else:
                skipped.append(Skipped(str(p), "no such file or folder"))
    return found, skipped


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_results(path: Path) -> DetRun | Skipped:
    """Parse and validate one results.json; a problem becomes a ``Skipped`` with the reason."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        return Skipped(str(path), f"cannot read it ({e.strerror})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return Skipped(
            str(path),
            f"malformed or partial JSON (line {e.lineno} column {e.colno}: {e.msg}); "
            "rerun that run or delete the file",
        )
    if not isinstance(data, dict):
        return Skipped(
            str(path), "not a JSON object; is it a results.json from tools/train_net.py?"
        )
    fmt = data.get("format")
    if fmt != RESULTS_FORMAT:
        return Skipped(str(path), f"unknown format {fmt!r} (expected {RESULTS_FORMAT!r})")
    if data.get("finished") is not True:
        return Skipped(
            str(path),
            f"unfinished run (iteration {data.get('iteration')} of {data.get('max_iter')}); "
            "let it finish or resume it",
        )
    if data.get("task") not in TASKS:
        return Skipped(str(path), f"partial results: task is {data.get('task')!r}, not voc/coco")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("bbox"), dict):
        return Skipped(str(path), "partial results: no metrics.bbox")
    if not {"AP", "AP50"} & set(metrics["bbox"]):
        return Skipped(str(path), "partial results: metrics.bbox has neither AP nor AP50")
    for iou_type, values in metrics.items():
        # null is how train_net.py writes NaN (e.g. APs with no small objects): a missing value
        ok = isinstance(values, dict) and all(_is_number(v) or v is None for v in values.values())
        if not ok:
            return Skipped(str(path), f"partial results: metrics.{iou_type} has non-numbers")
    return DetRun(path, data)


def load_pretrain_log(path: Path, name: str) -> tuple[PretrainLog | Skipped, str | None]:
    """Parse a pretraining log.jsonl. A truncated *last* line (a run killed mid-write) is
    ignored with a warning; a bad line elsewhere means the file is corrupt and it is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        return Skipped(str(path), f"cannot read it ({e.strerror})"), None
    warning = None
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines):
                warning = f"{path}: ignored a partial last line ({e})"
                continue
            return Skipped(str(path), f"malformed JSON on line {i}; the log is corrupt"), None
        records.append(rec)
    evals = [
        r for r in records if r.get("type") == "eval" and isinstance(r.get("member_metrics"), list)
    ]
    if not evals:
        return Skipped(str(path), "no evaluation lines yet (no kNN / top-1 recorded)"), warning
    trains = [r for r in records if r.get("type") == "train"]
    return PretrainLog(path, name, evals, trains[-1] if trains else None), warning


def load_curve(path: Path, name: str, group: str) -> Curve | Skipped:
    """Parse detectron2's metrics.json (JSON lines from JSONWriter); resumed runs append, so the
    last value written for an iteration wins."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        return Skipped(str(path), f"cannot read it ({e.strerror})")
    points: dict[int, dict[str, float]] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines):
                continue  # a line being written when the run stopped
            return Skipped(str(path), f"malformed JSON on line {i}")
        if not isinstance(rec, dict) or not _is_number(rec.get("iteration")):
            continue
        scalars = {k: float(v) for k, v in rec.items() if _is_number(v) and math.isfinite(float(v))}
        points.setdefault(int(rec["iteration"]), {}).update(scalars)
    if not points:
        return Skipped(str(path), "no iteration lines")
    return Curve(path, name, group, points)


def collect(inputs: list[str]) -> Collection:
    """Find, parse and validate everything under ``inputs`` (folders, globs or files)."""
    found, skipped = discover(inputs)
    out = Collection(skipped=skipped)
    for path, root in found:
        if path.name == RESULTS_NAME:
            r = load_results(path)
            (out.runs if isinstance(r, DetRun) else out.skipped).append(r)
        elif path.name == PRETRAIN_LOG_NAME:
            log, warning = load_pretrain_log(path, _label(path, root))
            (out.logs if isinstance(log, PretrainLog) else out.skipped).append(log)
            if warning:
                out.warnings.append(warning)
    by_dir = {r.path.parent: r for r in out.runs}
    for path, root in found:
        if path.name == D2_METRICS_NAME:
            run = by_dir.get(path.parent)
            name = run.run_name if run else _label(path, root)
            group = run.group if run else SEED_SUFFIX.sub("", path.parent.name)
            c = load_curve(path, name, group)
            if isinstance(c, Curve):
                out.curves.append(c)
    return out
