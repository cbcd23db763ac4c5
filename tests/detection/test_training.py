"""Toy-scale training + evaluation: C4 and FPN, Faster and Mask R-CNN, resume, trials, odd data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from mcl_det.data.toy import make_toy_coco, make_toy_voc  # noqa: E402
from mcl_det.detection.train import (  # noqa: E402
    RESULTS_FORMAT,
    Trainer,
    run_one,
    setup_cfg,
    trial_cfgs,
)
from mcl_det.utils.errors import MCLDetError  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[2] / "detection_configs"
FPN = str(CONFIG_DIR / "toy_voc_faster_rcnn_r18_fpn.yaml")
C4 = str(CONFIG_DIR / "toy_voc_faster_rcnn_r18_c4.yaml")
# smallest settings that still exercise everything: 2 images of ~96 px per step, 2 steps
FAST = """
    SOLVER.IMS_PER_BATCH 2  SOLVER.MAX_ITER 2  SOLVER.WARMUP_ITERS 1  SOLVER.STEPS (1,)
    SOLVER.CHECKPOINT_PERIOD 1  INPUT.MIN_SIZE_TRAIN (96,)  INPUT.MIN_SIZE_TEST 96
    MODEL.RPN.POST_NMS_TOPK_TRAIN 64  MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32
    TEST.PRECISE_BN.NUM_ITER 2  SEED 0
""".split()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_det")
    make_toy_voc(root, years=("2007",), num_train=4, num_test=2, size=(128, 96), seed=0)
    make_toy_coco(root, num_train=6, num_val=6, size=(128, 96), seed=0)
    coco = root / "coco"  # the layout DETECTRON2_DATASETS=root expects
    voc = root / "VOC2007"
    first = (voc / "ImageSets/Main/test.txt").read_text().split()[0]
    (voc / "ImageSets/Main/one.txt").write_text(first + "\n")  # a split holding a single image
    return {"voc": str(voc), "coco": str(coco)}


def _voc_opts(toy, train_split="trainval", test_split="test"):
    sets = [["tt_voc_" + train_split, toy["voc"], train_split]]
    if test_split != train_split:
        sets.append(["tt_voc_" + test_split, toy["voc"], test_split])
    return ["MCL_DET.DATASETS.VOC", repr(sets)] + [
        *("DATASETS.TRAIN", f"('tt_voc_{train_split}',)"),
        *("DATASETS.TEST", f"('tt_voc_{test_split}',)"),
    ]


def _coco_opts(toy):
    c = toy["coco"]
    sets = [
        ["tt_coco_train", f"{c}/train2017", f"{c}/annotations/instances_train2017.json"],
        ["tt_coco_val", f"{c}/val2017", f"{c}/annotations/instances_val2017.json"],
    ]
    return (
        ["MCL_DET.DATASETS.COCO", repr(sets)]
        + """
        MODEL.MASK_ON True  MODEL.ROI_HEADS.NUM_CLASSES 80
        DATASETS.TRAIN ('tt_coco_train',)  DATASETS.TEST ('tt_coco_val',)
    """.split()
    )


def _load(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def test_fpn_faster_rcnn_voc_trains_evaluates_and_resumes(toy, tmp_path):
    out = tmp_path / "fpn"
    cfg = setup_cfg(FPN, FAST + _voc_opts(toy) + ["OUTPUT_DIR", str(out)])
    res = run_one(cfg)
    disk = _load(out)
    assert disk == json.loads(json.dumps(res))
    assert disk["format"] == RESULTS_FORMAT and disk["finished"] is True
    assert disk["task"] == "voc" and disk["iteration"] == 2 and disk["max_iter"] == 2
    assert disk["detector"] == "GeneralizedRCNN/StandardROIHeads/build_resnet_fpn_backbone/R18"
    assert disk["seed"] == 0 and disk["world_size"] == 1 and disk["ims_per_batch"] == 2
    assert disk["min_size_train"] == [96] and disk["min_size_test"] == 96
    assert disk["weights"] == "" and disk["weights_tag"] == "random"
    bbox = disk["metrics"]["bbox"]
    assert {"AP", "AP50", "AP75"} <= set(bbox) and any(k.startswith("AP50-") for k in bbox)
    assert all(0.0 <= v <= 100.0 for v in bbox.values())
    for f in ("config.yaml", "metrics.json", "model_final.pth", "last_checkpoint"):
        assert (out / f).exists(), f
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    assert "tt_voc_trainval" in (out / "config.yaml").read_text()

    # resume: a longer schedule continues at the saved iteration, not from 0
    cfg4 = setup_cfg(FPN, FAST + _voc_opts(toy) + ["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "4"])
    t = Trainer(cfg4)
    t.resume_or_load(resume=True)
    assert t.start_iter == 2
    del t
    res4 = run_one(cfg4, resume=True)
    assert res4["iteration"] == 4
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    iters = [x["iteration"] for x in lines if "total_loss" in x]
    assert iters == [1, 3]  # last iteration of each run: the second run did iterations 2..3 only


def test_c4_faster_rcnn_on_single_image_split(toy, tmp_path):
    out = tmp_path / "c4"
    cfg = setup_cfg(C4, FAST + _voc_opts(toy, "one", "one") + ["OUTPUT_DIR", str(out)])
    res = run_one(cfg)
    assert res["detector"] == "GeneralizedRCNN/Res5ROIHeadsExtraNorm/build_resnet_backbone/R18"
    assert res["iteration"] == 2 and "AP50" in res["metrics"]["bbox"]


def _check_coco_toy(toy):
    """The toy COCO set really has what the next tests claim to cover."""
    d = json.loads(Path(toy["coco"], "annotations/instances_train2017.json").read_text())
    ids = sorted(c["id"] for c in d["categories"])
    assert ids != list(range(1, len(ids) + 1))  # non-contiguous category ids
    assert any(a.get("iscrowd") for a in d["annotations"])
    with_ann = {a["image_id"] for a in d["annotations"]}
    assert any(im["id"] not in with_ann for im in d["images"])


def test_mask_rcnn_fpn_coco_trains_and_evaluates(toy, tmp_path):
    _check_coco_toy(toy)
    out = tmp_path / "mask_fpn"
    cfg = setup_cfg(FPN, FAST + _coco_opts(toy) + ["OUTPUT_DIR", str(out)])
    res = run_one(cfg)
    assert res["task"] == "coco" and res["mask_on"] is True
    assert set(res["metrics"]) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        m = res["metrics"][task]
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(m)
        assert all(v is None or 0.0 <= v <= 100.0 for v in m.values())
    json.loads((out / "results.json").read_text())  # strict JSON (NaN became null)


@pytest.mark.slow
def test_mask_rcnn_c4_coco_trains_and_evaluates(toy, tmp_path):
    out = tmp_path / "mask_c4"
    cfg = setup_cfg(C4, FAST + _coco_opts(toy) + ["OUTPUT_DIR", str(out)])
    res = run_one(cfg)
    assert res["detector"].startswith("GeneralizedRCNN/Res5ROIHeadsExtraNorm/")
    assert set(res["metrics"]) == {"bbox", "segm"}


def test_trials_write_one_results_per_seed(toy, tmp_path):
    out = tmp_path / "trials"
    opts = FAST + _voc_opts(toy, "one", "one") + ["OUTPUT_DIR", str(out)]
    cfg = setup_cfg(FPN, opts + ["MCL_DET.SEEDS", "[3, 5]", "MCL_DET.RUN_NAME", "toy"])
    cfgs = trial_cfgs(cfg)
    assert [c.SEED for c in cfgs] == [3, 5]
    assert [c.OUTPUT_DIR for c in cfgs] == [str(out / "seed3"), str(out / "seed5")]
    for c in cfgs:
        run_one(c)
    a, b = _load(out / "seed3"), _load(out / "seed5")
    assert (a["seed"], a["run_name"]) == (3, "toy_seed3") and b["run_name"] == "toy_seed5"
    assert a["config_digest"] == b["config_digest"]
    # --trials N without MCL_DET.SEEDS: seeds 0..N-1; neither: one run, a concrete seed recorded
    assert [c.SEED for c in trial_cfgs(setup_cfg(FPN, opts), trials=2)] == [0, 1]
    single = trial_cfgs(setup_cfg(FPN, opts + ["SEED", "-1"]))
    assert len(single) == 1 and single[0].SEED >= 0 and single[0].OUTPUT_DIR == str(out)
    assert os.path.isdir(out / "seed3")


def test_nan_loss_is_a_user_error(toy, tmp_path):
    out = tmp_path / "nan"
    opts = FAST + _voc_opts(toy, "one", "one") + ["OUTPUT_DIR", str(out)]
    cfg = setup_cfg(FPN, opts + ["SOLVER.BASE_LR", "1e30", "SOLVER.WARMUP_ITERS", "0"])
    with pytest.raises(MCLDetError, match="diverged"):
        run_one(cfg)
    assert not (out / "results.json").exists()
