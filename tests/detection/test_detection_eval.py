"""VOC evaluator: against a direct loop implementation of the devkit, and on hand-computed cases."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.structures import Boxes, Instances  # noqa: E402

from mcl_det.detection.config import get_detection_cfg  # noqa: E402
from mcl_det.detection.datasets import prepare_datasets, register_config_datasets  # noqa: E402
from mcl_det.detection.evaluation import (  # noqa: E402
    IOU_THRESHOLDS,
    VOCEvaluator,
    build_evaluator,
)
from mcl_det.utils.errors import MCLDetError  # noqa: E402


def _loop_ap07(rec, prec):
    ap = 0.0
    for i in range(11):
        t = i * 0.1  # the devkit's grid (0:0.1:1): 3 * 0.1 > 0.3 in floating point
        best = 0.0
        for r, p in zip(rec, prec):
            if r >= t and p > best:
                best = p
        ap += best / 11
    return ap


def _loop_iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / ua


def _loop_eval(dets, gts, t):
    """The VOC devkit's voc_eval, written as plainly as possible."""
    npos = sum(int((~d).sum()) for _, d in gts.values())
    used = {img: [False] * len(b) for img, (b, _) in gts.items()}
    dets = sorted(dets, key=lambda x: -x[1])
    tp, fp = [], []
    for img, _, box in dets:
        best, jbest = -1.0, -1
        for j, g in enumerate(gts.get(img, (np.zeros((0, 4)), []))[0]):
            o = _loop_iou(box, g)
            if o > best:
                best, jbest = o, j
        if best > t:
            if gts[img][1][jbest]:
                tp.append(0)
                fp.append(0)
            elif not used[img][jbest]:
                used[img][jbest] = True
                tp.append(1)
                fp.append(0)
            else:
                tp.append(0)
                fp.append(1)
        else:
            tp.append(0)
            fp.append(1)
    rec, prec, ctp, cfp = [], [], 0, 0
    for a, b in zip(tp, fp):
        ctp += a
        cfp += b
        rec.append(ctp / npos)
        prec.append(ctp / max(ctp + cfp, 1e-300))
    return _loop_ap07(rec, prec)


# ---------------------------------------------------------------- evaluator on a tiny VOC folder


def _write_voc(root, objects: dict[str, list[tuple[str, list[int], int]]], split="test"):
    """objects: image id -> [(class, [xmin, ymin, xmax, ymax] 1-based, difficult)]."""
    from PIL import Image

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for img, objs in objects.items():
        Image.new("RGB", (100, 80)).save(os.path.join(root, "JPEGImages", img + ".jpg"))
        xml = ["<annotation><size><width>100</width><height>80</height><depth>3</depth></size>"]
        for c, b, d in objs:
            xml.append(
                f"<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated>"
                f"<difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            )
        xml.append("</annotation>")
        with open(os.path.join(root, "Annotations", img + ".xml"), "w") as f:
            f.write("".join(xml))
    with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
        f.write("\n".join(objects) + "\n")


GT = {
    "i1": [("a", [1, 1, 40, 40], 0), ("b", [50, 20, 90, 70], 0)],
    "i2": [("a", [11, 21, 50, 60], 0), ("a", [60, 5, 80, 30], 1)],  # 2nd one is difficult
}


@pytest.fixture(scope="module")
def voc_eval_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("voc_eval"))
    _write_voc(root, GT)
    cfg = get_detection_cfg()
    cfg.MCL_DET.DATASETS.VOC = [["evaltest_voc", root, "test"]]
    cfg.MCL_DET.DATASETS.VOC_CLASSES = ["a", "b"]
    register_config_datasets(cfg)
    return cfg


def _run(preds: dict[str, list[tuple[str, list[float], float]]], name="evaltest_voc") -> dict:
    ev = VOCEvaluator(name)
    ev.reset()
    for img, ps in preds.items():
        inst = Instances((80, 100))
        # detectron2 coordinates are 0-based: xmin/ymin one less than the VOC XML values
        inst.pred_boxes = Boxes(torch.tensor([[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b, _ in ps]))
        inst.scores = torch.tensor([s for _, _, s in ps])
        inst.pred_classes = torch.tensor([["a", "b"].index(c) for c, _, _ in ps])
        ev.process([{"image_id": img}], [{"instances": inst}])
    return ev.evaluate()["bbox"]


def test_voc_perfect_predictions_give_100(voc_eval_dataset):
    preds = {img: [(c, b, 0.9) for c, b, _ in objs] for img, objs in GT.items()}
    m = _run(preds)
    assert m["AP50"] == pytest.approx(100.0)
    assert m["AP"] == pytest.approx(100.0)
    assert m["AP75"] == pytest.approx(100.0)
    assert m["AP50-a"] == pytest.approx(100.0) and m["AP50-b"] == pytest.approx(100.0)
    assert isinstance(build_evaluator(voc_eval_dataset, "evaltest_voc"), VOCEvaluator)


def test_voc_shifted_box_hand_computed(voc_eval_dataset):
    # class a: i1 exact (score .9) -> TP; i2 shifted 20 px right (score .8): IoU with its 40x40
    # box = 20*40 / (1600 + 1600 - 800) = 1/3 -> FP at every threshold.
    # recall/precision: (0.5, 1.0), (0.5, 0.5) -> 11-point AP = 6/11 (t = 0, .1, ..., .5).
    # class b: exact -> 100. Difficult box of i2 not predicted: no penalty.
    preds = {
        "i1": [("a", [1, 1, 40, 40], 0.9), ("b", [50, 20, 90, 70], 0.7)],
        "i2": [("a", [31, 21, 70, 60], 0.8)],
    }
    m = _run(preds)
    ap_a = 100 * 6 / 11
    assert m["AP50-a"] == pytest.approx(ap_a)
    assert m["AP50-b"] == pytest.approx(100.0)
    assert m["AP50"] == pytest.approx((ap_a + 100) / 2)
    assert m["AP"] == pytest.approx((ap_a + 100) / 2)


def test_voc_detection_on_difficult_box_is_ignored(voc_eval_dataset):
    preds = {img: [(c, b, 0.9) for c, b, _ in objs] for img, objs in GT.items()}
    preds["i2"].append(("a", [60, 5, 80, 30], 0.95))  # hits the difficult box: neither TP nor FP
    assert _run(preds)["AP50-a"] == pytest.approx(100.0)
    preds["i2"].append(("a", [1, 60, 20, 79], 0.99))  # hits nothing: FP ranked first
    # a: FP (p 0), TP (rec .5, p .5), TP (rec 1, p 2/3) -> 11 points all 2/3
    assert _run(preds)["AP50-a"] == pytest.approx(100 * 2 / 3)


def test_voc_full_precision_keeps_score_order(voc_eval_dataset):
    # An FP at 0.9001 and a TP at 0.9004 tie at detectron2's 3-decimal text scores (FP first);
    # at full precision the TP ranks first: TP, FP, TP -> precisions 1, 1/2, 2/3 at recalls
    # 1/2, 1/2, 1 -> 11-point AP (6 * 1 + 5 * 2/3) / 11. Tied (FP first) it would be 2/3.
    preds = {
        "i2": [("a", [1, 50, 30, 79], 0.9001), ("a", [11, 21, 50, 60], 0.5)],
        "i1": [("a", [1, 1, 40, 40], 0.9004)],
    }
    assert _run(preds)["AP50-a"] == pytest.approx(100 * (6 + 5 * 2 / 3) / 11)


def test_voc_evaluator_matches_devkit_loop(tmp_path):
    """Random scenes through the whole evaluator vs ``_loop_eval`` at every IoU threshold."""
    rng = np.random.default_rng(1)
    for trial in range(6):
        gts, dets, objects = {}, [], {}
        for i in range(int(rng.integers(1, 6))):
            k = int(rng.integers(0, 4))
            xy = rng.integers(1, 60, (k, 2))
            boxes = np.concatenate([xy, xy + rng.integers(10, 40, (k, 2))], 1).astype(float)
            diff = rng.random(k) < 0.2
            gts[f"im{i}"] = (boxes, diff)
            objects[f"im{i}"] = [("a", [int(v) for v in b], int(d)) for b, d in zip(boxes, diff)]
            cands = [b + rng.normal(0, 4, 4) for b in boxes for _ in range(int(rng.integers(0, 3)))]
            cands += [np.r_[xy, xy + 20] for xy in rng.uniform(0, 80, (int(rng.integers(0, 3)), 2))]
            for b in cands:  # the evaluator sees float32 0-based boxes: compare on the same values
                b32 = (b - [1, 1, 0, 0]).astype(np.float32).astype(np.float64) + [1, 1, 0, 0]
                dets.append((f"im{i}", float(np.float32(rng.random())), b32))
        npos = sum(int((~d).sum()) for _, d in gts.values())
        root = tmp_path / f"t{trial}"
        _write_voc(str(root), objects)
        cfg = get_detection_cfg()
        cfg.MCL_DET.DATASETS.VOC = [[f"evalrand{trial}", str(root), "test"]]
        cfg.MCL_DET.DATASETS.VOC_CLASSES = ["a", "b"]
        register_config_datasets(cfg)
        m = _run(
            {img: [("a", list(b), s) for im, s, b in dets if im == img] for img in gts},
            f"evalrand{trial}",
        )
        if npos == 0:
            assert m == {}  # no class with ground truth: nothing to average
            continue
        assert "AP50-b" not in m  # class b has no ground truth: left out, not counted as 0
        want = [100 * _loop_eval(dets, gts, t) for t in IOU_THRESHOLDS]
        assert m["AP50-a"] == pytest.approx(want[0], abs=1e-10), f"trial {trial}"
        assert m["AP75"] == pytest.approx(want[5], abs=1e-10), f"trial {trial}"
        assert m["AP"] == pytest.approx(np.mean(want), abs=1e-10), f"trial {trial}"


def test_user_dataset_checks(voc_eval_dataset, tmp_path):
    cfg = voc_eval_dataset.clone()
    cfg.DATASETS.TRAIN = ("evaltest_voc",)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 20
    with pytest.raises(MCLDetError, match="NUM_CLASSES 2"):
        prepare_datasets(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    prepare_datasets(cfg)  # consistent: no error, and registering again is a no-op
    cfg.MCL_DET.DATASETS.VOC = [["evaltest_gone", str(tmp_path / "gone"), "test"]]
    cfg.DATASETS.TRAIN = ("evaltest_gone",)
    with pytest.raises(MCLDetError, match=r"gone.*Annotations"):
        prepare_datasets(cfg)
    cfg.MCL_DET.DATASETS.VOC = [["evaltest_voc", str(tmp_path), "test"]]  # same name, other path
    with pytest.raises(MCLDetError, match="already registered"):
        prepare_datasets(cfg)
