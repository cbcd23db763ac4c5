"""Linear evaluation of one cohort member (MoCo protocol).

The backbone is frozen AND kept in eval mode (BN statistics fixed), only a Linear classifier on
the pooled features is trained: SGD lr 30 (per 256 images), momentum 0.9, wd 0, 100 epochs, lr x0.1
at epochs 60 and 80, RandomResizedCrop + flip. After training the backbone is compared with its
initial state, so an accidental update (a forgotten eval() or requires_grad) cannot go unnoticed.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from ..config import merge_cfg, save_cfg
from ..utils.errors import MCLDetError
from ..utils.io import atomic_write_json
from ..utils.malloc import keep_freed_memory
from ..utils.rundir import check_output_path
from .checkpoint import load_checkpoint, member_state
from .config import check_cfg, get_pretrain_cfg
from .data import InputPipeline, SafeImageFolder, eval_transform, resolve_data_root
from .distributed import pick_device
from .engine import epoch_steps
from .models import build_resnet, resnet_features


def load_member_backbone(ckpt: dict[str, Any], member: int) -> tuple[nn.Module, str]:
    """Member ``member``'s backbone (query encoder) as a torchvision ResNet without ``fc``."""
    archs = ckpt["archs"]
    if not 0 <= member < len(archs):
        raise MCLDetError(
            f"member index {member} out of range: the checkpoint has {len(archs)} members "
            f"(0..{len(archs) - 1}); pass --member between them"
        )
    state = {k: v for k, v in member_state(ckpt, member).items() if not k.startswith("fc.")}
    net = build_resnet(archs[member])
    net.load_state_dict(state, strict=True)
    return net, archs[member]


def linear_eval_cfg(ckpt: dict[str, Any], config_file: str | None, opts: list[str]) -> CfgNode:
    """The pretraining config stored in the checkpoint, then a file and KEY VALUE overrides."""
    cfg = get_pretrain_cfg()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(ckpt["config"]))
    merge_cfg(cfg, config_file, opts)
    check_cfg(cfg)
    cfg.freeze()
    return cfg


def run_linear_eval(
    ckpt_path: str,
    member: int,
    config_file: str | None = None,
    opts: list[str] | None = None,
    output_dir: str | None = None,
    unsafe_load: bool = False,
) -> dict[str, Any]:
    """Train a linear classifier on member ``member``'s frozen backbone; returns/writes top-1.
    ``output_dir`` (default: ``linear_eval_member{member}`` next to the checkpoint) is checked
    before anything is loaded. ``unsafe_load`` unpickles a checkpoint that holds more than
    tensors and plain values."""
    out = Path(output_dir or Path(ckpt_path).parent / f"linear_eval_member{member}")
    check_output_path(out, "dir", "--output-dir")
    ckpt = load_checkpoint(ckpt_path, unsafe=unsafe_load, opt_in="--unsafe-load")
    cfg = linear_eval_cfg(ckpt, config_file, list(opts or []))
    torch.manual_seed(cfg.SEED)
    backbone, arch = load_member_backbone(ckpt, member)
    device = pick_device(cfg.DEVICE)
    if device.type == "cpu" and cfg.CPU_KEEP_FREED_MEMORY:
        keep_freed_memory()  # see mcl_det/utils/malloc.py
    backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad = False
    reference = copy.deepcopy(backbone.state_dict())

    root = resolve_data_root(cfg)
    size, lc = cfg.DATA.IMAGE_SIZE, cfg.LINEAR
    pipeline = InputPipeline(cfg, device, mode="supervised")  # crop + flip; normalise below
    train_set = SafeImageFolder(root / cfg.DATA.TRAIN_DIR, pipeline.train_transform, cfg.SEED)
    val_set = SafeImageFolder(
        root / cfg.DATA.VAL_DIR, eval_transform(size, cfg.DATA.EVAL_CROP), cfg.SEED
    )
    bs = min(lc.IMS_PER_BATCH, len(train_set))
    g = torch.Generator().manual_seed(cfg.SEED)
    nw = cfg.DATA.NUM_WORKERS
    train_loader = DataLoader(
        train_set, bs, shuffle=True, drop_last=True, num_workers=nw, generator=g
    )
    val_loader = DataLoader(val_set, bs, num_workers=nw)

    classes = len(train_set.classes)
    head = nn.Linear(backbone.feat_dim, classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    lr = lc.LR * bs / 256
    opt = torch.optim.SGD(
        head.parameters(), lr=lr, momentum=lc.MOMENTUM, weight_decay=lc.WEIGHT_DECAY
    )
    lr_of_epoch = epoch_steps(lr, 0.1, lc.STEPS, lc.EPOCHS)
    it, t0 = 0, time.time()
    for epoch in range(lc.EPOCHS):
        for group in opt.param_groups:
            group["lr"] = lr_of_epoch(epoch)
        for x, y, _ in train_loader:
            with torch.no_grad():
                f = resnet_features(backbone, pipeline.images(x))  # NxD, frozen
            loss = F.cross_entropy(head(f), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            if lc.MAX_ITER and it >= lc.MAX_ITER:
                break
        if lc.MAX_ITER and it >= lc.MAX_ITER:
            break

    for k, v in backbone.state_dict().items():
        if not torch.equal(v, reference[k]):
            raise RuntimeError(f"linear eval changed the frozen backbone ({k}): this is a bug")

    correct = n = 0
    with torch.no_grad():
        for x, y, _ in val_loader:
            pred = head(resnet_features(backbone, x.to(device))).argmax(1).cpu()
            correct += int((pred == y).sum())
            n += len(y)
    result = {
        "checkpoint": str(ckpt_path),
        "member": member,
        "arch": arch,
        "top1": 100.0 * correct / max(n, 1),
        "iterations": it,
        "epochs": lc.EPOCHS,
        "lr": lr,
        "backbone_unchanged": True,
        "wall_time_s": round(time.time() - t0, 2),
    }
    save_cfg(cfg, out / "config.yaml")
    atomic_write_json(out / "linear_eval.json", result)
    return result
