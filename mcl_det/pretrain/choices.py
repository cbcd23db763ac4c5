"""The values the pretraining config's enum keys accept, part of the config layer.

Why a module of its own: ``config.check_cfg`` checks a config against these names and the code
the names select (``models.build_resnet`` for the ResNets) refuses any other, so both import them
from here and neither imports the other. Names that belong to one recipe module stay beside it
(``augment.AUGS``, ``losses_sup.SUP_VARIANTS``); ``check_cfg`` imports those.
"""

from __future__ import annotations

MODES = ("selfsup", "supervised")  # MODE
SCHEDULES = ("cosine", "step")  # SOLVER.SCHEDULE
AMP_MODES = ("", "bf16", "fp16")  # SOLVER.AMP
SUP_NEGATIVES = ("bank", "batch")  # SUP.NEGATIVES
PIPELINES = ("auto", "pil", "device")  # DATA.PIPELINE
JPEG_DECODERS = ("cpu", "cuda")  # DATA.JPEG_DECODE
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # MODEL.ARCH / ARCHS
