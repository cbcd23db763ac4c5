#!/usr/bin/env python
"""End-to-end demo on toy data: MCL x2 vs baseline pretraining -> detectron2 transfer -> AP table."""

import argparse
from pathlib import Path

from mcl_det.demo import DemoSettings, run_demo
from mcl_det.utils.cli import run_main


def main() -> int:
    d = DemoSettings()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=d.output, help="where every stage writes")
    ap.add_argument("--data", type=Path, default=d.data, help="toy datasets root (made if missing)")
    ap.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    ap.add_argument("--det-iters", type=int, default=d.det_iters)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    ap.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each fine-tuned detector's model_final.pth (default: deleted once its "
        "results.json is written; the pretraining checkpoints are always kept)",
    )
    a = ap.parse_args()
    run_demo(
        DemoSettings(
            output=a.output,
            data=a.data,
            pretrain_epochs=a.pretrain_epochs,
            det_iters=a.det_iters,
            seeds=tuple(a.seeds),
            keep_checkpoints=a.keep_checkpoints,
        )
    )
    return 0


if __name__ == "__main__":
    run_main(main)
