"""Cohort member -> detectron2 export: formats, renaming, numerical verification, error paths."""

from __future__ import annotations

import logging
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from clitools import run_tool
from yacs.config import CfgNode

from mcl_det import convert
from mcl_det.convert import convert_checkpoint, read_checkpoint, rename_to_d2, tv_to_d2_name
from mcl_det.utils.errors import MCLDetError
from mcl_det.weights_settings import check_weights_against_config, yaml_path_for

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_to_d2.py"


def _resnet_state(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state_dict with random (non-identity) BN statistics, so that a
    mis-mapped BN, or BN treated as train-mode, changes the outputs."""
    torch.manual_seed(seed)
    m = getattr(torchvision.models, f"resnet{depth}")()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.num_batches_tracked.fill_(7)
                assert mod.weight.shape == (c,)
    return m.state_dict()


def _cohort(
    archs: list[str],
    mode: str = "selfsup",
    metrics: list[float | None] | None = None,
    ddp: bool = False,
) -> dict:
    """A checkpoint in the DESIGN.md format, with the non-backbone keys that must be dropped."""
    model: dict[str, torch.Tensor] = {}
    for k, arch in enumerate(archs):
        sd = _resnet_state(int(arch[len("resnet") :]), seed=k)
        for name, t in sd.items():
            if name.startswith("fc.") and mode == "selfsup":
                continue  # selfsup encoders have their fc replaced by the head
            model[f"members.{k}.encoder.{name}"] = t
            if mode == "selfsup":
                model[f"members.{k}.encoder_k.{name}"] = t + 1.0  # momentum encoder: dropped
        model[f"members.{k}.head.0.weight"] = torch.randn(8, 4)
        if mode == "selfsup":
            model[f"members.{k}.head_k.0.weight"] = torch.randn(8, 4)
            model[f"queue_{k}"] = torch.randn(8, 16)
    if ddp:
        model = {f"module.{k}": v for k, v in model.items()}
    metrics = metrics if metrics is not None else [None] * len(archs)
    name = "knn_top1" if mode == "selfsup" else "top1"
    return {
        "format": "mcl_det.pretrain/v1",
        "mode": mode,
        "archs": archs,
        "config": "MCL:\n  NUM_MEMBERS: 2\n",
        "epoch": 3,
        "iteration": 30,
        "model": model,
        "member_metrics": [{"name": name, "value": v, "epoch": 3} for v in metrics],
        "optimizer": {"state": {}, "param_groups": []},
    }


@pytest.fixture(scope="module")
def cohort_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ckpt") / "checkpoint_last.pth"
    torch.save(_cohort(["resnet18", "resnet18"], metrics=[40.0, 55.5]), p)
    yield p
    shutil.rmtree(p.parent)  # 0.17 GB: free the disk for the rest of the suite


def _load_pkl(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


# ---------------------------------------------------------------------------------- renaming


def test_rename_table():
    expected = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_var": "stem.conv1.norm.running_var",
        "layer1.0.conv2.weight": "res2.0.conv2.weight",
        "layer3.5.bn3.bias": "res4.5.conv3.norm.bias",
        "layer4.0.downsample.0.weight": "res5.0.shortcut.weight",
        "layer2.0.downsample.1.running_mean": "res3.0.shortcut.norm.running_mean",
        "fc.weight": None,
        "fc.0.weight": None,  # MoCo v2 MLP head
        "layer1.0.bn1.num_batches_tracked": None,
    }
    for src, dst in expected.items():
        assert tv_to_d2_name(src) == dst, src
    with pytest.raises(MCLDetError, match="not part of a torchvision ResNet"):
        tv_to_d2_name("features.0.weight")


def test_rename_refuses_two_sources_for_one_target(monkeypatch):
    monkeypatch.setattr(convert, "tv_to_d2_name", lambda n: "stem.conv1.weight")
    with pytest.raises(MCLDetError, match="both .* map to 'stem.conv1.weight'"):
        rename_to_d2({"conv1.weight": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(1)})


def test_mapping_is_logged(caplog):
    sd = _resnet_state(18)
    with caplog.at_level(logging.INFO, logger="mcl_det.convert"):
        _, mapping, dropped = rename_to_d2(sd)
    text = caplog.text
    assert "map layer4.1.bn2.weight -> res5.1.conv2.norm.weight" in text
    assert "drop fc.weight" in text
    assert len(mapping) == len({v for v in mapping.values()})
    assert {"fc.weight", "fc.bias"} <= set(dropped)


# ------------------------------------------------------------------- depths and verification


@pytest.mark.parametrize(
    "depth",
    [
        18,
        34,
        50,
        pytest.param(101, marks=pytest.mark.slow),
        pytest.param(152, marks=pytest.mark.slow),
    ],
)
def test_every_depth_converts_and_verifies(tmp_path, depth):
    src = tmp_path / "tv.pth"
    sd = _resnet_state(depth)
    torch.save(sd, src)
    out = tmp_path / f"r{depth}.pkl"
    rep = convert_checkpoint(src, out, verify=True)
    assert rep.depth == depth and rep.source_format == "torchvision" and rep.verified
    assert set(rep.max_rel_diff) == {"res2", "res3", "res4", "res5"}
    assert max(rep.max_rel_diff.values()) < 1e-5
    data = _load_pkl(out)
    assert data["__author__"] == "mcl_det" and data["matching_heuristics"] is True
    # every non-fc, non-counter tensor is there, bit-identical
    expect = {k: v for k, v in sd.items() if not k.startswith("fc.") and "num_batches" not in k}
    assert len(data["model"]) == len(expect)
    for k, v in expect.items():
        np.testing.assert_array_equal(data["model"][tv_to_d2_name(k)], v.numpy())
    y = yaml_path_for(out).read_text()
    assert "# MCL_DET:" in y
    assert yaml.safe_load(y) == {
        "INPUT": {"FORMAT": "RGB"},
        "MODEL": {
            "PIXEL_MEAN": [123.675, 116.28, 103.53],
            "PIXEL_STD": [58.395, 57.12, 57.375],
            "RESNETS": {
                "DEPTH": depth,
                "RES2_OUT_CHANNELS": 64 if depth < 50 else 256,
                "STRIDE_IN_1X1": False,
            },
        },
    }


def test_numerical_equivalence_direct(tmp_path):
    """Independent of the converter's own check: detectron2 backbone fed the .pkl equals a
    hand-written torchvision forward."""
    sd = _resnet_state(18, seed=3)
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    convert_checkpoint(tmp_path / "w.pth", tmp_path / "o.pkl", verify=False)
    d2 = convert.build_d2_resnet(18)
    inc = convert.load_with_detectron2(d2, str(tmp_path / "o.pkl"))
    assert not [k for k in inc.missing_keys] and not inc.incorrect_shapes
    tv = torchvision.models.resnet18().eval()
    tv.load_state_dict(sd)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        out = d2(x)["res5"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_verification_catches_a_wrong_mapping(tmp_path, monkeypatch):
    """Swap bn1/bn2 of one block: names still load, numbers differ -> refused, nothing written."""
    real = convert.tv_to_d2_name

    def swapped(name: str):
        t = real(name)
        if t and t.startswith("res3.1.conv1.norm."):
            return t.replace("conv1.norm", "conv2.norm")
        if t and t.startswith("res3.1.conv2.norm."):
            return t.replace("conv2.norm", "conv1.norm")
        return t

    monkeypatch.setattr(convert, "tv_to_d2_name", swapped)
    torch.save(_resnet_state(18), tmp_path / "w.pth")
    with pytest.raises(MCLDetError, match="verification failed: detectron2 res3"):
        convert_checkpoint(tmp_path / "w.pth", tmp_path / "o.pkl")
    assert not list(tmp_path.glob("o.*"))


def test_verification_catches_a_missing_key(tmp_path, monkeypatch):
    real = convert.tv_to_d2_name
    monkeypatch.setattr(
        convert,
        "tv_to_d2_name",
        lambda n: None if n == "layer2.0.downsample.0.weight" else real(n),
    )
    torch.save(_resnet_state(18), tmp_path / "w.pth")
    with pytest.raises(MCLDetError, match="did not load 1 backbone"):
        convert_checkpoint(tmp_path / "w.pth", tmp_path / "o.pkl")
    assert not list(tmp_path.glob("o.*"))


# ------------------------------------------------------------------------------- formats


def test_cohort_selfsup_member_and_dropped_keys(tmp_path, cohort_path):
    rep = convert_checkpoint(cohort_path, tmp_path / "m1.pkl", member=1)
    assert rep.source_format == "mcl_det-selfsup" and rep.member == 1 and rep.arch == "resnet18"
    assert all(k.startswith(("stem.", "res")) for k in _load_pkl(tmp_path / "m1.pkl")["model"])
    ck = torch.load(cohort_path, weights_only=True)
    w = _load_pkl(tmp_path / "m1.pkl")["model"]["res4.1.conv2.weight"]
    np.testing.assert_array_equal(w, ck["model"]["members.1.encoder.layer3.1.conv2.weight"])
    assert not np.array_equal(w, ck["model"]["members.0.encoder.layer3.1.conv2.weight"])
    assert "member: 1 (resnet18, epochs 3, metric knn_top1=55.5)" in rep_yaml(tmp_path / "m1.pkl")


def rep_yaml(pkl: Path) -> str:
    return yaml_path_for(pkl).read_text()


def test_cohort_ddp_prefix_and_mixed_depths(tmp_path):
    p = tmp_path / "c.pth"
    torch.save(_cohort(["resnet18", "resnet34"], ddp=True), p)
    rep = convert_checkpoint(p, tmp_path / "m.pkl", member=1, verify=False)  # verified elsewhere
    assert rep.depth == 34 and rep.num_tensors == len(_load_pkl(tmp_path / "m.pkl")["model"])


def test_supervised_cohort_drops_fc(tmp_path):
    p = tmp_path / "s.pth"
    ck = _cohort(["resnet18"], mode="supervised", metrics=[70.0])
    assert "members.0.encoder.fc.weight" in ck["model"]
    torch.save(ck, p)
    rep = convert_checkpoint(p, tmp_path / "s.pkl", member="best")
    assert rep.source_format == "mcl_det-supervised"
    assert {"fc.weight", "fc.bias"} <= set(rep.dropped)
    assert not any("fc" in k for k in _load_pkl(tmp_path / "s.pkl")["model"])


def test_moco_checkpoint(tmp_path):
    sd = _resnet_state(18)
    moco = {f"module.encoder_q.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    moco["module.encoder_q.fc.0.weight"] = torch.randn(512, 512)  # MoCo v2 MLP
    moco["module.encoder_q.fc.2.weight"] = torch.randn(128, 512)
    moco.update({f"module.encoder_k.{k}": v + 1 for k, v in sd.items()})
    moco["module.queue"] = torch.randn(128, 64)
    torch.save({"state_dict": moco, "arch": "resnet18", "epoch": 200}, tmp_path / "moco.pth")
    rep = convert_checkpoint(tmp_path / "moco.pth", tmp_path / "moco.pkl")
    assert rep.source_format == "moco" and rep.arch == "resnet18"
    w = _load_pkl(tmp_path / "moco.pkl")["model"]["stem.conv1.weight"]
    np.testing.assert_array_equal(w, sd["conv1.weight"].numpy())  # encoder_q, not encoder_k


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_plain_torchvision_wrapped_or_not(tmp_path, wrap):
    sd = {f"module.{k}": v for k, v in _resnet_state(18).items()}
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 1}, tmp_path / "p.pth")
    src = read_checkpoint(tmp_path / "p.pth")
    assert src.kind == "torchvision" and len(src.members) == 1
    assert "conv1.weight" in src.states[0]  # module. prefix removed


def test_resume_state_with_numpy_objects_loads(tmp_path):
    """pretrain/main.py may save numpy RNG state: not loadable with weights_only=True alone."""
    ck = _cohort(["resnet18"])
    ck["rng"] = {"numpy": np.random.get_state()}
    torch.save(ck, tmp_path / "rng.pth")
    src = read_checkpoint(tmp_path / "rng.pth")
    assert src.kind == "mcl_det-selfsup" and src.members[0].arch == "resnet18"


def test_nan_weights_refused(tmp_path):
    sd = _resnet_state(18)
    sd["layer3.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(MCLDetError, match="layer3.1.conv2.weight contains NaN/Inf"):
        convert_checkpoint(tmp_path / "nan.pth", tmp_path / "nan.pkl", verify=False)
    assert not (tmp_path / "nan.pkl").exists()


def test_resnext_refused(tmp_path):
    torch.save(torchvision.models.resnext50_32x4d().state_dict(), tmp_path / "x.pth")
    with pytest.raises(MCLDetError, match="ResNeXt / wide ResNets are not supported"):
        convert_checkpoint(tmp_path / "x.pth", tmp_path / "x.pkl", verify=False)


# ------------------------------------------------------------ full detectron2 detectors


def _frcnn_cfg(zoo_file: str, opts: list[str], weights_yaml: Path):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_file))
    cfg.merge_from_file(str(weights_yaml))  # our settings file is a valid detectron2 config
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.mark.parametrize(
    "zoo_file,depth,opts,prefixes",
    [
        (
            "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
            50,
            [],
            ("backbone.", "roi_heads.res5."),
        ),
        ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", 18, [], ("backbone.bottom_up.",)),
    ],
    ids=["R50-C4", "R18-FPN"],
)
def test_pkl_loads_into_faster_rcnn(tmp_path, zoo_file, depth, opts, prefixes):
    from detectron2.modeling import build_model

    sd = _resnet_state(depth)
    torch.save(sd, tmp_path / "w.pth")
    out = tmp_path / "w.pkl"
    convert_checkpoint(tmp_path / "w.pth", out, verify=False)
    cfg = _frcnn_cfg(zoo_file, opts, yaml_path_for(out))
    assert cfg.MODEL.RESNETS.DEPTH == depth
    check_weights_against_config(cfg, out)  # consistent -> no error
    model = build_model(cfg)
    inc = convert.load_with_detectron2(model, str(out))
    backbone_keys = [k for k in model.state_dict() if k.startswith(prefixes)]
    assert backbone_keys
    missing = [k for k in inc.missing_keys if k.startswith(prefixes)]
    assert missing == [] and inc.incorrect_shapes == [] and list(inc.unexpected_keys) == []
    # the weights really arrived (not just "no key missing")
    msd = model.state_dict()
    res5 = (
        "roi_heads.res5.0.conv1.weight"
        if "C4" in zoo_file
        else "backbone.bottom_up.res5.0.conv1.weight"
    )
    torch.testing.assert_close(msd[res5], sd["layer4.0.conv1.weight"], rtol=0, atol=0)
    stem = [k for k in msd if k.endswith("stem.conv1.norm.running_mean")][0]
    torch.testing.assert_close(msd[stem], sd["bn1.running_mean"], rtol=0, atol=0)


# ------------------------------------------------------------ check_weights_against_config


def _cfg(**over) -> CfgNode:
    c = CfgNode(
        {
            "INPUT": {"FORMAT": "RGB"},
            "MODEL": {
                "PIXEL_MEAN": [123.675, 116.28, 103.53],
                "PIXEL_STD": [58.395, 57.12, 57.375],
                "RESNETS": {"DEPTH": 18, "RES2_OUT_CHANNELS": 64, "STRIDE_IN_1X1": False},
            },
        }
    )
    for k, v in over.items():
        node = c
        *parts, last = k.split("__")
        for p in parts:
            node = node[p]
        node[last] = v
    return c


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory, cohort_path) -> Path:
    out = tmp_path_factory.mktemp("w") / "member0.pkl"
    convert_checkpoint(cohort_path, out, member=0, verify=False)
    yield out
    shutil.rmtree(out.parent)


def test_check_weights_accepts_matching_config(r18_weights):
    check_weights_against_config(_cfg(), r18_weights)


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"INPUT__FORMAT": "BGR"}, "INPUT.FORMAT is BGR in the config but the weights need RGB"),
        (
            {"MODEL__RESNETS__DEPTH": 50},
            "MODEL.RESNETS.DEPTH is 50 in the config but the weights need 18",
        ),
        ({"MODEL__PIXEL_STD": [1.0, 1.0, 1.0]}, "MODEL.PIXEL_STD is [1.0,1.0,1.0]"),
        ({"MODEL__RESNETS__STRIDE_IN_1X1": True}, "STRIDE_IN_1X1 is True"),
        ({"MODEL__RESNETS__RES2_OUT_CHANNELS": 256}, "RES2_OUT_CHANNELS is 256"),
    ],
)
def test_check_weights_refuses_mismatch(r18_weights, over, needle):
    with pytest.raises(MCLDetError) as e:
        check_weights_against_config(_cfg(**over), r18_weights)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    key = next(iter(over)).replace("__", ".")
    assert f"fix: add `{key} " in msg


def test_check_weights_detectron2_defaults_list_every_fix(r18_weights):
    from detectron2.config import get_cfg

    with pytest.raises(MCLDetError) as e:
        check_weights_against_config(get_cfg(), r18_weights)
    assert "INPUT.FORMAT RGB" in str(e.value) and "MODEL.RESNETS.DEPTH 18" in str(e.value)


def test_check_weights_without_yaml_is_unchecked(tmp_path):
    (tmp_path / "zoo.pkl").write_bytes(b"x")
    check_weights_against_config(_cfg(INPUT__FORMAT="BGR"), tmp_path / "zoo.pkl")
    (tmp_path / "zoo.yaml").write_text("MODEL:\n  RESNETS:\n    DEPTH: 50\n")  # not ours
    check_weights_against_config(_cfg(INPUT__FORMAT="BGR"), tmp_path / "zoo.pkl")
    check_weights_against_config(_cfg(), "detectron2://ImageNetPretrained/MSRA/R-50.pkl")


def test_check_weights_warns_once_when_our_yaml_is_missing(r18_weights, tmp_path, caplog):
    """A converted .pkl whose settings file went missing: one warning saying so, no error."""
    lone = tmp_path / "member0.pkl"
    shutil.copy(r18_weights, lone)
    with caplog.at_level(logging.WARNING, logger="mcl_det"):
        check_weights_against_config(_cfg(INPUT__FORMAT="BGR"), lone)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NOT checked" in warnings[0] and "member0.yaml" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mcl_det"):
        check_weights_against_config(_cfg(), r18_weights)  # YAML present: checked, silent
        check_weights_against_config(_cfg(), "detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    assert not caplog.records


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_tool(TOOL, *args, PYTHONWARNINGS="ignore")


def test_cli_list_and_best(tmp_path, cohort_path):
    r = _cli(cohort_path, "--list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["index", "arch", "epochs", "metric"]
    assert lines[1].split()[:3] == ["0", "resnet18", "3"] and "knn_top1=40.00" in lines[1]
    assert "knn_top1=55.50" in lines[2]
    out = tmp_path / "best.pkl"
    r = _cli(cohort_path, out, "--member", "best")
    assert r.returncode == 0, r.stderr
    assert "picked member 1 (resnet18, knn_top1=55.5)" in r.stdout
    assert "map layer1.0.bn1.weight -> res2.0.conv1.norm.weight" in r.stderr  # mapping logged
    assert "verified" in r.stdout and out.is_file() and out.with_suffix(".yaml").is_file()


def _assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr


def test_cli_error_paths(tmp_path, cohort_path):
    """Missing, corrupt, not a ResNet, member out of range, unknown format: one line, exit 2,
    no output. (One test so that the five short subprocesses share a single budget.)"""
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(cohort_path.read_bytes()[:5000])
    not_resnet = tmp_path / "vgg.pth"
    vgg = {f"members.0.encoder.features.{i}.weight": torch.zeros(2) for i in range(3)}
    torch.save({"format": "mcl_det.pretrain/v1", "archs": ["vgg11"], "model": vgg}, not_resnet)
    unknown = tmp_path / "unknown.pth"
    torch.save({"weights": [1, 2, 3], "hello": "world"}, unknown)
    cases = [
        (tmp_path / "nope.pth", [], "input checkpoint not found"),
        (corrupt, [], "cannot read checkpoint"),
        (not_resnet, [], "is a 'vgg11', not a ResNet"),
        (cohort_path, ["--member", "5"], "member 5 out of range"),
        (unknown, [], "unrecognised checkpoint format"),
    ]
    for i, (inp, extra, needle) in enumerate(cases):
        out = tmp_path / f"out{i}.pkl"
        r = _cli(inp, out, *extra)
        _assert_one_line_error(r, needle)
        assert not out.exists() and not out.with_suffix(".yaml").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp files


def test_existing_output_kept_on_failure(tmp_path, cohort_path):
    out = tmp_path / "keep.pkl"
    out.write_bytes(b"old")
    with pytest.raises(MCLDetError, match="out of range"):
        convert_checkpoint(cohort_path, out, member=9)
    assert out.read_bytes() == b"old"
