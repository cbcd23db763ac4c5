"""MCL pretraining loop (self-supervised on MoCo v2, or supervised), one process or DDP.

One iteration, self-supervised (every member sees the same two crops):
    qs, ks = cohort(x_q, x_k)                  # momentum update, shuffle-BN keys
    logits[a][b] = [q_a.k_b, q_a.Queue_b]/tau  # losses.cohort_logits, fp32
    loss = combine(mcl_loss_terms(logits))     # VCL + ICL + SoftVCL + SoftICL
    backward, SGD step, enqueue(ks)            # all queues at the same pointer: lockstep
Supervised: loss = sum_m CE_m + alpha VCL + beta ICL + gamma SoftVCL + lambda SoftICL, with a
memory bank per member (shared sampled indices) or in-batch SupCon contrast.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..config import save_cfg
from ..utils.errors import MCLDetError
from ..utils.malloc import keep_freed_memory
from . import distributed as du
from . import losses
from .checkpoint import LAST, load_checkpoint, load_model_state, save_checkpoint, set_rng_state
from .checkpoint import unwrap as unwrap_model
from .config import member_archs
from .data import (
    EpochBatchSampler,
    InputPipeline,
    SafeImageFolder,
    eval_transform,
    resolve_data_root,
)
from .models import build_cohort
from .monitor import Logger, Progress, knn_top1, member_metrics

WEIGHT_KEYS = {
    "vcl": "W_VCL",
    "icl": "W_ICL",
    "soft_vcl": "W_SOFT_VCL",
    "soft_icl": "W_SOFT_ICL",
}


def loss_weights(cfg) -> dict[str, float]:
    """The four interaction weights by loss-term name (0 = term skipped entirely)."""
    return {name: float(cfg.LOSS[key]) for name, key in WEIGHT_KEYS.items()}


def pick_device(cfg, local_rank: int = 0) -> torch.device:
    name = cfg.DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast_ctx(cfg, device: torch.device):
    """bf16 / fp16 autocast for the networks; losses are computed in fp32 outside of it."""
    amp = cfg.SOLVER.AMP
    if not amp:
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise MCLDetError(f"unknown SOLVER.AMP {amp!r}; use bf16, fp16 or leave it empty")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_at(cfg, iteration: int, iters_per_epoch: int, total_iters: int) -> float:
    """Learning rate at an iteration: linear scaling by batch, then cosine or step schedule."""
    base = cfg.SOLVER.BASE_LR * cfg.SOLVER.IMS_PER_BATCH / cfg.SOLVER.REFERENCE_BATCH
    if cfg.SOLVER.SCHEDULE == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * iteration / max(total_iters, 1)))
    if cfg.SOLVER.SCHEDULE == "step":
        epoch = iteration // max(iters_per_epoch, 1)
        return base * cfg.SOLVER.GAMMA ** sum(epoch >= s for s in cfg.SOLVER.STEPS)
    raise MCLDetError(f"unknown SOLVER.SCHEDULE {cfg.SOLVER.SCHEDULE!r}; use cosine or step")


def class_blocks(targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, count) of each class in a class-sorted sample list (SafeImageFolder order)."""
    t = torch.as_tensor(targets)
    if bool((t[1:] < t[:-1]).any()):
        raise RuntimeError("bank sampling needs samples sorted by class")
    count = torch.bincount(t)
    start = torch.cumsum(count, 0) - count
    return start, count


def sample_bank_indices(
    labels: torch.Tensor, idx: torch.Tensor, start: torch.Tensor, count: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One same-class positive (not the anchor itself when its class has another image) and k
    negatives from other classes per anchor; used for EVERY member (aligned distributions).

    labels, idx: B (class, dataset index) -> pos: B, neg: Bxk. Uses the global torch RNG.
    """
    n_total = int(count.sum())
    s, c = start[labels], count[labels]  # B
    r = (torch.rand(labels.shape) * (c - 1).clamp(min=1)).long()  # B, in [0, c-2]
    pos = s + r
    pos = torch.where(pos >= idx, pos + 1, pos)  # skip the anchor itself
    pos = torch.where(c > 1, pos, idx)  # a class with one image: the anchor is its own positive
    r = (torch.rand(labels.shape[0], k) * (n_total - c).unsqueeze(1)).long()  # Bxk
    neg = torch.where(r >= s.unsqueeze(1), r + c.unsqueeze(1), r)  # jump over the class block
    return pos, neg


def selfsup_loss(
    model: nn.Module,
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    tau: float,
    T: float,
    weights: dict[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """One self-supervised MCL loss: networks under the caller's autocast, the M x M logits and
    the four terms in fp32 (a softmax over 65k bf16 logits would lose the small probabilities).

    Returns (loss, terms, keys); call ``enqueue(keys)`` after the optimizer step.
    """
    qs, ks = model(x_q, x_k)
    with torch.autocast(device_type=x_q.device.type, enabled=False):
        qs, ks = [q.float() for q in qs], [k.float() for k in ks]
        needed = losses.needed_terms(weights)
        queues = unwrap_model(model).queue_list()
        logits = losses.cohort_logits(qs, ks, queues, tau, cross=losses.needs_cross(needed))
        terms = losses.mcl_loss_terms(logits, T=T, needed=needed)
        return losses.combine(terms, weights), terms, ks


class Trainer:
    """Owns the cohort, data, optimizer and state of one pretraining run (rank-aware)."""

    def __init__(self, cfg, resume: bool = False) -> None:
        self.cfg = cfg
        self.archs = member_archs(cfg)
        cfg.defrost()
        cfg.MODEL.ARCHS = list(self.archs)  # the resolved config names every member
        cfg.MODEL.COHORT = len(self.archs)
        cfg.freeze()
        dev_type = pick_device(cfg).type  # nccl for cuda, gloo for cpu
        self.rank, self.world, local = du.init_distributed(dev_type)
        self.device = pick_device(cfg, local)
        self.main = self.rank == 0
        if self.device.type == "cpu" and cfg.CPU_KEEP_FREED_MEMORY:
            keep_freed_memory()  # see mcl_det/utils/malloc.py; a no-op off glibc
        self.out = Path(cfg.OUTPUT_DIR)
        if cfg.MODE not in ("selfsup", "supervised"):
            raise MCLDetError(f"unknown MODE {cfg.MODE!r}; use selfsup or supervised")
        if len(self.archs) < 2 and self.main:
            print("warning: a cohort of 1 is plain MoCo / CE training (no MCL interaction)")

        torch.manual_seed(cfg.SEED)
        self._build_data()
        self.weights = loss_weights(cfg)
        self.needed = losses.needed_terms(self.weights)
        # no bank at all for the independent baseline (ImageNet: 655 MB per member saved)
        if not self.needed:
            self.use_bank = False
        bank = len(self.train_set) if (cfg.MODE == "supervised" and self.use_bank) else 0
        cohort = build_cohort(cfg, self.archs, self.num_classes, bank_size=bank).to(self.device)
        if cfg.MODE == "supervised" and cfg.MODEL.SYNC_BN and self.world > 1:
            cohort = nn.SyncBatchNorm.convert_sync_batchnorm(cohort)
        if cfg.MODEL.CHANNELS_LAST:
            cohort = cohort.to(memory_format=torch.channels_last)
        self.cohort = cohort
        params = [p for p in cohort.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            params,
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        self.model: nn.Module = cohort
        if self.world > 1:
            ddp = nn.parallel.DistributedDataParallel
            # no per-step buffer sync: BN stats stay per rank (as in MoCo), queues/banks are kept
            # identical by the gathered updates (a sync of M x 65536 x 128 each step is waste)
            no_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else {"broadcast_buffers": False}
            )
            self.model = ddp(
                cohort,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **no_sync,
            )
        if cfg.MODEL.COMPILE:
            self.model = torch.compile(self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.SOLVER.AMP == "fp16")
        self.iters_per_epoch = self.sampler.batches_per_epoch()
        # the lr schedule always spans SOLVER.EPOCHS; MAX_ITER only stops early (smoke runs,
        # interrupted-and-resumed runs give the same lr at every iteration)
        self.total_iters = cfg.SOLVER.EPOCHS * self.iters_per_epoch
        self.stop_iter = (
            min(self.total_iters, cfg.SOLVER.MAX_ITER)
            if cfg.SOLVER.MAX_ITER > 0
            else self.total_iters
        )
        self.iteration = 0
        self.metrics: list[dict[str, Any]] = member_metrics(
            [None] * len(self.archs), self.metric_name, 0
        )
        self.logger = Logger(self.out, enabled=self.main, tensorboard=cfg.MONITOR.TENSORBOARD)
        torch.manual_seed(cfg.SEED + 1000 * self.rank)  # per-rank stream from here on
        if resume:
            self._resume()
        elif self.main and self.logger.path.is_file():
            self.logger.path.unlink()  # a fresh run starts a fresh log (checkpoints are replaced too)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_cfg(cfg, self.out / "config.yaml")

    # ------------------------------------------------------------------ setup

    @property
    def metric_name(self) -> str:
        return "knn_top1" if self.cfg.MODE == "selfsup" else "top1"

    def _build_data(self) -> None:
        cfg = self.cfg
        if self.main:
            root = resolve_data_root(cfg)
        du.barrier()
        root = resolve_data_root(cfg)
        size = cfg.DATA.IMAGE_SIZE
        self.pipeline = InputPipeline(cfg, self.device)  # DATA.PIPELINE: CPU and device stages
        tf = self.pipeline.train_transform
        scan = cfg.DATA.SCAN_IMAGES
        self.train_set = SafeImageFolder(root / cfg.DATA.TRAIN_DIR, tf, cfg.SEED, scan)
        if self.main and self.train_set.skipped:
            print(f"warning: skipped {len(self.train_set.skipped)} unreadable training images")
        self.num_classes = cfg.MODEL.NUM_CLASSES or len(self.train_set.classes)
        self.use_bank = cfg.SUP.NEGATIVES == "bank"
        if cfg.SUP.NEGATIVES not in ("bank", "batch"):
            raise MCLDetError(f"unknown SUP.NEGATIVES {cfg.SUP.NEGATIVES!r}; use bank or batch")
        balanced = cfg.MODE == "supervised" and not self.use_bank
        self.sampler = EpochBatchSampler(
            self.train_set.targets,
            cfg.SOLVER.IMS_PER_BATCH,
            self.rank,
            self.world,
            cfg.SEED,
            balanced=balanced,
            samples_per_class=cfg.SUP.SAMPLES_PER_CLASS,
        )
        self.loader = DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            num_workers=cfg.DATA.NUM_WORKERS,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.SEED),  # keep the global RNG untouched
            collate_fn=self.pipeline.collate_fn,
        )
        if cfg.MODE == "supervised" and self.use_bank:
            self.blocks = class_blocks(self.train_set.targets)
        self.val_set = None
        val_dir = root / cfg.DATA.VAL_DIR
        if cfg.MONITOR.EVAL_PERIOD > 0 and val_dir.is_dir():
            self.val_set = SafeImageFolder(val_dir, eval_transform(size), cfg.SEED, scan)
        elif cfg.MONITOR.EVAL_PERIOD > 0 and self.main:
            print(f"warning: no validation folder {val_dir}: monitoring disabled")

    def _resume(self) -> None:
        path = self.out / LAST
        if not path.is_file():
            if self.main:
                print(f"no checkpoint at {path}: starting from scratch")
            return
        ckpt = load_checkpoint(path)
        if ckpt.get("mode") != self.cfg.MODE or ckpt.get("archs") != self.archs:
            raise MCLDetError(
                f"{path} was written for mode {ckpt.get('mode')} with archs {ckpt.get('archs')}, "
                f"not {self.cfg.MODE} {self.archs}; use another OUTPUT_DIR or the same config"
            )
        load_model_state(self.cohort, ckpt, str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.metrics = ckpt.get("member_metrics", self.metrics)
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.rank] if isinstance(rngs, list) else rngs)
        self.logger.truncate_after(self.iteration)
        if self.main:
            print(f"resumed from {path} at iteration {self.iteration}")

    # ------------------------------------------------------------------ steps

    def _set_lr(self) -> float:
        lr = lr_at(self.cfg, self.iteration, self.iters_per_epoch, self.total_iters)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return (
            x.contiguous(memory_format=torch.channels_last) if self.cfg.MODEL.CHANNELS_LAST else x
        )

    def step_selfsup(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
        views, _, _ = batch
        # ---- device stage of the input pipeline (DATA.PIPELINE): jitter, blur, ... normalise
        x_q, x_k = self.pipeline.views(views)
        with autocast_ctx(self.cfg, self.device):
            return selfsup_loss(
                self.model, self._to(x_q), self._to(x_k), self.cfg.LOSS.TAU, self.cfg.LOSS.T,
                self.weights,
            )  # fmt: skip

    def step_supervised(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
        x, y, idx = batch
        x = self.pipeline.images(x)  # ---- device stage of the input pipeline (DATA.PIPELINE)
        y = y.to(self.device)
        with autocast_ctx(self.cfg, self.device):
            cls_logits, zs = self.model(self._to(x))
        zs = [z.float() for z in zs]
        ce = sum(F.cross_entropy(lg.float(), y) for lg in cls_logits)
        cfg, cross = self.cfg, losses.needs_cross(self.needed)
        if not self.needed:  # independent CE baseline
            terms = {}
        elif self.use_bank:
            start, count = self.blocks
            k = min(cfg.SUP.BANK_NEGATIVES, int(count.sum() - count.max()))
            pos, neg = sample_bank_indices(y.cpu(), idx, start, count, k)
            cohort = unwrap_model(self.model)
            logits = losses.bank_logits(
                zs,
                cohort.bank_list(),
                pos.to(self.device),
                neg.to(self.device),
                cfg.LOSS.TAU,
                cross,
            )
            terms = losses.mcl_loss_terms(logits, T=cfg.LOSS.T, needed=self.needed)
        else:
            terms = losses.supcon_terms(zs, y, cfg.LOSS.TAU, T=cfg.LOSS.T, needed=self.needed)
        terms = {"ce": ce, **terms}
        loss = cfg.LOSS.W_CE * ce + losses.combine(
            {k: v for k, v in terms.items() if k != "ce"}, self.weights
        )
        return loss, terms, [zs, idx]

    def after_step(self, extra) -> None:
        """Lockstep memory updates with what every rank saw (gathered)."""
        cohort = unwrap_model(self.model)
        if self.cfg.MODE == "selfsup":
            cohort.enqueue(extra)
        elif self.use_bank:
            zs, idx = extra
            idx_all = du.concat_all_gather(idx.to(self.device))
            for bank, z in zip(cohort.bank_list(), zs):
                losses.bank_update(
                    bank, idx_all, du.concat_all_gather(z.detach()), self.cfg.SUP.BANK_MOMENTUM
                )

    # ------------------------------------------------------------------ eval / save

    @torch.no_grad()
    def evaluate(self, epoch: int) -> None:
        """kNN top-1 per member (selfsup) or top-1 per member + ensemble (supervised), rank 0."""
        if self.val_set is None:
            return
        cfg = self.cfg
        record: dict[str, Any] = {"type": "eval", "epoch": epoch, "iteration": self.iteration}
        if self.main:
            cohort = unwrap_model(self.model)
            bs = max(1, cfg.SOLVER.IMS_PER_BATCH // self.world)
            val = DataLoader(self.val_set, batch_size=bs, num_workers=cfg.DATA.NUM_WORKERS)
            if cfg.MODE == "selfsup":
                train_eval = SafeImageFolder(
                    self.train_set.root, eval_transform(cfg.DATA.IMAGE_SIZE), scan=False
                )
                train_eval.samples, train_eval.targets = (
                    self.train_set.samples,
                    self.train_set.targets,
                )
                if cfg.MONITOR.KNN_MAX_TRAIN > 0 and len(train_eval) > cfg.MONITOR.KNN_MAX_TRAIN:
                    g = torch.Generator().manual_seed(0)
                    pick = torch.randperm(len(train_eval), generator=g)[: cfg.MONITOR.KNN_MAX_TRAIN]
                    train_eval = Subset(train_eval, pick.tolist())
                tl = DataLoader(train_eval, batch_size=bs, num_workers=cfg.DATA.NUM_WORKERS)
                values = [
                    knn_top1(
                        m.encoder,
                        tl,
                        val,
                        self.num_classes,
                        self.device,
                        cfg.MONITOR.KNN_K,
                        cfg.MONITOR.KNN_T,
                    )
                    for m in cohort.members
                ]
            else:
                values, record["ensemble_top1"] = supervised_top1(cohort, val, self.device)
            self.metrics = member_metrics(values, self.metric_name, epoch)
            record["member_metrics"] = self.metrics
            self.logger.write(record)
        du.barrier()

    def save(self, name: str = LAST) -> None:
        """Checkpoint (rank 0 writes; every rank's RNG state is gathered so DDP resumes exactly)."""
        from .checkpoint import rng_state

        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng_state())
        if self.main:
            save_checkpoint(
                self.out / name,
                self.model,
                self.cfg,
                epoch=self.iteration // self.iters_per_epoch,
                iteration=self.iteration,
                optimizer=self.optimizer.state_dict(),
                scheduler={"name": self.cfg.SOLVER.SCHEDULE, "iteration": self.iteration},
                scaler=self.scaler.state_dict(),
                member_metrics=self.metrics,
                rng=rngs if self.world > 1 else rngs[0],
                world_size=self.world,
                skipped_images=self.train_set.num_skipped,
            )
        du.barrier()

    # ------------------------------------------------------------------ loop

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        progress = Progress(
            self.stop_iter, self.iteration, enabled=self.main and cfg.MONITOR.PROGRESS
        )
        last_loss = float("nan")
        t_start = time.time()
        while self.iteration < self.stop_iter:
            epoch = self.iteration // self.iters_per_epoch
            self.sampler.set_epoch(epoch, self.iteration % self.iters_per_epoch)
            for batch in self.loader:
                lr = self._set_lr()
                loss, terms, extra = (
                    self.step_selfsup(batch)
                    if cfg.MODE == "selfsup"
                    else self.step_supervised(batch)
                )
                loss_mean = float(du.all_reduce_mean(loss.detach()))
                if not math.isfinite(loss_mean):
                    raise MCLDetError(
                        f"loss is {loss_mean} at iteration {self.iteration + 1}; lower "
                        f"SOLVER.BASE_LR or try without SOLVER.AMP fp16 (last good checkpoint "
                        f"kept in {self.out})"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.after_step(extra)
                self.iteration += 1
                last_loss = loss_mean
                if self.iteration % cfg.MONITOR.LOG_PERIOD == 0 or self.iteration == self.stop_iter:
                    rec = {
                        "type": "train",
                        "epoch": epoch,
                        "iteration": self.iteration,
                        "loss": loss_mean,
                        "lr": lr,
                        "eta_s": round(progress.eta_s(self.iteration), 1),
                    }
                    for name in ("ce", *losses.TERMS):
                        v = terms.get(name)
                        rec[f"loss_{name}"] = (
                            float(du.all_reduce_mean(v.detach())) if v is not None else None
                        )
                    self.logger.write(rec)
                progress.update(self.iteration, {"loss": loss_mean})
                end_of_epoch = self.iteration % self.iters_per_epoch == 0
                done = self.iteration >= self.stop_iter
                if end_of_epoch:
                    ep = self.iteration // self.iters_per_epoch
                    if cfg.MONITOR.EVAL_PERIOD > 0 and (ep % cfg.MONITOR.EVAL_PERIOD == 0 or done):
                        self.model.eval()
                        self.evaluate(ep)
                        self.model.train()
                    snap = cfg.SOLVER.EPOCH_SNAPSHOT_PERIOD
                    if snap > 0 and (ep % snap == 0 or done):
                        self.save(f"checkpoint_ep{ep:04d}.pth")
                    self.save(LAST)
                elif done or (
                    cfg.SOLVER.CHECKPOINT_PERIOD > 0
                    and self.iteration % cfg.SOLVER.CHECKPOINT_PERIOD == 0
                ):
                    self.save(LAST)
                if done:
                    break
        progress.close()
        self.logger.close()
        return {
            "iteration": self.iteration,
            "loss": last_loss,
            "member_metrics": self.metrics,
            "output_dir": str(self.out),
            "wall_time_s": round(time.time() - t_start, 2),
            "skipped_images": self.train_set.num_skipped,
        }


@torch.no_grad()
def supervised_top1(cohort: nn.Module, loader, device: torch.device) -> tuple[list[float], float]:
    """Top-1 (percent) of each member's classifier and of their ensemble (mean of softmaxes)."""
    was = cohort.training
    cohort.eval()
    correct = torch.zeros(len(cohort.members) + 1)
    n = 0
    for x, y, _ in loader:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        logits, _ = cohort(x)
        probs = [F.softmax(lg.float(), dim=1) for lg in logits]
        preds = [p.argmax(1) for p in probs] + [torch.stack(probs).mean(0).argmax(1)]
        correct += torch.tensor([float((p == y).sum()) for p in preds])
        n += y.numel()
    cohort.train(was)
    acc = (100.0 * correct / max(n, 1)).tolist()
    return acc[:-1], acc[-1]


def train(cfg, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) one pretraining job described by a resolved config."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.train()
    finally:
        trainer.logger.close()


def _worker_train(cfg_yaml: str, resume: bool) -> None:
    """Body of one spawned process: user errors end that process with one line, exit 2."""
    import sys

    from yacs.config import CfgNode

    cfg = CfgNode.load_cfg(cfg_yaml)
    cfg.freeze()
    try:
        train(cfg, resume)
    except MCLDetError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        du.cleanup_distributed()


def launch_training(
    config_file: str | None,
    opts: list[str] | None = None,
    cohort: int | None = None,
    amp: str | None = None,
    resume: bool = False,
    num_procs: int = 1,
) -> dict[str, Any] | None:
    """Resolve the config (errors surface before anything starts) and train in 1..N processes.

    Returns the run summary in a single process (None when several processes were spawned).
    """
    from .config import setup_pretrain_cfg

    cfg = setup_pretrain_cfg(config_file, opts, cohort, amp)
    if num_procs <= 1:
        try:
            return train(cfg, resume)
        finally:
            du.cleanup_distributed()
    try:
        du.launch(_worker_train, num_procs, (cfg.dump(), resume))
    except Exception as e:  # a child already printed its own error line
        raise MCLDetError(
            f"a training process failed ({type(e).__name__}); see the lines above"
        ) from None
    return None
