#!/usr/bin/env python
"""End-to-end demo on toy data: MCL x2 vs baseline pretraining -> detectron2 transfer -> AP table.

toy data -> MCL x2 pretraining -> the same cohort with the interaction terms off (baseline) ->
convert member 0 of each -> fine-tune Faster R-CNN on toy VOC from each -> AP table.

Each stage runs the user-facing command in a subprocess (tools/stages.py) and is skipped when its
output exists, so an interrupted demo resumes. The pretraining checkpoints are kept; a fine-tuned
detector's model_final.pth is deleted once its results.json is written (--keep-checkpoints keeps
it), since the report reads only results.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stages import ROOT, Stages  # first: it puts the checkout on sys.path

from mcl_det.cli.run import run_main

# tag -> pretraining config; "baseline" is the same cohort with every interaction weight at 0
COHORTS = {"mcl": "pretrain/configs/toy.yaml", "baseline": "pretrain/configs/toy_baseline.yaml"}
DET_CONFIG = "detection_configs/toy_voc_faster_rcnn_r18_fpn.yaml"


def run_demo(a: argparse.Namespace) -> Path:
    """Run (or resume) every stage; returns the path of the markdown report."""
    t_start = time.time()
    out, data = a.output, a.data
    n_stages = 2 + len(COHORTS) * (2 + len(a.seeds))
    st = Stages(n_stages, env={"DETECTRON2_DATASETS": str(data)})
    make_data = [sys.executable, "tools/make_toy_data.py", "--root", str(data)]
    st.run("toy data", make_data, done=(data / "VOC2007", data / "imagenet"))
    weights = {}
    for tag, cfg in COHORTS.items():
        pre, opts = out / f"pretrain_{tag}", ["SOLVER.EPOCHS", str(a.pretrain_epochs)]
        name = f"pretrain {tag} (cohort of 2)"
        ckpt = st.pretrain(name, cfg, pre, data / "imagenet", opts, cohort=2)
        w = out / "weights" / f"{tag}_member0.pkl"
        weights[tag] = st.convert(f"convert {tag} member 0", ckpt, w)
    for tag, w in weights.items():
        for seed in a.seeds:
            det, opts = out / f"det_{tag}" / f"seed{seed}", ["SOLVER.MAX_ITER", str(a.det_iters)]
            name = f"fine-tune Faster R-CNN on toy VOC from {tag} member 0 (seed {seed})"
            st.detect(name, DET_CONFIG, w, tag, seed, det, opts, keep_weights=a.keep_checkpoints)
    runs = [out / f"{stage}_{tag}" for stage in ("det", "pretrain") for tag in COHORTS]
    report = st.report("report", runs, "baseline", out / "report.md")
    print(report.read_text())
    print(f"demo finished in {time.time() - t_start:.0f} s; report: {report}")
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--output", type=Path, default=ROOT / "output" / "demo", help="where every stage writes"
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=ROOT / "datasets" / "toy",
        help="toy datasets root (made if missing)",
    )
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--det-iters", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each fine-tuned detector's model_final.pth (default: deleted once its "
        "results.json is written; the pretraining checkpoints are always kept)",
    )
    run_demo(ap.parse_args())
    return 0


if __name__ == "__main__":
    run_main(main)
