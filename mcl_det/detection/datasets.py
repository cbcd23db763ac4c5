"""Datasets for detection transfer: detectron2's builtin names and user VOC / COCO folders.

Builtin names (``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``, ``coco_2017_train``,
``coco_2017_val``, ...) are registered by detectron2 itself at import time, under the root given by
the ``DETECTRON2_DATASETS`` environment variable (default ``./datasets``). User datasets come from
``cfg.MCL_DET.DATASETS`` (see ``mcl_det.detection.config``). Every dataset a config names is checked
on disk before any model is built, so a wrong path is one clear error, not a traceback deep inside a
data loader worker.
"""

from __future__ import annotations

import os

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES

from ..utils.errors import MCLDetError

VOC_LAYOUT = "<dir>/Annotations/*.xml, <dir>/JPEGImages/*.jpg, <dir>/ImageSets/Main/<split>.txt"
COCO_LAYOUT = "<root>/annotations/instances_<split>2017.json and <root>/<split>2017/*.jpg"


def _triples(entries, key: str) -> list[tuple[str, str, str]]:
    out = []
    for e in entries:
        if not isinstance(e, list | tuple) or len(e) != 3 or not all(isinstance(x, str) for x in e):
            raise MCLDetError(
                f"{key} entries must be [name, path, split_or_json] string triples, got {e!r}; "
                "fix the config"
            )
        out.append(tuple(e))
    return out


def register_config_datasets(cfg: CfgNode) -> list[str]:
    """Register ``cfg.MCL_DET.DATASETS.VOC`` / ``COCO``; returns the names. Idempotent.

    A name registered earlier with the same source (e.g. by the previous trial in this process)
    is kept; a clash with a different dataset, builtin ones included, is an error.
    """
    d = cfg.MCL_DET.DATASETS
    classes = list(d.VOC_CLASSES) or list(VOC_CLASS_NAMES)
    names = []
    for name, dirname, split in _triples(d.VOC, "MCL_DET.DATASETS.VOC"):
        source = ("voc", os.path.abspath(dirname), split, tuple(classes))
        if _already(name, source):
            names.append(name)
            continue
        # year 2007: the VOC2007 11-point AP metric, the protocol MoCo/MCL report on.
        register_pascal_voc(name, os.path.abspath(dirname), split, 2007, classes)
        # builtin VOC names get evaluator_type from detectron2's builtin.py; user ones need it too
        MetadataCatalog.get(name).set(mcl_det_source=source, evaluator_type="pascal_voc")
        names.append(name)
    for name, image_root, json_file in _triples(d.COCO, "MCL_DET.DATASETS.COCO"):
        source = ("coco", os.path.abspath(image_root), os.path.abspath(json_file))
        if _already(name, source):
            names.append(name)
            continue
        register_coco_instances(name, {}, os.path.abspath(json_file), os.path.abspath(image_root))
        MetadataCatalog.get(name).set(mcl_det_source=source)
        names.append(name)
    return names


def _already(name: str, source: tuple) -> bool:
    if name not in DatasetCatalog.list():
        return False
    if MetadataCatalog.get(name).get("mcl_det_source", None) == source:
        return True
    raise MCLDetError(
        f"dataset name {name!r} is already registered (builtin or another path); "
        "pick another name in MCL_DET.DATASETS"
    )


def dataset_task(name: str) -> str:
    """ "voc" or "coco": which evaluator / metric family a registered dataset uses."""
    et = MetadataCatalog.get(name).get("evaluator_type", None)
    if et == "pascal_voc":
        return "voc"
    if et == "coco":
        return "coco"
    raise MCLDetError(
        f"dataset {name!r} has evaluator type {et!r}; only VOC and COCO datasets are supported"
    )


def check_dataset(name: str) -> None:
    """Raise ``MCLDetError`` naming the path and the expected layout when files are missing."""
    if name not in DatasetCatalog.list():
        raise MCLDetError(
            f"unknown dataset {name!r}; use a detectron2 builtin name (e.g. voc_2007_trainval, "
            "coco_2017_train) or register it under MCL_DET.DATASETS.VOC / COCO"
        )
    meta = MetadataCatalog.get(name)
    builtin = meta.get("mcl_det_source", None) is None
    hint = (
        " (builtin dataset: set DETECTRON2_DATASETS to the folder holding VOC2007/, VOC2012/, coco/)"
        if builtin
        else ""
    )
    task = dataset_task(name)
    if task == "voc":
        d = meta.dirname
        split_file = os.path.join(d, "ImageSets", "Main", meta.split + ".txt")
        for p in (d, os.path.join(d, "Annotations"), os.path.join(d, "JPEGImages"), split_file):
            if not os.path.exists(p):
                raise MCLDetError(
                    f"dataset {name!r}: missing {p}; expected a VOC folder {VOC_LAYOUT}{hint}"
                )
    else:
        for p in (meta.image_root, meta.json_file):
            if not os.path.exists(p):
                raise MCLDetError(
                    f"dataset {name!r}: missing {p}; expected COCO files {COCO_LAYOUT}{hint}"
                )


def prepare_datasets(cfg: CfgNode) -> None:
    """Register the config's user datasets and check every train/test dataset on disk."""
    register_config_datasets(cfg)
    if not cfg.DATASETS.TRAIN and not cfg.DATASETS.TEST:
        raise MCLDetError("no dataset: set DATASETS.TRAIN and DATASETS.TEST")
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        check_dataset(name)
        # VOC class lists are known without reading anything (COCO's only after loading the json)
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if dataset_task(name) == "voc" and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise MCLDetError(
                f"dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}; set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}"
            )
