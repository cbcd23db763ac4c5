"""Supervised MCL terms (memory bank and in-batch, both variants) vs loop-by-loop transcriptions
of their definitions: value and gradient, M = 2 and 3, float64.

The references loop over members a, b, anchors i, columns and positives with scalar torch ops
(so autograd gives the reference gradient); they share no code with mcl_det.pretrain.losses_sup.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mcl_det.pretrain import losses as L
from mcl_det.pretrain import losses_sup as S

TERMS = ("vcl", "icl", "soft_vcl", "soft_icl")
TOL = dict(rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------------
# loop references (scalar torch ops, float64)
# ------------------------------------------------------------------------------------------------


def ref_lse(row):
    """log sum_j exp(row_j) over a list of scalars."""
    mx = max(float(x.detach()) for x in row)
    return mx + torch.log(sum(torch.exp(x - mx) for x in row))


def ref_kl(student_rows, teacher_rows, t, detach=True):
    """T^2 / N sum_i sum_j p_ij (log p_ij - log q_ij), p = softmax(teacher_i / T),
    q = softmax(student_i / T); the teacher is a constant unless ``detach`` is False."""
    total = 0.0
    for s_row, t_row in zip(student_rows, teacher_rows, strict=True):
        if detach:
            t_row = [x.detach() for x in t_row]
        lse_s = ref_lse([x / t for x in s_row])
        lse_t = ref_lse([x / t for x in t_row])
        for s_j, t_j in zip(s_row, t_row, strict=True):
            log_p = t_j / t - lse_t
            log_q = s_j / t - lse_s
            total = total + torch.exp(log_p) * (log_p - log_q)
    return t * t * total / len(student_rows)


def ref_supcon_rows(rows):
    """Mean over anchors with a positive of -1/|P| sum_{p in P} log softmax(row)_p;
    ``rows``: per anchor (logits, positive flags). No anchor with a positive: 0."""
    total, count = 0.0, 0
    for row, pos in rows:
        n_pos = sum(pos)
        if n_pos == 0:
            continue
        lse = ref_lse(row)
        total = total - sum(row[j] - lse for j in range(len(row)) if pos[j]) / n_pos
        count += 1
    return total / count if count else 0.0


def ref_bank_terms(zs, banks, idx, pos, neg, tau, t, variant, detach=True):
    """The bank rows of the module docstring, anchor by anchor; neg: NxK index lists."""
    m, n = len(zs), zs[0].shape[0]

    def columns(a, b, i):
        cols = [int(pos[i])] + [int(j) for j in neg[i]]
        if a != b and variant == "authors":
            cols = [int(idx[i])] + cols  # the peer's memory of the anchor's own image
        return cols

    def row(a, b, i):
        return [torch.dot(zs[a][i], banks[b][j].detach()) / tau for j in columns(a, b, i)]

    def rows(a, b):
        return [row(a, b, i) for i in range(n)]

    def ce(a, b):
        n_pos = 2 if (a != b and variant == "authors") else 1
        return ref_supcon_rows([(r, [j < n_pos for j in range(len(r))]) for r in rows(a, b)])

    out = dict.fromkeys(TERMS, 0.0)
    for a in range(m):
        out["vcl"] = out["vcl"] + ce(a, a)
        for b in range(m):
            if a != b:
                out["icl"] = out["icl"] + ce(a, b)
                out["soft_vcl"] = out["soft_vcl"] + ref_kl(rows(a, a), rows(b, b), t, detach)
                out["soft_icl"] = out["soft_icl"] + ref_kl(rows(a, b), rows(b, a), t, detach)
    return out


def ref_inbatch_terms(zs, labels, tau, t, variant, detach=True):
    """The in-batch rows of the module docstring, anchor by anchor."""
    m, n = len(zs), zs[0].shape[0]
    lab = [int(x) for x in labels]
    authors = variant == "authors"

    def row(a, b, i, cols):
        return [torch.dot(zs[a][i], zs[b][j]) / tau for j in cols]

    def ce_rows(a, b):
        out = []
        for i in range(n):
            self_out = a == b or authors  # column i out of denominator and positives
            cols = [j for j in range(n) if not (self_out and j == i)]
            out.append((row(a, b, i, cols), [lab[j] == lab[i] for j in cols]))
        return out

    def kl_rows(a, b):
        self_out = a == b and not authors  # single_positive's soft VCL drops column i
        return [row(a, b, i, [j for j in range(n) if not (self_out and j == i)]) for i in range(n)]

    out = dict.fromkeys(TERMS, 0.0)
    for a in range(m):
        out["vcl"] = out["vcl"] + ref_supcon_rows(ce_rows(a, a))
        for b in range(m):
            if a != b:
                out["icl"] = out["icl"] + ref_supcon_rows(ce_rows(a, b))
                out["soft_vcl"] = out["soft_vcl"] + ref_kl(kl_rows(a, a), kl_rows(b, b), t, detach)
                out["soft_icl"] = out["soft_icl"] + ref_kl(kl_rows(a, b), kl_rows(b, a), t, detach)
    return out


def unit(*shape, gen, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype, generator=gen), dim=-1)


def bank_case(m, n=5, c=4, nb=13, k=6, seed=0, shared=False):
    """Live embeddings (leaves), banks, and indices sampled like the engine: pos of the anchor's
    class (not itself), negatives of other classes."""
    g = torch.Generator().manual_seed(seed)
    zs = [unit(n, c, gen=g).requires_grad_() for _ in range(m)]
    banks = [unit(nb, c, gen=g) for _ in range(m)]
    targets = torch.arange(nb) % 3
    idx = torch.randperm(nb, generator=g)[:n]
    pos = torch.stack(
        [torch.nonzero((targets == targets[i]) & (torch.arange(nb) != i))[0, 0] for i in idx]
    )
    others = [torch.nonzero(targets != targets[i]).flatten() for i in idx]
    neg = torch.stack([o[torch.randint(0, len(o), (k,), generator=g)] for o in others])
    if shared:
        neg = torch.randint(0, nb, (k,), generator=g)
    return zs, banks, idx, pos, neg


def inbatch_case(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = [unit(6, 5, gen=g).requires_grad_() for _ in range(m)]
    labels = torch.tensor([0, 1, 0, 2, 1, 0])  # class 2 appears once: no positive in its rows
    return zs, labels


def assert_terms_and_grads(got, want, leaves):
    """Every term's value and its gradient w.r.t. every leaf, term by term."""
    assert set(got) == set(TERMS)
    for name in TERMS:
        assert got[name].dim() == 0
        assert got[name].item() == pytest.approx(
            float(torch.as_tensor(want[name]).detach()), rel=1e-9, abs=1e-11
        ), name
        g_got = torch.autograd.grad(got[name], leaves, retain_graph=True, allow_unused=True)
        g_want = torch.autograd.grad(want[name], leaves, retain_graph=True, allow_unused=True)
        for a, b in zip(g_got, g_want, strict=True):
            a = torch.zeros_like(leaves[0]) if a is None else a
            b = torch.zeros_like(leaves[0]) if b is None else b
            torch.testing.assert_close(a, b, **TOL, msg=name)


# ------------------------------------------------------------------------------------------------
# memory bank
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("variant", S.SUP_VARIANTS)
@pytest.mark.parametrize("m", [2, 3])
def test_bank_terms_match_loop_value_and_gradient(m, variant, shared):
    zs, banks, idx, pos, neg = bank_case(m, seed=10 * m + shared, shared=shared)
    got = S.bank_terms(zs, banks, idx, pos, neg, tau=0.1, T=3.0, needed=None, variant=variant)
    neg_rows = neg.expand(len(idx), -1) if shared else neg
    want = ref_bank_terms(zs, banks, idx, pos, neg_rows, 0.1, 3.0, variant)
    assert want["soft_vcl"] > 1e-3 and want["soft_icl"] > 1e-3  # the KL terms are not trivial
    assert_terms_and_grads(got, want, zs)


@pytest.mark.parametrize("m", [2, 3])
def test_bank_teacher_side_gets_no_gradient(m):
    """Our gradients are the detached reference's, and the detach matters on this input."""
    zs, banks, idx, pos, neg = bank_case(m, seed=30 + m)
    got = S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, {"soft_vcl", "soft_icl"})
    free = ref_bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, "authors", detach=False)
    want = ref_bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, "authors")
    for name in ("soft_vcl", "soft_icl"):
        g_got = torch.autograd.grad(got[name], zs, retain_graph=True)
        g_want = torch.autograd.grad(want[name], zs, retain_graph=True)
        g_free = torch.autograd.grad(free[name], zs, retain_graph=True)
        for a, b, f in zip(g_got, g_want, g_free, strict=True):
            torch.testing.assert_close(a, b, **TOL)
            assert (a - f).abs().max() > 1e-6, name  # a teacher gradient would have shown


def test_bank_gives_no_gradient_to_the_banks():
    zs, banks, idx, pos, neg = bank_case(2, seed=40)
    banks = [b.clone().requires_grad_() for b in banks]
    terms = S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, None)
    grads = torch.autograd.grad(sum(terms.values()), [*zs, *banks], allow_unused=True)
    assert all(g.abs().sum() > 0 for g in grads[:2])
    assert all(g is None for g in grads[2:])


def test_bank_variants_differ_exactly_where_they_should():
    """VCL and Soft VCL are the same rows in both variants; ICL and Soft ICL are not."""
    zs, banks, idx, pos, neg = bank_case(3, seed=50)
    a = S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, None, variant="authors")
    b = S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, None, variant="single_positive")
    assert_variants_agree_only_on(a, b, zs, same=("vcl", "soft_vcl"), differ=("icl", "soft_icl"))


def test_authors_bank_icl_rewards_the_peers_memory_of_the_same_image():
    """Set the peer's memory of an anchor's own image to the anchor itself: the authors' ICL
    (the own entry is a positive) falls; single_positive never reads that entry."""
    zs, banks, idx, pos, neg = bank_case(2, nb=60, seed=60)
    read = set(pos.tolist()) | set(neg.flatten().tolist())
    free = [i for i in range(len(idx)) if int(idx[i]) not in read]  # own entries no row reads
    assert free
    moved = [b.clone() for b in banks]
    for b in range(2):
        moved[b][idx[free]] = zs[1 - b][free].detach()
    kw = dict(tau=0.1, T=3.0, needed={"icl"})
    before = S.bank_terms(zs, banks, idx, pos, neg, **kw)["icl"].item()
    after = S.bank_terms(zs, moved, idx, pos, neg, **kw)["icl"].item()
    assert after < before - 1e-3
    sp = dict(kw, variant="single_positive")
    assert S.bank_terms(zs, moved, idx, pos, neg, **sp)["icl"].item() == pytest.approx(
        S.bank_terms(zs, banks, idx, pos, neg, **sp)["icl"].item(), rel=1e-12
    )


@pytest.mark.parametrize("variant", S.SUP_VARIANTS)
def test_bank_needed_subsets_banks_as_one_tensor_and_shared_negatives(variant):
    zs, banks, idx, pos, neg = bank_case(3, seed=70)
    full = S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, None, variant=variant)
    stacked = S.bank_terms(zs, torch.stack(banks), idx, pos, neg, 0.1, 3.0, None, variant=variant)
    for name in TERMS:
        torch.testing.assert_close(stacked[name], full[name], **TOL)
    for needed in ({"vcl"}, {"vcl", "soft_vcl"}, {"icl"}, {"soft_icl", "vcl"}):
        part = S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, needed, variant=variant)
        assert set(part) == needed
        for name in needed:
            torch.testing.assert_close(part[name], full[name], **TOL)
    # shared negatives (K) == per-anchor negatives with every row equal
    shared = neg[0]
    one = S.bank_terms(zs, banks, idx, pos, shared, 0.1, 3.0, None, variant=variant)
    rows = S.bank_terms(
        zs, banks, idx, pos, shared.expand(len(idx), -1), 0.1, 3.0, None, variant=variant
    )
    for name in TERMS:
        torch.testing.assert_close(one[name], rows[name], **TOL)


def test_single_positive_bank_terms_equal_todays_mcl_loss_terms():
    """single_positive = the grid [pos, neg] for every pair fed to the self-supervised terms."""
    zs, banks, idx, pos, neg = bank_case(3, seed=80)
    grid = [
        [
            torch.stack(
                [
                    torch.stack([torch.dot(zs[a][i], banks[b][j]) / 0.1 for j in [pos[i], *neg[i]]])
                    for i in range(len(idx))
                ]
            )
            for b in range(3)
        ]
        for a in range(3)
    ]
    want = L.mcl_loss_terms(grid, T=3.0)
    got = S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, None, variant="single_positive")
    assert_terms_and_grads(got, want, zs)


def test_bank_update_in_place_loop():
    g = torch.Generator().manual_seed(21)
    bank = unit(10, 4, gen=g)
    before = bank.clone()
    idx = torch.tensor([7, 2, 5])
    z = unit(3, 4, gen=g).requires_grad_()
    S.bank_update(bank, idx, z, momentum=0.3)
    for row in range(10):
        if row in idx.tolist():
            i = idx.tolist().index(row)
            mixed = [0.3 * float(before[row, c]) + 0.7 * float(z[i, c].detach()) for c in range(4)]
            norm = math.sqrt(sum(x * x for x in mixed))
            want = torch.tensor([x / norm for x in mixed], dtype=torch.float64)
            torch.testing.assert_close(bank[row], want, **TOL)
        else:
            assert torch.equal(bank[row], before[row])
    assert not bank.requires_grad


# ------------------------------------------------------------------------------------------------
# in-batch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", S.SUP_VARIANTS)
@pytest.mark.parametrize("m", [2, 3])
def test_inbatch_terms_match_loop_value_and_gradient(m, variant):
    zs, labels = inbatch_case(m, seed=100 + m)
    got = S.inbatch_terms(zs, labels, tau=0.1, T=3.0, needed=None, variant=variant)
    want = ref_inbatch_terms(zs, labels, 0.1, 3.0, variant)
    assert want["soft_vcl"] > 1e-3 and want["soft_icl"] > 1e-3
    assert_terms_and_grads(got, want, zs)


@pytest.mark.parametrize("m", [2, 3])
def test_inbatch_teacher_side_gets_no_gradient(m):
    zs, labels = inbatch_case(m, seed=110 + m)
    got = S.inbatch_terms(zs, labels, 0.1, 3.0, {"soft_vcl", "soft_icl"})
    want = ref_inbatch_terms(zs, labels, 0.1, 3.0, "authors")
    free = ref_inbatch_terms(zs, labels, 0.1, 3.0, "authors", detach=False)
    for name in ("soft_vcl", "soft_icl"):
        g_got = torch.autograd.grad(got[name], zs, retain_graph=True)
        g_want = torch.autograd.grad(want[name], zs, retain_graph=True)
        g_free = torch.autograd.grad(free[name], zs, retain_graph=True)
        for a, b, f in zip(g_got, g_want, g_free, strict=True):
            torch.testing.assert_close(a, b, **TOL)
            assert (a - f).abs().max() > 1e-6, name


def test_inbatch_variants_differ_exactly_where_they_should():
    """VCL and Soft ICL are the same rows in both variants; ICL (column i out) and Soft VCL
    (self-similarity column in) are not."""
    zs, labels = inbatch_case(3, seed=120)
    a = S.inbatch_terms(zs, labels, 0.1, 3.0, None, variant="authors")
    b = S.inbatch_terms(zs, labels, 0.1, 3.0, None, variant="single_positive")
    assert_variants_agree_only_on(a, b, zs, same=("vcl", "soft_icl"), differ=("icl", "soft_vcl"))


def test_inbatch_single_positive_matches_the_former_supcon_reference():
    """The former supcon_terms test, against single_positive (python-float loop reference)."""
    for m in (2, 3):
        g = torch.Generator().manual_seed(30 + m)
        n, c = 6, 5
        zs = [unit(n, c, gen=g).requires_grad_() for _ in range(m)]
        labels = torch.tensor([0, 1, 0, 2, 1, 3])  # class 2 and 3 appear once: no positive in S_mm
        got = S.inbatch_terms(zs, labels, tau=0.07, T=3.0, needed=None, variant="single_positive")
        want = ref_supcon_terms([z.detach() for z in zs], labels, 0.07, 3.0)
        for name in TERMS:
            assert got[name].item() == pytest.approx(want[name], rel=1e-9, abs=1e-10), name
        grads = torch.autograd.grad(got["icl"] + got["soft_icl"], zs)
        assert all(gr.abs().sum() > 0 for gr in grads)


def ref_supcon_terms(zs, labels, tau, t) -> dict[str, float]:
    """The former supcon_terms docstring in python floats (kept from the former tests)."""
    m, n = len(zs), zs[0].shape[0]
    lab = [int(x) for x in labels]

    def dot(u, v):
        return sum(float(u[k]) * float(v[k]) for k in range(len(u)))

    def lse(row):
        mx = max(row)
        return mx + math.log(sum(math.exp(x - mx) for x in row))

    def rows(a, b):
        out = []
        for i in range(n):
            cols = [j for j in range(n) if not (a == b and j == i)]
            out.append(
                ([dot(zs[a][i], zs[b][j]) / tau for j in cols], [lab[j] == lab[i] for j in cols])
            )
        return out

    def supcon(a, b):
        total, count = 0.0, 0
        for row, pos in rows(a, b):
            if sum(pos):
                total += -sum(row[j] - lse(row) for j in range(len(row)) if pos[j]) / sum(pos)
                count += 1
        return total / count

    def kl(s_rows, t_rows):
        total = 0.0
        for (s, _), (tt, _) in zip(s_rows, t_rows, strict=True):
            ls, lt = lse([x / t for x in s]), lse([x / t for x in tt])
            total += sum(
                math.exp(y / t - lt) * ((y / t - lt) - (x / t - ls))
                for x, y in zip(s, tt, strict=True)
            )
        return t * t * total / n

    out = dict.fromkeys(TERMS, 0.0)
    for a in range(m):
        out["vcl"] += supcon(a, a)
        for b in range(m):
            if a != b:
                out["icl"] += supcon(a, b)
                out["soft_vcl"] += kl(rows(a, a), rows(b, b))
                out["soft_icl"] += kl(rows(a, b), rows(b, a))
    return out


@pytest.mark.parametrize("variant", S.SUP_VARIANTS)
def test_inbatch_needed_subset(variant):
    g = torch.Generator().manual_seed(40)
    zs = [unit(4, 3, gen=g) for _ in range(3)]
    labels = torch.tensor([0, 0, 1, 1])
    full = S.inbatch_terms(zs, labels, 0.1, 3.0, None, variant=variant)
    for needed in ({"vcl", "soft_vcl"}, {"icl"}, {"soft_icl"}):
        part = S.inbatch_terms(zs, labels, 0.1, 3.0, needed, variant=variant)
        assert set(part) == needed
        for name in part:
            torch.testing.assert_close(part[name], full[name], **TOL)


def test_drop_diagonal():
    x = torch.arange(32.0).view(2, 4, 4)
    want = torch.tensor(
        [[[x[p, i, j].item() for j in range(4) if j != i] for i in range(4)] for p in range(2)]
    )
    torch.testing.assert_close(S._drop_diagonal(x), want)
    torch.testing.assert_close(S._drop_diagonal(x[0]), want[0])


@pytest.mark.parametrize("variant", S.SUP_VARIANTS)
def test_inbatch_without_any_positive_is_a_connected_zero(variant):
    z = [unit(3, 4, gen=torch.Generator().manual_seed(60)).requires_grad_() for _ in range(2)]
    terms = S.inbatch_terms(z, torch.tensor([0, 1, 2]), 0.1, 3.0, {"vcl", "icl"}, variant=variant)
    assert terms["vcl"].item() == 0.0
    terms["vcl"].backward()  # still part of the graph (DDP needs every parameter used)
    assert z[0].grad is not None
    assert math.isfinite(terms["icl"].item())


# ------------------------------------------------------------------------------------------------
# shared behaviour
# ------------------------------------------------------------------------------------------------


def test_cohort_of_one_has_only_vcl():
    zs, banks, idx, pos, neg = bank_case(1, seed=140)
    for terms in (
        S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, None),
        S.inbatch_terms(zs, torch.tensor([0, 1, 0, 1, 1]), 0.1, 3.0, None),
    ):
        assert set(terms) == set(TERMS)
        assert terms["vcl"].item() > 0
        assert all(terms[k].item() == 0.0 for k in ("icl", "soft_vcl", "soft_icl"))


def test_half_precision_embeddings_are_upcast():
    zs, banks, idx, pos, neg = bank_case(2, n=4, c=16, nb=40, k=30, seed=150)
    zs32 = [z.detach().float() for z in zs]
    labels = torch.tensor([0, 1, 0, 1])
    for fn, args in (
        (S.bank_terms, ([b.float() for b in banks], idx, pos, neg)),
        (S.inbatch_terms, (labels,)),
    ):
        ref = fn(zs32, *args, 0.1, 3.0, None)
        half = fn([z.bfloat16() for z in zs32], *args, 0.1, 3.0, None)
        for name in TERMS:
            assert half[name].dtype == torch.float32
            assert half[name].item() == pytest.approx(ref[name].item(), rel=5e-2, abs=2e-2), name


def test_bad_arguments_are_errors():
    zs, banks, idx, pos, neg = bank_case(2, seed=160)
    with pytest.raises(ValueError, match="variant"):
        S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, None, variant="paper")
    with pytest.raises(ValueError, match="variant"):
        S.inbatch_terms(zs, idx, 0.1, 3.0, None, variant="paper")
    with pytest.raises(ValueError, match="unknown MCL loss term"):
        S.bank_terms(zs, banks, idx, pos, neg, 0.1, 3.0, {"vlc"})
    with pytest.raises(ValueError, match="banks"):
        S.bank_terms(zs, banks[:1], idx, pos, neg, 0.1, 3.0, None)
    with pytest.raises(ValueError, match="pos"):
        S.bank_terms(zs, banks, idx, pos[:2], neg, 0.1, 3.0, None)
    with pytest.raises(ValueError, match="labels"):
        S.inbatch_terms(zs, idx[:2], 0.1, 3.0, None)


def test_sup_terms_compare_script(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "sup_terms_compare",
        Path(__file__).resolve().parents[2] / "benchmarks" / "sup_terms_compare.py",
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "c.json"
    res = mod.main(["--out", str(out)])
    assert json.loads(out.read_text()) == res
    for mode in ("bank", "inbatch"):
        assert set(res[mode]) == set(TERMS)
        for name in TERMS:
            assert set(res[mode][name]) == {"single_positive", "authors", "rel_diff"}
    assert res["bank"]["vcl"]["rel_diff"] == 0.0 and res["inbatch"]["soft_icl"]["rel_diff"] == 0.0
    assert res["bank"]["icl"]["rel_diff"] != 0.0 and res["inbatch"]["soft_vcl"]["rel_diff"] != 0.0


def assert_variants_agree_only_on(a, b, zs, same, differ):
    """The terms in ``same`` are equal in value and gradient; those in ``differ`` are not."""
    for name in same:
        assert a[name].item() == pytest.approx(b[name].item(), rel=1e-12), name
        for ga, gb in zip(
            torch.autograd.grad(a[name], zs, retain_graph=True),
            torch.autograd.grad(b[name], zs, retain_graph=True),
            strict=True,
        ):
            torch.testing.assert_close(ga, gb, **TOL)
    for name in differ:
        assert abs(a[name].item() - b[name].item()) > 1e-3 * abs(b[name].item()), name
