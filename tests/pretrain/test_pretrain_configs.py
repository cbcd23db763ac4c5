"""Every shipped pretraining config loads (no unknown key) and builds its cohort (tiny K); each
baseline is its MCL twin with the interaction weights 0; ``_BASE_`` inheritance."""

from pathlib import Path

import pytest
import torch
import yaml

from mcl_det.config import flat_cfg
from mcl_det.pretrain.config import member_archs, normalize_opts, setup_pretrain_cfg
from mcl_det.pretrain.models import build_cohort
from mcl_det.utils.errors import MCLDetError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "pretrain" / "configs"
# Base-*.yaml: settings a family of configs shares (detectron2's naming), not runs of their own
BASES = sorted(CONFIG_DIR.glob("Base-*.yaml"))
CONFIGS = sorted(set(CONFIG_DIR.glob("*.yaml")) - set(BASES))
BASELINES = [p for p in CONFIGS if "baseline" in p.stem]
EXPECTED = {
    "moco_v2_mcl_r50x2_200ep": ("selfsup", ["resnet50"] * 2),
    "sup_mcl_r18x2": ("supervised", ["resnet18"] * 2),
    "sup_mcl_r50x2": ("supervised", ["resnet50"] * 2),
    "sup_mcl_r18_r50": ("supervised", ["resnet18", "resnet50"]),
    "toy": ("selfsup", ["resnet18"] * 2),
}


def test_the_shipped_set_is_complete():
    names = {p.stem for p in CONFIGS}
    assert set(EXPECTED) <= names
    for n in EXPECTED:  # every MCL config has its independent-training baseline
        baseline = n.replace("mcl", "baseline") if "mcl" in n else n + "_baseline"
        assert baseline in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    cfg = setup_pretrain_cfg(str(path), ["MODEL.QUEUE_SIZE", "256"])
    archs = member_archs(cfg)
    base = path.stem.replace("baseline", "mcl")
    if base in EXPECTED or path.stem.startswith("toy"):
        mode, want = EXPECTED.get(base, EXPECTED["toy"])
        assert (cfg.MODE, archs) == (mode, want)
    interaction = [cfg.LOSS.W_ICL, cfg.LOSS.W_SOFT_VCL, cfg.LOSS.W_SOFT_ICL]
    if "baseline" in path.stem:
        assert interaction == [0.0, 0.0, 0.0]
    else:
        assert all(w > 0 for w in interaction)
    if cfg.MODE == "supervised":
        assert cfg.LOSS.TAU == 0.07 and (cfg.SOLVER.BASE_LR, cfg.SOLVER.NESTEROV) == (0.1, True)
    elif not path.stem.startswith("toy"):
        assert (cfg.LOSS.TAU, cfg.SOLVER.BASE_LR, cfg.SOLVER.EPOCHS) == (0.2, 0.03, 200)
    with torch.device("meta"):  # structure only: no memory, no init cost
        model = build_cohort(cfg, num_classes=1000, targets=[0] * 32 + [1] * 32)
    assert len(model.members) == len(archs)
    keys = model.state_dict()
    assert all(f"members.{k}.encoder.conv1.weight" in keys for k in range(len(archs)))


def test_archs_on_the_command_line():
    cfg = setup_pretrain_cfg(None, ["MODEL.ARCHS", "resnet18,resnet34"])
    assert member_archs(cfg) == ["resnet18", "resnet34"]
    assert normalize_opts(["MODEL.ARCHS", "['resnet50']"]) == ["MODEL.ARCHS", "['resnet50']"]
    assert (
        member_archs(setup_pretrain_cfg(None, ["MODEL.ARCH", "resnet34"], cohort=3))
        == ["resnet34"] * 3
    )
    with pytest.raises(MCLDetError, match="disagrees"):
        setup_pretrain_cfg(None, ["MODEL.ARCHS", "resnet18,resnet34"], cohort=3)
    with pytest.raises(MCLDetError, match="W_NOPE"):
        setup_pretrain_cfg(None, ["LOSS.W_NOPE", "1"])
    with pytest.raises(MCLDetError, match="vgg16"):
        setup_pretrain_cfg(None, ["MODEL.ARCHS", "resnet18,vgg16"])


@pytest.mark.parametrize(
    "key, value",
    [
        ("MODE", "moco"),
        ("SOLVER.SCHEDULE", "linear"),
        ("SOLVER.AMP", "fp8"),
        ("SUP.NEGATIVES", "queue"),
        ("LOSS.SUP_VARIANT", "multi"),
        ("DATA.PIPELINE", "gpu"),
        ("DATA.JPEG_DECODE", "nvjpeg"),
        ("DATA.AUG", "simclr"),
    ],
)
def test_every_enum_key_is_checked_at_setup(key, value):
    with pytest.raises(MCLDetError, match=f"unknown {key} '{value}'"):
        setup_pretrain_cfg(None, [key, value])


def test_resolved_member_list_and_method_class():
    from mcl_det.pretrain.models import (
        BankSupervisedCohort,
        InBatchSupervisedCohort,
        SelfSupCohort,
        cohort_class,
    )

    cfg = setup_pretrain_cfg(None, ["MODEL.ARCH", "resnet34"], cohort=3)
    assert cfg.MODEL.ARCHS == ["resnet34"] * 3 and cfg.MODEL.COHORT == 3 and cfg.is_frozen()
    assert setup_pretrain_cfg(None, ["MODEL.ARCHS", "['resnet18']"]).MODEL.COHORT == 1
    assert cohort_class(cfg) is SelfSupCohort
    sup = ["MODE", "supervised", "SUP.NEGATIVES"]
    assert cohort_class(setup_pretrain_cfg(None, [*sup, "bank"])) is BankSupervisedCohort
    assert cohort_class(setup_pretrain_cfg(None, [*sup, "batch"])) is InBatchSupervisedCohort


@pytest.mark.parametrize("value", ["0.0", "1.5", "-0.5"])
def test_eval_crop_out_of_range_is_a_user_error(value):
    with pytest.raises(MCLDetError, match="DATA.EVAL_CROP"):
        setup_pretrain_cfg(None, ["DATA.EVAL_CROP", value])


@pytest.mark.parametrize("value", ["(0.5,)", "(0.6, 0.5)", "(0.0, 1.0)", "(0.5, 1.2)"])
def test_sup_crop_scale_out_of_range_is_a_user_error(value):
    with pytest.raises(MCLDetError, match="DATA.SUP_CROP_SCALE"):
        setup_pretrain_cfg(None, ["DATA.SUP_CROP_SCALE", value])


def test_sup_crop_scale_reaches_the_supervised_crops():
    from torchvision import transforms as T

    from mcl_det.pretrain.data import InputPipeline

    cfg = setup_pretrain_cfg(None, ["MODE", "supervised", "DATA.SUP_CROP_SCALE", "(0.5, 1.0)"])
    for kind in ("pil", "device"):
        cfg.defrost()
        cfg.DATA.PIPELINE = kind
        crops = [
            t
            for t in InputPipeline(cfg, torch.device("cpu")).train_transform.transforms
            if isinstance(t, T.RandomResizedCrop)
        ]
        assert len(crops) == 1 and tuple(crops[0].scale) == (0.5, 1.0), kind


def test_eval_crop_one_keeps_the_whole_image():
    """EVAL_CROP 1.0: resize only, so a frame-filling object keeps its border pixels; 0.875 cuts
    1/16 of the side from each edge (ImageNet's 224 <- 256)."""
    from PIL import Image

    from mcl_det.pretrain.data import eval_transform

    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.putpixel((0, 16), (255, 255, 255))  # one white pixel on the left border
    whole = eval_transform(32, 1.0)(img)  # 3x32x32, normalised
    cropped = eval_transform(32, 0.875)(img)  # resized to 37, centre 32 kept: border gone
    assert whole.shape == cropped.shape == (3, 32, 32)
    assert whole[0, 16, 0] > whole[0, 0, 0]  # the border pixel survives
    assert torch.equal(cropped, cropped[:, :1, :1].expand(3, 32, 32))  # all black: pixel cut off


def test_linear_eval_config_is_checked_too():
    """Linear evaluation's config (the checkpoint's plus overrides) goes through the same check."""
    from mcl_det.pretrain.config import get_pretrain_cfg
    from mcl_det.pretrain.linear_eval import linear_eval_cfg

    ckpt = {"config": get_pretrain_cfg().dump()}
    assert linear_eval_cfg(ckpt, None, ["DATA.PIPELINE", "device"]).DATA.PIPELINE == "device"
    with pytest.raises(MCLDetError, match="unknown DATA.PIPELINE 'gpu'"):
        linear_eval_cfg(ckpt, None, ["DATA.PIPELINE", "gpu"])


def _twin(baseline: Path) -> Path:
    """The MCL config a baseline is compared with (``toy_baseline`` -> ``toy``)."""
    stem = "toy" if baseline.stem == "toy_baseline" else baseline.stem.replace("baseline", "mcl")
    return CONFIG_DIR / f"{stem}.yaml"


def _flat(path: Path) -> dict:
    return flat_cfg(yaml.safe_load(setup_pretrain_cfg(str(path)).dump()))


INTERACTION = {"LOSS.W_ICL", "LOSS.W_SOFT_VCL", "LOSS.W_SOFT_ICL"}  # selfsup keeps VCL (InfoNCE)


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: p.stem)
def test_baseline_is_its_mcl_twin_with_the_interaction_weights_0(path):
    """A fair comparison: the baseline inherits its twin (``_BASE_``) and resolves to exactly it
    but for OUTPUT_DIR and the interaction weights, which are 0 (supervised: VCL too; selfsup
    keeps VCL, MoCo's own InfoNCE)."""
    twin = _twin(path)
    assert yaml.safe_load(path.read_text())["_BASE_"] == twin.name
    base, mcl = _flat(path), _flat(twin)
    assert set(base) == set(mcl)
    differ = {k for k in base if base[k] != mcl[k]}
    weights = INTERACTION | ({"LOSS.W_VCL"} if mcl["MODE"] == "supervised" else set())
    assert differ == {"OUTPUT_DIR", *weights}
    assert all(base[k] == 0.0 and mcl[k] > 0 for k in weights)


def test_every_base_file_is_inherited_and_loads():
    named = {yaml.safe_load(p.read_text()).get("_BASE_") for p in CONFIGS}
    for base in BASES:
        assert base.name in named, f"{base.name} is inherited by no config"
        assert "_BASE_" not in setup_pretrain_cfg(str(base)).dump()


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_base_is_relative_to_the_file_naming_it_and_recursive(tmp_path, monkeypatch):
    _write(tmp_path / "a" / "root.yaml", "MODEL:\n  ARCH: resnet34\n  DIM: 64\nSEED: 1\n")
    _write(tmp_path / "a" / "sub" / "mid.yaml", '_BASE_: "../root.yaml"\nMODEL:\n  DIM: 32\n')
    leaf = _write(tmp_path / "b" / "leaf.yaml", '_BASE_: "../a/sub/mid.yaml"\nSEED: 3\n')
    monkeypatch.chdir(tmp_path / "a" / "sub")  # not where leaf.yaml is: paths follow the files
    cfg = setup_pretrain_cfg(leaf)
    assert (cfg.MODEL.ARCHS, cfg.MODEL.DIM, cfg.SEED) == (["resnet34"] * 2, 32, 3)
    assert "_BASE_" not in cfg.dump()  # what OUTPUT_DIR/config.yaml and the checkpoint hold
    assert (
        cfg.dump()
        == setup_pretrain_cfg(
            None, ["MODEL.ARCH", "resnet34", "MODEL.DIM", "32", "SEED", "3"]
        ).dump()
    )


@pytest.mark.parametrize(
    "files, needle",
    [
        ({"base.yaml": "MODEL:\n  NOPE: 1\n"}, "MODEL.NOPE"),  # unknown key in a base
        ({}, "missing.yaml"),  # a base that is not there
        ({"base.yaml": '_BASE_: "c.yaml"\n'}, "loop"),  # c -> base -> c
    ],
)
def test_bad_base_is_one_user_error(tmp_path, files, needle):
    for name, text in files.items():
        _write(tmp_path / name, text)
    target = "base.yaml" if files else "missing.yaml"
    cfg = _write(tmp_path / "c.yaml", f'_BASE_: "{target}"\nSEED: 2\n')
    with pytest.raises(MCLDetError, match=needle) as e:
        setup_pretrain_cfg(cfg)
    assert "\n" not in str(e.value)


def test_missing_base_is_one_error_line_from_the_cli(tmp_path):
    from clitools import ROOT, one_error_line, run_tool

    cfg = _write(tmp_path / "c.yaml", '_BASE_: "nowhere/missing.yaml"\n')
    line = one_error_line(run_tool(ROOT / "pretrain" / "main.py", "--config-file", cfg))
    assert "nowhere/missing.yaml" in line and "_BASE_" in line, line


def test_empty_config_file_is_still_an_empty_config(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "# nothing but a comment\n")
    assert setup_pretrain_cfg(cfg).dump() == setup_pretrain_cfg(None).dump()
    with pytest.raises(MCLDetError, match="_BASE_"):  # only files may inherit
        setup_pretrain_cfg(None, ["_BASE_", "x.yaml"])
