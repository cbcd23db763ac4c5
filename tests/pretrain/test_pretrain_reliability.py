"""pretrain/main.py against faults, as a user meets them (each through a subprocess): an
OUTPUT_DIR holding another run, a second concurrent run, unwritable output paths, divergence,
signals inside an iteration and inside a checkpoint write, changed settings on resume, and a
submitit job preempted and requeued."""

from __future__ import annotations

import json
import shutil
import signal
import textwrap
import time
from pathlib import Path

import pytest
import torch
from clitools import (
    file_digests,
    lock_held_elsewhere,
    one_error_line,
    run_tool,
    signal_lock_holders_parent,
)
from PIL import Image
from pretrain_toy import toy_opts

from mcl_det.config import config_changes
from mcl_det.data.toy import make_toy_imagenet
from mcl_det.pretrain.checkpoint import load_checkpoint
from mcl_det.pretrain.config import setup_pretrain_cfg
from mcl_det.pretrain.engine import UNTESTED, train
from mcl_det.utils.errors import MCLDetError
from mcl_det.utils.io import sha256_file
from mcl_det.utils.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "pretrain" / "main.py"
TOY = str(ROOT / "pretrain" / "configs" / "toy.yaml")
LAST = "checkpoint_last.pth"

# Runs pretrain/main.py with a signal sent to itself at a chosen point: HOOK_AT "step:N" (right
# after the N-th optimizer step) or "save:N" (inside the N-th checkpoint write, after the bytes are
# written and before fsync + rename).
HOOKED = """
import os, runpy, signal, sys
import torch

sig = getattr(signal, os.environ["HOOK_SIGNAL"])
where, n = os.environ["HOOK_AT"].split(":")
calls = [0]

def hit():
    calls[0] += 1
    if calls[0] == int(n):
        os.kill(os.getpid(), sig)

if where == "save":
    real_save = torch.save
    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        hit()
    torch.save = save
else:
    real_step = torch.optim.SGD.step
    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        hit()
        return out
    torch.optim.SGD.step = step

sys.argv = [{main!r}, *sys.argv[1:]]
runpy.run_path({main!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    make_toy_imagenet(root, num_classes=4, train_per_class=6, val_per_class=2, size=32)
    return root


def _cli(*args, cwd=ROOT, script=MAIN, **env):
    return run_tool(script, *args, cwd=cwd, timeout=300, OMP_NUM_THREADS="1", **env)


def _hooked(tmp_path, at: str, sig: str, *args):
    script = tmp_path / "hooked_main.py"
    script.write_text(textwrap.dedent(HOOKED.format(main=str(MAIN))))
    return _cli(*args, script=script, HOOK_AT=at, HOOK_SIGNAL=sig)


def _tmp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def two_iterations(data_root, tmp_path_factory):
    """A run stopped after 2 iterations (checkpoint_last.pth at iteration 2), copied per test."""
    out = tmp_path_factory.mktemp("two") / "run"
    train(setup_pretrain_cfg(TOY, toy_opts(data_root, out, **{"SOLVER.MAX_ITER": "2"}), cohort=2))
    return out


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The uninterrupted 6-iteration run the interrupted-and-resumed ones must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(setup_pretrain_cfg(TOY, toy_opts(data_root, out), cohort=2))
    return out


# ----------------------------------------------------------------------------- the output folder


def test_existing_run_refused_and_contradicting_flags(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LAST).write_bytes(b"an earlier run's weights")
    (out / "log.jsonl").write_text('{"type": "train", "iteration": 5}\n')
    before = file_digests(out)
    line = one_error_line(_cli(*toy_opts(data_root, out)))
    assert "already holds another run's outputs" in line and LAST in line and "log.jsonl" in line
    assert "--resume" in line and "--overwrite" in line
    line = one_error_line(_cli("--resume", "--overwrite", *toy_opts(data_root, out)))
    assert "--resume and --overwrite contradict" in line
    assert file_digests(out) == before  # the log is not deleted, the checkpoint not touched


def test_second_concurrent_run_names_the_first_pid(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with lock_held_elsewhere(out) as pid:
        line = one_error_line(_cli(*toy_opts(data_root, out)))
        assert f"in use by another run (pid {pid} " in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written


def test_output_paths_under_a_file_checked_before_any_work(data_root, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_error_line(_cli(*toy_opts(data_root, afile / "run")))
    assert "OUTPUT_DIR" in line and "afile is a regular file" in line
    # linear evaluation: --output-dir checked before the checkpoint is even read
    le = ROOT / "tools" / "linear_eval.py"
    r = _cli(tmp_path / "missing.pth", "--member", "1", "--output-dir", afile / "le", script=le)
    line = one_error_line(r)
    assert "--output-dir" in line and "afile is a regular file" in line
    # the converter: OUTPUT checked before the input is read and converted
    conv = ROOT / "tools" / "convert_to_d2.py"
    line = one_error_line(_cli(tmp_path / "missing.pth", afile / "w.pkl", script=conv))
    assert "OUTPUT" in line and "afile is a regular file" in line
    assert afile.read_text() == "x"


@pytest.mark.slow  # check_output_path itself is unit-tested in test_rundir.py
def test_unwritable_output_dir(data_root, tmp_path):
    from test_rundir import unwritable_dir

    line = one_error_line(_cli(*toy_opts(data_root, unwritable_dir(tmp_path) / "run")))
    assert "OUTPUT_DIR" in line and "not writable" in line


# ----------------------------------------------------------------------------- divergence


def test_nan_keeps_the_last_good_checkpoint_which_resumes_with_a_lower_lr(
    data_root, two_iterations, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(two_iterations, out)
    good = sha256_file(out / LAST)
    # iteration 3 takes a 1e30 step (its loss is still finite) and ends an epoch: its checkpoint
    # holds blown-up weights and must never replace the good one; iteration 4's loss is not finite
    huge = {"SOLVER.BASE_LR": "1e30", "SOLVER.CHECKPOINT_PERIOD": "1"}
    line = one_error_line(_cli("--resume", *toy_opts(data_root, out, **huge)))
    assert "loss is nan at iteration 4" in line or "loss is inf at iteration 4" in line, line
    assert f"{out / LAST} (iteration 2), is kept" in line and "--resume" in line
    assert sha256_file(out / LAST) == good
    assert _tmp_files(out) == []  # the unconfirmed checkpoint of iteration 3 is gone

    stale = out / f".{LAST}.k3j4h5g6.tmp"  # what a kill -9 during a write leaves
    stale.write_bytes(b"half a checkpoint")
    r = _cli("--resume", *toy_opts(data_root, out, **{"SOLVER.BASE_LR": "0.01"}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"removed a stale temporary file: {stale}" in r.stderr and not stale.exists()
    assert "resumed from" in r.stdout and "at iteration 2" in r.stdout
    ck = load_checkpoint(out / LAST)
    assert ck["iteration"] == 6
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    # the changed settings are printed and logged (against the checkpoint's own config)
    changes = ["SOLVER.BASE_LR: 0.03 -> 0.01", "SOLVER.MAX_ITER: 2 -> 0"]
    assert f"settings changed since that checkpoint: {'; '.join(changes)}" in r.stdout
    # one record per resume (the diverged attempt's too); the last one is in effect
    first, second = _records(out, "config_change")
    assert first["iteration"] == 2 and "SOLVER.BASE_LR: 0.03 -> 1e+30" in first["changes"]
    assert second == {"type": "config_change", "iteration": 2, "changes": changes}
    assert [x["iteration"] for x in _records(out, "train")] == [1, 2, 3, 4, 5, 6]


def test_non_finite_gradients_stop_before_the_step(data_root, tmp_path, monkeypatch):
    """A finite loss whose gradients are NaN never reaches the weights or a checkpoint."""
    from mcl_det.pretrain import engine

    real = engine.Trainer._grads_finite
    calls = []

    def poisoned(self):  # the 3rd iteration's gradients hold a NaN
        calls.append(1)
        if len(calls) == 3:
            next(p for p in self.cohort.parameters() if p.grad is not None).grad[0] = float("nan")
        return real(self)

    monkeypatch.setattr(engine.Trainer, "_grads_finite", poisoned)
    out = tmp_path / "run"
    opts = toy_opts(data_root, out, **{"SOLVER.CHECKPOINT_PERIOD": "1"})
    with pytest.raises(MCLDetError, match=r"gradients hold inf/nan .* at iteration 3.*iteration 2"):
        train(setup_pretrain_cfg(TOY, opts, cohort=2))
    assert load_checkpoint(out / LAST)["iteration"] == 2
    assert _tmp_files(out) == []


def test_config_changes_lists_every_differing_key_but_output_dir(data_root, tmp_path):
    a = setup_pretrain_cfg(TOY, toy_opts(data_root, tmp_path / "a"), cohort=2)
    b = setup_pretrain_cfg(
        TOY, toy_opts(data_root, tmp_path / "b", **{"SOLVER.IMS_PER_BATCH": "4"}), cohort=2
    )
    assert config_changes(a.dump(), b) == ["SOLVER.IMS_PER_BATCH: 8 -> 4"]
    assert config_changes(a.dump(), a) == []


def test_supervised_on_one_class_is_an_error(tmp_path):
    d = tmp_path / "data" / "train" / "only"
    d.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(d / f"{i}.png")
    out = tmp_path / "run"
    line = one_error_line(_cli(*toy_opts(tmp_path / "data", out, MODE="supervised")))
    assert "at least 2 classes" in line and "holds 1 (only)" in line
    assert not (out / LAST).exists()


# ----------------------------------------------------------------------------- signals


def test_sigint_during_a_checkpoint_write_is_interrupted(data_root, two_iterations, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_iterations, out)
    good = sha256_file(out / LAST)
    # iteration 3 is the last: its checkpoint goes straight to checkpoint_last.pth
    args = ["--resume", *toy_opts(data_root, out, **{"SOLVER.MAX_ITER": "3"})]
    r = _hooked(tmp_path, "save:1", "SIGINT", *args)
    assert r.returncode == EXIT_INTERRUPTED, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in r.stderr
    assert "disk" not in r.stderr
    assert sha256_file(out / LAST) == good and _tmp_files(out) == []


def _stopped_after(r) -> int:
    assert r.returncode == EXIT_PREEMPTED, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("preempted: stopped by SIGTERM: checkpoint "), last
    assert "--auto-resume" in last
    return int(last.split("written after iteration ")[1].split(";")[0])


def test_sigterm_mid_run_checkpoints_exits_75_and_auto_resume_is_exact(
    data_root, reference, tmp_path
):
    out = tmp_path / "run"  # does not exist: --auto-resume starts fresh
    args = ["--auto-resume", *toy_opts(data_root, out)]
    assert _stopped_after(_hooked(tmp_path, "step:4", "SIGTERM", *args)) == 4
    assert load_checkpoint(out / LAST)["iteration"] == 4 and _tmp_files(out) == []
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at iteration 4" in r.stdout and "settings changed" not in r.stdout
    assert _same_weights(out / LAST, reference / LAST)  # bit-exact on CPU
    losses = [(x["iteration"], x["loss"]) for x in _records(out, "train")]
    assert losses == [(x["iteration"], x["loss"]) for x in _records(reference, "train")]


@pytest.mark.slow
def test_sigterm_during_a_periodic_checkpoint_write(data_root, reference, tmp_path):
    """The write finishes, the checkpoint is put in place, exit 75; it resumes exactly."""
    out = tmp_path / "run"
    args = ["--auto-resume", *toy_opts(data_root, out, **{"SOLVER.CHECKPOINT_PERIOD": "2"})]
    assert _stopped_after(_hooked(tmp_path, "save:1", "SIGTERM", *args)) == 2
    assert load_checkpoint(out / LAST)["iteration"] == 2 and _tmp_files(out) == []
    r = _cli(*args)
    assert r.returncode == 0 and "at iteration 2" in r.stdout, r.stderr[-3000:]
    assert _same_weights(out / LAST, reference / LAST)


def test_auto_resume_refuses_another_runs_folder(data_root, two_iterations, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_iterations, out)
    before = file_digests(out)
    line = one_error_line(_cli("--auto-resume", *toy_opts(data_root, out)))
    assert "another config (SOLVER.MAX_ITER: 2 -> 0)" in line
    assert file_digests(out) == before


# ----------------------------------------------------------------------------- clusters


@pytest.mark.slow
def test_submitit_job_requeued_on_preemption_finishes_with_same_weights(
    data_root, reference, tmp_path, monkeypatch
):
    pytest.importorskip("submitit")
    from mcl_det.cli import submit

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the job unpickles this checkout's mcl_det
    monkeypatch.delenv("MCL_DET_DEBUG", raising=False)
    out = tmp_path / "run"
    ours = f"pretrain --cluster local --gpus-per-node 0 --time 20 --job-dir {tmp_path / 'jobs'}"
    a = submit.parse_args([*ours.split(), "--", *toy_opts(data_root, out)])
    job = submit.build_executor(a).submit(submit.stage_job(a))
    t0 = time.monotonic()
    while not _read(out / "log.jsonl"):  # the first iteration is done: inside the loop
        assert not job.done(), job.stderr()
        assert time.monotonic() - t0 < 240
        time.sleep(0.05)
    signal_lock_holders_parent(out, signal.SIGUSR2)  # SLURM's time-limit / preemption signal
    assert job.result() == 0
    log = job.stdout()
    assert "attempt 1:" in log and "attempt 2:" in log, log[-3000:]
    assert "Requeued job" in (job.stderr() or "") + log
    assert "resumed from" in log  # stopped inside the loop with a checkpoint, not from scratch
    assert _same_weights(out / LAST, reference / LAST)


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def test_untested_name_is_a_stale_temporary_name(tmp_path):
    """A checkpoint awaiting confirmation that a kill -9 leaves is removed at the next start."""
    from mcl_det.utils.rundir import remove_stale_tmp

    (tmp_path / UNTESTED.format(LAST)).write_bytes(b"x")
    assert [p.name for p in remove_stale_tmp(tmp_path)] == [UNTESTED.format(LAST)]
