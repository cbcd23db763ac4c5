"""yacs config loading shared by pretraining and detection.

One config system for the whole project (yacs, as detectron2). Unknown keys are an error, and
every yacs/fvcore failure is turned into one clear ``MCLDetError`` line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
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
    """Run one yacs merge: a bad key or value becomes one ``bad WHAT`` error, a ``_BASE_`` file
    that cannot be read (or a loop of them) its own error, anything else (a YAML syntax error)
    one ``cannot parse WHAT`` error."""
    try:
        merge(source)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise MCLDetError(f"bad {what}: {_clean(e)}") from None
    except OSError as e:  # the file itself exists (merge_cfg checks): one of its _BASE_ files
        raise MCLDetError(
            f"cannot read {e.filename or 'a base file'}, named by _BASE_ in {what} "
            f"({e.strerror or _clean(e)}); a _BASE_ path is relative to the file that names it"
        ) from None
    except RecursionError:
        raise MCLDetError(f"{what}: its _BASE_ files include each other (a loop)") from None
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


def flat_cfg(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"MODEL.RESNETS.DEPTH": 50, ...}``: every leaf of a nested config (a CfgNode or the dict
    of a loaded YAML), in the config's order."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        if isinstance(v, Mapping):
            out.update(flat_cfg(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(
    old_yaml: str, cfg: CfgNode, ignore: Sequence[str] = ("OUTPUT_DIR",)
) -> list[str]:
    """``KEY: old -> new`` for every setting of ``cfg`` that differs from the config saved as
    ``old_yaml`` (a checkpoint's, or OUTPUT_DIR/config.yaml), keys in ``ignore`` aside: a resumed
    run says what it does differently from the run it continues."""
    import yaml

    old = flat_cfg(yaml.safe_load(old_yaml) or {})
    new = flat_cfg(yaml.safe_load(cfg.dump()) or {})
    return [
        f"{k}: {old.get(k)} -> {new.get(k)}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and k not in ignore
    ]


def same_run_check(
    cfgs: Sequence[CfgNode], ignore: Sequence[str] = ("OUTPUT_DIR",)
) -> Callable[[object], str | None]:
    """For ``--auto-resume`` (``open_run_dir(run_differs=...)``): None when each config's saved
    ``OUTPUT_DIR/config.yaml`` (where there is one) describes that run, else what differs; a
    requeued job continues only its own run."""
    import yaml

    def check(_path: object) -> str | None:
        for c in cfgs:
            saved = os.path.join(c.OUTPUT_DIR, "config.yaml")
            if not os.path.isfile(saved):
                continue
            try:
                with open(saved, encoding="utf-8") as f:
                    changes = config_changes(f.read(), c, ignore)
            except (OSError, yaml.YAMLError):
                return f"{saved} is unreadable"
            if changes:
                more = f" (+{len(changes) - 3} more)" if len(changes) > 3 else ""
                return ", ".join(changes[:3]) + more
        return None

    return check
