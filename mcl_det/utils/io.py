"""Atomic writes: a crash or a full disk never leaves a half-written checkpoint or result behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import MCLDetError


def _umask() -> int:
    """The process umask (read without changing it where /proc allows it; threads may race
    otherwise)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _interrupted(e: BaseException) -> bool:
    """True when a Ctrl-C is behind ``e``: torch.save turns an interrupt inside its zip writer
    into a RuntimeError raised while closing the archive, which must not read as a full disk."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _atomic(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name is what remove_stale_tmp (mcl_det.utils.rundir) recognises after a kill -9
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; outputs follow the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _interrupted(e):  # Ctrl-C: "interrupted" (exit 130), never a disk error
            if isinstance(e, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from e
        if isinstance(e, (OSError, RuntimeError)):
            free = shutil.disk_usage(path.parent).free / 2**20
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "unexpected pos" in first:  # torch.save swallows ENOSPC and reports this instead
                first = f"a write came up short, usually a full disk ({first})"
            raise MCLDetError(
                f"could not write {path}: {first}; {free:.0f} MiB free on that disk; any earlier "
                f"{path.name} is left intact: free disk space or choose another output folder"
            ) from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    _atomic(path, lambda f: torch.save(obj, f))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
