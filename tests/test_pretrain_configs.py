"""Every shipped pretraining config loads (no unknown key) and builds its cohort (tiny K)."""

from pathlib import Path

import pytest
import torch

from mcl_det.pretrain.config import member_archs, normalize_opts, setup_pretrain_cfg
from mcl_det.pretrain.models import build_cohort
from mcl_det.utils.errors import MCLDetError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "pretrain" / "configs").glob("*.yaml"))
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
        model = build_cohort(cfg, archs, num_classes=1000, bank_size=64)
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
