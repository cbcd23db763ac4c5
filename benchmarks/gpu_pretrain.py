"""Self-supervised MCL throughput on one GPU: R50 x 2, bf16 + channels_last, synthetic data.

The full training step of the engine (momentum update, shuffle-BN keys, the M x M cohort logits
against K = 65536 queues, the four terms in fp32, SGD, lockstep enqueue) on random tensors, so the
number measures the model and not the disk. Prints JSON (images/s, step time, peak memory) and
writes benchmarks/results/gpu_pretrain.json. Sized to finish well under 5 minutes on an H100;
on CPU run it tiny, e.g. ``--device cpu --arch resnet18 --batch 4 --size 32 --queue 64 --iters 2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mcl_det.pretrain.models import SelfSupCohort

WEIGHTS = {"vcl": 1.0, "icl": 1.0, "soft_vcl": 1.0, "soft_icl": 1.0}


def _vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--cohort", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="per-GPU batch")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--splits", type=int, default=1, help="single-GPU shuffle-BN groups")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_pretrain.json"))
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    archs = [args.arch] * args.cohort
    cohort = SelfSupCohort(archs, queue_size=args.queue, bn_splits=args.splits, weights=WEIGHTS)
    cohort = cohort.to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    cohort = cohort.to(memory_format=fmt)
    model = torch.compile(cohort) if args.compile else cohort
    opt = torch.optim.SGD(
        [p for p in cohort.parameters() if p.requires_grad],
        lr=0.03,
        momentum=0.9,
        weight_decay=1e-4,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    x = torch.randn(2, args.batch, 3, args.size, args.size, device=device)
    xq = x[0].contiguous(memory_format=fmt)
    xk = x[1].contiguous(memory_format=fmt)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def forward(*images):  # as the Trainer's: the (compiled) cohort under autocast
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(*images)

    if cuda:
        torch.cuda.reset_peak_memory_stats()

    times, loss = [], None
    t_all = time.perf_counter()
    for i in range(args.warmup + args.iters):
        t = time.perf_counter()
        step = cohort.training_step(forward, ((xq, xk), None, None))
        loss = step.loss
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        cohort.after_step(step.state)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "arch": args.arch,
        "cohort": args.cohort,
        "batch": args.batch,
        "size": args.size,
        "queue": args.queue,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "iters": args.iters,
        "step_s_median": step,
        "images_per_s": args.batch / step,
        "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if cuda else None,
        "peak_rss_gib": (_vm_hwm_mib() or 0) / 1024,
        "final_loss": float(loss.detach()),
        "wall_s": time.perf_counter() - t_all,
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
