"""Where a study stands: one small JSON file per stage, ``OUTPUT_DIR/stages/<stage id>.json``.

Written by whoever runs the stage (the local runner, or the SLURM job itself on its node), always
atomically, so ``status`` and a rerun of ``run`` read a complete record or none. The record is the
contract between the runners and ``status``:

    {"stage": id, "state": one of STATES, "fingerprint": ..., "job_id": str | null,
     "attempt": int, "started": unix time | null, "finished": unix time | null,
     "exit": int | null, "log": path | null}
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..utils.io import atomic_write_json

STATES = ("submitted", "running", "done", "failed", "stopped")
DONE, FAILED, RUNNING, SUBMITTED, STOPPED = "done", "failed", "running", "submitted", "stopped"


@dataclass
class StageRecord:
    stage: str
    state: str
    fingerprint: str
    job_id: str | None = None
    attempt: int = 0
    started: float | None = None
    finished: float | None = None
    exit: int | None = None
    log: str | None = None

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


def record_path(out: Path, stage_id: str) -> Path:
    return Path(out) / "stages" / f"{stage_id}.json"


def read_record(out: Path, stage_id: str) -> StageRecord | None:
    """The stage's record, or None (never run, or a record we cannot read: treated as not run)."""
    try:
        d = json.loads(record_path(out, stage_id).read_text())
        return StageRecord(**{k: d.get(k) for k in StageRecord.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def write_record(out: Path, rec: StageRecord) -> None:
    if rec.state not in STATES:
        raise ValueError(f"state must be one of {STATES}, not {rec.state!r}")
    atomic_write_json(record_path(out, rec.stage), asdict(rec))


def mark(out: Path, stage_id: str, state: str, fingerprint: str, **fields: object) -> StageRecord:
    """Update (or create) a stage's record: ``state`` plus the given fields."""
    rec = read_record(out, stage_id) or StageRecord(stage_id, state, fingerprint)
    rec.state, rec.fingerprint = state, fingerprint
    for k, v in fields.items():
        setattr(rec, k, v)
    write_record(out, rec)
    return rec
