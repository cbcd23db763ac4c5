"""Cost of the four MCL terms: the current losses vs the previous per-pair version, and vs one
ResNet-18 training step, all measured side by side in one process.

Target (issue 3): all four terms at K=65536, M=2, N=32, C=128, forward + backward, < 5% of an
R18 step at batch 32: the step of ONE R18 MoCo v2 network as the engine runs it (the network the
cohort is compared with: cohort step <= 2.05 x that step). A plain R18 SGD step (no key
encoder, no queue) is timed too, as a stricter denominator (ratio_vs_plain_r18). On a GPU that cost is launch-bound (many small kernels),
so besides milliseconds this reports two machine-independent proxies: the aten ops that reach a
backend (views excluded) in one loss forward + backward, counted with a TorchDispatchMode on
CPU, and the nodes of the loss's autograd graph (host work per step on top of the kernels);
with --device cuda also the CUDA kernels/memcpys the profiler sees.

The previous implementation (one cat, CE, log-softmax and KL per pair) is frozen below as
``old_*`` so both can be timed in the same run; "old" and "new" steps are interleaved so machine
load hits both alike. The ratios of medians are the numbers that matter.

    python benchmarks/bench_mcl_losses.py --threads 1              # CPU shared with other jobs
    python benchmarks/bench_mcl_losses.py --image-size 112 --rounds 3 --threads 1  # quicker
    python benchmarks/bench_mcl_losses.py --device cuda            # on a GPU
    python benchmarks/bench_mcl_losses.py --no-r18 --threads 1     # loss old vs new only

Queues are views of one MxKxC buffer as in the engine (SelfSupCohort.queue_list);
--separate-queues passes independent tensors instead (the slower fallback path).
On an oversubscribed CPU, multi-threaded runs of the (short, many-op) loss step suffer far more
than the (long, conv-bound) R18 step and the ratio is meaningless; use --threads 1 there.
CPU timings also depend on glibc malloc: by default buffers over its mmap threshold (at most
32 MiB; the batched MxMxNx(1+K) logits are 32 MiB + 512 B at the default sizes) are returned to
the OS on free and page-faulted in again on every use. Pretraining raises the thresholds on CPU
(CPU_KEEP_FREED_MEMORY, mcl_det/utils/malloc.py) and so does this benchmark, unless
--no-keep-freed-memory; the JSON records the setting.

Writes benchmarks/results/mcl_losses.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mcl_det.pretrain import losses as L  # noqa: E402
from mcl_det.pretrain.engine import selfsup_loss  # noqa: E402
from mcl_det.pretrain.models import SelfSupCohort  # noqa: E402
from mcl_det.utils.io import atomic_write_json  # noqa: E402
from mcl_det.utils.malloc import keep_freed_memory  # noqa: E402

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


# --------------------------------------------------------------------------------------------
# The previous implementation, frozen for side-by-side timing (do not "fix" it: it is the
# baseline). Same values as the current one; one cat / CE / log-softmax / KL per pair.
# --------------------------------------------------------------------------------------------


def _old_upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def old_cohort_logits(qs, ks, queues, tau, cross=True):
    m, n = len(qs), qs[0].shape[0]
    out = [[None] * m for _ in range(m)]
    if not cross:
        for a in range(m):
            q = qs[a] / tau
            pos = (q * ks[a]).sum(dim=1, keepdim=True)
            out[a][a] = torch.cat([pos, q @ queues[a].t()], dim=1)
        return out
    q_all = torch.cat(list(qs), dim=0) / tau
    for b in range(m):
        negs = (q_all @ queues[b].t()).split(n)
        poss = (q_all.view(m, n, -1) * ks[b]).sum(dim=2, keepdim=True).unbind(0)
        for a in range(m):
            out[a][b] = torch.cat([poss[a], negs[a]], dim=1)
    return out


def _old_log_soft(logits, T):
    return F.log_softmax(_old_upcast(logits) / T, dim=1)


def _old_kl(log_p_student, log_p_teacher, T):
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (T * T)


def _old_ce0(logits):
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(_old_upcast(logits), target)


def old_mcl_loss_terms(logits, T=3.0, needed=None):
    needed = set(L.TERMS) if needed is None else set(needed)
    m = len(logits)
    pairs = [(a, b) for a in range(m) for b in range(m) if a != b]
    out = {}
    if "vcl" in needed:
        out["vcl"] = sum(_old_ce0(logits[a][a]) for a in range(m))
    if "icl" in needed:
        out["icl"] = sum(_old_ce0(logits[a][b]) for a, b in pairs)
    if "soft_vcl" in needed:
        diag = [_old_log_soft(logits[a][a], T) for a in range(m)]
        out["soft_vcl"] = sum(_old_kl(diag[a], diag[b].detach(), T) for a, b in pairs)
    if "soft_icl" in needed:
        cross = {(a, b): _old_log_soft(logits[a][b], T) for a, b in pairs}
        out["soft_icl"] = sum(_old_kl(cross[a, b], cross[b, a].detach(), T) for a, b in pairs)
    return out


def old_combine(terms, weights):
    total = None
    for name, w in weights.items():
        if w == 0:
            continue
        part = terms[name] * w
        total = part if total is None else total + part
    return total


IMPLS = {
    "old": (old_cohort_logits, old_mcl_loss_terms, old_combine),
    "new": (L.cohort_logits, L.mcl_loss_terms, L.combine),
}


# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(m: int, n: int, c: int, k: int, device: torch.device, separate: bool):
    """Fixed embeddings; queues as views of one MxKxC buffer (the engine's layout) or separate."""
    g = torch.Generator().manual_seed(0)
    qs = [F.normalize(torch.randn(n, c, generator=g), dim=1).to(device) for _ in range(m)]
    ks = [F.normalize(torch.randn(n, c, generator=g), dim=1).to(device) for _ in range(m)]
    buffer = F.normalize(torch.randn(m, k, c, generator=g), dim=2).to(device)
    queues = [buffer[i].clone() for i in range(m)] if separate else [buffer[i] for i in range(m)]
    return [q.requires_grad_() for q in qs], ks, queues


def loss_forward(impl: str, inputs, tau: float, weights: dict[str, float]) -> Tensor:
    """The MCL loss (logits + terms + weighted sum) of one implementation, forward only."""
    cohort_logits, mcl_loss_terms, combine = IMPLS[impl]
    qs, ks, queues = inputs
    needed = L.needed_terms(weights)
    grid = cohort_logits(qs, ks, queues, tau, cross=L.needs_cross(needed))
    return combine(mcl_loss_terms(grid, T=3.0, needed=needed), weights)


def make_loss_step(
    impl: str, inputs, tau: float, weights: dict[str, float]
) -> Callable[[], Tensor]:
    """One MCL loss forward + backward from fixed embeddings (the encoders are not included)."""

    def step() -> Tensor:
        for q in inputs[0]:
            q.grad = None
        loss = loss_forward(impl, inputs, tau, weights)
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
    is compared with (issue 3: cohort step <= 2.05 x this, the MCL terms < 5% of it)."""
    model = SelfSupCohort(["resnet18"], queue_size=queue).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03)
    x_q = torch.randn(batch, 3, size, size, device=device)
    x_k = torch.randn(batch, 3, size, size, device=device)

    def step() -> Tensor:
        loss, _, ks = selfsup_loss(model, x_q, x_k, 0.2, 3.0, VCL_ONLY)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.enqueue(ks)
        return loss.detach()

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


def count_autograd_nodes(impl: str, inputs, tau: float, weights: dict[str, float]) -> int:
    """Nodes of the loss's autograd graph (AccumulateGrad leaves included): each costs host
    time on every step in the forward (recording) and in the backward (running it)."""
    loss = loss_forward(impl, inputs, tau, weights)
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


def check_same_values(inputs, tau: float) -> float:
    """Max relative difference of the four terms, old vs new (float32): a sanity check only;
    the tests compare both against a float64 loop reference."""
    old_t = old_mcl_loss_terms(old_cohort_logits(*inputs, tau), 3.0)
    new_t = L.mcl_loss_terms(L.cohort_logits(*inputs, tau), 3.0)
    return max(float(((old_t[k] - new_t[k]).abs() / old_t[k].abs()).detach()) for k in L.TERMS)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cohort", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (after warm-up)")
    p.add_argument("--loss-reps", type=int, default=5, help="loss steps per round (it is short)")
    p.add_argument("--no-r18", action="store_true", help="skip the R18 steps (old vs new only)")
    p.add_argument("--separate-queues", action="store_true", help="queues as separate tensors")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 is "
        "steadier on a CPU shared with other jobs",
    )
    p.add_argument(
        "--no-keep-freed-memory",
        dest="keep_freed_memory",
        action="store_false",
        help="CPU: leave glibc malloc as it is (pretraining raises its thresholds by default)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mcl_losses.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    kept = device.type == "cpu" and args.keep_freed_memory and keep_freed_memory()

    separate = args.separate_queues
    inputs = make_inputs(args.cohort, args.batch, args.dim, args.queue, device, separate)
    steps = {
        "new": make_loss_step("new", inputs, 0.2, ALL),
        "old": make_loss_step("old", inputs, 0.2, ALL),
        "new_vcl_only": make_loss_step("new", inputs, 0.2, VCL_ONLY),
        "old_vcl_only": make_loss_step("old", inputs, 0.2, VCL_ONLY),
    }
    small = make_inputs(args.cohort, args.batch, args.dim, 512, torch.device("cpu"), separate)
    weights_of = {"new": ALL, "old": ALL, "new_vcl_only": VCL_ONLY, "old_vcl_only": VCL_ONLY}
    ops = {
        name: {
            "aten_ops": count_ops(make_loss_step(name[:3], small, 0.2, w)),
            "autograd_nodes": count_autograd_nodes(name[:3], small, 0.2, w),
        }
        for name, w in weights_of.items()
    }
    if device.type == "cuda":
        for name, step in steps.items():
            ops[name]["cuda_events"] = count_cuda_events(step, device)
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
    paired: list[float] = []  # per round: new / old, both timed back to back
    for _ in range(args.rounds):  # alternate so every variant sees the same machine load
        for name, step in nets.items():
            net_ms[name].append(timed(step, device))
        round_ms = {name: [] for name in steps}
        for _ in range(args.loss_reps):
            for name, step in steps.items():
                round_ms[name].append(timed(step, device))
        for name in steps:
            ms[name].extend(round_ms[name])
        paired.append(statistics.median(round_ms["new"]) / statistics.median(round_ms["old"]))

    med = {name: statistics.median(v) for name, v in ms.items()}
    result: dict = {
        "loss_ms": {name: round(v, 3) for name, v in med.items()},
        "new_over_old": round(med["new"] / med["old"], 4),
        "new_over_old_paired": round(statistics.median(paired), 4),
        "ops": ops,
        "max_rel_diff_old_new": check_same_values(inputs, 0.2),
    }
    if nets:
        moco, plain = (statistics.median(net_ms[name]) for name in ("moco", "plain"))
        result.update(
            moco_r18_step_ms=round(moco, 3),
            r18_step_ms=round(plain, 3),
            ratio=round(med["new"] / moco, 5),  # the issue-3 target: < 0.05
            ratio_min=round(min(ms["new"]) / min(net_ms["moco"]), 5),
            ratio_old=round(med["old"] / moco, 5),
            vcl_only_ratio=round(med["new_vcl_only"] / moco, 5),
            ratio_vs_plain_r18=round(med["new"] / plain, 5),
            target_ratio=0.05,
        )
    result.update(
        cohort=args.cohort,
        batch=args.batch,
        dim=args.dim,
        queue=args.queue,
        image_size=None if args.no_r18 else args.image_size,
        queues="separate" if args.separate_queues else "one buffer",
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
