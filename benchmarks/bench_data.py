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

``--device cuda`` (needs a GPU; not run by the test suite): R50 x 2 MoCo v2 bf16 training images/s
with the device pipeline fed by DataLoader workers reading real JPEGs from disk, against the same
steps fed one synthetic batch already in memory (target: real >= 90% of synthetic).

Writes benchmarks/results/bench_data.json (or --out) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcl_det.pretrain.augment import augment_batch, moco_recipe  # noqa: E402
from mcl_det.pretrain.data import (  # noqa: E402
    CropViews,
    SafeImageFolder,
    TwoCrops,
    moco_v2_transform,
)
from mcl_det.utils.io import atomic_write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_data.json"


def make_jpegs(root: Path, n: int, classes: int = 4, seed: int = 0) -> Path:
    """n 500x375 JPEGs (quality 90) of smooth colour fields with texture, like photographs."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.random((6, 8, 3)) * 255
        img = Image.fromarray(low.astype(np.uint8)).resize((500, 375), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (375, 500, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
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


def bench_cuda(args) -> dict:  # pragma: no cover - needs a GPU
    """Real JPEGs through DataLoader workers vs one synthetic batch, same training steps."""
    from mcl_det.pretrain.config import setup_pretrain_cfg
    from mcl_det.pretrain.engine import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        n_img = args.batch * (args.warmup + args.steps + 1)
        root = Path(args.data) if args.data else make_jpegs(Path(tmp) / "train", n_img)
        root = root.parent if root.name == "train" else root
        opts = {
            "DATA.ROOT": str(root),
            "DATA.PIPELINE": "device",
            "DATA.NUM_WORKERS": str(args.workers),
            "DATA.SCAN_IMAGES": "False",
            "MODEL.ARCH": "resnet50",
            "MODEL.CHANNELS_LAST": "True",
            "SOLVER.IMS_PER_BATCH": str(args.batch),
            "SOLVER.AMP": "bf16",
            "MONITOR.EVAL_PERIOD": "0",
            "MONITOR.TENSORBOARD": "False",
            "MONITOR.PROGRESS": "False",
            "OUTPUT_DIR": str(Path(tmp) / "out"),
        }
        cfg = setup_pretrain_cfg(None, [x for kv in opts.items() for x in kv], cohort=2)
        trainer = Trainer(cfg)
        trainer.model.train()

        def step(batch) -> None:
            loss, _, extra = trainer.step_selfsup(batch)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            trainer.after_step(extra)

        def timed(batches) -> float:
            t = None
            for k, b in enumerate(batches):
                if k == args.warmup:
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                step(b)
                if k + 1 == args.warmup + args.steps:
                    break
            torch.cuda.synchronize()
            return args.steps * args.batch / (time.perf_counter() - t)

        trainer.sampler.set_epoch(0)
        real = timed(iter(trainer.loader))
        first = next(iter(trainer.loader))
        synthetic = timed(first for _ in range(args.warmup + args.steps))
    return {
        "mode": "cuda",
        "device": torch.cuda.get_device_name(),
        "model": "2 x resnet50 MoCo v2, bf16, channels_last",
        "batch": args.batch,
        "workers": args.workers,
        "real_jpegs_images_per_s": round(real, 1),
        "synthetic_images_per_s": round(synthetic, 1),
        "real_over_synthetic": round(real / synthetic, 3),
        "target": ">= 0.9",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--images", type=int, default=64, help="generated JPEGs (CPU mode)")
    ap.add_argument("--data", default="", help="an existing ImageFolder instead of generated JPEGs")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32, help="batched stage batch (CPU), 256 (cuda)")
    ap.add_argument("--workers", type=int, default=16, help="cuda mode: DataLoader workers")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.device == "cuda":
        if args.batch == 32:
            args.batch = 256
        result = bench_cuda(args)
    else:
        result = bench_cpu(args)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
