"""The run layer every command shares (mcl_det/cli/run.py): the run-mode flags, the output folder,
the launcher's exit codes with tiny spawned workers, and every command's ``python -m`` entry."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from clitools import lock_held_elsewhere, one_error_line, run_tool

from mcl_det.cli.run import add_run_mode_flags, claim_output_dir, run_mode
from mcl_det.submit import StageJob
from mcl_det.utils.errors import MCLDetError
from mcl_det.utils.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED

COMMANDS = ("pretrain", "train_net", "convert_to_d2", "report", "submit", "make_toy_data")
COMMANDS += ("linear_eval",)

# ----------------------------------------------------------------------------- run-mode flags


def _mode(argv: list[str], resume_help: str | None = "continue") -> str:
    p = argparse.ArgumentParser()
    if resume_help is None:  # a parser with its own --resume, as detectron2's
        p.add_argument("--resume", action="store_true")
    add_run_mode_flags(p, resume_help=resume_help)
    return run_mode(p.parse_args(argv))


@pytest.mark.parametrize("resume_help", ["continue", None])
def test_each_flag_is_one_mode(resume_help):
    assert _mode([], resume_help) == "new"
    assert _mode(["--resume"], resume_help) == "resume"
    assert _mode(["--auto-resume"], resume_help) == "auto"
    assert _mode(["--overwrite"], resume_help) == "overwrite"


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--resume", "--overwrite"], "--resume and --overwrite"),
        (["--overwrite", "--auto-resume"], "--auto-resume and --overwrite"),
        (
            ["--overwrite", "--auto-resume", "--resume"],
            "--resume and --auto-resume and --overwrite",
        ),
    ],
)
def test_two_flags_contradict_each_other(flags, named):
    with pytest.raises(MCLDetError) as e:
        _mode(flags)
    assert str(e.value) == f"{named} contradict each other; pass one of them"


# ----------------------------------------------------------------------------- the output folder


def test_owner_holds_the_folder_until_the_block_ends(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("{}\n")
    stale = out / ".log.jsonl.abcd1234.tmp"
    stale.write_text("half")
    with pytest.raises(MCLDetError, match="already holds another run's outputs"):
        claim_output_dir(out, "new", ["log.jsonl"])
    with claim_output_dir(out, "resume", ["log.jsonl"]) as run:
        assert run.resume and not stale.exists()
        assert f"removed a stale temporary file: {stale}" in capsys.readouterr().err
        with pytest.raises(MCLDetError, match="in use by another run"):
            claim_output_dir(out, "resume", ["log.jsonl"])
    with claim_output_dir(out, "resume", ["log.jsonl"]):  # released: free again
        pass


def test_other_ranks_only_check_the_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("{}\n")
    with lock_held_elsewhere(out):  # the owner (rank 0, machine 0) holds it
        for mode, resume in (("new", False), ("resume", True), ("auto", True)):
            with claim_output_dir(out, mode, ["log.jsonl"], owner=False) as run:
                assert run.resume is resume
    (tmp_path / "afile").write_text("")
    with pytest.raises(MCLDetError, match="is a regular file"):
        claim_output_dir(tmp_path / "afile" / "run", "new", [], owner=False)


# ----------------------------------------------------------------------------- the launcher

# Two local workers (mcl_det.pretrain.distributed.launch, as --num-gpus 2 uses); each behaves as
# BEHAVIOUR says for its rank. Run as a command would be: run_main around launch.
LAUNCHER = """
import os, signal, sys, time
from pathlib import Path
from mcl_det.cli.run import launch, run_main
from mcl_det.pretrain import distributed as du
from mcl_det.utils import preempt
from mcl_det.utils.errors import MCLDetError

def body(behaviour, folder):
    rank = int(os.environ["RANK"])
    what = behaviour.split(",")[rank]
    if what == "ok":
        return
    if what == "wait":  # until stopped from outside (a signal forwarded by the launcher)
        with preempt.handle_preemption() as stop, stop.deferred():
            Path(folder, f"ready{{rank}}").write_text("")
            while not stop.requested():
                time.sleep(0.02)
            raise stop.preempted(f"checkpoint of rank {{rank}} written")
    if what == "sleep":
        time.sleep(60)
    if what == "preempted":
        raise preempt.Preempted("stopped by SIGTERM: checkpoint written")
    if what == "usererror":
        raise MCLDetError(f"rank {{rank}} found a bad thing; fix it")
    if what == "ctrlc":
        raise KeyboardInterrupt
    if what == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "crash":
        raise ValueError("a bug")
    if what == "exit3":
        sys.exit(3)

if __name__ == "__main__":
    behaviour, folder = sys.argv[1], sys.argv[2]
    run_main(lambda: launch(du.launch, body, 2, (behaviour, folder), output_dir="OUT/run"))
"""


def _launcher(tmp_path: Path) -> Path:
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(LAUNCHER.format()))
    return script


def _launch(tmp_path: Path, behaviour: str) -> subprocess.CompletedProcess:
    return run_tool(_launcher(tmp_path), behaviour, tmp_path, cwd=tmp_path, OMP_NUM_THREADS="1")


def _lines(stderr: str) -> list[str]:
    """stderr without the line torch.multiprocessing logs when it stops the other workers."""
    return [x for x in stderr.strip().splitlines() if "Terminating process" not in x]


def test_workers_that_finish_end_the_command_with_0(tmp_path):
    r = _launch(tmp_path, "ok,ok")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_a_preempted_worker_is_exit_75(tmp_path):
    r = _launch(tmp_path, "preempted,preempted")
    assert r.returncode == EXIT_PREEMPTED, r.stderr
    assert "Traceback" not in r.stderr
    assert _lines(r.stderr) == [
        "preempted: stopped by SIGTERM: checkpoint written",  # rank 0 only
        "preempted: worker processes stopped with a checkpoint in OUT/run",
    ], r.stderr


def test_a_worker_killed_by_sigkill_is_one_line_naming_its_rank_and_signal(tmp_path):
    line = one_error_line(_launch(tmp_path, "sleep,sigkill"))
    assert line.startswith("error: worker rank 1 was killed by SIGKILL; "), line
    assert "OUT/run" in line and "--auto-resume" in line


def test_a_user_error_in_a_worker_is_its_one_line_and_exit_2(tmp_path):
    line = one_error_line(_launch(tmp_path, "ok,usererror"))
    assert line == "error: rank 1 found a bad thing; fix it"


@pytest.mark.slow
def test_ctrl_c_in_a_worker_is_interrupted_130(tmp_path):
    r = _launch(tmp_path, "ctrlc,ok")
    assert r.returncode == EXIT_INTERRUPTED, r.stderr
    assert _lines(r.stderr) == ["interrupted"]


@pytest.mark.slow
def test_a_crash_shows_its_traceback_then_one_line_naming_rank_and_exit_code(tmp_path):
    r = _launch(tmp_path, "crash,ok")
    assert r.returncode == 2, r.stderr
    assert "ValueError: a bug" in r.stderr  # a bug: its traceback is what a report needs
    errs = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errs) == 1 and errs[0].startswith("error: worker rank 0 failed with exit code 1")
    r = _launch(tmp_path, "ok,exit3")
    assert one_error_line(r).startswith("error: worker rank 1 failed with exit code 3")


@pytest.mark.slow
def test_stop_signals_are_passed_on_to_the_workers(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MCL_DET_DEBUG", None)
    cmd = [sys.executable, str(_launcher(tmp_path)), "wait,wait", str(tmp_path)]
    p = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
    try:
        t0 = time.monotonic()
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert p.poll() is None and time.monotonic() - t0 < 120, p.stderr.read()
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)  # to the launcher only, as a scheduler does
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == EXIT_PREEMPTED, err
    lines = _lines(err)
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith("preempted: stopped by SIGUSR1: checkpoint of rank 0 written; ")
    assert lines[1] == "preempted: worker processes stopped with a checkpoint in OUT/run"


# ----------------------------------------------------------------------------- the commands


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_as_a_module(command, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", f"mcl_det.cli.{command}", "--help"],
        cwd=tmp_path,  # not the checkout: the installed (or PYTHONPATH) package
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: "), r.stdout[:500]


def test_stage_jobs_run_the_commands_as_modules_where_they_were_submitted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    py = sys.executable
    job = StageJob("pretrain", ["OUTPUT_DIR", "out"])
    assert job.cwd == str(tmp_path)
    assert job.command() == [py, "-m", "mcl_det.cli.pretrain", "--auto-resume", "OUTPUT_DIR", "out"]
    job = StageJob("pretrain", ["X", "1"], nodes=2, gpus_per_node=4, port=12345, cwd="/w")
    assert job.cwd == "/w"
    assert job.command(1, "h0") == [
        *(py, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1"),
        *("--nproc_per_node=4", "--master_addr=h0", "--master_port=12345"),
        *("-m", "mcl_det.cli.pretrain", "--auto-resume", "X", "1"),
    ]
    job = StageJob("detect", ["X", "1"], nodes=2, gpus_per_node=8, port=23456)
    assert job.command(1, "h0") == [
        *(py, "-m", "mcl_det.cli.train_net", "--auto-resume", "--num-gpus", "8"),
        *("--num-machines", "2", "--machine-rank", "1", "--dist-url", "tcp://h0:23456", "X", "1"),
    ]


def test_pretrain_default_config_is_the_checkouts_toy_config(tmp_path, monkeypatch):
    from mcl_det.cli import pretrain

    assert pretrain.default_config() == str(pretrain.TOY) and pretrain.TOY.is_file()
    assert pretrain.TOY == Path(__file__).resolve().parents[2] / "pretrain/configs/toy.yaml"
    monkeypatch.setattr(pretrain, "TOY", tmp_path / "site-packages" / "pretrain" / "toy.yaml")
    with pytest.raises(MCLDetError, match=r"not with an installed mcl_det\); pass --config-file$"):
        pretrain.default_config()
