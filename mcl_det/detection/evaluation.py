"""Evaluators: Pascal VOC (2007 11-point metric) and COCO (bbox / segm).

VOC: detectron2's ``PascalVOCDetectionEvaluator`` and its devkit port (``voc_eval``), with three
changes. Predictions reach ``voc_eval`` at full precision: detectron2 rounds scores to 3 decimals
and boxes to 0.1 px on their way through its text files, which ties scores, reorders detections
and moves IoUs across thresholds. Per-class ``AP50-<class>`` is reported beside AP / AP50 / AP75.
A class without (non-difficult) ground truth in the split is left out of the means with a warning
instead of counting as AP 0, so a test split lacking a class does not drag the mean down. The
metric is always the 2007 11-point one (the protocol MoCo / MCL report on), whatever the year of
the dataset. All figures in percent.

COCO: detectron2's ``COCOEvaluator``; its fast C++ COCOeval when the extension was built,
pycocotools otherwise (same numbers, slower).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict, defaultdict

import numpy as np
from detectron2.config import CfgNode
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator
from detectron2.evaluation.pascal_voc_evaluation import parse_rec, voc_eval
from detectron2.utils import comm

from .datasets import dataset_task

logger = logging.getLogger(__name__)

IOU_THRESHOLDS = [t / 100 for t in range(50, 100, 5)]  # as detectron2's evaluator


def has_fast_coco_eval() -> bool:
    """True when detectron2's C++ extension (and so its fast COCOeval) is really there."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "MCL_DET_STUB", False)


class VOCEvaluator(PascalVOCDetectionEvaluator):
    """detectron2's VOC evaluator at full precision, 2007 metric, with per-class AP50."""

    def __init__(self, dataset_name: str):
        super().__init__(dataset_name)
        self._is_2007 = True

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to(self._cpu_device)
            boxes = inst.pred_boxes.tensor.numpy().astype(np.float64)
            boxes[:, :2] += 1.0  # detectron2 0-based -> VOC 1-based (its loader subtracted 1)
            for b, s, c in zip(boxes.tolist(), inst.scores.tolist(), inst.pred_classes.tolist()):
                # repr() round-trips a float exactly through voc_eval's float() parsing
                line = " ".join([str(inp["image_id"]), repr(s), *map(repr, b)])
                self._predictions[c].append(line)

    def _positives(self) -> dict[str, int]:
        """Non-difficult ground-truth boxes per class in the split (as ``voc_eval`` counts them)."""
        with open(self._image_set_path) as f:
            ids = [x.strip() for x in f if x.strip()]
        npos: dict[str, int] = defaultdict(int)
        for img in ids:
            for obj in parse_rec(self._anno_file_template.format(img)):
                npos[obj["name"]] += not obj["difficult"]
        return npos

    def evaluate(self) -> OrderedDict:
        all_preds = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return OrderedDict()
        preds: dict[int, list[str]] = defaultdict(list)
        for per_rank in all_preds:
            for c, lines in per_rank.items():
                preds[c].extend(lines)
        npos = self._positives()
        missing = [c for c in self._class_names if npos.get(c, 0) == 0]
        if missing:
            logger.warning("VOC eval: no ground truth in this split, left out of AP: %s", missing)
        aps: dict[str, list[float]] = {}  # class -> AP (percent) per IoU threshold
        with tempfile.TemporaryDirectory(prefix="pascal_voc_eval_") as tmp:
            template = os.path.join(tmp, "{}.txt")
            for c, name in enumerate(self._class_names):
                if name in missing:
                    continue
                with open(template.format(name), "w") as f:
                    f.write("\n".join(preds.get(c, [])))
                aps[name] = [
                    100.0
                    * float(
                        voc_eval(
                            template,
                            self._anno_file_template,
                            self._image_set_path,
                            name,
                            ovthresh=t,
                            use_07_metric=self._is_2007,
                        )[2]
                    )
                    for t in IOU_THRESHOLDS
                ]
        res = OrderedDict()
        if aps:
            arr = np.array(list(aps.values()))  # C x T
            res["AP"] = float(arr.mean())
            res["AP50"] = float(arr[:, 0].mean())
            res["AP75"] = float(arr[:, 5].mean())
            for name, row in aps.items():
                res[f"AP50-{name}"] = row[0]
        return OrderedDict(bbox=res)


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_dir: str | None = None
) -> DatasetEvaluator:
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


__all__ = ["IOU_THRESHOLDS", "VOCEvaluator", "build_evaluator", "has_fast_coco_eval"]
