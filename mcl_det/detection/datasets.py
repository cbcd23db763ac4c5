"""Datasets for detection transfer: detectron2's builtin names and user VOC / COCO folders.

Builtin names (``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``, ``coco_2017_train``,
``coco_2017_val``, ...) are registered by detectron2 itself at import time, under the root given by
the ``DETECTRON2_DATASETS`` environment variable (default ``./datasets``). User datasets come from
``cfg.MCL_DET.DATASETS`` (see ``mcl_det.detection.config``). Every dataset a config names is checked
on disk before any model is built, so a wrong path or a bad annotation is one clear error, not a
traceback deep inside a data loader worker or after hours of training:

- VOC (all, builtin included): every split id has its annotation XML and its image, every XML
  parses and holds what detectron2's loader reads (size, known class names, numeric boxes); a test
  split also what its evaluator reads (pose, truncated, difficult, integer boxes).
- COCO (user datasets; the builtin files are the official ones): every annotation's category is in
  ``categories``, there are no more categories than MODEL.ROI_HEADS.NUM_CLASSES, every image file
  exists; boxes with zero width or height or negative coordinates (detectron2 drops empty boxes
  and clips the rest without a word) are counted in one warning.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES

from ..utils.errors import MCLDetError

logger = logging.getLogger(__name__)

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
        " (builtin dataset: set DETECTRON2_DATASETS to the folder holding VOC2007/, VOC2012/, "
        "coco/)"
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


def _first(problems: list[str], what: str) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{len(problems)} {what}, first: {problems[0]}{more}"


def _int(node: ET.Element | None, tag: str) -> int | None:
    text = node.findtext(tag) if node is not None else None
    try:
        return int(text.strip())
    except (AttributeError, ValueError):
        return None


def _float(node: ET.Element | None, tag: str) -> float | None:
    text = node.findtext(tag) if node is not None else None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _voc_xml_problem(path: str, classes: set[str], for_eval: bool) -> str | None:
    """What detectron2's VOC loader (and, for a test split, its evaluator) cannot read, or None."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return f"{path} is not well-formed XML ({e})"
    size = root.find("size")
    if _int(size, "width") is None or _int(size, "height") is None:
        return f"{path} has no integer <size><width>/<height>"
    for k, obj in enumerate(root.findall("object")):
        where = f"object {k + 1} of {path}"
        name = obj.findtext("name")
        if name not in classes:
            return (
                f"{where} has class {name!r}, which is not one of the dataset's classes "
                "(MCL_DET.DATASETS.VOC_CLASSES)"
            )
        box = obj.find("bndbox")
        coords = ("xmin", "ymin", "xmax", "ymax")
        if any(_float(box, c) is None for c in coords):
            return f"{where} has no numeric <bndbox> xmin/ymin/xmax/ymax"
        if for_eval:
            if obj.find("pose") is None or any(
                _int(obj, t) is None for t in ("truncated", "difficult")
            ):
                return (
                    f"{where} lacks <pose>, an integer <truncated> or <difficult>, which "
                    "detectron2's VOC evaluator reads in a test split"
                )
            if any(_int(box, c) is None for c in coords):
                return f"{where} has non-integer <bndbox> coordinates (a test split needs integers)"
    return None


_checked: set[tuple] = set()  # contents already validated in this process (trials, workers)


def check_voc_contents(name: str, for_eval: bool) -> None:
    """Every id of the split has an XML and an image; every XML is readable (see module doc)."""
    meta = MetadataCatalog.get(name)
    key = ("voc", meta.dirname, meta.split, tuple(meta.thing_classes), for_eval)
    if key in _checked:
        return
    split_file = os.path.join(meta.dirname, "ImageSets", "Main", meta.split + ".txt")
    with open(split_file) as f:
        lines = f.read().splitlines()
    ids = [x.strip() for x in lines if x.strip()]
    if not ids:
        raise MCLDetError(f"dataset {name!r}: {split_file} lists no image id; fill it in")
    if for_eval and len(ids) < len(lines):
        raise MCLDetError(
            f"dataset {name!r}: {split_file} has blank lines, which detectron2's VOC evaluator "
            "reads as image ids; remove them"
        )
    for sub, ext, what in (("Annotations", ".xml", "annotation file"), ("JPEGImages", ".jpg", "")):
        missing = [
            p
            for p in (os.path.join(meta.dirname, sub, i + ext) for i in ids)
            if not os.path.isfile(p)
        ]
        if missing:
            raise MCLDetError(
                f"dataset {name!r}: "
                + _first(missing, f"of {len(ids)} ids in {split_file} have no {what or 'image'}")
                + "; add the files or remove those ids from the split"
            )
    classes = set(meta.thing_classes)
    for i in ids:
        problem = _voc_xml_problem(
            os.path.join(meta.dirname, "Annotations", i + ".xml"), classes, for_eval
        )
        if problem:
            raise MCLDetError(f"dataset {name!r}: {problem}; fix or remove that annotation")
    _checked.add(key)


def check_coco_contents(name: str, num_classes: int) -> None:
    """Categories, image files and boxes of a user COCO json (see module doc)."""
    meta = MetadataCatalog.get(name)
    key = ("coco", meta.json_file, meta.image_root, num_classes)
    if key in _checked:
        return
    try:
        with open(meta.json_file) as f:
            data = json.load(f)
        cats = {c["id"] for c in data["categories"]}
        images, anns = data["images"], data.get("annotations", [])
        img_files = [im["file_name"] for im in images]
    except (ValueError, KeyError, TypeError) as e:
        raise MCLDetError(
            f"dataset {name!r}: {meta.json_file} is not a COCO instances file ({type(e).__name__}: "
            f"{e}); it needs images, annotations and categories lists"
        ) from None
    if len(cats) > num_classes:
        raise MCLDetError(
            f"dataset {name!r} has {len(cats)} categories but MODEL.ROI_HEADS.NUM_CLASSES is "
            f"{num_classes}; set MODEL.ROI_HEADS.NUM_CLASSES {len(cats)}"
        )
    unknown = [
        f"annotation id {a.get('id')} has category_id {a.get('category_id')!r}"
        for a in anns
        if a.get("category_id") not in cats
    ]
    if unknown:
        raise MCLDetError(
            f"dataset {name!r}: "
            + _first(
                unknown,
                f"of {len(anns)} annotations in {meta.json_file} name a category "
                f"not in its 'categories' (ids {sorted(cats)})",
            )
            + "; fix the json"
        )
    missing = [
        p for p in (os.path.join(meta.image_root, f) for f in img_files) if not os.path.isfile(p)
    ]
    if missing:
        raise MCLDetError(
            f"dataset {name!r}: "
            + _first(missing, f"of {len(images)} images in {meta.json_file} are missing")
            + "; fix the image folder or the json"
        )
    bad = []
    for a in anns:
        b = a.get("bbox")
        if not isinstance(b, list) or len(b) != 4:
            raise MCLDetError(
                f"dataset {name!r}: annotation id {a.get('id')} in {meta.json_file} has bbox "
                f"{b!r}, not [x, y, width, height]; fix the json"
            )
        if b[2] <= 0 or b[3] <= 0 or b[0] < 0 or b[1] < 0:
            bad.append(f"annotation id {a.get('id')} bbox {b}")
    if bad:
        logger.warning(
            "dataset %r: %s; detectron2 drops empty boxes and clips the others to the image "
            "during training, and COCO evaluation keeps them as ground truth",
            name,
            _first(bad, f"of {len(anns)} boxes have zero width or height or negative coordinates"),
        )
    _checked.add(key)


def prepare_datasets(cfg: CfgNode) -> None:
    """Register the config's user datasets; check every train/test dataset on disk and inside."""
    register_config_datasets(cfg)
    if not cfg.DATASETS.TRAIN and not cfg.DATASETS.TEST:
        raise MCLDetError("no dataset: set DATASETS.TRAIN and DATASETS.TEST")
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    tests = set(cfg.DATASETS.TEST)
    for name in dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)):
        check_dataset(name)
        meta = MetadataCatalog.get(name)
        # VOC and builtin COCO class lists are known without reading anything
        classes = meta.get("thing_classes", None)
        if dataset_task(name) == "voc":
            if len(classes) != num_classes:
                raise MCLDetError(
                    f"dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES "
                    f"is {num_classes}; set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}"
                )
            check_voc_contents(name, for_eval=name in tests)
        elif meta.get("mcl_det_source", None) is not None:
            check_coco_contents(name, num_classes)
        elif classes is not None and len(classes) > num_classes:
            raise MCLDetError(
                f"dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES "
                f"is {num_classes}; set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}"
            )
