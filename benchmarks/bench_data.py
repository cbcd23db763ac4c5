"""Input pipeline throughput: the PIL pipeline against the device pipeline, side by side.

CPU mode (default): on generated 500x375 JPEGs, one process, one torch thread, so images/s is
images/s per CPU core. Rounds interleave old, new, old, new ... (a shared machine's load drifts
hit both alike) and medians are reported:
- old: the whole MoCo v2 aug+ PIL chain, two views (DATA.PIPELINE pil: all of it in the workers);
- new CPU stage: decode + RandomResizedCrop + resize, uint8, two views (what a worker does);
- new whole pipeline on the CPU: the CPU stage plus the batched stage (augment_batch) run on the
  CPU, per image;
- PIL decode alone, for reference.
Targets: CPU stage >= 5x old; whole new pipeline on the CPU not slower than old.

Feed mode, ``--device cuda``: R50 x 2 MoCo v2, bf16 + channels_last, b128, 224 px, training
images/s of the pretraining Trainer (its config, DataLoader, DATA.PIPELINE device stage, cohort
training step, optimizer) with at most 16 workers reading generated 500x375 JPEGs from disk,
against the same training step fed synthetic views already on the device (target: real >= 90 %
of synthetic). ``--tiny`` runs the same code at smoke size (R18 x 2, b8, 64 px, 2 workers, a few
steps) on any device; the test suite runs it on the CPU.

Writes benchmarks/results/bench_data.json (feed mode: bench_data_feed.json; or --out), prints it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mcl_det.pretrain.augment import augment_batch, moco_recipe
from mcl_det.pretrain.data import (
    CropViews,
    SafeImageFolder,
    TwoCrops,
    moco_v2_transform,
)
from mcl_det.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"

# Feed mode: the measured setting, and a smoke size that runs the same code on a CPU in seconds.
FEED = {
    "full": dict(
        arch="resnet50", batch=128, size=224, queue=65536, warmup=10, steps=40, workers=16
    ),
    "tiny": dict(arch="resnet18", batch=8, size=64, queue=64, warmup=1, steps=2, workers=2),
}


def _write_jpeg(job: tuple[Path, int, int]) -> None:
    path, seed, i = job
    rng = np.random.default_rng([seed, i])  # per image: any number of processes, same files
    low = rng.random((6, 8, 3)) * 255
    img = Image.fromarray(low.astype(np.uint8)).resize((500, 375), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (375, 500, 3))
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(root: Path, n: int, classes: int = 4, seed: int = 0, procs: int = 1) -> Path:
    """n 500x375 JPEGs (quality 90) of smooth colour fields with texture, like photographs."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"class{i % classes}" / f"{i:05d}.jpg", seed, i) for i in range(n)]
    if procs > 1:
        with ProcessPoolExecutor(procs) as pool:
            list(pool.map(_write_jpeg, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_jpeg(job)
    return root


def _decode_pass(ds: SafeImageFolder) -> float:
    t = time.perf_counter()
    for path, _ in ds.samples:
        with Image.open(path) as im:
            im.convert("RGB")
    return time.perf_counter() - t


def _old_pass(ds: SafeImageFolder, epoch: int) -> float:
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[(i, epoch)]
    return time.perf_counter() - t


def _new_pass(ds: SafeImageFolder, epoch: int, recipe, batch: int) -> tuple[float, float]:
    """(CPU stage seconds, batched stage seconds) for the whole folder."""
    t = time.perf_counter()
    items = [ds[(i, epoch)][0] for i in range(len(ds))]
    t_cpu = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        for v in range(2):
            x = torch.stack([it[v][0] for it in chunk])
            p = {k: torch.stack([it[v][1][k] for it in chunk]) for k in chunk[0][v][1]}
            augment_batch(x, p, recipe)
    return t_cpu, time.perf_counter() - t


def bench_cpu(args) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else make_jpegs(Path(tmp), args.images)
        recipe = moco_recipe("aug+", args.size)
        old = SafeImageFolder(root, TwoCrops(moco_v2_transform(args.size)), seed=0, scan=False)
        new = SafeImageFolder(root, CropViews(recipe), seed=0, scan=False)
        n = len(old)
        _old_pass(old, 0), _new_pass(new, 0, recipe, args.batch)  # warm-up (page cache, imports)
        rows = {"old": [], "new_cpu_stage": [], "new_batched_stage": [], "new_whole": [], "dec": []}
        for r in range(args.rounds):
            rows["old"].append(n / _old_pass(old, r + 1))
            t_cpu, t_dev = _new_pass(new, r + 1, recipe, args.batch)
            rows["new_cpu_stage"].append(n / t_cpu)
            rows["new_batched_stage"].append(n / t_dev)
            rows["new_whole"].append(n / (t_cpu + t_dev))
            rows["dec"].append(n / _decode_pass(old))
    med = {k: round(statistics.median(v), 1) for k, v in rows.items()}
    return {
        "mode": "cpu",
        "images": n,
        "image_size": "500x375 JPEG q90",
        "crop": args.size,
        "batch": args.batch,
        "rounds": args.rounds,
        "unit": "images/s per CPU core (two views per image), median of interleaved rounds",
        "old_pil_pipeline": med["old"],
        "new_cpu_stage": med["new_cpu_stage"],
        "new_batched_stage_on_cpu": med["new_batched_stage"],
        "new_whole_pipeline_on_cpu": med["new_whole"],
        "pil_decode_only": med["dec"],
        "cpu_stage_speedup": round(med["new_cpu_stage"] / med["old"], 2),
        "whole_on_cpu_speedup": round(med["new_whole"] / med["old"], 2),
        "targets": {"cpu_stage_speedup": ">= 5", "whole_on_cpu_speedup": ">= 1"},
        "per_round": {k: [round(x, 1) for x in v] for k, v in rows.items()},
        "torch_threads": 1,
        "cpu_count": os.cpu_count(),
    }


def _loader_batches(trainer) -> Iterator:
    """The run's loader batches, epoch after epoch, as ``Trainer.train`` iterates them."""
    for epoch in itertools.count():
        trainer.sampler.set_epoch(epoch)
        yield from trainer.loader


def _timed_steps(trainer, batches: Iterator, s: dict, device_stage: bool) -> tuple[float, float]:
    """(seconds of the timed steps, seconds of them spent waiting for the next batch), to the
    microsecond: the rates in the JSON are computed from these stored values."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(s["warmup"]):
        trainer.train_step(next(batches), device_stage)
    sync()
    t0, wait = time.perf_counter(), 0.0
    for _ in range(s["steps"]):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        trainer.train_step(batch, device_stage)
    sync()
    return round(time.perf_counter() - t0, 6), round(wait, 6)


def _device_stage_ms(trainer, batches: Iterator, n: int) -> tuple[float, list[dict]]:
    """Median time of the device stage alone (copy + batched augmentation) on ``n`` batches: the
    part of the real-input step the synthetic one skips; and, on a GPU, the profiler's top
    kernels of one more call (where that time goes)."""
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for _ in range(n):
        batch = next(batches)
        sync()
        t = time.perf_counter()
        trainer.pipeline.device_stage(batch)
        sync()
        times.append((time.perf_counter() - t) * 1000)
    top: list[dict] = []
    if cuda:
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        batch = next(batches)
        with torch.profiler.profile(activities=acts) as prof:
            trainer.pipeline.device_stage(batch)
            sync()
        rows = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
        top = [
            {"op": e.key, "calls": e.count, "cuda_ms": round(e.self_device_time_total / 1000, 3)}
            for e in rows[:10]
        ]
    return statistics.median(times), top


def bench_feed(args) -> dict:
    """Real JPEGs through the run's loader and device stage vs synthetic views fed straight to
    the same training step, one Trainer for both."""
    from mcl_det.pretrain.config import setup_pretrain_cfg
    from mcl_det.pretrain.engine import Trainer

    s = dict(FEED["tiny" if args.tiny else "full"])
    s.update({k: getattr(args, k) for k in s if getattr(args, k, None) is not None})
    s["workers"] = max(1, min(s["workers"], 16, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:  # one epoch's worth: no worker restarts inside the timed steps
            n = s["batch"] * (s["warmup"] + s["steps"])
            make_jpegs(root / "train", n, procs=s["workers"])
        opts = {
            "DEVICE": args.device,
            "DATA.ROOT": str(root),
            "DATA.PIPELINE": "device",
            "DATA.NUM_WORKERS": str(s["workers"]),
            "DATA.IMAGE_SIZE": str(s["size"]),
            "DATA.SCAN_IMAGES": "False",
            "MODEL.ARCH": s["arch"],
            "MODEL.QUEUE_SIZE": str(s["queue"]),
            "MODEL.CHANNELS_LAST": "True",
            "SOLVER.IMS_PER_BATCH": str(s["batch"]),
            "SOLVER.AMP": "bf16",
            "MONITOR.EVAL_PERIOD": "0",
            "MONITOR.TENSORBOARD": "False",
            "MONITOR.PROGRESS": "False",
            "OUTPUT_DIR": str(Path(tmp) / "out"),
        }
        cfg = setup_pretrain_cfg(None, [x for kv in opts.items() for x in kv], cohort=2)
        trainer = Trainer(cfg)
        trainer.model.train()
        # what the device stage hands the step: two normalised float views on the device
        views = tuple(
            torch.randn(s["batch"], 3, s["size"], s["size"], device=trainer.device)
            for _ in range(2)
        )
        synthetic_s, _ = _timed_steps(trainer, itertools.repeat((views, None, None)), s, False)
        batches = _loader_batches(trainer)
        real_s, wait = _timed_steps(trainer, batches, s, True)
        stage_ms, stage_top = _device_stage_ms(trainer, batches, s["warmup"] + 2)
        batches.close()  # stops the workers before their folder goes
    dev = trainer.device
    images = s["steps"] * s["batch"]  # per timed run, each
    real, synthetic = images / real_s, images / synthetic_s
    return {
        "mode": "feed",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "model": f"2 x {s['arch']} MoCo v2, bf16 autocast, channels_last",
        "pipeline": trainer.pipeline.kind,
        "batch": s["batch"],
        "image_size": s["size"],
        "queue": s["queue"],
        "workers": s["workers"],
        "cpu_count": os.cpu_count(),
        "warmup_steps": s["warmup"],
        "timed_steps": s["steps"],
        "jpegs": "500x375 q90, generated, read from disk" if not args.data else args.data,
        "timed_images": images,
        "real_jpegs_timed_s": real_s,
        "synthetic_timed_s": synthetic_s,
        "real_jpegs_images_per_s": round(real, 1),
        "synthetic_images_per_s": round(synthetic, 1),
        "real_over_synthetic": round(real / synthetic, 3),
        "real_data_wait_s": round(wait, 3),
        "device_stage_ms_per_batch": round(stage_ms, 2),
        "device_stage_top_cuda_ops": stage_top,
        "target": ">= 0.9",
        "meets_target": real / synthetic >= 0.9,
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: feed mode")
    ap.add_argument("--tiny", action="store_true", help="feed mode at smoke size, on --device")
    ap.add_argument("--images", type=int, default=64, help="generated JPEGs (per-core mode)")
    ap.add_argument("--data", default="", help="an existing ImageFolder instead of generated JPEGs")
    ap.add_argument("--rounds", type=int, default=5, help="per-core mode: interleaved rounds")
    ap.add_argument("--size", type=int, help="crop size (default 224; tiny feed: 64)")
    ap.add_argument("--batch", type=int, help="batch (default 32 per-core, 128 feed, 8 tiny)")
    ap.add_argument("--arch", help="feed mode: the members' ResNet")
    ap.add_argument("--workers", type=int, help="feed mode: DataLoader workers (at most 16)")
    ap.add_argument("--warmup", type=int, help="feed mode: untimed steps first")
    ap.add_argument("--steps", type=int, help="feed mode: timed steps")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    feed = args.device == "cuda" or args.tiny
    if feed:
        result = bench_feed(args)
    else:
        args.size, args.batch = args.size or 224, args.batch or 32
        result = bench_cpu(args)
    out = args.out or RESULTS / ("bench_data_feed.json" if feed else "bench_data.json")
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
