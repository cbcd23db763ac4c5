"""Time to convert + verify one ResNet-50 cohort member on CPU (target: < 10 s).

A two-member cohort checkpoint (R50 + R18, with momentum encoders, heads and queues, as
pretrain/main.py writes them) is built in a temporary folder, then member 0 is converted with and
without verification, alternating, so that machine load hits both alike. Reported: median wall
time of each and their ratio (what verification costs).

    python benchmarks/bench_convert.py [--rounds 3]

Writes benchmarks/results/convert.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from mcl_det import convert
from mcl_det.pretrain.checkpoint import FORMAT, member_prefix
from mcl_det.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

TARGET_S = 10.0


def make_cohort(path: Path) -> None:
    model = {}
    for k, arch in enumerate(["resnet50", "resnet18"]):
        sd = getattr(torchvision.models, arch)().state_dict()
        for name, t in sd.items():
            if not name.startswith("fc."):
                model[member_prefix(k) + name] = t
                model[f"members.{k}.encoder_k.{name}"] = t.clone()
        model[f"members.{k}.head.0.weight"] = torch.randn(2048, 2048)
        model[f"queue_{k}"] = torch.randn(128, 65536)
    ckpt = {
        "format": FORMAT,
        "mode": "selfsup",
        "archs": ["resnet50", "resnet18"],
        "config": "",
        "epoch": 1,
        "iteration": 1,
        "model": model,
        "member_metrics": [{"name": "knn_top1", "value": 1.0, "epoch": 1}] * 2,
    }
    torch.save(ckpt, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "checkpoint_last.pth"
        make_cohort(src)
        convert.convert_checkpoint(src, Path(tmp) / "warm.pkl", 0)  # imports, first-call costs
        verified, unverified = [], []
        for r in range(a.rounds):
            t = time.perf_counter()
            rep = convert.convert_checkpoint(src, Path(tmp) / f"v{r}.pkl", 0, verify=True)
            verified.append(time.perf_counter() - t)
            t = time.perf_counter()
            convert.convert_checkpoint(src, Path(tmp) / f"n{r}.pkl", 0, verify=False)
            unverified.append(time.perf_counter() - t)
        ckpt_mb = src.stat().st_size / 2**20
        pkl_mb = (Path(tmp) / "v0.pkl").stat().st_size / 2**20
    med_v, med_n = statistics.median(verified), statistics.median(unverified)
    out = {
        "benchmark": "convert_r50_member_cpu",
        "torch_threads": torch.get_num_threads(),
        "rounds": a.rounds,
        "checkpoint_mb": round(ckpt_mb, 1),
        "pkl_mb": round(pkl_mb, 1),
        "convert_verify_s_median": round(med_v, 3),
        "convert_no_verify_s_median": round(med_n, 3),
        "verify_cost_ratio": round(med_v / med_n, 2),
        "max_rel_diff": {k: float(f"{v:.3g}") for k, v in rep.max_rel_diff.items()},
        "target_s": TARGET_S,
        "meets_target": med_v < TARGET_S,
        "all_s": {
            "verify": [round(x, 3) for x in verified],
            "no_verify": [round(x, 3) for x in unverified],
        },
    }
    path = ROOT / "benchmarks" / "results" / "convert.json"
    atomic_write_json(path, out)
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
