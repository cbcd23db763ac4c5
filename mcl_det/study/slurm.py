"""Submit a study to SLURM: one submitit job per stage, ``afterok`` dependencies, detection trials
of one (protocol, arm) as one job array.

Every job is a :class:`StudyJob`: the toolkit command of its stage, run by
``mcl_det.submit.StageJob`` (requeued on preemption or time limit, continued with
``--auto-resume``), which writes the stage's record (``mcl_det.study.state``) on the node when it
starts and ends, so ``status`` and the next ``run`` see where the study is without asking SLURM's
accounting. ``run`` submits everything still to do at once and returns (``--wait`` waits); a
stage whose job is still queued or running is left to it, a failed or lost one is submitted
again. A dependent of a failed job is cancelled by SLURM (``--kill-on-invalid-dep=yes``) and
resubmitted by the next ``run``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..submit import StageJob
from ..utils.errors import MCLDetError
from .graph import Stage
from .local import cleanup_paths, remove_matching, stage_env
from .plan import RunPlan
from .spec import Study
from .state import DONE, FAILED, RUNNING, STOPPED, SUBMITTED, mark, read_record

STAGE_OF_KIND = {"data": "data", "pretrain": "pretrain", "export": "export"}
STAGE_OF_KIND |= {"detect": "detect", "report": "report"}


class StudyJob(StageJob):
    """One stage of a study as a SLURM job: StageJob plus the stage's record and CLEANUP."""

    def __init__(
        self,
        out: Path,
        stage: Stage,
        *,
        overwrite: bool,
        env: dict[str, str],
        cleanup: Sequence[str],
        cwd: str,
    ) -> None:
        super().__init__(
            STAGE_OF_KIND[stage.kind],
            stage.args,
            nodes=stage.nodes if stage.kind == "pretrain" else 1,
            gpus_per_node=stage.gpus,
            cwd=cwd,
            overwrite=overwrite,
            env=env,
        )
        self.out, self.stage_id, self.fingerprint = Path(out), stage.id, stage.fingerprint
        self.cleanup = list(cleanup)

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        job_id = env.job_id
        prev = read_record(self.out, self.stage_id)
        if prev is not None and prev.job_id == job_id and prev.attempt >= 1:
            # SLURM requeued this job itself (scontrol requeue, preemption): the pickle it runs
            # again is the submitted one, so continue what the earlier attempt started
            self.overwrite = False
        attempt = (prev.attempt if prev is not None and prev.job_id == job_id else 0) + 1
        if env.global_rank == 0:
            fields = dict(attempt=attempt, started=time.time(), finished=None, exit=None)
            mark(self.out, self.stage_id, RUNNING, self.fingerprint, job_id=job_id, **fields)
        try:
            rc = super().__call__()
        except BaseException as e:
            if env.global_rank == 0:
                stopped = "stopped by a signal" in str(e)
                state = STOPPED if stopped else FAILED
                mark(self.out, self.stage_id, state, self.fingerprint, finished=time.time())
            raise
        if env.global_rank == 0:
            remove_matching(self.cleanup)
            mark(self.out, self.stage_id, DONE, self.fingerprint, finished=time.time(), exit=rc)
        return rc


def _sbatch_params(items: Sequence[str]) -> dict[str, str]:
    extra = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise MCLDetError(f"sbatch option {item!r}: expected KEY=VALUE (e.g. qos=high)")
        extra[key.lstrip("-").replace("-", "_")] = value
    return extra


def _cancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)


def submit_study(
    study: Study,
    stages: list[Stage],
    plan: RunPlan,
    live: dict[str, str],
    *,
    force: bool,
    partition: str | None,
    account: str | None,
    sbatch: Sequence[str],
    echo: Callable[[str], None] = print,
) -> dict[str, str]:
    """Submit what ``plan`` says is to do; ``live``: SLURM's states of the jobs in the queue.
    Returns stage id -> job id of every stage submitted now or still queued."""
    import submitit
    from submitit.core.utils import FailedJobError

    c = study.cfg.SLURM
    by_id = {s.id: s for s in stages}
    job_of: dict[str, str] = {}
    changed = []
    for s in plan.todo:  # a job of this stage is already queued or running: leave it to it
        r = plan.records.get(s.id)
        if r and r.job_id and r.state in (SUBMITTED, RUNNING) and r.job_id in live:
            if r.fingerprint == s.fingerprint:
                job_of[s.id] = r.job_id
            else:
                changed.append((s.id, r.job_id))
    if changed and not force:
        ids = ", ".join(f"{sid} (job {j})" for sid, j in changed)
        raise MCLDetError(
            f"the spec changed under a running study: queued or running {ids} were made from "
            "another spec; rerun with --force to cancel and resubmit them, or restore the spec"
        )
    if changed:
        echo(f"--force: cancelling and resubmitting {', '.join(sid for sid, _ in changed)}")
        _cancel([j for _, j in changed])
    extra = _sbatch_params([*c.SBATCH, *sbatch])
    # what the stages need beyond the submitter's environment (which sbatch passes on)
    keys = ("DETECTRON2_DATASETS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {k: v for k, v in stage_env(study, 1).items() if k in keys}
    folder = study.out / "slurm" / "%j"
    cwd = os.getcwd()

    def executor(s: Stage, deps: list[str]) -> submitit.AutoExecutor:
        ex = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=c.MAX_REQUEUES
        )
        gpus = s.gpus if s.kind in ("pretrain", "detect") else 0
        what = f"detect.{s.protocol}.{s.arm}" if s.kind == "detect" else s.id
        params = dict(
            name=f"mcl_det:{study.cfg.NAME or study.out.name}:{what}",
            nodes=s.nodes if s.kind == "pretrain" else 1,
            tasks_per_node=1,  # one launcher per node; it starts the per-GPU processes itself
            gpus_per_node=gpus,
            cpus_per_task=max(gpus, 1) * c.CPUS_PER_GPU,
            timeout_min=s.time_min,
        )
        add = dict(extra)
        masters = sorted({j.split("_")[0] for j in deps})
        if masters:
            add["dependency"] = "afterok:" + ":".join(masters)
            add["kill_on_invalid_dep"] = "yes"
        if partition or c.PARTITION:
            params["slurm_partition"] = partition or c.PARTITION
        if account or c.ACCOUNT:
            params["slurm_account"] = account or c.ACCOUNT
        if add:
            params["slurm_additional_parameters"] = add
        if s.kind == "detect":
            params["slurm_array_parallelism"] = c.ARRAY_PARALLELISM
        ex.update_parameters(**params)
        return ex

    def job(s: Stage) -> StudyJob:
        return StudyJob(
            study.out,
            s,
            overwrite=s.id in plan.overwrite or s.id in dict(changed),
            env=env,
            cleanup=cleanup_paths(study, s, by_id),
            cwd=cwd,
        )

    def record(s: Stage, j: submitit.Job) -> None:
        job_of[s.id] = j.job_id
        r = read_record(study.out, s.id)
        if r is not None and r.job_id == j.job_id and r.state != SUBMITTED:
            return  # the job started (and wrote its record) before we got here
        fields = dict(attempt=0, started=None, finished=None, exit=None, log=str(j.paths.stdout))
        mark(study.out, s.id, SUBMITTED, s.fingerprint, job_id=j.job_id, **fields)

    def refused(s: Stage, e: Exception) -> MCLDetError:
        why = " ".join(str(e).split()) or type(e).__name__
        return MCLDetError(
            f"SLURM refused the job of {s.id} ({why}); the jobs submitted before it stay "
            "queued: fix the spec's resources (GPUS_PER_NODE / GPUS 0 on a CPU cluster) or the "
            "SLURM options and run the same command again"
        )

    todo = [s for s in plan.todo if s.id not in job_of]
    arrays: dict[tuple[str, str], list[Stage]] = {}
    for s in todo:
        if s.kind == "detect":
            arrays.setdefault((s.protocol, s.arm), []).append(s)
    submitted = 0
    for s in todo:
        if s.kind == "detect":
            group = arrays.pop((s.protocol, s.arm), None)
            if group is None:
                continue  # submitted with the first trial of its array
            deps = sorted({job_of[d] for t in group for d in t.deps if d in job_of})
            ex = executor(s, deps)
            try:
                with ex.batch():
                    jobs = [ex.submit(job(t)) for t in group]
            except (FailedJobError, OSError) as e:
                raise refused(s, e) from None
            for t, j in zip(group, jobs):
                record(t, j)
            submitted += 1
            array = jobs[0].job_id.split("_")[0]
            echo(f"submitted {', '.join(t.id for t in group)} as array {array}")
            continue
        deps = sorted({job_of[d] for d in s.deps if d in job_of})
        try:
            j = executor(s, deps).submit(job(s))
        except (FailedJobError, OSError) as e:
            raise refused(s, e) from None
        record(s, j)
        submitted += 1
        after = f" (after {', '.join(deps)})" if deps else ""
        echo(f"submitted {s.id} as job {j.job_id}{after}")
    queued = len(plan.todo) - len(todo)
    echo(f"{submitted} job(s) submitted; {queued} stage(s) were already queued or running")
    return job_of
