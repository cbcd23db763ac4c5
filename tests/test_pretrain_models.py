"""Cohort models: gradients, heads in use, momentum update, lockstep queues, shuffle-BN, and
"interaction weights 0 == independent training"."""

import copy

import pytest
import torch

from mcl_det.pretrain import distributed as du
from mcl_det.pretrain.models import SelfSupCohort, SupervisedCohort, build_resnet

TAU, T = 0.2, 3.0
ALL = {"vcl": 1.0, "icl": 1.0, "soft_vcl": 1.0, "soft_icl": 1.0}


def _cohort(archs=("resnet18", "resnet18"), k=32, momentum=0.999, splits=1, seed=0, weights=ALL):
    torch.manual_seed(seed)
    return SelfSupCohort(
        archs,
        dim=16,
        hidden=32,
        queue_size=k,
        momentum=momentum,
        bn_splits=splits,
        tau=TAU,
        T=T,
        weights=weights,
    )


def _batch(n=8, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def _loss(cohort, x_q, x_k):
    """The cohort's own training step (the model itself as the forward); returns (loss, keys)."""
    step = cohort.training_step(cohort, ((x_q, x_k), None, None))
    return step.loss, step.state


def test_gradients_reach_every_member_and_head_not_key_side():
    c = _cohort(("resnet18", "resnet34"))
    loss, _ = _loss(c, *_batch())
    loss.backward()
    for m in c.members:
        for part in (m.encoder, m.head):
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        assert all(p.grad is None for p in (*m.encoder_k.parameters(), *m.head_k.parameters()))
    assert c.queues.grad is None


def test_head_is_used_in_forward():
    c = _cohort()
    x_q, _ = _batch()
    c.eval()
    before = c.members[0].query(x_q)
    with torch.no_grad():
        c.members[0].head.fc2.weight.mul_(-1)
        c.members[0].head.fc2.bias.mul_(-1)
    after = c.members[0].query(x_q)
    assert torch.allclose(after, -before, atol=1e-5)
    assert torch.allclose(after.norm(dim=1), torch.ones(8), atol=1e-5)  # L2-normalised, 16-d
    assert after.shape == (8, 16)


def test_momentum_update_matches_formula():
    c = _cohort(momentum=0.9)
    m = c.members[0]
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    expected = [
        0.9 * pk + 0.1 * pq for pq, pk in zip(m.encoder.parameters(), m.encoder_k.parameters())
    ]
    m.momentum_update(0.9)
    for e, pk in zip(expected, m.encoder_k.parameters()):
        assert torch.allclose(e, pk)


def test_queues_enqueued_in_lockstep_and_wrap():
    c = _cohort(k=24)
    x_q, x_k = _batch()
    for step in range(4):  # 4 x 8 keys into 24 slots: wraps around once
        _, ks = c(x_q + step, x_k + step)
        ptr = int(c.queue_ptr)
        c.enqueue(ks)
        for m, k in enumerate(ks):
            assert torch.equal(c.queues[m, ptr : ptr + 8], k)  # column j of every queue: image j
        assert int(c.queue_ptr) == (ptr + 8) % 24
    assert c.queues[1].shape == (24, 16)


def test_enqueue_rejects_queue_not_multiple_of_batch():
    c = _cohort(k=20)
    _, ks = c(*_batch())
    with pytest.raises(Exception, match="multiple"):
        c.enqueue(ks)


def test_single_process_shuffle_bn_equals_per_split_forward():
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    xs, restore = du.batch_shuffle(x)
    assert not torch.equal(xs, x) and torch.equal(du.batch_unshuffle(xs, restore), x)
    # keys through 2 BN groups after a shuffle == the same groups forwarded by hand
    c = _cohort(splits=2)
    x_q, x_k = _batch()
    state = torch.get_rng_state()
    _, ks = c(x_q, x_k)
    torch.set_rng_state(state)
    perm = torch.randperm(8)
    ref = copy.deepcopy(_cohort(splits=2))
    m = ref.members[0]
    m.momentum_update(ref.momentum)  # same update as inside forward
    with torch.no_grad():
        shuffled = x_k[perm]
        out = torch.cat([m.key(shuffled[:4]), m.key(shuffled[4:])])
    assert torch.allclose(ks[0], out[torch.argsort(perm)], atol=1e-5)


def test_zero_interaction_weights_equal_independent_training():
    """Cohort with W_ICL = W_SOFT_* = 0: each member's update == training it alone."""
    x_q, x_k = _batch()
    w0 = {"vcl": 1.0, "icl": 0.0, "soft_vcl": 0.0, "soft_icl": 0.0}
    cohort = _cohort(weights=w0)
    alone = [copy.deepcopy(cohort) for _ in range(2)]
    for i, a in enumerate(alone):  # a one-member cohort holding member i and its queue
        a.members = torch.nn.ModuleList([a.members[i]])
        a.queues = a.queues[i : i + 1].clone()
        a.archs = [a.archs[i]]

    def run(model, steps=2):
        opt = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=0.5,
            momentum=0.9,
            weight_decay=1e-4,
        )
        torch.manual_seed(5)  # same shuffle permutations in every run
        for s in range(steps):
            loss, ks = _loss(model, x_q + s, x_k - s)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.after_step(ks)

    run(cohort)
    for i, a in enumerate(alone):
        run(a)
        for (name, p), q in zip(
            cohort.members[i].state_dict().items(), a.members[0].state_dict().values()
        ):
            assert torch.allclose(p.float(), q.float(), atol=1e-5, rtol=1e-4), name
        assert torch.allclose(cohort.queues[i], a.queues[0], atol=1e-5)


def test_tiny_training_lowers_the_loss():
    c = _cohort(momentum=0.0, k=16)  # key encoder == query encoder; fixed queue
    x_q, x_k = _batch(n=8)
    opt = torch.optim.SGD([p for p in c.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    first = None
    for _ in range(6):
        loss, _ = _loss(c, x_q, x_q)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first


def test_supervised_cohort_and_classifier_keys():
    torch.manual_seed(0)
    c = SupervisedCohort(["resnet18", "resnet18"], num_classes=5, dim=16, bank_size=10)
    logits, zs = c(torch.randn(4, 3, 32, 32))
    assert [tuple(x.shape) for x in logits] == [(4, 5)] * 2 and zs[1].shape == (4, 16)
    assert c.banks.shape == (2, 10, 16)
    keys = c.state_dict()
    assert "members.0.encoder.fc.weight" in keys and "members.1.head.fc1.weight" in keys
    # torchvision names: the member's encoder loads into a plain torchvision resnet18
    ref = build_resnet("resnet18", 5)
    prefix = "members.0.encoder."
    ref.load_state_dict({k[len(prefix) :]: v for k, v in keys.items() if k.startswith(prefix)})


def test_unknown_arch_is_user_error():
    from mcl_det.utils.errors import MCLDetError

    with pytest.raises(MCLDetError, match="resnet18"):
        build_resnet("vgg16")
