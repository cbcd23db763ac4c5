"""What a study costs before it runs: GPU-hours per stage from measured throughputs.

The figures live in ``figures.json`` beside this file (measured with ``benchmarks/gpu_check.sh``,
plus detectron2's published V100 figures for models we have not timed), so they are updated in
one place. The estimate assumes linear scaling over GPUs and leaves out evaluation, data loading
stalls and queue time: it is the order of magnitude a cluster request needs, not a promise.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .graph import Stage
from .spec import Study

FIGURES = Path(__file__).with_name("figures.json")


@dataclass
class Estimate:
    gpu_hours: float | None  # None: no measured figure for this model
    detail: str  # how it was computed, or what figure is missing


def load_figures(path: Path = FIGURES) -> dict:
    return json.loads(path.read_text())


def count_images(folder: Path) -> int | None:
    """Files in an ImageFolder's class folders (None when it is not on this machine)."""
    if not folder.is_dir():
        return None
    n = 0
    with os.scandir(folder) as classes:
        for c in classes:
            if c.is_dir():
                with os.scandir(c.path) as files:
                    n += sum(1 for f in files if f.is_file())
    return n


def _args_opts(stage: Stage) -> tuple[str, int, list[str]]:
    """(config file, --cohort, KEY VALUE overrides) of a pretrain / detect stage's arguments."""
    a, cfg_file, cohort, opts = stage.args, "", 0, []
    i = 0
    while i < len(a):
        if a[i] == "--config-file":
            cfg_file, i = a[i + 1], i + 2
        elif a[i] == "--cohort":
            cohort, i = int(a[i + 1]), i + 2
        else:
            opts, i = a[i:], len(a)
    return cfg_file, cohort, opts


def pretrain_estimate(study: Study, stage: Stage, figures: dict) -> Estimate:
    from ..pretrain.config import setup_pretrain_cfg

    cfg_file, cohort, opts = _args_opts(stage)
    cfg = setup_pretrain_cfg(cfg_file, opts, cohort or None, None)
    archs, amp = list(cfg.MODEL.ARCHS), cfg.SOLVER.AMP
    images = study.cfg.ARMS[stage.arm].IMAGES or count_images(
        Path(cfg.DATA.ROOT) / cfg.DATA.TRAIN_DIR
    )
    if not images:
        return Estimate(
            None, f"images unknown: {cfg.DATA.ROOT} not here; set ARMS.{stage.arm}.IMAGES"
        )
    batch = cfg.SOLVER.IMS_PER_BATCH
    iters = cfg.SOLVER.EPOCHS * max(images // batch, 1)
    if cfg.SOLVER.MAX_ITER > 0:
        iters = min(iters, cfg.SOLVER.MAX_ITER)
    rows = [
        f
        for f in figures["pretrain"]
        if f["mode"] == cfg.MODE and f["archs"] == archs and f["amp"] == amp
    ]
    what = f"{cfg.MODE} {'+'.join(archs)} {amp or 'fp32'}"
    if not rows:
        return Estimate(None, f"no measured throughput for {what}")
    f = rows[0]
    hours = iters * batch / f["images_per_s_per_gpu"] / 3600
    return Estimate(
        hours,
        f"{iters} it x {batch} img / {f['images_per_s_per_gpu']} img/s per {f['gpu']} ({what})",
    )


def detect_estimate(stage: Stage, figures: dict) -> Estimate:
    from ..config import merge_cfg
    from ..detection.config import get_detection_cfg

    cfg_file, _, opts = _args_opts(stage)
    cfg = merge_cfg(get_detection_cfg(), cfg_file, opts)
    m = cfg.MODEL
    key = (m.BACKBONE.NAME, int(m.RESNETS.DEPTH), bool(m.MASK_ON), bool(cfg.SOLVER.AMP.ENABLED))
    rows = [f for f in figures["detect"] if (f["backbone"], f["depth"], f["mask"], f["amp"]) == key]
    what = f"R{key[1]} {key[0]}{' mask' if key[2] else ''}{' AMP' if key[3] else ''}"
    if not rows:
        return Estimate(None, f"no measured s/iter for {what}")
    f = rows[0]
    gpus_equiv = cfg.SOLVER.IMS_PER_BATCH / 2  # the figure is per GPU at 2 images each
    s_iter = f["s_per_iter_at_2_images_per_gpu"]
    hours = cfg.SOLVER.MAX_ITER * s_iter * gpus_equiv / 3600
    return Estimate(
        hours,
        f"{cfg.SOLVER.MAX_ITER} it x {s_iter} s/it x {gpus_equiv:g} GPUs at 2 img ({f['gpu']})",
    )


def estimate(study: Study, stage: Stage, figures: dict) -> Estimate:
    if stage.kind == "pretrain":
        return pretrain_estimate(study, stage, figures)
    if stage.kind == "detect":
        return detect_estimate(stage, figures)
    return Estimate(0.0, "no GPU")


def slurm_jobs(stages: list[Stage]) -> tuple[int, int]:
    """(jobs submitted, of which arrays): detection trials of one (protocol, arm) are one array."""
    arrays = {(s.protocol, s.arm) for s in stages if s.kind == "detect"}
    others = sum(1 for s in stages if s.kind != "detect")
    return others + len(arrays), len(arrays)


def fmt_hours(h: float | None) -> str:
    if h is None:
        return "?"
    return "0" if h == 0 else (f"{h:.3g}" if h < 10 else f"{math.ceil(h):,}")
