"""MCL loss terms (Yang et al., AAAI 2022) as pure functions of logits and embeddings.

Why pure functions: the cohort models, the benchmarks and the tests all need the *same* four
terms, and the tests compare them with a loop-by-loop transcription of the paper's formulas.
Nothing here owns state except ``bank_update``, which mutates a memory bank in place on purpose.

Shapes used in the comments: N batch, C embedding dim (128), K negatives, M cohort size,
L = 1 + K logits per row, Nb memory-bank size.

The four terms, for a cohort of M members and the "pair logits" s(a->b) (positive at column 0):

* ``vcl``      = sum_m CE(s(m->m), 0)                                 -- each member's own contrast
* ``icl``      = sum_{a!=b} CE(s(a->b), 0)                            -- a's query vs b's keys
* ``soft_vcl`` = sum_{a!=b} T^2 KL(softmax(s(b->b)/T) || softmax(s(a->a)/T)), b side detached
* ``soft_icl`` = sum_{a!=b} T^2 KL(softmax(s(b->a)/T) || softmax(s(a->b)/T)), b->a side detached

The KL terms only make sense when column j of every member's logits refers to the same sample
(queues enqueued in lockstep, the same sampled bank indices, the same batch); the callers
guarantee this, these functions cannot check it.

Why batched: the whole cohort's logits are ONE MxMxNxL tensor (cell [a, b] = s(a->b)), so each
term is one batched call for the whole cohort instead of one per pair of members, and plain
autograd does the backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

TERMS = ("vcl", "icl", "soft_vcl", "soft_icl")
_CROSS_TERMS = frozenset({"icl", "soft_icl"})  # the only terms that need s(a->b) for a != b


def check_terms(needed: Iterable[str] | None) -> set[str]:
    """The set of term names (None: all four); an unknown name is an error."""
    if needed is None:
        return set(TERMS)
    needed = set(needed)
    unknown = needed - set(TERMS)
    if unknown:
        raise ValueError(f"unknown MCL loss term(s) {sorted(unknown)}; known: {list(TERMS)}")
    return needed


def needed_terms(weights: Mapping[str, float]) -> set[str]:
    """The terms whose weight is non-zero: pass it as ``needed`` so 0-weight terms cost nothing."""
    check_terms(weights)
    return {name for name, w in weights.items() if w != 0}


def needs_cross(needed: Iterable[str] | None) -> bool:
    """Whether the off-diagonal logits s(a->b), a != b, must be computed at all."""
    return needed is None or bool(_CROSS_TERMS & set(needed))


def cohort_logits(q: Tensor, k: Tensor, queue: Tensor, tau: float, cross: bool = True) -> Tensor:
    """s(a->b) = [q_a . k_b, q_a . queue_b] / tau for every ordered pair (a, b), positive at col 0.

    q: MxNxC queries, k: MxNxC keys, queue: MxKxC (detached keys, no grad) -> MxMxNx(1+K), cell
    [a, b] = s(a->b); with ``cross=False`` (no cross-member term weighted) only the diagonal,
    MxNx(1+K). One matmul for all negatives of the cohort, one product for all positives.
    """
    q = q / tau  # MxNxC, scaled once so the NxK blocks are not divided again
    if cross:
        (m, n, c), n_neg = q.shape, queue.shape[1]
        pos = (q.unsqueeze(1) * k.unsqueeze(0)).sum(3, keepdim=True)  # MxMxNx1: q_a[i] . k_b[i]
        neg = q.reshape(m * n, c) @ queue.reshape(m * n_neg, c).t()  # (M*N)x(M*K), one matmul
        neg = neg.view(m, n, m, n_neg).transpose(1, 2)  # MxMxNxK: q_a[i] . queue_b[j]
        return torch.cat([pos, neg], dim=3)  # MxMxNx(1+K)
    pos = (q * k).sum(dim=2, keepdim=True)  # MxNx1
    neg = torch.bmm(q, queue.transpose(1, 2))  # MxNxK
    return torch.cat([pos, neg], dim=2)  # MxNx(1+K)


def mcl_loss_terms(
    logits: Tensor | Sequence[Sequence[Tensor | None]],
    T: float = 3.0,
    needed: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """The needed MCL terms (default: all four) from the cohort's pair logits, fp32 or wider.

    logits: MxMxNxL (cell [a, b] = s(a->b), positive at column 0) or MxNxL (the diagonal only,
    enough without icl / soft_icl); a nested M x M list (``bank_logits``) is stacked first.
    Returns a scalar per needed term; the others are neither computed nor returned. CE is the
    batch mean, KL the batch mean times T^2; the sums over members / pairs are plain sums.
    """
    needed = check_terms(needed)
    if not isinstance(logits, Tensor):
        logits = _stack_grid(logits, needs_cross(needed))
    x = _upcast(logits)  # MxMxNxL or MxNxL
    if needs_cross(needed) and x.dim() != 4:
        raise ValueError("mcl_loss_terms: icl/soft_icl need the cross logits (cross=True)")
    m, n = x.shape[0], x.shape[-2]
    off = 1.0 - torch.eye(m, dtype=x.dtype, device=x.device)  # MxM: 1 where a != b

    def diagonal(cells: Tensor) -> Tensor:  # MxMxNxL -> MxNxL (a view); MxNxL as it is
        return cells.diagonal(0, 0, 1).movedim(-1, 0) if cells.dim() == 4 else cells

    out: dict[str, Tensor] = {}
    if needed & {"vcl", "icl"}:
        cells = x if "icl" in needed else diagonal(x)  # MxMxNxL or MxNxL
        rows = cells.reshape(-1, cells.shape[-1])  # (cells*N)xL
        zero = torch.zeros(rows.shape[0], dtype=torch.long, device=x.device)  # positive: col 0
        ce = F.cross_entropy(rows, zero, reduction="none").view(cells.shape[:-1]).mean(-1)
        if "icl" in needed:  # ce: MxM batch means
            out["icl"] = (ce * off).sum()
            ce = ce.diagonal()
        if "vcl" in needed:  # ce: M
            out["vcl"] = ce.sum()
    if needed & {"soft_vcl", "soft_icl"}:
        log_p = F.log_softmax((x if "soft_icl" in needed else diagonal(x)) / T, dim=-1)
        if "soft_icl" in needed:  # [a, b] = KL(p(b->a) || p(a->b)): the teacher is cell [b, a]
            teacher = log_p.detach().transpose(0, 1)  # MxMxNxL
            kl = F.kl_div(log_p, teacher, reduction="none", log_target=True).sum((2, 3))  # MxM
            out["soft_icl"] = (kl * off).sum() * (T * T / n)
        if "soft_vcl" in needed:  # [a, b] = KL(p(b->b) || p(a->a)), broadcast over the pairs
            d = diagonal(log_p)  # MxNxL
            kl = F.kl_div(
                d.unsqueeze(1), d.detach().unsqueeze(0), reduction="none", log_target=True
            )
            out["soft_vcl"] = (kl.sum((2, 3)) * off).sum() * (T * T / n)
    return out


def _stack_grid(grid: Sequence[Sequence[Tensor | None]], cross: bool) -> Tensor:
    """A nested M x M list of NxL cells -> MxMxNxL, or the MxNxL diagonal when not ``cross``."""
    m = len(grid)
    if m < 1 or any(len(row) != m for row in grid):
        raise ValueError("mcl_loss_terms: logits must be a square M x M grid")
    if not cross:
        return torch.stack([grid[a][a] for a in range(m)])
    if any(cell is None for row in grid for cell in row):
        raise ValueError("mcl_loss_terms: icl/soft_icl need the cross logits (cross=True)")
    return torch.stack([torch.stack(list(row)) for row in grid])


def _upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> float32 (a softmax over 65k half-precision logits loses the small
    probabilities); float32/float64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_kl(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean; the teacher gets no gradient.

    student, teacher: NxL logits (same L, same column meaning) -> scalar. The T^2 factor keeps the
    gradient scale independent of T (Hinton et al.).
    """
    log_q = F.log_softmax(_upcast(student) / T, dim=-1)  # NxL
    log_p = F.log_softmax(_upcast(teacher).detach() / T, dim=-1)  # NxL
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (T * T)


def combine(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Weighted sum of the terms. A weight of exactly 0 skips its term entirely, so a missing or
    NaN 0-weight term cannot leak into the loss; a non-zero weight on a missing term is an error."""
    total: Tensor | None = None
    for name, w in weights.items():
        if w == 0:
            continue
        if name not in terms:
            raise KeyError(f"loss term {name!r} has weight {w} but was not computed")
        part = terms[name] if w == 1 else terms[name] * w  # x * 1.0 == x: skip the kernel
        total = part if total is None else total + part
    if total is None:  # every weight 0: a zero that still has a device/dtype
        ref = next(iter(terms.values()), None)
        return ref.new_zeros(()) if ref is not None else torch.zeros(())
    return total


# Private helpers of the supervised functions below, kept only until they move to losses_sup.py.
_check_needed = check_terms


def _kl_cells(log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
    """sum_i KL(p_teacher_i || p_student_i) per cell; overwrites the (fresh, detached) teacher.
    PxNxL log-probs -> P."""
    p_teacher = log_p_teacher.exp()  # PxNxL
    return log_p_teacher.sub_(log_p_student).mul_(p_teacher).sum(dim=(1, 2))  # P


def _soft_vcl_rounds(log_p_diag: Tensor, first: int) -> list[Tensor]:
    """Round r = first..M-1: sum_i KL(s(a+r -> a+r) || s(a->a)) for every member a (unscaled)."""
    m = log_p_diag.shape[0]
    teacher = log_p_diag.detach()
    return [_kl_cells(log_p_diag, teacher.roll(-r, dims=0)) for r in range(first, m)]


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
    scale = T * T / n
    if "soft_vcl" in needed and m > 1:
        diag = torch.stack([logits[a][a] for a in range(m)])  # MxNx(N-1)
        rounds = _soft_vcl_rounds(F.log_softmax(_upcast(diag) / T, dim=2), 1)
        out["soft_vcl"] = torch.cat(rounds).sum() * scale
    if "soft_icl" in needed and m > 1:
        pairs = [(a, b) for a in range(m) for b in range(a + 1, m)]
        off = torch.stack([logits[a][b] for a, b in pairs] + [logits[b][a] for a, b in pairs])
        log_p = F.log_softmax(_upcast(off) / T, dim=2)  # M(M-1)xNxN
        # the second half holds the transposed pairs of the first: a half-roll gives each teacher
        teacher = log_p.detach().roll(len(pairs), dims=0)
        out["soft_icl"] = _kl_cells(log_p, teacher).sum() * scale
    ref = zs[0]
    return {k: v if torch.is_tensor(v) else ref.new_zeros(()) for k, v in out.items()}
