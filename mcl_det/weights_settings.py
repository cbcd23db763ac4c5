"""The detectron2 settings that weights converted from a torchvision ResNet need.

One yacs fragment (``d2_settings``) is the contract between the converter and detection training:
dumped as the ``.yaml`` beside the ``.pkl`` (``settings_yaml``), merged into detectron2's config to
build the converter's verification model, and compared key by key with a training config
(``check_weights_against_config``). Any other value of these keys trains silently worse.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from .config import flat_cfg
from .utils.errors import MCLDetError

logger = logging.getLogger(__name__)

# Starts every header line of the sidecar YAML: marks it as ours, not someone else's file.
YAML_MARK = "# MCL_DET:"


def d2_settings(depth: int) -> CfgNode:
    """The detectron2 config values weights converted from a torchvision ResNet-``depth`` need."""
    return CfgNode(
        {
            "INPUT": {"FORMAT": "RGB"},
            "MODEL": {
                # torchvision's ImageNet normalisation, RGB, in 0..255 pixel units (detectron2's)
                "PIXEL_MEAN": [123.675, 116.28, 103.53],
                "PIXEL_STD": [58.395, 57.12, 57.375],
                "RESNETS": {
                    "DEPTH": depth,
                    "RES2_OUT_CHANNELS": 64 if depth in (18, 34) else 256,
                    "STRIDE_IN_1X1": False,  # torchvision puts the stride in the 3x3 conv
                },
            },
        }
    )


WEIGHTS_AUTHOR = "mcl_det"  # the "__author__" of the converter's .pkl files


def yaml_path_for(weights_path: str | os.PathLike) -> Path:
    """``x/member0.pkl`` -> ``x/member0.yaml``."""
    return Path(weights_path).with_suffix(".yaml")


def settings_yaml(depth: int, header: list[str]) -> str:
    """The settings as a detectron2 config fragment (``cfg.merge_from_file`` applies it) under
    a comment header marked as ours."""
    return "".join(f"{YAML_MARK} {line}\n" for line in header) + d2_settings(depth).dump()


_MISSING = object()


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-3)
    return a == b


def _fmt(v: Any) -> str:
    return "[" + ",".join(_fmt(x) for x in v) + "]" if isinstance(v, (list, tuple)) else str(v)


def check_weights_against_config(
    cfg: Any, weights_path: str | os.PathLike, author: str | None = None
) -> None:
    """Refuse a detectron2 ``cfg`` that does not match the settings saved beside ``weights_path``.

    A mismatch is an ``MCLDetError`` naming each key, both values and the override that fixes it.
    Weights without our YAML (detectron2 model zoo, URLs) are accepted unchecked. Converted weights
    whose YAML went missing cannot be checked: one warning says so. ``author`` is the ``.pkl``'s
    ``__author__`` when the caller has read it (then only ours warn), else any local .pkl does.
    """
    wp = str(weights_path or "")
    if not wp or "://" in wp:
        return  # no weights, or model-zoo / remote weights: nothing of ours to check against
    ypath = yaml_path_for(wp)
    if not ypath.is_file():
        ours = author == WEIGHTS_AUTHOR if author is not None else wp.endswith(".pkl")
        if ours:
            logger.warning(
                "settings of %s could not be checked: its %s (written by tools/convert_to_d2.py "
                "beside it) is missing, so the config is NOT checked against the settings the "
                "weights need (INPUT.FORMAT, MODEL.PIXEL_MEAN/STD, MODEL.RESNETS.*) and a "
                "mismatch trains silently worse; copy the .yaml beside the .pkl or re-run the "
                "converter",
                wp,
                ypath.name,
            )
        return
    text = ypath.read_text(encoding="utf-8")
    if YAML_MARK not in text:
        return  # somebody else's YAML that happens to sit beside the weights
    try:
        need = CfgNode.load_cfg(text)
    except Exception as e:
        raise MCLDetError(
            f"cannot parse {ypath}: {' '.join(str(e).split())[:200]}; re-run "
            "tools/convert_to_d2.py to rewrite it"
        ) from None
    problems, fixes = [], []
    for key, want in flat_cfg(need).items():
        have = _get(cfg, key)
        if have is _MISSING or not _same(have, want):
            shown = "unset" if have is _MISSING else _fmt(have)
            problems.append(f"{key} is {shown} in the config but the weights need {_fmt(want)}")
            fixes.append(f"{key} {_fmt(want)}")
    if problems:
        raise MCLDetError(
            f"config does not match weights {wp}: "
            + "; ".join(problems)
            + f"; fix: add `{' '.join(fixes)}` to the command line or merge {ypath} into the config"
        )
