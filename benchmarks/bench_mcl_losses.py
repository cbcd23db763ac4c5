"""Cost of the four MCL terms against one ResNet-18 training step, measured side by side.

Target: all four terms at K=65536, M=2, N=32, C=128, forward + backward, < 5% of an R18 step at
batch 32: the step of ONE R18 MoCo v2 network as the engine runs it (the network the cohort is
compared with). A plain R18 SGD step (no key encoder, no queue) is timed too, as a stricter
denominator (ratio_vs_plain_r18). The loss is the library's (``losses.cohort_logits`` against one
MxKxC queue buffer, ``losses.mcl_loss_terms``, ``losses.combine``), as ``SelfSupCohort.loss``
runs it. On a GPU that cost is launch-bound (many small kernels), so besides milliseconds this
reports two machine-independent proxies: the aten ops that reach a backend (views excluded) in one
loss forward + backward, counted with a TorchDispatchMode on CPU, and the nodes of the loss's
autograd graph (host work per step on top of the kernels); with --device cuda also the CUDA
kernels/memcpys the profiler sees. Loss steps and network steps are interleaved so machine load
hits both alike; the ratios of medians (and of minima) are the numbers that matter.

    python benchmarks/bench_mcl_losses.py --threads 2              # CPU shared with other jobs
    python benchmarks/bench_mcl_losses.py --image-size 112 --rounds 3 --threads 1  # quicker
    python benchmarks/bench_mcl_losses.py --device cuda            # on a GPU
    python benchmarks/bench_mcl_losses.py --no-r18 --threads 1     # the loss alone

On an oversubscribed CPU, multi-threaded runs of the (short, many-op) loss step suffer far more
than the (long, conv-bound) R18 step and the ratio is meaningless; use --threads 1 there.
CPU timings also depend on glibc malloc: by default buffers over its mmap threshold (at most
32 MiB; the MxMxNx(1+K) logits are 32 MiB + 512 B at the default sizes) are returned to the OS on
free and page-faulted in again on every use. Pretraining raises the thresholds on CPU
(CPU_KEEP_FREED_MEMORY, mcl_det/utils/malloc.py) and so does this benchmark, unless
--no-keep-freed-memory; the JSON records the setting.

Writes benchmarks/results/mcl_losses.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from mcl_det.pretrain import losses as L
from mcl_det.pretrain.models import SelfSupCohort
from mcl_det.utils.io import atomic_write_json
from mcl_det.utils.malloc import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]

ALL = dict.fromkeys(L.TERMS, 1.0)
VCL_ONLY = {"vcl": 1.0, "icl": 0.0, "soft_vcl": 0.0, "soft_icl": 0.0}

# ops that dispatch but launch nothing (views are recognised by their schema)
NO_KERNEL_OPS = {"_unsafe_view", "detach", "alias", "empty", "empty_like", "empty_strided"}


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the backends (after autograd), views left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(m: int, n: int, c: int, k: int, device: torch.device):
    """Fixed per-member embeddings (M x NxC, queries with grad) and one MxKxC queue buffer."""
    g = torch.Generator().manual_seed(0)
    qs = [F.normalize(torch.randn(n, c, generator=g), dim=1).to(device) for _ in range(m)]
    ks = [F.normalize(torch.randn(n, c, generator=g), dim=1).to(device) for _ in range(m)]
    queue = F.normalize(torch.randn(m, k, c, generator=g), dim=2).to(device)
    return [q.requires_grad_() for q in qs], ks, queue


def loss_forward(inputs, tau: float, weights: dict[str, float]) -> Tensor:
    """The MCL loss (logits + terms + weighted sum) as SelfSupCohort.loss computes it."""
    qs, ks, queue = inputs
    needed = L.needed_terms(weights)
    q, k = torch.stack(qs), torch.stack(ks)  # MxNxC
    logits = L.cohort_logits(q, k, queue, tau, cross=L.needs_cross(needed))
    return L.combine(L.mcl_loss_terms(logits, T=3.0, needed=needed), weights)


def make_loss_step(
    inputs, tau: float, weights: dict[str, float], compiled: bool = False
) -> Callable[[], Tensor]:
    """One MCL loss forward + backward from fixed embeddings (the encoders are not included).
    ``compiled``: the loss through torch.compile (inductor fuses the element-wise kernels)."""
    forward = torch.compile(loss_forward) if compiled else loss_forward

    def step() -> Tensor:
        for q in inputs[0]:
            q.grad = None
        loss = forward(inputs, tau, weights)
        loss.backward()
        return loss.detach()

    return step


def make_r18_step(batch: int, size: int, device: torch.device) -> Callable[[], Tensor]:
    """One plain SGD step of torchvision's ResNet-18 (forward, CE, backward, update)."""
    model = torchvision.models.resnet18(num_classes=1000).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def make_moco_step(batch: int, size: int, queue: int, device: torch.device):
    """One MoCo v2 step of ONE R18 network, as the engine runs it (query forward + backward,
    momentum update, key forward, its own queue logits, SGD, enqueue): the network the cohort
    is compared with (cohort step <= 2.05 x this, the MCL terms < 5% of it)."""
    model = SelfSupCohort(["resnet18"], queue_size=queue, weights=VCL_ONLY).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03)
    views = [torch.randn(batch, 3, size, size, device=device) for _ in range(2)]  # x_q, x_k
    batch_ = (views, None, None)

    def step() -> Tensor:
        out = model.training_step(model, batch_)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.after_step(out.state)
        return out.loss.detach()

    return step


def count_ops(step: Callable[[], Tensor]) -> int:
    """aten ops of one loss forward + backward that reach a backend, views excluded.

    Machine-independent proxy for GPU launch overhead (each is one or a few kernels there):
    counted on CPU (a dispatch mode is thread-local and the CUDA backward runs in another
    thread), at a small K: the count does not depend on the sizes.
    """
    step()  # warm: caches, lazy init
    with _OpCounter() as counter:
        step()
    return sum(counter.ops.values())


def count_autograd_nodes(inputs, tau: float, weights: dict[str, float]) -> int:
    """Nodes of the loss's autograd graph (AccumulateGrad leaves included): each costs host
    time on every step in the forward (recording) and in the backward (running it)."""
    loss = loss_forward(inputs, tau, weights)
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def count_cuda_events(step: Callable[[], Tensor], device: torch.device) -> int:
    """CUDA kernels + memcpy/memset of one step, from torch.profiler (GPU only)."""
    step()
    torch.cuda.synchronize(device)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize(device)
    events = prof.events()
    on_device = sum(ev.device_type == torch.autograd.DeviceType.CUDA for ev in events)
    return on_device or sum(len(ev.kernels) for ev in events)  # older profilers: kernels per op


def timed(step: Callable[[], Tensor], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cohort", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (after warm-up)")
    p.add_argument("--loss-reps", type=int, default=5, help="loss steps per round (it is short)")
    p.add_argument("--no-r18", action="store_true", help="skip the R18 steps (the loss only)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: default); 1 is steadier on a CPU shared with other jobs",
    )
    p.add_argument(
        "--no-keep-freed-memory",
        dest="keep_freed_memory",
        action="store_false",
        help="CPU: leave glibc malloc as it is (pretraining raises its thresholds by default)",
    )
    p.add_argument(
        "--compile", action="store_true", help="also time the four terms through torch.compile"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mcl_losses.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    kept = device.type == "cpu" and args.keep_freed_memory and keep_freed_memory()

    inputs = make_inputs(args.cohort, args.batch, args.dim, args.queue, device)
    weights_of = {"all": ALL, "vcl_only": VCL_ONLY}
    steps = {name: make_loss_step(inputs, 0.2, w) for name, w in weights_of.items()}
    if args.compile:
        steps["all_compiled"] = make_loss_step(inputs, 0.2, ALL, compiled=True)
    small = make_inputs(args.cohort, args.batch, args.dim, 512, torch.device("cpu"))
    ops = {
        name: {
            "aten_ops": count_ops(make_loss_step(small, 0.2, w)),
            "autograd_nodes": count_autograd_nodes(small, 0.2, w),
        }
        for name, w in weights_of.items()
    }
    if device.type == "cuda":
        for name, step in steps.items():
            ops.setdefault(name, {})["cuda_events"] = count_cuda_events(step, device)
    # the denominators: one R18 MoCo step (the target's) and a plain R18 SGD step (stricter)
    nets = {}
    if not args.no_r18:
        nets = {
            "moco": make_moco_step(args.batch, args.image_size, args.queue, device),
            "plain": make_r18_step(args.batch, args.image_size, device),
        }
    for _ in range(2):  # warm-up: allocator, kernels, thread pools
        for step in (*steps.values(), *nets.values()):
            step()

    ms: dict[str, list[float]] = {name: [] for name in steps}
    net_ms: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.rounds):  # alternate so every variant sees the same machine load
        for name, step in nets.items():
            net_ms[name].append(timed(step, device))
        for _ in range(args.loss_reps):
            for name, step in steps.items():
                ms[name].append(timed(step, device))

    med = {name: statistics.median(v) for name, v in ms.items()}
    result: dict = {
        "loss_ms": {name: round(v, 3) for name, v in med.items()},
        "loss_ms_min": {name: round(min(v), 3) for name, v in ms.items()},
        "ops": ops,
    }
    if nets:
        moco, plain = (statistics.median(net_ms[name]) for name in ("moco", "plain"))
        result.update(
            moco_r18_step_ms=round(moco, 3),
            moco_r18_step_ms_min=round(min(net_ms["moco"]), 3),
            r18_step_ms=round(plain, 3),
            ratio=round(med["all"] / moco, 5),  # the target: < 0.05
            ratio_min=round(min(ms["all"]) / min(net_ms["moco"]), 5),
            vcl_only_ratio=round(med["vcl_only"] / moco, 5),
            compiled_ratio=round(med["all_compiled"] / moco, 5) if args.compile else None,
            ratio_vs_plain_r18=round(med["all"] / plain, 5),
            target_ratio=0.05,
        )
    result.update(
        cohort=args.cohort,
        batch=args.batch,
        dim=args.dim,
        queue=args.queue,
        image_size=None if args.no_r18 else args.image_size,
        rounds=args.rounds,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        torch_threads=torch.get_num_threads(),
        # glibc returns freed buffers over the mmap threshold (<= 32 MiB) to the OS, so on CPU
        # every fresh big buffer is page faults; raising it changes CPU timings a lot
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        cpu_keep_freed_memory=kept,  # mallopt as in pretraining (CPU_KEEP_FREED_MEMORY)
        torch=torch.__version__,
    )
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
