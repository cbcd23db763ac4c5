"""Samplers, per-sample deterministic augmentation, lr schedule and the kNN monitor vs loops."""

import math

import pytest
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


# ---------------------------------------------------------------------------- device pipeline


def _folder(root, n=6, size=(40, 30)):
    """A one-class ImageFolder of small JPEGs (and one PNG, which the GPU decoder cannot read)."""
    d = root / "c0"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(d / (f"{i}.png" if i == n - 1 else f"{i}.jpg"), quality=95)
    return root


def test_resolve_pipeline_auto_and_bad_values():
    from mcl_det.pretrain.data import resolve_pipeline
    from mcl_det.utils.errors import MCLDetError

    cfg = get_pretrain_cfg()
    assert resolve_pipeline(cfg, torch.device("cpu")) == "pil"
    assert resolve_pipeline(cfg, torch.device("cuda", 0)) == "device"
    cfg.DATA.PIPELINE = "device"
    assert resolve_pipeline(cfg, torch.device("cpu")) == "device"
    bad = get_pretrain_cfg()
    bad.DATA.JPEG_DECODE = "cuda"  # a valid value that needs CUDA: checked against the device
    with pytest.raises(MCLDetError, match="JPEG_DECODE"):
        resolve_pipeline(bad, torch.device("cpu"))


def test_device_pipeline_items_independent_of_workers(tmp_path):
    """uint8 crops + parameters from (SEED, epoch, index): 0 or 2 workers, same batches."""
    from torch.utils.data import DataLoader

    from mcl_det.pretrain.augment import moco_recipe
    from mcl_det.pretrain.data import CropViews

    ds = SafeImageFolder(_folder(tmp_path), CropViews(moco_recipe("aug+", 24)), seed=5)
    views, label, idx = ds[(2, 3)]
    assert [v.dtype for v, _ in views] == [torch.uint8] * 2 and views[0][0].shape == (3, 24, 24)
    assert not torch.equal(views[0][0], views[1][0])  # two different views

    def run(workers):
        s = EpochBatchSampler(ds.targets, 4, seed=1)
        s.set_epoch(2)
        return list(DataLoader(ds, batch_sampler=s, num_workers=workers))

    a, b = run(0), run(2)
    (va, _, ia), (vb, _, ib) = a[0], b[0]
    assert torch.equal(ia, ib)
    for (xa, pa), (xb, pb) in zip(va, vb):
        assert torch.equal(xa, xb) and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_encoded_views_for_gpu_decoding_run_on_cpu(tmp_path):
    """The JPEG-on-GPU path, with torchvision's CPU decoder standing in for the CUDA one."""
    from torchvision.io import decode_jpeg, read_file

    from mcl_det.pretrain.augment import decode_and_crop, moco_recipe
    from mcl_det.pretrain.data import CropViews, EncodedViews, collate_encoded

    recipe = moco_recipe("aug+", 24)
    root = _folder(tmp_path)
    enc = SafeImageFolder(root, EncodedViews(recipe), seed=0)
    pil = SafeImageFolder(root, CropViews(recipe), seed=0)
    items = [enc[(i, 0)] for i in range(len(enc))]
    jpeg = items[0][0]
    assert torch.equal(jpeg["data"], read_file(enc.samples[0][0]))  # the file's bytes
    assert items[-1][0]["data"].shape == (3, 30, 40)  # the PNG is decoded by the worker
    batch, labels, idx = collate_encoded(items)
    assert batch["crops"].shape == (len(enc), 2, 4) and idx.tolist() == list(range(len(enc)))
    views = decode_and_crop(batch["data"], batch["crops"], 24, torch.device("cpu"))
    assert [v.shape for v in views] == [(len(enc), 3, 24, 24)] * 2
    for i in range(len(enc)):  # same crops and parameters as the CPU-decoding pipeline
        ref, _, _ = pil[(i, 0)]
        for v in range(2):
            assert all(torch.equal(batch["params"][v][k][i], ref[v][1][k]) for k in ref[v][1])
            gap = (views[v][i].float() - ref[v][0].float()).abs().mean()
            assert gap < 4.0  # antialiased bilinear on tensors vs PIL's resize: a few levels
    assert decode_jpeg(jpeg["data"]).shape == (3, 30, 40)


def test_device_pipeline_skips_unreadable_files(tmp_path, capsys):
    from mcl_det.pretrain.augment import moco_recipe
    from mcl_det.pretrain.data import CropViews

    root = _folder(tmp_path)
    (root / "c0" / "0.jpg").write_bytes(b"not a jpeg")
    ds = SafeImageFolder(root, CropViews(moco_recipe("aug+", 16)), seed=0, scan=False)
    views, _, idx = ds[(0, 0)]  # replaced by the next readable image, same index reported
    assert views[0][0].shape == (3, 16, 16) and idx == 0 and ds.load_failures == 1
    assert "skipping unreadable image" in capsys.readouterr().out
