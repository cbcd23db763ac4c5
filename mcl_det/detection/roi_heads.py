"""Res5 ("C4") ROI heads for any ResNet depth, with and without the MoCo extra norm.

detectron2's ``Res5ROIHeads`` always builds bottleneck blocks, so a ResNet-18/34 C4 model (whose
backbone ends at a 256-channel res4 made of basic blocks) cannot be built with it. The heads here
build the res5 stage with the block type of the configured depth. ``Res5ROIHeadsExtraNorm`` adds
one norm layer after res5, as in the MoCo detection protocol: with BN in the head, the box
predictor then sees normalised features even when the backbone was pretrained without it.
"""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

# res5 block count per depth (the last stage of torchvision / detectron2 ResNets).
_RES5_BLOCKS = {18: 2, 34: 3, 50: 3, 101: 3, 152: 3}


def build_res5_stage(cfg: CfgNode, extra_norm: bool) -> tuple[nn.Sequential, int]:
    """Build res5 (stride 2 then 1) for ``cfg.MODEL.RESNETS.DEPTH``; returns (stage, channels)."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _RES5_BLOCKS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH must be one of {sorted(_RES5_BLOCKS)}, got {r.DEPTH}"
        )
    if r.DEFORM_ON_PER_STAGE[-1]:
        raise ValueError("deformable convolution is not supported in the res5 ROI head")
    n = _RES5_BLOCKS[r.DEPTH]
    out_channels = r.RES2_OUT_CHANNELS * 8  # res5 has 8x the channels of res2
    in_channels = out_channels // 2  # = res4 output
    common = dict(stride_per_block=[2] + [1] * (n - 1), in_channels=in_channels)
    if r.DEPTH in (18, 34):
        # Basic blocks have no bottleneck / groups / stride_in_1x1: detectron2's backbone builder
        # enforces RES2_OUT_CHANNELS 64 and NUM_GROUPS 1 for these depths.
        blocks = ResNet.make_stage(BasicBlock, n, out_channels=out_channels, norm=r.NORM, **common)
    else:
        blocks = ResNet.make_stage(
            BottleneckBlock,
            n,
            out_channels=out_channels,
            bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8,
            num_groups=r.NUM_GROUPS,
            stride_in_1x1=r.STRIDE_IN_1X1,
            norm=r.NORM,
            **common,
        )
    layers: list[nn.Module] = list(blocks)
    if extra_norm:
        layers.append(get_norm(r.NORM, out_channels))
    return nn.Sequential(*layers), out_channels


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsAnyDepth(Res5ROIHeads):
    """``Res5ROIHeads`` whose res5 uses basic blocks for ResNet-18/34, bottlenecks otherwise."""

    extra_norm = False

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode) -> tuple[nn.Sequential, int]:
        return build_res5_stage(cfg, cls.extra_norm)


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeadsAnyDepth):
    """MoCo protocol C4 head: res5 (any depth), then one extra norm layer (cfg RESNETS.NORM)."""

    extra_norm = True
