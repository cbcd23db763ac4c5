"""Every shipped pretraining config loads (no unknown key) and builds its cohort (tiny K)."""

from pathlib import Path

import pytest
import torch

from mcl_det.pretrain.config import member_archs, normalize_opts, setup_pretrain_cfg
from mcl_det.pretrain.models import build_cohort
from mcl_det.utils.errors import MCLDetError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "pretrain" / "configs").glob("*.yaml"))
EXPECTED = {
    "moco_v2_mcl_r50x2_200ep": ("selfsup", ["resnet50"] * 2),
    "sup_mcl_r18x2": ("supervised", ["resnet18"] * 2),
    "sup_mcl_r50x2": ("supervised", ["resnet50"] * 2),
    "sup_mcl_r18_r50": ("supervised", ["resnet18", "resnet50"]),
    "toy": ("selfsup", ["resnet18"] * 2),
}


def test_the_shipped_set_is_complete():
    names = {p.stem for p in CONFIGS}
    assert set(EXPECTED) <= names
    for n in EXPECTED:  # every MCL config has its independent-training baseline
        baseline = n.replace("mcl", "baseline") if "mcl" in n else n + "_baseline"
        assert baseline in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    cfg = setup_pretrain_cfg(str(path), ["MODEL.QUEUE_SIZE", "256"])
    archs = member_archs(cfg)
    base = path.stem.replace("baseline", "mcl")
    if base in EXPECTED or path.stem.startswith("toy"):
        mode, want = EXPECTED.get(base, EXPECTED["toy"])
        assert (cfg.MODE, archs) == (mode, want)
    interaction = [cfg.LOSS.W_ICL, cfg.LOSS.W_SOFT_VCL, cfg.LOSS.W_SOFT_ICL]
    if "baseline" in path.stem:
        assert interaction == [0.0, 0.0, 0.0]
    else:
        assert all(w > 0 for w in interaction)
    if cfg.MODE == "supervised":
        assert cfg.LOSS.TAU == 0.07 and (cfg.SOLVER.BASE_LR, cfg.SOLVER.NESTEROV) == (0.1, True)
    elif not path.stem.startswith("toy"):
        assert (cfg.LOSS.TAU, cfg.SOLVER.BASE_LR, cfg.SOLVER.EPOCHS) == (0.2, 0.03, 200)
    with torch.device("meta"):  # structure only: no memory, no init cost
        model = build_cohort(cfg, num_classes=1000, targets=[0] * 32 + [1] * 32)
    assert len(model.members) == len(archs)
    keys = model.state_dict()
    assert all(f"members.{k}.encoder.conv1.weight" in keys for k in range(len(archs)))


def test_archs_on_the_command_line():
    cfg = setup_pretrain_cfg(None, ["MODEL.ARCHS", "resnet18,resnet34"])
    assert member_archs(cfg) == ["resnet18", "resnet34"]
    assert normalize_opts(["MODEL.ARCHS", "['resnet50']"]) == ["MODEL.ARCHS", "['resnet50']"]
    assert (
        member_archs(setup_pretrain_cfg(None, ["MODEL.ARCH", "resnet34"], cohort=3))
        == ["resnet34"] * 3
    )
    with pytest.raises(MCLDetError, match="disagrees"):
        setup_pretrain_cfg(None, ["MODEL.ARCHS", "resnet18,resnet34"], cohort=3)
    with pytest.raises(MCLDetError, match="W_NOPE"):
        setup_pretrain_cfg(None, ["LOSS.W_NOPE", "1"])
    with pytest.raises(MCLDetError, match="vgg16"):
        setup_pretrain_cfg(None, ["MODEL.ARCHS", "resnet18,vgg16"])


@pytest.mark.parametrize(
    "key, value",
    [
        ("MODE", "moco"),
        ("SOLVER.SCHEDULE", "linear"),
        ("SOLVER.AMP", "fp8"),
        ("SUP.NEGATIVES", "queue"),
        ("LOSS.SUP_VARIANT", "multi"),
        ("DATA.PIPELINE", "gpu"),
        ("DATA.JPEG_DECODE", "nvjpeg"),
        ("DATA.AUG", "simclr"),
    ],
)
def test_every_enum_key_is_checked_at_setup(key, value):
    with pytest.raises(MCLDetError, match=f"unknown {key} '{value}'"):
        setup_pretrain_cfg(None, [key, value])


def test_resolved_member_list_and_method_class():
    from mcl_det.pretrain.models import (
        BankSupervisedCohort,
        InBatchSupervisedCohort,
        SelfSupCohort,
        cohort_class,
    )

    cfg = setup_pretrain_cfg(None, ["MODEL.ARCH", "resnet34"], cohort=3)
    assert cfg.MODEL.ARCHS == ["resnet34"] * 3 and cfg.MODEL.COHORT == 3 and cfg.is_frozen()
    assert setup_pretrain_cfg(None, ["MODEL.ARCHS", "['resnet18']"]).MODEL.COHORT == 1
    assert cohort_class(cfg) is SelfSupCohort
    sup = ["MODE", "supervised", "SUP.NEGATIVES"]
    assert cohort_class(setup_pretrain_cfg(None, [*sup, "bank"])) is BankSupervisedCohort
    assert cohort_class(setup_pretrain_cfg(None, [*sup, "batch"])) is InBatchSupervisedCohort


@pytest.mark.parametrize("value", ["0.0", "1.5", "-0.5"])
def test_eval_crop_out_of_range_is_a_user_error(value):
    with pytest.raises(MCLDetError, match="DATA.EVAL_CROP"):
        setup_pretrain_cfg(None, ["DATA.EVAL_CROP", value])


@pytest.mark.parametrize("value", ["(0.5,)", "(0.6, 0.5)", "(0.0, 1.0)", "(0.5, 1.2)"])
def test_sup_crop_scale_out_of_range_is_a_user_error(value):
    with pytest.raises(MCLDetError, match="DATA.SUP_CROP_SCALE"):
        setup_pretrain_cfg(None, ["DATA.SUP_CROP_SCALE", value])


def test_sup_crop_scale_reaches_the_supervised_crops():
    from torchvision import transforms as T

    from mcl_det.pretrain.data import InputPipeline

    cfg = setup_pretrain_cfg(None, ["MODE", "supervised", "DATA.SUP_CROP_SCALE", "(0.5, 1.0)"])
    for kind in ("pil", "device"):
        cfg.defrost()
        cfg.DATA.PIPELINE = kind
        crops = [
            t
            for t in InputPipeline(cfg, torch.device("cpu")).train_transform.transforms
            if isinstance(t, T.RandomResizedCrop)
        ]
        assert len(crops) == 1 and tuple(crops[0].scale) == (0.5, 1.0), kind


def test_eval_crop_one_keeps_the_whole_image():
    """EVAL_CROP 1.0: resize only, so a frame-filling object keeps its border pixels; 0.875 cuts
    1/16 of the side from each edge (ImageNet's 224 <- 256)."""
    from PIL import Image

    from mcl_det.pretrain.data import eval_transform

    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.putpixel((0, 16), (255, 255, 255))  # one white pixel on the left border
    whole = eval_transform(32, 1.0)(img)  # 3x32x32, normalised
    cropped = eval_transform(32, 0.875)(img)  # resized to 37, centre 32 kept: border gone
    assert whole.shape == cropped.shape == (3, 32, 32)
    assert whole[0, 16, 0] > whole[0, 0, 0]  # the border pixel survives
    assert torch.equal(cropped, cropped[:, :1, :1].expand(3, 32, 32))  # all black: pixel cut off


def test_linear_eval_config_is_checked_too():
    """Linear evaluation's config (the checkpoint's plus overrides) goes through the same check."""
    from mcl_det.pretrain.config import get_pretrain_cfg
    from mcl_det.pretrain.linear_eval import linear_eval_cfg

    ckpt = {"config": get_pretrain_cfg().dump()}
    assert linear_eval_cfg(ckpt, None, ["DATA.PIPELINE", "device"]).DATA.PIPELINE == "device"
    with pytest.raises(MCLDetError, match="unknown DATA.PIPELINE 'gpu'"):
        linear_eval_cfg(ckpt, None, ["DATA.PIPELINE", "gpu"])
