"""Clean stops: SIGTERM/SIGUSR1 handlers with a polled flag, exit codes of run_main, and Ctrl-C
inside a checkpoint write (reported as "interrupted", never as a full disk)."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest
import torch
from clitools import run_tool

from mcl_det.utils import preempt
from mcl_det.utils.errors import MCLDetError
from mcl_det.utils.io import atomic_torch_save, sha256_file


def test_flag_deferred_inside_immediate_outside_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    with preempt.handle_preemption() as stop:
        assert preempt.current() is stop and not stop.requested()
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)  # handled before kill returns (main thread)
            assert stop.requested() and stop.requested(sync=True)  # no process group: local
            assert stop.signal_name == "SIGUSR1"
            e = stop.preempted("checkpoint c.pth written after iteration 3")
            assert isinstance(e, preempt.Preempted) and not isinstance(e, Exception)
            assert "SIGUSR1" in str(e) and "c.pth" in str(e) and "--auto-resume" in str(e)
        with pytest.raises(preempt.Preempted, match="outside a training step"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before and preempt.current() is None


SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
from mcl_det.cli.run import run_main
from mcl_det.utils.io import atomic_torch_save
from mcl_det.utils import preempt

class InterruptWhilePickled:
    def __reduce__(self):  # runs inside torch.save, half-way through the archive
        os.kill(os.getpid(), signal.{sig})
        return (dict, ())

def main():
    path = {path!r}
    with preempt.handle_preemption():
        atomic_torch_save({{"w": torch.zeros(100000), "x": InterruptWhilePickled()}}, path)
    return 0

run_main(main)
"""


def _run(tmp_path, sig):
    ckpt = tmp_path / "checkpoint_last.pth"
    script = tmp_path / "s.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(textwrap.dedent(SCRIPT.format(root=root, path=str(ckpt), sig=sig)))
    atomic_torch_save({"w": torch.arange(1000)}, ckpt)
    digest = sha256_file(ckpt)
    r = run_tool(script, cwd=tmp_path)
    assert "Traceback" not in r.stderr, r.stderr
    assert sha256_file(ckpt) == digest  # the earlier checkpoint is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    return r


def test_sigint_during_checkpoint_write_is_interrupted_not_full_disk(tmp_path):
    r = _run(tmp_path, "SIGINT")
    assert r.returncode == preempt.EXIT_INTERRUPTED == 130
    assert r.stderr.strip().splitlines() == ["interrupted"]
    assert "disk" not in r.stderr


def test_sigterm_outside_a_training_step_exits_75(tmp_path):
    r = _run(tmp_path, "SIGTERM")
    assert r.returncode == preempt.EXIT_PREEMPTED == 75
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preempted: stopped by SIGTERM"), r.stderr


class _MaskedInterrupt:
    """What torch.save does when Ctrl-C lands in its zip writer: the closing archive raises a
    RuntimeError whose context is the KeyboardInterrupt."""

    def __reduce__(self):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64") from None


class _FullDisk:
    def __reduce__(self):
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64")


def test_masked_interrupt_stays_an_interrupt_and_a_full_disk_stays_one_line(tmp_path):
    ckpt = tmp_path / "c.pth"
    atomic_torch_save({"w": torch.ones(3)}, ckpt)
    digest = sha256_file(ckpt)
    # `from None` hides the cause from tracebacks but keeps it as __context__
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"x": _MaskedInterrupt()}, ckpt)
    with pytest.raises(MCLDetError, match="usually a full disk"):
        atomic_torch_save({"x": _FullDisk()}, ckpt)
    assert sha256_file(ckpt) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]
