"""Every shipped detection config loads and builds; config rules (scaling, digest, errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock  # noqa: E402
from torch import nn  # noqa: E402

from mcl_det.detection import Res5ROIHeadsExtraNorm  # noqa: E402
from mcl_det.detection.config import config_digest  # noqa: E402
from mcl_det.detection.train import Trainer, setup_cfg, syncbn_to_bn  # noqa: E402
from mcl_det.utils.errors import MCLDetError  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[2] / "detection_configs"
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_expected_configs_are_shipped():
    for name in (
        "Base-RCNN-C4-BN.yaml",
        "voc_faster_rcnn_mcl.yaml",
        "voc_faster_rcnn_baseline.yaml",
        "coco_mask_rcnn_mcl.yaml",
        "coco_mask_rcnn_baseline.yaml",
        "coco_mask_rcnn_R50_C4_1x_mcl.yaml",
        "coco_mask_rcnn_R50_C4_2x_mcl.yaml",
        "coco_mask_rcnn_R18_FPN_1x_mcl.yaml",
        "toy_voc_faster_rcnn_r18_fpn.yaml",
        "toy_voc_faster_rcnn_r18_c4.yaml",
        "toy_coco_mask_rcnn_r18_fpn.yaml",
    ):
        assert name in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds(name):
    cfg = setup_cfg(str(CONFIG_DIR / name), world_size=1)
    assert cfg.MODEL.DEVICE == "cpu" or torch.cuda.is_available()
    model = Trainer.build_model(cfg)
    # one process: no SyncBN left (it becomes BN); norms as configured otherwise
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    if cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone":  # C4
        res5 = model.roi_heads.res5
        block = BasicBlock if cfg.MODEL.RESNETS.DEPTH in (18, 34) else BottleneckBlock
        assert isinstance(res5[0], block)
        if isinstance(model.roi_heads, Res5ROIHeadsExtraNorm):
            assert isinstance(res5[-1], nn.BatchNorm2d)


def test_moco_protocol_numbers():
    cfg = setup_cfg(str(CONFIG_DIR / "voc_faster_rcnn_mcl.yaml"), world_size=8)
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.TEST.PRECISE_BN.ENABLED
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert cfg.INPUT.MIN_SIZE_TEST == 800 and cfg.INPUT.FORMAT == "RGB"
    assert cfg.SOLVER.MAX_ITER == 24000 and tuple(cfg.SOLVER.STEPS) == (18000, 22000)
    assert cfg.SOLVER.WARMUP_ITERS == 100 and cfg.SOLVER.IMS_PER_BATCH == 16
    assert not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert list(cfg.MODEL.PIXEL_STD) == pytest.approx([58.395, 57.120, 57.375])
    assert cfg.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval")
    base = setup_cfg(str(CONFIG_DIR / "voc_faster_rcnn_baseline.yaml"), world_size=8)
    assert base.MCL_DET.WEIGHTS_TAG == "baseline" and cfg.MCL_DET.WEIGHTS_TAG == "mcl"
    # same protocol: only weights / tag / output dir differ -> same digest
    assert config_digest(base) == config_digest(cfg)
    coco = setup_cfg(str(CONFIG_DIR / "coco_mask_rcnn_mcl.yaml"), world_size=8)
    assert coco.MODEL.RESNETS.NORM == "SyncBN" and coco.MODEL.FPN.NORM == "SyncBN"
    assert coco.SOLVER.MAX_ITER == 90000 and tuple(coco.SOLVER.STEPS) == (60000, 80000)


def test_reference_world_size_scaling():
    f = str(CONFIG_DIR / "voc_faster_rcnn_mcl.yaml")
    cfg = setup_cfg(f, ["SOLVER.REFERENCE_WORLD_SIZE", "8"], world_size=2)
    # per-GPU batch 16/8 = 2 kept: total 4, LR x 1/4, schedule x 4
    assert cfg.SOLVER.IMS_PER_BATCH == 4
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.005)
    assert cfg.SOLVER.MAX_ITER == 96000 and tuple(cfg.SOLVER.STEPS) == (72000, 88000)
    assert cfg.SOLVER.WARMUP_ITERS == 400 and cfg.SOLVER.REFERENCE_WORLD_SIZE == 2
    same = setup_cfg(f, world_size=2)  # REFERENCE_WORLD_SIZE 0: IMS_PER_BATCH is the total, as is
    assert same.SOLVER.IMS_PER_BATCH == 16 and same.SOLVER.MAX_ITER == 24000
    with pytest.raises(MCLDetError, match="divisible"):
        setup_cfg(f, ["SOLVER.IMS_PER_BATCH", "6"], world_size=4)


def test_unknown_key_and_amp_on_cpu_are_user_errors():
    f = str(CONFIG_DIR / "toy_voc_faster_rcnn_r18_fpn.yaml")
    with pytest.raises(MCLDetError, match="MODEL.NOPE"):
        setup_cfg(f, ["MODEL.NOPE", "1"])
    if not torch.cuda.is_available():
        with pytest.raises(MCLDetError, match="AMP"):
            setup_cfg(f, ["SOLVER.AMP.ENABLED", "True"])


def test_digest_ignores_seed_and_paths_but_not_protocol():
    f = str(CONFIG_DIR / "toy_voc_faster_rcnn_r18_fpn.yaml")
    a = setup_cfg(f, ["SEED", "1", "OUTPUT_DIR", "/x"])
    b = setup_cfg(f, ["SEED", "2", "OUTPUT_DIR", "/y", "MCL_DET.RUN_NAME", "z"])
    c = setup_cfg(f, ["SOLVER.BASE_LR", "0.01"])
    assert config_digest(a) == config_digest(b) != config_digest(c)


def test_syncbn_to_bn_is_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.SyncBatchNorm(4)))
    net[1][0].running_mean.uniform_()
    net[1][0].weight.data.uniform_()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    out = syncbn_to_bn(net)
    assert type(out[1][0]) is nn.BatchNorm2d
    for k, v in out.state_dict().items():
        assert torch.equal(v, sd[k]), k
    out.eval()
    x = torch.randn(2, 3, 6, 6)
    y = nn.functional.batch_norm(
        net[0](x), sd["1.0.running_mean"], sd["1.0.running_var"], sd["1.0.weight"], sd["1.0.bias"]
    )
    assert torch.allclose(out(x), y, atol=1e-6)
