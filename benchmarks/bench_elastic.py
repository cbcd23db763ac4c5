#!/usr/bin/env python
"""Faults survived by a pretraining run under ``torchrun --max-restarts``: a worker is killed
with SIGKILL at seeded random iterations, torchrun restarts the group, which continues from the
last complete checkpoint; the final checkpoint is compared with an uninterrupted run's.

    python benchmarks/bench_elastic.py [--faults 3] [--seed 0] [--work-dir D] [--out F]

Two CPU processes (gloo), a toy cohort of 2 ResNet-18 on 32 px images, 20 iterations, a
checkpoint every 3 iterations and at each epoch end (every 4). The faults are injected from
outside, as the OOM killer or a lost node would: the worker (not the agent) of a randomly drawn
rank gets SIGKILL once the run's log shows the drawn iteration. Reported per fault: the iteration
the killed attempt had reached, the one the next attempt resumed from (iterations lost) and the
recovery time (seconds from the kill to the next attempt's first logged iteration: the agent's
restart, process start-up, rendezvous, model building and the checkpoint load).
Writes benchmarks/results/bench_elastic.json (or --out) and prints it; exits 1 if the run did not
finish or its final checkpoint differs from the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mcl_det.data.toy import make_toy_imagenet
from mcl_det.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
LAST = "checkpoint_last.pth"
EPOCHS, ITERS_PER_EPOCH = 5, 4  # 32 images, a global batch of 8
TOTAL = EPOCHS * ITERS_PER_EPOCH
RESUMED = re.compile(r"resumed from \S+ at iteration (\d+)")


def run_opts(data: Path, out: Path) -> list[str]:
    o = {
        "DATA.ROOT": data,
        "DATA.IMAGE_SIZE": 32,
        "DATA.NUM_WORKERS": 0,
        "OUTPUT_DIR": out,
        "MODEL.ARCH": "resnet18",
        "MODEL.QUEUE_SIZE": 16,
        "MODEL.DIM": 16,
        "SOLVER.IMS_PER_BATCH": 8,
        "SOLVER.EPOCHS": EPOCHS,
        "SOLVER.CHECKPOINT_PERIOD": 3,
        "SOLVER.EPOCH_SNAPSHOT_PERIOD": 0,
        "MONITOR.EVAL_PERIOD": 0,
        "MONITOR.LOG_PERIOD": 1,
        "MONITOR.TENSORBOARD": False,
        "MONITOR.PROGRESS": False,
    }
    return [str(x) for kv in o.items() for x in kv]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, data: Path, max_restarts: int, log) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 --max-restarts N -m mcl_det.cli.pretrain ...``."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--max-restarts", str(max_restarts), "--rdzv-backend", "c10d"),
        *("--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--monitor-interval", "0.1"),
        *("-m", "mcl_det.cli.pretrain", "--cohort", "2", *run_opts(data, out)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MCL_DET_DEBUG", None)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def children(pid: int) -> dict[int, int]:
    """{pid: RANK} of the worker processes of the torchrun agent ``pid`` (read from /proc)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ranks:
            found[int(d.name)] = int(ranks[0])
    return found


def last_iteration(out: Path) -> int:
    """The iteration of the last train line of ``out/log.jsonl`` (0 if none yet)."""
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if r.get("type") == "train":
            return int(r["iteration"])
    return 0


def kill_plan(faults: int, seed: int) -> list[tuple[int, int]]:
    """(iteration, rank) of each fault, drawn from ``seed``: distinct iterations, increasing,
    after the first checkpoint is in place (iteration 3's, confirmed by iteration 4's loss), so
    every restart resumes from one (before it, a restart starts afresh: nothing to measure)."""
    rng = random.Random(seed)
    its = sorted(rng.sample(range(4, TOTAL - 1), faults))
    return [(it, rng.randrange(2)) for it in its]


def _wait(cond, proc: subprocess.Popen, timeout: float, what: str) -> Any:
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return v
        if proc.poll() is not None:
            raise RuntimeError(f"torchrun ended (exit {proc.returncode}) while waiting for {what}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _ready(agent: int, dead: set[int], out: Path, target: int) -> dict[int, int] | None:
    """The two live workers of the current attempt once the log shows ``target``."""
    live = {p: r for p, r in children(agent).items() if p not in dead}
    return live if len(live) == 2 and last_iteration(out) >= target else None


def _gone(agent: int, dead: frozenset[int]) -> bool:
    return not set(children(agent)) & dead


def _nth_resume(log_path: Path, n: int) -> int | None:
    """The iteration the ``n``-th (from 0) restarted group resumed from, once it said so."""
    found = RESUMED.findall(log_path.read_text())
    return int(found[n]) if len(found) > n else None


def _past(out: Path, iteration: int) -> bool:
    return last_iteration(out) > iteration


def chaos_run(
    out: Path, data: Path, plan: list[tuple[int, int]], log_path: Path, timeout: float = 600
) -> tuple[int, list[dict]]:
    """Run under torchrun with ``len(plan)`` restarts allowed and kill as ``plan`` says; returns
    torchrun's exit code and one record per fault."""
    faults: list[dict] = []
    with open(log_path, "w") as log:
        proc = torchrun(out, data, len(plan), log)
        try:
            dead: set[int] = set()
            reached = 0
            for target, rank in plan:
                target = max(target, reached + 1)  # a line past every earlier attempt's: ours
                workers = _wait(
                    functools.partial(_ready, proc.pid, dead, out, target),
                    proc,
                    timeout,
                    f"iteration {target}",
                )
                victim = next(p for p, r in workers.items() if r == rank)
                t_kill = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                dead |= set(workers)
                gone = functools.partial(_gone, proc.pid, frozenset(dead))
                _wait(gone, proc, timeout, "the teardown")
                reached = last_iteration(out)  # what the killed attempt had logged
                nth = functools.partial(_nth_resume, log_path, len(faults))
                resumed = _wait(nth, proc, timeout, "the restarted group's resume")
                moved = functools.partial(_past, out, resumed)
                _wait(moved, proc, timeout, "a new iteration")
                faults.append(
                    {
                        "killed_rank": rank,
                        "planned_iteration": target,
                        "reached_iteration": reached,
                        "resumed_from_iteration": resumed,
                        "iterations_lost": reached - resumed,
                        "recovery_s": round(time.monotonic() - t_kill, 2),
                    }
                )
                reached = max(reached, last_iteration(out))
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, faults


def final_states_equal(a: Path, b: Path) -> bool:
    """Model and optimizer state of two checkpoints equal bit for bit (read without code)."""
    ca = torch.load(a / LAST, weights_only=True, map_location="cpu")
    cb = torch.load(b / LAST, weights_only=True, map_location="cpu")

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return x == y

    return ca["iteration"] == cb["iteration"] == TOTAL and all(
        same(ca[k], cb[k]) for k in ("model", "optimizer")
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", type=int, default=3, help="workers killed (= --max-restarts)")
    ap.add_argument("--seed", type=int, default=0, help="draws the kill iterations and ranks")
    ap.add_argument("--work-dir", default=None, help="where the runs go (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_elastic.json"))
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_elastic_"))
    data = work / "data"
    if not data.is_dir():
        make_toy_imagenet(data, num_classes=2, train_per_class=16, val_per_class=1, size=32)
    with open(work / "reference.log", "w") as log:
        ref = torchrun(work / "reference", data, 0, log)
        ref_rc = ref.wait(timeout=600)
    plan = kill_plan(args.faults, args.seed)
    t0 = time.monotonic()
    rc, faults = chaos_run(work / "chaos", data, plan, work / "chaos.log")
    wall = time.monotonic() - t0
    equal = rc == ref_rc == 0 and final_states_equal(work / "chaos", work / "reference")
    res = {
        "benchmark": "bench_elastic",
        "host_cpus": os.cpu_count(),
        "processes": 2,
        "backend": "gloo",
        "iterations": TOTAL,
        "checkpoint_every": "3 iterations and each epoch end (4)",
        "seed": args.seed,
        "plan": [{"iteration": it, "rank": r} for it, r in plan],
        "faults_survived": len(faults) if rc == 0 else 0,
        "faults": faults,
        "iterations_lost_mean": round(sum(f["iterations_lost"] for f in faults) / len(faults), 2)
        if faults
        else None,
        "recovery_s_mean": round(sum(f["recovery_s"] for f in faults) / len(faults), 2)
        if faults
        else None,
        "chaos_wall_s": round(wall, 1),
        "exit_code": rc,
        "final_checkpoint_equals_uninterrupted": equal,
        "work_dir": str(work),
    }
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=2))
    return 0 if equal and len(faults) == args.faults else 1


if __name__ == "__main__":
    sys.exit(main())
