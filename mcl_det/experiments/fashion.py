"""The Fashion-MNIST MCL experiment (issue 7): real images, baseline vs MCL, several seeds, 2 CPUs.

For every seed, four cohorts of 2 x ResNet-18 are pretrained on Fashion-MNIST training images
(28x28 grey, read as 32 px RGB):

    sup_mcl          supervised MCL: CE + 0.1 VCL + 0.1 ICL + Soft VCL + Soft ICL
    sup_baseline     the same cohort, interaction weights 0 (CE only: independent members)
    selfsup_mcl      self-supervised MCL on MoCo v2: VCL (InfoNCE) + ICL + Soft VCL + Soft ICL
    selfsup_baseline the same cohort, interaction weights 0 (two independent MoCo v2 runs)

Each member's top-1 (supervised) or kNN top-1 (self-supervised) on held-out t10k images comes from
the pretraining log. Member 0 of every cohort is exported to detectron2 and fine-tuned as a Faster
R-CNN R18-FPN on the Fashion-MNIST detection scenes (VOC format, 10 classes, 160-256 px canvases,
items from the t10k half never seen in pretraining), with the same detection seed as its
pretraining seed. ``tools/report.py`` then makes one table per mode (MCL vs its own baseline) and
the combined ``OUT/report.md`` also lists the loss terms that were active in each run.

Every stage runs the user-facing command in a subprocess and is skipped when its output exists,
so an interrupted experiment resumes; an interrupted pretraining continues with ``--resume`` from its
last checkpoint (every 250 iterations and at the epoch end); an interrupted detection run starts
again (about 5 minutes). Per-stage wall times go to ``OUT/timings.json``. The (run, seed) chains
pretrain -> convert -> detection are independent: ``jobs`` = 2 runs two side by side with one
thread each (on 2 cores that does 1.3-1.4x the work of one two-thread process), each stage's output
in ``OUT/logs/``; a failing stage stops the others.

Size: pretraining reads all 60,000 training images (``per_class`` = 0; ``--per-class N`` takes the
first N of every class) for ``pretrain_epochs`` = 1 epoch at batch 64 (937 iterations, cosine lr);
kNN (k=50, 5,000-image memory) / top-1 use ``val_per_class`` = 100 t10k images per class. One epoch
is what 12 cohorts of two networks allow in 90 minutes on 2 cores: the networks are far from
converged, so the table measures a short-schedule effect, and whatever it says is reported as is.
Detection: 150 iterations at batch 4 on 400 train scenes, VOC AP on 150 test scenes.

Budget, measured on the full default run (3 seeds, 2 CPU cores, jobs 2; OUT/timings.json):

    stage (per run, two at once, one thread each)     wall s
    pretrain selfsup_mcl / selfsup_baseline            467-475 / 451-472
    pretrain sup_mcl / sup_baseline                    386-388 / 261-277
    convert member 0                                   4
    detection Faster R-CNN (150 it + test)             272-285
    data (ImageFolder export of 70k + 550 scenes)      7-20 once

    12 chains on 2 workers: 4,155 s = 69 min in all, under the 90-minute limit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.fashion_mnist import APT_HINT, DEFAULT_DIR, ensure_fashion_mnist
from ..demo import ROOT, _run, drop_detector_weights
from ..utils.errors import MCLDetError
from ..utils.io import atomic_write_json, atomic_write_text

# run name -> (pretraining config, mode); the baseline of "<mode>_mcl" is "<mode>_baseline"
RUNS: dict[str, tuple[str, str]] = {
    "sup_mcl": ("pretrain/configs/fashion_sup_mcl.yaml", "supervised"),
    "sup_baseline": ("pretrain/configs/fashion_sup_baseline.yaml", "supervised"),
    "selfsup_mcl": ("pretrain/configs/fashion_selfsup_mcl.yaml", "selfsup"),
    "selfsup_baseline": ("pretrain/configs/fashion_selfsup_baseline.yaml", "selfsup"),
}
DET_CONFIG = "detection_configs/fashion_voc_faster_rcnn_r18_fpn.yaml"
MODES = (("supervised", "sup"), ("selfsup", "selfsup"))


@dataclass
class FashionSettings:
    """Knobs of the experiment; the defaults fit 3 seeds in the 90-minute budget (docstring)."""

    out: Path = ROOT / "output" / "fashion_experiment"
    fashion_dir: Path | None = None  # None -> the Debian package path (installed when missing)
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
    # False: a pretraining checkpoint (0.2-0.3 GB) is deleted once member 0 is converted, and a
    # detection model_final.pth (0.1 GB) once its results.json is written; 12 runs would
    # otherwise keep ~5 GB that the report never reads
    keep_checkpoints: bool = False
    # stages run at once (each chain pretrain -> convert -> detection is independent); the cores
    # are split between them. Neither this nor keep_checkpoints changes a result
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


def resolve_fashion_dir(path: Path | None) -> Path:
    """The idx directory; when the default one is missing, install the Debian package if we can
    (root + apt-get), else raise the one-line error naming the path and the command."""
    try:
        return ensure_fashion_mnist(path)
    except MCLDetError:
        can_install = path is None and shutil.which("apt-get") and os.geteuid() == 0
        if not can_install:
            raise
    print(f"Fashion-MNIST not in {DEFAULT_DIR}; installing it: {APT_HINT}", flush=True)
    subprocess.run(["apt-get", "update"], check=False)
    if subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"]).returncode != 0:
        raise MCLDetError(
            f"could not install dataset-fashion-mnist; run `{APT_HINT}` yourself or pass "
            "--fashion-dir with the idx files"
        )
    return ensure_fashion_mnist(path)


def active_terms(config_yaml: str, mode: str) -> str:
    """``"CE 1, VCL 0.1, ..."``: the loss terms with a non-zero weight in a resolved config."""
    from yacs.config import CfgNode

    loss = CfgNode.load_cfg(config_yaml).LOSS
    names = [("VCL", "W_VCL"), ("ICL", "W_ICL"), ("Soft VCL", "W_SOFT_VCL"), ("Soft ICL", "W_SOFT_ICL")]  # fmt: skip
    if mode == "supervised":
        names.insert(0, ("CE", "W_CE"))
    on = [f"{n} {float(loss[k]):g}" for n, k in names if float(loss[k]) != 0.0]
    return ", ".join(on) if on else "none"


def _pretrain_cmd(s: FashionSettings, run: str, seed: int, out: Path, data: Path) -> list[str]:
    cfg, _ = RUNS[run]
    return (
        [sys.executable, "pretrain/main.py", "--config-file", cfg]
        + (["--resume"] if (out / "checkpoint_last.pth").exists() else [])
        + ["DATA.ROOT", str(data), "OUTPUT_DIR", str(out), "SEED", str(seed)]
        + ["SOLVER.EPOCHS", str(s.pretrain_epochs), "SOLVER.IMS_PER_BATCH", str(s.pretrain_batch)]
        + s.extra_pretrain
    )


def _convert_cmd(ckpt: Path, weights: Path) -> list[str]:
    return [sys.executable, "tools/convert_to_d2.py", str(ckpt), str(weights), "--member", "0"]


def _det_cmd(s: FashionSettings, run: str, seed: int, weights: Path, out: Path) -> list[str]:
    voc = str(s.out / "data" / "scenes" / "voc")
    datasets = repr([["fashion_scenes_voc_trainval", voc, "trainval"], ["fashion_scenes_voc_test", voc, "test"]])  # fmt: skip
    steps = f"({max(1, int(0.8 * s.det_iters))},)"
    return (
        [sys.executable, "tools/train_net.py", "--auto-resume", "--config-file", DET_CONFIG]
        + ["MODEL.WEIGHTS", str(weights), "MCL_DET.WEIGHTS_TAG", run, "SEED", str(seed)]
        + ["MCL_DET.RUN_NAME", f"fashion_{run}_seed{seed}"]
        + ["MCL_DET.DATASETS.VOC", datasets, "SOLVER.MAX_ITER", str(s.det_iters)]
        + ["SOLVER.STEPS", steps, "SOLVER.WARMUP_ITERS", str(max(1, min(30, s.det_iters // 5)))]
        + ["OUTPUT_DIR", str(out)]
        + s.extra_det
    )


def prepare_data(s: FashionSettings) -> tuple[Path, Path]:
    """ImageFolder subset for pretraining and the detection scenes (both resumable)."""
    from ..data.fashion_mnist import export_imagefolder
    from ..data.scenes import make_fashion_scenes

    fm = resolve_fashion_dir(s.fashion_dir)
    t0 = time.time()
    per_class = s.per_class or None
    print(f"\n=== data: ImageFolder ({s.per_class or 'all'} train / {s.val_per_class} val images per class) and scenes", flush=True)  # fmt: skip
    folder = export_imagefolder(s.out / "data" / "imagefolder", fm, per_class, s.val_per_class)
    scenes = make_fashion_scenes(
        s.out / "data" / "scenes",
        fm,
        s.num_train_scenes,
        s.num_test_scenes,
        seed=0,
        canvas_range=s.canvas_range,
    )
    print(f"--- data: {time.time() - t0:.0f} s", flush=True)
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


class _Stages:
    """Runs stage commands from one or several threads: numbered progress lines, per-stage wall
    times in ``OUT/timings.json``, and (``jobs`` > 1) each stage's output in ``OUT/logs/`` so that
    two concurrent stages do not interleave on the terminal."""

    def __init__(self, s: FashionSettings, n_stages: int) -> None:
        self.s, self.n, self.k = s, n_stages, 0
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.failed = threading.Event()
        self.timings_path = s.out / "timings.json"
        p = self.timings_path
        self.timings: dict[str, float] = json.loads(p.read_text()) if p.is_file() else {}
        self.env = None
        if s.jobs > 1:  # split the cores: 2 one-thread processes beat one two-thread process
            threads = max(1, (os.cpu_count() or 1) // s.jobs)
            self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def skip(self) -> None:
        with self.lock:
            self.k += 1

    def run(self, name: str, cmd: list[str]) -> None:
        if self.failed.is_set():
            raise _Cancelled
        with self.lock:
            self.k += 1
            step = f"[{self.k}/{self.n}] {name}"
        t0 = time.time()
        if self.s.jobs == 1:
            _run(step, cmd)
        else:
            log = self.s.out / "logs" / (name.replace(" ", "_") + ".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"=== {step} (log: {log})", flush=True)
            with open(log, "w") as f:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT
                )
                with self.lock:
                    self.procs.add(proc)
                rc = proc.wait()
                with self.lock:
                    self.procs.discard(proc)
            if self.failed.is_set():
                raise _Cancelled
            if rc != 0:
                tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
                print(f"--- {step} failed (exit {rc}); the end of {log}:\n{tail}", flush=True)
                raise MCLDetError(f"step '{name}' failed (exit {rc}); its output is in {log}")
            print(f"--- {step}: {time.time() - t0:.0f} s", flush=True)
        with self.lock:
            self.timings[name] = round(time.time() - t0, 1)
            atomic_write_json(self.timings_path, self.timings)

    def stop_all(self) -> None:
        """Another stage failed: stop the running ones (pretraining resumes from its checkpoint)."""
        self.failed.set()
        with self.lock:
            for proc in self.procs:
                proc.terminate()


class _Cancelled(Exception):
    pass


def _chain(s: FashionSettings, st: _Stages, run: str, seed: int, folder: Path) -> None:
    """pretrain -> convert member 0 -> detection for one (run, seed); each step skipped when done."""
    pre = s.out / "pretrain" / run / f"seed{seed}"
    ckpt = pre / "checkpoint_last.pth"
    w = s.out / "weights" / f"{run}_seed{seed}_member0.pkl"
    if (pre / "DONE").exists() and (w.exists() or ckpt.exists()):
        st.skip()
    else:
        st.run(f"pretrain {run} seed {seed}", _pretrain_cmd(s, run, seed, pre, folder))
        (pre / "DONE").touch()
    if w.exists():
        st.skip()
    else:
        st.run(f"convert {run} seed {seed}", _convert_cmd(ckpt, w))
    if not s.keep_checkpoints:
        ckpt.unlink(missing_ok=True)
    det = s.out / "detection" / run / f"seed{seed}"
    if (det / "results.json").exists():
        st.skip()
    else:
        st.run(f"detection {run} seed {seed}", _det_cmd(s, run, seed, w, det))
    if not s.keep_checkpoints:
        drop_detector_weights(det)


def run_fashion_experiment(s: FashionSettings) -> Path:
    """Run (or resume) every stage; returns the path of ``OUT/report.md``."""
    t_start = time.time()
    if s.jobs < 1:
        raise MCLDetError(f"--jobs must be at least 1 (got {s.jobs})")
    check_settings(s)
    folder, _ = prepare_data(s)
    chains = [(run, seed) for seed in s.seeds for run in RUNS]
    st = _Stages(s, len(chains) * 3)
    if s.jobs == 1:
        for run, seed in chains:
            _chain(s, st, run, seed, folder)
    else:
        # the self-supervised chains are the longest: start them first to balance the workers
        chains.sort(key=lambda c: not c[0].startswith("selfsup"))
        with ThreadPoolExecutor(max_workers=s.jobs) as pool:

            def chain(run: str, seed: int) -> None:
                try:
                    _chain(s, st, run, seed, folder)
                except BaseException:
                    st.stop_all()  # in this worker, before it can pick up the next chain
                    raise

            futures = [pool.submit(chain, run, seed) for run, seed in chains]
            try:  # a failing chain has already stopped the others (in its worker)
                errors = [f.exception() for f in as_completed(futures)]
            except BaseException:  # Ctrl-C here: stop the running stages too
                st.stop_all()
                raise
            errors = [e for e in errors if e is not None and not isinstance(e, _Cancelled)]
            if errors:
                raise errors[0]

    report = write_report(s)
    print(report.read_text())
    print(f"fashion experiment finished in {time.time() - t_start:.0f} s; report: {report}")
    return report


def write_report(s: FashionSettings) -> Path:
    """One ``tools/report.py`` table per mode (MCL vs its own baseline) -> ``OUT/report.md``."""
    parts = [
        "# Fashion-MNIST MCL experiment (issue 7)\n",
        f"Pretraining: 2 x ResNet-18 at 32 px on {s.per_class or 'all'} training images per class"
        f" ({s.pretrain_epochs} epochs, batch {s.pretrain_batch}); member metrics on "
        f"{s.val_per_class} t10k images per class. Detection: Faster R-CNN R18-FPN from member 0,"
        f" {s.det_iters} iterations on {s.num_train_scenes} scenes, tested on "
        f"{s.num_test_scenes}. Seeds: {', '.join(map(str, s.seeds))}.\n",
    ]
    terms = []
    for run, (cfg_file, mode) in RUNS.items():
        saved = s.out / "pretrain" / run / f"seed{s.seeds[0]}" / "config.yaml"
        text = saved.read_text() if saved.is_file() else (ROOT / cfg_file).read_text()
        terms.append(f"{run}: {active_terms(text, mode)}")
    parts.append("Active loss terms (weight): " + "; ".join(terms) + ".\n")
    for mode, prefix in MODES:
        md = s.out / f"report_{mode}.md"
        _run(
            f"report {mode}",
            [sys.executable, "tools/report.py"]
            + [str(s.out / "detection" / f"{prefix}_{t}") for t in ("mcl", "baseline")]
            + [str(s.out / "pretrain" / f"{prefix}_{t}") for t in ("mcl", "baseline")]
            + ["--baseline", f"{prefix}_baseline", "--output", str(md)],
        )
        parts.append(f"## {mode}: {prefix}_mcl vs {prefix}_baseline\n\n{md.read_text()}")
    report = s.out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report


__all__ = [
    "DET_CONFIG",
    "FashionSettings",
    "RUNS",
    "active_terms",
    "check_settings",
    "prepare_data",
    "resolve_fashion_dir",
    "run_fashion_experiment",
    "tiny_settings",
    "write_report",
]
