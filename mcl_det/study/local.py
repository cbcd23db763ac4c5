"""Run a study's stages on this machine, at most ``jobs`` at a time, each as a subprocess.

A stage starts once everything it depends on has finished; its output goes to
``OUTPUT_DIR/logs/<stage>.log`` and its record to ``OUTPUT_DIR/stages/<stage>.json``. The first
failure stops the running stages (SIGTERM: pretraining and detection write a checkpoint and exit
75) and starts nothing new, unless ``keep_going``, which runs every stage that does not depend on
the failed one. Ctrl-C or SIGTERM to the runner stops the stages the same way; the next ``run``
continues them.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..utils.errors import MCLDetError
from ..utils.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted
from .graph import Stage
from .plan import RunPlan
from .spec import Study
from .state import DONE, FAILED, RUNNING, STOPPED, mark, read_record

DETECTOR_WEIGHTS = ("model_final.pth", "last_checkpoint")
PRETRAIN_CHECKPOINTS = ("checkpoint_last.pth", "checkpoint_ep*.pth")


def stage_env(study: Study, jobs: int) -> dict[str, str]:
    """The stages' environment: the study's datasets root, and the cores split between the
    stages that run at once (one-thread processes side by side beat threads that share)."""
    env = dict(os.environ)
    if study.cfg.DETECTRON2_DATASETS:
        env["DETECTRON2_DATASETS"] = os.path.abspath(study.expand(study.cfg.DETECTRON2_DATASETS))
    threads = study.cfg.THREADS or (max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def cleanup_paths(study: Study, stage: Stage, stages: dict[str, Stage]) -> list[str]:
    """CLEANUP: glob patterns of what no later stage reads once ``stage`` succeeded (a detector's
    final weights once its results.json is written; a cohort's checkpoints once its member is
    exported). The local runner and the SLURM job delete them alike."""
    out: list[str] = []
    if stage.kind == "detect" and study.cfg.CLEANUP.DETECTOR_WEIGHTS and stage.out is not None:
        out += [str(stage.out / name) for name in DETECTOR_WEIGHTS]
    if stage.kind == "export" and study.cfg.CLEANUP.PRETRAIN_CHECKPOINTS:
        for dep in stage.deps:
            pre = stages[dep]
            if pre.kind == "pretrain" and pre.out is not None:
                out += [str(pre.out / pattern) for pattern in PRETRAIN_CHECKPOINTS]
    return out


def remove_matching(patterns: list[str]) -> None:
    for pattern in patterns:
        for f in glob.glob(pattern):
            Path(f).unlink(missing_ok=True)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "".join(text.splitlines(True)[-lines:])


class LocalRunner:
    def __init__(
        self,
        study: Study,
        stages: list[Stage],
        plan: RunPlan,
        jobs: int = 1,
        keep_going: bool = False,
        echo: Callable[[str], None] = print,
    ) -> None:
        if jobs < 1:
            raise MCLDetError(f"--jobs must be at least 1 (got {jobs})")
        self.study, self.plan, self.jobs, self.keep_going = study, plan, jobs, keep_going
        self.by_id = {s.id: s for s in stages}
        self.echo = echo
        self.env = stage_env(study, jobs)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = False

    # ------------------------------------------------------------------ one stage

    def _run_stage(self, s: Stage, k: int, n: int) -> int:
        out = self.study.out
        log = out / "logs" / f"{s.id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        mode = "overwrite" if s.id in self.plan.overwrite else "auto"
        cmd = s.command(mode)
        prev = read_record(out, s.id)
        attempt = (prev.attempt if prev else 0) + 1
        self.echo(f"=== [{k}/{n}] {s.id} (log: {log})\n$ {' '.join(cmd)}")
        t0 = time.time()
        fields = dict(attempt=attempt, started=t0, finished=None, exit=None, log=str(log))
        mark(out, s.id, RUNNING, s.fingerprint, job_id=None, **fields)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            with self._lock:
                if self._stopping:
                    mark(out, s.id, STOPPED, s.fingerprint, finished=time.time())
                    return EXIT_PREEMPTED
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env)
                self._procs[s.id] = proc
            rc = proc.wait()
            with self._lock:
                self._procs.pop(s.id, None)
        stopped = rc in (EXIT_PREEMPTED, EXIT_INTERRUPTED) or self._stopping
        state = DONE if rc == 0 else (STOPPED if stopped else FAILED)
        mark(out, s.id, state, s.fingerprint, finished=time.time(), exit=rc)
        if rc == 0:
            remove_matching(cleanup_paths(self.study, s, self.by_id))
            self.echo(f"--- {s.id}: done in {time.time() - t0:.0f} s")
        elif state == FAILED:
            self.echo(f"--- {s.id} failed (exit {rc}); the end of {log}:\n{log_tail(log)}")
        else:
            self.echo(f"--- {s.id} stopped (exit {rc}); the next run continues it")
        return rc

    def stop(self) -> None:
        """SIGTERM every running stage (they checkpoint and exit 75); start nothing new."""
        with self._lock:
            self._stopping = True
            for proc in self._procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    # ------------------------------------------------------------------ the graph

    def run(self) -> list[str]:
        """Run the plan; returns the ids of the failed stages (empty: all done). Ctrl-C and
        SIGTERM stop the running stages cleanly and are re-raised (KeyboardInterrupt /
        Preempted) once they have exited."""
        todo = list(self.plan.todo)
        n = len(todo)
        done = set(self.plan.kept)
        failed: list[str] = []
        blocked: set[str] = set()
        running: dict[str, threading.Thread] = {}
        results: dict[str, int] = {}
        k = 0

        def body(s: Stage, k: int) -> None:
            try:
                results[s.id] = self._run_stage(s, k, n)
            except BaseException:  # a runner bug: the stage counts as failed, never hangs
                results[s.id] = -1
                raise

        previous = signal.getsignal(signal.SIGTERM)
        term: list[int] = []
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda sig, frame: term.append(sig))
        try:
            while todo or running:
                if term and not self._stopping:
                    self.stop()
                for sid in [sid for sid in running if sid in results]:
                    running.pop(sid).join()
                    rc = results[sid]
                    if rc == 0:
                        done.add(sid)
                    elif not self._stopping:
                        failed.append(sid)
                        if not self.keep_going:
                            self.stop()
                if self._stopping:
                    todo = []
                for s in list(todo):
                    if any(d in blocked or d in failed for d in s.deps):
                        todo.remove(s)
                        blocked.add(s.id)
                        continue
                    if len(running) >= self.jobs:
                        break
                    if all(d in done for d in s.deps):
                        todo.remove(s)
                        k += 1
                        t = threading.Thread(target=body, args=(s, k), daemon=True)
                        running[s.id] = t
                        t.start()
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.stop()
            for t in running.values():
                t.join()
            raise
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)
        if term:
            raise Preempted(
                f"stopped by SIGTERM; the running stages wrote checkpoints in {self.study.out}; "
                "run the same command again to continue"
            )
        for sid in sorted(blocked):
            self.echo(f"--- {sid}: not run (a stage it depends on failed)")
        return failed
