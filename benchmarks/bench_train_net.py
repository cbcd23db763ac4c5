#!/usr/bin/env python
"""Training-loop overhead of mcl_det's Trainer vs detectron2's stock DefaultTrainer, and the CPU
cost of one iteration for each toy config.

    python benchmarks/bench_train_net.py [--iters 12] [--rounds 4] [--threads 1]

Both trainers run the same toy config on the same toy data in this one process, alternating
(stock, ours, ours, stock, ...) so that load on a shared machine hits both alike; the reported
ratio is ours/stock in iterations per second (median over rounds; >= 0.98 means no overhead).
Timing covers whole iterations *with* their hooks, from iteration --warmup to the start of the
last one (the final checkpoint write is outside). No evaluation is timed.
Writes benchmarks/results/bench_train_net.json and prints it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from detectron2.engine import DefaultTrainer, HookBase

from mcl_det.data.toy import make_toy_coco, make_toy_voc
from mcl_det.detection.datasets import prepare_datasets
from mcl_det.detection.train import Trainer, setup_cfg
from mcl_det.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "detection_configs"
TOY_CONFIGS = [
    "toy_voc_faster_rcnn_r18_fpn.yaml",
    "toy_voc_faster_rcnn_r18_c4.yaml",
    "toy_coco_mask_rcnn_r18_fpn.yaml",
]


class _Clock(HookBase):
    """Wall and CPU time at the start of every iteration."""

    def __init__(self):
        self.wall: dict[int, float] = {}
        self.cpu: dict[int, float] = {}

    def before_step(self):
        self.wall[self.trainer.iter] = time.perf_counter()
        self.cpu[self.trainer.iter] = time.process_time()


def _datasets(root: Path, config: str) -> list[str]:
    c = root / "coco"
    if "coco" in config:
        sets = [
            ["bench_coco_train", f"{c}/train2017", f"{c}/annotations/instances_train2017.json"],
            ["bench_coco_val", f"{c}/val2017", f"{c}/annotations/instances_val2017.json"],
        ]
        return ["MCL_DET.DATASETS.COCO", repr(sets), "DATASETS.TRAIN", "('bench_coco_train',)"]
    sets = [["bench_voc_trainval", str(root / "VOC2007"), "trainval"]]
    return ["MCL_DET.DATASETS.VOC", repr(sets), "DATASETS.TRAIN", "('bench_voc_trainval',)"]


def time_trainer(cls, config: str, root: Path, out: Path, iters: int, warmup: int) -> dict:
    opts = _datasets(root, config) + [
        *("DATASETS.TEST", "()", "SOLVER.MAX_ITER", str(iters)),
        *("SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.PRECISE_BN.ENABLED", "False"),
        *("OUTPUT_DIR", str(out), "SEED", "0"),
    ]
    cfg = setup_cfg(str(CONFIGS / config), opts, world_size=1)
    prepare_datasets(cfg)
    trainer = cls(cfg)
    trainer.resume_or_load(resume=False)
    clock = _Clock()
    trainer.register_hooks([clock])
    trainer.train()
    n = (iters - 1) - warmup
    return {
        "wall_s_per_iter": (clock.wall[iters - 1] - clock.wall[warmup]) / n,
        "cpu_s_per_iter": (clock.cpu[iters - 1] - clock.cpu[warmup]) / n,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: docs/BENCHMARKS.md)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_train_net.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("detectron2").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_net_"))
    make_toy_voc(tmp, years=("2007",), num_train=24, num_test=4, seed=0)
    make_toy_coco(tmp, num_train=24, num_val=4, seed=0)

    cfg0 = TOY_CONFIGS[0]
    stock, ours = [], []
    pair = [("stock", DefaultTrainer, stock), ("ours", Trainer, ours)]
    for r in range(args.rounds):
        # alternate who goes first: a systematic first/second-run effect cancels out
        for name, cls, acc in pair if r % 2 == 0 else pair[::-1]:
            gc.collect()
            t = time_trainer(cls, cfg0, tmp, tmp / f"{name}{r}", args.iters, args.warmup)
            acc.append(t)
            print(f"round {r} {name:5s}: {t}", flush=True)
    # (1/ours) / (1/stock): the iterations-per-second ratio, per round. Wall time is what the
    # target is about; CPU time (1 thread) is far less sensitive to other jobs on a shared host.
    ratios = [s["wall_s_per_iter"] / o["wall_s_per_iter"] for s, o in zip(stock, ours)]
    cpu_ratios = [s["cpu_s_per_iter"] / o["cpu_s_per_iter"] for s, o in zip(stock, ours)]
    per_config = {}
    for c in TOY_CONFIGS:
        per_config[c] = time_trainer(Trainer, c, tmp, tmp / f"cfg_{c}", args.iters, args.warmup)
        print(f"{c}: {per_config[c]}", flush=True)
    res = {
        "benchmark": "bench_train_net",
        "host_cpus": os.cpu_count(),
        "torch_threads": args.threads,
        "iters": args.iters,
        "warmup": args.warmup,
        "overhead": {
            "config": cfg0,
            "stock_per_round": stock,
            "ours_per_round": ours,
            "its_ratio_ours_over_stock_wall_per_round": ratios,
            "its_ratio_ours_over_stock_wall_median": statistics.median(ratios),
            "its_ratio_ours_over_stock_cpu_per_round": cpu_ratios,
            "its_ratio_ours_over_stock_cpu_median": statistics.median(cpu_ratios),
        },
        "toy_configs": per_config,
    }
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
