"""Fine-tune + evaluate a detector with detectron2 (VOC Faster R-CNN, COCO Mask R-CNN).

    python tools/train_net.py --config-file detection_configs/voc_faster_rcnn_mcl.yaml \
        [--num-gpus N] [--resume] [--eval-only] [--trials N] [--unsafe-load] [KEY VALUE ...]

--unsafe-load: read MODEL.WEIGHTS even when it needs full unpickling (can run code: only for
files you trust).

Writes OUTPUT_DIR/{config.yaml, results.json, metrics.json, model_final.pth, events.*}.
The training itself is ``mcl_det.detection.train`` (``run_one``); this module is the command.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from collections.abc import Sequence
from datetime import timedelta

import torch
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import same_run_check
from ..detection.checkpoint import UNSAFE_LOAD_FLAG
from ..detection.config import DIST_TIMEOUT_KEY, config_digest
from ..detection.datasets import prepare_datasets
from ..detection.train import (
    RUN_CHECKPOINTS,
    RUN_OUTPUTS,
    check_weights,
    run_one,
    setup_cfg,
    trial_cfgs,
)
from ..utils import preempt
from ..utils.elastic import prepare_collectives
from ..utils.errors import MCLDetError
from .run import add_run_mode_flags, claim_output_dir, launch, run_main, run_mode

logger = logging.getLogger("mcl_det.detection")


def build_parser() -> argparse.ArgumentParser:
    """detectron2's parser (--config-file, --num-gpus, --resume, --eval-only, ...) + --trials,
    --overwrite, --auto-resume, --exact-resume."""
    p = default_argument_parser(
        epilog="Trailing KEY VALUE pairs override the config, e.g. SOLVER.MAX_ITER 200. "
        "IMS_PER_BATCH is the total batch over all GPUs. SIGTERM/SIGUSR1 stop after the current "
        "iteration with a checkpoint and exit code 75 (requeue); --auto-resume continues."
    )
    p.add_argument(
        "--trials",
        type=int,
        default=0,
        help="run N seeds (0..N-1) of this config into OUTPUT_DIR/seed{K} (or set MCL_DET.SEEDS)",
    )
    p.add_argument(
        UNSAFE_LOAD_FLAG,
        action="store_true",
        help="load MODEL.WEIGHTS / checkpoints that need more than arrays and plain containers "
        "(full unpickling can run code: only for files you trust)",
    )
    add_run_mode_flags(p, resume_help=None)  # detectron2's parser has its --resume
    p.add_argument(
        "--exact-resume",
        action="store_true",
        help="on resume, replay the data loader to the checkpoint so the run continues "
        "bit-exactly on CPU (costs the data loading of the done iterations)",
    )
    return p


def _finished(cfg: CfgNode) -> dict | None:
    """The results.json of a trial that already ran to the end of this schedule, else None."""
    try:
        res = json.loads(open(os.path.join(cfg.OUTPUT_DIR, "results.json")).read())
    except (OSError, ValueError):
        return None
    done = res.get("finished") and res.get("iteration", -1) >= cfg.SOLVER.MAX_ITER
    return res if done and res.get("config_digest") == config_digest(cfg) else None


def worker(args: argparse.Namespace) -> list[dict]:
    """Per-process body (in this process, or in each process detectron2's ``launch`` starts):
    all trials, one after another."""
    cfg = setup_cfg(args.config_file, args.opts, cpu=args.num_gpus == 0)
    default_setup(cfg, args)  # fvcore/detectron2 loggers, environment, config.yaml, seeding
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mcl_det")
    out = []
    with preempt.handle_preemption():
        for c in trial_cfgs(cfg, args.trials):
            done = _finished(c) if args.resume and not args.eval_only else None
            if done is not None:  # a requeued --trials job: keep the trials already done
                logger.info("%s already finished: results.json kept", c.OUTPUT_DIR)
                out.append(done)
                continue
            out.append(run_one(c, args.resume, args.eval_only, args.exact_resume, args.unsafe_load))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/train_net.py``: parse, validate the config and OUTPUT_DIR once here, launch the
    workers (the OUTPUT_DIR lock is held by this process until they are done)."""
    args = build_parser().parse_args(argv)
    if args.trials < 0:
        raise MCLDetError("--trials must be >= 0")
    mode = run_mode(args)
    if args.eval_only and mode != "overwrite":
        mode = "resume"  # --eval-only evaluates into the folder of the run it evaluates
    n_cuda = torch.cuda.device_count()
    if args.num_gpus > 1 and n_cuda < args.num_gpus:
        raise MCLDetError(
            f"--num-gpus {args.num_gpus} but {n_cuda} CUDA device(s) visible; lower --num-gpus"
        )
    # Validate config, output folder and datasets before spawning anything: errors stay one line
    # in the parent, and nothing expensive runs into a folder that cannot be written.
    world = max(args.num_gpus, 1) * args.num_machines
    cfg = setup_cfg(args.config_file, args.opts, world_size=world, cpu=args.num_gpus == 0)
    with claim_output_dir(  # the other machines write into the same (shared) folder
        cfg.OUTPUT_DIR,
        mode,
        RUN_OUTPUTS,
        owner=args.machine_rank == 0,
        checkpoints=RUN_CHECKPOINTS,
        keep=[cfg.MODEL.WEIGHTS] if "://" not in cfg.MODEL.WEIGHTS else [],
        run_differs=same_run_check(
            trial_cfgs(cfg, args.trials), ("SEED", "OUTPUT_DIR", DIST_TIMEOUT_KEY)
        ),
    ) as run:
        args.resume = run.resume
        prepare_datasets(cfg)
        check_weights(cfg, args.unsafe_load)
        nprocs = args.num_gpus if n_cuda else 1
        if nprocs * args.num_machines == 1:
            worker(args)
            return 0
        if cfg.MCL_DET.DIST_TIMEOUT_S <= 0:
            raise MCLDetError(
                f"MCL_DET.DIST_TIMEOUT_S must be > 0 seconds, got {cfg.MCL_DET.DIST_TIMEOUT_S}"
            )
        prepare_collectives()  # inherited by the workers: a failed collective ends the process
        spawn = functools.partial(  # detectron2's: its comm and per-machine process groups
            d2_launch,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            timeout=timedelta(seconds=cfg.MCL_DET.DIST_TIMEOUT_S),
        )
        first = args.machine_rank * nprocs
        launch(spawn, worker, nprocs, (args,), output_dir=cfg.OUTPUT_DIR, first_rank=first)
    return 0


if __name__ == "__main__":
    run_main(main)
