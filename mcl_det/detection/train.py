"""Fine-tune and evaluate a detector: detectron2's ``DefaultTrainer`` plus what a study needs.

What we add on top of detectron2's loop (and nothing inside it, so iterations cost the same):
- config: detectron2 defaults + ``MCL_DET.*`` merged strictly (unknown key -> error), CPU chosen
  automatically without CUDA, ``SOLVER.REFERENCE_WORLD_SIZE`` scaling applied *before* the config
  is saved, so ``OUTPUT_DIR/config.yaml`` is what really ran;
- models: SyncBN layers become plain BN when there is a single process (nothing to sync with);
- data: user VOC / COCO datasets registered from the config, every path, split id and annotation
  checked up front, so bad data is one error line before any model is built;
- checkpoints written atomically and weights read without running code (``SafeCheckpointer``);
- evaluation chosen from the dataset (VOC 2007 11-point with per-class AP50, or COCO);
- ``OUTPUT_DIR/results.json`` (docs/DESIGN.md), written atomically at the end;
- trials: N seeds of one config into ``OUTPUT_DIR/seed{K}``, each with its config.yaml and seed;
- user errors raised inside detectron2's loop (divergence, a full disk) stay one line: the loop's
  own traceback log of them is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch import nn

from ..config import merge_cfg, save_cfg
from ..utils import preempt
from ..utils.errors import MCLDetError
from ..utils.io import atomic_write_json, sha256_file
from ..utils.rng import rng_state, set_rng_state
from ..weights_settings import check_weights_against_config
from .checkpoint import SafeCheckpointer, read_weights
from .config import config_digest, get_detection_cfg
from .datasets import dataset_task, prepare_datasets
from .evaluation import build_evaluator

RESULTS_FORMAT = "mcl_det.detection_results/v1"
logger = logging.getLogger("mcl_det.detection")


# ----------------------------------------------------------------------------- config


def setup_cfg(
    config_file: str | None,
    opts: Sequence[str] | None = None,
    world_size: int | None = None,
    cpu: bool = False,
) -> CfgNode:
    """Resolved, frozen config: file + overrides, device, REFERENCE_WORLD_SIZE scaling.

    ``SOLVER.IMS_PER_BATCH`` is the *total* batch. With ``SOLVER.REFERENCE_WORLD_SIZE`` = R > 0 and
    W processes (W != R), detectron2's rule keeps the per-GPU batch: batch and LR x W/R, max_iter,
    steps, warmup, eval and checkpoint periods x R/W. With 0 (the default) nothing is scaled.
    """
    cfg = merge_cfg(get_detection_cfg(), config_file, opts)
    if (cpu or not torch.cuda.is_available()) and cfg.MODEL.DEVICE != "cpu":
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        raise MCLDetError(
            "SOLVER.AMP.ENABLED True needs a CUDA device (detectron2's AMPTrainer); "
            "add SOLVER.AMP.ENABLED False to train on CPU"
        )
    ws = comm.get_world_size() if world_size is None else world_size
    if (
        cfg.SOLVER.REFERENCE_WORLD_SIZE
        and cfg.SOLVER.IMS_PER_BATCH % cfg.SOLVER.REFERENCE_WORLD_SIZE
    ):
        raise MCLDetError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by "
            f"SOLVER.REFERENCE_WORLD_SIZE {cfg.SOLVER.REFERENCE_WORLD_SIZE}; fix one of them"
        )
    cfg = DefaultTrainer.auto_scale_workers(cfg, ws)
    if cfg.SOLVER.IMS_PER_BATCH % ws:
        raise MCLDetError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} (the total batch) must be divisible "
            f"by the number of processes {ws}"
        )
    cfg.freeze()
    return cfg


# ----------------------------------------------------------------------------- model


def syncbn_to_bn(module: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` by an equivalent ``nn.BatchNorm2d`` (state copied).

    With one process SyncBN computes exactly BN's statistics. Verified with torch 2.14 on CPU:
    ``nn.SyncBatchNorm`` already falls back to BN without a process group, but older torch
    versions raise on CPU input and a 1-process group still pays for a no-op all_reduce; the swap
    makes the fallback explicit and keeps checkpoints interchangeable (same parameter names).
    """
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        bn.load_state_dict(module.state_dict())
        return bn.to(next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        new = syncbn_to_bn(child)
        if new is not child:
            module.add_module(name, new)
    return module


def _no_user_error_traceback(record: logging.LogRecord) -> bool:
    """Logging filter: detectron2's loop logs any exception leaving it with its traceback; a user
    error (divergence, a full disk) is reported as one line by the caller instead."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, MCLDetError | FloatingPointError)


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer (same loop, hooks, writers, AMP switch).

    Differs in the builders (SyncBN fallback on one process, our evaluators), the checkpointer
    (``SafeCheckpointer``) and in keeping user errors out of the loop's traceback log.
    """

    def __init__(self, cfg: CfgNode, unsafe_load: bool = False):
        self.unsafe_load = unsafe_load  # read by build_hooks, which DefaultTrainer calls in here
        super().__init__(cfg)

    def build_hooks(self) -> list:
        # DefaultTrainer builds its checkpointer just before this call and hands it to the
        # PeriodicCheckpointer hook built here: swapping it now makes every save and load ours.
        old = self.checkpointer
        self.checkpointer = SafeCheckpointer(
            old.model, old.save_dir, unsafe_load=self.unsafe_load, **old.checkpointables
        )
        return super().build_hooks()

    def train(self) -> dict[str, Any] | None:
        loop_logger = logging.getLogger("detectron2.engine.train_loop")
        loop_logger.addFilter(_no_user_error_traceback)
        try:
            return super().train()
        finally:
            loop_logger.removeFilter(_no_user_error_traceback)

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        model = super().build_model(cfg)
        if comm.get_world_size() == 1:
            model = syncbn_to_bn(model)
        return model

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        out = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, out)


# ----------------------------------------------------------------------------- weights


def check_weights(cfg: CfgNode, unsafe_load: bool = False) -> tuple[str, str | None]:
    """(path, sha256) of MODEL.WEIGHTS; a missing, unreadable or unsafe local file is a user error.

    The file is read once here (as the checkpointer will read it) so that a bad file is reported
    before any model or data loader is built. Weights from ``tools/convert_to_d2.py`` come with a
    companion YAML of the settings they need; a config that disagrees (pixel mean, STRIDE_IN_1X1,
    depth, ...) would silently ruin transfer, so it is checked here, and a missing YAML is said.
    """
    w = cfg.MODEL.WEIGHTS
    if not w:
        return "", None
    if "://" in w:
        return w, None  # detectron2:// or http(s):// -- resolved by detectron2's checkpointer
    if not os.path.isfile(w):
        raise MCLDetError(
            f"MODEL.WEIGHTS not found: {w}; run tools/convert_to_d2.py first or fix the path "
            '(MODEL.WEIGHTS "" trains from random init)'
        )
    ckpt = read_weights(w, unsafe_load)
    author = ckpt.get("__author__")
    del ckpt
    # no-op unless our companion YAML sits beside w; one warning when ours has lost its YAML
    check_weights_against_config(cfg, w, author)
    return os.path.abspath(w), sha256_file(w)


# ----------------------------------------------------------------------------- results


def _clean_metrics(obj: Any) -> Any:
    """JSON-safe copy: NaN (e.g. APs with no small objects) -> None, numpy -> float."""
    if isinstance(obj, dict):
        return {str(k): _clean_metrics(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_metrics(v) for v in obj]
    if isinstance(obj, int | float) or hasattr(obj, "item"):
        v = float(obj)
        return None if math.isnan(v) else v
    return obj


def build_results(
    cfg: CfgNode,
    metrics: dict,
    *,
    iteration: int,
    weights: str,
    weights_sha256: str | None,
    wall_time_s: float,
    run_name: str,
) -> dict:
    """The results.json dict of docs/DESIGN.md."""
    tests = list(cfg.DATASETS.TEST)
    # DefaultTrainer.test returns {dataset: {task: ...}} for several test sets, {task: ...} for one
    per_ds = {tests[0]: metrics} if len(tests) == 1 else dict(metrics)
    first = per_ds.get(tests[0], {}) if tests else {}
    r = cfg.MODEL
    res = {
        "format": RESULTS_FORMAT,
        "finished": True,
        "run_name": run_name,
        "task": dataset_task(tests[0]) if tests else dataset_task(cfg.DATASETS.TRAIN[0]),
        "dataset_train": list(cfg.DATASETS.TRAIN),
        "dataset_test": tests,
        "detector": "/".join(
            [r.META_ARCHITECTURE, r.ROI_HEADS.NAME, r.BACKBONE.NAME, f"R{r.RESNETS.DEPTH}"]
        ),
        "mask_on": bool(r.MASK_ON),
        "weights": weights,
        "weights_sha256": weights_sha256,
        "weights_tag": cfg.MCL_DET.WEIGHTS_TAG,
        "seed": int(cfg.SEED),
        "max_iter": int(cfg.SOLVER.MAX_ITER),
        "iteration": int(iteration),
        "world_size": comm.get_world_size(),
        "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
        "min_size_train": [int(x) for x in cfg.INPUT.MIN_SIZE_TRAIN],
        "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
        "wall_time_s": round(float(wall_time_s), 3),
        "config_digest": config_digest(cfg),
        "metrics": _clean_metrics(first),
    }
    if len(tests) > 1:
        res["metrics_per_dataset"] = _clean_metrics(per_ds)
    return res


# ----------------------------------------------------------------------------- one run


def run_one(
    cfg: CfgNode,
    resume: bool = False,
    eval_only: bool = False,
    exact_resume: bool = False,
    unsafe_load: bool = False,
) -> dict:
    """Train (unless eval_only) and evaluate one config; write results.json; return it.

    Each trial has its own OUTPUT_DIR, so its resolved config is saved there and the RNGs are
    seeded with its seed here (detectron2's ``default_setup`` did both once, for the base config).
    ``exact_resume``: a resumed run replays the data loader to the checkpoint's position so that
    it continues bit-exactly (on CPU) where the interrupted run stopped; costs the data loading
    of the skipped iterations.
    """
    t0 = time.perf_counter()
    weights, sha = check_weights(cfg, unsafe_load)
    prepare_datasets(cfg)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    if comm.is_main_process():
        save_cfg(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    seed_all_rng(cfg.SEED + comm.get_rank())
    run_name = cfg.MCL_DET.RUN_NAME or os.path.basename(os.path.normpath(cfg.OUTPUT_DIR))
    if eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = SafeCheckpointer(model, cfg.OUTPUT_DIR, unsafe_load=unsafe_load)
        ckpt = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        iteration = int(ckpt.get("iteration", -1)) + 1 if isinstance(ckpt, dict) else 0
        metrics = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg, unsafe_load)
        trainer.register_hooks([ResumeStateHook(replay_data=exact_resume), StopRequestHook()])
        trainer.resume_or_load(resume=resume)
        if trainer.start_iter >= trainer.max_iter:
            logger.info("checkpoint already at iteration %d: evaluating only", trainer.start_iter)
            metrics = Trainer.test(cfg, trainer.model)
            iteration = trainer.start_iter
        else:
            try:
                trainer.train()
            except FloatingPointError as e:  # detectron2's "Loss became infinite or NaN ..."
                raise MCLDetError(
                    f"training diverged in {cfg.OUTPUT_DIR}: {' '.join(str(e).split())}; lower "
                    "SOLVER.BASE_LR / raise SOLVER.WARMUP_ITERS, or check the weights and "
                    "MODEL.PIXEL_MEAN/STD (earlier checkpoints are kept; --resume continues)"
                ) from None
            metrics = getattr(trainer, "_last_eval_results", None) or {}
            iteration = trainer.iter  # detectron2 leaves iter == max_iter after a full run
    results = build_results(
        cfg,
        metrics or {},
        iteration=iteration,
        weights=weights,
        weights_sha256=sha,
        wall_time_s=time.perf_counter() - t0,
        run_name=run_name,
    )
    if comm.is_main_process():
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "results.json"), results)
        logger.info("results: %s", os.path.join(cfg.OUTPUT_DIR, "results.json"))
    return results


def trial_cfgs(cfg: CfgNode, trials: int = 0) -> list[CfgNode]:
    """One config per trial: ``MCL_DET.SEEDS`` (or seeds 0..trials-1) into OUTPUT_DIR/seed{K}.

    Without either, the single config itself; a negative SEED is replaced by a random seed shared
    by all processes, so results.json always records the seed that ran.
    """
    seeds = list(cfg.MCL_DET.SEEDS) or list(range(trials))
    if not seeds:
        c = cfg.clone()
        c.defrost()
        if c.SEED < 0:
            c.SEED = int(comm.shared_random_seed() % (2**31))
        c.freeze()
        return [c]
    base_name = cfg.MCL_DET.RUN_NAME or os.path.basename(os.path.normpath(cfg.OUTPUT_DIR))
    out = []
    for s in seeds:
        c = cfg.clone()
        c.defrost()
        c.SEED = int(s)
        c.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, f"seed{int(s)}")
        c.MCL_DET.RUN_NAME = f"{base_name}_seed{int(s)}"
        c.freeze()
        out.append(c)
    return out


# ----------------------------------------------------------------------------- stop and resume


class ResumeStateHook(HookBase):
    """Puts what detectron2 0.6 leaves out of its checkpoints into them: the optimizer state
    (momentum buffers, current learning rate; without it the first resumed step runs with the
    warmup-start rate and no momentum), the AMP grad scaler and the RNG states.

    With ``replay_data`` the resumed run first pulls the batches the interrupted run had consumed
    (data loading only, no model step), so it sees the same batches in the same order and
    continues bit-exactly on CPU. Exact only with checkpoints taken outside evaluation (an
    evaluation between the checkpoint and the stop consumes random numbers the resume cannot
    know about).
    """

    def __init__(self, replay_data: bool = False) -> None:
        self.replay_data = replay_data
        self._rng: dict | None = None

    def state_dict(self) -> dict:
        state = {"rng": rng_state(), "optimizer": self.trainer.optimizer.state_dict()}
        scaler = getattr(self.trainer._trainer, "grad_scaler", None)  # AMPTrainer only
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        if "grad_scaler" in state:
            self.trainer._trainer.grad_scaler.load_state_dict(state["grad_scaler"])
        self._rng = state["rng"]  # applied in before_train, after the data loader is positioned

    def before_train(self) -> None:
        if self._rng is None or self.trainer.start_iter == 0:
            return
        if self.replay_data:
            # detectron2 keeps the train loader's iterator on its inner SimpleTrainer/AMPTrainer
            it = self.trainer._trainer._data_loader_iter
            for _ in range(self.trainer.start_iter):
                next(it)
            logger.info("replayed %d batches of the data loader", self.trainer.start_iter)
        set_rng_state(self._rng)
        self._rng = None


class StopRequestHook(HookBase):
    """SIGTERM/SIGUSR1 during training (``mcl_det.utils.preempt``): finish the iteration, write
    a checkpoint (detectron2's checkpointer: resumable by ``--resume``/``--auto-resume``), stop.

    A stop requested at the last iteration lets the run finish: its final checkpoint is written
    by then and only the evaluation is left.
    """

    def __init__(self) -> None:
        self._flag = preempt.current()
        self._stack = contextlib.ExitStack()

    def before_train(self) -> None:
        if self._flag is not None:
            self._stack.enter_context(self._flag.deferred())

    def after_step(self) -> None:
        if self._flag is None:
            return
        it, last = self.trainer.iter, self.trainer.iter + 1 >= self.trainer.max_iter
        stop = self._flag.requested(sync=True)
        if last:
            self._stack.close()  # back to "a signal stops at once" for the evaluation
            return
        if not stop:
            return
        name = f"model_{it:07d}"
        period = self.trainer.cfg.SOLVER.CHECKPOINT_PERIOD
        if not (period > 0 and (it + 1) % period == 0):  # else PeriodicCheckpointer just wrote it
            self.trainer.checkpointer.save(name, iteration=it)
        path = os.path.join(self.trainer.cfg.OUTPUT_DIR, name + ".pth")
        raise self._flag.preempted(f"checkpoint {path} written after iteration {it}")

    def after_train(self) -> None:
        self._stack.close()


# ----------------------------------------------------------------------------- outputs


# Everything train_net writes into an OUTPUT_DIR (and into OUTPUT_DIR/seed{K} with --trials): its
# presence means the folder holds a run; --overwrite deletes exactly these.
_OUTPUTS = (
    "results.json",
    "metrics.json",
    "last_checkpoint",
    "model_*.pth",
    "events.out.tfevents.*",
    "config.yaml",
    "log.txt*",
    "inference",
)
RUN_OUTPUTS = _OUTPUTS + tuple(f"seed*/{x}" for x in _OUTPUTS)
RUN_CHECKPOINTS = ("last_checkpoint", "seed*/last_checkpoint")
