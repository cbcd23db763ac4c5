"""Export one cohort member (or a baseline ResNet) to detectron2 weights, verified numerically.

Why this module is strict: converters that silently load nothing are a classic way to lose weeks.
MoCo's converter, for example, keeps only keys starting with ``module.encoder_q.``; on any other
layout it writes an empty model and detectron2 merely *warns* about missing keys before training
from random init. Here every step fails loudly instead:

* the input format is detected from the content (mcl_det cohort checkpoint, MoCo checkpoint,
  plain torchvision ResNet state_dict), never guessed from the file name;
* the member's keys must form a complete, standard torchvision ResNet-18/34/50/101/152 (names and
  shapes checked against a shape-only torchvision model), otherwise ``MCLDetError``;
* the torchvision -> detectron2 renaming is explicit, logged key by key, and must be one-to-one;
* verification (on by default) loads the written ``.pkl`` through detectron2's own
  ``DetectionCheckpointer`` into its ResNet backbone, requires that no backbone parameter or
  buffer is missing, and compares res2..res5 with torchvision's layer1..layer4 in eval mode;
* the ``.pkl`` and its ``.yaml`` are written atomically, and only after verification passed.

Limits (honest): ResNeXt / wide ResNets (grouped or wider 3x3 convs) are refused rather than
converted; the verification input is one small random image, which catches wrong names, wrong
strides and wrong normalisation, not numerical issues that only appear at full resolution.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .utils.errors import MCLDetError
from .utils.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

COHORT_FORMAT = "mcl_det.pretrain/v1"

# torchvision's ImageNet normalisation, in RGB order and in 0..255 pixel units (detectron2's).
TORCHVISION_PIXEL_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_PIXEL_STD = [58.395, 57.12, 57.375]

# (blocks per stage, bottleneck?) -> depth, as in torchvision and detectron2.
_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
SUPPORTED_DEPTHS = (18, 34, 50, 101, 152)

# Relative tolerance of the res2..res5 comparison: max|d2 - tv| / max|tv| per stage.
VERIFY_RTOL = 1e-4

_BN_FIELDS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_RE_STEM_CONV = re.compile(r"^conv1\.weight$")
_RE_STEM_BN = re.compile(rf"^bn1\.{_BN_FIELDS}$")
_RE_CONV = re.compile(r"^layer([1-4])\.(\d+)\.conv([1-3])\.weight$")
_RE_BN = re.compile(rf"^layer([1-4])\.(\d+)\.bn([1-3])\.{_BN_FIELDS}$")
_RE_SC_CONV = re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$")
_RE_SC_BN = re.compile(rf"^layer([1-4])\.(\d+)\.downsample\.1\.{_BN_FIELDS}$")
_RE_FC = re.compile(r"^fc(\.|$)")


# --------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class MemberInfo:
    """One convertible network inside a checkpoint (a cohort member, or the only network)."""

    index: int
    arch: str | None  # torchvision name recorded in the checkpoint, if any
    prefix: str  # key prefix of its torchvision ResNet inside ``state``
    epochs: int | None
    metric_name: str | None
    metric_value: float | None
    metric_epoch: int | None = None


@dataclass
class SourceCheckpoint:
    """A checkpoint whose format has been recognised; ``state`` has no ``module.`` prefix."""

    path: str
    kind: str  # "mcl_det-selfsup" | "mcl_det-supervised" | "moco" | "torchvision"
    state: dict[str, torch.Tensor]
    members: list[MemberInfo]


def _load_torch_file(path: str) -> Any:
    if not os.path.exists(path):
        raise MCLDetError(f"input checkpoint not found: {path} (check the INPUT path)")
    if not os.path.isfile(path):
        raise MCLDetError(f"input checkpoint is not a file: {path} (give a .pth/.pth.tar file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise MCLDetError(
                f"cannot read checkpoint {path}: {_one_line(e)}; is it a complete torch.save file?"
            ) from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise MCLDetError(
            f"cannot read checkpoint {path}: {_one_line(e)}; is it a complete torch.save file?"
        ) from None
    # Resume state (numpy RNG state, argparse Namespace in MoCo files) needs full unpickling.
    # Only do this for files you trust: unpickling can run code.
    logger.warning("%s holds non-tensor Python objects; loading it with full unpickling", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MCLDetError(
            f"cannot read checkpoint {path}: {_one_line(e)}; is it a complete torch.save file?"
        ) from None


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return (msg[:300] + "...") if len(msg) > 300 else msg or type(e).__name__


def _strip_module(state: Mapping[str, Any], path: str) -> dict[str, torch.Tensor]:
    """Drop a DDP ``module.`` prefix, refusing files where stripping would merge two keys."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise MCLDetError(f"{path}: state_dict has a non-string key {k!r}; not a checkpoint")
        nk = k[len("module.") :] if k.startswith("module.") else k
        if nk in out:
            raise MCLDetError(
                f"{path}: keys '{nk}' and 'module.{nk}' both present; the file mixes a DDP and a "
                "plain state_dict, re-save it with one of them"
            )
        out[nk] = v
    return out


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _has_resnet(state: Mapping[str, Any], prefix: str) -> bool:
    return f"{prefix}conv1.weight" in state and f"{prefix}layer1.0.conv1.weight" in state


def _metric(d: Any) -> tuple[str | None, float | None, int | None]:
    if not isinstance(d, Mapping):
        return None, None, None
    v = d.get("value")
    v = float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None
    ep = d.get("epoch")
    return d.get("name"), v, int(ep) if isinstance(ep, (int, float)) else None


def read_checkpoint(path: str | os.PathLike) -> SourceCheckpoint:
    """Load ``path`` and recognise its format from its content; ``MCLDetError`` if unknown."""
    path = str(path)
    obj = _load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise MCLDetError(
            f"unrecognised checkpoint format in {path}: it holds a {type(obj).__name__}, not a "
            "dict; expected an mcl_det pretraining checkpoint, a MoCo checkpoint or a torchvision "
            "ResNet state_dict"
        )

    # 1) mcl_det cohort checkpoint (pretrain/main.py), possibly saved from a DDP module.
    if obj.get("format") == COHORT_FORMAT or (
        isinstance(obj.get("model"), Mapping)
        and any(str(k).replace("module.", "", 1).startswith("members.") for k in obj["model"])
    ):
        return _read_cohort(path, obj)

    # 2) MoCo: {"state_dict": {"module.encoder_q.*": ...}, "arch": ...}
    sd = obj.get("state_dict")
    if _is_tensor_dict(sd):
        sd = _strip_module(sd, path)
        if _has_resnet(sd, "encoder_q."):
            state = {k: v for k, v in sd.items() if k.startswith("encoder_q.")}
            arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
            ep = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
            member = MemberInfo(0, arch, "encoder_q.", ep, None, None)
            return SourceCheckpoint(path, "moco", state, [member])

    # 3) plain torchvision ResNet state_dict, bare or wrapped in "state_dict" / "model".
    for cand in (obj, obj.get("state_dict"), obj.get("model")):
        if _is_tensor_dict(cand):
            cand = _strip_module(cand, path)
            if _has_resnet(cand, ""):
                arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
                ep = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
                member = MemberInfo(0, arch, "", ep, None, None)
                return SourceCheckpoint(path, "torchvision", cand, [member])

    keys = sorted(str(k) for k in obj)[:8]
    raise MCLDetError(
        f"unrecognised checkpoint format in {path} (top-level keys {keys}); expected an mcl_det "
        "pretraining checkpoint, a MoCo checkpoint (state_dict with module.encoder_q.*) or a "
        "torchvision ResNet state_dict"
    )


def _read_cohort(path: str, obj: Mapping[str, Any]) -> SourceCheckpoint:
    model = obj.get("model")
    if not _is_tensor_dict(model):
        raise MCLDetError(
            f"{path}: mcl_det checkpoint without a 'model' state_dict; the file is damaged, "
            "use another checkpoint_*.pth of the run"
        )
    state = _strip_module(model, path)
    archs = obj.get("archs")
    found = sorted(
        {int(m.group(1)) for k in state if (m := re.match(r"^members\.(\d+)\.encoder\.", k))}
    )
    if not isinstance(archs, list):
        archs = [None] * (max(found) + 1 if found else 0)
    if not archs:
        raise MCLDetError(f"{path}: mcl_det checkpoint with no members; nothing to convert")
    metrics = obj.get("member_metrics")
    metrics = metrics if isinstance(metrics, list) else []
    epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    members = []
    for k, arch in enumerate(archs):
        name, value, m_epoch = _metric(metrics[k] if k < len(metrics) else None)
        members.append(
            MemberInfo(k, arch, f"members.{k}.encoder.", epoch, name, value, metric_epoch=m_epoch)
        )
    mode = obj.get("mode") if obj.get("mode") in ("selfsup", "supervised") else "selfsup"
    return SourceCheckpoint(path, f"mcl_det-{mode}", state, members)


def select_member(src: SourceCheckpoint, member: int | str) -> MemberInfo:
    """Resolve ``member`` (an index, its string, or ``"best"``) against ``src.members``."""
    n = len(src.members)
    if isinstance(member, str) and member.strip().lower() == "best":
        scored = [m for m in src.members if m.metric_value is not None]
        if not scored:
            if n == 1:
                return src.members[0]
            raise MCLDetError(
                f"{src.path}: no member has a recorded metric, so 'best' is undefined; "
                f"pick one with --member K (0..{n - 1}, see --list)"
            )
        return max(scored, key=lambda m: (m.metric_value, -m.index))  # ties -> lowest index
    try:
        idx = int(member)
    except (TypeError, ValueError):
        raise MCLDetError(
            f"bad member {member!r}; use an index 0..{n - 1} or 'best' (see --list)"
        ) from None
    if not 0 <= idx < n:
        raise MCLDetError(
            f"member {idx} out of range: {src.path} has {n} member(s); use --member 0..{n - 1} "
            "(see --list)"
        )
    return src.members[idx]


def list_members(path: str | os.PathLike) -> list[MemberInfo]:
    """The convertible networks of a checkpoint, for ``--list``."""
    return read_checkpoint(path).members


def format_member_table(members: list[MemberInfo]) -> str:
    """Plain-text table: index, architecture, epochs trained, recorded monitor metric."""
    rows = [("index", "arch", "epochs", "metric")]
    for m in members:
        if m.metric_value is not None:
            metric = f"{m.metric_name}={m.metric_value:.2f}"
            if m.metric_epoch is not None:
                metric += f" (epoch {m.metric_epoch})"
        else:
            metric = "-"
        epochs = "-" if m.epochs is None else str(m.epochs)
        rows.append((str(m.index), m.arch or "?", epochs, metric))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --------------------------------------------------------------------------------------------
# torchvision -> detectron2 names
# --------------------------------------------------------------------------------------------


def tv_to_d2_name(name: str) -> str | None:
    """detectron2 name of a torchvision ResNet key, ``None`` for keys to drop (classifier, BN
    counters); ``MCLDetError`` for a key that is not part of a torchvision ResNet."""
    if _RE_FC.match(name) or name.endswith("num_batches_tracked"):
        return None  # classifier / projection head in fc; FrozenBN keeps no batch counter
    if _RE_STEM_CONV.match(name):
        return "stem.conv1.weight"
    if m := _RE_STEM_BN.match(name):
        return f"stem.conv1.norm.{m.group(1)}"
    if m := _RE_CONV.match(name):
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.weight"
    if m := _RE_BN.match(name):
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.norm.{m.group(4)}"
    if m := _RE_SC_CONV.match(name):
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.weight"
    if m := _RE_SC_BN.match(name):
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.norm.{m.group(3)}"
    raise MCLDetError(
        f"key '{name}' is not part of a torchvision ResNet; only ResNet-18/34/50/101/152 "
        "backbones can be converted"
    )


def rename_to_d2(
    tv_state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename a torchvision ResNet state_dict to detectron2 names.

    Returns (d2_state, mapping source->target, dropped source keys). Every mapping is logged, and
    two source keys landing on one target is an error, never a silent overwrite.
    """
    d2_state: dict[str, torch.Tensor] = {}
    mapping: dict[str, str] = {}
    source_of: dict[str, str] = {}
    dropped: list[str] = []
    for name in sorted(tv_state):
        target = tv_to_d2_name(name)
        if target is None:
            dropped.append(name)
            logger.info("drop %s", name)
            continue
        if target in source_of:
            raise MCLDetError(
                f"both '{source_of[target]}' and '{name}' map to '{target}'; the checkpoint has "
                "duplicate backbone keys, re-save it with one copy"
            )
        source_of[target] = name
        mapping[name] = target
        d2_state[target] = tv_state[name]
        logger.info("map %s -> %s", name, target)
    return d2_state, mapping, dropped


def infer_depth(tv_state: Mapping[str, torch.Tensor]) -> int:
    """ResNet depth from the blocks per stage and the block type; ``MCLDetError`` otherwise."""
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in tv_state if (m := re.match(rf"^layer{stage}\.(\d+)\.", k))}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = "layer1.0.conv3.weight" in tv_state
    depth = _DEPTHS.get((tuple(blocks), bottleneck))
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise MCLDetError(
            f"not a standard ResNet: {kind} blocks per stage {blocks}; only ResNet-18/34/50/101/152 "
            "can be converted"
        )
    return depth


def _check_complete(tv_state: Mapping[str, torch.Tensor], depth: int) -> None:
    """Names and shapes must be exactly those of torchvision's resnet{depth} (minus fc)."""
    import torchvision

    with torch.device("meta"):  # shapes only: no memory, no init time
        ref = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    ref = {k: v for k, v in ref.items() if not _RE_FC.match(k)}
    ours = {k: v for k, v in tv_state.items() if not _RE_FC.match(k)}
    missing = sorted(set(ref) - set(ours))
    # num_batches_tracked is dropped anyway; older torchvision files do not have it.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise MCLDetError(
            f"incomplete ResNet-{depth}: {len(missing)} backbone tensor(s) missing, e.g. "
            f"{missing[:3]}; the checkpoint is damaged or was saved from a truncated model"
        )
    extra = sorted(set(ours) - set(ref))
    if extra:
        raise MCLDetError(
            f"unexpected keys for a ResNet-{depth}: {extra[:3]}; only standard torchvision "
            "ResNets can be converted"
        )
    for k, v in ours.items():
        if tuple(v.shape) != tuple(ref[k].shape):
            raise MCLDetError(
                f"{k} has shape {tuple(v.shape)}, a ResNet-{depth} has {tuple(ref[k].shape)}; "
                "ResNeXt / wide ResNets are not supported"
            )
        if k.endswith("num_batches_tracked"):
            continue
        if not v.is_floating_point():
            raise MCLDetError(f"{k} is not a floating-point tensor ({v.dtype}); damaged checkpoint")
        # One reduction per tensor is much cheaper than an elementwise isfinite; NaN/Inf always
        # propagate into the sum, and the exact test settles a (finite) overflowing sum.
        if not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            raise MCLDetError(
                f"{k} contains NaN/Inf; the run diverged, convert an earlier checkpoint"
            )


def extract_member(src: SourceCheckpoint, info: MemberInfo) -> tuple[dict[str, torch.Tensor], int]:
    """The member's torchvision ResNet state_dict (prefix removed) and its depth."""
    p = info.prefix
    tv_state = {k[len(p) :]: v for k, v in src.state.items() if k.startswith(p)}
    if info.arch is not None and not re.fullmatch(r"resnet(18|34|50|101|152)", info.arch):
        raise MCLDetError(
            f"member {info.index} is a '{info.arch}', not a ResNet-18/34/50/101/152; only those "
            "can be exported to detectron2"
        )
    if not _has_resnet(tv_state, ""):
        raise MCLDetError(
            f"member {info.index} of {src.path} has no ResNet weights under '{p}'; not a ResNet "
            "or a damaged checkpoint"
        )
    for k in tv_state:  # fail on foreign keys before anything else
        tv_to_d2_name(k)
    depth = infer_depth(tv_state)
    if info.arch is not None and info.arch != f"resnet{depth}":
        raise MCLDetError(
            f"member {info.index} is recorded as {info.arch} but its weights are a "
            f"resnet{depth}; the checkpoint is inconsistent"
        )
    _check_complete(tv_state, depth)
    return tv_state, depth


# --------------------------------------------------------------------------------------------
# Output: .pkl + .yaml
# --------------------------------------------------------------------------------------------


def d2_settings(depth: int) -> dict[str, Any]:
    """The detectron2 config values these weights need (nested, as in a detectron2 YAML)."""
    return {
        "INPUT": {"FORMAT": "RGB"},
        "MODEL": {
            "PIXEL_MEAN": list(TORCHVISION_PIXEL_MEAN),
            "PIXEL_STD": list(TORCHVISION_PIXEL_STD),
            "RESNETS": {
                "DEPTH": depth,
                "RES2_OUT_CHANNELS": 64 if depth in (18, 34) else 256,
                "STRIDE_IN_1X1": False,  # torchvision puts the stride in the 3x3 conv
            },
        },
    }


def yaml_path_for(weights_path: str | os.PathLike) -> Path:
    """``x/member0.pkl`` -> ``x/member0.yaml``."""
    return Path(weights_path).with_suffix(".yaml")


def _pkl_bytes(d2_state: Mapping[str, torch.Tensor]) -> bytes:
    model = {k: v.detach().cpu().numpy().copy() for k, v in d2_state.items()}
    obj = {"model": model, "__author__": "mcl_det", "matching_heuristics": True}
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _metric_str(info: MemberInfo) -> str:
    return "-" if info.metric_value is None else f"{info.metric_name}={info.metric_value:.4g}"


def _yaml_text(depth: int, src: SourceCheckpoint, info: MemberInfo) -> str:
    metric = _metric_str(info)
    header = [
        "# MCL_DET: detectron2 settings required by the weights beside this file",
        "# MCL_DET: written by tools/convert_to_d2.py; merge it after your detection config",
        f"# MCL_DET: source: {os.path.abspath(src.path)}",
        f"# MCL_DET: format: {src.kind}",
        f"# MCL_DET: member: {info.index} ({info.arch or f'resnet{depth}'}, "
        f"epochs {info.epochs if info.epochs is not None else '-'}, metric {metric})",
    ]
    # Hand-written rather than yaml.dump: block style, one key per line, easy to read and diff.
    # It is a valid detectron2 config fragment: cfg.merge_from_file(this) applies the settings.
    st = d2_settings(depth)
    m, r = st["MODEL"], st["MODEL"]["RESNETS"]
    body = "\n".join(
        [
            "INPUT:",
            f"  FORMAT: {st['INPUT']['FORMAT']}",
            "MODEL:",
            f"  PIXEL_MEAN: [{', '.join(str(x) for x in m['PIXEL_MEAN'])}]",
            f"  PIXEL_STD: [{', '.join(str(x) for x in m['PIXEL_STD'])}]",
            "  RESNETS:",
            f"    DEPTH: {r['DEPTH']}",
            f"    RES2_OUT_CHANNELS: {r['RES2_OUT_CHANNELS']}",
            f"    STRIDE_IN_1X1: {str(r['STRIDE_IN_1X1']).lower()}",
            "",
        ]
    )
    return "\n".join(header) + "\n" + body


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def build_d2_resnet(depth: int) -> torch.nn.Module:
    """detectron2's ResNet backbone with the settings of our .yaml and FrozenBN (= eval BN)."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()


def load_with_detectron2(model: torch.nn.Module, pkl_path: str) -> Any:
    """Load ``pkl_path`` exactly as detectron2 training does (``DetectionCheckpointer.load``,
    matching heuristics included) and return the incompatible keys it would only warn about."""
    from detectron2.checkpoint import DetectionCheckpointer

    class _Recording(DetectionCheckpointer):
        incompatible = None

        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    ckpt = _Recording(model)
    ckpt.load(pkl_path)
    return ckpt.incompatible


def _missing_backbone_keys(incompatible: Any, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    missing += [k for k, *_ in incompatible.incorrect_shapes]
    return sorted(k for k in missing if k.startswith(prefixes))


@torch.no_grad()
def verify_pkl(
    pkl_path: str, tv_state: Mapping[str, torch.Tensor], depth: int, size: int = 64
) -> dict[str, float]:
    """Compare detectron2 res2..res5 (weights from ``pkl_path``) with torchvision layer1..layer4
    (weights from ``tv_state``) on one random image. Returns max relative difference per stage;
    raises ``MCLDetError`` on a missing key or a difference above ``VERIFY_RTOL``."""
    import torchvision

    d2 = build_d2_resnet(depth)
    inc = load_with_detectron2(d2, pkl_path)
    missing = _missing_backbone_keys(inc)
    if missing or inc.unexpected_keys:
        raise MCLDetError(
            f"verification failed: detectron2 did not load {len(missing)} backbone tensor(s) "
            f"{missing[:3]} and found {len(inc.unexpected_keys)} unexpected "
            f"{list(inc.unexpected_keys)[:3]}; this is a converter bug, please report it"
        )
    d2.eval()

    with torch.device("meta"):  # skip the random init: every used tensor is assigned below
        tv = getattr(torchvision.models, f"resnet{depth}")()
    backbone = {k: v for k, v in tv_state.items() if not _RE_FC.match(k)}
    result = tv.load_state_dict(backbone, strict=False, assign=True)
    bad = [
        k for k in result.missing_keys if not (_RE_FC.match(k) or k.endswith("num_batches_tracked"))
    ] + list(result.unexpected_keys)
    if bad:
        raise MCLDetError(f"verification failed: torchvision model keys {bad[:3]}; converter bug")
    tv.eval()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=g)
    ours = d2(x)
    y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    diffs: dict[str, float] = {}
    for i, layer in enumerate((tv.layer1, tv.layer2, tv.layer3, tv.layer4)):
        y = layer(y)
        name = f"res{i + 2}"
        a = ours[name]
        if a.shape != y.shape:
            raise MCLDetError(
                f"verification failed: {name} has shape {tuple(a.shape)}, torchvision "
                f"layer{i + 1} {tuple(y.shape)}; converter bug"
            )
        rel = ((a - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
        diffs[name] = rel
        logger.info("verify %s vs layer%d: max relative difference %.3g", name, i + 1, rel)
        if not rel <= VERIFY_RTOL:  # also catches NaN
            raise MCLDetError(
                f"verification failed: detectron2 {name} differs from torchvision layer{i + 1} "
                f"by {rel:.3g} (relative, limit {VERIFY_RTOL:g}); no output written. This is a "
                "converter bug, please report it"
            )
    return diffs


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What was converted, where it went and how well it matched."""

    input_path: str
    output_path: str
    yaml_path: str
    source_format: str
    member: int
    arch: str
    depth: int
    num_tensors: int
    mapping: dict[str, str] = field(repr=False)
    dropped: list[str] = field(repr=False)
    verified: bool
    max_rel_diff: dict[str, float]
    seconds: float
    metric: str = "-"  # the member's recorded monitor metric, e.g. "knn_top1=53.1"

    def summary(self) -> str:
        v = (
            "verified: max relative difference "
            + ", ".join(f"{k} {d:.2g}" for k, d in self.max_rel_diff.items())
            if self.verified
            else "NOT verified (--no-verify)"
        )
        return (
            f"member {self.member} ({self.arch}, {self.source_format}) -> {self.output_path}: "
            f"{self.num_tensors} tensors, {len(self.dropped)} dropped; {v}; "
            f"settings in {self.yaml_path} ({self.seconds:.1f} s)"
        )


def convert_checkpoint(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    member: int | str = 0,
    verify: bool = True,
) -> ConversionReport:
    """Convert one member of ``input_path`` into detectron2 weights ``output_path`` (.pkl) plus
    its settings ``.yaml``. Nothing is written unless every check (and verification) passed."""
    t0 = time.perf_counter()
    input_path, output_path = str(input_path), str(output_path)
    if not output_path.endswith(".pkl"):
        raise MCLDetError(
            f"output must end with .pkl (detectron2 reads only .pkl files as converted weights): "
            f"{output_path}"
        )
    if os.path.abspath(output_path) == os.path.abspath(input_path):
        raise MCLDetError("output path equals the input path; choose another OUTPUT")
    if os.path.isdir(output_path):
        raise MCLDetError(f"output {output_path} is a directory; give a file name ending in .pkl")

    src = read_checkpoint(input_path)
    info = select_member(src, member)
    logger.info(
        "%s: %s checkpoint, converting member %d (%s)",
        input_path,
        src.kind,
        info.index,
        info.arch or "arch not recorded",
    )
    tv_state, depth = extract_member(src, info)
    d2_state, mapping, dropped = rename_to_d2(tv_state)
    logger.info("%d tensors mapped, %d dropped", len(mapping), len(dropped))
    blob = _pkl_bytes(d2_state)
    yaml_text = _yaml_text(depth, src, info)

    diffs: dict[str, float] = {}
    if verify:
        # Verify the exact bytes we are about to write, read back by detectron2 itself.
        with tempfile.TemporaryDirectory(prefix="mcl_det_convert_") as tmp:
            tmp_pkl = os.path.join(tmp, "weights.pkl")
            with open(tmp_pkl, "wb") as f:
                f.write(blob)
            diffs = verify_pkl(tmp_pkl, tv_state, depth)

    atomic_write_bytes(output_path, blob)
    yaml_out = yaml_path_for(output_path)
    atomic_write_text(yaml_out, yaml_text)
    return ConversionReport(
        input_path=input_path,
        output_path=output_path,
        yaml_path=str(yaml_out),
        source_format=src.kind,
        member=info.index,
        arch=info.arch or f"resnet{depth}",
        depth=depth,
        num_tensors=len(d2_state),
        mapping=mapping,
        dropped=dropped,
        verified=verify,
        max_rel_diff=diffs,
        seconds=time.perf_counter() - t0,
        metric=_metric_str(info),
    )


# --------------------------------------------------------------------------------------------
# Checking a detection config against converted weights (used by tools/train_net.py)
# --------------------------------------------------------------------------------------------

_CHECKED_KEYS = (
    "INPUT.FORMAT",
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "MODEL.RESNETS.DEPTH",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "MODEL.RESNETS.STRIDE_IN_1X1",
)


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif not isinstance(node, Mapping) and hasattr(node, part):
            node = getattr(node, part)
        else:
            return _MISSING
    return node


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-3)
    return a == b


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def check_weights_against_config(cfg: Any, weights_path: str | os.PathLike) -> None:
    """Refuse a detectron2 ``cfg`` that does not match the settings saved beside ``weights_path``.

    Weights converted by mcl_det need RGB input, torchvision normalisation, the stride in the 3x3
    conv and the right depth; any other setting trains silently worse (or fails to load), so a
    mismatch is an ``MCLDetError`` naming each key, both values and the override that fixes it.
    Weights without our YAML (detectron2 model zoo, URLs) are accepted unchecked.
    """
    if not weights_path:
        return
    wp = str(weights_path)
    if "://" in wp:
        return  # model-zoo / remote weights: nothing of ours to check against
    ypath = yaml_path_for(wp)
    if not ypath.is_file():
        return
    text = ypath.read_text(encoding="utf-8")
    if "# MCL_DET:" not in text:
        return  # somebody else's YAML that happens to sit beside the weights
    try:
        need = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise MCLDetError(
            f"cannot parse {ypath}: {_one_line(e)}; re-run tools/convert_to_d2.py to rewrite it"
        ) from None
    problems, fixes = [], []
    for key in _CHECKED_KEYS:
        want = _get(need, key)
        if want is _MISSING:
            continue
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
