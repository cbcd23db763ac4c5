"""Cohort models for MCL: M torchvision ResNets, each with its own projection head.

One class per training method, as in solo-learn: ``SelfSupCohort`` (MoCo v2 base) and
``SupervisedCohort`` with its two variants ``BankSupervisedCohort`` (memory banks, ImageNet size)
and ``InBatchSupervisedCohort`` (SupCon-style, small data). Each implements the ``CohortMethod``
interface (``method.py``) and owns what makes it that method: its training step (forward, logits,
loss terms, logged values), its after-step state update (queue enqueue, bank update) and which
monitor metric it reports (the loaders and the metric code are ``evaluation``'s). The engine's
Trainer only runs the loop and never asks which method it runs; ``cohort_class`` is the one place
that maps a config to a class.

Key layout (the converter relies on it, see docs/DESIGN.md): member k's backbone is
``members.{k}.encoder.*`` with torchvision ResNet names. In selfsup mode the encoder's ``fc`` is an
``nn.Identity`` (no keys), the MLP head is ``members.{k}.head.*`` and the momentum copies are
``members.{k}.encoder_k.*`` / ``members.{k}.head_k.*``. In supervised mode ``fc`` is the classifier.
The selfsup queues are ONE buffer ``queues`` (M x K x C) with ONE pointer, so the lockstep
alignment of the members' queues holds by construction, not by convention; the supervised banks
are ONE buffer ``banks`` (M x Nb x C; Nb = 0 without a bank).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from yacs.config import CfgNode

from ..utils.errors import MCLDetError
from . import distributed as dist_utils
from . import losses, losses_sup
from .choices import RESNETS
from .evaluation import EvalData, classifiers_top1, eval_loader, members_knn_top1
from .losses import loss_weights
from .method import CohortMethod, Forward, Step


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


ALL_TERMS = dict.fromkeys(losses.TERMS, 1.0)


# ---------------------------------------------------------------------------- self-supervised


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


class SelfSupCohort(CohortMethod):
    """M MoCo v2 members sharing the two crops and one lockstep queue pointer.

    ``forward(x_q, x_k)`` returns (qs, ks): per member NxC queries (with grad) and NxC keys (no
    grad), after the momentum update, as MoCo does. ``loss(qs, ks)`` builds the cohort's logits
    against its own queues and the weighted MCL terms; ``enqueue(ks)`` comes after the step.
    """

    metric = "knn_top1"

    def __init__(
        self,
        archs: Sequence[str],
        dim: int = 128,
        hidden: int = 0,
        queue_size: int = 65536,
        momentum: float = 0.999,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        tau: float = 0.2,
        T: float = 3.0,
        weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.archs = list(archs)
        self.members = nn.ModuleList(SelfSupMember(a, dim, hidden) for a in self.archs)
        self.momentum = momentum
        self.shuffle_bn = shuffle_bn
        self.bn_splits = max(1, int(bn_splits))
        self.tau, self.T = tau, T
        self.weights = dict(ALL_TERMS if weights is None else weights)
        self.needed = losses.needed_terms(self.weights)
        queues = F.normalize(torch.randn(len(self.archs), queue_size, dim), dim=2)
        self.register_buffer("queues", queues)  # M x K x C; row j of every queue = same image
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(
        cls, cfg: CfgNode, num_classes: int = 0, targets: Sequence[int] = ()
    ) -> SelfSupCohort:
        m = cfg.MODEL
        return cls(
            m.ARCHS,
            dim=m.DIM,
            hidden=m.HEAD_HIDDEN,
            queue_size=m.QUEUE_SIZE,
            momentum=m.MOMENTUM,
            shuffle_bn=m.SHUFFLE_BN,
            bn_splits=m.SHUFFLE_BN_SPLITS,
            tau=cfg.LOSS.TAU,
            T=cfg.LOSS.T,
            weights=loss_weights(cfg),
        )

    balanced_batches = False  # any batch will do
    min_classes = 1  # labels are not used

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

    def loss(self, qs: Sequence[Tensor], ks: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted MCL loss and its terms, in fp32 whatever the networks ran in (a softmax
        over 65k bf16 logits would lose the small probabilities)."""
        with torch.autocast(qs[0].device.type, enabled=False):
            q = torch.stack(list(qs)).float()  # MxNxC
            k = torch.stack(list(ks)).float()  # MxNxC
            cross = losses.needs_cross(self.needed)
            logits = losses.cohort_logits(q, k, self.queues, self.tau, cross)  # MxMxNxL / MxNxL
            terms = losses.mcl_loss_terms(logits, self.T, self.needed)
            return losses.combine(terms, self.weights), terms

    def training_step(self, forward: Forward, batch: tuple) -> Step:
        (x_q, x_k), _, _ = batch
        qs, ks = forward(x_q, x_k)
        loss, terms = self.loss(qs, ks)
        return Step(loss, terms, ks)

    def after_step(self, ks: Sequence[Tensor]) -> None:
        self.enqueue(ks)

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

    @torch.no_grad()
    def evaluate(self, cfg: CfgNode, data: EvalData) -> tuple[list[float], dict[str, Any]]:
        """Weighted-kNN top-1 of each member's backbone (the query encoder): labels are not
        trained on, so a kNN over the training images is the monitor."""
        return members_knn_top1([m.encoder for m in self.members], cfg, data), {}


# ---------------------------------------------------------------------------- supervised


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


class SupervisedCohort(CohortMethod):
    """M classifiers on the same batch: sum_m CE_m + the weighted MCL terms of a variant.

    This base class has no interaction terms (every member trains alone); the two variants
    below add them. ``banks`` (M x Nb x C, row i of every bank = dataset image i) is a buffer of
    every variant so the checkpoint layout does not depend on it (Nb = 0: no bank).
    """

    metric = "top1"
    balanced_batches = False
    min_classes = 2  # with one class every term is 0 and top-1 is 100 %

    def __init__(
        self,
        archs: Sequence[str],
        num_classes: int,
        dim: int = 128,
        hidden: int = 0,
        bank_size: int = 0,
        tau: float = 0.07,
        T: float = 3.0,
        weights: dict[str, float] | None = None,
        w_ce: float = 1.0,
        variant: str = "authors",
    ) -> None:
        super().__init__()
        self.archs = list(archs)
        self.members = nn.ModuleList(
            SupervisedMember(a, num_classes, dim, hidden) for a in self.archs
        )
        banks = F.normalize(torch.randn(len(self.archs), max(bank_size, 0), dim), dim=2)
        self.register_buffer("banks", banks)
        self.tau, self.T, self.w_ce, self.variant = tau, T, w_ce, variant
        self.weights = dict(ALL_TERMS if weights is None else weights)
        self.needed = losses.needed_terms(self.weights)

    @classmethod
    def _loss_kwargs(cls, cfg) -> dict[str, Any]:
        lc = cfg.LOSS
        return dict(
            tau=lc.TAU, T=lc.T, weights=loss_weights(cfg), w_ce=lc.W_CE, variant=lc.SUP_VARIANT
        )

    @classmethod
    def from_config(
        cls, cfg: CfgNode, num_classes: int, targets: Sequence[int] = ()
    ) -> SupervisedCohort:
        m = cfg.MODEL
        cohort = cls(m.ARCHS, num_classes, m.DIM, m.HEAD_HIDDEN, **cls._loss_kwargs(cfg))
        return cohort._sync_bn(cfg)

    def _sync_bn(self, cfg) -> SupervisedCohort:
        if cfg.MODEL.SYNC_BN and dist_utils.get_world_size() > 1:
            return nn.SyncBatchNorm.convert_sync_batchnorm(self)
        return self

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        outs = [m(x) for m in self.members]
        return [o[0] for o in outs], [o[1] for o in outs]

    def bank_list(self) -> list[Tensor]:
        return [self.banks[i] for i in range(len(self.archs))]

    def interaction_terms(self, zs: list[Tensor], y: Tensor, idx: Tensor) -> dict[str, Tensor]:
        """The needed MCL terms of this variant (fp32 embeddings, labels on the device)."""
        return {}

    def training_step(self, forward: Forward, batch: tuple) -> Step:
        x, y, idx = batch
        cls_logits, zs = forward(x)
        y = y.to(zs[0].device)
        zs = [z.float() for z in zs]  # M x NxC: the terms in fp32
        ce = sum(F.cross_entropy(lg.float(), y) for lg in cls_logits)
        terms = self.interaction_terms(zs, y, idx) if self.needed else {}
        loss = self.w_ce * ce + losses.combine(terms, self.weights)
        return Step(loss, {"ce": ce, **terms}, (zs, idx))

    def after_step(self, state: tuple[list[Tensor], Tensor]) -> None:
        """Nothing to update: no memory outside the networks."""

    @torch.no_grad()
    def evaluate(self, cfg: CfgNode, data: EvalData) -> tuple[list[float], dict[str, Any]]:
        """Top-1 (percent) of each member's classifier and of their ensemble (mean softmax)."""
        was = self.training
        self.eval()
        loader = eval_loader(data.val_set, cfg)
        acc = classifiers_top1(lambda x: self(x)[0], len(self.members), loader, data.device)
        self.train(was)
        return acc[:-1], {"ensemble_top1": acc[-1]}


class InBatchSupervisedCohort(SupervisedCohort):
    """In-batch (SupCon-style) contrast: the other images of the batch are the negatives and its
    same-class images the positives, so batches are class-balanced (small datasets)."""

    balanced_batches = True

    def interaction_terms(self, zs: list[Tensor], y: Tensor, idx: Tensor) -> dict[str, Tensor]:
        return losses_sup.inbatch_terms(zs, y, self.tau, self.T, self.needed, self.variant)


class BankSupervisedCohort(SupervisedCohort):
    """One memory bank per member (ImageNet size): per anchor one same-class positive and K
    sampled negatives from the banks, the same indices for every member; the banks take the
    gathered embeddings of every rank after each step. No bank at all when no interaction
    term is weighted (the independent baseline: an ImageNet bank is 655 MB per member)."""

    def __init__(
        self,
        *args: Any,
        targets: Sequence[int] = (),
        bank_negatives: int = 8192,
        bank_momentum: float = 0.5,
        **kwargs: Any,
    ) -> None:
        """``SupervisedCohort``'s arguments, plus the training labels in dataset order (sorted by
        class) and the bank's sampling and update settings."""
        super().__init__(*args, **kwargs)
        self.bank_momentum = bank_momentum
        self.blocks = class_blocks(list(targets)) if len(targets) else None  # (start, count)
        count = self.blocks[1] if self.blocks is not None else torch.zeros(1)
        # every negative must come from another class: at most the images outside the largest
        self.bank_negatives = min(bank_negatives, int(count.sum() - count.max()))

    @classmethod
    def from_config(
        cls, cfg: CfgNode, num_classes: int, targets: Sequence[int] = ()
    ) -> SupervisedCohort:
        m, needed = cfg.MODEL, losses.needed_terms(loss_weights(cfg))
        bank_size = len(targets) if needed else 0
        cohort = cls(
            m.ARCHS,
            num_classes,
            m.DIM,
            m.HEAD_HIDDEN,
            bank_size,
            targets=targets,
            bank_negatives=cfg.SUP.BANK_NEGATIVES,
            bank_momentum=cfg.SUP.BANK_MOMENTUM,
            **cls._loss_kwargs(cfg),
        )
        return cohort._sync_bn(cfg)

    def interaction_terms(self, zs: list[Tensor], y: Tensor, idx: Tensor) -> dict[str, Tensor]:
        if self.blocks is None or self.banks.shape[1] == 0:
            raise RuntimeError("the memory-bank cohort was built without the training labels")
        start, count = self.blocks
        pos, neg = sample_bank_indices(y.cpu(), idx, start, count, self.bank_negatives)
        dev = zs[0].device
        idx, pos, neg = idx.to(dev), pos.to(dev), neg.to(dev)
        return losses_sup.bank_terms(
            zs, self.banks, idx, pos, neg, self.tau, self.T, self.needed, self.variant
        )

    def after_step(self, state: tuple[list[Tensor], Tensor]) -> None:
        """Lockstep bank updates with what every rank saw (gathered)."""
        if not self.needed:
            return
        zs, idx = state
        idx_all = dist_utils.concat_all_gather(idx.to(self.banks.device))
        for bank, z in zip(self.bank_list(), zs):
            z_all = dist_utils.concat_all_gather(z.detach())
            losses_sup.bank_update(bank, idx_all, z_all, self.bank_momentum)


def class_blocks(targets: list[int]) -> tuple[Tensor, Tensor]:
    """(start, count) of each class in a class-sorted sample list (SafeImageFolder order)."""
    t = torch.as_tensor(targets, device="cpu")  # sampled on the CPU, whatever the device
    if bool((t[1:] < t[:-1]).any()):
        raise RuntimeError("bank sampling needs samples sorted by class")
    count = torch.bincount(t)
    start = torch.cumsum(count, 0) - count
    return start, count


def sample_bank_indices(
    labels: Tensor, idx: Tensor, start: Tensor, count: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """One same-class positive (not the anchor itself when its class has another image) and k
    negatives from other classes per anchor; used for EVERY member (aligned distributions).

    labels, idx: B (class, dataset index) -> pos: B, neg: Bxk. Uses the global torch RNG.
    """
    n_total = int(count.sum())
    s, c = start[labels], count[labels]  # B
    r = (torch.rand(labels.shape) * (c - 1).clamp(min=1)).long()  # B, in [0, c-2]
    pos = s + r
    pos = torch.where(pos >= idx, pos + 1, pos)  # skip the anchor itself
    pos = torch.where(c > 1, pos, idx)  # a class with one image: the anchor is its own positive
    r = (torch.rand(labels.shape[0], k) * (n_total - c).unsqueeze(1)).long()  # Bxk
    neg = torch.where(r >= s.unsqueeze(1), r + c.unsqueeze(1), r)  # jump over the class block
    return pos, neg


# ---------------------------------------------------------------------------- choosing one

COHORTS: dict[tuple[str, str], type[CohortMethod]] = {
    ("selfsup", ""): SelfSupCohort,
    ("supervised", "bank"): BankSupervisedCohort,
    ("supervised", "batch"): InBatchSupervisedCohort,
}


def cohort_class(cfg: CfgNode) -> type[CohortMethod]:
    """The method class a (validated) config asks for: MODE, and SUP.NEGATIVES when supervised."""
    return COHORTS[(cfg.MODE, cfg.SUP.NEGATIVES if cfg.MODE == "supervised" else "")]


def build_cohort(cfg: CfgNode, num_classes: int = 0, targets: Sequence[int] = ()) -> CohortMethod:
    """Build the cohort of a resolved config (MODEL.ARCHS names every member).

    ``targets``: the training labels in dataset order (class-sorted), which the memory-bank
    variant needs for its size and sampling; without them it has no bank.
    """
    return cohort_class(cfg).from_config(cfg, num_classes, targets)
