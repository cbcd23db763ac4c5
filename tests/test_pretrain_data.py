"""Samplers, per-sample deterministic augmentation, lr schedule and the kNN monitor vs loops."""

import math

import torch
from PIL import Image

from mcl_det.data.toy import make_toy_imagenet
from mcl_det.pretrain.config import get_pretrain_cfg
from mcl_det.pretrain.data import (
    EpochBatchSampler,
    SafeImageFolder,
    TwoCrops,
    moco_v2_transform,
)
from mcl_det.pretrain.engine import epoch_steps, lr_schedule
from mcl_det.pretrain.monitor import knn_predict


def test_rank_slices_make_up_the_global_batch_and_resume_skips():
    targets = [i % 5 for i in range(40)]
    one = list(EpochBatchSampler(targets, 8, seed=3))
    two = [list(EpochBatchSampler(targets, 8, rank=r, world=2, seed=3)) for r in (0, 1)]
    assert len(one) == 5
    for b in range(5):
        assert one[b] == two[0][b] + two[1][b]  # same global batches whatever the world size
    s = EpochBatchSampler(targets, 8, seed=3)
    s.set_epoch(1, start_batch=2)
    later = list(s)
    s.set_epoch(1)
    assert later == list(s)[2:] and later[0][0][1] == 1  # (index, epoch) pairs
    assert later != one[2:]  # another epoch, another order


def test_class_balanced_batches():
    targets = sorted([c for c in range(6) for _ in range(7)])
    s = EpochBatchSampler(targets, 12, seed=0, balanced=True, samples_per_class=4)
    for batch in s:
        labels = [targets[i] for i, _ in batch]
        counts = torch.bincount(torch.tensor(labels), minlength=6)
        assert sorted(counts.tolist()) == [0, 0, 0, 4, 4, 4]
        assert len({i for i, _ in batch}) == 12  # no image twice in one batch


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    make_toy_imagenet(tmp_path, num_classes=1, train_per_class=2, val_per_class=1, size=32)
    ds = SafeImageFolder(tmp_path / "train", TwoCrops(moco_v2_transform(24)), seed=0)
    state = torch.get_rng_state()
    (a1, a2), label, idx = ds[(1, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    (b1, _), _, _ = ds[(1, 0)]
    (c1, _), _, _ = ds[(1, 1)]
    assert torch.equal(a1, b1) and not torch.equal(a1, c1) and not torch.equal(a1, a2)
    assert a1.shape == (3, 24, 24) and (label, idx) == (0, 1)
    assert isinstance(SafeImageFolder(tmp_path / "train")[0][0], Image.Image)


def test_lr_schedules_match_formulas():
    cfg = get_pretrain_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 512  # linear scaling: 0.03 * 2
    cfg.SOLVER.EPOCHS = 10  # 10 iterations per epoch: 100 in all
    lr_at = lr_schedule(cfg, 10)
    for it in (0, 25, 50, 99):
        assert math.isclose(lr_at(it), 0.06 * 0.5 * (1 + math.cos(math.pi * it / 100)))
    cfg.SOLVER.SCHEDULE, cfg.SOLVER.STEPS = "step", (3, 6)
    lr_at = lr_schedule(cfg, 10)
    got = [round(lr_at(e * 10), 6) for e in (0, 2, 3, 5, 6, 9)]
    assert got == [0.06, 0.06, 0.006, 0.006, 0.0006, 0.0006]
    # the last iteration of an epoch is still that epoch; steps past the end never come
    assert round(lr_at(29), 6) == 0.06 and round(lr_at(30), 6) == 0.006
    assert [epoch_steps(1.0, 0.1, (60, 80), 2)(e) for e in (0, 1)] == [1.0, 1.0]


def test_knn_predict_matches_loop():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (30,), generator=g)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    pred = knn_predict(q, bank, labels, 3, k=5, t=0.1)
    for i in range(6):
        sims = [(float(q[i] @ bank[j]), j) for j in range(30)]
        top = sorted(sims, reverse=True)[:5]
        votes = [0.0] * 3
        for s, j in top:
            votes[int(labels[j])] += math.exp(s / 0.1)
        assert int(pred[i]) == max(range(3), key=lambda c: votes[c])
