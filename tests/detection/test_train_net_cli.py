"""tools/train_net.py as a user runs it: the documented command on toy data, bad input (missing
datasets, weights, unknown keys), an OUTPUT_DIR holding another run, a second concurrent run,
unwritable output paths, SIGTERM mid-training and a SLURM requeue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clitools import (
    file_digests,
    lock_held_elsewhere,
    one_error_line,
    run_tool,
    signal_lock_holders_parent,
)

pytest.importorskip("detectron2")

from mcl_det.data.toy import make_toy_voc  # noqa: E402
from mcl_det.utils.preempt import EXIT_PREEMPTED  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = ROOT / "tools" / "train_net.py"
REPORT = ROOT / "tools" / "report.py"
VOC_MCL = str(ROOT / "detection_configs" / "voc_faster_rcnn_mcl.yaml")
FPN = str(ROOT / "detection_configs" / "toy_voc_faster_rcnn_r18_fpn.yaml")
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

# toy FPN, 2 images of 96 px per step, no periodic checkpoint, no PreciseBN
FAST = """SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER 6 SOLVER.WARMUP_ITERS 1 SOLVER.STEPS (3,)
SOLVER.CHECKPOINT_PERIOD 100 INPUT.MIN_SIZE_TRAIN (96,) INPUT.MIN_SIZE_TEST 96
MODEL.RPN.POST_NMS_TOPK_TRAIN 64 MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32
TEST.PRECISE_BN.ENABLED False SEED 0""".split()


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


def _env(toy_root):
    return {"DETECTRON2_DATASETS": str(toy_root), "OMP_NUM_THREADS": "1"}


def _train_net(toy_root, tmp_path, *opts, flags=()):
    args = ["--config-file", FPN, "--num-gpus", "0", *flags, *FAST, *opts]
    return run_tool(TRAIN_NET, *args, cwd=tmp_path, timeout=600, **_env(toy_root))


def test_existing_run_refused_then_overwrite_conflict(toy_root, tmp_path):
    out = tmp_path / "run"
    (out / "seed1").mkdir(parents=True)
    (out / "seed1" / "results.json").write_text('{"finished": true}')
    (out / "model_final.pth").write_bytes(b"earlier weights")
    before = file_digests(out)
    line = one_error_line(_train_net(toy_root, tmp_path, "OUTPUT_DIR", out))
    assert "already holds another run's outputs" in line and "model_final.pth" in line
    assert "--resume" in line and "--overwrite" in line
    line = one_error_line(_train_net(toy_root, tmp_path, flags=["--resume", "--overwrite"]))
    assert "--resume and --overwrite" in line
    assert file_digests(out) == before  # nothing of the earlier run touched


@pytest.mark.slow  # the path check itself is unit-tested in test_rundir.py
def test_output_dir_under_a_file_or_unwritable(toy_root, tmp_path):
    from test_rundir import unwritable_dir

    (tmp_path / "afile").write_text("x")
    line = one_error_line(_train_net(toy_root, tmp_path, "OUTPUT_DIR", tmp_path / "afile" / "o"))
    assert "OUTPUT_DIR" in line and "afile is a regular file" in line
    ro = unwritable_dir(tmp_path)
    line = one_error_line(_train_net(toy_root, tmp_path, "OUTPUT_DIR", ro / "o"))
    assert "not writable" in line


@pytest.mark.slow  # the lock itself is unit-tested in test_rundir.py
def test_second_concurrent_run_names_the_first_pid(toy_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with lock_held_elsewhere(out) as pid:
        line = one_error_line(_train_net(toy_root, tmp_path, "OUTPUT_DIR", out))
        assert f"in use by another run (pid {pid} " in line


def test_report_output_paths_checked_before_reading_runs(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run_tool(REPORT, tmp_path / "nothing", "--output", tmp_path / "afile" / "t.md")
    assert "--output" in one_error_line(r) and "afile is a regular file" in r.stderr
    r = run_tool(REPORT, tmp_path / "nothing", "--plot", tmp_path)
    assert "--plot" in one_error_line(r) and "is a folder" in r.stderr


# ----------------------------------------------------------------------------- preemption


def _weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def uninterrupted(toy_root, tmp_path_factory):
    """model_final.pth of the run the interrupted ones must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    r = _train_net(toy_root, tmp, "OUTPUT_DIR", tmp / "ref")
    assert r.returncode == 0, r.stderr[-3000:]
    return _weights(tmp / "ref" / "model_final.pth")


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wait_for_training(out: Path, proc, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while "Starting training" not in _read(out / "log.txt"):
        assert proc.poll() is None, "the run ended before training started"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.2)
    time.sleep(1.0)  # inside the loop: handlers armed


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_auto_resume_is_exact(toy_root, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = ["--config-file", FPN, "--num-gpus", "0", "--auto-resume", "--exact-resume", *FAST]
    cmd = [sys.executable, str(TRAIN_NET), *args, "OUTPUT_DIR", str(out)]
    env = {**os.environ, **_env(toy_root)}
    env.pop("MCL_DET_DEBUG", None)
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    _wait_for_training(out, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("preempted: stopped by SIGTERM: checkpoint "), last
    ckpt = Path(last.split("checkpoint ")[1].split(" written")[0])
    assert ckpt.is_file() and not (out / "model_final.pth").exists()
    assert (out / "last_checkpoint").read_text().strip() == ckpt.name

    r = run_tool(TRAIN_NET, *args, "OUTPUT_DIR", out, cwd=tmp_path, timeout=600, **_env(toy_root))
    assert r.returncode == 0, r.stderr[-3000:]
    k = int(ckpt.stem.split("_")[1])
    assert f"Starting training from iteration {k + 1}" in r.stdout + r.stderr
    assert json.loads((out / "results.json").read_text())["iteration"] == 6
    assert _same(_weights(out / "model_final.pth"), uninterrupted)  # bit-exact on CPU


@pytest.mark.slow
def test_submitit_job_requeued_on_preemption_finishes_with_same_weights(
    toy_root, tmp_path, uninterrupted, monkeypatch
):
    pytest.importorskip("submitit")
    from mcl_det.cli import submit

    for k, v in _env(toy_root).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the job unpickles this checkout's mcl_det
    out = tmp_path / "run"
    ours = f"detect --cluster local --gpus-per-node 0 --time 20 --job-dir {tmp_path / 'jobs'}"
    stage = ["--config-file", FPN, "--exact-resume", *FAST, "OUTPUT_DIR", str(out)]
    a = submit.parse_args([*ours.split(), "--", *stage])
    job = submit.build_executor(a).submit(submit.stage_job(a))

    class _Proc:  # the train_net child of the job, as named by its OUTPUT_DIR lock
        def poll(self):
            return None if not job.done() else 1

    _wait_for_training(out, _Proc())
    signal_lock_holders_parent(out, signal.SIGUSR2)  # SLURM's time-limit / preemption signal
    assert job.result() == 0
    log = job.stdout()
    assert "attempt 1:" in log and "attempt 2:" in log, log[-3000:]
    assert "Requeued job" in (job.stderr() or "") + log
    assert _same(_weights(out / "model_final.pth"), uninterrupted)
