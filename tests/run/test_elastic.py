"""A dead rank never hangs a run, and restarts resume it exactly (mcl_det/utils/elastic.py):
the collectives' timeout and NCCL's error handling, torchrun restarts continuing by
--auto-resume's rules, run locks that die with their holder, and two chaos runs (slow): three
SIGKILLs under ``torchrun --max-restarts 3``, one under ``--num-gpus 2``."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from clitools import ROOT, one_error_line

from mcl_det.cli.run import add_run_mode_flags, run_mode
from mcl_det.data.toy import make_toy_imagenet
from mcl_det.pretrain import distributed as du
from mcl_det.pretrain.config import setup_pretrain_cfg
from mcl_det.utils import elastic
from mcl_det.utils.errors import MCLDetError
from mcl_det.utils.rundir import lock_run_dir

LAST = "checkpoint_last.pth"


@functools.cache
def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_elastic", ROOT / "benchmarks" / "bench_elastic.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- collectives


class _Joined(Exception):
    pass


@pytest.fixture
def two_process_env(monkeypatch):
    """This process as rank 0 of 2 started by our own launcher (not torchrun)."""
    for k in ("TORCHELASTIC_RUN_ID", elastic.ASYNC_ERROR_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    seen = {}

    def fake_init(*args, **kwargs):
        seen.update(kwargs, env=os.environ.get(elastic.ASYNC_ERROR_ENV))
        raise _Joined

    monkeypatch.setattr(du.dist, "init_process_group", fake_init)
    return seen


def test_the_timeout_and_teardown_on_error_reach_the_process_group(two_process_env):
    with pytest.raises(_Joined):
        du.init_distributed("cpu", 42)
    assert two_process_env["timeout"] == timedelta(seconds=42)
    assert two_process_env["env"] == elastic.ASYNC_ERROR_TEARDOWN == "1"


def test_a_users_nccl_error_handling_is_kept(two_process_env, monkeypatch):
    monkeypatch.setenv(elastic.ASYNC_ERROR_ENV, "3")
    with pytest.raises(_Joined):
        du.init_distributed("cpu")
    assert two_process_env["timeout"] == timedelta(seconds=elastic.DEFAULT_TIMEOUT_S)
    assert two_process_env["env"] == "3"


def test_the_timeout_is_a_config_key_checked_at_setup():
    assert setup_pretrain_cfg(None, []).DIST.TIMEOUT_S == elastic.DEFAULT_TIMEOUT_S
    assert setup_pretrain_cfg(None, ["DIST.TIMEOUT_S", "60"]).DIST.TIMEOUT_S == 60
    with pytest.raises(MCLDetError, match="DIST.TIMEOUT_S must be > 0 seconds, got 0"):
        setup_pretrain_cfg(None, ["DIST.TIMEOUT_S", "0"])


def test_detection_has_the_same_timeout_outside_its_digest():
    pytest.importorskip("detectron2")
    from mcl_det.detection.config import config_digest, get_detection_cfg

    cfg = get_detection_cfg()
    assert cfg.MCL_DET.DIST_TIMEOUT_S == elastic.DEFAULT_TIMEOUT_S
    before = config_digest(cfg)
    cfg.MCL_DET.DIST_TIMEOUT_S = 60
    assert config_digest(cfg) == before  # the timeout changes no result


# ----------------------------------------------------------------------------- restarts


def _mode(argv: list[str]) -> str:
    p = argparse.ArgumentParser()
    add_run_mode_flags(p)
    return run_mode(p.parse_args(argv))


def test_a_restarted_torchrun_group_continues_by_auto_resume_rules(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(elastic.RESTART_ENV, raising=False)
    assert [_mode([]), _mode(["--overwrite"])] == ["new", "overwrite"]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(elastic.RESTART_ENV, "0")  # torchrun's first attempt
    assert _mode([]) == "new"
    monkeypatch.setenv(elastic.RESTART_ENV, "2")
    # new would refuse this run's own outputs, --overwrite would delete its checkpoints
    assert [_mode([]), _mode(["--overwrite"]), _mode(["--auto-resume"])] == ["auto"] * 3
    assert _mode(["--resume"]) == "resume"
    err = capsys.readouterr().err
    assert "torchrun restart 2: continuing the run from its last complete checkpoint" in err


# ----------------------------------------------------------------------------- the lock

# takes the run lock, forks a child (as a DataLoader worker is forked) that outlives it, prints
# the child's pid and is killed with SIGKILL
FORKING_HOLDER = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[2])
from mcl_det.utils.rundir import lock_run_dir
lock_run_dir(sys.argv[1])
child = os.fork()
if child == 0:  # off the pipes the test reads to their end
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_forked_child_never_keeps_a_dead_holders_lock(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FORKING_HOLDER), str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    child = int(r.stdout.strip())
    try:
        assert Path(f"/proc/{child}").exists()  # the holder's child still runs...
        os.close(lock_run_dir(tmp_path))  # ...and the lock died with the holder
    finally:
        os.kill(child, signal.SIGKILL)


# ----------------------------------------------------------------------------- chaos


def _final_state(out: Path) -> dict:
    ck = torch.load(out / LAST, weights_only=True, map_location="cpu")
    return {"iteration": ck["iteration"], "model": ck["model"], "optimizer": ck["optimizer"]}


def _tensors(x, where=""):
    if isinstance(x, torch.Tensor):
        yield where, x
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            yield from _tensors(x[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _tensors(v, f"{where}[{i}]")


def _assert_same_state(a: Path, b: Path) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa["iteration"] == sb["iteration"]
    ta, tb = dict(_tensors(sa)), dict(_tensors(sb))
    assert ta.keys() == tb.keys() and len(ta) > 100
    assert any(k.startswith(".optimizer.state") for k in ta)  # momentum buffers compared too
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert differ == []


def _train_losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["loss"]) for r in recs if r["type"] == "train"]


@pytest.mark.slow
def test_torchrun_max_restarts_survives_three_sigkills_bit_exactly(tmp_path):
    bench = _bench()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_elastic.py"), "--seed", "0"]
    cmd += ["--work-dir", str(tmp_path), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["plan"] == [{"iteration": i, "rank": k} for i, k in bench.kill_plan(3, 0)]
    assert res["faults_survived"] == 3 and res["exit_code"] == 0
    for f in res["faults"]:  # each restart continued from a checkpoint, not from scratch
        assert 0 < f["resumed_from_iteration"] <= f["reached_iteration"]
    log = (tmp_path / "chaos.log").read_text()
    assert [f"torchrun restart {n}:" in log for n in (1, 2, 3)] == [True] * 3
    assert "torchrun restart 4:" not in log
    _assert_same_state(tmp_path / "chaos", tmp_path / "reference")
    assert _train_losses(tmp_path / "chaos") == _train_losses(tmp_path / "reference")


def _num_gpus_2(data: Path, out: Path, *flags: str) -> list[str]:
    args = [sys.executable, "-m", "mcl_det.cli.pretrain", "--num-gpus", "2", "--cohort", "2"]
    return [*args, *flags, *_bench().run_opts(data, out)]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MCL_DET_DEBUG", None)
    return env


def _workers(pid: int) -> list[int]:
    """The spawned worker processes of the command ``pid`` in start order (rank order)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (d / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(d.name))
    return sorted(found)


@pytest.mark.slow
def test_num_gpus_2_a_killed_worker_stops_the_run_and_auto_resume_is_exact(tmp_path):
    data = tmp_path / "data"
    make_toy_imagenet(data, num_classes=2, train_per_class=16, val_per_class=1, size=32)
    ref = subprocess.run(
        _num_gpus_2(data, tmp_path / "ref"), capture_output=True, text=True, env=_env()
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "run"
    p = subprocess.Popen(
        _num_gpus_2(data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(),
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        while _last_iteration(out) < 6:  # past the first checkpoint (iteration 3, confirmed)
            assert p.poll() is None and time.monotonic() - t0 < 300, p.stderr.read()
            time.sleep(0.02)
        workers = _workers(p.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=180)  # the other worker is stopped, not left
    finally:
        p.kill()
        p.wait()
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    line = one_error_line(r)
    assert line.startswith("error: worker rank 1 was killed by SIGKILL; "), line
    assert str(out) in line and "--auto-resume" in line
    os.close(lock_run_dir(out))  # released

    again = subprocess.run(
        _num_gpus_2(data, out, "--auto-resume"), capture_output=True, text=True, env=_env()
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    _assert_same_state(out, tmp_path / "ref")
    assert _train_losses(out) == _train_losses(tmp_path / "ref")


def _last_iteration(out: Path) -> int:
    return _bench().last_iteration(out)
