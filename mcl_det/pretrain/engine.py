"""MCL pretraining loop, one process or DDP; the same loop for every training method.

One iteration: the cohort's ``training_step`` (its forward through the DDP / compile wrapper, the
logits, the loss terms, the values to log), backward and SGD step, then the cohort's
``after_step`` (queue enqueue, bank update). What the loop needs from a method is the
``CohortMethod`` interface (method.py), the methods are in models.py; the Trainer owns what every
method shares: data, optimizer, AMP, lr schedule, checkpoints, monitor and logging.

A checkpoint written during training is first kept under a temporary name and put in place only
once the next iteration's loss, computed from its weights, is finite: a step that blows the
weights up (finite loss, absurd update) never replaces the last good checkpoint. Loss and
gradients are checked before the optimizer step. SIGTERM/SIGUSR1 (``mcl_det.utils.preempt``)
finish the iteration, write the checkpoint and stop with exit code 75.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler
from torch import nn
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from ..config import config_changes, save_cfg
from ..utils import preempt
from ..utils.errors import MCLDetError
from ..utils.malloc import keep_freed_memory
from ..utils.rng import rng_state, set_rng_state
from . import distributed as du
from . import losses
from .checkpoint import LAST, load_checkpoint, load_model_state, save_checkpoint
from .config import member_archs
from .data import (
    EpochBatchSampler,
    InputPipeline,
    SafeImageFolder,
    eval_transform,
    resolve_data_root,
)
from .distributed import pick_device
from .evaluation import EvalData
from .models import cohort_class
from .monitor import Logger, Progress, member_metrics

LOGGED_TERMS = ("ce", *losses.TERMS)  # loss_<name> in every train line (null when not computed)
# Everything a pretraining run writes into OUTPUT_DIR: their presence means "a run is there"
# (refused without --resume / --auto-resume / --overwrite; --overwrite deletes exactly these).
RUN_OUTPUTS = (LAST, "checkpoint_ep*.pth", "log.jsonl", "config.yaml", "tb", "linear_eval_member*")
RUN_CHECKPOINTS = (LAST,)
# A checkpoint not yet confirmed by the next iteration's loss. The name fits the temporary-file
# pattern that open_run_dir removes at the next start (".NAME.<8 chars>.tmp").
UNTESTED = ".{}.untested.tmp"


def autocast_ctx(cfg: CfgNode, device: torch.device) -> AbstractContextManager:
    """bf16 / fp16 autocast for the networks; the cohorts compute their losses in fp32."""
    if not cfg.SOLVER.AMP:
        return nullcontext()
    dtype = torch.bfloat16 if cfg.SOLVER.AMP == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def epoch_steps(
    base: float, gamma: float, milestones: Sequence[int], epochs: int
) -> Callable[[int], float]:
    """lr of an epoch: ``base`` times ``gamma`` per milestone passed (fvcore's multi-step
    schedule); milestones at or past the last epoch are never reached and are left out."""
    steps = sorted({int(s) for s in milestones if s < epochs})
    if steps and steps[0] < 1:
        raise MCLDetError(f"lr milestones must be epochs >= 1, got {list(milestones)}")
    epochs = max(int(epochs), 1)
    values = [base * gamma**i for i in range(len(steps) + 1)]
    schedule = MultiStepParamScheduler(values, num_updates=epochs, milestones=steps)
    return lambda epoch: schedule(min(epoch, epochs - 1) / epochs)


def lr_schedule(cfg: CfgNode, iters_per_epoch: int) -> Callable[[int], float]:
    """Learning rate by iteration: linear scaling by batch, then cosine (per iteration, over
    SOLVER.EPOCHS) or step (per epoch). A pure function of the iteration: resume is exact."""
    s = cfg.SOLVER
    base = s.BASE_LR * s.IMS_PER_BATCH / s.REFERENCE_BATCH
    ipe = max(iters_per_epoch, 1)
    if s.SCHEDULE == "cosine":
        cosine, total = CosineParamScheduler(base, 0.0), max(s.EPOCHS * ipe, 1)
        return lambda it: cosine(it / total)
    by_epoch = epoch_steps(base, s.GAMMA, s.STEPS, s.EPOCHS)
    return lambda it: by_epoch(it // ipe)


class Trainer:
    """Owns the cohort, data, optimizer and state of one pretraining run (rank-aware)."""

    def __init__(self, cfg: CfgNode, resume: bool = False) -> None:
        self.cfg = cfg
        self.archs = member_archs(cfg)
        dev_type = pick_device(cfg.DEVICE).type  # nccl for cuda, gloo for cpu
        self.rank, self.world, local = du.init_distributed(dev_type, cfg.DIST.TIMEOUT_S)
        self.device = pick_device(cfg.DEVICE, local)
        self.main = self.rank == 0
        if self.device.type == "cpu" and cfg.CPU_KEEP_FREED_MEMORY:
            keep_freed_memory()  # see mcl_det/utils/malloc.py; a no-op off glibc
        self.out = Path(cfg.OUTPUT_DIR)
        if len(self.archs) < 2 and self.main:
            print("warning: a cohort of 1 is plain MoCo / CE training (no MCL interaction)")

        torch.manual_seed(cfg.SEED)
        method = cohort_class(cfg)
        self._build_data(method.balanced_batches, method.min_classes)
        targets = self.train_set.targets
        self.cohort = method.from_config(cfg, self.num_classes, targets).to(self.device)
        if cfg.MODEL.CHANNELS_LAST:
            self.cohort = self.cohort.to(memory_format=torch.channels_last)
        params = [p for p in self.cohort.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            params,
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        self.model: nn.Module = self.cohort
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
                self.cohort,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **no_sync,
            )
        if cfg.MODEL.COMPILE:
            self.model = torch.compile(self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.SOLVER.AMP == "fp16")
        self.iters_per_epoch = self.sampler.batches_per_epoch()
        self.lr_at = lr_schedule(cfg, self.iters_per_epoch)
        # the lr schedule always spans SOLVER.EPOCHS; MAX_ITER only stops early (smoke runs,
        # interrupted-and-resumed runs give the same lr at every iteration)
        self.total_iters = cfg.SOLVER.EPOCHS * self.iters_per_epoch
        self.stop_iter = (
            min(self.total_iters, cfg.SOLVER.MAX_ITER)
            if cfg.SOLVER.MAX_ITER > 0
            else self.total_iters
        )
        self.iteration = 0
        self.committed: int | None = None  # iteration of the checkpoint in place, if any
        self._untested: list[tuple[Path, Path]] = []  # (temporary, final) awaiting the next loss
        self.metrics = member_metrics([None] * len(self.archs), self.cohort.metric, 0)
        self.logger = Logger(self.out, enabled=self.main, tensorboard=cfg.MONITOR.TENSORBOARD)
        torch.manual_seed(cfg.SEED + 1000 * self.rank)  # per-rank stream from here on
        if self.world > 1:  # rank 0 holds OUTPUT_DIR and decides (torchrun: every rank asks)
            flag = [bool(resume)]
            torch.distributed.broadcast_object_list(flag, src=0)
            resume = flag[0]
        if resume:
            self._resume()
        else:
            # a folder holding another run is refused or emptied before we get here (pretrain/
            # main.py); what is left are log lines of an attempt that wrote no checkpoint
            self.logger.truncate_after(0)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_cfg(cfg, self.out / "config.yaml")

    # ------------------------------------------------------------------ setup

    def _build_data(self, balanced: bool, min_classes: int) -> None:
        cfg = self.cfg
        if self.main:
            root = resolve_data_root(cfg)
        du.barrier()
        root = resolve_data_root(cfg)
        # DATA.PIPELINE: the workers' stage is the dataset transform, the device stage runs in
        # ``train`` on each batch before the cohort's training step
        self.pipeline = InputPipeline(cfg, self.device)
        scan = cfg.DATA.SCAN_IMAGES
        self.train_set = SafeImageFolder(
            root / cfg.DATA.TRAIN_DIR, self.pipeline.train_transform, cfg.SEED, scan
        )
        if self.main and self.train_set.skipped:
            print(f"warning: skipped {len(self.train_set.skipped)} unreadable training images")
        found = self.train_set.classes
        if len(found) < min_classes:
            raise MCLDetError(
                f"{cfg.MODE} pretraining needs at least {min_classes} classes, but "
                f"{root / cfg.DATA.TRAIN_DIR} holds {len(found)} ({', '.join(found)}): every loss "
                "term would be 0 and top-1 100 %; add class folders or use MODE selfsup"
            )
        self.num_classes = cfg.MODEL.NUM_CLASSES or len(self.train_set.classes)
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
        self.val_set = None
        val_dir = root / cfg.DATA.VAL_DIR
        if cfg.MONITOR.EVAL_PERIOD > 0 and val_dir.is_dir():
            transform = eval_transform(cfg.DATA.IMAGE_SIZE, cfg.DATA.EVAL_CROP)
            self.val_set = SafeImageFolder(val_dir, transform, cfg.SEED, scan)
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
        self.committed = self.iteration
        self.logger.truncate_after(self.iteration)
        if self.main:
            print(f"resumed from {path} at iteration {self.iteration}")
        changes = config_changes(ckpt.get("config") or "", self.cfg)
        if changes and self.main:
            print(f"settings changed since that checkpoint: {'; '.join(changes)}", flush=True)
            record = {"type": "config_change", "iteration": self.iteration, "changes": changes}
            self.logger.write(record)

    # ------------------------------------------------------------------ steps

    def _set_lr(self) -> float:
        lr = self.lr_at(self.iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return (
            x.contiguous(memory_format=torch.channels_last) if self.cfg.MODEL.CHANNELS_LAST else x
        )

    def forward(self, *images: torch.Tensor) -> Any:
        """The wrapped cohort (DDP / compile) on images moved to the device, under autocast: what
        a cohort's ``training_step`` calls, so the gradients are synchronised across ranks."""
        with autocast_ctx(self.cfg, self.device):
            return self.model(*(self._to(x) for x in images))

    # ------------------------------------------------------------------ eval / save

    @torch.no_grad()
    def evaluate(self, epoch: int) -> None:
        """The cohort's monitor (kNN top-1 or classifier top-1 per member), rank 0."""
        if self.val_set is None:
            return
        if self.main:
            data = EvalData(self.train_set, self.val_set, self.device, self.num_classes)
            values, extra = self.cohort.evaluate(self.cfg, data)
            self.metrics = member_metrics(values, self.cohort.metric, epoch)
            record = {"type": "eval", "epoch": epoch, "iteration": self.iteration, **extra}
            record["member_metrics"] = self.metrics
            self.logger.write(record)
        du.barrier()

    def save(self, name: str = LAST, untested: bool = False) -> Path:
        """Checkpoint (rank 0 writes; every rank's RNG state is gathered so DDP resumes exactly).

        ``untested``: written under a temporary name and put in place by :meth:`commit` once the
        next iteration's loss shows the weights are sound (:meth:`discard` drops it otherwise).
        Returns the checkpoint's final path.
        """
        path = self.out / name
        target = path.with_name(UNTESTED.format(name)) if untested else path
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng_state())
        if self.main:
            save_checkpoint(
                target,
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
        if untested:  # on every rank: they all take the same decisions
            self._untested.append((target, path))
        elif name == LAST:
            self.committed = self.iteration
        du.barrier()
        return path

    def commit(self) -> None:
        """Put the checkpoints written at the previous iteration in place (atomic renames)."""
        for tmp, path in self._untested:
            if self.main:
                os.replace(tmp, path)
            if path.name == LAST:
                self.committed = self.iteration
        self._untested.clear()

    def discard(self) -> None:
        """Drop unconfirmed checkpoints: the ones in place stay the last good ones."""
        for tmp, _ in self._untested:
            if self.main:
                tmp.unlink(missing_ok=True)
        self._untested.clear()

    def _diverged(self, what: str) -> MCLDetError:
        kept = (
            f"the last good checkpoint, {self.out / LAST} (iteration {self.committed}), is kept: "
            "continue it with --resume and a lower SOLVER.BASE_LR"
            if self.committed is not None
            else "no checkpoint was written before it"
        )
        return MCLDetError(
            f"{what} at iteration {self.iteration + 1}; lower SOLVER.BASE_LR or try without "
            f"SOLVER.AMP fp16; {kept}"
        )

    def _grads_finite(self) -> bool:
        """Whether every gradient is finite (max-abs norm: huge but finite values pass)."""
        grads = [p.grad for p in self.cohort.parameters() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf"))))

    # ------------------------------------------------------------------ loop

    def train(self) -> dict[str, Any]:
        """Train to ``stop_iter``. Under ``preempt.handle_preemption`` a SIGTERM/SIGUSR1 stops
        after the current iteration with a checkpoint (``Preempted``)."""
        stop = preempt.current()
        try:
            with stop.deferred() if stop is not None else nullcontext():
                return self._train(stop)
        except BaseException:
            self.discard()  # an interrupted or diverged run keeps its last good checkpoint
            raise

    def _train(self, stop: preempt.PreemptFlag | None) -> dict[str, Any]:
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
                step, loss_mean = self.train_step(batch)
                self.iteration += 1
                last_loss = loss_mean
                if self.iteration % cfg.MONITOR.LOG_PERIOD == 0 or self.iteration == self.stop_iter:
                    self._log(epoch, loss_mean, lr, step.terms, progress)
                progress.update(self.iteration, {"loss": loss_mean})
                done = self.iteration >= self.stop_iter
                self._epoch_end_or_checkpoint(done)
                if done:
                    break
                if stop is not None and stop.requested(sync=True):  # all ranks, same iteration
                    path = self._checkpoint_now()
                    raise stop.preempted(
                        f"checkpoint {path} written after iteration {self.iteration}"
                    )
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

    def train_step(self, batch: tuple, device_stage: bool = True) -> tuple[Any, float]:
        """One optimisation step on a loader batch: the input pipeline's device stage (skip it
        for batches already on the device), the cohort's training step, the finiteness checks,
        backward, optimizer and the cohort's after-step update. Returns the cohort's ``Step`` and
        the loss averaged over ranks; lr, logging and checkpoints are the loop's."""
        if device_stage:
            batch = self.pipeline.device_stage(batch)
        step = self.cohort.training_step(self.forward, batch)
        loss_mean = float(du.all_reduce_mean(step.loss.detach()))
        if not math.isfinite(loss_mean):
            raise self._diverged(f"loss is {loss_mean}")
        self.commit()  # a finite loss from the weights of the last checkpoint
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(step.loss).backward()
        # fp16: the GradScaler skips steps with inf/nan gradients (and lowers its scale)
        if not self.scaler.is_enabled() and not self._grads_finite():
            raise self._diverged(f"the gradients hold inf/nan (loss {loss_mean:.4g})")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.cohort.after_step(step.state)
        return step, loss_mean

    def _log(self, epoch: int, loss: float, lr: float, terms: dict, progress: Progress) -> None:
        rec = {
            "type": "train",
            "epoch": epoch,
            "iteration": self.iteration,
            "loss": loss,
            "lr": lr,
            "eta_s": round(progress.eta_s(self.iteration), 1),
        }
        for name in LOGGED_TERMS:
            v = terms.get(name)
            rec[f"loss_{name}"] = float(du.all_reduce_mean(v.detach())) if v is not None else None
        self.logger.write(rec)

    def _checkpoint_now(self) -> Path:
        """``checkpoint_last.pth`` of this iteration in place, now (a stop was requested)."""
        written = {path.name for _, path in self._untested}
        self.commit()
        if LAST not in written:
            self.save(LAST)
        return self.out / LAST

    def _epoch_end_or_checkpoint(self, done: bool) -> None:
        # checkpoints before the end wait for the next iteration's loss (see commit)
        cfg = self.cfg
        untested = not done
        if self.iteration % self.iters_per_epoch == 0:  # end of an epoch
            ep = self.iteration // self.iters_per_epoch
            if cfg.MONITOR.EVAL_PERIOD > 0 and (ep % cfg.MONITOR.EVAL_PERIOD == 0 or done):
                self.model.eval()
                self.evaluate(ep)
                self.model.train()
            snap = cfg.SOLVER.EPOCH_SNAPSHOT_PERIOD
            if snap > 0 and (ep % snap == 0 or done):
                self.save(f"checkpoint_ep{ep:04d}.pth", untested)
            self.save(LAST, untested)
        elif done or (
            cfg.SOLVER.CHECKPOINT_PERIOD > 0 and self.iteration % cfg.SOLVER.CHECKPOINT_PERIOD == 0
        ):
            self.save(LAST, untested)


def train(cfg: CfgNode, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) one pretraining job described by a resolved config."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.train()
    finally:
        trainer.logger.close()
