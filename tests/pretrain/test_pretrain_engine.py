"""Engine end to end at toy scale: checkpoint format, exact resume, supervised variants,
unreadable images, and bad input through the CLI (one ``error:`` line, exit 2)."""

import json
from pathlib import Path

import pytest
import torch
from clitools import one_error_line, run_tool
from pretrain_toy import toy_opts, train_losses

from mcl_det.data.toy import make_toy_imagenet
from mcl_det.pretrain.checkpoint import FORMAT, load_checkpoint
from mcl_det.pretrain.config import setup_pretrain_cfg
from mcl_det.pretrain.engine import train
from mcl_det.utils.io import sha256_file

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "pretrain" / "configs" / "toy.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    make_toy_imagenet(root, num_classes=4, train_per_class=6, val_per_class=2, size=32)
    return root


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_run_keeps_freed_memory_unless_switched_off(data_root, tmp_path, monkeypatch, keep):
    from mcl_det.pretrain import engine

    calls = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append(1) or True)
    opts = toy_opts(data_root, tmp_path / "run", CPU_KEEP_FREED_MEMORY=str(keep), DEVICE="cpu")
    engine.Trainer(setup_pretrain_cfg(TOY, opts, cohort=2))
    assert calls == ([1] if keep else [])


def test_selfsup_run_writes_design_checkpoint(data_root, tmp_path):
    out = tmp_path / "run"
    extra = {"MONITOR.EVAL_PERIOD": "1", "SOLVER.EPOCH_SNAPSHOT_PERIOD": "3"}
    cfg = setup_pretrain_cfg(TOY, toy_opts(data_root, out, **extra), cohort=2)
    summary = train(cfg)
    assert summary["iteration"] == 6
    ck = load_checkpoint(out / "checkpoint_last.pth")
    assert ck["format"] == FORMAT and ck["mode"] == "selfsup"
    assert ck["archs"] == ["resnet18", "resnet18"]
    assert ck["epoch"] == 2 and ck["iteration"] == 6
    for k in ("optimizer", "scheduler", "scaler", "rng", "config"):
        assert k in ck
    keys = ck["model"]
    assert "members.1.encoder.layer4.1.bn2.running_var" in keys
    assert not any(k.startswith("members.0.encoder.fc") for k in keys)  # MoCo: fc replaced by head
    assert {"members.0.head.fc1.weight", "members.1.encoder_k.conv1.weight", "queues"} <= set(keys)
    mm = ck["member_metrics"]
    assert [m["name"] for m in mm] == ["knn_top1"] * 2 and all(0 <= m["value"] <= 100 for m in mm)
    # snapshots every 3 epochs: none falls in 2 epochs, but the last epoch is always kept
    assert (out / "checkpoint_ep0002.pth").is_file() and (out / "config.yaml").is_file()
    assert not (out / "checkpoint_ep0001.pth").exists()
    assert "ARCHS:\n  - resnet18\n  - resnet18" in (out / "config.yaml").read_text()
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    train_lines = [r for r in records if r["type"] == "train"]
    assert all(
        k in train_lines[0]
        for k in ("loss_vcl", "loss_icl", "loss_soft_vcl", "loss_soft_icl", "lr")
    )


def test_exact_resume_mid_epoch(data_root, tmp_path):
    """6 iterations in one go == 4 iterations, stop, --resume, 2 more: identical losses/weights."""
    full, part = tmp_path / "full", tmp_path / "part"
    train(setup_pretrain_cfg(TOY, toy_opts(data_root, full), cohort=2))
    train(setup_pretrain_cfg(TOY, toy_opts(data_root, part, **{"SOLVER.MAX_ITER": "4"}), cohort=2))
    assert load_checkpoint(part / "checkpoint_last.pth")["iteration"] == 4
    train(setup_pretrain_cfg(TOY, toy_opts(data_root, part), cohort=2), resume=True)
    assert train_losses(full) == train_losses(part)
    a = load_checkpoint(full / "checkpoint_last.pth")["model"]
    b = load_checkpoint(part / "checkpoint_last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_round_trip(data_root, tmp_path):
    from mcl_det.pretrain.checkpoint import load_model_state
    from mcl_det.pretrain.models import build_cohort

    out = tmp_path / "rt"
    cfg = setup_pretrain_cfg(TOY, toy_opts(data_root, out, **{"SOLVER.MAX_ITER": "1"}), cohort=2)
    train(cfg)
    ck = load_checkpoint(out / "checkpoint_last.pth")
    assert ck["archs"] == cfg.MODEL.ARCHS
    model = build_cohort(cfg)
    load_model_state(model, ck)
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
    assert int(model.queue_ptr) == 8


@pytest.mark.parametrize("negatives", ["bank", "batch"])
def test_supervised_variants_run_and_report_top1(data_root, tmp_path, negatives):
    out = tmp_path / negatives
    opts = toy_opts(
        data_root,
        out,
        MODE="supervised",
        **{
            "SUP.NEGATIVES": negatives,
            "SUP.SAMPLES_PER_CLASS": "2",
            "LOSS.TAU": "0.07",
            "LOSS.W_VCL": "0.1",
            "LOSS.W_ICL": "0.1",
            "SOLVER.EPOCHS": "1",
            "MONITOR.EVAL_PERIOD": "1",
            "SOLVER.BASE_LR": "0.1",
        },
    )
    cfg = setup_pretrain_cfg(TOY, opts, cohort=2)
    summary = train(cfg)
    assert summary["member_metrics"][0]["name"] == "top1"
    ev = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert 0 <= ev[-1]["ensemble_top1"] <= 100
    ck = load_checkpoint(out / "checkpoint_last.pth")
    assert "members.0.encoder.fc.weight" in ck["model"]
    if negatives == "bank":
        banks = ck["model"]["banks"]
        assert banks.shape == (2, 24, 16)
        assert torch.allclose(banks.norm(dim=2), torch.ones(2, 24), atol=1e-4)


def test_bank_indices_positive_same_class_negatives_other_class():
    from mcl_det.pretrain.models import class_blocks, sample_bank_indices

    targets = [0] * 3 + [1] * 5 + [2] * 4
    start, count = class_blocks(targets)
    t = torch.tensor(targets)
    idx = torch.arange(12)
    for _ in range(5):
        pos, neg = sample_bank_indices(t, idx, start, count, 7)
        assert torch.equal(t[pos], t) and bool((pos != idx).all())
        assert neg.shape == (12, 7) and bool((t[neg] != t.unsqueeze(1)).all())
        assert int(neg.min()) >= 0 and int(neg.max()) < 12


def test_unreadable_images_are_skipped_and_counted(data_root, tmp_path):
    import shutil

    from mcl_det.pretrain.data import SafeImageFolder

    root = tmp_path / "bad"
    shutil.copytree(data_root / "train", root)
    (root / "n00000001" / "broken.JPEG").write_bytes(b"not an image")
    ds = SafeImageFolder(root)
    assert ds.num_skipped == 1 and len(ds) == 24
    assert ds.skipped[0].endswith("broken.JPEG")


# ---------------------------------------------------------------------- CLI / bad input


def _cli(*args, cwd=ROOT):
    return run_tool(ROOT / "pretrain" / "main.py", *args, cwd=cwd, timeout=300, OMP_NUM_THREADS="1")


def _assert_user_error(r, fragment):
    line = one_error_line(r)
    assert fragment in line, line


@pytest.mark.slow
def test_cli_bad_inputs(data_root, tmp_path):
    out = ["OUTPUT_DIR", str(tmp_path / "out")]  # not the toy default inside the checkout
    _assert_user_error(
        _cli("--cohort", "2", "DATA.ROOT", str(tmp_path / "nope"), *out), "not found"
    )
    (tmp_path / "empty" / "train").mkdir(parents=True)
    _assert_user_error(_cli("DATA.ROOT", str(tmp_path / "empty"), *out), "no images")
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "checkpoint_last.pth").write_bytes(b"garbage")
    _assert_user_error(_cli("--resume", *toy_opts(data_root, out)), "corrupt")


@pytest.mark.slow
def test_cli_nan_loss_keeps_last_good_checkpoint(data_root, tmp_path):
    out = tmp_path / "nan"
    r = _cli(*toy_opts(data_root, out, **{"SOLVER.MAX_ITER": "1"}))
    assert r.returncode == 0, r.stderr[-2000:]
    good = sha256_file(out / "checkpoint_last.pth")
    r = _cli("--resume", *toy_opts(data_root, out, **{"SOLVER.BASE_LR": "1e30"}))
    _assert_user_error(r, "loss is nan")
    assert sha256_file(out / "checkpoint_last.pth") == good


def test_linear_eval_frozen_backbone(data_root, tmp_path):
    from mcl_det.pretrain.linear_eval import load_member_backbone, run_linear_eval
    from mcl_det.utils.errors import MCLDetError

    out = tmp_path / "le"
    train(setup_pretrain_cfg(TOY, toy_opts(data_root, out, **{"SOLVER.MAX_ITER": "1"}), cohort=2))
    ck = out / "checkpoint_last.pth"
    opts = ["LINEAR.EPOCHS", "2", "LINEAR.IMS_PER_BATCH", "8", "LINEAR.MAX_ITER", "4"]
    res = run_linear_eval(str(ck), 1, None, opts, str(tmp_path / "le_out"))
    assert res["backbone_unchanged"] and res["iterations"] == 4 and 0 <= res["top1"] <= 100
    assert json.loads((tmp_path / "le_out" / "linear_eval.json").read_text())["member"] == 1
    net, arch = load_member_backbone(load_checkpoint(ck), 1)
    ref = load_checkpoint(ck)["model"]["members.1.encoder.layer1.0.conv1.weight"]
    assert arch == "resnet18" and torch.equal(net.layer1[0].conv1.weight, ref)
    with pytest.raises(MCLDetError, match="out of range"):
        run_linear_eval(str(ck), 2, None, opts)


def test_cli_unknown_key_is_one_line_error():
    _assert_user_error(_cli("MODEL.NOPE", "1"), "MODEL.NOPE")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last_switches(data_root, tmp_path, amp):
    out = tmp_path / amp
    opts = toy_opts(data_root, out, **{"SOLVER.MAX_ITER": "2", "MODEL.CHANNELS_LAST": "True"})
    summary = train(setup_pretrain_cfg(TOY, opts, cohort=2, amp=amp))
    assert summary["iteration"] == 2 and summary["loss"] == summary["loss"]  # finite, not NaN
    ck = load_checkpoint(out / "checkpoint_last.pth")
    assert f"AMP: {amp}" in ck["config"]
    if amp == "fp16":  # GradScaler state is saved for resume
        assert ck["scaler"].get("scale", 0) > 0
