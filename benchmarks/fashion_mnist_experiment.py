#!/usr/bin/env python
"""Fashion-MNIST MCL experiment: supervised and self-supervised MCL x2 vs their independent
baselines, several seeds, kNN / top-1 per member, Faster R-CNN transfer to Fashion-MNIST scenes,
AP tables -> OUT/report.md. Resumable: run the same command again after an interruption.

    python benchmarks/fashion_mnist_experiment.py [--out DIR] [--fashion-dir D] [--seeds 0 1 2]
        [--per-class 0] [--pretrain-epochs 1] [--det-iters 150] [--jobs 2] [--keep-checkpoints]
        [--tiny]

For every seed, four cohorts of 2 x ResNet-18 are pretrained on Fashion-MNIST training images
(28x28 grey, read as 32 px RGB):

    sup_mcl          supervised MCL: CE + 0.1 VCL + 0.1 ICL + Soft VCL + Soft ICL
    sup_baseline     the same cohort, interaction weights 0 (CE only: independent members)
    selfsup_mcl      self-supervised MCL on MoCo v2: VCL (InfoNCE) + ICL + Soft VCL + Soft ICL
    selfsup_baseline the same cohort, interaction weights 0 (two independent MoCo v2 runs)

Each member's top-1 (supervised) or kNN top-1 (self-supervised) on held-out t10k images comes from
the pretraining log. Member 0 of every cohort is exported to detectron2 and fine-tuned as a Faster
R-CNN R18-FPN on the Fashion-MNIST detection scenes (VOC format, 10 classes, items from the t10k
half never seen in pretraining), with the same detection seed as its pretraining seed.
``tools/report.py`` then makes one table per mode (MCL vs its own baseline) and the combined
``OUT/report.md`` also lists the loss terms that were active in each run.

Every stage runs the user-facing command (tools/stages.py) and is skipped when its output exists;
an interrupted pretraining continues with ``--resume`` from its last checkpoint, an interrupted
detection run starts again. Per-stage wall times go to ``OUT/timings.json``. The (run, seed) chains
pretrain -> convert -> detection are independent: ``--jobs`` N runs N side by side, the cores split
between them, each stage's output in ``OUT/logs/``; a failing stage stops the others.

The default size (all 60,000 training images for one epoch at batch 64; 150 detection iterations
on 400 scenes, tested on 150) is what 12 cohorts of two networks allow in 90 minutes on 2 CPU
cores: the networks are far from converged, so the table measures a short-schedule effect. The
README gives the measured budget and the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from stages import ROOT, Stages  # noqa: E402  (first: it puts the checkout on sys.path)

from mcl_det.cli.run import run_main  # noqa: E402
from mcl_det.data.fashion_mnist import ensure_fashion_mnist, export_imagefolder  # noqa: E402
from mcl_det.data.scenes import make_fashion_scenes  # noqa: E402
from mcl_det.utils.errors import MCLDetError  # noqa: E402
from mcl_det.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

# run name -> (pretraining config, mode); the baseline of "<mode>_mcl" is "<mode>_baseline"
RUNS: dict[str, tuple[str, str]] = {
    "sup_mcl": ("pretrain/configs/fashion_sup_mcl.yaml", "supervised"),
    "sup_baseline": ("pretrain/configs/fashion_sup_baseline.yaml", "supervised"),
    "selfsup_mcl": ("pretrain/configs/fashion_selfsup_mcl.yaml", "selfsup"),
    "selfsup_baseline": ("pretrain/configs/fashion_selfsup_baseline.yaml", "selfsup"),
}
DET_CONFIG = "detection_configs/fashion_voc_faster_rcnn_r18_fpn.yaml"
MODES = (("supervised", "sup"), ("selfsup", "selfsup"))
TERMS = (("VCL", "W_VCL"), ("ICL", "W_ICL"), ("Soft VCL", "W_SOFT_VCL"), ("Soft ICL", "W_SOFT_ICL"))


@dataclass
class FashionSettings:
    """Knobs of the experiment; the defaults fit 3 seeds in 90 minutes on 2 CPU cores."""

    out: Path = ROOT / "output" / "fashion_experiment"
    fashion_dir: Path | None = None  # None -> the Debian package path
    seeds: tuple[int, ...] = (0, 1, 2)
    per_class: int = 0  # pretraining images per class (0 = all 6,000 per class: the 60k set)
    val_per_class: int = 100  # t10k images per class for the kNN / top-1 monitor
    pretrain_epochs: int = 1
    pretrain_batch: int = 64
    det_iters: int = 150
    num_train_scenes: int = 400
    num_test_scenes: int = 150
    canvas_range: tuple[int, int] = (160, 256)
    extra_pretrain: list[str] = field(default_factory=list)  # KEY VALUE for every pretraining
    extra_det: list[str] = field(default_factory=list)  # KEY VALUE for every detection run
    # False: a pretraining checkpoint is deleted once member 0 is converted, and a detection
    # model_final.pth once its results.json is written: the report reads neither
    keep_checkpoints: bool = False
    # chains run at once, the cores split between them. Neither this nor keep_checkpoints
    # changes a result
    jobs: int = 2


def tiny_settings(out: Path, fashion_dir: Path | None = None) -> FashionSettings:
    """The same pipeline at minimal size (1 seed, 2 images per class, 2-3 iterations per stage):
    the test suite runs it; its numbers mean nothing."""
    return FashionSettings(
        out=out,
        fashion_dir=fashion_dir,
        seeds=(0,),
        per_class=2,
        val_per_class=1,
        pretrain_epochs=1,
        pretrain_batch=8,
        det_iters=2,
        num_train_scenes=4,
        num_test_scenes=2,
        canvas_range=(96, 128),
        # KEY VALUE pairs: queue / bank / k sized to 20 images; no progress bars in test logs
        extra_pretrain=(
            "MODEL.QUEUE_SIZE 32 SUP.BANK_NEGATIVES 8 MONITOR.KNN_K 3 MONITOR.LOG_PERIOD 1 "
            "MONITOR.PROGRESS False"
        ).split(),
        extra_det=(
            "INPUT.MIN_SIZE_TRAIN (96,) INPUT.MAX_SIZE_TRAIN 128 INPUT.MIN_SIZE_TEST 96 "
            "INPUT.MAX_SIZE_TEST 128 SOLVER.IMS_PER_BATCH 2"
        ).split(),
    )


def shipped_config(cfg_file: str) -> str:
    """The resolved YAML of a shipped pretraining config (its ``_BASE_`` files merged in), what a
    run's ``config.yaml`` holds before the runner's overrides."""
    from mcl_det.pretrain.config import setup_pretrain_cfg

    return setup_pretrain_cfg(str(ROOT / cfg_file)).dump()


def active_terms(config_yaml: str, mode: str) -> str:
    """``"CE 1, VCL 0.1, ..."``: the loss terms with a non-zero weight in a resolved config."""
    from yacs.config import CfgNode

    loss = CfgNode.load_cfg(config_yaml).LOSS
    names = ((("CE", "W_CE"),) if mode == "supervised" else ()) + TERMS
    on = [f"{n} {float(loss[k]):g}" for n, k in names if float(loss[k]) != 0.0]
    return ", ".join(on) if on else "none"


def pretrain_opts(s: FashionSettings, seed: int) -> list[str]:
    """KEY VALUE overrides of every pretraining run."""
    return (
        ["SEED", str(seed), "SOLVER.EPOCHS", str(s.pretrain_epochs)]
        + ["SOLVER.IMS_PER_BATCH", str(s.pretrain_batch)]
        + s.extra_pretrain
    )


def detect_opts(s: FashionSettings, run: str, seed: int) -> list[str]:
    """KEY VALUE overrides of every detection run: the scenes as VOC datasets, the schedule."""
    voc = str(s.out / "data" / "scenes" / "voc")
    datasets = [["fashion_scenes_voc_trainval", voc, "trainval"]]
    datasets += [["fashion_scenes_voc_test", voc, "test"]]
    steps = f"({max(1, int(0.8 * s.det_iters))},)"
    warmup = str(max(1, min(30, s.det_iters // 5)))
    return (
        ["MCL_DET.RUN_NAME", f"fashion_{run}_seed{seed}", "MCL_DET.DATASETS.VOC", repr(datasets)]
        + ["SOLVER.MAX_ITER", str(s.det_iters), "SOLVER.STEPS", steps]
        + ["SOLVER.WARMUP_ITERS", warmup]
        + s.extra_det
    )


def prepare_data(s: FashionSettings) -> tuple[Path, Path]:
    """ImageFolder subset for pretraining and the detection scenes (both resumable). A missing
    Fashion-MNIST is a one-line error saying how to get it; nothing is installed here."""
    fm = ensure_fashion_mnist(s.fashion_dir)
    folder, scenes = s.out / "data" / "imagefolder", s.out / "data" / "scenes"

    def make() -> None:
        export_imagefolder(folder, fm, s.per_class or None, s.val_per_class)
        make_fashion_scenes(
            scenes,
            fm,
            s.num_train_scenes,
            s.num_test_scenes,
            seed=0,
            canvas_range=s.canvas_range,
        )

    per_class = f"{s.per_class or 'all'} train / {s.val_per_class} val images per class"
    Stages().call(f"data: ImageFolder ({per_class}) and scenes", make)
    return folder, scenes


def check_settings(s: FashionSettings) -> None:
    """Record the sizes in ``OUT/settings.json``; resuming with other sizes would silently mix
    runs of two protocols in one table, so it is an error (more seeds are fine: they add runs)."""
    d = asdict(s)
    ignored = ("out", "fashion_dir", "seeds", "keep_checkpoints", "jobs")
    now = {k: v for k, v in d.items() if k not in ignored}
    now = json.loads(json.dumps(now))  # tuples -> lists, as read back from the file
    path = s.out / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if diff:
            raise MCLDetError(
                f"{s.out} holds an experiment with other settings ({', '.join(diff)}); use "
                "another --out, or delete that folder to start over"
            )
    else:
        s.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, now)


def run_chain(s: FashionSettings, st: Stages, run: str, seed: int, folder: Path) -> None:
    """pretrain -> convert member 0 -> detection for one (run, seed); each skipped when done."""
    pre = s.out / "pretrain" / run / f"seed{seed}"
    ckpt = pre / "checkpoint_last.pth"
    w = s.out / "weights" / f"{run}_seed{seed}_member0.pkl"
    if not w.exists() and not ckpt.exists():  # finished, but its checkpoint went unconverted
        (pre / "DONE").unlink(missing_ok=True)
    cfg = RUNS[run][0]
    st.pretrain(f"pretrain {run} seed {seed}", cfg, pre, folder, pretrain_opts(s, seed))
    st.convert(f"convert {run} seed {seed}", ckpt, w)
    if not s.keep_checkpoints:
        ckpt.unlink(missing_ok=True)
    det = s.out / "detection" / run / f"seed{seed}"
    opts = detect_opts(s, run, seed)
    name = f"detection {run} seed {seed}"
    st.detect(name, DET_CONFIG, w, run, seed, det, opts, keep_weights=s.keep_checkpoints)


def run_fashion_experiment(s: FashionSettings) -> Path:
    """Run (or resume) every stage; returns the path of ``OUT/report.md``."""
    t_start = time.time()
    if s.jobs < 1:
        raise MCLDetError(f"--jobs must be at least 1 (got {s.jobs})")
    check_settings(s)
    folder, _ = prepare_data(s)
    # the self-supervised chains are the longest: start them first to balance the workers
    chains = [(run, seed) for seed in s.seeds for run in RUNS]
    chains.sort(key=lambda c: not c[0].startswith("selfsup"))
    env, log_dir = None, None
    if s.jobs > 1:  # split the cores: one-thread processes side by side beat one that shares
        threads = str(max(1, (os.cpu_count() or 1) // s.jobs))
        env, log_dir = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}, s.out / "logs"
    st = Stages(3 * len(chains), env=env, log_dir=log_dir, timings=s.out / "timings.json")
    st.run_chains([partial(run_chain, s, st, run, seed, folder) for run, seed in chains], s.jobs)
    report = write_report(s)
    print(report.read_text())
    print(f"fashion experiment finished in {time.time() - t_start:.0f} s; report: {report}")
    return report


def write_report(s: FashionSettings) -> Path:
    """One ``tools/report.py`` table per mode (MCL vs its own baseline) -> ``OUT/report.md``."""
    parts = [
        "# Fashion-MNIST MCL experiment\n",
        f"Pretraining: 2 x ResNet-18 at 32 px on {s.per_class or 'all'} training images per class"
        f" ({s.pretrain_epochs} epochs, batch {s.pretrain_batch}); member metrics on "
        f"{s.val_per_class} t10k images per class. Detection: Faster R-CNN R18-FPN from member 0,"
        f" {s.det_iters} iterations on {s.num_train_scenes} scenes, tested on "
        f"{s.num_test_scenes}. Seeds: {', '.join(map(str, s.seeds))}.\n",
    ]
    terms = []
    for run, (cfg_file, mode) in RUNS.items():
        saved = s.out / "pretrain" / run / f"seed{s.seeds[0]}" / "config.yaml"
        text = saved.read_text() if saved.is_file() else shipped_config(cfg_file)
        terms.append(f"{run}: {active_terms(text, mode)}")
    parts.append("Active loss terms (weight): " + "; ".join(terms) + ".\n")
    st = Stages()
    for mode, prefix in MODES:
        runs = [
            s.out / d / f"{prefix}_{t}"
            for d in ("detection", "pretrain")
            for t in ("mcl", "baseline")
        ]
        md = st.report(f"report {mode}", runs, f"{prefix}_baseline", s.out / f"report_{mode}.md")
        parts.append(f"## {mode}: {prefix}_mcl vs {prefix}_baseline\n\n{md.read_text()}")
    report = s.out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report


def main() -> int:
    d = FashionSettings()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\nFor every")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=d.out, help="where every stage writes")
    ap.add_argument("--fashion-dir", type=Path, default=None, help="idx files (default: Debian's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    ap.add_argument(
        "--per-class",
        type=int,
        default=d.per_class,
        help="pretraining images per class (default 0 = all 6,000: the 60k set)",
    )
    ap.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    ap.add_argument("--det-iters", type=int, default=d.det_iters)
    ap.add_argument(
        "--jobs",
        type=int,
        default=d.jobs,
        help=f"(run, seed) chains run at once, the cores split between them (default {d.jobs})",
    )
    ap.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep pretraining checkpoints and detection model_final.pth (default: delete them "
        "once converted / evaluated)",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="minimal sizes (tests); numbers mean nothing"
    )
    a = ap.parse_args()
    if a.tiny:
        s = tiny_settings(a.out, a.fashion_dir)
        s.keep_checkpoints, s.jobs = a.keep_checkpoints, a.jobs
    else:
        s = FashionSettings(
            out=a.out,
            fashion_dir=a.fashion_dir,
            seeds=tuple(a.seeds),
            per_class=a.per_class,
            pretrain_epochs=a.pretrain_epochs,
            det_iters=a.det_iters,
            keep_checkpoints=a.keep_checkpoints,
            jobs=a.jobs,
        )
    run_fashion_experiment(s)
    return 0


if __name__ == "__main__":
    run_main(main)
