"""Supervised MCL terms: a memory bank per member (ImageNet-size data) or in-batch SupCon.

Two definitions are kept (``variant``):

* ``"authors"`` (the default): the terms as the MCL authors' code defines them, the code behind
  the published numbers. We wrote it from their definitions; no code is copied.
* ``"single_positive"``: our earlier definitions. Every row has one positive (bank) or treats
  the peer's view of the anchor's own image as a positive (in-batch); kept for comparisons with
  runs made before the change.

The two differ only in terms that compare DIFFERENT members (the cross-network rows) and in the
in-batch Soft VCL; the table below gives the rows. Notation: z_a[i] member a's unit-norm
embedding of anchor i, bank_b[j] member b's memory of dataset image j, tau the contrast
temperature, T the KL temperature.

Memory bank (idx[i] the anchor's own dataset index, pos[i] a sampled same-class index,
neg[i, :] K negatives; the same indices for every member so that column j means the same image
in every row):

* VCL row of (a, a):  [z_a.bank_a[pos], z_a.bank_a[neg]] / tau, positive: column 0. The own entry
  bank_a[idx] is left out: it is (a running mean of) the anchor itself. Both variants.
* ICL row of (a, b), a != b, ``authors``: [z_a.bank_b[idx], z_a.bank_b[pos], z_a.bank_b[neg]] /
  tau with TWO positives, the peer's memory of the same image and of the sampled image; the loss
  is -mean over the two positives of their log-softmax (SupCon-style), batch mean.
  ``single_positive``: the VCL-shaped row [pos, neg], positive column 0.
* Soft VCL: T^2 KL(softmax(VCL row of b / T) || softmax(VCL row of a / T)), b detached.
* Soft ICL: T^2 KL(softmax(row (b, a) / T) || softmax(row (a, b) / T)) over the ICL row's
  columns ([own, pos, neg] with ``authors``), (b, a) detached.

In-batch (S_ab = z_a z_b^T / tau, NxN; column j is image j for every member):

* VCL: row S_aa[i] without column i (denominator and positives); positives: same label. Both.
* ICL, ``authors``: row S_ab[i] without column i as well, the peer's view of the same image is
  neither a positive nor in the denominator. ``single_positive``: all N columns, j == i a positive.
* Soft VCL, ``authors``: KL over the whole N-column row S_aa[i], including the anchor's constant
  self-similarity 1/tau. ``single_positive``: over the N-1 columns without it.
* Soft ICL: KL over the whole row S_ab[i] against S_ba[i]. Both.

Where we follow the authors exactly (winycg/MCL, losses/imagenet_sup_mcl_loss.py and
losses/cifar_sup_mcl_loss.py, pos_k = 1): logits are dot products over tau; a CE term is the
batch mean of -(mean over the row's positives of log softmax); a KL term is
F.kl_div(log_softmax(student/T), softmax(teacher/T), batchmean) * T^2 with the teacher
detached; every term is a plain SUM over members (VCL, Soft VCL over ordered pairs) or over
ordered pairs a != b (ICL, Soft ICL), never averaged over the cohort.
Where we do not (docs/GETTING_STARTED.md): the caller's sampled positive is never the anchor
itself unless its class has one image; an in-batch anchor whose class appears once has no
positive and is left out of the CE means (the authors' loss is NaN then).

The rows of a cohort are stacked into one MxMxNxL (or, without cross terms, MxNxL) tensor as for
the self-supervised terms, and every term whose math is the same (CE with the positives first,
T^2 KL against the detached transposed cell) is computed by ``losses``' functions; only the
SupCon CE of the in-batch rows (a positive mask per anchor) is specific to this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mcl_det.pretrain.losses import (
    ce_terms,
    check_terms,
    diagonal_cells,
    kl_terms,
    mcl_loss_terms,
    needs_cross,
    upcast,
)

SUP_VARIANTS = ("authors", "single_positive")


def _check_variant(variant: str) -> None:
    if variant not in SUP_VARIANTS:
        raise ValueError(f"unknown supervised variant {variant!r}; known: {list(SUP_VARIANTS)}")


def _zeros(names: Iterable[str], ref: Tensor) -> dict[str, Tensor]:
    """The pair terms of a cohort of one: empty sums."""
    return {name: ref.new_zeros(()) for name in names}


# --------------------------------------------------------------------------------------------
# Memory bank (ImageNet-size data)
# --------------------------------------------------------------------------------------------


def bank_terms(
    zs: Sequence[Tensor],
    banks: Tensor | Sequence[Tensor],
    idx: Tensor,
    pos: Tensor,
    neg: Tensor,
    tau: float,
    T: float,
    needed: Iterable[str] | None,
    variant: str = "authors",
) -> dict[str, Tensor]:
    """The needed MCL terms against per-member memory banks (rows: see the module docstring).

    zs: M x NxC unit-norm live embeddings; banks: MxNbxC or M x NbxC unit-norm memories (no
    gradient flows into them); idx: N the anchors' dataset indices; pos: N one same-class index
    per anchor; neg: NxK per-anchor negatives or K negatives shared by the batch (one KxC
    gather instead of NxKxC). The same indices serve every member so the KL rows are aligned.
    Returns scalars for the terms in ``needed`` (None: all four); unneeded cross rows are not
    computed. The per-anchor gather is NxKxC per bank (N=256, K=8192, C=128 fp32: 1 GiB).
    """
    _check_variant(variant)
    needed = check_terms(needed)
    bank_list = list(banks.unbind(0)) if torch.is_tensor(banks) else list(banks)
    m = len(zs)
    if m < 1 or len(bank_list) != m:
        raise ValueError(f"bank_terms: got {m} embeddings and {len(bank_list)} banks")
    n, c = zs[0].shape
    for name, t in (("idx", idx), ("pos", pos)):
        if t.shape != (n,):
            raise ValueError(f"bank_terms: {name} must have shape ({n},), got {tuple(t.shape)}")
    if neg.dim() not in (1, 2) or (neg.dim() == 2 and neg.shape[0] != n):
        raise ValueError(f"bank_terms: neg must be NxK or K, got {tuple(neg.shape)}")
    if not needed:
        return {}
    cross = needs_cross(needed) and m > 1
    own_column = cross and variant == "authors"
    z = torch.stack([upcast(x) for x in zs]) / tau  # MxNxC, scaled once
    shared = neg.dim() == 1
    n_neg = neg.shape[-1]
    pos_l, own_l, neg_l = [], [], []  # per bank b
    for b, bank in enumerate(bank_list):
        bank = bank.detach()
        pos_b = bank[pos].to(z.dtype)  # NxC
        neg_b = bank[neg].to(z.dtype)  # NxKxC or KxC
        if cross:  # every member a against bank b
            pos_l.append((z * pos_b).sum(dim=2))  # MxN: [a, i]
            if own_column:
                own_l.append((z * bank[idx].to(z.dtype)).sum(dim=2))  # MxN
            if shared:
                neg_l.append((z.reshape(m * n, c) @ neg_b.t()).view(m, n, n_neg))  # MxNxK
            else:  # one bmm for all members: NxKxC @ NxCxM -> NxKxM
                neg_l.append(torch.bmm(neg_b, z.permute(1, 2, 0)).permute(2, 0, 1))  # MxNxK
        else:  # only the diagonal (b, b)
            pos_l.append((z[b] * pos_b).sum(dim=1))  # N
            if shared:
                neg_l.append(z[b] @ neg_b.t())  # NxK
            else:
                neg_l.append(torch.bmm(neg_b, z[b].unsqueeze(2)).squeeze(2))  # NxK
    if not cross:  # MxNx(1+K): the VCL rows [pos, neg] of every member
        diag = torch.cat([torch.stack(pos_l).unsqueeze(2), torch.stack(neg_l)], dim=2)
        out = mcl_loss_terms(diag, T, needed & {"vcl", "soft_vcl"})
        out.update(_zeros(needed - set(out), z))  # M = 1: no pairs
        return out
    # [a, b, i, :] = row of anchor i of member a against bank b: MxMxNx(1+K) or MxMxNx(2+K)
    columns = [torch.stack(pos_l, dim=1).unsqueeze(3), torch.stack(neg_l, dim=1)]
    if not own_column:  # single_positive: every cell is [pos, neg], the self-supervised layout
        return mcl_loss_terms(torch.cat(columns, dim=3), T, needed)
    cells = torch.cat([torch.stack(own_l, dim=1).unsqueeze(3), *columns], dim=3)
    diag = diagonal_cells(cells)[..., 1:]  # MxNx(1+K): the VCL rows, without the own column
    return {
        **mcl_loss_terms(diag, T, needed & {"vcl", "soft_vcl"}),
        **ce_terms(cells, needed & {"icl"}, n_pos=2),  # positives: own and sampled
        **kl_terms(cells, T, needed & {"soft_icl"}),
    }


@torch.no_grad()
def bank_update(bank: Tensor, idx: Tensor, z: Tensor, momentum: float = 0.5) -> None:
    """In place: bank[idx] = normalize(momentum * bank[idx] + (1 - momentum) * z), no grad.

    bank: NbxC, idx: N (distinct dataset indices: with duplicates the last write wins, in no
    defined order), z: NxC embeddings of those samples.
    """
    new = bank[idx] * momentum + z.detach().to(bank.dtype) * (1.0 - momentum)  # NxC
    bank.index_copy_(0, idx, F.normalize(new, dim=1))


# --------------------------------------------------------------------------------------------
# In-batch SupCon (small datasets)
# --------------------------------------------------------------------------------------------


def _drop_diagonal(x: Tensor) -> Tensor:
    """...xNxN -> ...xNx(N-1) without the diagonal; the order of the other columns is kept."""
    n = x.shape[-1]
    lead = x.shape[:-2]
    flat = x.reshape(*lead, n * n)[..., 1:]  # the first diagonal entry dropped
    return flat.reshape(*lead, n - 1, n + 1)[..., :-1].reshape(*lead, n, n - 1)


def _supcon(logits: Tensor, positives: Tensor, self_out: bool) -> Tensor:
    """Per cell: mean over anchors with a positive of -(mean over positives of log softmax).

    logits: PxNxN, positives: NxN bool (the same for every cell) -> P. ``self_out``: column i
    of row i leaves the denominator (-inf logit); the caller has taken it out of ``positives``.
    Anchors without a positive are left out of the mean (none at all: a graph-connected 0).
    """
    n = logits.shape[1]
    if self_out:
        eye = torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(eye, float("-inf"))
    log_prob = F.log_softmax(logits, dim=2)  # PxNxN
    n_pos = positives.sum(dim=1).to(log_prob.dtype)  # N
    valid = (n_pos > 0).to(log_prob.dtype)  # N
    # where(), not a product: the -inf of a left-out column must not make 0 * -inf = NaN
    picked = torch.where(positives, log_prob, log_prob.new_zeros(()))  # PxNxN
    per_anchor = -picked.sum(dim=2) / n_pos.clamp(min=1)  # PxN
    return (per_anchor * valid).sum(dim=1) / valid.sum().clamp(min=1)  # P


def inbatch_terms(
    zs: Sequence[Tensor],
    labels: Tensor,
    tau: float,
    T: float,
    needed: Iterable[str] | None = None,
    variant: str = "authors",
) -> dict[str, Tensor]:
    """The needed MCL terms with in-batch SupCon contrast (rows: see the module docstring).

    zs: M x NxC unit-norm embeddings of the same batch, one per member; labels: N. Every row's
    columns are the batch's images, so rows of different members are aligned by construction.
    Anchors whose class appears once have no positive and are left out of the CE means; use a
    class-balanced sampler. Returns scalars for the terms in ``needed`` (None: all four).
    """
    _check_variant(variant)
    needed = check_terms(needed)
    m = len(zs)
    if m < 1:
        raise ValueError("inbatch_terms: no embeddings")
    n, c = zs[0].shape
    if labels.shape != (n,):
        raise ValueError(f"inbatch_terms: labels must have shape ({n},), got {tuple(labels.shape)}")
    if n < 2:
        raise ValueError("inbatch_terms: need a batch of at least 2 samples")
    if not needed:
        return {}
    authors = variant == "authors"
    cross = needs_cross(needed) and m > 1
    z = torch.stack([upcast(x) for x in zs])  # MxNxC
    same = labels.view(-1, 1) == labels.view(1, -1)  # NxN
    eye = torch.eye(n, dtype=torch.bool, device=same.device)
    same_other = same & ~eye  # NxN: positives without the anchor itself
    if cross:  # every pair at once: [a, b, i, j] = z_a[i] . z_b[j] / tau
        flat = z.reshape(m * n, c)
        grid = ((flat / tau) @ flat.t()).view(m, n, m, n).permute(0, 2, 1, 3)  # MxMxNxN
        diag = diagonal_cells(grid)  # MxNxN
    else:
        diag = torch.bmm(z / tau, z.transpose(1, 2))  # MxNxN
    out: dict[str, Tensor] = {}
    if "vcl" in needed:
        out["vcl"] = _supcon(diag, same_other, self_out=True).sum()
    out.update(kl_terms(diag if authors else _drop_diagonal(diag), T, needed & {"soft_vcl"}))
    if cross:
        if "icl" in needed:
            positives = same_other if authors else same
            ce = _supcon(grid.flatten(0, 1), positives, self_out=authors).view(m, m)  # MxM
            out["icl"] = ce.sum() - ce.diagonal().sum()  # the pairs a != b
        out.update(kl_terms(grid, T, needed & {"soft_icl"}))
    out.update(_zeros(needed - set(out), z))  # M = 1: no pairs
    return out
