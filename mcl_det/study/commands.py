"""The study's subcommands: ``run``, ``status``, ``plan`` and ``report`` (``tools/study.py``).

``run`` takes the study folder's lock (one runner at a time), checks the spec against the one its
finished stages were made from, saves the resolved spec as ``OUTPUT_DIR/study.yaml`` and hands
the stages still to do to the local or the SLURM runner. ``status`` reads the stage records (and,
for SLURM jobs, the queue); ``report`` turns the finished trials into tables, one comparison per
baseline; ``plan`` prints the graph and what it costs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from tabulate import tabulate

from ..config import config_changes, save_cfg
from ..utils.errors import MCLDetError
from ..utils.io import atomic_write_text
from ..utils.rundir import check_output_path, lock_run_dir
from .graph import Stage, build_graph
from .plan import describe_force, plan_run
from .spec import Study, load_spec
from .state import DONE, RUNNING, SUBMITTED, read_record

SPEC_NAME = "study.yaml"  # the resolved spec inside OUTPUT_DIR


def _changes_since(study: Study) -> list[str]:
    saved = study.out / SPEC_NAME
    if not saved.is_file():
        return []
    return config_changes(saved.read_text(), study.cfg, ignore=())


def prepare(
    spec: str, opts: Sequence[str], force: bool, echo: Callable[[str], None] = print
) -> tuple[Study, list[Stage], object, int]:
    """Load and check the spec, lock the study folder, decide what runs, save the spec. Returns
    (study, stages, plan, lock fd); the caller closes the fd when it is done."""
    study = load_spec(spec, opts)
    check_output_path(study.out, "dir", "OUTPUT_DIR")
    study.out.mkdir(parents=True, exist_ok=True)
    fd = lock_run_dir(study.out)
    try:
        stages = build_graph(study)
        try:
            plan = plan_run(study, stages, force)
        except MCLDetError as e:
            changed = _changes_since(study)
            if changed:
                more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
                raise MCLDetError(f"{e}; spec changes: {'; '.join(changed[:4])}{more}") from None
            raise
        line = describe_force(plan)
        if line:
            echo(line)
        save_cfg(study.cfg, study.out / SPEC_NAME)
    except BaseException:
        os.close(fd)
        raise
    return study, stages, plan, fd


def run_local(
    spec: str,
    opts: Sequence[str] = (),
    jobs: int = 1,
    force: bool = False,
    keep_going: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """``run --cluster local``: every stage on this machine; returns 0 when all are done."""
    from .local import LocalRunner

    study, stages, plan, fd = prepare(spec, opts, force, echo)
    try:
        if not plan.todo:
            echo(f"every stage of {study.out} is done; nothing to run")
            echo(status_table(study, stages))
            return 0
        echo(f"{len(plan.todo)} stage(s) to run, {len(plan.kept)} already done ({study.out})")
        t0 = time.time()
        failed = LocalRunner(study, stages, plan, jobs, keep_going, echo).run()
    finally:
        os.close(fd)
    echo(status_table(study, stages))
    if failed:
        raise MCLDetError(
            f"stage(s) failed: {', '.join(failed)}; see their logs in {study.out / 'logs'}, fix "
            f"the cause and run the same command again (finished stages are kept)"
        )
    echo(f"study finished in {time.time() - t0:.0f} s; report: {study.out / 'report.md'}")
    return 0


def run_slurm(
    spec: str,
    opts: Sequence[str] = (),
    force: bool = False,
    partition: str | None = None,
    account: str | None = None,
    sbatch: Sequence[str] = (),
    wait: bool = False,
    echo: Callable[[str], None] = print,
    poll_s: float = 5.0,
) -> int:
    """``run --cluster slurm``: submit every stage still to do; with ``wait``, wait for the jobs
    and fail when one failed."""
    from .slurm import submit_study

    if shutil.which("sbatch") is None:
        raise MCLDetError(
            "sbatch not found: this is no SLURM login node (--cluster local runs here)"
        )
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise MCLDetError("submitit is not installed; pip install submitit") from None
    study, stages, plan, fd = prepare(spec, opts, force, echo)
    try:
        ids = sorted({r.job_id for r in plan.records.values() if r and r.job_id})
        live = _queue_states(ids)
        if live is None:
            raise MCLDetError("squeue does not answer; is the SLURM controller up?")
        if plan.todo:
            submit_study(
                study,
                stages,
                plan,
                live,
                force=force,
                partition=partition,
                account=account,
                sbatch=sbatch,
                echo=echo,
            )
        else:
            echo(f"every stage of {study.out} is done; nothing to submit")
    finally:
        os.close(fd)
    if wait:
        while True:
            states = stage_states(study, stages)
            if not any(state in ACTIVE for state, _ in states.values()):
                break
            time.sleep(poll_s)
    echo(status_table(study, stages))
    if wait:
        failed = [sid for sid, (state, _) in stage_states(study, stages).items() if state != DONE]
        if failed:
            raise MCLDetError(
                f"stage(s) did not finish: {', '.join(failed)}; see `tools/study.py status "
                f"{study.out}` and their logs, then run the same command again"
            )
    return 0


# ----------------------------------------------------------------------------- status

# what `status` shows for a stage whose job is still in SLURM's hands
ACTIVE = ("submitted", "running", "pending", "configuring", "completing", "requeued", "suspended")


def _queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """SLURM's view of the given jobs (squeue: the pending and running ones); None when the
    queue cannot be asked (no SLURM here)."""
    if not job_ids:
        return {}
    try:
        r = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 and "Invalid job id" not in r.stderr:
        return None
    states = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1].lower()
    return states


def stage_states(study: Study, stages: list[Stage]) -> dict[str, tuple[str, object]]:
    """stage id -> (state shown by ``status``, its record or None)."""
    records = {s.id: read_record(study.out, s.id) for s in stages}
    live = _queue_states(sorted({r.job_id for r in records.values() if r and r.job_id}))
    out = {}
    for s in stages:
        r = records[s.id]
        if r is None:
            state = "not run"
        elif r.state == DONE and r.fingerprint != s.fingerprint and s.kind != "report":
            state = "stale"
        elif r.job_id and r.state in (SUBMITTED, RUNNING) and live is not None:
            # in the queue: SLURM's word (pending, running, ...); gone from it without a record
            # of its end (cancelled, out of time before it started): lost, `run` reruns it
            state = live.get(r.job_id, "lost")
        else:
            state = r.state
        out[s.id] = (state, r)
    return out


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def status_table(study: Study, stages: list[Stage]) -> str:
    """One row per stage: state, SLURM job id, time, log."""
    states = stage_states(study, stages)
    rows = []
    for s in stages:
        state, r = states[s.id]
        rows.append(
            [
                s.id,
                state,
                (r.job_id or "") if r else "",
                _fmt_seconds(r.seconds) if r else "",
                (r.log or "") if r else "",
            ]
        )
    counts: dict[str, int] = {}
    for state, _ in states.values():
        counts[state] = counts.get(state, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    table = tabulate(rows, headers=["stage", "state", "job", "time", "log"], tablefmt="github")
    return f"{table}\n{len(stages)} stages: {summary}"


def status(spec_or_dir: str, opts: Sequence[str] = ()) -> str:
    study = load_study(spec_or_dir, opts)
    return status_table(study, build_graph(study))


def load_study(spec_or_dir: str, opts: Sequence[str] = ()) -> Study:
    """A spec file, or a study folder (its saved ``study.yaml``)."""
    p = Path(spec_or_dir)
    if p.is_dir():
        if not (p / SPEC_NAME).is_file():
            raise MCLDetError(f"{p} holds no {SPEC_NAME}; give the study spec or a study folder")
        p = p / SPEC_NAME
    return load_spec(p, opts)


# ----------------------------------------------------------------------------- report


def write_report(spec_or_dir: str, decimals: int = 1) -> Path:
    """The study's tables: one comparison per baseline arm (its arms' detection trials and
    pretraining logs), rendered to ``report.md`` (all comparisons) and ``report.json``."""
    from ..report import build_report, render

    study = load_study(spec_or_dir)
    c = study.cfg
    groups = study.comparisons()
    md, js = [f"# Study {c.NAME or study.out.name}\n"], []
    for baseline, arms in groups.items():
        inputs = [
            str(p)
            for arm in arms
            for p in (*sorted(study.out.glob(f"detect/*/{arm}")), study.out / "pretrain" / arm)
            if p.exists()
        ]
        if not inputs:
            md.append(f"## {', '.join(arms[1:]) or baseline} vs {baseline}\n\nno finished runs\n")
            continue
        kw = {"effect": c.REPORT.EFFECT} if c.REPORT.EFFECT else {}
        rep, _ = build_report(
            inputs, baseline, c.REPORT.PER_CLASS, c.REFERENCE or None, decimals, **kw
        )
        title = f"{', '.join(arms[1:])} vs {baseline}" if len(arms) > 1 else baseline
        terms = pretraining_terms(study, arms)
        md.append(f"## {title}\n\n{render(rep, 'md')}" + (f"\n{terms}\n" if terms else ""))
        js.append({"baseline": baseline, "arms": arms, "report": json.loads(render(rep, "json"))})
    out = study.out / "report.md"
    atomic_write_text(study.out / "report.json", json.dumps(js, indent=2) + "\n")
    atomic_write_text(out, "\n".join(md))
    return out


def pretraining_terms(study: Study, arms: list[str]) -> str:
    """One line naming the loss terms each pretrained arm trained with, read from its run's
    saved ``config.yaml`` (the first seed's: the seeds differ in SEED only)."""
    from yacs.config import CfgNode

    from ..pretrain.losses import describe_terms

    parts = []
    for arm in arms:
        found = sorted((study.out / "pretrain" / arm).glob("**/config.yaml"))
        if not found:
            continue
        try:
            cfg = CfgNode.load_cfg(found[0].read_text())  # yaml.safe_load underneath
            parts.append(f"{arm}: {describe_terms(cfg)}")
        except (OSError, ValueError, KeyError, AttributeError, yaml.YAMLError):
            parts.append(f"{arm}: ? (unreadable {found[0]})")
    return f"- Pretraining loss terms: {'; '.join(parts)}." if parts else ""


# ----------------------------------------------------------------------------- plan


def plan_text(spec: str, opts: Sequence[str] = ()) -> str:
    """The graph (one row per stage: what it waits for, its resources, its GPU-hours), the SLURM
    jobs it becomes and the total GPU-hours from the measured throughputs."""
    from .estimate import estimate, fmt_hours, load_figures, slurm_jobs

    study = load_spec(spec, opts)
    stages = build_graph(study)
    figures = load_figures()
    rows, total, by_kind, missing = [], 0.0, {}, []
    for s in stages:
        e = estimate(study, s, figures)
        if e.gpu_hours is None:
            missing.append(f"{s.id}: {e.detail}")
        else:
            total += e.gpu_hours
            by_kind[s.kind] = by_kind.get(s.kind, 0.0) + e.gpu_hours
        deps = ", ".join(s.deps) if len(s.deps) <= 2 else f"{len(s.deps)} stages"
        gpus = f"{s.nodes}x{s.gpus}" if s.kind == "pretrain" else (str(s.gpus) if s.gpus else "-")
        rows.append([s.id, deps or "-", gpus, fmt_hours(e.gpu_hours), e.detail])
    jobs, arrays = slurm_jobs(stages)
    table = tabulate(
        rows, headers=["stage", "after", "GPUs", "GPU-h", "estimate"], tablefmt="github"
    )
    kinds = ", ".join(f"{k} {fmt_hours(v)}" for k, v in by_kind.items() if v)
    lines = [
        table,
        f"{len(stages)} stages; on SLURM {jobs} jobs ({arrays} arrays of detection trials)",
        f"GPU-hours: {fmt_hours(total)}{' (' + kinds + ')' if kinds else ''}"
        + (" + unknown (below)" if missing else ""),
        "Estimated from mcl_det/study/figures.json (linear scaling over GPUs; evaluation and "
        "queue time left out).",
    ]
    lines += [f"no estimate: {m}" for m in missing]
    return "\n".join(lines)
