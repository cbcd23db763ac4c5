"""tools/train_net.py as a user runs it: the documented command on toy data, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clitools import one_error_line, run_tool

pytest.importorskip("detectron2")

from mcl_det.data.toy import make_toy_voc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = str(ROOT / "tools" / "train_net.py")
VOC_MCL = str(ROOT / "detection_configs" / "voc_faster_rcnn_mcl.yaml")
# The documented toy overrides of the real VOC config (README): ResNet-18, small inputs, 2 steps.
TOY = [
    "MODEL.WEIGHTS",
    "",  # random init
    *(
        "MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64 "
        "DATASETS.TRAIN ('voc_2007_trainval',) INPUT.MIN_SIZE_TRAIN (96,) INPUT.MIN_SIZE_TEST 96 "
        "SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER 2 SOLVER.STEPS (1,) SOLVER.WARMUP_ITERS 1 "
        "TEST.PRECISE_BN.NUM_ITER 2 DATALOADER.NUM_WORKERS 0 "
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32 MODEL.RPN.POST_NMS_TOPK_TEST 100"
    ).split(),
]


def _run(args, data_root, tmp_path):
    return run_tool(
        TRAIN_NET,
        *args,
        cwd=tmp_path,
        timeout=600,
        DETECTRON2_DATASETS=str(data_root),
        OMP_NUM_THREADS="1",
    )


def test_missing_dataset_folder_is_one_line(tmp_path):
    r = _run(["--config-file", VOC_MCL, "--num-gpus", "0"], tmp_path / "nowhere", tmp_path)
    line = one_error_line(r)
    assert str(tmp_path / "nowhere" / "VOC2007") in line and "Annotations" in line
    assert "DETECTRON2_DATASETS" in line


def test_unknown_key_is_one_line(tmp_path):
    r = _run(["--config-file", VOC_MCL, "SOLVER.NOT_A_KEY", "1"], tmp_path, tmp_path)
    assert "SOLVER.NOT_A_KEY" in one_error_line(r)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_toy")
    make_toy_voc(root, years=("2007",), num_train=4, num_test=2, size=(128, 96), seed=0)
    return root


def test_missing_weights_is_one_line(toy_root, tmp_path):
    over = ["DATASETS.TRAIN", "('voc_2007_trainval',)"]
    r = _run(["--config-file", VOC_MCL, *over], toy_root, tmp_path)
    assert "output/convert/member0.pkl" in one_error_line(r)


@pytest.mark.slow
def test_documented_voc_command_on_toy_data(toy_root, tmp_path):
    out = tmp_path / "run"
    args = ["--config-file", VOC_MCL, "--num-gpus", "0", *TOY, "OUTPUT_DIR", str(out)]
    r = _run(args, toy_root, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["iteration"] == 2 and res["weights_tag"] == "mcl"
    assert res["detector"] == "GeneralizedRCNN/Res5ROIHeadsExtraNorm/build_resnet_backbone/R18"
    assert res["dataset_test"] == ["voc_2007_test"] and "AP50" in res["metrics"]["bbox"]
    assert "DEVICE: cpu" in (out / "config.yaml").read_text()
    # --eval-only on the trained model: same weights, results rewritten, iteration kept
    ev_args = ["--eval-only", *args, "MODEL.WEIGHTS", str(out / "model_final.pth")]
    r = _run(ev_args, toy_root, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((out / "results.json").read_text())
    assert ev["iteration"] == 2 and ev["weights_sha256"]
    assert ev["metrics"]["bbox"]["AP50"] == pytest.approx(res["metrics"]["bbox"]["AP50"])
