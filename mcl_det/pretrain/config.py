"""yacs defaults for MCL pretraining.

The defaults are the paper's recipes: the self-supervised ones are MoCo v2's (the base method of the
paper's ImageNet self-supervised experiments), the supervised ones ImageNet's. Shipped YAML files in
``pretrain/configs/`` only override what differs and may inherit another file with ``_BASE_`` (a
path relative to the file naming it, as in detectron2); unknown keys are an error (``merge_cfg``).
The names the enum keys accept are in ``choices``.
"""

from __future__ import annotations

from typing import Any

import yaml
from fvcore.common.config import CfgNode

from ..config import merge_cfg
from ..utils.elastic import DEFAULT_TIMEOUT_S
from ..utils.errors import MCLDetError
from .choices import (
    AMP_MODES,
    JPEG_DECODERS,
    MODES,
    PIPELINES,
    RESNETS,
    SCHEDULES,
    SUP_NEGATIVES,
)

# the key of the collectives' timeout: it changes no result, so --auto-resume ignores it
TIMEOUT_KEY = "DIST.TIMEOUT_S"


class CN(CfgNode):
    """fvcore's CfgNode (a yacs CfgNode whose ``merge_from_file`` follows ``_BASE_``, always with
    ``yaml.safe_load``); an empty or comments-only file is an empty config, as with plain yacs."""

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False) -> dict[str, Any]:
        with cls._open_cfg(filename) as f:
            if yaml.safe_load(f) is None:
                return {}
        return super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)


def get_pretrain_cfg() -> CN:
    """Return a fresh copy of the pretraining defaults (MoCo v2 + MCL, self-supervised)."""
    _C = CN()
    _C.MODE = "selfsup"  # "selfsup" (MoCo v2 base) or "supervised"
    _C.OUTPUT_DIR = "output/pretrain"
    _C.SEED = 0
    _C.DEVICE = ""  # "" -> cuda when available, else cpu
    # CPU runs: glibc keeps freed buffers for reuse instead of page-faulting them in again every
    # step (the RSS stays near its peak). No effect on a GPU.
    _C.CPU_KEEP_FREED_MEMORY = True

    _C.MODEL = CN()
    _C.MODEL.ARCH = "resnet50"  # used for every member when ARCHS is empty
    # one torchvision ResNet name per member (heterogeneous cohorts); setup fills it in from
    # ARCH and COHORT when it is empty, so the resolved config names every member
    _C.MODEL.ARCHS = []
    _C.MODEL.COHORT = 2  # M, number of members (set to len(ARCHS) when ARCHS is given)
    _C.MODEL.DIM = 128  # embedding size of the projection head
    _C.MODEL.HEAD_HIDDEN = 0  # hidden width of the MLP head; 0 -> backbone feature width (MoCo v2)
    _C.MODEL.MOMENTUM = 0.999  # key encoder EMA (selfsup)
    _C.MODEL.QUEUE_SIZE = 65536  # K, keys per member queue (selfsup)
    # single-process shuffle-BN equivalent: the local batch is cut into this many BN groups (as if
    # it were spread over that many GPUs); the key batch is shuffled before it is cut. 1 = off.
    _C.MODEL.SHUFFLE_BN_SPLITS = 1
    _C.MODEL.SHUFFLE_BN = True  # shuffle keys across ranks (and across the splits above)
    _C.MODEL.SYNC_BN = False  # SyncBatchNorm (supervised only; selfsup relies on per-rank BN)
    _C.MODEL.CHANNELS_LAST = False
    _C.MODEL.COMPILE = False  # torch.compile each member's encoder
    _C.MODEL.NUM_CLASSES = 0  # supervised: 0 -> number of classes found in the dataset

    _C.LOSS = CN()
    _C.LOSS.TAU = 0.2  # contrastive temperature (MoCo v2: 0.2; supervised MCL: 0.07)
    _C.LOSS.T = 3.0  # KL temperature of the soft terms
    _C.LOSS.W_CE = 1.0  # supervised: weight of each member's cross-entropy
    _C.LOSS.W_VCL = 1.0  # alpha in the supervised recipe
    _C.LOSS.W_ICL = 1.0  # beta
    _C.LOSS.W_SOFT_VCL = 1.0  # gamma
    _C.LOSS.W_SOFT_ICL = 1.0  # lambda
    _C.LOSS.SUP_VARIANT = "authors"  # supervised terms: "authors" or "single_positive"

    _C.SUP = CN()
    _C.SUP.NEGATIVES = "bank"  # "bank" (memory bank, ImageNet size) or "batch" (SupCon style)
    _C.SUP.BANK_NEGATIVES = 8192  # sampled negatives per anchor, shared by every member
    _C.SUP.BANK_MOMENTUM = 0.5  # bank entry <- normalise(m * old + (1 - m) * new)
    _C.SUP.SAMPLES_PER_CLASS = 4  # class-balanced sampler ("batch" variant)

    _C.DATA = CN()
    _C.DATA.ROOT = "toy"  # ImageFolder root with TRAIN_DIR/ and VAL_DIR/; "toy" -> generated
    _C.DATA.TRAIN_DIR = "train"
    _C.DATA.VAL_DIR = "val"
    _C.DATA.IMAGE_SIZE = 224
    # evaluation views: resize to IMAGE_SIZE / EVAL_CROP, centre-crop IMAGE_SIZE (ImageNet: 0.875,
    # 224 <- 256); 1.0 keeps the whole image (small images whose object fills the frame)
    _C.DATA.EVAL_CROP = 0.875
    # supervised training / linear evaluation: RandomResizedCrop's range of the crop's area
    # fraction (ImageNet recipe (0.08, 1.0); milder for small images whose object fills the frame)
    _C.DATA.SUP_CROP_SCALE = (0.08, 1.0)
    _C.DATA.AUG = "aug+"  # selfsup: "aug+" (MoCo v2) or "aug" (MoCo v1)
    _C.DATA.NUM_WORKERS = 4
    # "pil": the whole augmentation in the workers; "device": workers decode + crop (uint8), the
    # rest runs batched on the training device; "auto": device on CUDA, pil on the CPU
    _C.DATA.PIPELINE = "auto"
    _C.DATA.JPEG_DECODE = "cpu"  # "cuda": decode JPEGs batched on the GPU (PIPELINE device)
    _C.DATA.SCAN_IMAGES = True  # open every image header once at start; unreadable ones skipped

    _C.SOLVER = CN()
    _C.SOLVER.IMS_PER_BATCH = 256  # GLOBAL batch over all processes
    _C.SOLVER.BASE_LR = 0.03  # lr for REFERENCE_BATCH images; scaled linearly to IMS_PER_BATCH
    _C.SOLVER.REFERENCE_BATCH = 256
    _C.SOLVER.MOMENTUM = 0.9
    _C.SOLVER.NESTEROV = False
    _C.SOLVER.WEIGHT_DECAY = 1e-4
    _C.SOLVER.SCHEDULE = "cosine"  # "cosine" (per iteration) or "step"
    _C.SOLVER.STEPS = (120, 160)  # epochs where the lr is multiplied by GAMMA ("step")
    _C.SOLVER.GAMMA = 0.1
    _C.SOLVER.EPOCHS = 200
    _C.SOLVER.MAX_ITER = 0  # > 0: stop after this many iterations (the lr still spans EPOCHS)
    _C.SOLVER.AMP = ""  # "", "bf16" or "fp16"
    _C.SOLVER.CHECKPOINT_PERIOD = 1000  # iterations; checkpoint_last.pth also at epoch ends
    # epochs between kept snapshots checkpoint_epXXXX.pth (the last epoch is always kept);
    # 0 = keep only checkpoint_last.pth. An R50 x 2 MoCo cohort checkpoint is ~0.6 GB, so
    # a snapshot every epoch of a 200-epoch run would fill 120 GB.
    _C.SOLVER.EPOCH_SNAPSHOT_PERIOD = 10

    _C.MONITOR = CN()
    _C.MONITOR.EVAL_PERIOD = 1  # epochs between kNN / top-1 evaluations; 0 = never
    _C.MONITOR.KNN_K = 200
    _C.MONITOR.KNN_T = 0.07
    _C.MONITOR.KNN_MAX_TRAIN = 0  # > 0: kNN memory uses at most this many train images
    _C.MONITOR.LOG_PERIOD = 20  # iterations between train lines in log.jsonl
    _C.MONITOR.TENSORBOARD = True
    _C.MONITOR.PROGRESS = True  # tqdm bar with ETA (rank 0)

    _C.DIST = CN()  # several processes (--num-gpus N, torchrun); see docs/DESIGN.md
    # seconds a collective waits for a peer before it fails and ends the process (a dead or hung
    # rank never blocks the others for longer); longer than anything one rank does alone while
    # the others wait (rank 0's kNN monitor, a checkpoint write). Does not change results.
    _C.DIST.TIMEOUT_S = DEFAULT_TIMEOUT_S

    _C.LINEAR = CN()  # linear evaluation, MoCo recipe
    _C.LINEAR.LR = 30.0
    _C.LINEAR.EPOCHS = 100
    _C.LINEAR.STEPS = (60, 80)
    _C.LINEAR.WEIGHT_DECAY = 0.0
    _C.LINEAR.MOMENTUM = 0.9
    _C.LINEAR.IMS_PER_BATCH = 256
    _C.LINEAR.MAX_ITER = 0
    return _C


def member_archs(cfg: CN) -> list[str]:
    """One arch name per member, from a config resolved by ``setup_pretrain_cfg``."""
    return list(cfg.MODEL.ARCHS)


def normalize_opts(opts: list[str]) -> list[str]:
    """Let ``MODEL.ARCHS resnet18,resnet50`` be written without Python list syntax."""
    out = list(opts)
    for i in range(0, len(out) - 1, 2):
        if out[i] == "MODEL.ARCHS" and not out[i + 1].lstrip().startswith(("[", "(")):
            names = [a.strip() for a in out[i + 1].split(",") if a.strip()]
            out[i + 1] = repr(names)
    return out


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise MCLDetError(f"unknown {key} {value!r}; use one of {shown}")


def setup_pretrain_cfg(
    config_file: str | None,
    opts: list[str] | None = None,
    cohort: int | None = None,
    amp: str | None = None,
) -> CN:
    """Defaults <- config file <- KEY VALUE opts <- --cohort/--amp, checked and resolved once.

    Unknown keys and unknown values of enum keys are errors. MODEL.ARCHS / MODEL.COHORT /
    MODEL.ARCH become one arch name per member in MODEL.ARCHS (and COHORT = its length) before
    the config is frozen, so the saved config names every member.
    """
    cfg = get_pretrain_cfg()
    merge_cfg(cfg, config_file, normalize_opts(list(opts or [])))
    archs = [str(a).strip() for a in cfg.MODEL.ARCHS]
    if cohort is not None:
        if cohort < 1:
            raise MCLDetError(f"--cohort must be >= 1, got {cohort}")
        if archs and len(archs) != cohort:
            raise MCLDetError(
                f"--cohort {cohort} disagrees with MODEL.ARCHS {archs}; drop one of the two"
            )
        cfg.MODEL.COHORT = cohort
    archs = archs or [cfg.MODEL.ARCH] * int(cfg.MODEL.COHORT)
    if not archs:
        raise MCLDetError("the cohort is empty; set --cohort N or MODEL.ARCHS")
    for arch in archs:
        _check_choice("architecture (MODEL.ARCH/ARCHS)", arch, RESNETS)
    cfg.MODEL.ARCHS, cfg.MODEL.COHORT = archs, len(archs)
    if amp is not None:
        cfg.SOLVER.AMP = amp
    check_cfg(cfg)
    cfg.freeze()
    return cfg


def check_cfg(cfg: CN) -> None:
    """Every enum key and range of a pretraining config, checked in this one place (by
    ``setup_pretrain_cfg`` and by linear evaluation, whose config is a checkpoint's plus
    overrides): a bad value is one clear error before anything starts."""
    from .augment import AUGS
    from .losses_sup import SUP_VARIANTS

    _check_choice("MODE", cfg.MODE, MODES)
    _check_choice("SOLVER.SCHEDULE", cfg.SOLVER.SCHEDULE, SCHEDULES)
    _check_choice("SOLVER.AMP", cfg.SOLVER.AMP, AMP_MODES)
    _check_choice("SUP.NEGATIVES", cfg.SUP.NEGATIVES, SUP_NEGATIVES)
    _check_choice("LOSS.SUP_VARIANT", cfg.LOSS.SUP_VARIANT, SUP_VARIANTS)
    _check_choice("DATA.PIPELINE", cfg.DATA.PIPELINE, PIPELINES)
    _check_choice("DATA.JPEG_DECODE", cfg.DATA.JPEG_DECODE, JPEG_DECODERS)
    _check_choice("DATA.AUG", cfg.DATA.AUG, AUGS)
    scale = tuple(cfg.DATA.SUP_CROP_SCALE)
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise MCLDetError(
            f"DATA.SUP_CROP_SCALE must be (min, max) with 0 < min <= max <= 1, got {scale}: the "
            "range of RandomResizedCrop's area fraction"
        )
    if not float(cfg.DIST.TIMEOUT_S) > 0:
        raise MCLDetError(
            f"DIST.TIMEOUT_S must be > 0 seconds, got {cfg.DIST.TIMEOUT_S}: how long a collective "
            f"waits for a peer ({DEFAULT_TIMEOUT_S} by default)"
        )
    if not 0.0 < float(cfg.DATA.EVAL_CROP) <= 1.0:
        raise MCLDetError(
            f"DATA.EVAL_CROP must be in (0, 1], got {cfg.DATA.EVAL_CROP}: 0.875 is ImageNet's "
            "centre crop, 1.0 the whole image"
        )
