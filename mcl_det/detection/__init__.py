"""detectron2 side of mcl_det. Importing it registers everything our detection configs name.

- ``Res5ROIHeadsAnyDepth`` / ``Res5ROIHeadsExtraNorm`` (ROI_HEADS_REGISTRY): C4 heads for any
  ResNet depth, the latter with the MoCo protocol's extra norm after res5;
- ``add_mcl_det_config``: the ``MCL_DET.*`` keys (weights tag, run name, seeds, user datasets).
"""

from .config import add_mcl_det_config, config_digest, get_detection_cfg
from .roi_heads import Res5ROIHeadsAnyDepth, Res5ROIHeadsExtraNorm

__all__ = [
    "Res5ROIHeadsAnyDepth",
    "Res5ROIHeadsExtraNorm",
    "add_mcl_det_config",
    "config_digest",
    "get_detection_cfg",
]
