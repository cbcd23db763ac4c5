"""Atomic writes: a crash or a full disk never leaves a half-written checkpoint or result behind."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
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


# The temporary name of an atomic write, ".NAME.<8 random [a-z0-9_] chars>.tmp" (tempfile.mkstemp
# with the prefix and suffix below): what remove_stale_tmp (mcl_det.utils.rundir) deletes after a
# kill -9 left one behind.
TMP_NAME_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _atomic(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _data_only_globals() -> list[Any]:
    """Classes that hold data and run no code when unpickled, allowed on top of torch's
    weights_only set: numpy arrays/scalars (RNG state in older checkpoints, under numpy 1 and 2
    module names) and argparse.Namespace (the ``args`` of MoCo-family checkpoints)."""
    import argparse

    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar

    return [
        np.ndarray,
        np.dtype,
        *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"},  # numeric dtypes' classes
        argparse.Namespace,
        _reconstruct,
        scalar,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (scalar, "numpy.core.multiarray.scalar"),
    ]


def load_torch(
    path: str | os.PathLike,
    unsafe: bool = False,
    opt_in: str | None = "--unsafe-load",
    what: str = "checkpoint",
) -> Any:
    """``torch.load`` to CPU that never runs code from the file unless ``unsafe``.

    Unpickling can execute anything, so a file is read with ``weights_only=True`` (tensors, plain
    containers, the data-only classes above). One that needs more is refused with an
    ``MCLDetError`` naming ``opt_in`` (the flag that sets ``unsafe``; ``None``: no such flag, the
    file is simply not one of ours). With ``unsafe`` such a file is unpickled in full, with a
    warning: only for files you trust. Missing / unreadable files are ``MCLDetError`` too.
    """
    import logging
    import re

    import torch

    path = Path(path)
    if not path.exists():
        raise MCLDetError(f"{what} not found: {path}; check the path")
    if not path.is_file():
        raise MCLDetError(f"{what} is not a file: {path}; give a .pth / .pth.tar file")
    try:
        with torch.serialization.safe_globals(_data_only_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = " ".join(str(e).split())
        if "Weights only load failed" not in text or "Unsupported operand" in text:
            raise MCLDetError(  # truncated zip, not a torch file, ...
                f"cannot read checkpoint {path} ({type(e).__name__}: {text[:160]}); the file is "
                "corrupt or not a torch checkpoint: point to a complete torch.save file"
            ) from None
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", text)
        needs = next((g for g in found.groups() if g), "?") if found else "?"
    if not unsafe:
        todo = (
            f"pass {opt_in} only for files you trust"
            if opt_in
            else "a checkpoint written by mcl_det never holds one: point to such a checkpoint"
        )
        raise MCLDetError(
            f"{path} holds Python objects other than tensors and plain containers ({needs}); "
            f"it was not unpickled because that can run code: {todo}"
        )
    logging.getLogger(__name__).warning(
        "%s: unpickling in full (%s given): this runs any code the file holds", path, opt_in
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MCLDetError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
            "; the file is corrupt or not a torch checkpoint"
        ) from None


# Globals a weights pickle may name: numpy arrays, dtypes and scalars (numpy 1.x and 2.x module
# paths; protocol 5 rebuilds arrays with _frombuffer, protocol 2 encodes bytes with
# _codecs.encode) and plain containers. Everything else could be a callable run while unpickling.
SAFE_PICKLE_GLOBALS = frozenset(
    [
        (m, n)
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
        for n in ("_reconstruct", "scalar")
    ]
    + [(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [("collections", "OrderedDict")]
    + [(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset", "complex")]
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside ``SAFE_PICKLE_GLOBALS``; ``.name`` is ``module.name``."""

    def __init__(self, name: str):
        super().__init__(f"refusing to load global {name}")
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise UnsafePickleError(f"{module}.{name}")
        return super().find_class(module, name)


def restricted_pickle_load(path: str | os.PathLike, encoding: str = "latin1") -> Any:
    """Unpickle ``path`` allowing only numpy arrays / scalars and plain containers.

    Weights pickles (detectron2 model zoo, Caffe2, our converter) need nothing more; any other
    global raises ``UnsafePickleError`` before it is called, so a crafted file cannot run code.
    ``latin1`` reads Python 2 pickles of numpy arrays, as detectron2 does.
    """
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, encoding=encoding).load()
