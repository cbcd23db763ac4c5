"""Cohort models for MCL: M torchvision ResNets, each with its own projection head.

Key layout (the converter relies on it, see docs/DESIGN.md): member k's backbone is
``members.{k}.encoder.*`` with torchvision ResNet names. In selfsup mode the encoder's ``fc`` is an
``nn.Identity`` (no keys), the MLP head is ``members.{k}.head.*`` and the momentum copies are
``members.{k}.encoder_k.*`` / ``members.{k}.head_k.*``. In supervised mode ``fc`` is the classifier.
The selfsup queues are ONE buffer ``queues`` (M x K x C) with ONE pointer, so the lockstep
alignment of the members' queues holds by construction, not by convention.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..utils.errors import MCLDetError
from . import distributed as dist_utils

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_resnet(arch: str, num_classes: int = 0) -> nn.Module:
    """A randomly initialised torchvision ResNet; ``num_classes == 0`` drops the classifier."""
    if arch not in RESNETS:
        raise MCLDetError(
            f"unknown architecture {arch!r}; use one of {', '.join(RESNETS)} (MODEL.ARCH/ARCHS)"
        )
    net = getattr(torchvision.models, arch)(weights=None, num_classes=max(num_classes, 1))
    net.feat_dim = net.fc.in_features  # 512 (18/34) or 2048 (50/101/152)
    if num_classes == 0:
        net.fc = nn.Identity()  # no parameters: the backbone's state_dict has no fc.* keys
    return net


def resnet_features(net: nn.Module, x: Tensor) -> Tensor:
    """Pooled backbone features (before ``fc``). x: Nx3xHxW -> NxD."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)  # NxD


class MLPHead(nn.Module):
    """Linear(d -> h) - ReLU - Linear(h -> dim), output L2-normalised (MoCo v2 / MCL head)."""

    def __init__(self, in_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:  # NxD -> NxC, unit norm
        return F.normalize(self.fc2(F.relu(self.fc1(x))), dim=1)


class SelfSupMember(nn.Module):
    """One MoCo v2 network: query encoder + head, and their momentum (key) copies."""

    def __init__(self, arch: str, dim: int = 128, hidden: int = 0) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = build_resnet(arch)
        d = self.encoder.feat_dim
        self.head = MLPHead(d, hidden or d, dim)
        self.encoder_k = copy.deepcopy(self.encoder)  # starts equal to the query side (MoCo)
        self.head_k = copy.deepcopy(self.head)
        for p in (*self.encoder_k.parameters(), *self.head_k.parameters()):
            p.requires_grad = False

    def query(self, x: Tensor) -> Tensor:  # Nx3xHxW -> NxC
        return self.head(resnet_features(self.encoder, x))

    def key(self, x: Tensor) -> Tensor:  # Nx3xHxW -> NxC (call under no_grad)
        return self.head_k(resnet_features(self.encoder_k, x))

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        for q_side, k_side in ((self.encoder, self.encoder_k), (self.head, self.head_k)):
            for pq, pk in zip(q_side.parameters(), k_side.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)


class SelfSupCohort(nn.Module):
    """M MoCo v2 members sharing the two crops and one lockstep queue pointer.

    ``forward(x_q, x_k)`` returns (qs, ks): per member NxC queries (with grad) and NxC keys (no
    grad). It does the momentum update first, as MoCo does. Call ``enqueue(ks)`` after the loss.
    """

    def __init__(
        self,
        archs: Sequence[str],
        dim: int = 128,
        hidden: int = 0,
        queue_size: int = 65536,
        momentum: float = 0.999,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        self.archs = list(archs)
        self.members = nn.ModuleList(SelfSupMember(a, dim, hidden) for a in self.archs)
        self.momentum = momentum
        self.shuffle_bn = shuffle_bn
        self.bn_splits = max(1, int(bn_splits))
        queues = F.normalize(torch.randn(len(self.archs), queue_size, dim), dim=2)
        self.register_buffer("queues", queues)  # M x K x C; row j of every queue = same image
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _split_forward(self, fn, x: Tensor) -> Tensor:
        # each split is its own BN batch, as if the local batch were spread over bn_splits GPUs
        if self.bn_splits == 1:
            return fn(x)
        return torch.cat([fn(c) for c in x.chunk(self.bn_splits)])

    def forward(self, x_q: Tensor, x_k: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        qs = [self._split_forward(m.query, x_q) for m in self.members]  # M x NxC
        with torch.no_grad():
            for m in self.members:
                m.momentum_update(self.momentum)
            if self.shuffle_bn:
                # one shuffle for every member: keys stay aligned across the cohort
                x_shuf, restore = dist_utils.batch_shuffle(x_k)
                ks = [
                    dist_utils.batch_unshuffle(self._split_forward(m.key, x_shuf), restore)
                    for m in self.members
                ]
            else:
                ks = [self._split_forward(m.key, x_k) for m in self.members]
        return qs, ks

    def queue_list(self) -> list[Tensor]:
        """Per-member KxC views of the queues (clones would cost M x K x C per step)."""
        return [self.queues[i] for i in range(len(self.archs))]

    @torch.no_grad()
    def enqueue(self, ks: Sequence[Tensor]) -> None:
        """Write the keys of every rank into every member's queue at the SAME position."""
        keys = torch.stack([dist_utils.concat_all_gather(k.detach()) for k in ks])  # M x B x C
        b, size = keys.shape[1], self.queues.shape[1]
        if size % b:
            raise MCLDetError(
                f"MODEL.QUEUE_SIZE {size} is not a multiple of the global batch {b}; "
                "pick a queue size divisible by SOLVER.IMS_PER_BATCH"
            )
        ptr = int(self.queue_ptr)
        self.queues[:, ptr : ptr + b] = keys.to(self.queues.dtype)
        self.queue_ptr.fill_((ptr + b) % size)


class SupervisedMember(nn.Module):
    """One classifier network (torchvision ResNet with its ``fc``) plus an MLP projection head."""

    def __init__(self, arch: str, num_classes: int, dim: int = 128, hidden: int = 0) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = build_resnet(arch, num_classes)
        d = self.encoder.feat_dim
        self.head = MLPHead(d, hidden or d, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # -> (NxClasses logits, NxC z)
        f = resnet_features(self.encoder, x)
        return self.encoder.fc(f), self.head(f)


class SupervisedCohort(nn.Module):
    """M classifiers on the same batch; optional memory banks (one per member, aligned rows)."""

    def __init__(
        self,
        archs: Sequence[str],
        num_classes: int,
        dim: int = 128,
        hidden: int = 0,
        bank_size: int = 0,
    ) -> None:
        super().__init__()
        self.archs = list(archs)
        self.members = nn.ModuleList(
            SupervisedMember(a, num_classes, dim, hidden) for a in self.archs
        )
        # M x Nb x C; row i of every bank is dataset image i (the KL terms need that alignment)
        banks = F.normalize(torch.randn(len(self.archs), max(bank_size, 0), dim), dim=2)
        self.register_buffer("banks", banks)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        outs = [m(x) for m in self.members]
        return [o[0] for o in outs], [o[1] for o in outs]

    def bank_list(self) -> list[Tensor]:
        return [self.banks[i] for i in range(len(self.archs))]


def build_cohort(cfg, archs: Sequence[str], num_classes: int = 0, bank_size: int = 0) -> nn.Module:
    """Build the cohort module that cfg.MODE asks for."""
    if len(archs) < 1:
        raise MCLDetError("the cohort is empty; set --cohort N or MODEL.ARCHS")
    if cfg.MODE == "selfsup":
        return SelfSupCohort(
            archs,
            dim=cfg.MODEL.DIM,
            hidden=cfg.MODEL.HEAD_HIDDEN,
            queue_size=cfg.MODEL.QUEUE_SIZE,
            momentum=cfg.MODEL.MOMENTUM,
            shuffle_bn=cfg.MODEL.SHUFFLE_BN,
            bn_splits=cfg.MODEL.SHUFFLE_BN_SPLITS,
        )
    if cfg.MODE == "supervised":
        return SupervisedCohort(
            archs, num_classes, dim=cfg.MODEL.DIM, hidden=cfg.MODEL.HEAD_HIDDEN, bank_size=bank_size
        )
    raise MCLDetError(f"unknown MODE {cfg.MODE!r}; use selfsup or supervised")
