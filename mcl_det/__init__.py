"""mcl_det: Mutual Contrastive Learning (MCL) cohort pretraining and detectron2 detection transfer."""

__version__ = "0.1.0"
