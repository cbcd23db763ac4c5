"""Export one cohort member (or a baseline ResNet) to detectron2 weights, verified numerically.

A converter that silently loads nothing loses weeks (detectron2 merely *warns* before training from
random init), so every step here fails loudly: the input format is detected from the content and
read without running code from it; the member must be a complete torchvision ResNet (names and
shapes checked against a shape-only model); the renaming is explicit, logged and one-to-one; the
written bytes are loaded by detectron2's ``DetectionCheckpointer`` and res2..res5 compared with
torchvision's layer1..layer4; only then are the ``.pkl`` and its settings ``.yaml`` written.
ResNeXt / wide ResNets are refused; one small random image catches wrong names, strides and
normalisation, not full-resolution numerics.
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
from typing import Any

import torch
from tabulate import tabulate

from .pretrain.checkpoint import is_cohort_checkpoint, member_indices, member_state
from .utils.errors import MCLDetError
from .utils.io import atomic_write_bytes, atomic_write_text, load_torch
from .weights_settings import (
    WEIGHTS_AUTHOR,
    d2_settings,
    settings_yaml,
    yaml_path_for,
)

logger = logging.getLogger(__name__)

# blocks per stage of torchvision's (and detectron2's) ResNets; 50+ use bottleneck blocks
_BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
_RESNETS = "ResNet-" + "/".join(map(str, _BLOCKS))  # "ResNet-18/34/50/101/152", for messages
VERIFY_RTOL = 1e-4  # limit of max|d2 - tv| / max|tv| per stage
_BUG = "this is a converter bug, please report it"

_BN = r"(?P<f>weight|bias|running_mean|running_var)"
_BLOCK = r"layer(?P<s>[1-4])\.(?P<b>\d+)\."
# torchvision name (full match) -> detectron2 name; {s} is the torchvision stage (res = s + 1).
_RULES = {
    r"conv1\.weight": "stem.conv1.weight",
    rf"bn1\.{_BN}": "stem.conv1.norm.{f}",
    rf"{_BLOCK}conv(?P<c>[1-3])\.weight": "res{s}.{b}.conv{c}.weight",
    rf"{_BLOCK}bn(?P<c>[1-3])\.{_BN}": "res{s}.{b}.conv{c}.norm.{f}",
    rf"{_BLOCK}downsample\.0\.weight": "res{s}.{b}.shortcut.weight",
    rf"{_BLOCK}downsample\.1\.{_BN}": "res{s}.{b}.shortcut.norm.{f}",
}


@dataclass
class MemberInfo:
    """One convertible network inside a checkpoint (a cohort member, or the only network)."""

    index: int
    arch: str | None  # torchvision name recorded in the checkpoint, if any
    epochs: int | None
    metric_name: str | None = None
    metric_value: float | None = None
    metric_epoch: int | None = None


@dataclass
class SourceCheckpoint:
    """A recognised checkpoint: per member, its torchvision ResNet state_dict (no prefixes)."""

    path: str
    kind: str  # "mcl_det-selfsup" | "mcl_det-supervised" | "moco" | "torchvision"
    states: list[dict[str, torch.Tensor]]
    members: list[MemberInfo]


# -------------------- input format


def _strip_module(state: Mapping[str, Any], path: str) -> dict[str, torch.Tensor]:
    """Drop a DDP ``module.`` prefix, refusing files where stripping would merge two keys."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise MCLDetError(f"{path}: state_dict has a non-string key {k!r}; not a checkpoint")
        if (nk := k.removeprefix("module.")) in out:
            raise MCLDetError(
                f"{path}: keys '{nk}' and 'module.{nk}' both present; the file mixes a DDP and a "
                "plain state_dict, re-save it with one of them"
            )
        out[nk] = v
    return out


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _has_resnet(state: Mapping[str, Any], prefix: str = "") -> bool:
    return f"{prefix}conv1.weight" in state and f"{prefix}layer1.0.conv1.weight" in state


def _num(v: Any, cast: type = int) -> Any:
    """``cast(v)`` for a finite number recorded in a checkpoint, else ``None``."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return cast(v) if ok else None


def read_checkpoint(path: str | os.PathLike, unsafe: bool = False) -> SourceCheckpoint:
    """Load ``path`` and recognise its format from its content; ``MCLDetError`` if unknown.
    ``unsafe`` (``--unsafe-load``) allows full unpickling: only for files you trust."""
    path = str(path)
    obj = load_torch(path, unsafe=unsafe, what="input checkpoint")
    if is_cohort_checkpoint(obj):
        return _read_cohort(path, obj)
    held = f"a {type(obj).__name__}, not a dict"
    if isinstance(obj, Mapping):
        arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
        member = MemberInfo(0, arch, _num(obj.get("epoch")))
        for kind, cand, prefix in (
            ("moco", obj.get("state_dict"), "encoder_q."),  # {"state_dict": {"module.encoder_q.*"}}
            ("torchvision", obj, ""),  # bare, or wrapped in "state_dict" / "model"
            ("torchvision", obj.get("state_dict"), ""),
            ("torchvision", obj.get("model"), ""),
        ):
            if _is_tensor_dict(cand) and _has_resnet(sd := _strip_module(cand, path), prefix):
                state = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
                return SourceCheckpoint(path, kind, [state], [member])
        held = f"top-level keys {sorted(str(k) for k in obj)[:8]}"
    raise MCLDetError(
        f"unrecognised checkpoint format in {path} ({held}); expected an mcl_det pretraining "
        "checkpoint, a MoCo checkpoint (state_dict with module.encoder_q.*) or a torchvision "
        "ResNet state_dict"
    )


def _read_cohort(path: str, obj: Mapping[str, Any]) -> SourceCheckpoint:
    if not _is_tensor_dict(obj.get("model")):
        raise MCLDetError(
            f"{path}: mcl_det checkpoint without a 'model' state_dict; the file is damaged, "
            "use another checkpoint_*.pth of the run"
        )
    ckpt = {**obj, "model": _strip_module(obj["model"], path)}  # possibly saved from DDP
    archs = obj.get("archs")
    if not isinstance(archs, list):
        archs = [None] * (max(member_indices(ckpt), default=-1) + 1)
    if not archs:
        raise MCLDetError(f"{path}: mcl_det checkpoint with no members; nothing to convert")
    metrics = obj.get("member_metrics") if isinstance(obj.get("member_metrics"), list) else []
    members = []
    for k, arch in enumerate(archs):
        m = metrics[k] if k < len(metrics) and isinstance(metrics[k], Mapping) else {}
        value, epoch = _num(m.get("value"), float), _num(m.get("epoch"))
        members.append(MemberInfo(k, arch, _num(obj.get("epoch")), m.get("name"), value, epoch))
    mode = obj.get("mode") if obj.get("mode") in ("selfsup", "supervised") else "selfsup"
    states = [member_state(ckpt, k) for k in range(len(archs))]
    return SourceCheckpoint(path, f"mcl_det-{mode}", states, members)


def select_member(src: SourceCheckpoint, member: int | str) -> MemberInfo:
    """Resolve ``member`` (an index, its string, or ``"best"``) against ``src.members``."""
    n = len(src.members)
    if isinstance(member, str) and member.strip().lower() == "best":
        scored = [m for m in src.members if m.metric_value is not None]
        if not scored and n > 1:
            raise MCLDetError(
                f"{src.path}: no member has a recorded metric, so 'best' is undefined; "
                f"pick one with --member K (0..{n - 1}, see --list)"
            )
        # ties -> lowest index
        return max(scored, key=lambda m: (m.metric_value, -m.index)) if scored else src.members[0]
    if not (str(member).strip().isdigit() and int(member) < n):
        raise MCLDetError(
            f"member {member} out of range: {src.path} has {n} member(s); use --member "
            f"0..{n - 1} or best (see --list)"
        )
    return src.members[int(member)]


def _metric_str(info: MemberInfo, fmt: str = ".4g") -> str:
    return "-" if info.metric_value is None else f"{info.metric_name}={info.metric_value:{fmt}}"


def format_member_table(members: list[MemberInfo]) -> str:
    """Plain-text table: index, architecture, epochs trained, recorded monitor metric."""
    rows = []
    for m in members:
        metric = _metric_str(m, ".2f")
        if m.metric_value is not None and m.metric_epoch is not None:
            metric += f" (epoch {m.metric_epoch})"
        rows.append((m.index, m.arch or "?", "-" if m.epochs is None else m.epochs, metric))
    head = ("index", "arch", "epochs", "metric")
    return tabulate(rows, head, tablefmt="plain", disable_numparse=True, stralign="left")


# -------------------- torchvision -> detectron2 names


def _kept(name: str) -> bool:
    """Whether detectron2 receives this tensor: not the classifier / projection head (``fc``),
    not a BN batch counter (FrozenBN keeps none; older torchvision files lack them)."""
    return not (name == "fc" or name.startswith("fc.") or name.endswith("num_batches_tracked"))


def tv_to_d2_name(name: str) -> str | None:
    """detectron2 name of a torchvision ResNet key, ``None`` for keys to drop (classifier, BN
    counters); ``MCLDetError`` for a key that is not part of a torchvision ResNet."""
    if not _kept(name):
        return None
    for pattern, template in _RULES.items():
        if m := re.fullmatch(pattern, name):
            parts = m.groupdict()
            if "s" in parts:
                parts["s"] = int(parts["s"]) + 1
            return template.format(**parts)
    raise MCLDetError(
        f"key '{name}' is not part of a torchvision ResNet; only {_RESNETS} backbones can be "
        "converted"
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
    dropped: list[str] = []
    for name in sorted(tv_state):
        target = tv_to_d2_name(name)
        if target is None:
            dropped.append(name)
            logger.info("drop %s", name)
            continue
        if target in d2_state:
            first = next(k for k, t in mapping.items() if t == target)
            raise MCLDetError(
                f"both '{first}' and '{name}' map to '{target}'; the checkpoint has duplicate "
                "backbone keys, re-save it with one copy"
            )
        mapping[name], d2_state[target] = target, tv_state[name]
        logger.info("map %s -> %s", name, target)
    return d2_state, mapping, dropped


def infer_depth(tv_state: Mapping[str, torch.Tensor]) -> int:
    """ResNet depth from the blocks per stage and the block type; ``MCLDetError`` otherwise."""
    blocks = []
    for stage in range(1, 5):
        idx = {int(m[1]) for k in tv_state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(idx, default=-1) + 1)
    bottleneck = "layer1.0.conv3.weight" in tv_state
    for depth, b in _BLOCKS.items():
        if b == tuple(blocks) and (depth >= 50) == bottleneck:
            return depth
    raise MCLDetError(
        f"not a standard ResNet: {'bottleneck' if bottleneck else 'basic'} blocks per stage "
        f"{blocks}; only {_RESNETS} can be converted"
    )


def _tv_model(depth: int) -> torch.nn.Module:
    import torchvision

    with torch.device("meta"):  # shapes only: no memory, no init time
        return getattr(torchvision.models, f"resnet{depth}")()


def extract_member(src: SourceCheckpoint, info: MemberInfo) -> tuple[dict[str, torch.Tensor], int]:
    """The member's torchvision ResNet state_dict and its depth, checked to be complete: names
    and shapes exactly those of torchvision's resnet{depth} (fc aside), finite float weights."""
    tv_state, i = src.states[info.index], info.index
    if info.arch is not None and info.arch not in {f"resnet{d}" for d in _BLOCKS}:
        raise MCLDetError(
            f"member {i} is a '{info.arch}', not a {_RESNETS}; only those can be exported to "
            "detectron2"
        )
    if not _has_resnet(tv_state):
        raise MCLDetError(f"member {i} of {src.path} has no ResNet weights; damaged checkpoint?")
    depth = infer_depth(tv_state)
    if info.arch is not None and info.arch != f"resnet{depth}":
        raise MCLDetError(
            f"member {i} is recorded as {info.arch} but its weights are a resnet{depth}; the "
            "checkpoint is inconsistent"
        )
    ref = {k: v for k, v in _tv_model(depth).state_dict().items() if _kept(k)}
    ours = {k: v for k, v in tv_state.items() if _kept(k)}
    if missing := sorted(set(ref) - set(ours)):
        raise MCLDetError(
            f"incomplete ResNet-{depth}: {len(missing)} backbone tensor(s) missing, e.g. "
            f"{missing[:3]}; the checkpoint is damaged or was saved from a truncated model"
        )
    if extra := sorted(set(ours) - set(ref)):
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
        if not v.is_floating_point():
            raise MCLDetError(f"{k} is not a floating-point tensor ({v.dtype}); damaged checkpoint")
        # One reduction per tensor is much cheaper than an elementwise isfinite; NaN/Inf always
        # propagate into the sum, and the exact test settles a (finite) overflowing sum.
        if not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            raise MCLDetError(f"{k} contains NaN/Inf; the run diverged, convert an earlier one")
    return tv_state, depth


# -------------------- verification


def build_d2_resnet(depth: int) -> torch.nn.Module:
    """detectron2's ResNet backbone with the settings of our .yaml and FrozenBN (= eval BN)."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()
    cfg.merge_from_other_cfg(d2_settings(depth))
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()


def load_with_detectron2(model: torch.nn.Module, pkl_path: str) -> Any:
    """Load ``pkl_path`` exactly as detectron2 training does (``DetectionCheckpointer.load``,
    matching heuristics included) and return the incompatible keys it would only warn about."""
    from detectron2.checkpoint import DetectionCheckpointer

    class _Recording(DetectionCheckpointer):
        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    ckpt = _Recording(model)
    ckpt.load(pkl_path)
    return ckpt.incompatible


@torch.no_grad()
def verify_pkl(
    pkl_path: str, tv_state: Mapping[str, torch.Tensor], depth: int, size: int = 64
) -> dict[str, float]:
    """Compare detectron2 res2..res5 (weights from ``pkl_path``) with torchvision layer1..layer4
    (weights from ``tv_state``) on one random image. Returns max relative difference per stage;
    raises ``MCLDetError`` on a missing key or a difference above ``VERIFY_RTOL``."""
    d2 = build_d2_resnet(depth)
    inc = load_with_detectron2(d2, pkl_path)
    missing = sorted(
        [k for k in inc.missing_keys if _kept(k)] + [k for k, *_ in inc.incorrect_shapes]
    )
    if missing or inc.unexpected_keys:
        raise MCLDetError(
            f"verification failed: detectron2 did not load {len(missing)} backbone tensor(s) "
            f"{missing[:3]} and found {len(inc.unexpected_keys)} unexpected "
            f"{list(inc.unexpected_keys)[:3]}; {_BUG}"
        )
    tv = _tv_model(depth)  # every used tensor is assigned (names checked by extract_member)
    tv.load_state_dict({k: v for k, v in tv_state.items() if _kept(k)}, False, assign=True)
    tv.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours, y = d2(x), tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    diffs: dict[str, float] = {}
    for i, layer in enumerate((tv.layer1, tv.layer2, tv.layer3, tv.layer4)):
        y, name = layer(y), f"res{i + 2}"
        d = (ours[name] - y).abs().max() if ours[name].shape == y.shape else torch.tensor(math.inf)
        diffs[name] = rel = (d / y.abs().max().clamp_min(1e-12)).item()
        logger.info("verify %s vs layer%d: max relative difference %.3g", name, i + 1, rel)
        if not rel <= VERIFY_RTOL:  # also catches NaN
            raise MCLDetError(
                f"verification failed: detectron2 {name} {tuple(ours[name].shape)} differs from "
                f"torchvision layer{i + 1} {tuple(y.shape)} by {rel:.3g} (relative, limit "
                f"{VERIFY_RTOL:g}); no output written; {_BUG}"
            )
    return diffs


# -------------------- public API


@dataclass
class ConversionReport:
    """What was converted, where it went and how well it matched."""

    output_path: str
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
        diffs = ", ".join(f"{k} {d:.2g}" for k, d in self.max_rel_diff.items())
        v = f"verified: max relative difference {diffs}" if self.verified else "NOT verified"
        return (
            f"member {self.member} ({self.arch}, {self.source_format}) -> {self.output_path}: "
            f"{self.num_tensors} tensors, {len(self.dropped)} dropped; "
            f"{v if self.verified else v + ' (--no-verify)'}; "
            f"settings in {yaml_path_for(self.output_path)} ({self.seconds:.1f} s)"
        )


def convert_checkpoint(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    member: int | str = 0,
    verify: bool = True,
    unsafe: bool = False,
) -> ConversionReport:
    """Convert one member of ``input_path`` into detectron2 weights ``output_path`` (.pkl) plus
    its settings ``.yaml``. Nothing is written unless every check (and verification) passed.
    ``unsafe`` allows full unpickling of the input: only for files you trust."""
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

    src = read_checkpoint(input_path, unsafe=unsafe)
    info = select_member(src, member)
    tv_state, depth = extract_member(src, info)
    arch = info.arch or f"resnet{depth}"
    logger.info("%s: %s checkpoint, member %d (%s)", input_path, src.kind, info.index, arch)
    d2_state, mapping, dropped = rename_to_d2(tv_state)
    logger.info("%d tensors mapped, %d dropped", len(mapping), len(dropped))
    model = {k: v.detach().cpu().numpy().copy() for k, v in d2_state.items()}
    blob = pickle.dumps(
        {"model": model, "__author__": WEIGHTS_AUTHOR, "matching_heuristics": True},
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    diffs: dict[str, float] = {}
    if verify:  # verify the exact bytes we are about to write, read back by detectron2 itself
        with tempfile.TemporaryDirectory(prefix="mcl_det_convert_") as tmp:
            atomic_write_bytes(tmp_pkl := os.path.join(tmp, "weights.pkl"), blob)
            diffs = verify_pkl(tmp_pkl, tv_state, depth)

    epochs = "-" if info.epochs is None else info.epochs
    header = [
        "detectron2 settings required by the weights beside this file",
        "written by tools/convert_to_d2.py; merge it after your detection config",
        f"source: {os.path.abspath(src.path)}",
        f"format: {src.kind}",
        f"member: {info.index} ({arch}, epochs {epochs}, metric {_metric_str(info)})",
    ]
    atomic_write_bytes(output_path, blob)
    atomic_write_text(yaml_path_for(output_path), settings_yaml(depth, header))
    return ConversionReport(
        output_path=output_path,
        source_format=src.kind,
        member=info.index,
        arch=arch,
        depth=depth,
        num_tensors=len(d2_state),
        mapping=mapping,
        dropped=dropped,
        verified=verify,
        max_rel_diff=diffs,
        seconds=time.perf_counter() - t0,
        metric=_metric_str(info),
    )
