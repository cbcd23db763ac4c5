"""MCL loss terms (Yang et al., AAAI 2022) as pure functions of logits and embeddings.

Why pure functions: the cohort models, the benchmarks and the tests all need the *same* four
terms, and the tests compare them with a loop-by-loop transcription of the paper's formulas.
Nothing here owns state; the supervised terms (memory bank, in-batch) are in ``losses_sup``.
``loss_weights`` is the one mapping from a config's ``LOSS.W_*`` keys to the terms.

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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from yacs.config import CfgNode

TERMS = ("vcl", "icl", "soft_vcl", "soft_icl")
_CROSS_TERMS = frozenset({"icl", "soft_icl"})  # the only terms that need s(a->b) for a != b

# config key (under LOSS) of each term's weight: the one mapping from the config to the terms
WEIGHT_KEYS = {
    "vcl": "W_VCL",
    "icl": "W_ICL",
    "soft_vcl": "W_SOFT_VCL",
    "soft_icl": "W_SOFT_ICL",
}


def loss_weights(cfg: CfgNode) -> dict[str, float]:
    """The four interaction weights of a pretraining config by term name (0 = term skipped)."""
    return {name: float(cfg.LOSS[key]) for name, key in WEIGHT_KEYS.items()}


# how the terms are written in reports and logs
TERM_LABELS = {"vcl": "VCL", "icl": "ICL", "soft_vcl": "Soft VCL", "soft_icl": "Soft ICL"}


def describe_terms(cfg: CfgNode) -> str:
    """``"CE 1, VCL 0.1, ICL 0.1, Soft VCL 1, Soft ICL 1"``: the loss terms a resolved pretraining
    config trains with (non-zero weights only), so a report says what each arm optimised and a
    baseline visibly differs from its MCL arm only in the interaction terms."""
    on = [("CE", float(cfg.LOSS.W_CE))] if cfg.MODE == "supervised" else []
    on += [(TERM_LABELS[n], w) for n, w in loss_weights(cfg).items()]
    return ", ".join(f"{n} {w:g}" for n, w in on if w != 0.0) or "none"


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
    enough without icl / soft_icl); a nested M x M list of NxL cells is stacked first.
    Returns a scalar per needed term; the others are neither computed nor returned. CE is the
    batch mean, KL the batch mean times T^2; the sums over members / pairs are plain sums.
    """
    needed = check_terms(needed)
    if not isinstance(logits, Tensor):
        logits = _stack_grid(logits, needs_cross(needed))
    x = upcast(logits)  # MxMxNxL or MxNxL
    return {**ce_terms(x, needed), **kl_terms(x, T, needed)}


def ce_terms(
    logits: Tensor, needed: Iterable[str] | None = None, n_pos: int = 1
) -> dict[str, Tensor]:
    """vcl (sum over the cells [a, a]) and icl (sum over the cells a != b) among ``needed``.

    logits: MxMxNxL or MxNxL (the diagonal only: vcl), the positives in the first ``n_pos``
    columns. Per cell: the batch mean of -(mean over the positives of log softmax), which for
    one positive is cross-entropy with target 0 (its fused kernel is used then).
    """
    needed = check_terms(needed) & {"vcl", "icl"}
    if not needed:
        return {}
    x = _cells(upcast(logits), cross="icl" in needed)  # MxMxNxL or MxNxL
    if n_pos == 1:
        rows = x.reshape(-1, x.shape[-1])  # (cells*N)xL
        zero = torch.zeros(rows.shape[0], dtype=torch.long, device=x.device)  # positive: col 0
        ce = F.cross_entropy(rows, zero, reduction="none").view(x.shape[:-1]).mean(-1)
    else:
        ce = -F.log_softmax(x, dim=-1)[..., :n_pos].mean(-1).mean(-1)
    out: dict[str, Tensor] = {}
    if "icl" in needed:  # ce: MxM batch means
        out["icl"] = (ce * _off_diagonal(x)).sum()
        ce = ce.diagonal()
    if "vcl" in needed:  # ce: M
        out["vcl"] = ce.sum()
    return out


def kl_terms(
    logits: Tensor, T: float = 3.0, needed: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """soft_vcl and soft_icl among ``needed``: sums over the pairs a != b of T^2 times the batch
    mean of KL(teacher || student) at temperature T, the teacher detached.

    logits: MxMxNxL or MxNxL (the diagonal only: soft_vcl). soft_vcl's student is cell [a, a],
    its teacher [b, b]; soft_icl's student is cell [a, b], its teacher [b, a].
    """
    needed = check_terms(needed) & {"soft_vcl", "soft_icl"}
    if not needed:
        return {}
    x = _cells(upcast(logits), cross="soft_icl" in needed)  # MxMxNxL or MxNxL
    scale, off = T * T / x.shape[-2], _off_diagonal(x)  # off: MxM, 1 where a != b
    log_p = F.log_softmax(x / T, dim=-1)
    out: dict[str, Tensor] = {}
    if "soft_icl" in needed:  # [a, b] = KL(p(b->a) || p(a->b)): the teacher is cell [b, a]
        teacher = log_p.detach().transpose(0, 1)  # MxMxNxL
        kl = F.kl_div(log_p, teacher, reduction="none", log_target=True).sum((2, 3))  # MxM
        out["soft_icl"] = (kl * off).sum() * scale
    if "soft_vcl" in needed:  # [a, b] = KL(p(b->b) || p(a->a)), broadcast over the pairs
        d = diagonal_cells(log_p)  # MxNxL
        kl = F.kl_div(d.unsqueeze(1), d.detach().unsqueeze(0), reduction="none", log_target=True)
        out["soft_vcl"] = (kl.sum((2, 3)) * off).sum() * scale
    return out


def diagonal_cells(cells: Tensor) -> Tensor:
    """The cells [a, a]: MxMxNxL -> MxNxL (a view); MxNxL is returned as it is."""
    return cells.diagonal(0, 0, 1).movedim(-1, 0) if cells.dim() == 4 else cells


def _cells(x: Tensor, cross: bool) -> Tensor:
    """All cells when a cross term needs them (an error if ``x`` has only the diagonal), else
    the diagonal only."""
    if cross and x.dim() != 4:
        raise ValueError("mcl_loss_terms: icl/soft_icl need the cross logits (cross=True)")
    return x if cross else diagonal_cells(x)


def _off_diagonal(x: Tensor) -> Tensor:
    """MxM mask of the ordered pairs a != b (0 on the diagonal) in ``x``'s dtype and device."""
    return 1.0 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device)


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


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> float32 (a softmax over 65k half-precision logits loses the small
    probabilities); float32/float64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_kl(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean; the teacher gets no gradient.

    student, teacher: NxL logits (same L, same column meaning) -> scalar. The T^2 factor keeps the
    gradient scale independent of T (Hinton et al.).
    """
    log_q = F.log_softmax(upcast(student) / T, dim=-1)  # NxL
    log_p = F.log_softmax(upcast(teacher).detach() / T, dim=-1)  # NxL
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
