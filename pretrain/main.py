"""MCL cohort pretraining: ``python pretrain/main.py [--config-file F] [--cohort N] [KEY VALUE]``.

Without --config-file the toy config (pretrain/configs/toy.yaml) is used: it generates a toy
ImageFolder under datasets/toy/imagenet and trains 2 x ResNet-18 for a few iterations on CPU.
Several processes: ``--num-gpus N`` on one machine, or ``torchrun --nproc_per_node N ...``.

An OUTPUT_DIR holding another run is refused unless --resume, --auto-resume or --overwrite;
SIGTERM/SIGUSR1 stop after the current iteration with a checkpoint and exit code 75.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcl_det.pretrain.engine import launch_training  # noqa: E402
from mcl_det.utils.cli import run_main  # noqa: E402
from mcl_det.utils.errors import MCLDetError  # noqa: E402

TOY = Path(__file__).resolve().parent / "configs" / "toy.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=None, help=f"yacs YAML (default: {TOY.name})")
    p.add_argument("--cohort", type=int, default=None, help="number of members M (MODEL.COHORT)")
    p.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint_last.pth"
    )
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue if OUTPUT_DIR holds this run's checkpoint, else start (requeued jobs)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="OUTPUT_DIR holds an earlier run: delete its outputs and start afresh",
    )
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision")
    p.add_argument(
        "--num-gpus", type=int, default=1, help="processes on this machine (gloo on CPU)"
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    a = p.parse_args()
    chosen = [f for f in ("resume", "auto_resume", "overwrite") if getattr(a, f)]
    if len(chosen) > 1:
        flags = " and ".join("--" + f.replace("_", "-") for f in chosen)
        raise MCLDetError(f"{flags} contradict each other; pass one of them")
    mode = {"resume": "resume", "auto_resume": "auto", "overwrite": "overwrite"}.get(
        chosen[0] if chosen else "", "new"
    )
    summary = launch_training(a.config_file or str(TOY), a.opts, a.cohort, a.amp, mode, a.num_gpus)
    if summary:
        print(f"done: {summary}")
    return 0


if __name__ == "__main__":
    run_main(main)
