"""MCL cohort pretraining: ``python pretrain/main.py [--config-file F] [--cohort N] [KEY VALUE]``.

Without --config-file the toy config (pretrain/configs/toy.yaml) is used: it generates a toy
ImageFolder under datasets/toy/imagenet and trains 2 x ResNet-18 for a few iterations on CPU.
Several processes: ``--num-gpus N`` on one machine, or ``torchrun --nproc_per_node N ...``;
``torchrun --max-restarts K`` restarts a group that lost a worker, which continues from the last
complete checkpoint (``--auto-resume``'s rules). A dead worker under ``--num-gpus`` stops the
others and the command (one ``error:`` line naming its rank); ``--auto-resume`` continues.

An OUTPUT_DIR holding another run is refused unless --resume, --auto-resume or --overwrite;
SIGTERM/SIGUSR1 stop after the current iteration with a checkpoint and exit code 75.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from ..config import same_run_check
from ..pretrain import distributed as du
from ..pretrain.config import TIMEOUT_KEY, setup_pretrain_cfg
from ..pretrain.engine import RUN_CHECKPOINTS, RUN_OUTPUTS, train
from ..utils import preempt
from ..utils.errors import MCLDetError
from .run import add_run_mode_flags, claim_output_dir, launch, run_main, run_mode

# the repository's toy config, found from a checkout (or an editable install of one)
TOY = Path(__file__).resolve().parents[2] / "pretrain" / "configs" / "toy.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=None, help=f"yacs YAML (default: {TOY.name})")
    p.add_argument("--cohort", type=int, default=None, help="number of members M (MODEL.COHORT)")
    add_run_mode_flags(p, resume_help="continue from OUTPUT_DIR/checkpoint_last.pth")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision")
    p.add_argument(
        "--num-gpus", type=int, default=1, help="processes on this machine (gloo on CPU)"
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def default_config() -> str:
    """The toy config, which ships with the repository, not with an installed package."""
    if not TOY.is_file():
        raise MCLDetError(
            f"no --config-file given and the default toy config {TOY} is not there (it comes "
            "with the repository checkout, not with an installed mcl_det); pass --config-file"
        )
    return str(TOY)


def train_here(cfg: CfgNode, resume: bool) -> dict[str, Any]:
    """Train in this process, SIGTERM/SIGUSR1 stopping after an iteration with a checkpoint."""
    try:
        with preempt.handle_preemption():
            return train(cfg, resume)
    finally:
        du.cleanup_distributed()


def _train_worker(cfg_yaml: str, resume: bool) -> None:
    """Body of one ``--num-gpus`` worker process (``mcl_det.cli.run.worker_main`` around it)."""
    cfg = CfgNode.load_cfg(cfg_yaml)
    cfg.freeze()
    train_here(cfg, resume)


def launch_training(
    config_file: str | None,
    opts: list[str] | None = None,
    cohort: int | None = None,
    amp: str | None = None,
    mode: str = "new",
    num_procs: int = 1,
) -> dict[str, Any] | None:
    """Resolve the config, take OUTPUT_DIR (errors surface before anything starts) and train in
    1..N processes.

    ``mode`` (``mcl_det.utils.rundir.RUN_MODES``): ``new`` refuses an OUTPUT_DIR holding another
    run, ``resume`` continues it, ``auto`` continues this run's checkpoint if there is one (else
    starts), ``overwrite`` deletes the earlier run's outputs first. Under torchrun every rank
    calls this; rank 0 holds the folder and its decision is broadcast in the Trainer.
    Returns the run summary in a single process (None when several processes were spawned).
    """
    cfg = setup_pretrain_cfg(config_file, opts, cohort, amp)
    with claim_output_dir(
        cfg.OUTPUT_DIR,
        mode,
        RUN_OUTPUTS,
        owner=int(os.environ.get("RANK", "0")) == 0,
        checkpoints=RUN_CHECKPOINTS,
        run_differs=same_run_check([cfg], ("OUTPUT_DIR", TIMEOUT_KEY)),
    ) as run:
        if num_procs <= 1:
            return train_here(cfg, run.resume)
        args = (cfg.dump(), run.resume)
        launch(du.launch, _train_worker, num_procs, args, output_dir=cfg.OUTPUT_DIR)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    mode = run_mode(a)
    config_file = a.config_file or default_config()
    summary = launch_training(config_file, a.opts, a.cohort, a.amp, mode, a.num_gpus)
    if summary:
        print(f"done: {summary}")
    return 0


if __name__ == "__main__":
    run_main(main)
