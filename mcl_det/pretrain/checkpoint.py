"""Pretraining checkpoints in the ``mcl_det.pretrain/v1`` format of docs/DESIGN.md.

Everything needed to continue bit-for-bit on CPU is in the file: every member (query encoders,
momentum encoders, heads, classifiers), the queues or banks, optimizer, lr schedule position, AMP
scaler, epoch/iteration, the RNG states of torch/CUDA/python/numpy and the resolved config.
(The authors' code saved none of heads / banks, so a resume silently re-initialised them.)
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.errors import MCLDetError
from ..utils.io import atomic_torch_save

FORMAT = "mcl_det.pretrain/v1"
LAST = "checkpoint_last.pth"


def unwrap(model: nn.Module) -> nn.Module:
    """The cohort module under DDP / torch.compile wrappers (so keys never get ``module.``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, cohort: nn.Module, cfg, **state: Any) -> None:
    """Write the checkpoint atomically. ``state``: epoch, iteration, optimizer, scheduler, scaler,
    member_metrics and any extra resume state (stored as given)."""
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
    atomic_torch_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint; every failure is one MCLDetError line."""
    path = Path(path)
    if not path.is_file():
        raise MCLDetError(f"checkpoint not found: {path}; check the path or train first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MCLDetError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "the file is corrupt or not a torch checkpoint: delete it or point to another one"
        ) from None
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
