"""The whole toolkit end to end at toy scale: the demo's four stages, through the real CLIs."""

import json
from pathlib import Path

import pytest
from clitools import run_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    args = ["--output", out, "--data", data, "--pretrain-epochs", "1", "--det-iters", "6"]
    r = run_tool(ROOT / "tools" / "demo.py", *args, timeout=900, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # stage 1: one checkpoint per cohort holding both members
    import torch

    for tag in ("mcl", "baseline"):
        ckpt = torch.load(out / f"pretrain_{tag}" / "checkpoint_last.pth", weights_only=False)
        assert ckpt["format"] == "mcl_det.pretrain/v1" and len(ckpt["archs"]) == 2
        assert any(k.startswith("members.1.encoder.") for k in ckpt["model"])
        assert (out / f"pretrain_{tag}" / "config.yaml").is_file()
    # the baseline is the same cohort with every interaction weight at 0
    base_cfg = (out / "pretrain_baseline" / "config.yaml").read_text()
    assert "W_ICL: 0.0" in base_cfg and "W_SOFT_VCL: 0.0" in base_cfg
    # stage 2: detectron2 weights + the settings they need
    for tag in ("mcl", "baseline"):
        assert (out / "weights" / f"{tag}_member0.pkl").is_file()
        assert "RGB" in (out / "weights" / f"{tag}_member0.yaml").read_text()
    # stage 3: results.json per fine-tuning run, trained from the converted weights
    for tag in ("mcl", "baseline"):
        res = json.loads((out / f"det_{tag}" / "seed0" / "results.json").read_text())
        assert not (out / f"det_{tag}" / "seed0" / "model_final.pth").exists()  # consumed
        assert res["finished"] and res["task"] == "voc" and res["weights_tag"] == tag
        assert res["weights"].endswith(f"{tag}_member0.pkl") and res["iteration"] == 6
        assert set(res["metrics"]["bbox"]) >= {"AP", "AP50", "AP75"}
    # stage 4: the AP table compares MCL with the baseline
    report = (out / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")]
    assert "baseline" in rows and "mcl" in rows and "Δ AP50" in report
