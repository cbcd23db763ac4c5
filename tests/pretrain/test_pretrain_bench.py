"""The two pretraining benchmarks run at tiny size on CPU and write the JSON they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script, out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", "--out", str(out)]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert json.loads(r.stdout[r.stdout.index("{") :]) == data  # printed == written
    return data


def test_gpu_pretrain_runs_tiny_on_cpu(tmp_path):
    args = "--arch resnet18 --batch 4 --size 32 --queue 16 --iters 2 --warmup 1".split()
    d = _run("gpu_pretrain.py", tmp_path / "g.json", *args)
    assert d["cohort"] == 2 and d["amp"] == "bf16" and d["channels_last"] is True
    assert d["images_per_s"] > 0 and d["peak_rss_gib"] > 0 and d["final_loss"] == d["final_loss"]


@pytest.mark.slow
def test_bench_cohort_step_runs_tiny_on_cpu(tmp_path):
    args = "--size 32 --batch 8 --queue 64 --iters 1 --warmup 1 --threads 1".split()
    d = _run("bench_cohort_step.py", tmp_path / "b.json", *args)
    for k in ("step_time_ratio", "peak_mem_ratio", "mcl_terms_share_of_cohort_step"):
        assert d[k] > 0
    assert d["peak_mem_mib_cohort"] > d["peak_mem_mib_single"] > 0


def test_bench_data_feed_runs_tiny_on_cpu(tmp_path):
    """The GPU feed benchmark's code path (Trainer, loader workers reading generated JPEGs,
    device stage, training step; synthetic views through the same step) at smoke size."""
    d = _run("bench_data.py", tmp_path / "f.json", "--tiny")
    assert d["mode"] == "feed" and d["pipeline"] == "device" and d["workers"] == 2
    assert d["model"].startswith("2 x resnet18") and d["batch"] == 8 and d["image_size"] == 64
    # consistency, whatever the machine's speed: every rate and the ratio follow from the stored
    # image count and times (the rounded rates alone cannot give the ratio to 3 places)
    n, real_s, synthetic_s = d["timed_images"], d["real_jpegs_timed_s"], d["synthetic_timed_s"]
    assert (
        n == d["batch"] * d["timed_steps"]
        and real_s > 0
        and synthetic_s > 0
        and 0 <= d["real_data_wait_s"] <= real_s
    )
    real, synthetic = n / real_s, n / synthetic_s
    assert d["real_jpegs_images_per_s"] == round(real, 1)
    assert d["synthetic_images_per_s"] == round(synthetic, 1)
    assert d["real_over_synthetic"] == round(real / synthetic, 3)
    assert d["meets_target"] == (real / synthetic >= 0.9) and d["target"] == ">= 0.9"
