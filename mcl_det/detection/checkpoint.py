"""detectron2's ``DetectionCheckpointer`` with our two file guarantees.

- Writes are atomic (temporary file in the same folder, fsync, rename; ``mcl_det.utils.io``): an
  interrupted or killed run, or a full disk, never leaves a truncated ``model_XXXXXXX.pth`` or
  ``last_checkpoint`` behind, and earlier checkpoints stay as they were. A failed write is an
  ``MCLDetError`` naming the free space.
- Reads never run code from the file: ``.pkl`` weights go through a restricted unpickler (numpy
  arrays and plain containers only; detectron2 itself calls ``pickle.load``), ``.pth`` through
  ``torch.load``'s ``weights_only`` mode. A file needing more is refused unless the user passes
  ``--unsafe-load`` (only for files they trust). Unreadable files are one-line user errors.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..utils.errors import MCLDetError
from ..utils.io import (
    UnsafePickleError,
    atomic_torch_save,
    atomic_write_text,
    restricted_pickle_load,
)

UNSAFE_LOAD_FLAG = "--unsafe-load"


def _refused(path: str, what: str) -> MCLDetError:
    return MCLDetError(
        f"{path} needs {what} to load, which could run arbitrary code, so it was not loaded; "
        f"pass {UNSAFE_LOAD_FLAG} only if you trust the file"
    )


def _unreadable(path: str, e: BaseException) -> MCLDetError:
    first = " ".join(str(e).split())[:200] or type(e).__name__
    return MCLDetError(
        f"cannot read weights {path}: {first}; is it a complete .pth (torch.save) or .pkl "
        "(tools/convert_to_d2.py, detectron2 model zoo) file?"
    )


def _pkl_layout(data: Any, path: str) -> dict:
    """detectron2's two ``.pkl`` layouts: its model zoo ({"model", "__author__"}) or Caffe2."""
    if not isinstance(data, dict):
        raise _unreadable(path, TypeError(f"holds a {type(data).__name__}, not a dict"))
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)  # Caffe2 detection models keep their weights under "blobs"
    model = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that writes atomically and loads without running code."""

    def __init__(
        self, model: nn.Module, save_dir: str = "", *, unsafe_load: bool = False, **kw: Any
    ) -> None:
        super().__init__(model, save_dir, **kw)
        self.unsafe_load = unsafe_load

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({k: obj.state_dict() for k, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_file(self, filename: str) -> dict:
        if filename.endswith(".pkl"):
            try:
                data = (
                    _unsafe_pickle_load(filename)
                    if self.unsafe_load
                    else restricted_pickle_load(filename)
                )
            except UnsafePickleError as e:
                raise _refused(filename, e.name) from None
            except Exception as e:  # truncated, random bytes, not a pickle
                raise _unreadable(filename, e) from None
            loaded = _pkl_layout(data, filename)
        else:
            try:
                if self.unsafe_load:
                    loaded = torch.load(filename, map_location="cpu", weights_only=False)
                else:
                    loaded = super()._load_file(filename)  # torch.load, weights_only by default
            except pickle.UnpicklingError as e:
                found = re.search(r"unsupported GLOBAL (\S+)", str(e), re.IGNORECASE)
                if found:
                    raise _refused(filename, found.group(1)) from None
                raise _unreadable(filename, e) from None
            except Exception as e:  # truncated zip, random bytes, missing module
                raise _unreadable(filename, e) from None
            if not isinstance(loaded, dict):
                raise _unreadable(filename, TypeError(f"holds a {type(loaded).__name__}"))
            if "model" not in loaded:
                loaded = {"model": loaded}
        if not isinstance(loaded["model"], dict):
            raise _unreadable(filename, TypeError("its 'model' entry is not a dict of weights"))
        return loaded


def _unsafe_pickle_load(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # only with --unsafe-load: the user trusts it


def read_weights(path: str, unsafe_load: bool = False) -> dict:
    """The checkpoint dict of a local weights file, read as ``SafeCheckpointer`` reads it."""
    return SafeCheckpointer(nn.Module(), unsafe_load=unsafe_load)._load_file(path)


__all__ = ["UNSAFE_LOAD_FLAG", "SafeCheckpointer", "read_weights"]
