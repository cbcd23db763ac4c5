"""Run pretraining or detection as a SLURM job that survives preemption and time limits.

submitit does the scheduler side: it writes the sbatch script, asks SLURM for a signal before the
time limit, and on that signal calls the job's ``checkpoint()`` and requeues it. The job itself is
:class:`StageJob`: it runs the stage's own command (``python -m mcl_det.cli.train_net`` or
``python -m mcl_det.cli.pretrain``: what ``tools/train_net.py`` and ``pretrain/main.py`` run) as a
child process with ``--auto-resume``, in the folder the job was submitted from; its
``checkpoint()`` passes the stop request on (SIGTERM: the stage finishes its iteration, writes a
checkpoint and exits 75, see ``mcl_det.utils.preempt``) and hands submitit the same job to
requeue, which resumes from that checkpoint. Running the command as a child keeps one code path
(and one set of flags) for jobs started by hand, by torchrun and by SLURM.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .utils.errors import MCLDetError
from .utils.preempt import EXIT_PREEMPTED

if TYPE_CHECKING:  # imported where it is used: the library imports without submitit
    import submitit

# stage -> the module of its command (``python -m``): the installed package's, not a checkout's.
# tools/submit.py submits the first two; a study (mcl_det/study) runs all of them as jobs.
STAGES = {
    "detect": "mcl_det.cli.train_net",
    "pretrain": "mcl_det.cli.pretrain",
    "export": "mcl_det.cli.convert_to_d2",
    "data": "mcl_det.cli.make_toy_data",
    "report": "mcl_det.cli.study",
}
# the stages that checkpoint, resume (--auto-resume) and run on several GPUs / machines
RESUMABLE = ("detect", "pretrain")


class StageJob:
    """A submitit job (callable with ``checkpoint``) running one stage's CLI on one node.

    ``argv``: the stage's own arguments (config file, KEY VALUE overrides). On each node the
    distributed flags are added from submitit's job environment. ``cwd``: where the stage runs,
    so that relative paths (config files, OUTPUT_DIR) mean what they meant where the job was
    submitted (default: the current folder). ``overwrite``: the first attempt replaces the run in
    OUTPUT_DIR (``--overwrite``: a study's ``--force``); a requeued attempt always continues it.
    ``env``: variables added to the stage's environment.
    """

    def __init__(
        self,
        stage: str,
        argv: Sequence[str],
        *,
        nodes: int = 1,
        gpus_per_node: int = 0,
        grace_s: float = 120.0,
        port: int | None = None,
        cwd: str | os.PathLike | None = None,
        overwrite: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        if stage not in STAGES:
            raise MCLDetError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
        self.stage = stage
        self.argv = list(argv)
        self.nodes = nodes
        self.gpus_per_node = gpus_per_node
        self.grace_s = grace_s
        self.port = port or random.randint(20000, 60000)
        self.cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
        self.overwrite = overwrite
        self.env = dict(env or {})
        self.attempt = 0
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = None  # a running process does not travel to the requeued job
        return state

    def command(self, node: int = 0, master: str = "127.0.0.1") -> list[str]:
        """The command line this node runs (``--auto-resume``: requeued jobs continue)."""
        module = ["-m", STAGES[self.stage]]
        if self.stage not in RESUMABLE:
            return [sys.executable, *module, *self.argv]
        mode = "--overwrite" if self.overwrite and self.attempt <= 1 else "--auto-resume"
        if self.stage == "detect":  # train_net starts its per-GPU processes itself
            dist = ["--num-gpus", str(self.gpus_per_node)]
            if self.nodes > 1:
                dist += ["--num-machines", str(self.nodes), "--machine-rank", str(node)]
                dist += ["--dist-url", f"tcp://{master}:{self.port}"]
            return [sys.executable, *module, mode, *dist, *self.argv]
        if self.nodes == 1 and self.gpus_per_node <= 1:
            return [sys.executable, *module, mode, *self.argv]
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nodes}"]
        torchrun += [f"--node_rank={node}", f"--nproc_per_node={max(self.gpus_per_node, 1)}"]
        torchrun += [f"--master_addr={master}", f"--master_port={self.port}"]
        return [*torchrun, *module, mode, *self.argv]

    def __call__(self) -> int:
        node, master, cluster, usr_sig = 0, "127.0.0.1", None, None
        try:
            import submitit

            env = submitit.JobEnvironment()
            node, master, cluster = env.node, env.hostnames[0], env.cluster
            usr_sig = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}", None)
        except (ImportError, RuntimeError, KeyError):
            pass  # not inside a submitit job (a direct call): one local node
        self.attempt += 1
        cmd = self.command(node, master)
        print(f"attempt {self.attempt}: {' '.join(cmd)}", flush=True)
        # SLURM sends the job's --signal (submitit's USR2) to every process of the job step: the
        # stage ignores it (its default action would kill it mid-iteration, without a
        # checkpoint) and is stopped by checkpoint() below instead.
        ignore = usr_sig and functools.partial(signal.signal, usr_sig, signal.SIG_IGN)
        env = {**os.environ, **self.env} if self.env else None
        self._proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, preexec_fn=ignore)
        rc = self._proc.wait()
        self._proc = None
        if rc == EXIT_PREEMPTED and cluster == "slurm":
            # Not our checkpoint() (that ends this call with submitit's requeue): SLURM's SIGTERM
            # reached the stage (scontrol requeue, preemption, scancel), which stopped with a
            # checkpoint. SLURM requeues or kills this job next, or sends the USR2 of submitit's
            # preemption protocol; a failure recorded now would end the caller's job.result()
            # with an error while the requeued job goes on. Wait for SLURM, bounded.
            print(f"{self.stage} stopped by SLURM; waiting for its requeue or kill", flush=True)
            time.sleep(self.grace_s)
        if rc == EXIT_PREEMPTED:
            raise RuntimeError(
                f"{self.stage} stopped by a signal after writing a checkpoint (exit "
                f"{EXIT_PREEMPTED}); submit the same job again to continue (--auto-resume)"
            )
        if rc != 0:
            raise RuntimeError(f"{self.stage} failed with exit code {rc}; see the log above")
        return rc

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """submitit's preemption/timeout hook: stop the stage cleanly, then requeue this job."""
        import submitit

        proc = self._proc
        if proc is not None and proc.returncode is None:
            print(f"stopping {self.stage} (pid {proc.pid}) for requeue", flush=True)
            proc.send_signal(signal.SIGTERM)
            # We run inside a signal handler that interrupted proc.wait() in __call__, which holds
            # Popen's wait lock: reap the child here with waitpid instead of a second wait().
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline:
                try:
                    pid, status = os.waitpid(proc.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid:
                    print(f"{self.stage} exited ({os.waitstatus_to_exitcode(status)})", flush=True)
                    break
                time.sleep(0.2)
            else:
                print(f"{self.stage} still running after {self.grace_s:.0f} s", flush=True)
        return submitit.helpers.DelayedSubmission(self)
