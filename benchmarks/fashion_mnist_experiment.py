#!/usr/bin/env python
"""Fashion-MNIST MCL experiment (issue 7): supervised and self-supervised MCL x2 vs their
independent baselines, several seeds, kNN / top-1 per member, Faster R-CNN transfer to Fashion-MNIST
scenes, AP tables -> OUT/report.md. Resumable: run the same command again after an interruption.

    python benchmarks/fashion_mnist_experiment.py [--out DIR] [--fashion-dir D] [--seeds 0 1 2]
        [--per-class 0] [--pretrain-epochs 1] [--det-iters 150] [--jobs 2] [--keep-checkpoints] [--tiny]

Budget and the honest limits of the default size: see mcl_det/experiments/fashion.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcl_det.experiments.fashion import FashionSettings, tiny_settings  # noqa: E402
from mcl_det.utils.cli import run_main  # noqa: E402


def main() -> int:
    d = FashionSettings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=d.out, help="where every stage writes")
    ap.add_argument("--fashion-dir", type=Path, default=None, help="idx files (default: Debian's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    ap.add_argument(
        "--per-class",
        type=int,
        default=d.per_class,
        help="pretraining images per class (default 0 = all 6,000: the 60k set)",
    )
    ap.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    ap.add_argument("--det-iters", type=int, default=d.det_iters)
    ap.add_argument(
        "--jobs",
        type=int,
        default=d.jobs,
        help=f"stages run at once, the cores split between them (default {d.jobs}: on 2 cores two "
        "one-thread processes do 1.3-1.4x the work of one two-thread process)",
    )
    ap.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep pretraining checkpoints and detection model_final.pth (default: delete them "
        "once converted / evaluated; ~0.4 GB per run)",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="minimal sizes (tests); numbers mean nothing"
    )
    a = ap.parse_args()

    from mcl_det.experiments.fashion import run_fashion_experiment

    if a.tiny:
        s = tiny_settings(a.out, a.fashion_dir)
        s.keep_checkpoints, s.jobs = a.keep_checkpoints, a.jobs
    else:
        s = FashionSettings(
            out=a.out,
            fashion_dir=a.fashion_dir,
            seeds=tuple(a.seeds),
            per_class=a.per_class,
            pretrain_epochs=a.pretrain_epochs,
            det_iters=a.det_iters,
            keep_checkpoints=a.keep_checkpoints,
            jobs=a.jobs,
        )
    run_fashion_experiment(s)
    return 0


if __name__ == "__main__":
    run_main(main)
