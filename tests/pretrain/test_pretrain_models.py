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


def test_every_method_implements_the_cohort_interface():
    """What the Trainer reads before and after building a cohort is declared by CohortMethod and
    set by every class cohort_class can return."""
    from mcl_det.pretrain.method import CohortMethod
    from mcl_det.pretrain.models import COHORTS

    for cls in (*COHORTS.values(), SupervisedCohort):
        assert issubclass(cls, CohortMethod) and not cls.__abstractmethods__, cls
        assert isinstance(cls.metric, str) and isinstance(cls.balanced_batches, bool)
        assert isinstance(cls.min_classes, int) and cls.min_classes >= 1
    assert (SelfSupCohort.metric, SupervisedCohort.metric) == ("knn_top1", "top1")


def test_a_method_missing_part_of_the_interface_cannot_be_built():
    from mcl_det.pretrain.method import CohortMethod

    with pytest.raises(TypeError, match="abstract"):
        CohortMethod()

    class NoEvaluate(CohortMethod):
        metric = "none"

        @classmethod
        def from_config(cls, cfg, num_classes=0, targets=()):
            return cls()

        def training_step(self, forward, batch):
            raise AssertionError

        def after_step(self, state):
            pass

    with pytest.raises(TypeError, match="evaluate"):
        NoEvaluate()


def _imported_modules(path):
    """Every module a source file imports, at any level (function bodies too), as dotted names
    relative to its package (``from .x import y`` -> ``.x``; ``from . import x`` -> ``.x``)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = "." * node.level + (node.module or "")
            found.add(mod)
            found |= {f"{mod}.{a.name}" if node.module else mod + a.name for a in node.names}
    return found


def test_config_and_models_do_not_import_each_other():
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[2] / "mcl_det" / "pretrain"
    in_config, in_models = (
        _imported_modules(pkg / "config.py"),
        _imported_modules(pkg / "models.py"),
    )
    assert not {".models", "mcl_det.pretrain.models"} & in_config
    assert not {".config", "mcl_det.pretrain.config"} & in_models
    assert ".choices" in in_config and ".choices" in in_models  # the names both check against


def test_classifiers_top1_against_a_direct_count():
    from mcl_det.pretrain.evaluation import classifiers_top1

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, 2, 2, generator=g), torch.randint(0, 3, (5,), generator=g), 0)]
    batches.append(
        (torch.randn(3, 3, 2, 2, generator=g), torch.randint(0, 3, (3,), generator=g), 0)
    )
    heads = [torch.randn(12, 3, generator=g) for _ in range(2)]

    def logits_of(x):
        return [x.flatten(1) @ w for w in heads]

    got = classifiers_top1(logits_of, 2, batches, torch.device("cpu"))
    hits, n = [0, 0, 0], 0
    for x, y, _ in batches:
        lg = logits_of(x)
        probs = [torch.softmax(v, 1) for v in lg]
        for i in range(len(y)):
            for m in range(2):
                hits[m] += int(int(lg[m][i].argmax()) == int(y[i]))
            hits[2] += int(int(((probs[0][i] + probs[1][i]) / 2).argmax()) == int(y[i]))
            n += 1
    assert got == pytest.approx([100.0 * h / n for h in hits])
    assert classifiers_top1(logits_of, 2, [], torch.device("cpu")) == [0.0, 0.0, 0.0]
