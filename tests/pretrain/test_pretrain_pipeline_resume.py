"""The device input pipeline (DATA.PIPELINE device, batched on the CPU here) in training runs:
a resumed run stays bit-exact, supervised training and linear evaluation run through it."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from pretrain_toy import toy_opts, train_losses

from mcl_det.pretrain.checkpoint import load_checkpoint
from mcl_det.pretrain.config import setup_pretrain_cfg
from mcl_det.pretrain.engine import train


def _opts(root, out, **extra):
    return toy_opts(root, out, **{"DATA.PIPELINE": "device", "DEVICE": "cpu", **extra})


ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "pretrain" / "configs" / "toy.yaml")


def _imagefolder(root: Path, classes=4, per_class=6, size=32) -> Path:
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = torch.rand(size, size, 3, generator=g) * 0.5
            img[..., c % 3] += 0.5
            Image.fromarray((img * 255).byte().numpy()).save(d / f"{i}.jpg", quality=90)
    return root


def test_exact_resume_mid_epoch_device_pipeline(tmp_path):
    """6 iterations in one go == 4, stop, --resume, 2 more: identical losses and weights."""
    root = _imagefolder(tmp_path / "data")
    full, part = tmp_path / "full", tmp_path / "part"
    train(setup_pretrain_cfg(TOY, _opts(root, full), cohort=2))
    train(setup_pretrain_cfg(TOY, _opts(root, part, **{"SOLVER.MAX_ITER": "4"}), cohort=2))
    assert load_checkpoint(part / "checkpoint_last.pth")["iteration"] == 4
    train(setup_pretrain_cfg(TOY, _opts(root, part), cohort=2), resume=True)
    assert train_losses(full) == train_losses(part) and len(train_losses(full)) == 6
    a = load_checkpoint(full / "checkpoint_last.pth")["model"]
    b = load_checkpoint(part / "checkpoint_last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the pipeline is part of the run's recipe: another one gives other losses
    pil = tmp_path / "pil"
    train(setup_pretrain_cfg(TOY, _opts(root, pil, **{"DATA.PIPELINE": "pil"}), cohort=2))
    assert train_losses(pil) != train_losses(full)


@pytest.mark.slow
def test_supervised_and_linear_eval_through_the_device_pipeline(tmp_path):
    from mcl_det.pretrain.linear_eval import run_linear_eval

    root = _imagefolder(tmp_path / "data")
    (root / "val").symlink_to(root / "train")
    out = tmp_path / "sup"
    extra = {"MODE": "supervised", "SUP.NEGATIVES": "batch", "SUP.SAMPLES_PER_CLASS": "2"}
    summary = train(setup_pretrain_cfg(TOY, _opts(root, out, **extra), cohort=2))
    assert summary["iteration"] == 6
    res = run_linear_eval(
        str(out / "checkpoint_last.pth"),
        0,
        opts=["LINEAR.EPOCHS", "1", "LINEAR.IMS_PER_BATCH", "8"],
    )
    assert res["backbone_unchanged"] and 0 <= res["top1"] <= 100
