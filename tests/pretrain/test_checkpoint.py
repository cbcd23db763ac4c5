"""The pretraining checkpoint contract: plain contents (weights_only loading), RNG round trip,
member extraction, and no code run from a user file by the converter, --list or linear_eval."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from clitools import run_tool
from PIL import Image
from torch import nn

from mcl_det.convert import read_checkpoint
from mcl_det.pretrain.checkpoint import (
    FORMAT,
    is_cohort_checkpoint,
    load_checkpoint,
    member_indices,
    member_state,
    save_checkpoint,
)
from mcl_det.pretrain.config import get_pretrain_cfg
from mcl_det.pretrain.models import build_resnet
from mcl_det.utils.errors import MCLDetError
from mcl_det.utils.io import load_torch
from mcl_det.utils.rng import rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[2]
CONVERT = ROOT / "tools" / "convert_to_d2.py"
LINEAR_EVAL = ROOT / "tools" / "linear_eval.py"


class _Cohort(nn.Module):
    """The part of a cohort module the checkpoint format sees: ``archs`` and member encoders."""

    def __init__(self, archs: list[str]) -> None:
        super().__init__()
        self.archs = archs
        self.members = nn.ModuleList(nn.ModuleDict({"encoder": build_resnet(a)}) for a in archs)


def _cfg(**opts: str):
    cfg = get_pretrain_cfg()
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


class _Touch:
    """Unpickling this runs ``touch PATH`` through os.system: the attack the loaders refuse."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Marker:
    """Unpickling this creates a marker file (harmless code, to show what --unsafe-load does)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


# ------------------------------------------------------------------------- format


def test_saved_checkpoint_loads_with_plain_weights_only(tmp_path):
    """No allowlist at all: torch's own weights_only loader reads our checkpoint."""
    np.random.seed(3)
    np.random.randn()  # leaves a cached gaussian in the numpy state
    path = tmp_path / "ck.pth"
    opt_state = {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]}
    metrics = [{"name": "knn_top1", "value": np.float64(12.5), "epoch": np.int64(1)}]
    save_checkpoint(
        path, _Cohort(["resnet18"]), _cfg(), epoch=1, optimizer=opt_state, member_metrics=metrics
    )
    ck = torch.load(path, weights_only=True)
    assert ck["format"] == FORMAT and ck["archs"] == ["resnet18"]
    assert ck["member_metrics"][0] == {"name": "knn_top1", "value": 12.5, "epoch": 1}
    assert type(ck["member_metrics"][0]["value"]) is float  # numpy scalars stored as Python
    assert isinstance(ck["config"], str) and "LINEAR:" in ck["config"]
    assert isinstance(ck["rng"]["numpy"]["key"], torch.Tensor)
    assert load_checkpoint(path)["epoch"] == 1


def test_save_refuses_values_that_would_need_unpickling(tmp_path):
    with pytest.raises(TypeError, match=r"ckpt\.extra\.cfg is a Namespace"):
        save_checkpoint(
            tmp_path / "x.pth", _Cohort(["resnet18"]), _cfg(), extra={"cfg": argparse.Namespace()}
        )
    assert not (tmp_path / "x.pth").exists()


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # has_gauss = 1
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pth")
    expected = _draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert _draws() == expected


def test_legacy_rng_tuples_still_restore():
    """Checkpoints written before the RNG state was plain hold the raw tuples."""
    random.seed(5)
    np.random.seed(6)
    legacy = {"torch": torch.get_rng_state(), "python": random.getstate()}
    legacy["numpy"] = np.random.get_state()
    expected = _draws()
    random.seed(0)
    np.random.seed(0)
    set_rng_state(legacy)
    assert _draws() == expected


def test_member_state_and_indices():
    model = {
        "members.0.encoder.conv1.weight": torch.zeros(1),
        "members.0.encoder_k.conv1.weight": torch.ones(1),  # momentum encoder: not the member
        "members.1.encoder.fc.weight": torch.ones(2),
        "members.1.head.fc1.weight": torch.ones(3),
        "queues": torch.ones(4),
    }
    ck = {"format": FORMAT, "model": model}
    assert member_state(ck, 0) == {"conv1.weight": model["members.0.encoder.conv1.weight"]}
    assert list(member_state(ck, 1)) == ["fc.weight"] and member_state(ck, 2) == {}
    assert member_indices(ck) == [0, 1]
    assert is_cohort_checkpoint(ck) and is_cohort_checkpoint({"model": model})
    assert not is_cohort_checkpoint({"model": {"conv1.weight": torch.zeros(1)}})


# ------------------------------------------------------------------------- safe loading


def test_code_in_a_file_is_never_run_by_default(tmp_path):
    pwned = tmp_path / "PWNED"
    torch.save({"format": FORMAT, "model": {}, "x": _Touch(pwned)}, tmp_path / "evil.pth")
    with pytest.raises(MCLDetError, match=r"\(posix\.system\).*pass --unsafe-load only for files"):
        load_torch(tmp_path / "evil.pth")
    with pytest.raises(MCLDetError, match="never holds one") as e:
        load_checkpoint(tmp_path / "evil.pth")  # pretraining resume: no opt-in exists
    assert "--unsafe-load" not in str(e.value)
    assert not pwned.exists()


def test_foreign_checkpoints_with_data_only_objects_load_safely(tmp_path):
    """Real MoCo files ({epoch, arch, state_dict, optimizer}); MoCo v3 / DINO style ``args``
    (argparse.Namespace); mcl_det files written before the RNG state was plain (numpy)."""
    sd = torchvision.models.resnet18().state_dict()
    moco = {f"module.encoder_q.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    opt = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}
    torch.save(
        {"epoch": 200, "arch": "resnet18", "state_dict": moco, "optimizer": opt},
        tmp_path / "moco.pth",
    )
    assert read_checkpoint(tmp_path / "moco.pth").kind == "moco"
    args = argparse.Namespace(arch="resnet18", lr=0.03, dist_url="tcp://x")
    torch.save({"epoch": 3, "args": args, "state_dict": moco}, tmp_path / "v3.pth")
    assert load_torch(tmp_path / "v3.pth")["args"].lr == 0.03
    old = {"format": FORMAT, "model": {}, "rng": {"numpy": np.random.get_state()}}
    torch.save(old, tmp_path / "old.pth")
    key = load_checkpoint(tmp_path / "old.pth")["rng"]["numpy"][1]
    assert isinstance(key, np.ndarray) and key.dtype == np.uint32


def _assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]


def test_cli_refuses_a_checkpoint_that_runs_code(tmp_path):
    """Converter, --list and linear_eval: exit 2, one line naming the opt-in, nothing run."""
    evil = tmp_path / "evil.pth"
    torch.save({"format": FORMAT, "archs": ["resnet18"], "x": _Touch("PWNED")}, evil)
    runs = [
        run_tool(CONVERT, evil, tmp_path / "out.pkl", cwd=tmp_path, PYTHONWARNINGS="ignore"),
        run_tool(CONVERT, evil, "--list", cwd=tmp_path, PYTHONWARNINGS="ignore"),
        run_tool(LINEAR_EVAL, evil, "--member", "0", cwd=tmp_path),
    ]
    for r in runs:
        _assert_one_line_error(r, "pass --unsafe-load only for files you trust")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out.pkl").exists()


@pytest.mark.slow
def test_cli_unsafe_load_unpickles_in_full(tmp_path):
    """What --unsafe-load means: the file's code runs (here it only creates a marker)."""
    marker = tmp_path / "marker"
    sd = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": sd, "args": _Marker(marker)}, tmp_path / "m.pth")
    r = run_tool(CONVERT, tmp_path / "m.pth", "--list", PYTHONWARNINGS="ignore")
    _assert_one_line_error(r, "pass --unsafe-load only for files you trust")
    assert not marker.exists()
    r = run_tool(CONVERT, tmp_path / "m.pth", "--list", "--unsafe-load", PYTHONWARNINGS="ignore")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unpickling in full" in r.stderr and "resnet" not in r.stdout  # no arch recorded
    assert r.stdout.splitlines()[1].split()[:2] == ["0", "?"] and marker.exists()


# ------------------------------------------------------------------------- linear_eval CLI


def _imagefolder(root: Path, classes: int = 2, per_class: int = 4, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / f"c{c}" / f"{i}.png")


def test_linear_eval_cli_flags_after_the_checkpoint(tmp_path):
    """The README form: ``linear_eval.py CKPT --member 1 KEY VALUE ...``."""
    _imagefolder(tmp_path / "data")
    ck = tmp_path / "checkpoint_last.pth"
    cfg = _cfg(**{"DATA.IMAGE_SIZE": "32", "DATA.NUM_WORKERS": "0", "DEVICE": "cpu"})
    save_checkpoint(ck, _Cohort(["resnet18", "resnet18"]), cfg, epoch=1, iteration=1)
    out = tmp_path / "le"
    r = run_tool(
        LINEAR_EVAL,
        ck,
        "--member",
        "1",
        "DATA.ROOT",
        tmp_path / "data",
        "--output-dir",
        out,
        "LINEAR.EPOCHS",
        "1",
        "LINEAR.IMS_PER_BATCH",
        "4",
        "LINEAR.MAX_ITER",
        "1",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "linear_eval.json").read_text())
    assert result["member"] == 1 and result["iterations"] == 1 and result["epochs"] == 1
    assert json.loads(r.stdout)["member"] == 1
    assert f"ROOT: {tmp_path / 'data'}" in (out / "config.yaml").read_text()
