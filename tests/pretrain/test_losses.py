"""MCL loss terms vs a direct, loop-by-loop transcription of the formulas (float64, explicit
log-sum-exp). The references below deliberately share no code with mcl_det.pretrain.losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mcl_det.pretrain import losses as L

TOL = dict(rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# loop-based references (python floats, float64)
# ------------------------------------------------------------------------------------------------


def ref_dot(u, v) -> float:
    return sum(float(u[c]) * float(v[c]) for c in range(len(u)))


def ref_logsumexp(row) -> float:
    mx = max(row)
    return mx + math.log(sum(math.exp(x - mx) for x in row))


def ref_log_softmax(row, t: float = 1.0) -> list[float]:
    scaled = [x / t for x in row]
    lse = ref_logsumexp(scaled)
    return [x - lse for x in scaled]


def ref_pair_logits(q, k, queue, tau) -> list[list[float]]:
    """s_i = [q_i . k_i, q_i . queue_0, ..., q_i . queue_{K-1}] / tau"""
    rows = []
    for i in range(q.shape[0]):
        row = [ref_dot(q[i], k[i]) / tau]
        row += [ref_dot(q[i], queue[j]) / tau for j in range(queue.shape[0])]
        rows.append(row)
    return rows


def ref_ce0(rows) -> float:
    """mean_i -log softmax(s_i)_0"""
    return sum(ref_logsumexp(r) - r[0] for r in rows) / len(rows)


def ref_kl(student_rows, teacher_rows, t) -> float:
    """T^2 * mean_i sum_j p_ij (log p_ij - log q_ij),
    p = softmax(teacher/T), q = softmax(student/T)"""
    total = 0.0
    for s_row, t_row in zip(student_rows, teacher_rows, strict=True):
        log_q = ref_log_softmax(s_row, t)
        log_p = ref_log_softmax(t_row, t)
        total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))
    return t * t * total / len(student_rows)


def ref_mcl_terms(grid, t) -> dict[str, float]:
    m = len(grid)
    out = {"vcl": 0.0, "icl": 0.0, "soft_vcl": 0.0, "soft_icl": 0.0}
    for a in range(m):
        out["vcl"] += ref_ce0(grid[a][a])
        for b in range(m):
            if a == b:
                continue
            out["icl"] += ref_ce0(grid[a][b])
            out["soft_vcl"] += ref_kl(grid[a][a], grid[b][b], t)
            out["soft_icl"] += ref_kl(grid[a][b], grid[b][a], t)
    return out


def unit(*shape, dtype=torch.float64, gen=None) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=dtype, generator=gen), dim=-1)


def cohort(m, n, c, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = [unit(n, c, gen=g).requires_grad_() for _ in range(m)]
    ks = [unit(n, c, gen=g) for _ in range(m)]
    queues = [unit(k, c, gen=g) for _ in range(m)]
    return qs, ks, queues


def logits(qs, ks, queues, tau, cross=True):
    """The cohort's logits tensor from per-member lists (the model stacks them the same way)."""
    return L.cohort_logits(torch.stack(qs), torch.stack(ks), torch.stack(queues), tau, cross)


def as_lists(grid):
    return [[cell.detach().tolist() for cell in row] for row in grid]


# ------------------------------------------------------------------------------------------------
# self-supervised
# ------------------------------------------------------------------------------------------------


def test_one_member_logits_match_loop():
    qs, ks, queues = cohort(1, 5, 8, 7)
    got = logits(qs, ks, queues, tau=0.2)[0][0]
    assert got.shape == (5, 8)
    want = torch.tensor(ref_pair_logits(qs[0].detach(), ks[0], queues[0], 0.2), dtype=torch.float64)
    torch.testing.assert_close(got.detach(), want, **TOL)


def test_cohort_logits_every_pair_and_no_cross():
    qs, ks, queues = cohort(3, 4, 6, 5)
    grid = logits(qs, ks, queues, tau=0.1)
    assert grid.shape == (3, 3, 4, 6)
    for a in range(3):
        for b in range(3):
            want = torch.tensor(
                ref_pair_logits(qs[a].detach(), ks[b], queues[b], 0.1), dtype=torch.float64
            )
            torch.testing.assert_close(grid[a][b].detach(), want, **TOL)
    diag_only = logits(qs, ks, queues, tau=0.1, cross=False)
    assert diag_only.shape == (3, 4, 6)  # the diagonal only: s(a->a) at [a]
    for a in range(3):
        torch.testing.assert_close(diag_only[a], grid[a][a])


@pytest.mark.parametrize("m,k", [(2, 7), (3, 12), (3, 1)])
def test_mcl_loss_terms_match_loop(m, k):
    qs, ks, queues = cohort(m, 4, 6, k, seed=m * 100 + k)
    grid = logits(qs, ks, queues, tau=0.2)
    got = L.mcl_loss_terms(grid, T=3.0)
    want = ref_mcl_terms(as_lists(grid), 3.0)
    assert set(got) == set(L.TERMS)
    for name in L.TERMS:
        assert got[name].dim() == 0
        assert got[name].item() == pytest.approx(want[name], rel=1e-9, abs=1e-10), name
    # the KL terms are non-trivial here (random members disagree)
    assert want["soft_vcl"] > 1e-3 and want["soft_icl"] > 1e-3


def test_mcl_loss_terms_other_temperature():
    qs, ks, queues = cohort(2, 3, 5, 9, seed=7)
    grid = logits(qs, ks, queues, tau=0.5)
    got = L.mcl_loss_terms(grid, T=1.5)
    want = ref_mcl_terms(as_lists(grid), 1.5)
    for name in ("soft_vcl", "soft_icl"):
        assert got[name].item() == pytest.approx(want[name], rel=1e-9), name


def test_soft_kl_matches_loop_and_is_zero_for_identical():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 9, dtype=torch.float64, generator=g)
    t = torch.randn(6, 9, dtype=torch.float64, generator=g)
    got = L.soft_kl(s, t, T=3.0)
    assert got.item() == pytest.approx(ref_kl(s.tolist(), t.tolist(), 3.0), rel=1e-9)
    assert got.item() > 0
    assert L.soft_kl(s, s.clone(), T=3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_soft_kl_gradient_reaches_student_not_teacher():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 5, generator=g, requires_grad=True)
    t = torch.randn(4, 5, generator=g, requires_grad=True)
    L.soft_kl(s, t, T=3.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_soft_terms_detach_teacher_side():
    """soft_icl for M=2: the (1->0) logits are the teacher of (0->1) and vice versa. Feed grid
    entries as separate leaves so we can check that each KL sends gradient to its student only."""
    g = torch.Generator().manual_seed(3)
    grid = [
        [torch.randn(3, 6, generator=g, requires_grad=True) for _ in range(2)] for _ in range(2)
    ]
    terms = L.mcl_loss_terms(grid, T=3.0, needed={"soft_icl"})
    # d soft_icl / d s(0->1): only the term where s(0->1) is the student
    (grad01,) = torch.autograd.grad(terms["soft_icl"], [grid[0][1]])
    (want01,) = torch.autograd.grad(L.soft_kl(grid[0][1], grid[1][0], 3.0), [grid[0][1]])
    torch.testing.assert_close(grad01, want01)
    terms = L.mcl_loss_terms(grid, T=3.0, needed={"soft_vcl"})
    (grad00,) = torch.autograd.grad(terms["soft_vcl"], [grid[0][0]])
    (want00,) = torch.autograd.grad(L.soft_kl(grid[0][0], grid[1][1], 3.0), [grid[0][0]])
    torch.testing.assert_close(grad00, want00)


def test_icl_sends_gradient_to_every_members_query():
    qs, ks, queues = cohort(3, 4, 6, 5, seed=11)
    grid = logits(qs, ks, queues, tau=0.2)
    terms = L.mcl_loss_terms(grid, needed={"icl"})
    assert set(terms) == {"icl"}
    grads = torch.autograd.grad(terms["icl"], qs)
    for g in grads:
        assert g.abs().sum() > 0


def test_zero_weight_term_is_skipped():
    qs, ks, queues = cohort(2, 4, 6, 5, seed=12)
    weights = {"vcl": 1.0, "icl": 0.0, "soft_vcl": 0.5, "soft_icl": 0.0}
    needed = L.needed_terms(weights)
    assert needed == {"vcl", "soft_vcl"}
    assert not L.needs_cross(needed)
    grid = logits(qs, ks, queues, tau=0.2, cross=L.needs_cross(needed))
    assert grid.shape == (2, 4, 6)  # cross logits never computed: the diagonal only
    terms = L.mcl_loss_terms(grid, needed=needed)
    assert set(terms) == {"vcl", "soft_vcl"}
    loss = L.combine(terms, weights)
    assert loss.item() == pytest.approx(terms["vcl"].item() + 0.5 * terms["soft_vcl"].item())
    # a NaN in a 0-weight term must not propagate; a non-zero weight on a missing term is an error
    terms_nan = dict(terms, icl=torch.tensor(float("nan")))
    assert torch.isfinite(L.combine(terms_nan, weights))
    with pytest.raises(KeyError):
        L.combine(terms, {"icl": 1.0})
    with pytest.raises(ValueError):
        L.mcl_loss_terms(grid, needed={"icl"})  # cross logits missing
    # the all-zero baseline: a zero scalar, only VCL computed when it alone is needed
    zero = L.combine(terms, {k: 0.0 for k in L.TERMS})
    assert zero.item() == 0.0


def test_combine_weighted_sum_and_gradient():
    qs, ks, queues = cohort(2, 4, 6, 5, seed=13)
    terms = L.mcl_loss_terms(logits(qs, ks, queues, tau=0.2))
    w = {"vcl": 1.0, "icl": 2.0, "soft_vcl": 0.25, "soft_icl": 3.0}
    loss = L.combine(terms, w)
    assert loss.item() == pytest.approx(sum(w[k] * terms[k].item() for k in L.TERMS), rel=1e-12)
    loss.backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in qs)


def test_unknown_term_name_is_an_error():
    with pytest.raises(ValueError):
        L.needed_terms({"vlc": 1.0})
    with pytest.raises(ValueError):
        L.mcl_loss_terms(torch.zeros(1, 1, 2, 3), needed={"kl"})
    with pytest.raises(ValueError, match="vlc"):
        L.check_terms({"vcl", "vlc"})
    assert L.check_terms(None) == set(L.TERMS)


def test_half_precision_logits_are_upcast():
    g = torch.Generator().manual_seed(50)
    grid = [[torch.randn(4, 300, generator=g) * 5 for _ in range(2)] for _ in range(2)]
    ref = L.mcl_loss_terms(grid)
    half = L.mcl_loss_terms([[x.bfloat16() for x in row] for row in grid])
    for name in L.TERMS:
        assert half[name].dtype == torch.float32
        # only the bf16 rounding of the inputs remains (a bf16 softmax would be far worse)
        assert half[name].item() == pytest.approx(ref[name].item(), rel=2e-2, abs=1e-2), name


# ------------------------------------------------------------------------------------------------
# every subset of terms and every cohort size against the loop references and per-pair autograd
# ------------------------------------------------------------------------------------------------

SUBSETS = [
    {name for j, name in enumerate(L.TERMS) if mask >> j & 1}
    for mask in range(1, 2 ** len(L.TERMS))
]


def per_pair_loss(grid, t, needed):
    """The terms built pair by pair from torch ops (CE per pair, soft_kl per pair): a reference
    for the gradients of the batched code."""
    m = len(grid)
    total = grid[0][0].new_zeros(())
    for a in range(m):
        target = torch.zeros(grid[a][a].shape[0], dtype=torch.long)
        if "vcl" in needed:
            total = total + F.cross_entropy(grid[a][a], target)
        for b in range(m):
            if a == b:
                continue
            if "icl" in needed:
                total = total + F.cross_entropy(grid[a][b], target)
            if "soft_vcl" in needed:
                total = total + L.soft_kl(grid[a][a], grid[b][b], t)
            if "soft_icl" in needed:
                total = total + L.soft_kl(grid[a][b], grid[b][a], t)
    return total


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_every_term_subset_matches_loop_and_per_pair_gradients(m):
    qs, ks, queues = cohort(m, 3, 4, 5, seed=70 + m)
    for needed in SUBSETS:
        grid = logits(qs, ks, queues, tau=0.3, cross=L.needs_cross(needed))
        terms = L.mcl_loss_terms(grid, T=2.0, needed=needed)
        assert set(terms) == needed
        full = logits(qs, ks, queues, tau=0.3)
        want = ref_mcl_terms(as_lists(full), 2.0)
        for name in needed:
            assert terms[name].dim() == 0
            assert terms[name].item() == pytest.approx(want[name], rel=1e-9, abs=1e-10), name
        if m == 1 and "vcl" not in needed:  # no pairs: constant zeros, nothing to differentiate
            assert all(v.item() == 0.0 for v in terms.values())
            continue
        got = torch.autograd.grad(sum(terms.values()), qs, allow_unused=True)
        ref = torch.autograd.grad(per_pair_loss(full, 2.0, needed), qs, allow_unused=True)
        for g_got, g_ref in zip(got, ref, strict=True):
            torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)


def test_diagonal_only_grid_matches_loop():
    qs, ks, queues = cohort(3, 4, 5, 6, seed=80)
    needed = {"vcl", "soft_vcl"}
    grid = logits(qs, ks, queues, tau=0.2, cross=False)
    got = L.mcl_loss_terms(grid, T=3.0, needed=needed)
    want = ref_mcl_terms(as_lists(logits(qs, ks, queues, 0.2)), 3.0)
    for name in needed:
        assert got[name].item() == pytest.approx(want[name], rel=1e-9), name


def test_kl_teachers_get_no_gradient_for_three_members():
    """M = 3: each KL sends gradient to its student only. Grid entries are separate leaves (a
    nested list, stacked by mcl_loss_terms) so each one's gradient can be checked."""
    g = torch.Generator().manual_seed(110)
    grid = [
        [torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
        for _ in range(3)
    ]
    terms = L.mcl_loss_terms(grid, T=3.0, needed={"soft_vcl", "soft_icl"})
    (g00,) = torch.autograd.grad(terms["soft_vcl"], [grid[0][0]], retain_graph=True)
    want00 = sum(L.soft_kl(grid[0][0], grid[b][b], 3.0) for b in (1, 2))
    torch.testing.assert_close(g00, torch.autograd.grad(want00, [grid[0][0]])[0], **TOL)
    (g12,) = torch.autograd.grad(terms["soft_icl"], [grid[1][2]])
    want12 = L.soft_kl(grid[1][2], grid[2][1], 3.0)
    torch.testing.assert_close(g12, torch.autograd.grad(want12, [grid[1][2]])[0], **TOL)


def test_bench_mcl_losses_runs_tiny_and_counts_ops(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_mcl_losses", Path(__file__).resolve().parents[2] / "benchmarks/bench_mcl_losses.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    quick = ["--device", "cpu", "--rounds", "1", "--loss-reps", "1", "--no-keep-freed-memory"]
    res = bench.main([*quick, "--no-r18", "--queue", "64", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    # batched over the cohort: about half the ops and nodes of one CE / KL per pair (124 / 71 at
    # M = 2), and fewer without the cross terms
    ops, nodes = res["ops"]["all"]["aten_ops"], res["ops"]["all"]["autograd_nodes"]
    assert 0 < res["ops"]["vcl_only"]["aten_ops"] < ops <= 64
    assert 0 < res["ops"]["vcl_only"]["autograd_nodes"] < nodes <= 45
    # with the denominators: one R18 MoCo step (the target's) and a plain R18 SGD step
    tiny = ["--queue", "64", "--batch", "4", "--image-size", "32", "--out", str(out)]
    res = bench.main([*quick, *tiny])
    assert res["moco_r18_step_ms"] > 0 and res["r18_step_ms"] > 0
    assert res["ratio"] == pytest.approx(res["loss_ms"]["all"] / res["moco_r18_step_ms"], rel=1e-2)
    assert res["cpu_keep_freed_memory"] is False  # left alone: this is the test process


# ------------------------------------------------------------------------------------------------
# gradients with unequal term weights: per-pair autograd and finite differences of the loops
# ------------------------------------------------------------------------------------------------

UNEQUAL = {"vcl": 0.7, "icl": -1.3, "soft_vcl": 2.1, "soft_icl": 0.4}


def per_pair_terms(grid, t):
    """Each term from per-pair torch ops (CE and soft_kl per pair): autograd's gradients."""
    m = len(grid)
    out = dict.fromkeys(L.TERMS, grid[0][0].new_zeros(()))
    for a in range(m):
        target = torch.zeros(grid[a][a].shape[0], dtype=torch.long)
        out["vcl"] = out["vcl"] + F.cross_entropy(grid[a][a], target)
        for b in range(m):
            if a != b:
                out["icl"] = out["icl"] + F.cross_entropy(grid[a][b], target)
                out["soft_vcl"] = out["soft_vcl"] + L.soft_kl(grid[a][a], grid[b][b], t)
                out["soft_icl"] = out["soft_icl"] + L.soft_kl(grid[a][b], grid[b][a], t)
    return out


def leaf_grid(m, n, width, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(n, width, dtype=torch.float64, generator=g, requires_grad=True)
            for _ in range(m)
        ]
        for _ in range(m)
    ]


@pytest.mark.parametrize("m", [2, 3])
def test_gradient_with_unequal_term_weights(m):
    """Each term's gradient scale reaches the right cells: distinct (and one negative) weights
    per term, every subset, against per-pair autograd on separate leaves."""
    grid = leaf_grid(m, 4, 7, seed=120 + m)
    leaves = [x for row in grid for x in row]
    ref = per_pair_terms(grid, 2.5)
    for needed in SUBSETS:
        terms = L.mcl_loss_terms(grid, T=2.5, needed=needed)
        loss = sum(UNEQUAL[name] * terms[name] for name in needed)
        want = sum(UNEQUAL[name] * ref[name] for name in needed)
        got_g = torch.autograd.grad(loss, leaves, allow_unused=True)
        want_g = torch.autograd.grad(want, leaves, retain_graph=True, allow_unused=True)
        for g_got, g_want in zip(got_g, want_g, strict=True):
            if g_want is None:  # a cell no needed term uses: it must get no gradient either
                assert g_got is None or g_got.abs().max() == 0
            else:
                torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def ref_student_gradient(grid, t, weights, eps=1e-6):
    """Central differences of the weighted terms w.r.t. each cell as a *student*: the KL
    teachers are held at their unperturbed values (the detach), loop references only."""
    m = len(grid)

    def cell_loss(a, b, rows):
        ce = ref_ce0(rows)
        out = weights.get("vcl" if a == b else "icl", 0.0) * ce
        for c in range(m):
            if c == a:
                continue
            if a == b:  # soft VCL: s(a->a) against each s(c->c)
                out += weights.get("soft_vcl", 0.0) * ref_kl(rows, grid[c][c], t)
            elif c == b:  # soft ICL: s(a->b) against s(b->a)
                out += weights.get("soft_icl", 0.0) * ref_kl(rows, grid[b][a], t)
        return out

    grads = []
    for a in range(m):
        for b in range(m):
            rows = [list(r) for r in grid[a][b]]
            g = [[0.0] * len(r) for r in rows]
            for i, row in enumerate(rows):
                for j in range(len(row)):
                    x = row[j]
                    row[j] = x + eps
                    up = cell_loss(a, b, rows)
                    row[j] = x - eps
                    down = cell_loss(a, b, rows)
                    row[j] = x
                    g[i][j] = (up - down) / (2 * eps)
            grads.append(torch.tensor(g, dtype=torch.float64))
    return grads


@pytest.mark.parametrize("m", [2, 3])
def test_gradient_matches_finite_differences_of_the_loop_reference(m):
    """The gradients against central differences of the loop formulas: no autograd and no code
    shared with the implementation."""
    grid = leaf_grid(m, 3, 5, seed=130 + m)
    leaves = [x for row in grid for x in row]
    terms = L.mcl_loss_terms(grid, T=2.0)
    got = torch.autograd.grad(sum(UNEQUAL[name] * terms[name] for name in L.TERMS), leaves)
    want = ref_student_gradient([[x.detach().tolist() for x in row] for row in grid], 2.0, UNEQUAL)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-8)


def test_soft_vcl_alone_on_a_full_grid_gives_the_cross_cells_zero_gradient():
    """Only diagonal students and no CE: the off-diagonal cells get exactly zero gradient."""
    grid = leaf_grid(3, 4, 6, seed=170)
    x = torch.stack([torch.stack(row) for row in grid])  # 3x3xNxL
    got = L.mcl_loss_terms(x, T=2.0, needed={"soft_vcl"})["soft_vcl"]
    want = per_pair_terms(grid, 2.0)["soft_vcl"]
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    leaves = [cell for row in grid for cell in row]
    g_got = torch.autograd.grad(got, leaves)
    g_want = torch.autograd.grad(want, leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_got, g_want, strict=True)):
        if i % 4:  # off the diagonal of the 3x3 grid
            assert b is None and torch.equal(a, torch.zeros_like(a))
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
