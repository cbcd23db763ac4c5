"""Cost of the cohort: 2 MCL members vs ONE MoCo v2 network on the same batch.

Measures, side by side in one run:
- step time ratio (cohort of M with all four terms / one network with its MoCo loss), steps
  interleaved A, B, A, B ... so machine load drifts hit both alike; median of the steps
  (target <= 2.05: the cohort should add nothing beyond the second network's own work);
- the same cohort with the interaction weights at 0 (two independent MoCo runs): the difference
  is what ICL, Soft VCL and Soft ICL cost inside a real step, where their kernels queue behind
  the networks' (a share of the single network's step);
- the MCL loss terms alone (cohort logits at K, the four terms, their backward) as a share of the
  single network's step (the target: < 5% at K = 65536, M = 2, R18, batch 32) and of the cohort's;
- peak memory ratio (target <= 2.1x). GPU: torch.cuda.max_memory_allocated in this process.
  CPU: each variant runs in a fresh subprocess (same script, --memory-worker) and reports its peak
  RSS (VmHWM in /proc/self/status) minus its RSS after imports; i.e. model + optimizer +
  activations + queue, as the OS sees it (allocator caching included).
On CPU glibc malloc keeps freed memory as pretraining does (CPU_KEEP_FREED_MEMORY, on by default);
--no-keep-freed-memory measures glibc's defaults (page faults every step: slower, and more so for
the cohort's larger working set).
Writes benchmarks/results/bench_cohort_step.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mcl_det.pretrain import losses
from mcl_det.pretrain.models import SelfSupCohort
from mcl_det.utils.malloc import keep_freed_memory

ALL = {"vcl": 1.0, "icl": 1.0, "soft_vcl": 1.0, "soft_icl": 1.0}
MOCO = {"vcl": 1.0, "icl": 0.0, "soft_vcl": 0.0, "soft_icl": 0.0}


def build(args, members: int, device, weights: dict | None = None):
    torch.manual_seed(0)
    weights = weights or (ALL if members > 1 else MOCO)
    model = SelfSupCohort([args.arch] * members, queue_size=args.queue, weights=weights)
    model = model.to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9)
    return model, opt


def step(model, opt, x_q, x_k, sync):
    t = time.perf_counter()
    out = model.training_step(model, ((x_q, x_k), None, None))
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    model.after_step(out.state)
    sync()
    return time.perf_counter() - t


def terms_only(args, device, sync):
    """The MCL part alone: logits + 4 terms + backward into the (leaf) embeddings."""
    g = torch.Generator().manual_seed(0)
    n, k, c = args.batch, args.queue, 128

    def rnd(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)

    qs = [rnd(n, c).requires_grad_() for _ in range(args.members)]
    ks = [rnd(n, c) for _ in range(args.members)]
    queue = rnd(args.members, k, c)  # MxKxC, as in SelfSupCohort
    times = []
    for _ in range(args.warmup + args.iters):
        t = time.perf_counter()
        logits = losses.cohort_logits(torch.stack(qs), torch.stack(ks), queue, 0.2)
        losses.combine(losses.mcl_loss_terms(logits, 3.0), ALL).backward()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[args.warmup :])


def _proc_status_kib(field: str) -> float | None:
    """VmRSS / VmHWM from /proc (Linux). ru_maxrss is no use here: it survives fork+exec, so a
    child started by a big parent inherits the parent's high-water mark."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def memory_worker(args) -> None:
    device = torch.device(args.device)
    base = _proc_status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, opt = build(args, args.members_worker, device)
    x = torch.randn(2, args.batch, 3, args.size, args.size, device=device)
    for _ in range(2):
        step(model, opt, x[0], x[1], lambda: None)
    peak = _proc_status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_delta_mib": (peak - base) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    p.add_argument(
        "--no-keep-freed-memory",
        dest="keep_freed_memory",
        action="store_false",
        help="CPU: leave glibc malloc as it is (pretraining raises its thresholds by default, "
        "CPU_KEEP_FREED_MEMORY; see mcl_det/utils/malloc.py)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "bench_cohort_step.json")
    )
    p.add_argument(
        "--memory-worker", dest="members_worker", type=int, default=0, help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = args.device == "cpu" and args.keep_freed_memory and keep_freed_memory()
    if args.members_worker:
        memory_worker(args)
        return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x = torch.randn(2, args.batch, 3, args.size, args.size, device=device)

    # ---- time: interleaved steps
    # the same cohort with the interaction weights at 0 (the independent baseline): the
    # difference to the MCL cohort is what the interaction terms cost inside a real step
    single, opt1 = build(args, 1, device)
    cohort, opt2 = build(args, args.members, device)
    base, opt3 = build(args, args.members, device, MOCO)
    t1, t2, t3 = [], [], []
    for i in range(args.warmup + args.iters):
        a = step(single, opt1, x[0], x[1], sync)
        b = step(cohort, opt2, x[0], x[1], sync)
        c = step(base, opt3, x[0], x[1], sync)
        if i >= args.warmup:
            t1.append(a)
            t2.append(b)
            t3.append(c)
    s1, s2, s3 = (statistics.median(t) for t in (t1, t2, t3))
    t_terms = terms_only(args, device, sync)
    del single, cohort, base, opt1, opt2, opt3

    # ---- memory
    if cuda:
        mem = {}
        for m in (1, args.members):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model, opt = build(args, m, device)
            for _ in range(2):
                step(model, opt, x[0], x[1], sync)
            mem[m] = torch.cuda.max_memory_allocated() / 2**20
            del model, opt
        how = "torch.cuda.max_memory_allocated (includes the input batch)"
    else:
        mem = {}
        for m in (1, args.members):
            sizes = ["--batch", str(args.batch), "--size", str(args.size)]
            cmd = [sys.executable, __file__, "--memory-worker", str(m), "--arch", args.arch]
            cmd += [*sizes, "--queue", str(args.queue), "--device", "cpu"]
            cmd += ["--threads", str(args.threads)]
            if not args.keep_freed_memory:
                cmd.append("--no-keep-freed-memory")
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            mem[m] = json.loads(r.stdout.strip().splitlines()[-1])["rss_delta_mib"]
        how = "CPU: peak RSS (VmHWM) minus RSS after imports, fresh subprocess per variant"

    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "arch": args.arch,
        "members": args.members,
        "batch": args.batch,
        "size": args.size,
        "queue": args.queue,
        "iters": args.iters,
        "torch_threads": torch.get_num_threads(),
        "step_s_single": s1,
        "step_s_cohort": s2,
        "step_time_ratio": s2 / s1,
        "step_time_ratio_target": 2.05,
        "step_s_cohort_without_interaction": s3,
        "interaction_terms_in_step_s": s2 - s3,
        "interaction_terms_share_of_single_step": (s2 - s3) / s1,
        "mcl_terms_s": t_terms,
        "mcl_terms_share_of_cohort_step": t_terms / s2,
        "mcl_terms_share_of_single_step": t_terms / s1,
        "mcl_terms_share_target": 0.05,
        "peak_mem_mib_single": mem[1],
        "peak_mem_mib_cohort": mem[args.members],
        "peak_mem_ratio": mem[args.members] / max(mem[1], 1e-9),
        "peak_mem_ratio_target": 2.1,
        "memory_measured_with": how,
        "cpu_keep_freed_memory": kept,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
