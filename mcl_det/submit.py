"""Run pretraining or detection as a SLURM job that survives preemption and time limits.

submitit does the scheduler side: it writes the sbatch script, asks SLURM for a signal before the
time limit, and on that signal calls the job's ``checkpoint()`` and requeues it. The job itself is
:class:`StageJob`: it runs the stage's own CLI (``tools/train_net.py`` or ``pretrain/main.py``)
as a child process with ``--auto-resume``; its ``checkpoint()`` passes the stop request on
(SIGTERM: the stage finishes its iteration, writes a checkpoint and exits 75, see
``mcl_det.utils.preempt``) and hands submitit the same job to requeue, which resumes from that
checkpoint. Running the CLI as a child keeps one code path (and one set of flags) for jobs
started by hand, by torchrun and by SLURM.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .utils.errors import MCLDetError
from .utils.preempt import EXIT_PREEMPTED

if TYPE_CHECKING:  # imported where it is used: the library imports without submitit
    import submitit

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"detect": "tools/train_net.py", "pretrain": "pretrain/main.py"}


class StageJob:
    """A submitit job (callable with ``checkpoint``) running one stage's CLI on one node.

    ``argv``: the stage's own arguments (config file, KEY VALUE overrides). On each node the
    distributed flags are added from submitit's job environment.
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
        root: str | os.PathLike = ROOT,
    ) -> None:
        if stage not in STAGES:
            raise MCLDetError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
        self.stage = stage
        self.argv = list(argv)
        self.nodes = nodes
        self.gpus_per_node = gpus_per_node
        self.grace_s = grace_s
        self.port = port or random.randint(20000, 60000)
        self.root = str(root)
        self.attempt = 0
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = None  # a running process does not travel to the requeued job
        return state

    def command(self, node: int = 0, master: str = "127.0.0.1") -> list[str]:
        """The command line this node runs (``--auto-resume`` always: requeued jobs continue)."""
        script = os.path.join(self.root, STAGES[self.stage])
        if self.stage == "detect":  # tools/train_net.py starts its per-GPU processes itself
            dist = ["--num-gpus", str(self.gpus_per_node)]
            if self.nodes > 1:
                dist += ["--num-machines", str(self.nodes), "--machine-rank", str(node)]
                dist += ["--dist-url", f"tcp://{master}:{self.port}"]
            return [sys.executable, script, "--auto-resume", *dist, *self.argv]
        if self.nodes == 1 and self.gpus_per_node <= 1:
            return [sys.executable, script, "--auto-resume", *self.argv]
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nodes}"]
        torchrun += [f"--node_rank={node}", f"--nproc_per_node={max(self.gpus_per_node, 1)}"]
        torchrun += [f"--master_addr={master}", f"--master_port={self.port}"]
        return [*torchrun, script, "--auto-resume", *self.argv]

    def __call__(self) -> int:
        node, master = 0, "127.0.0.1"
        try:
            import submitit

            env = submitit.JobEnvironment()
            node, master = env.node, env.hostnames[0]
        except (ImportError, RuntimeError, KeyError):
            pass  # not inside a submitit job (a direct call): one local node
        self.attempt += 1
        cmd = self.command(node, master)
        print(f"attempt {self.attempt}: {' '.join(cmd)}", flush=True)
        self._proc = subprocess.Popen(cmd, cwd=self.root)
        rc = self._proc.wait()
        self._proc = None
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


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/submit.py",
        description="Submit pretraining or detection to SLURM (submitit): requeued on preemption "
        "or time limit, resumed from the last checkpoint (--auto-resume).",
        usage="%(prog)s {detect,pretrain} [options] -- STAGE ARGUMENTS",
        epilog="Everything after '--' goes to the stage, e.g. "
        "tools/submit.py detect --nodes 1 --gpus-per-node 8 -- --config-file "
        "detection_configs/voc_faster_rcnn_mcl.yaml OUTPUT_DIR output/voc_mcl",
    )
    p.add_argument(
        "stage",
        choices=sorted(STAGES),
        help="pretrain: pretrain/main.py; detect: tools/train_net.py",
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--cpus-per-gpu", type=int, default=8)
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--time", type=int, default=24 * 60, metavar="MIN", help="time limit per slot")
    p.add_argument("--mem-gb", type=int, default=None)
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option, repeatable (e.g. --sbatch qos=high --sbatch constraint=a100)",
    )
    p.add_argument("--max-requeues", type=int, default=20, help="timeouts before giving up")
    p.add_argument("--job-dir", default="output/slurm/%j", help="submitit logs and pickles")
    p.add_argument("--name", default=None, help="job name (default: mcl_det-STAGE)")
    p.add_argument(
        "--cluster",
        choices=("slurm", "local", "debug"),
        default="slurm",
        help="local: run here under submitit's local executor (tests, dry runs)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Our options before ``--``, the stage's arguments after it (``stage_args``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a = build_parser().parse_args(argv[:cut])
    a.stage_args = argv[cut + 1 :]
    return a


def build_executor(a: argparse.Namespace) -> submitit.AutoExecutor:
    """The submitit executor for the parsed options."""
    import submitit

    extra = {}
    for item in a.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MCLDetError(f"--sbatch {item}: expected KEY=VALUE (e.g. qos=high)")
        extra[key.lstrip("-").replace("-", "_")] = value
    kw = {"slurm_max_num_timeout": a.max_requeues} if a.cluster == "slurm" else {}
    try:
        ex = submitit.AutoExecutor(folder=a.job_dir, cluster=a.cluster, **kw)
    except RuntimeError as e:
        raise MCLDetError(f"{e}; is this a SLURM login node? (--cluster local runs here)") from None
    params = dict(
        name=a.name or f"mcl_det-{a.stage}",
        nodes=a.nodes,
        tasks_per_node=1,  # one launcher per node; it starts the per-GPU processes itself
        gpus_per_node=a.gpus_per_node,
        cpus_per_task=max(a.gpus_per_node, 1) * a.cpus_per_gpu,
        timeout_min=a.time,
    )
    if a.mem_gb:
        params["mem_gb"] = a.mem_gb
    if a.cluster == "slurm":
        if a.partition:
            params["slurm_partition"] = a.partition
        if a.account:
            params["slurm_account"] = a.account
        if extra:
            params["slurm_additional_parameters"] = extra
    elif extra or a.partition or a.account:
        print("warning: --partition/--account/--sbatch apply to SLURM only", file=sys.stderr)
    ex.update_parameters(**params)
    return ex


def stage_job(a: argparse.Namespace) -> StageJob:
    """The job for the parsed options (stage arguments after ``--``)."""
    rest = list(a.stage_args)
    if not rest:
        raise MCLDetError("no stage arguments; add -- --config-file FILE [KEY VALUE ...]")
    if "--resume" in rest or "--overwrite" in rest:
        raise MCLDetError(
            "submitted jobs always run with --auto-resume; drop --resume/--overwrite (to start "
            "over, choose a new OUTPUT_DIR)"
        )
    if a.nodes < 1 or a.gpus_per_node < 0 or a.time < 1:
        raise MCLDetError("--nodes and --time must be >= 1, --gpus-per-node >= 0")
    return StageJob(a.stage, rest, nodes=a.nodes, gpus_per_node=a.gpus_per_node)


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/submit.py``: submit one stage; print the job id (and the result with --wait)."""
    a = parse_args(argv)
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise MCLDetError("submitit is not installed; pip install submitit") from None
    fn = stage_job(a)  # argument errors before anything is submitted
    job = build_executor(a).submit(fn)
    print(f"submitted {a.stage} as job {job.job_id} (logs: {job.paths.stdout})", flush=True)
    if a.wait:
        try:
            job.result()
        except Exception as e:  # submitit re-raises the job's failure with its remote traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log = job.paths.stderr
            raise MCLDetError(f"job {job.job_id} failed: {first}; log: {log}") from None
        print(f"job {job.job_id} finished", flush=True)
    return 0
