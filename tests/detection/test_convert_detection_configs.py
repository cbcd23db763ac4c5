"""Converted weights load into the detectors of our detection_configs/, every backbone key found.

The converter's own tests use detectron2's model-zoo configs; this closes the loop with the configs
users actually run (C4 with the BasicBlock / extra-norm res5 head, FPN, Mask R-CNN).
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from mcl_det.convert import convert_checkpoint
from mcl_det.detection.train import setup_cfg
from mcl_det.weights_settings import check_weights_against_config

ROOT = Path(__file__).resolve().parents[2]


def _randomised_resnet(depth: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(depth)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    for m in net.modules():  # non-trivial BN statistics so a wrong mapping cannot hide
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    out = {}
    d = tmp_path_factory.mktemp("w")
    for depth in (18, 50):
        torch.save(_randomised_resnet(depth), d / f"r{depth}.pth")
        convert_checkpoint(d / f"r{depth}.pth", d / f"r{depth}.pkl", member=0, verify=False)
        out[depth] = d / f"r{depth}.pkl"
    yield out
    shutil.rmtree(d)  # 0.3 GB: free the disk for the rest of the suite


@pytest.mark.parametrize(
    "config,depth,extra",
    [
        ("toy_voc_faster_rcnn_r18_fpn.yaml", 18, []),
        ("toy_voc_faster_rcnn_r18_c4.yaml", 18, []),
        ("toy_coco_mask_rcnn_r18_fpn.yaml", 18, []),
        ("voc_faster_rcnn_mcl.yaml", 50, []),
        ("coco_mask_rcnn_R18_FPN_1x_mcl.yaml", 18, []),
    ],
)
def test_every_backbone_key_is_loaded(weights, config, depth, extra):
    pkl = weights[depth]
    cfg = setup_cfg(str(ROOT / "detection_configs" / config), ["MODEL.WEIGHTS", str(pkl), *extra])
    check_weights_against_config(cfg, pkl)  # the settings in the .yaml agree with the config
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(pkl))
    state = model.state_dict()

    import pickle

    with open(pkl, "rb") as f:
        converted = pickle.load(f)["model"]
    # every converted tensor landed somewhere (C4: res5 lives in the ROI head) with its values
    for name, arr in converted.items():
        targets = [k for k in (f"backbone.bottom_up.{name}", f"backbone.{name}") if k in state]
        if name.startswith("res5.") and not targets:
            targets = [f"roi_heads.{name}"] if f"roi_heads.{name}" in state else []
        assert len(targets) == 1, f"{name} from the .pkl has no place in {config}"
        np.testing.assert_array_equal(state[targets[0]].numpy(), arr, err_msg=name)
    # and every backbone tensor of the model came from the .pkl
    backbone = [
        k
        for k in state
        if (k.startswith(("backbone.bottom_up.", "backbone.stem.", "backbone.res")))
        and not k.endswith("num_batches_tracked")
    ]
    names = {k.removeprefix("backbone.").removeprefix("bottom_up.") for k in backbone}
    assert backbone and names <= set(converted), sorted(names - set(converted))[:5]
