"""The end-to-end demo: every stage of the toolkit on toy data, on CPU, in minutes.

toy data -> MCL x2 pretraining -> the same cohort with the interaction terms off (baseline) ->
convert member 0 of each -> fine-tune Faster R-CNN on toy VOC from each -> AP table.

Each stage runs the user-facing command (``pretrain/main.py``, ``tools/convert_to_d2.py``,
``tools/train_net.py``, ``tools/report.py``) in a subprocess, so the demo exercises exactly what a
user types. A stage whose output already exists is skipped, so an interrupted demo resumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .utils.errors import MCLDetError

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoSettings:
    """Knobs of the demo; the defaults finish in well under 15 minutes on 2 CPU cores."""

    output: Path = ROOT / "output" / "demo"
    data: Path = ROOT / "datasets" / "toy"
    pretrain_epochs: int = 6
    det_iters: int = 200
    seeds: tuple[int, ...] = (0,)
    extra_pretrain: list[str] = field(default_factory=list)
    extra_det: list[str] = field(default_factory=list)
    # False: a fine-tuned detector's model_final.pth (0.1 GB) is deleted once its results.json is
    # written (the report reads only that); the pretraining checkpoints are always kept
    keep_checkpoints: bool = False


def drop_detector_weights(out: Path) -> None:
    """Delete a finished fine-tuning run's model_final.pth (0.1 GB) and the last_checkpoint file
    that points at it; its results.json, metrics and logs stay (all a report reads)."""
    for name in ("model_final.pth", "last_checkpoint"):
        (out / name).unlink(missing_ok=True)


def _run(step: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
    print(f"\n=== {step}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise MCLDetError(f"step '{step}' failed (exit {r.returncode}); see its output above")
    print(f"--- {step}: {time.time() - t0:.0f} s", flush=True)


def run_demo(s: DemoSettings) -> Path:
    """Run every stage; returns the path of the markdown report."""
    py = sys.executable
    env = dict(os.environ, DETECTRON2_DATASETS=str(s.data))
    t_start = time.time()

    if not (s.data / "VOC2007").is_dir() or not (s.data / "imagenet").is_dir():
        _run("toy data", [py, "tools/make_toy_data.py", "--root", str(s.data)])

    weights: dict[str, Path] = {}
    for tag, cfg in (
        ("mcl", "pretrain/configs/toy.yaml"),
        ("baseline", "pretrain/configs/toy_baseline.yaml"),
    ):
        out = s.output / f"pretrain_{tag}"
        ckpt = out / "checkpoint_last.pth"
        if not (out / "DONE").exists():
            _run(
                f"pretrain {tag} (cohort of 2)",
                [py, "pretrain/main.py", "--cohort", "2", "--config-file", cfg]
                + (["--resume"] if ckpt.exists() else [])
                + ["DATA.ROOT", str(s.data / "imagenet"), "OUTPUT_DIR", str(out)]
                + ["SOLVER.EPOCHS", str(s.pretrain_epochs)]
                + s.extra_pretrain,
                env,
            )
            (out / "DONE").touch()
        w = s.output / "weights" / f"{tag}_member0.pkl"
        if not w.exists():
            _run(
                f"convert {tag} member 0",
                [py, "tools/convert_to_d2.py", str(ckpt), str(w), "--member", "0"],
            )
        weights[tag] = w

    for tag, w in weights.items():
        for seed in s.seeds:
            out = s.output / f"det_{tag}" / f"seed{seed}"
            if (out / "results.json").exists():
                continue
            _run(
                f"fine-tune Faster R-CNN on toy VOC from {tag} member 0 (seed {seed})",
                [py, "tools/train_net.py", "--auto-resume", "--config-file"]
                + ["detection_configs/toy_voc_faster_rcnn_r18_fpn.yaml"]
                + ["MODEL.WEIGHTS", str(w), "MCL_DET.WEIGHTS_TAG", tag]
                + ["SEED", str(seed), "SOLVER.MAX_ITER", str(s.det_iters)]
                + ["OUTPUT_DIR", str(out)]
                + s.extra_det,
                env,
            )
            if not s.keep_checkpoints:
                drop_detector_weights(out)

    report = s.output / "report.md"
    _run(
        "report",
        [py, "tools/report.py", str(s.output / "det_mcl"), str(s.output / "det_baseline")]
        + [str(s.output / "pretrain_mcl"), str(s.output / "pretrain_baseline")]
        + ["--baseline", "baseline", "--output", str(report)],
    )
    print(report.read_text())
    print(f"demo finished in {time.time() - t_start:.0f} s; report: {report}")
    return report
