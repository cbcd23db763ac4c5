"""yacs config loading shared by pretraining and detection.

One config system for the whole project (yacs, as detectron2). Unknown keys are an error, and
every yacs/fvcore failure is turned into one clear ``MCLDetError`` line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from yacs.config import CfgNode

from .utils.errors import MCLDetError
from .utils.io import atomic_write_text


def merge_cfg(
    cfg: CfgNode, config_file: str | None = None, opts: Sequence[str] | None = None
) -> CfgNode:
    """Merge a YAML file (with detectron2-style ``_BASE_`` when cfg supports it) and KEY VALUE opts.

    Mutates and returns ``cfg``. Raises ``MCLDetError`` for a missing file, an unknown key, a
    value of the wrong type or an odd number of overrides.
    """
    if config_file:
        if not os.path.isfile(config_file):
            raise MCLDetError(
                f"config file not found: {config_file} (check the --config-file path)"
            )
        _merge(cfg.merge_from_file, config_file, f"config file {config_file}")
    opts = list(opts or [])
    if len(opts) % 2:
        raise MCLDetError(
            f"config overrides must be KEY VALUE pairs, got an odd number: {' '.join(opts)}"
        )
    if opts:
        _merge(cfg.merge_from_list, opts, "config override")
    return cfg


def _merge(merge: Callable[[Any], None], source: Any, what: str) -> None:
    """Run one yacs merge: a bad key or value becomes one ``bad WHAT`` error, anything else (a
    YAML syntax error) one ``cannot parse WHAT`` error."""
    try:
        merge(source)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise MCLDetError(f"bad {what}: {_clean(e)}") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise MCLDetError(f"cannot parse {what}: {_clean(e)}") from None


def _clean(e: BaseException) -> str:
    msg = str(e.args[0]) if e.args else str(e)
    msg = " ".join(msg.split())
    if "Non-existent" in msg:
        msg += " (unknown key: check its spelling against the defaults)"
    return msg


def save_cfg(cfg: CfgNode, path: str | os.PathLike) -> None:
    """Write the resolved config next to an output, atomically."""
    atomic_write_text(path, cfg.dump())
