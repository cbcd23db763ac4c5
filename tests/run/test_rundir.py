"""Output folders: path checks, the exclusive lock, refuse / overwrite / resume / auto, stale
temporary files, and atomic writes that follow the umask."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from clitools import lock_held_elsewhere

from mcl_det.utils.errors import MCLDetError
from mcl_det.utils.io import atomic_write_text, sha256_file
from mcl_det.utils.rundir import (
    LOCK_NAME,
    check_output_path,
    lock_run_dir,
    open_run_dir,
    remove_stale_tmp,
)

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ("results.json", "model_*.pth", "log.txt", "inference")
CKPTS = ("model_*.pth",)


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write to (chmod; as root, where chmod does not bind, /sys)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").touch()
    except OSError:
        return d
    (d / "probe").unlink()
    sysfs = Path("/sys")
    try:
        (sysfs / "mcl_det_probe").touch()
    except OSError:
        return sysfs
    pytest.skip("no unwritable folder available (root on a writable /sys)")


def test_check_output_path_errors(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(MCLDetError, match=r"OUTPUT_DIR .*afile/sub.*afile is a regular file"):
        check_output_path(f / "sub", "dir", "OUTPUT_DIR")
    with pytest.raises(MCLDetError, match="it is a regular file"):
        check_output_path(f, "dir", "OUTPUT_DIR")
    with pytest.raises(MCLDetError, match=r"--output .*afile is a regular file"):
        check_output_path(f / "deeper" / "t.md", "file", "--output")
    with pytest.raises(MCLDetError, match="it is a folder"):
        check_output_path(tmp_path, "file", "--plot")
    ro = unwritable_dir(tmp_path)
    with pytest.raises(MCLDetError, match="not writable"):
        check_output_path(ro / "new" / "run", "dir", "OUTPUT_DIR")
    with pytest.raises(MCLDetError, match="not writable"):
        check_output_path(ro / "plot.png", "file", "--plot")
    # fine paths pass and nothing is created
    assert check_output_path(tmp_path / "a" / "b", "dir") == tmp_path / "a" / "b"
    check_output_path(tmp_path / "c" / "t.md", "file")
    check_output_path(f, "file")  # an existing file is replaced atomically later
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def _sha(d: Path) -> dict:
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def test_refuse_overwrite_resume_auto(tmp_path):
    out = tmp_path / "run"
    with open_run_dir(out, "new", OUTPUTS, checkpoints=CKPTS) as rd:  # empty: fine
        assert not rd.resume and rd.found == []
    (out / "results.json").write_text("{}")
    (out / "model_0000009.pth").write_bytes(b"weights")
    (out / "inference").mkdir()
    (out / "inference" / "x.pkl").write_bytes(b"p")
    (out / "notes.txt").write_text("mine")
    before = _sha(out)
    with pytest.raises(MCLDetError, match=r"already holds another run's outputs.*--overwrite"):
        open_run_dir(out, "new", OUTPUTS, checkpoints=CKPTS)
    assert _sha(out) == before  # refused: nothing touched (the lock file aside)
    with open_run_dir(out, "resume", OUTPUTS, checkpoints=CKPTS) as rd:
        assert rd.resume and "results.json" in rd.found
    with open_run_dir(out, "auto", OUTPUTS, checkpoints=CKPTS) as rd:
        assert rd.resume
    with pytest.raises(MCLDetError, match=r"another config \(SOLVER.MAX_ITER: 6 -> 8\)"):
        open_run_dir(
            out, "auto", OUTPUTS, checkpoints=CKPTS, run_differs=lambda p: "SOLVER.MAX_ITER: 6 -> 8"
        )
    with pytest.raises(MCLDetError, match="would delete .*model_0000009.pth, which this run reads"):
        open_run_dir(out, "overwrite", OUTPUTS, keep=[out / "model_0000009.pth"])
    assert _sha(out) == before
    with open_run_dir(out, "overwrite", OUTPUTS, checkpoints=CKPTS) as rd:
        assert not rd.resume
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "notes.txt"]  # only the outputs
    with open_run_dir(out, "auto", OUTPUTS, checkpoints=CKPTS) as rd:  # empty again: fresh
        assert not rd.resume


def test_stale_tmp_removed_others_kept(tmp_path):
    out = tmp_path / "run"
    (out / "seed0").mkdir(parents=True)
    stale = [
        out / ".checkpoint_last.pth.k3j_9x2a.tmp",
        out / "seed0" / ".results.json.abcdefgh.tmp",
    ]
    kept = [out / "notes.tmp", out / ".x.tmp", out / ".model.pth.TOOLONG12.tmp"]
    for f in stale + kept:
        f.write_bytes(b"x")
    assert sorted(remove_stale_tmp(out)) == [stale[0]]  # not recursive by default
    stale[0].write_bytes(b"x")
    rd = open_run_dir(out, "resume", OUTPUTS)
    rd.release()
    assert sorted(rd.removed_tmp) == sorted(stale)
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)


def test_lock_names_holder_pid_and_dies_with_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with lock_held_elsewhere(out) as pid:  # then SIGKILLed: a crash, the kernel drops the lock
        with pytest.raises(MCLDetError, match=rf"in use by another run \(pid {pid} on "):
            open_run_dir(out, "new", OUTPUTS)
    fd = lock_run_dir(out)
    assert f"pid {os.getpid()} " in (out / LOCK_NAME).read_text()
    os.close(fd)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_follows_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == mode


def test_lock_is_exclusive_in_one_process_too(tmp_path):
    fd = lock_run_dir(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(MCLDetError, match=f"pid {os.getpid()}"):
        lock_run_dir(tmp_path)
    assert time.monotonic() - t0 < 5  # refused at once, never waits
    os.close(fd)
