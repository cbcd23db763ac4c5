"""train_net under faults and bad input: atomic checkpoints, weights that cannot run code, bad data.

Every CLI path runs ``tools/train_net.py`` in a subprocess the way a user does and checks exit 2,
one ``error:`` line and no traceback; earlier files are compared by sha256.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import one_error_line, run_tool

pytest.importorskip("detectron2")

from mcl_det.data.toy import make_toy_coco, make_toy_voc  # noqa: E402
from mcl_det.detection.checkpoint import SafeCheckpointer, read_weights  # noqa: E402
from mcl_det.detection.datasets import prepare_datasets  # noqa: E402
from mcl_det.detection.train import Trainer, check_weights, run_one, setup_cfg  # noqa: E402
from mcl_det.utils.errors import MCLDetError  # noqa: E402
from mcl_det.utils.io import restricted_pickle_load, sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = ROOT / "tools" / "train_net.py"
FPN = str(ROOT / "detection_configs" / "toy_voc_faster_rcnn_r18_fpn.yaml")
FAST = """
    SOLVER.IMS_PER_BATCH 2  SOLVER.MAX_ITER 2  SOLVER.WARMUP_ITERS 1  SOLVER.STEPS (1,)
    SOLVER.CHECKPOINT_PERIOD 1  INPUT.MIN_SIZE_TRAIN (96,)  INPUT.MIN_SIZE_TEST 96
    MODEL.RPN.POST_NMS_TOPK_TRAIN 64  MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32
    TEST.PRECISE_BN.ENABLED False  SEED 0
""".split()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _voc(tmp_path: Path, tag: str) -> tuple[Path, list[str]]:
    """A fresh toy VOC folder and the overrides that register it as dataset ``tag``."""
    make_toy_voc(tmp_path, years=("2007",), num_train=4, num_test=2, size=(128, 96), seed=0)
    voc = tmp_path / "VOC2007"
    sets = [[f"{tag}_train", str(voc), "trainval"], [f"{tag}_test", str(voc), "test"]]
    opts = ["MCL_DET.DATASETS.VOC", repr(sets)]
    opts += ["DATASETS.TRAIN", f"('{tag}_train',)", "DATASETS.TEST", f"('{tag}_test',)"]
    return voc, opts


def _coco(tmp_path: Path, tag: str) -> tuple[Path, list[str]]:
    make_toy_coco(tmp_path, num_train=4, num_val=2, size=(128, 96), seed=0)
    c = tmp_path / "coco"
    sets = [
        [f"{tag}_train", f"{c}/train2017", f"{c}/annotations/instances_train2017.json"],
        [f"{tag}_val", f"{c}/val2017", f"{c}/annotations/instances_val2017.json"],
    ]
    opts = ["MCL_DET.DATASETS.COCO", repr(sets), "MODEL.ROI_HEADS.NUM_CLASSES", "80"]
    opts += ["DATASETS.TRAIN", f"('{tag}_train',)", "DATASETS.TEST", f"('{tag}_val',)"]
    return c, opts


def _train_net(tmp_path: Path, *args, script=TRAIN_NET, **env):
    return run_tool(script, *args, cwd=tmp_path, timeout=600, OMP_NUM_THREADS="1", **env)


def _cli(tmp_path: Path, opts: list[str], *flags: str) -> str:
    out = ["OUTPUT_DIR", str(tmp_path / "out")]
    return one_error_line(_train_net(tmp_path, "--config-file", FPN, *flags, *FAST, *opts, *out))


# ---------------------------------------------------------------------- bad data: one line each


def test_malformed_voc_xml(tmp_path):
    voc, opts = _voc(tmp_path, "f_xml")
    bad = (
        voc
        / "Annotations"
        / ((voc / "ImageSets/Main/trainval.txt").read_text().split()[1] + ".xml")
    )
    bad.write_text("<annotation><size><width>128</width>")
    line = _cli(tmp_path, opts)
    assert str(bad) in line and "not well-formed XML" in line


def test_voc_object_of_unknown_class(tmp_path):
    voc, opts = _voc(tmp_path, "f_cls")
    xml = voc / "Annotations" / "000001.xml"
    text = xml.read_text()
    name = text.split("<object>")[1].split("<name>")[1].split("</name>")[0]
    xml.write_text(text.replace(f"<name>{name}</name>", "<name>unicorn</name>", 1))
    line = _cli(tmp_path, opts)
    assert "'unicorn'" in line and "VOC_CLASSES" in line


def test_split_id_without_annotation_or_image(tmp_path):
    voc, opts = _voc(tmp_path, "f_ids")
    split = voc / "ImageSets/Main/trainval.txt"
    split.write_text(split.read_text() + "ghost\n")
    shutil.copy(next((voc / "JPEGImages").glob("*.jpg")), voc / "JPEGImages" / "ghost.jpg")
    line = _cli(tmp_path, opts)
    assert "1 of 5 ids" in line and "no annotation file" in line
    assert str(voc / "Annotations" / "ghost.xml") in line
    # the other way round: the annotation is there, the image is not (checked up front, not
    # when the id is sampled)
    (voc / "JPEGImages" / "ghost.jpg").unlink()
    shutil.copy(next((voc / "Annotations").glob("*.xml")), voc / "Annotations" / "ghost.xml")
    line = _cli(tmp_path, opts)
    assert "no image" in line and str(voc / "JPEGImages" / "ghost.jpg") in line


def test_test_split_needs_what_the_evaluator_reads(tmp_path):
    voc, opts = _voc(tmp_path, "f_eval")
    test_id = (voc / "ImageSets/Main/test.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{test_id}.xml"
    xml.write_text(xml.read_text().replace("<pose>Unspecified</pose>", ""))
    with pytest.raises(MCLDetError, match="lacks <pose>"):
        prepare_datasets(setup_cfg(FPN, FAST + opts))
    # the same file in a training split is fine: detectron2's loader does not read <pose>
    train = ["DATASETS.TRAIN", "('f_eval_train', 'f_eval_test')", "DATASETS.TEST", "()"]
    prepare_datasets(setup_cfg(FPN, FAST + opts + train))


def test_coco_unknown_category_and_too_few_classes(tmp_path):
    c, opts = _coco(tmp_path, "f_coco")
    path = c / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][3]["category_id"] = 999
    path.write_text(json.dumps(data))
    line = _cli(tmp_path, opts)
    assert "1 of" in line and "category_id 999" in line and "categories" in line
    data["annotations"][3]["category_id"] = data["categories"][0]["id"]
    path.write_text(json.dumps(data))
    line = _cli(tmp_path, opts + ["MODEL.ROI_HEADS.NUM_CLASSES", "8"])
    assert "80 categories" in line and "NUM_CLASSES 80" in line


def test_coco_degenerate_boxes_are_counted_in_one_warning(tmp_path, caplog):
    c, opts = _coco(tmp_path, "f_boxes")
    path = c / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"][2] = 0.0  # zero width
    data["annotations"][1]["bbox"][0] = -3.0  # negative x
    path.write_text(json.dumps(data))
    cfg = setup_cfg(FPN, FAST + opts)
    with caplog.at_level(logging.WARNING, logger="mcl_det.detection.datasets"):
        prepare_datasets(cfg)
        prepare_datasets(cfg)  # checked once per process: no second warning
    warns = [r.getMessage() for r in caplog.records if "zero width" in r.getMessage()]
    assert len(warns) == 1 and f"2 of {len(data['annotations'])} boxes" in warns[0]


# ---------------------------------------------------------------------- weights


def test_random_bytes_as_weights(tmp_path):
    _, opts = _voc(tmp_path, "f_rand")
    for ext in (".pth", ".pkl"):
        w = tmp_path / f"random{ext}"
        w.write_bytes(np.random.default_rng(0).bytes(4096))
        line = _cli(tmp_path, opts + ["MODEL.WEIGHTS", str(w)])
        assert f"cannot read weights {w}" in line


@pytest.mark.parametrize("ext", [".pkl", ".pth"])
def test_crafted_weights_run_nothing(tmp_path, ext):
    _, opts = _voc(tmp_path, "f_evil" + ext[1:])
    w = tmp_path / f"evil{ext}"
    if ext == ".pkl":
        model = {"a": np.zeros(3, np.float32)}
        w.write_bytes(pickle.dumps({"model": model, "__author__": "x", "x": _Evil()}))
    else:
        torch.save({"model": {}, "x": _Evil()}, w)
    line = _cli(tmp_path, opts + ["MODEL.WEIGHTS", str(w)])
    assert "system" in line and "--unsafe-load" in line and "trust" in line
    assert not (tmp_path / "PWNED").exists()


def _converted_like(model: torch.nn.Module, protocol: int, ordered: bool) -> bytes:
    """A .pkl as tools/convert_to_d2.py or the detectron2 model zoo write them."""
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    sd = OrderedDict(sd) if ordered else sd
    obj = {"model": sd, "__author__": "mcl_det", "matching_heuristics": True}
    return pickle.dumps(obj, protocol=protocol)


def test_restricted_loader_reads_weight_pickles_and_nothing_else(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.nn.init.normal_(net[0].weight)
    for protocol, ordered in ((2, True), (4, False), (pickle.HIGHEST_PROTOCOL, False)):
        p = tmp_path / f"w{protocol}.pkl"
        p.write_bytes(_converted_like(net, protocol, ordered))
        got = read_weights(str(p))
        assert got["__author__"] == "mcl_det"
        np.testing.assert_array_equal(got["model"]["0.weight"], net[0].weight.detach().numpy())
    caffe2 = tmp_path / "caffe2.pkl"
    blobs = {"conv1_w": np.ones((2, 2)), "conv1_w_momentum": np.ones((2, 2))}
    caffe2.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    assert set(read_weights(str(caffe2))["model"]) == {"conv1_w"}  # detectron2's Caffe2 rule
    # a harmless class outside the allow-list: refused by default, loaded with --unsafe-load
    odd = tmp_path / "odd.pkl"
    odd.write_bytes(pickle.dumps({"model": {}, "__author__": "x", "f": Fraction(1, 3)}))
    with pytest.raises(MCLDetError, match=r"fractions\.Fraction.*--unsafe-load"):
        read_weights(str(odd))
    assert read_weights(str(odd), unsafe_load=True)["f"] == Fraction(1, 3)
    with pytest.raises(pickle.UnpicklingError, match="fractions.Fraction"):
        restricted_pickle_load(odd)


def test_converted_weights_load_into_the_detector(tmp_path):
    cfg = setup_cfg(FPN, FAST)
    src = Trainer.build_model(cfg)
    w = tmp_path / "member0.pkl"
    w.write_bytes(_converted_like(src, pickle.HIGHEST_PROTOCOL, False))
    dst = Trainer.build_model(cfg)
    SafeCheckpointer(dst).load(str(w))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_missing_settings_yaml_is_one_warning(tmp_path, caplog):
    net = torch.nn.Conv2d(3, 4, 3)
    w = tmp_path / "member0.pkl"
    w.write_bytes(_converted_like(net, pickle.HIGHEST_PROTOCOL, False))
    cfg = setup_cfg(FPN, FAST + ["MODEL.WEIGHTS", str(w)])
    with caplog.at_level(logging.WARNING, logger="mcl_det.detection"):
        check_weights(cfg)
    warns = [r.getMessage() for r in caplog.records if "could not be checked" in r.getMessage()]
    assert len(warns) == 1 and "member0.yaml" in warns[0]
    caplog.clear()
    (tmp_path / "member0.yaml").write_text("MODEL:\n  PIXEL_MEAN: [1, 2, 3]\n")
    with caplog.at_level(logging.WARNING, logger="mcl_det.detection"):
        check_weights(cfg)
    assert not [r for r in caplog.records if "could not be checked" in r.getMessage()]


# ---------------------------------------------------------------------- atomic checkpoints


def _enospc_save(real, fail_from: int):
    calls = []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) < fail_from:
            return real(obj, f, *a, **k)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def _shas(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file()}


def test_full_disk_at_checkpoint_keeps_earlier_ones(tmp_path, monkeypatch):
    net = torch.nn.Linear(3, 2)
    ck = SafeCheckpointer(net, str(tmp_path))
    ck.save("model_0000000", iteration=0)
    before = _shas(tmp_path)
    monkeypatch.setattr(torch, "save", _enospc_save(torch.save, 1))
    with pytest.raises(MCLDetError, match=r"could not write .*model_0000001\.pth.*No space left"):
        ck.save("model_0000001", iteration=1)
    assert _shas(tmp_path) == before  # no truncated file, no temporary left, tag unchanged
    assert ck.get_checkpoint_file() == str(tmp_path / "model_0000000.pth")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-iteration run (checkpoints model_0000000, model_final) and its overrides."""
    root = tmp_path_factory.mktemp("faults_run")
    _, opts = _voc(root, "f_run")
    out = root / "run"
    run_one(setup_cfg(FPN, FAST + opts + ["OUTPUT_DIR", str(out)]))
    return out, opts


_DRIVER = """
import errno, os, signal, sys, time
sys.path.insert(0, {root!r})
import torch
mode, real, calls = os.environ["FAULT"], torch.save, []
def save(obj, f, *a, **k):  # the first checkpoint write of this run breaks off half-way
    calls.append(1)
    if len(calls) > 1:
        return real(obj, f, *a, **k)
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    if mode == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device")
    os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGINT)
    time.sleep(5)
torch.save = save
from mcl_det.cli.run import run_main
from mcl_det.cli.train_net import main
run_main(lambda: main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "mode", ["enospc", *(pytest.param(m, marks=pytest.mark.slow) for m in ("sigint", "kill"))]
)
def test_fault_during_checkpoint_write(trained, tmp_path, mode):
    """Resume the finished run for 2 more iterations; its first checkpoint write is cut off."""
    src, opts = trained
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = {k: v for k, v in _shas(out).items() if k.endswith(".pth") or k == "last_checkpoint"}
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(root=str(ROOT)))
    args = ["--config-file", FPN, "--num-gpus", "0", "--resume", *FAST, *opts]
    args += ["SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(out)]
    r = _train_net(tmp_path, *args, script=driver, FAULT=mode)
    if mode == "enospc":
        line = one_error_line(r)
        assert "model_0000002.pth" in line and "No space left" in line and "MiB free" in line
    elif mode == "sigint":
        assert r.returncode == 130 and "interrupted" in r.stderr, r.stderr[-3000:]
    else:
        assert r.returncode == -9
    after = _shas(out)
    assert {k: after.get(k) for k in before} == before  # earlier checkpoints untouched
    assert not (out / "model_0000002.pth").exists()  # never a truncated checkpoint
    if mode != "kill":  # a killed process cannot remove its temporary file; others do
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    else:  # and the run resumes from the last complete checkpoint
        r = _train_net(tmp_path, *args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((out / "results.json").read_text())["iteration"] == 4


@pytest.mark.slow
def test_divergence_is_one_line_without_traceback(tmp_path):
    _, opts = _voc(tmp_path, "f_nan")
    line = _cli(
        tmp_path, opts + ["SOLVER.BASE_LR", "1e30", "SOLVER.WARMUP_ITERS", "0"], "--num-gpus", "0"
    )
    assert "diverged" in line and "--resume" in line
