"""Output folders that never lose a finished run: path checks, an exclusive lock, resume policy.

Every tool that writes a run into an OUTPUT_DIR goes through :func:`open_run_dir` before any
expensive work. It

- checks the path (:func:`check_output_path`): under a regular file or in a read-only place is
  one ``error:`` line, not a traceback after hours of work;
- takes an exclusive ``fcntl.flock`` on ``OUTPUT_DIR/.lock`` (the kernel releases it when the
  process dies, even on kill -9, so a crash never leaves a stale lock; processes forked from the
  holder, e.g. DataLoader workers, close their copy at once, so they never keep a dead holder's
  lock alive); a second run into the same folder stops at once, naming the pid that holds it.
  What owns the lock is the holder's open file, not a pid or a name written down: a restarted
  attempt of the same run (a torchrun restart, a requeued job) takes it again as soon as the
  earlier attempt's processes are gone, a concurrent run is refused while they live;
- refuses a folder that already holds a run's outputs unless asked to continue it (``resume``),
  continue it only if present (``auto``, for requeued cluster jobs) or replace it (``overwrite``:
  the previous run's outputs are deleted first, so logs and metrics of two runs never mix);
- removes the temporary files our atomic writes (:mod:`mcl_det.utils.io`) leave after a kill -9.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MCLDetError
from .io import TMP_NAME_RE

LOCK_NAME = ".lock"
RUN_MODES = ("new", "resume", "auto", "overwrite")
# descriptor -> (device, inode) of each run lock this process took: a forked child closes its
# copies (_close_locks_after_fork) so that only the holder itself keeps the flock alive. The file
# identity guards against a descriptor number the holder closed itself and then reused.
_HELD_LOCKS: dict[int, tuple[int, int]] = {}


def _file_id(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _close_locks_after_fork() -> None:
    for fd, ident in _HELD_LOCKS.items():
        if _file_id(fd) == ident:
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_after_fork)


# ----------------------------------------------------------------------------- path checks


def _nearest_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path) -> str | None:
    """None if a file can be created in ``folder`` (tried for real: permissions, read-only
    mounts, ACLs and root all answer correctly), else the reason."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".mcl_det_probe."):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def check_output_path(path: str | os.PathLike, kind: str = "file", what: str | None = None) -> Path:
    """Check that ``path`` can be written, before any expensive work; return it as a Path.

    ``kind`` is ``"dir"`` (an output folder, created later as needed) or ``"file"`` (a file
    written later; its folders may not exist yet). Nothing is created. Raises ``MCLDetError``
    naming ``what`` (e.g. ``"OUTPUT_DIR"``, ``"--plot"``) when the path or one of its parents is
    a regular file, a file path is an existing folder, or the place is not writable.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', not {kind!r}")
    p = Path(os.path.expanduser(os.fspath(path)))
    label = f"{what} {p}" if what else str(p)
    if not os.fspath(path):
        raise MCLDetError(f"{what or 'output path'} is empty; give a path to write to")
    if kind == "file":
        if p.is_dir():
            raise MCLDetError(f"cannot write {label}: it is a folder; give a file name")
        target_dir = p.parent
    else:
        target_dir = p
    existing = _nearest_existing(target_dir.absolute())
    if not existing.is_dir():
        what_it_is = "a regular file" if existing.is_file() else "not a folder"
        where = "it" if existing == p.absolute() else str(existing)
        raise MCLDetError(f"cannot write {label}: {where} is {what_it_is}; choose another path")
    reason = _probe_writable(existing)
    if reason:
        raise MCLDetError(
            f"cannot write {label}: {existing} is not writable ({reason}); choose another path "
            "or fix its permissions"
        )
    return p


def ensure_output_dir(path: str | os.PathLike, what: str = "OUTPUT_DIR") -> Path:
    """:func:`check_output_path` (kind ``dir``) then create the folder."""
    p = check_output_path(path, "dir", what)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MCLDetError(f"cannot create {what} {p}: {e.strerror}; choose another path") from None
    return p


# ----------------------------------------------------------------------------- stale files


def remove_stale_tmp(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete ``.NAME.XXXXXXXX.tmp`` files our atomic writes leave when killed (-9) mid-write.

    Only safe while this run holds the folder's lock (no other writer can be mid-write there).
    Returns what was removed.
    """
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for d, _, files in walker:
        for name in files:
            if TMP_NAME_RE.match(name):
                f = Path(d, name)
                try:
                    if f.is_file() and not f.is_symlink():
                        f.unlink()
                        removed.append(f)
                except FileNotFoundError:
                    pass
    return removed


# ----------------------------------------------------------------------------- the run folder


@dataclass
class RunDir:
    """An output folder this process holds exclusively until :meth:`release` (or exit)."""

    path: Path
    resume: bool  # continue the run found there (False: start fresh)
    found: list[str] = field(default_factory=list)  # outputs of an earlier run present at start
    removed_tmp: list[Path] = field(default_factory=list)
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            if _HELD_LOCKS.pop(self._fd, None) is not None:  # not a forked child's closed copy
                os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "unknown pid"


def lock_run_dir(path: str | os.PathLike) -> int:
    """Take the exclusive lock of ``path`` (created if needed); return its file descriptor.

    The lock file holds ``pid N on HOST: COMMAND`` of the holder for the error message.
    """
    p = Path(path)
    lock_path = p / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise MCLDetError(f"cannot create {lock_path}: {e.strerror}; choose another path") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MCLDetError(
            f"{p} is in use by another run ({_holder(lock_path)}); wait for it to finish, stop "
            "it, or choose another OUTPUT_DIR"
        ) from None
    except OSError as e:  # e.g. a file system without locks
        os.close(fd)
        raise MCLDetError(f"cannot lock {lock_path}: {e.strerror}; choose another path") from None
    os.set_inheritable(fd, False)
    st = os.fstat(fd)
    _HELD_LOCKS[fd] = (st.st_dev, st.st_ino)
    info = f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    return fd


def find_outputs(path: str | os.PathLike, patterns: Iterable[str]) -> list[str]:
    """Paths (relative to ``path``, sorted) matching the glob ``patterns`` (``*/`` allowed)."""
    p = Path(path)
    hits = set()
    for pat in patterns:
        for m in glob.glob(str(p / pat)):
            hits.add(os.path.relpath(m, p))
    return sorted(hits)


def open_run_dir(
    path: str | os.PathLike,
    mode: str,
    outputs: Sequence[str],
    *,
    checkpoints: Sequence[str] = (),
    keep: Sequence[str | os.PathLike] = (),
    run_differs: Callable[[Path], str | None] | None = None,
    what: str = "OUTPUT_DIR",
) -> RunDir:
    """Check, lock and prepare the output folder of a run; see the module docstring.

    ``outputs``: glob patterns (relative to ``path``) of everything the tool writes there; their
    presence means "another run's results". ``checkpoints``: the subset a run resumes from.
    ``mode``: ``new`` (refuse a folder holding outputs), ``resume`` (continue what is there),
    ``auto`` (for requeued jobs: continue if a checkpoint is there, else start fresh; a run that
    ``run_differs`` (returns what differs, or None) finds different is refused),
    ``overwrite`` (delete the outputs, start fresh). ``keep``: files the run reads (e.g. its
    initial weights); ``overwrite`` refuses to delete them.
    Raises ``MCLDetError`` (one line) on every refusal; the lock is held by the returned object.
    """
    if mode not in RUN_MODES:
        raise ValueError(f"mode must be one of {RUN_MODES}, not {mode!r}")
    p = ensure_output_dir(path, what)
    fd = lock_run_dir(p)
    try:
        found = find_outputs(p, outputs)
        has_ckpt = bool(find_outputs(p, checkpoints))
        resume = mode == "resume" or (mode == "auto" and has_ckpt)
        other = run_differs(p) if found and mode == "auto" and run_differs else None
        if other:
            raise MCLDetError(
                f"{what} {p} holds a run with another config ({other}) and --auto-resume "
                f"continues only the same run; pass --resume to continue it with this config, "
                f"--overwrite to replace it, or choose another {what}"
            )
        if found and mode == "new":
            shown = ", ".join(found[:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else "")
            raise MCLDetError(
                f"{what} {p} already holds another run's outputs ({shown}); pass --resume to "
                f"continue it, --overwrite to replace it, or choose another {what}"
            )
        if mode == "overwrite" and found:
            kept = {os.path.realpath(k) for k in keep if k}
            doomed = [p / f for f in found]
            for d in doomed:
                r = str(d.resolve())
                inside = [k for k in kept if k == r or k.startswith(r + os.sep)]
                if inside:
                    raise MCLDetError(
                        f"--overwrite would delete {inside[0]}, which this run reads; copy it out "
                        f"of {p} first or choose another {what}"
                    )
            for d in doomed:
                if d.is_dir() and not d.is_symlink():
                    shutil.rmtree(d)
                elif os.path.lexists(d):
                    d.unlink()
        removed = remove_stale_tmp(p, recursive=True)
    except BaseException:
        _HELD_LOCKS.pop(fd, None)
        os.close(fd)
        raise
    return RunDir(p, resume, found, removed, fd)
