"""MCL loss terms (Yang et al., AAAI 2022) as pure functions of logits and embeddings.

Why pure functions: the cohort model, the engine and the tests all need the *same* four terms, and
the tests compare them with a loop-by-loop transcription of the paper's formulas. Nothing here owns
state except ``bank_update``, which mutates a memory bank in place on purpose.

Shapes used in the comments: N batch, C embedding dim (128), K negatives, M cohort size,
Nb memory-bank size.

The four terms, for a cohort of M members and the "pair logits" s(a->b) (positive at column 0):

* ``vcl``      = sum_m CE(s(m->m), 0)                                 -- each member's own contrast
* ``icl``      = sum_{a!=b} CE(s(a->b), 0)                            -- a's query vs b's keys
* ``soft_vcl`` = sum_{a!=b} T^2 KL(softmax(s(b->b)/T) || softmax(s(a->a)/T)), b side detached
* ``soft_icl`` = sum_{a!=b} T^2 KL(softmax(s(b->a)/T) || softmax(s(a->b)/T)), b->a side detached

The KL terms only make sense when column j of every member's logits refers to the same sample
(queues enqueued in lockstep, the same sampled bank indices, the same batch); the callers
guarantee this, these functions cannot check it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

TERMS = ("vcl", "icl", "soft_vcl", "soft_icl")
_CROSS_TERMS = frozenset({"icl", "soft_icl"})  # the only terms that need s(a->b) for a != b


def needed_terms(weights: Mapping[str, float]) -> set[str]:
    """The terms whose weight is non-zero: pass it as ``needed`` so 0-weight terms cost nothing."""
    unknown = set(weights) - set(TERMS)
    if unknown:
        raise ValueError(f"unknown MCL loss term(s) {sorted(unknown)}; known: {list(TERMS)}")
    return {name for name, w in weights.items() if w != 0}


def needs_cross(needed: Iterable[str] | None) -> bool:
    """Whether the off-diagonal logits s(a->b), a != b, must be computed at all."""
    return needed is None or bool(_CROSS_TERMS & set(needed))


# --------------------------------------------------------------------------------------------
# Self-supervised (MoCo queue) logits
# --------------------------------------------------------------------------------------------


def pair_logits(q: Tensor, k: Tensor, queue: Tensor, tau: float) -> Tensor:
    """s = [q . k , q . queue^T] / tau, positive at column 0.

    q: NxC queries, k: NxC positive keys, queue: KxC negatives -> Nx(1+K).
    q is scaled by 1/tau before the products so the NxK block is not divided a second time.
    """
    q = q / tau  # NxC
    pos = (q * k).sum(dim=1, keepdim=True)  # Nx1
    neg = q @ queue.t()  # NxK (queue has no grad: it holds detached keys)
    return torch.cat([pos, neg], dim=1)  # Nx(1+K)


def cohort_logits(
    qs: Sequence[Tensor],
    ks: Sequence[Tensor],
    queues: Sequence[Tensor],
    tau: float,
    cross: bool = True,
) -> list[list[Tensor | None]]:
    """logits[a][b] = s(a->b) = [q_a . k_b, q_a . Queue_b] / tau for every ordered pair (a, b).

    qs[m]: NxC, ks[m]: NxC, queues[m]: KxC. The diagonal a == b is member a's own (MoCo) logits.
    The negatives of all members against Queue_b come from ONE (M*N)xC @ CxK matmul (the same
    FLOPs as one matmul per pair, but each K x C queue is read once instead of M times, which is
    what costs on a CPU at N=32). Nothing quadratic in K is built. With ``cross=False`` (no
    cross-member term has a non-zero weight) only the diagonal is computed; the rest is ``None``.
    """
    m = len(qs)
    if not (len(ks) == m and len(queues) == m):
        raise ValueError(f"cohort_logits: got {m} qs, {len(ks)} ks, {len(queues)} queues")
    out: list[list[Tensor | None]] = [[None] * m for _ in range(m)]
    if not cross:
        for a in range(m):
            out[a][a] = pair_logits(qs[a], ks[a], queues[a], tau)
        return out
    n = qs[0].shape[0]
    q_all = torch.cat(list(qs), dim=0) / tau  # (M*N)xC, row a*N + i is q_a[i]
    for b in range(m):
        negs = (q_all @ queues[b].t()).split(n)  # M x NxK (split: its backward is one cat)
        poss = (q_all.view(m, n, -1) * ks[b]).sum(dim=2, keepdim=True).unbind(0)  # M x Nx1
        for a in range(m):
            out[a][b] = torch.cat([poss[a], negs[a]], dim=1)  # Nx(1+K)
    return out


# --------------------------------------------------------------------------------------------
# The four terms
# --------------------------------------------------------------------------------------------


def soft_kl(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean; the teacher gets no gradient.

    student, teacher: NxL logits (same L, same column meaning) -> scalar. The T^2 factor keeps the
    gradient scale independent of T (Hinton et al.).
    """
    return _kl_from_log_probs(_log_soft(student, T), _log_soft(teacher, T).detach(), T)


def _upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> float32 (a softmax over 65k half-precision logits loses the small
    probabilities); float32/float64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_soft(logits: Tensor, T: float) -> Tensor:
    return F.log_softmax(_upcast(logits) / T, dim=1)  # NxL


def _kl_from_log_probs(log_p_student: Tensor, log_p_teacher: Tensor, T: float) -> Tensor:
    # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q); batchmean = / N
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (T * T)


def _ce_pos0(logits: Tensor) -> Tensor:
    """CE with the positive at column 0, mean over the batch. logits: NxL -> scalar."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # N
    return F.cross_entropy(_upcast(logits), target)


def _soft_terms(
    logits: Sequence[Sequence[Tensor | None]], T: float, needed: set[str]
) -> dict[str, Tensor]:
    """soft_vcl and soft_icl from any M x M grid of aligned logits (shared by both modes).

    Each log-softmax is computed once and reused as student (with grad) and, detached, as teacher.
    """
    m = len(logits)
    out: dict[str, Tensor] = {}
    if "soft_vcl" in needed:
        diag = [_log_soft(logits[a][a], T) for a in range(m)]  # M x NxL
        out["soft_vcl"] = sum(
            _kl_from_log_probs(diag[a], diag[b].detach(), T)
            for a in range(m)
            for b in range(m)
            if a != b
        )
    if "soft_icl" in needed:
        cross = {
            (a, b): _log_soft(logits[a][b], T) for a in range(m) for b in range(m) if a != b
        }  # NxL each
        out["soft_icl"] = sum(
            _kl_from_log_probs(cross[a, b], cross[b, a].detach(), T)
            for a in range(m)
            for b in range(m)
            if a != b
        )
    return out


def _check_needed(needed: Iterable[str] | None) -> set[str]:
    if needed is None:
        return set(TERMS)
    needed = set(needed)
    unknown = needed - set(TERMS)
    if unknown:
        raise ValueError(f"unknown MCL loss term(s) {sorted(unknown)}; known: {list(TERMS)}")
    return needed


def mcl_loss_terms(
    logits: Sequence[Sequence[Tensor | None]],
    T: float = 3.0,
    needed: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """The four MCL terms from the M x M grid of pair logits s(a->b) (positive at column 0).

    logits[a][b]: NxL, any L (MoCo: 1+K; memory bank: 1+K). Returns scalars for the terms in
    ``needed`` (default: all four); the others are neither computed nor returned, so an ablation
    with weight 0 does not pay for them (and off-diagonal logits may then be ``None``).
    CE is the batch mean; the sums over members/pairs are plain sums (not averaged over M).
    """
    needed = _check_needed(needed)
    m = len(logits)
    if m < 1 or any(len(row) != m for row in logits):
        raise ValueError("mcl_loss_terms: logits must be a square M x M grid")
    if needs_cross(needed) and any(
        logits[a][b] is None for a in range(m) for b in range(m) if a != b
    ):
        raise ValueError("mcl_loss_terms: icl/soft_icl need the cross logits (cross=True)")
    out: dict[str, Tensor] = {}
    if "vcl" in needed:
        out["vcl"] = sum(_ce_pos0(logits[a][a]) for a in range(m))
    if "icl" in needed:
        out["icl"] = sum(_ce_pos0(logits[a][b]) for a in range(m) for b in range(m) if a != b)
    out.update(_soft_terms(logits, T, needed))
    # M == 1 leaves the pair sums empty (python 0): make every returned term a tensor.
    ref = logits[0][0]
    return {k: v if torch.is_tensor(v) else ref.new_zeros(()) for k, v in out.items()}


def combine(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Weighted sum of the terms. A weight of exactly 0 skips its term entirely, so a missing or
    NaN 0-weight term cannot leak into the loss; a non-zero weight on a missing term is an error."""
    total: Tensor | None = None
    for name, w in weights.items():
        if w == 0:
            continue
        if name not in terms:
            raise KeyError(f"loss term {name!r} has weight {w} but was not computed")
        part = terms[name] * w
        total = part if total is None else total + part
    if total is None:  # every weight 0: a zero that still has a device/dtype
        ref = next(iter(terms.values()), None)
        return ref.new_zeros(()) if ref is not None else torch.zeros(())
    return total


# --------------------------------------------------------------------------------------------
# Supervised mode, memory-bank variant (ImageNet-size data)
# --------------------------------------------------------------------------------------------


def bank_logits(
    zs: Sequence[Tensor],
    banks: Sequence[Tensor],
    pos_idx: Tensor,
    neg_idx: Tensor,
    tau: float,
    cross: bool = True,
) -> list[list[Tensor | None]]:
    """logits[a][b] = [z_a . bank_b[pos], z_a . bank_b[neg]] / tau -> Nx(1+K), positive at col 0.

    zs[a]: NxC live (L2-normalised) embeddings of member a; banks[b]: NbxC L2-normalised bank.
    pos_idx: N, one same-class bank entry per anchor. neg_idx: NxK per-anchor negatives, or K
    negatives shared by the whole batch (much cheaper: one KxC gather instead of NxKxC). The
    SAME indices must be used for every member so the KL terms compare aligned distributions.
    Feed the result to ``mcl_loss_terms`` unchanged.

    Memory: the per-anchor form gathers an NxKxC block per bank (N=256, K=8192, C=128, fp32:
    1 GiB); it is computed once per bank b and reused for every anchor member a.
    """
    m = len(zs)
    if len(banks) != m:
        raise ValueError(f"bank_logits: got {m} embeddings and {len(banks)} banks")
    n = zs[0].shape[0]
    if pos_idx.shape != (n,):
        raise ValueError(f"bank_logits: pos_idx must have shape ({n},), got {tuple(pos_idx.shape)}")
    if neg_idx.dim() not in (1, 2) or (neg_idx.dim() == 2 and neg_idx.shape[0] != n):
        raise ValueError(f"bank_logits: neg_idx must be NxK or K, got {tuple(neg_idx.shape)}")
    out: list[list[Tensor | None]] = [[None] * m for _ in range(m)]
    for b in range(m):
        bank = banks[b].detach()
        pos_b = bank[pos_idx]  # NxC
        neg_b = bank[neg_idx]  # NxKxC (per anchor) or KxC (shared)
        for a in range(m):
            if not (cross or a == b):
                continue
            z = zs[a] / tau  # NxC
            pos = (z * pos_b).sum(dim=1, keepdim=True)  # Nx1
            if neg_b.dim() == 3:
                neg = torch.bmm(neg_b, z.unsqueeze(2)).squeeze(2)  # NxK
            else:
                neg = z @ neg_b.t()  # NxK
            out[a][b] = torch.cat([pos, neg], dim=1)  # Nx(1+K)
    return out


@torch.no_grad()
def bank_update(bank: Tensor, idx: Tensor, z: Tensor, momentum: float = 0.5) -> None:
    """In place: bank[idx] = normalize(momentum * bank[idx] + (1 - momentum) * z), no grad.

    bank: NbxC, idx: N (distinct dataset indices: with duplicates the last write wins, in no
    defined order), z: NxC embeddings of those samples.
    """
    new = bank[idx] * momentum + z.detach().to(bank.dtype) * (1.0 - momentum)  # NxC
    bank.index_copy_(0, idx, F.normalize(new, dim=1))


# --------------------------------------------------------------------------------------------
# Supervised mode, in-batch variant (small datasets, SupCon-style)
# --------------------------------------------------------------------------------------------


def _drop_diagonal(x: Tensor) -> Tensor:
    """NxN -> Nx(N-1) without the diagonal; column order of the remaining entries is kept."""
    n = x.shape[0]
    return x.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def _supcon_ce(logits: Tensor, pos_mask: Tensor) -> Tensor:
    """mean_{i: P(i) non-empty} -1/|P(i)| sum_{p in P(i)} log softmax(logits_i)_p.

    logits: NxL, pos_mask: NxL bool -> scalar. Anchors without a positive are left out of the mean
    (if none has one the result is a graph-connected 0). Masks instead of boolean indexing: no
    device -> host sync.
    """
    log_prob = F.log_softmax(_upcast(logits), dim=1)  # NxL
    pos = pos_mask.to(log_prob.dtype)  # NxL
    n_pos = pos.sum(dim=1)  # N
    valid = (n_pos > 0).to(log_prob.dtype)  # N
    per_anchor = -(pos * log_prob).sum(dim=1) / n_pos.clamp(min=1)  # N (0 where no positive)
    return (per_anchor * valid).sum() / valid.sum().clamp(min=1)


def supcon_terms(
    zs: Sequence[Tensor],
    labels: Tensor,
    tau: float,
    T: float = 3.0,
    needed: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """The four MCL terms with in-batch SupCon-style contrast (no queue, no bank).

    zs[m]: NxC L2-normalised embeddings of the same batch from member m; labels: N.
    For anchor i of member a against member b: S_ab = z_a z_b^T / tau (NxN). When a == b the
    anchor's own column i is removed from the row (denominator and positives), giving Nx(N-1);
    when a != b all N columns stay, and j == i (the same image seen by b) is a positive.
    Positives P_ab(i) = {j in row : labels[j] == labels[i]}.

        L_supcon(a, b) = mean_{i: P_ab(i) != {}} -1/|P_ab(i)| sum_{p in P_ab(i)}
                         log( exp(S_ab[i,p]) / sum_{j in row} exp(S_ab[i,j]) )
        vcl      = sum_m L_supcon(m, m)
        icl      = sum_{a!=b} L_supcon(a, b)
        soft_vcl = sum_{a!=b} T^2 KL(softmax(S_bb[i]/T) || softmax(S_aa[i]/T)), batch mean, b detached
        soft_icl = sum_{a!=b} T^2 KL(softmax(S_ba[i]/T) || softmax(S_ab[i]/T)), batch mean, b->a det.

    The rows are aligned because every member sees the same batch: column j is sample j in every
    S_ab (with the diagonal dropped in S_aa and S_bb alike). Anchors whose class appears once in
    the batch have no positive in S_mm and are left out of vcl's mean; use a class-balanced sampler.
    """
    needed = _check_needed(needed)
    m = len(zs)
    n = zs[0].shape[0]
    if labels.shape != (n,):
        raise ValueError(f"supcon_terms: labels must have shape ({n},), got {tuple(labels.shape)}")
    if n < 2:
        raise ValueError("supcon_terms: need a batch of at least 2 samples")
    cross = needs_cross(needed)
    same = labels.view(-1, 1) == labels.view(1, -1)  # NxN bool
    same_offdiag = _drop_diagonal(same)  # Nx(N-1)
    scaled = [z / tau for z in zs]  # M x NxC
    logits: list[list[Tensor | None]] = [[None] * m for _ in range(m)]
    for a in range(m):
        for b in range(m):
            if a == b:
                logits[a][b] = _drop_diagonal(scaled[a] @ zs[b].t())  # Nx(N-1)
            elif cross:
                logits[a][b] = scaled[a] @ zs[b].t()  # NxN
    out: dict[str, Tensor] = {}
    if "vcl" in needed:
        out["vcl"] = sum(_supcon_ce(logits[a][a], same_offdiag) for a in range(m))
    if "icl" in needed:
        out["icl"] = sum(
            _supcon_ce(logits[a][b], same) for a in range(m) for b in range(m) if a != b
        )
    out.update(_soft_terms(logits, T, needed))
    ref = zs[0]
    return {k: v if torch.is_tensor(v) else ref.new_zeros(()) for k, v in out.items()}
