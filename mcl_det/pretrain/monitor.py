"""Monitoring: weighted kNN top-1 per member, JSON-lines log, TensorBoard, progress with ETA.

Only rank 0 writes. The kNN classifier is the InstDisc/MoCo monitor: cosine similarity of
L2-normalised backbone features, the k nearest train images vote with weight exp(sim / T).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader: Iterable, device: torch.device
) -> tuple[Tensor, Tensor]:
    """L2-normalised features (NxD) and labels (N) of every image in ``loader``.

    encoder: maps Nx3xHxW images to NxD features (a backbone whose ``fc`` is ``nn.Identity``).
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for x, y, _ in loader:
        feats.append(F.normalize(encoder(x.to(device)).float(), dim=1).cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.07,
) -> Tensor:
    """Weighted kNN. query: QxD, bank: NxD (unit norm), bank_labels: N -> predicted class (Q)."""
    k = min(k, bank.shape[0])
    sim = query @ bank.t()  # QxN cosine similarities
    w, idx = sim.topk(k, dim=1)  # Qxk
    votes = torch.zeros(query.shape[0], num_classes)  # QxClasses
    votes.scatter_add_(1, bank_labels[idx], (w / t).exp())
    return votes.argmax(dim=1)


@torch.no_grad()
def knn_top1(
    encoder: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    num_classes: int,
    device: torch.device,
    k: int = 200,
    t: float = 0.07,
) -> float:
    """kNN top-1 (percent) of one backbone (``fc`` = Identity): train features are the memory,
    val the queries."""
    bank, bank_y = extract_features(encoder, train_loader, device)
    q, q_y = extract_features(encoder, val_loader, device)
    pred = knn_predict(q, bank, bank_y, num_classes, k, t)
    return 100.0 * float((pred == q_y).float().mean())


class Logger:
    """log.jsonl (append, one object per line) + TensorBoard scalars, rank 0 only."""

    def __init__(
        self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tb"))
            except Exception as e:  # tensorboard is optional at run time
                print(f"warning: TensorBoard disabled ({e})", flush=True)

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop lines written after the checkpoint, so the log has no duplicates."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= iteration:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
        self.path.write_text("".join(x + "\n" for x in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            step = record.get("iteration", 0)
            prefix = record.get("type", "train")
            for key, v in record.items():
                if isinstance(v, (int, float)) and key not in ("iteration", "epoch"):
                    if math.isfinite(v):
                        self.tb.add_scalar(f"{prefix}/{key}", v, step)
            for i, mm in enumerate(record.get("member_metrics", []) or []):
                if mm.get("value") is not None:
                    self.tb.add_scalar(f"{prefix}/member{i}_{mm['name']}", mm["value"], step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """tqdm bar over the whole run (rank 0), and the ETA written into the log lines."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.start_time, self.start, self.total = time.time(), start, total
        self.bar = (
            tqdm(total=total, initial=start, desc="pretrain", dynamic_ncols=True)
            if enabled
            else None
        )

    def eta_s(self, it: int) -> float:
        done = it - self.start
        return (time.time() - self.start_time) / max(done, 1) * (self.total - it)

    def update(self, it: int, postfix: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def member_metrics(values: Sequence[float | None], name: str, epoch: int) -> list[dict[str, Any]]:
    return [{"name": name, "value": v, "epoch": epoch} for v in values]
