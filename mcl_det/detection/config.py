"""detectron2 config + the ``MCL_DET`` keys our trainer understands.

All keys live in one yacs tree (detectron2's), so an unknown key anywhere is an error, and the
resolved tree saved as ``OUTPUT_DIR/config.yaml`` is the whole truth about a run.
"""

from __future__ import annotations

import hashlib

from detectron2.config import CfgNode, get_cfg

from ..utils.elastic import DEFAULT_TIMEOUT_S

# How long a collective waits for a peer (detectron2 launch's ``timeout``); no effect on results,
# so it is neither in the digest nor a reason for --auto-resume to call a run another one.
DIST_TIMEOUT_KEY = "MCL_DET.DIST_TIMEOUT_S"


def add_mcl_det_config(cfg: CfgNode) -> CfgNode:
    """Add ``cfg.MCL_DET.*`` (in place, and return cfg).

    MCL_DET.WEIGHTS_TAG     free label of the backbone weights, e.g. "mcl" / "baseline"; report.py
                            groups runs by it.
    MCL_DET.RUN_NAME        name written to results.json ("" -> the OUTPUT_DIR folder name).
    MCL_DET.SEEDS           list of seeds: one trial per seed into OUTPUT_DIR/seed{K}
                            (empty -> a single run with cfg.SEED into OUTPUT_DIR).
    MCL_DET.DATASETS.VOC    list of [name, devkit_year_dir, split] triples, e.g.
                            [["my_voc_train", "/data/VOCdevkit/VOC2007", "trainval"]]; the folder
                            holds Annotations/, JPEGImages/, ImageSets/Main/<split>.txt.
    MCL_DET.DATASETS.VOC_CLASSES  class names of those VOC datasets (empty -> the 20 VOC classes).
    MCL_DET.DATASETS.COCO   list of [name, image_dir, instances_json] triples.
    MCL_DET.DIST_TIMEOUT_S  seconds a collective waits for a peer before the process fails
                            (several processes; pretraining's DIST.TIMEOUT_S, docs/DESIGN.md).
    """
    cfg.MCL_DET = CfgNode()
    cfg.MCL_DET.WEIGHTS_TAG = ""
    cfg.MCL_DET.RUN_NAME = ""
    cfg.MCL_DET.SEEDS = []
    cfg.MCL_DET.DATASETS = CfgNode()
    cfg.MCL_DET.DATASETS.VOC = []
    cfg.MCL_DET.DATASETS.VOC_CLASSES = []
    cfg.MCL_DET.DATASETS.COCO = []
    cfg.MCL_DET.DIST_TIMEOUT_S = DEFAULT_TIMEOUT_S
    return cfg


def get_detection_cfg() -> CfgNode:
    """detectron2 defaults + MCL_DET keys, ready for ``mcl_det.config.merge_cfg``."""
    return add_mcl_det_config(get_cfg())


# Keys that differ between the trials / backbones of one protocol and so do not enter the digest.
_DIGEST_EXCLUDED = (
    ("SEED",),
    ("OUTPUT_DIR",),
    ("MODEL", "WEIGHTS"),
    ("MCL_DET", "WEIGHTS_TAG"),
    ("MCL_DET", "RUN_NAME"),
    ("MCL_DET", "SEEDS"),
    tuple(DIST_TIMEOUT_KEY.split(".")),
)


def config_digest(cfg: CfgNode) -> str:
    """sha256 of the resolved config minus seed / output dir / weights / tag / run name.

    Two runs with the same digest followed the same protocol and differ only in the backbone
    weights and the seed, which is what a baseline-vs-MCL comparison needs to check.
    """
    c = cfg.clone()
    c.defrost()
    for path in _DIGEST_EXCLUDED:
        node = c
        for k in path[:-1]:
            node = node.get(k) if node is not None else None
        if node is not None and path[-1] in node:
            del node[path[-1]]
    return hashlib.sha256(c.dump().encode("utf-8")).hexdigest()
