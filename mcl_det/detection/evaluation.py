"""Evaluators: Pascal VOC (2007 11-point metric) and COCO (bbox / segm).

VOC: AP is the mean over IoU thresholds 0.50:0.95:0.05 of the class-mean AP, AP50 / AP75 at 0.5 /
0.75, plus per-class ``AP50-<class>``; all in percent, as detectron2 reports them. Ground truth is
read from the VOC XML files (with their ``difficult`` flags, which are ignored rather than counted
as misses), exactly as the VOC devkit does; boxes use its 1-based inclusive pixel convention.

COCO: detectron2's ``COCOEvaluator``; its fast C++ COCOeval when the extension was built,
pycocotools otherwise (same numbers, slower).
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections import OrderedDict, defaultdict

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm

from .datasets import dataset_task

logger = logging.getLogger(__name__)

IOU_THRESHOLDS = [0.5 + 0.05 * i for i in range(10)]


def has_fast_coco_eval() -> bool:
    """True when detectron2's C++ extension (and so its fast COCOeval) is really there."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "MCL_DET_STUB", False)


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = True) -> float:
    """Average precision from a recall / precision curve (both D, in detection order).

    VOC2007 11-point: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t.
    Otherwise the area under the monotone precision envelope (VOC2010+).
    """
    if use_07_metric:
        ap = 0.0
        # np.arange as in the devkit: its float thresholds (0.30000000000000004, ...) decide ties
        # such as recall exactly 0.3, so the same grid gives the devkit's / detectron2's numbers.
        for t in np.arange(0.0, 1.1, 0.1):
            p = prec[rec >= t]
            ap += (p.max() if p.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: max precision to the right
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_iou(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with G boxes (Gx4), xyxy in VOC's inclusive pixels (+1 widths)."""
    iw = np.minimum(gts[:, 2], box[2]) - np.maximum(gts[:, 0], box[0]) + 1.0
    ih = np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 1], box[1]) + 1.0
    inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    areas = (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0)
    return inter / (area + areas - inter)


def voc_eval_class(
    dets: list[tuple[str, float, np.ndarray]],
    gts: dict[str, tuple[np.ndarray, np.ndarray]],
    thresholds: list[float],
    use_07_metric: bool = True,
) -> list[float] | None:
    """AP (fraction) of one class at each IoU threshold; None when it has no non-difficult GT.

    dets: (image_id, score, box(4,)) triples. gts: image_id -> (boxes Gx4, difficult G bool).
    A detection matches the GT box it overlaps most (as the devkit does); above the threshold it
    is a TP if that box is new, ignored if the box is difficult, an FP if already taken.
    The best-overlap search does not depend on the threshold, so it runs once; the per-threshold
    "first detection to claim each box" step is vectorised with np.unique.
    """
    npos = int(sum((~diff).sum() for _, diff in gts.values()))
    if npos == 0:
        return None
    if not dets:
        return [0.0 for _ in thresholds]
    order = np.argsort([-s for _, s, _ in dets], kind="stable")
    ovmax = np.zeros(len(dets))  # D
    gt_key = np.full(len(dets), -1)  # D: global index of the best-overlap GT box
    is_diff = np.zeros(len(dets), dtype=bool)  # D
    offsets, diffs, off = {}, [], 0
    for img, (boxes, diff) in gts.items():
        offsets[img] = off
        diffs.append(diff)
        off += len(boxes)
    for rank, d in enumerate(order):
        img, _, box = dets[d]
        if img not in gts or len(gts[img][0]) == 0:
            continue
        ov = voc_iou(box, gts[img][0])
        j = int(ov.argmax())
        ovmax[rank], gt_key[rank], is_diff[rank] = ov[j], offsets[img] + j, gts[img][1][j]
    out = []
    for t in thresholds:
        hit = ovmax > t
        cand = np.where(hit & ~is_diff)[0]  # in score order
        tp = np.zeros(len(dets))
        _, first = np.unique(gt_key[cand], return_index=True)
        tp[cand[first]] = 1.0
        fp = (~hit).astype(float)
        fp[cand] = 1.0 - tp[cand]
        # difficult matches are neither: both stay 0 for them
        tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
        rec = tp_c / npos
        prec = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
        out.append(voc_ap(rec, prec, use_07_metric))
    return out


def load_voc_gt(dirname: str, split: str, classes: list[str]) -> dict:
    """class name -> image_id -> (boxes Gx4 float, difficult G bool), from the XML files."""
    with open(os.path.join(dirname, "ImageSets", "Main", split + ".txt")) as f:
        ids = [line.strip() for line in f if line.strip()]
    gts: dict[str, dict] = {c: {} for c in classes}
    for img in ids:
        per_cls = defaultdict(lambda: ([], []))
        root = ET.parse(os.path.join(dirname, "Annotations", img + ".xml")).getroot()
        for obj in root.findall("object"):
            name = obj.find("name").text.strip()
            bb = obj.find("bndbox")
            box = [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            d = obj.find("difficult")
            per_cls[name][0].append(box)
            per_cls[name][1].append(d is not None and int(d.text) == 1)
        for c in classes:
            b, d = per_cls.get(c, ([], []))
            gts[c][img] = (np.array(b, dtype=np.float64).reshape(-1, 4), np.array(d, dtype=bool))
    return gts


def voc_metrics(
    dets_per_class: dict[str, list], gts_per_class: dict[str, dict], use_07_metric: bool = True
) -> OrderedDict:
    """{"AP", "AP50", "AP75", "AP50-<class>"} in percent; classes without GT are left out."""
    aps, missing = {}, []
    for c, gts in gts_per_class.items():
        r = voc_eval_class(dets_per_class.get(c, []), gts, IOU_THRESHOLDS, use_07_metric)
        if r is None:
            missing.append(c)
        else:
            aps[c] = r
    if missing:
        logger.warning("VOC eval: no ground truth in this split, left out of AP: %s", missing)
    res = OrderedDict()
    if not aps:
        return res
    arr = np.array(list(aps.values())) * 100.0  # C x T
    res["AP"] = float(arr.mean())
    res["AP50"] = float(arr[:, 0].mean())
    res["AP75"] = float(arr[:, 5].mean())
    for c, row in zip(aps, arr):
        res[f"AP50-{c}"] = float(row[0])
    return res


class VOCEvaluator(DatasetEvaluator):
    """VOC detection evaluator (2007 metric) that also reports per-class AP50."""

    def __init__(self, dataset_name: str):
        meta = MetadataCatalog.get(dataset_name)
        self._dirname, self._split = meta.dirname, meta.split
        self._classes = list(meta.thing_classes)
        self._use_07 = True  # MoCo / MCL report VOC07 test with the 11-point metric

    def reset(self) -> None:
        self._preds: dict[str, list] = defaultdict(list)

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            boxes = inst.pred_boxes.tensor.numpy().astype(np.float64)
            boxes[:, :2] += 1.0  # detectron2 0-based -> VOC 1-based (its loader subtracted 1)
            for b, s, c in zip(boxes, inst.scores.tolist(), inst.pred_classes.tolist()):
                self._preds[self._classes[c]].append((str(inp["image_id"]), s, b))

    def evaluate(self) -> OrderedDict:
        all_preds = comm.gather(dict(self._preds), dst=0)
        if not comm.is_main_process():
            return OrderedDict()
        merged: dict[str, list] = defaultdict(list)
        for p in all_preds:
            for c, lst in p.items():
                merged[c].extend(lst)
        gts = load_voc_gt(self._dirname, self._split, self._classes)
        return OrderedDict(bbox=voc_metrics(merged, gts, self._use_07))


def build_evaluator(cfg: CfgNode, dataset_name: str, output_dir: str | None = None):
    """The evaluator that matches the dataset's format (VOC or COCO)."""
    if dataset_task(dataset_name) == "voc":
        return VOCEvaluator(dataset_name)
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    return COCOEvaluator(
        dataset_name,
        tasks=tasks,
        distributed=True,
        output_dir=output_dir,
        use_fast_impl=has_fast_coco_eval(),
    )


__all__ = [
    "VOCEvaluator",
    "build_evaluator",
    "has_fast_coco_eval",
    "voc_ap",
    "voc_eval_class",
    "voc_iou",
    "voc_metrics",
    "load_voc_gt",
]
