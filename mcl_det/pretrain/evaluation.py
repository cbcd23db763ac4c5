"""The data side of the monitor: what a cohort's ``evaluate`` is given and the loaders it runs on.

Why apart from ``models``: a cohort says WHICH metric it is monitored by (kNN top-1 of its
backbones, or top-1 of its classifiers and their ensemble); how the held-out and kNN-memory images
are loaded and counted is the same for every method and lives here, beside ``monitor``'s kNN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from yacs.config import CfgNode

from . import distributed as dist_utils
from .data import SafeImageFolder, eval_transform
from .monitor import knn_top1


class EvalData(NamedTuple):
    """What a cohort's ``evaluate`` reads: the run's training set (kNN memory), the held-out set,
    the device and the number of classes."""

    train_set: SafeImageFolder
    val_set: Dataset
    device: torch.device
    num_classes: int


def eval_loader(dataset: Dataset, cfg: CfgNode) -> DataLoader:
    """Images in order, this rank's share of the training batch at a time."""
    bs = max(1, cfg.SOLVER.IMS_PER_BATCH // dist_utils.get_world_size())
    return DataLoader(dataset, batch_size=bs, num_workers=cfg.DATA.NUM_WORKERS)


def knn_memory(cfg: CfgNode, train_set: SafeImageFolder) -> Dataset:
    """The training images seen through the evaluation transform (no augmentation), at most
    MONITOR.KNN_MAX_TRAIN of them (a fixed random subset: the same memory at every evaluation)."""
    memory = SafeImageFolder(
        train_set.root, eval_transform(cfg.DATA.IMAGE_SIZE, cfg.DATA.EVAL_CROP), scan=False
    )
    memory.samples, memory.targets = train_set.samples, train_set.targets  # no second scan
    if 0 < cfg.MONITOR.KNN_MAX_TRAIN < len(memory):
        g = torch.Generator().manual_seed(0)  # leaves the global RNG (training's) untouched
        pick = torch.randperm(len(memory), generator=g)[: cfg.MONITOR.KNN_MAX_TRAIN]
        return Subset(memory, pick.tolist())
    return memory


@torch.no_grad()
def members_knn_top1(encoders: Sequence[nn.Module], cfg: CfgNode, data: EvalData) -> list[float]:
    """Weighted-kNN top-1 (percent) of each backbone (``fc`` = Identity): the training images
    are the memory, the held-out ones the queries."""
    train_loader = eval_loader(knn_memory(cfg, data.train_set), cfg)
    val_loader = eval_loader(data.val_set, cfg)
    knn = (data.num_classes, data.device, cfg.MONITOR.KNN_K, cfg.MONITOR.KNN_T)
    return [knn_top1(enc, train_loader, val_loader, *knn) for enc in encoders]


@torch.no_grad()
def classifiers_top1(
    logits_of: Callable[[Tensor], Sequence[Tensor]],
    members: int,
    loader: Iterable,
    device: torch.device,
) -> list[float]:
    """Top-1 (percent) of ``members`` classifiers and, last, of their ensemble (mean softmax);
    all 0 without any image.

    ``logits_of``: Nx3xHxW images on ``device`` -> ``members`` logits, each NxClasses.
    """
    correct = torch.zeros(members + 1)
    n = 0
    for x, y, _ in loader:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        probs = [F.softmax(lg.float(), dim=1) for lg in logits_of(x)]
        preds = [p.argmax(1) for p in probs] + [torch.stack(probs).mean(0).argmax(1)]
        correct += torch.tensor([float((p == y).sum()) for p in preds])
        n += y.numel()
    return (100.0 * correct / max(n, 1)).tolist()
