"""The supervised MCL terms under both definitions on one fixed, seeded input.

``single_positive`` is mcl_det's earlier definition, ``authors`` the MCL authors' (the default);
see mcl_det/pretrain/losses_sup.py for the rows. The input: a cohort of M = 2 random unit-norm
embeddings (untrained networks), N = 16 anchors of 8 classes (2 per class), C = 32; for the
memory bank a class-sorted dataset of 8 x 32 images with random unit-norm banks, one sampled
same-class positive (not the anchor) and K = 64 other-class negatives per anchor, the same
indices for both members; tau = 0.07, T = 3 (the supervised defaults). CPU, float32, < 1 s.

    python benchmarks/sup_terms_compare.py

Writes benchmarks/results/sup_terms_compare.json and prints it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mcl_det.pretrain import losses_sup as S
from mcl_det.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

TERMS = ("vcl", "icl", "soft_vcl", "soft_icl")


def fixed_input(seed: int, m: int, n: int, c: int, classes: int, per_class: int, k: int) -> dict:
    """Embeddings, labels, banks and bank indices, all from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    zs = [F.normalize(torch.randn(n, c, generator=g), dim=1) for _ in range(m)]  # M x NxC
    labels = torch.arange(classes).repeat(n // classes)  # N, class-balanced
    nb = classes * per_class
    targets = torch.arange(nb) // per_class  # Nb, class-sorted like an ImageFolder
    banks = F.normalize(torch.randn(m, nb, c, generator=g), dim=2)  # MxNbxC
    # the anchors: distinct images of their classes
    idx = labels * per_class + torch.randperm(per_class, generator=g)[
        : n // classes
    ].repeat_interleave(classes)
    # one same-class positive other than the anchor; K negatives from the other classes
    r = torch.randint(0, per_class - 1, (n,), generator=g)
    pos = labels * per_class + r
    pos = torch.where(pos >= idx, pos + 1, pos)
    r = torch.randint(0, nb - per_class, (n, k), generator=g)
    start = (labels * per_class).unsqueeze(1)
    neg = torch.where(r >= start, r + per_class, r)  # NxK
    assert bool((targets[pos] == labels).all()) and bool((pos != idx).all())
    assert bool((targets[neg] != labels.unsqueeze(1)).all())
    return dict(zs=zs, labels=labels, banks=banks, idx=idx, pos=pos, neg=neg)


def compare(old: dict, new: dict) -> dict:
    return {
        name: {
            "single_positive": old[name].item(),
            "authors": new[name].item(),
            "rel_diff": (new[name].item() - old[name].item()) / old[name].item(),
        }
        for name in TERMS
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sup_terms_compare.json"))
    args = p.parse_args(argv)
    shape = dict(m=2, n=16, c=32, classes=8, per_class=32, k=64)
    tau, T = 0.07, 3.0
    x = fixed_input(args.seed, **shape)
    with torch.no_grad():
        bank = {
            v: S.bank_terms(x["zs"], x["banks"], x["idx"], x["pos"], x["neg"], tau, T, None, v)
            for v in S.SUP_VARIANTS
        }
        inbatch = {
            v: S.inbatch_terms(x["zs"], x["labels"], tau, T, None, v) for v in S.SUP_VARIANTS
        }
    result = {
        "input": {**shape, "seed": args.seed, "tau": tau, "T": T, "dtype": "float32"},
        "bank": compare(bank["single_positive"], bank["authors"]),
        "inbatch": compare(inbatch["single_positive"], inbatch["authors"]),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
