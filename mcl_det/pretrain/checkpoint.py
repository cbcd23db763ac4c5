"""The pretraining checkpoint format, ``mcl_det.pretrain/v1`` (layout in docs/DESIGN.md).

This module is the one place that knows the format: its tag, the layout of the saved dict and
where a member's backbone lives (``member_state``); the RNG states in it are laid out by
``mcl_det.utils.rng``. Writers and readers (pretraining resume, the converter, linear evaluation)
go through it.

Everything needed to continue bit-for-bit on CPU is in the file: every member (query encoders,
momentum encoders, heads, classifiers), the queues or banks, optimizer, lr schedule position, AMP
scaler, epoch/iteration, the RNG states of torch/CUDA/python/numpy and the resolved config.
Everything is a tensor or a plain value (the config as YAML text, RNG states as tensors), so a
checkpoint loads with ``torch.load(weights_only=True)``: reading one never runs code.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from yacs.config import CfgNode

from ..utils.errors import MCLDetError
from ..utils.io import atomic_torch_save, load_torch
from ..utils.rng import rng_state

FORMAT = "mcl_det.pretrain/v1"
LAST = "checkpoint_last.pth"
_PLAIN = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device)


def unwrap(model: nn.Module) -> nn.Module:
    """The cohort module under DDP / torch.compile wrappers (so keys never get ``module.``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def member_prefix(k: int) -> str:
    """Key prefix of member ``k``'s backbone inside ``ckpt['model']``."""
    return f"members.{k}.encoder."


def member_state(ckpt: Mapping[str, Any], k: int) -> dict[str, torch.Tensor]:
    """Member ``k``'s backbone (query encoder in selfsup, the network in supervised) with
    torchvision ResNet names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ``fc.*`` if the
    member has one); empty if the checkpoint has no such member."""
    p = member_prefix(k)
    return {name[len(p) :]: v for name, v in ckpt["model"].items() if name.startswith(p)}


def member_indices(ckpt: Mapping[str, Any]) -> list[int]:
    """Indices of the members whose backbone is present in ``ckpt['model']``."""
    found = {n.split(".")[1] for n in ckpt["model"] if n.startswith("members.")}
    return sorted(int(k) for k in found if k.isdigit())


def is_cohort_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` looks like this format (tagged, or members under ``model``)."""
    if not isinstance(obj, Mapping):
        return False
    model = obj.get("model")
    return obj.get("format") == FORMAT or (
        isinstance(model, Mapping)
        and any(str(k).removeprefix("module.").startswith("members.") for k in model)
    )


def _plain(obj: Any, where: str) -> Any:
    """``obj`` with numpy values turned into tensors / Python numbers; ``TypeError`` on anything
    that ``weights_only`` loading would refuse (a bug in the caller, caught at write time)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, _plain(v, f"{where}.{k}")) for k, v in obj.items())
    if type(obj) in (list, tuple, set, torch.Size):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor):
        return obj
    raise TypeError(f"checkpoint value {where} is a {type(obj).__name__}; store plain values")


def save_checkpoint(path: str | os.PathLike, cohort: nn.Module, cfg: CfgNode, **state: Any) -> None:
    """Write the checkpoint atomically. ``state``: epoch, iteration, optimizer, scheduler, scaler,
    member_metrics and any extra resume state (tensors and plain values only)."""
    cohort = unwrap(cohort)
    ckpt = {
        "format": FORMAT,
        "mode": cfg.MODE,
        "archs": list(cohort.archs),
        "config": cfg.dump(),
        "model": {k: v.detach().cpu() for k, v in cohort.state_dict().items()},
        "rng": rng_state(),
        **state,
    }
    atomic_torch_save(_plain(ckpt, "ckpt"), path)


def load_checkpoint(
    path: str | os.PathLike, unsafe: bool = False, opt_in: str | None = None
) -> dict[str, Any]:
    """Read and validate a checkpoint without running code from it (see ``load_torch``: ``opt_in``
    is the flag that would set ``unsafe``); every failure is one MCLDetError line."""
    ckpt = load_torch(path, unsafe=unsafe, opt_in=opt_in)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MCLDetError(
            f"{path} is not an mcl_det pretraining checkpoint (format {FORMAT} expected)"
        )
    return ckpt


def load_model_state(cohort: nn.Module, ckpt: dict[str, Any], path: str = "") -> None:
    """Load ``ckpt['model']`` strictly; a mismatch (other archs / mode / sizes) is a user error."""
    try:
        unwrap(cohort).load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise MCLDetError(
            f"checkpoint {path} does not match the configured cohort "
            f"(archs {ckpt.get('archs')}, mode {ckpt.get('mode')}): "
            f"{str(e).splitlines()[0][:200]}; use the same config as the run that wrote it"
        ) from None
