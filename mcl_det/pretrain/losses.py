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

Why the code is batched: at M = 2, K = 65536, N = 32 a GPU spends the time of these terms
launching small kernels, not computing. So the M x M grid is one (M*M)xNxL tensor (the entries
the caller sees are views of it), and the four terms of the whole cohort are ONE autograd node
(``_CellTermsFn``) whose backward is the closed-form gradient (softmax minus target / teacher):
each step is one op for the whole cohort, no autograd graph is recorded inside, and the backward
is two fused multiply-adds. Logits + terms, forward + backward, at M = 2: 39 aten ops and 19
autograd nodes instead of 124 and 71 with one cat / CE / log-softmax / KL per pair
(benchmarks/bench_mcl_losses.py counts them). On a CPU the node works in row chunks (small
buffers that malloc reuses) and the two (M*N)xCx(M*K) matmuls are about two thirds of the time.
"""

from __future__ import annotations

import functools
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
    With ``cross=False`` (no cross-member term has a non-zero weight) only the diagonal is
    computed; the rest is ``None``.

    Why it is built this way: on a GPU this step is launch-bound (M^2 small pairs), so every
    entry of the grid is a view into ONE MxMxNx(1+K) tensor (MxNx(1+K) without ``cross``), made
    by one matmul for all negatives, one product for all positives and one cat. The returned
    list remembers that tensor, and ``mcl_loss_terms`` works on it directly, so the four terms
    cost a handful of kernels for the whole cohort instead of a handful per pair. When the
    queues are views of one MxKxC buffer (the engine's layout) all negatives are one
    (M*N)xC @ Cx(M*K) matmul; separate queue tensors cost one matmul each plus a stack.
    """
    m = len(qs)
    if not (len(ks) == m and len(queues) == m):
        raise ValueError(f"cohort_logits: got {m} qs, {len(ks)} ks, {len(queues)} queues")
    n, c = qs[0].shape
    n_neg = queues[0].shape[0]
    q = torch.stack(list(qs)) / tau  # MxNxC, scaled once so the NxK blocks are not divided again
    k = torch.stack(list(ks))  # MxNxC
    buffer = _one_buffer(queues)  # MxKxC or None; holds detached keys, no grad
    if cross:
        pos = (q.unsqueeze(1) * k.unsqueeze(0)).sum(dim=3)  # MxMxN: [a, b, i] = q_a[i] . k_b[i]
        q_rows = q.view(m * n, c)  # (M*N)xC, row a*N + i is q_a[i]
        if buffer is not None:
            neg = q_rows @ buffer.view(m * n_neg, c).t()  # (M*N)x(M*K)
        else:
            neg = torch.stack([q_rows @ queue.t() for queue in queues], dim=1)  # (M*N)xMxK
        neg = neg.view(m, n, m, n_neg).permute(0, 2, 1, 3)  # MxMxNxK: [a, b, i, j], a view
        cells = torch.cat([pos.unsqueeze(3), neg], dim=3)  # MxMxNx(1+K), contiguous
        rows = [[cells[a, b] for b in range(m)] for a in range(m)]
        return _CellGrid(rows, cells.view(m * m, n, 1 + n_neg))
    pos = (q * k).sum(dim=2)  # MxN: [a, i] = q_a[i] . k_a[i]
    if buffer is not None:
        neg = torch.bmm(q, buffer.transpose(1, 2))  # MxNxK
    else:
        neg = torch.stack([q[a] @ queues[a].t() for a in range(m)])  # MxNxK
    cells = torch.cat([pos.unsqueeze(2), neg], dim=2)  # MxNx(1+K)
    rows = [[cells[a] if a == b else None for b in range(m)] for a in range(m)]
    return _CellGrid(rows, cells)


def _one_buffer(queues: Sequence[Tensor]) -> Tensor | None:
    """The MxKxC tensor whose rows ``queues`` are (``buffer[i]`` views), or None.

    Only an exact match counts (same base, contiguous, queue i at row i), so a caller that
    passes separate tensors simply gets the per-queue fallback.
    """
    base = queues[0]._base
    if base is None or base.dim() != 3 or base.shape[0] != len(queues) or not base.is_contiguous():
        return None
    row_bytes = base.stride(0) * base.element_size()
    for i, queue in enumerate(queues):
        if (
            queue._base is not base
            or queue.shape != base.shape[1:]
            or queue.stride() != base.stride()[1:]
            or queue.data_ptr() != base.data_ptr() + i * row_bytes
        ):
            return None
    return base


class _CellGrid(list):
    """The public M x M list-of-lists grid, plus the one tensor all its entries are views of.

    ``cells``: (M*M)xNxL, row-major pairs (row a*M + b is s(a->b)), or MxNxL (diagonal only).
    ``stacked()`` hands it out only while every entry is still the view it was built with, so a
    caller that replaces an entry gets a correct (stacked-again) result, never a stale one.
    """

    def __init__(self, rows: list[list[Tensor | None]], cells: Tensor) -> None:
        super().__init__(rows)
        self.cells = cells
        self._entries = tuple(x for row in rows for x in row)

    def stacked(self) -> Tensor | None:
        now = tuple(x for row in self for x in row)
        if len(now) != len(self._entries) or any(
            a is not b for a, b in zip(now, self._entries, strict=True)
        ):
            return None
        return self.cells


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


def _kl_cells(log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
    """sum_i KL(p_teacher_i || p_student_i) per cell. The teacher must be a fresh, detached
    tensor (a gather or roll of the detached log-probs): it is overwritten.

    PxNxL log-probs -> P (a sum over the batch: callers scale by T^2 / N once, at the end).
    Written as p_t * (log p_t - log p_s) elementwise, not as sum(p_t log p_t) - sum(p_t log p_s):
    the difference form does not lose the (often small) KL to cancellation in fp32. In place on
    the teacher: two PxNxL buffers fewer (on a CPU every fresh 32 MiB buffer is page faults).
    """
    p_teacher = log_p_teacher.exp()  # PxNxL
    return log_p_teacher.sub_(log_p_student).mul_(p_teacher).sum(dim=(1, 2))  # P


def _soft_vcl_rounds(log_p_diag: Tensor, first: int) -> list[Tensor]:
    """Round r = first..M-1: sum_i KL(s(a+r -> a+r) || s(a->a)) for every member a (unscaled).

    log_p_diag: MxNxL log-probs at T of the diagonal cells -> one M vector per round. Round r
    pairs every member with the member r places further on (a roll), so rounds 1..M-1 cover
    every ordered pair a != b exactly once.
    """
    m = log_p_diag.shape[0]
    teacher = log_p_diag.detach()
    return [_kl_cells(log_p_diag, teacher.roll(-r, dims=0)) for r in range(first, m)]


class _TermPlan:
    """What ``_CellTermsFn`` computes for one (M, grid kind, needed terms, N, T): made once.

    Cells are the rows of x: (M*M) row-major pairs (``full``) or the M diagonal cells.
    * ``ce``: whether any CE term is needed (then every cell's CE sum is an entry of ``v``).
    * ``rounds``: KL rounds ``(students, teachers)``; ``students`` None means every cell, in order.
      With ``full`` and soft_icl, round 1 pairs every cell with its teacher in one gather: (a, b)
      with (b, a), (a, a) with (a+1, a+1); further rounds roll the diagonal, so rounds 1..M-1
      cover every ordered pair a != b of soft VCL exactly once.
    * ``weights``: len(names) x J, term = sum_j weights[t, j] * v[j] over the concatenated
      per-cell sums v = [CE sums (P), round sums ...]; the CE / KL scales (-1/N, T^2/N) are in it.
    """

    def __init__(
        self,
        m: int,
        full: bool,
        needed: frozenset[str],
        n: int,
        T: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        p = m * m if full else m
        cells = [(a, b) for a in range(m) for b in range(m)] if full else [(a, a) for a in range(m)]
        diag = [i for i, (a, b) in enumerate(cells) if a == b]  # row of (a, a), a = 0..M-1
        ce, kl = -1.0 / n, T * T / n  # the scale of every CE / KL cell sum
        self.names = sorted(needed)
        columns: list[dict[str, float]] = []  # one {term: weight} per entry of v
        self.ce = bool({"vcl", "icl"} & needed)
        if self.ce:
            for a, b in cells:
                term = "vcl" if a == b else "icl"
                columns.append({term: ce} if term in needed else {})
        rounds: list[tuple[list[int] | None, list[int]]] = []
        first = 1
        if "soft_icl" in needed:  # full grid: every cell in one round (its transposed pair)
            teacher = [cells.index((b, a) if a != b else ((a + 1) % m,) * 2) for a, b in cells]
            rounds.append((None, teacher))
            for a, b in cells:
                term = "soft_vcl" if a == b else "soft_icl"
                columns.append({term: kl} if term in needed else {})
            first = 2
        if "soft_vcl" in needed:
            for r in range(first, m):  # the diagonal rolled by r: student a, teacher a+r
                students = None if not full else diag
                rounds.append((students, [diag[(a + r) % m] for a in range(m)]))
                columns += [{"soft_vcl": kl}] * m
        self.p, self.T = p, T

        def index(rows: list[int]) -> Tensor:
            return torch.tensor(rows, dtype=torch.long, device=device)

        weights = [[col.get(name, 0.0) for col in columns] for name in self.names]
        # the backward's weights: d v / d x is -softmax(x) (+1 at column 0) for a CE sum and
        # (softmax(x_s/T) - p_teacher) / T for a KL sum; the sign and the 1/T go in here
        n_ce = p if self.ce else 0
        grad_weights = [[-w for w in row[:n_ce]] + [w / T for w in row[n_ce:]] for row in weights]
        with torch.inference_mode(False):  # cached tensors must be usable outside it too
            self.rounds = [(None if s is None else index(s), index(t)) for s, t in rounds]
            self.weights = torch.tensor(weights, dtype=dtype, device=device)  # names x J
            self.grad_weights = torch.tensor(grad_weights, dtype=dtype, device=device)


# one plan per (M, grid kind, needed terms, N, T, device, dtype): built once, its index and weight
# tensors copied to the device once
_term_plan = functools.lru_cache(maxsize=64)(_TermPlan)


class _CellTermsFn(torch.autograd.Function):
    """All needed MCL terms of the stacked cells in one autograd node, backward in closed form.

    x: PxNxL logits (upcast) -> len(plan.names) term values. Why a custom node: with autograd
    every elementwise step (log-softmax, the teacher gather, exp, the KL products, the sums) is
    an op twice, forward and backward, and on a CPU each new PxNxL buffer (32 MiB at M = 2,
    K = 65536) is also page faults. The gradients have a closed form instead:
        d CE(s, 0) / ds                    = softmax(s) - e_0
        d KL(p_t || softmax(s/T)) / ds     = (softmax(s/T) - p_t) / T   (teacher t held constant)
    so the forward keeps softmax(x) and, per KL round, softmax(x_s/T) - p_t, and the backward is
    two fused multiply-adds on them. The teacher's "detach" is this formula: a teacher cell
    gets gradient only as a student of its own pairs, never through its teacher role.
    """

    @staticmethod
    def forward(ctx, x: Tensor, plan: _TermPlan) -> Tensor:
        grad_needed = ctx.needs_input_grad[0]
        v: Tensor | None = None  # J: the per-cell sums, accumulated over row chunks
        saved: list[Tensor] = []  # per chunk: [softmax(x)], then one diff per KL round
        for rows in _row_chunks(x):
            v_c, saved_c = _chunk_forward(x[:, rows], plan, grad_needed)
            v = v_c if v is None else v.add_(v_c)
            saved += saved_c
        ctx.plan, ctx.shape = plan, x.shape
        if grad_needed:
            ctx.save_for_backward(*saved)
        # weighted sums as elementwise products, not a matmul (TF32 on a GPU would round them)
        return (v * plan.weights).sum(dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_terms: Tensor) -> tuple[Tensor | None, None]:
        plan = ctx.plan
        saved = list(ctx.saved_tensors)
        # J: d loss / d v, times the sign (CE) or 1/T (KL) of d v / d x (see grad_weights)
        coef = (grad_terms.unsqueeze(1) * plan.grad_weights).sum(dim=0)
        per_chunk = int(plan.ce) + len(plan.rounds)
        grad = saved[0].new_empty(ctx.shape)  # every chunk's first contribution overwrites it
        for i, rows in enumerate(_row_chunks(grad)):
            _chunk_backward(grad[:, rows], coef, plan, saved[i * per_chunk : (i + 1) * per_chunk])
        return grad, None


# Row chunks on a CPU: every PxnxL temporary stays under glibc's largest mmap threshold (32 MiB),
# so a freed one is reused from the heap instead of being unmapped and page-faulted in again
# on the next step (a whole M = 2, K = 65536, N = 32 block is 32 MiB + 512 B). A GPU's caching
# allocator has no such cost and one chunk means fewer kernels there.
_CPU_CHUNK_BYTES = 8 << 20


def _row_chunks(x: Tensor) -> list[slice]:
    """Slices of dim 1 (the batch rows) of a PxNxL tensor, one for the whole batch off-CPU."""
    p, n, width = x.shape
    row_bytes = p * width * x.element_size()
    step = n if x.device.type != "cpu" else max(1, _CPU_CHUNK_BYTES // row_bytes)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _chunk_forward(x: Tensor, plan: _TermPlan, grad_needed: bool) -> tuple[Tensor, list[Tensor]]:
    """Per-cell sums over these rows (J) and what the backward needs of them.

    x: PxnxL, a row chunk of the cells. The rows are independent (each softmax is per row), so
    chunks just add up.
    """
    pieces: list[Tensor] = []
    saved: list[Tensor] = []
    if plan.ce:
        log_p1 = F.log_softmax(x, dim=2)  # PxnxL
        pieces.append(log_p1[:, :, 0].sum(dim=1))  # P: sum_i log softmax(s_i)_0
        if grad_needed:
            saved.append(log_p1.exp_())  # softmax(x), in place: log_p1 is not needed again
    if plan.rounds:
        log_pt = F.log_softmax(x / plan.T, dim=2)  # PxnxL
        p_t = log_pt.exp()  # PxnxL
        for students, teachers in plan.rounds:
            log_s = log_pt if students is None else log_pt.index_select(0, students)
            p_teacher = p_t.index_select(0, teachers)  # RxnxL
            # p_t * (log p_t - log p_s) elementwise, not as a difference of two sums: the
            # (often small) KL is not lost to cancellation in fp32
            kl = log_pt.index_select(0, teachers).sub_(log_s).mul_(p_teacher)  # RxnxL
            pieces.append(kl.sum(dim=(1, 2)))  # R
            if grad_needed:  # softmax(x_s / T) - p_teacher, in place on p_teacher
                p_s = p_t if students is None else p_t.index_select(0, students)
                saved.append(torch.sub(p_s, p_teacher, out=p_teacher))
    return (torch.cat(pieces) if len(pieces) > 1 else pieces[0]), saved


def _chunk_backward(grad: Tensor, coef: Tensor, plan: _TermPlan, saved: list[Tensor]) -> None:
    """Writes d loss / d x for one row chunk into ``grad`` (a PxnxL view of the full gradient).

    coef: J, d loss / d v already multiplied by d v / d x's sign (CE) or 1/T (KL); the saved
    softmax(x) and softmax(x_s/T) - p_teacher are left untouched (a retained graph may need them
    for a second backward).
    """
    at, written = 0, False  # ``grad`` arrives uninitialised: the first contribution writes it
    if plan.ce:  # d v_p / d x_p = sum over rows of (e_0 - softmax(x_p))
        soft1, *saved = saved
        c = coef[: plan.p].view(-1, 1, 1)  # Px1x1, already negated
        torch.mul(soft1, c, out=grad)
        grad[:, :, 0].sub_(c.view(-1, 1))
        at, written = plan.p, True
    for (students, _), diff in zip(plan.rounds, saved, strict=True):
        d = coef[at : at + diff.shape[0]].view(-1, 1, 1)  # Rx1x1, T^2/N and 1/T included
        at += diff.shape[0]
        if students is not None:  # only some cells (the diagonal): scatter-add
            if not written:
                grad.zero_()
            grad.index_add_(0, students, diff * d)
        elif written:
            grad.addcmul_(diff, d)
        else:  # every cell, written rather than added
            torch.mul(diff, d, out=grad)
        written = True


def _cell_terms(x: Tensor, m: int, T: float, needed: set[str], full: bool) -> dict[str, Tensor]:
    """The needed terms from the stacked cells, in one fused autograd node.

    x: (M*M)xNxL row-major pairs (``full``) or MxNxL diagonal cells, already upcast.
    """
    plan = _term_plan(m, full, frozenset(needed), x.shape[1], float(T), x.device, x.dtype)
    return dict(zip(plan.names, _CellTermsFn.apply(x, plan).unbind(0), strict=True))


def check_terms(needed: Iterable[str] | None) -> set[str]:
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

    logits[a][b]: NxL, the same L for every pair (MoCo and memory bank: 1+K); a grid from
    ``cohort_logits`` is used as the one tensor it already is, any other is stacked (one copy).
    Returns scalars for the terms in ``needed`` (default: all four); the others are neither
    computed nor returned, so an ablation with weight 0 does not pay for them (and off-diagonal
    logits may then be ``None``).
    CE is the batch mean; the sums over members/pairs are plain sums (not averaged over M).
    """
    needed = check_terms(needed)
    m = len(logits)
    if m < 1 or any(len(row) != m for row in logits):
        raise ValueError("mcl_loss_terms: logits must be a square M x M grid")
    full = needs_cross(needed)
    if full and any(logits[a][b] is None for a in range(m) for b in range(m) if a != b):
        raise ValueError("mcl_loss_terms: icl/soft_icl need the cross logits (cross=True)")
    if not needed:
        return {}
    x = _upcast(_stacked_cells(logits, full))
    if m == 1:  # no pairs: every pair sum is empty, only VCL is a real term
        out = {k: x.new_zeros(()) for k in needed - {"vcl"}}
        if "vcl" in needed:
            out.update(_cell_terms(x, 1, T, {"vcl"}, full=False))
        return out
    return _cell_terms(x, m, T, needed, full)


def _stacked_cells(logits: Sequence[Sequence[Tensor | None]], full: bool) -> Tensor:
    """(M*M)xNxL row-major pairs if ``full`` else the MxNxL diagonal, as one tensor.

    A grid from ``cohort_logits`` already is one tensor (no copy); any other grid is stacked
    (one copy; its backward only hands out views).
    """
    m = len(logits)
    cells = logits.stacked() if isinstance(logits, _CellGrid) else None
    if cells is not None:
        if cells.shape[0] == m * m:  # a full grid
            return cells if full else cells[:: m + 1]  # the diagonal is a view
        return cells  # a diagonal-only grid (``full`` was ruled out by the caller)
    if full:
        return torch.stack([logits[a][b] for a in range(m) for b in range(m)])
    return torch.stack([logits[a][a] for a in range(m)])


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
