"""RNG states (torch, CUDA, Python, numpy) as tensors and plain values.

Why plain: checkpoints are read with ``torch.load(weights_only=True)``, which refuses the numpy
arrays and tuples that ``random.getstate`` / ``np.random.get_state`` return. Used by pretraining
and detection checkpoints alike.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (what ``weights_only`` loading accepts)."""
    version, mt, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``; also the raw tuples of checkpoints written before it was plain."""
    torch.set_rng_state(state["torch"])
    py, npy = state["python"], state["numpy"]
    if isinstance(py, Mapping):
        py = (py["version"], tuple(py["state"].tolist()), py["gauss"])
    random.setstate(py)
    if isinstance(npy, Mapping):
        key = npy["key"].numpy().astype(np.uint32)
        npy = ("MT19937", key, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
