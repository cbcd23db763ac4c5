"""``tools/submit.py``: submit pretraining or detection to SLURM with submitit (requeued and
resumed on preemption); the job itself is ``mcl_det.submit.StageJob``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..submit import RESUMABLE, StageJob
from ..utils.errors import MCLDetError
from .run import run_main

if TYPE_CHECKING:  # imported where it is used: the commands import without submitit
    import submitit


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
        choices=sorted(RESUMABLE),
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


if __name__ == "__main__":
    run_main(main)
