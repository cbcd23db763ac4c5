"""What a ``run`` must do: which stages are finished, which must (re)run, which are stale.

Shared by the local and the SLURM runner, so both keep the same promise: a finished stage is never
redone or overwritten; a failed, stopped or never-run one runs (continuing its own checkpoint,
``--auto-resume``); a finished one whose fingerprint changed (the spec or a config file changed)
is *stale* and is rerun only with ``--force``, which replaces its outputs (``--overwrite``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.errors import MCLDetError
from .graph import Stage, dependents
from .spec import Study
from .state import DONE, StageRecord, read_record


@dataclass
class RunPlan:
    todo: list[Stage]  # to run now, in dependency order
    kept: list[str]  # finished and current: left alone
    overwrite: set[str] = field(default_factory=set)  # stale, rerun with --overwrite (--force)
    records: dict[str, StageRecord | None] = field(default_factory=dict)


def plan_run(study: Study, stages: list[Stage], force: bool = False) -> RunPlan:
    """Decide what runs. Raises ``MCLDetError`` naming the stale stages unless ``force``."""
    records = {s.id: read_record(study.out, s.id) for s in stages}
    stale = {
        s.id
        for s in stages
        if s.kind != "report"
        and (r := records[s.id]) is not None
        and r.state == DONE
        and r.fingerprint != s.fingerprint
    }
    if stale and not force:
        shown = sorted(stale)
        more = f" (+{len(shown) - 6} more)" if len(shown) > 6 else ""
        raise MCLDetError(
            f"the spec or a config changed since these finished stages ran: "
            f"{', '.join(shown[:6])}{more}; rerun with --force to replace their outputs (and "
            f"rerun what depends on them), or restore the spec, or use another OUTPUT_DIR"
        )
    rerun = dependents(stages, stale)
    todo, kept = [], []
    for s in stages:
        r = records[s.id]
        current = r is not None and r.state == DONE and r.fingerprint == s.fingerprint
        if (
            current
            and s.id not in rerun
            and not (s.kind == "report" and any(t.id in s.deps for t in todo))
        ):
            kept.append(s.id)
        else:
            todo.append(s)
    # a stale stage's dependents that had finished are replaced too; the rest resume as usual
    # (the report is no result of its own: rewritten whenever it runs, never "replaced")
    kinds = {s.id: s.kind for s in stages}
    overwrite = {
        sid
        for sid in rerun
        if records[sid] is not None and records[sid].state == DONE and kinds[sid] != "report"
    }
    return RunPlan(todo, kept, overwrite, records)


def describe_force(plan: RunPlan) -> str | None:
    """The line ``--force`` prints: what it replaces."""
    if not plan.overwrite:
        return None
    ids = sorted(plan.overwrite)
    return f"--force: replacing {len(ids)} stale stage(s): {', '.join(ids)}"
