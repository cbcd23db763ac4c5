"""The toolkit's stages as the commands a user types, shared by the demo and the experiments.

A stage runs one of the checkout's entry points in a subprocess from the checkout root:
``pretrain/main.py``, ``tools/convert_to_d2.py``, ``tools/train_net.py``, ``tools/report.py``. So a
launcher exercises exactly what a user types, and needs the checkout; that is why this module lives
in tools/ and not in the (pip-installable) library, which never runs the repository's scripts.

Every stage prints the same lines (``=== name``, the command, ``--- name: N s``) and is skipped
when its output exists, so an interrupted launcher resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's mcl_det, as for every script in tools/
    sys.path.insert(0, str(ROOT))

from mcl_det.utils.errors import MCLDetError  # noqa: E402
from mcl_det.utils.io import atomic_write_json  # noqa: E402

# --------------------------------------------------------------------------- the commands


def pretrain_cmd(
    config: str, out: Path, data: Path, opts: Sequence[str] = (), cohort: int | None = None
) -> list[str]:
    """Cohort pretraining; resumes from ``out/checkpoint_last.pth`` when an earlier run left one
    (else ``--auto-resume``: a folder left by an attempt without a checkpoint is not refused)."""
    resume = "--resume" if (out / "checkpoint_last.pth").exists() else "--auto-resume"
    return (
        [sys.executable, "pretrain/main.py"]
        + (["--cohort", str(cohort)] if cohort else [])
        + ["--config-file", config, resume]
        + ["DATA.ROOT", str(data), "OUTPUT_DIR", str(out), *opts]
    )


def convert_cmd(checkpoint: Path, weights: Path, member: int = 0) -> list[str]:
    """Export one member of a cohort checkpoint to detectron2 weights."""
    script = [sys.executable, "tools/convert_to_d2.py"]
    return [*script, str(checkpoint), str(weights), "--member", str(member)]


def detect_cmd(
    config: str, weights: Path, tag: str, seed: int, out: Path, opts: Sequence[str] = ()
) -> list[str]:
    """Detection fine-tuning + evaluation from ``weights``, grouped in reports by ``tag``."""
    return (
        [sys.executable, "tools/train_net.py", "--auto-resume", "--config-file", config]
        + ["MODEL.WEIGHTS", str(weights), "MCL_DET.WEIGHTS_TAG", tag, "SEED", str(seed)]
        + ["OUTPUT_DIR", str(out), *opts]
    )


def report_cmd(runs: Sequence[Path], baseline: str, output: Path) -> list[str]:
    """The AP / member-metric tables of ``runs`` (folders searched for results), vs ``baseline``."""
    return [sys.executable, "tools/report.py", *map(str, runs)] + [
        "--baseline",
        baseline,
        "--output",
        str(output),
    ]


def drop_detector_weights(out: Path) -> None:
    """Delete a finished fine-tuning run's model_final.pth and the last_checkpoint file that points
    at it; its results.json, metrics and logs stay (all a report reads)."""
    for name in ("model_final.pth", "last_checkpoint"):
        (out / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- running them


class Cancelled(Exception):
    """A stage did not run (or was stopped) because another stage failed."""


class Stages:
    """Runs stages one after another or, with :meth:`run_chains`, several chains side by side.

    ``total``: number the stages ``[k/total]``. ``env``: variables added to every stage's
    environment. ``log_dir``: each stage's output goes to ``log_dir/<name>.log`` instead of the
    terminal (concurrent stages would interleave there). ``timings``: a JSON file collecting each
    stage's wall time.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        timings: Path | None = None,
    ) -> None:
        self.total, self.log_dir, self.timings = total, log_dir, timings
        self.env = dict(os.environ, **env) if env else None
        self._k = 0
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._stopped = False
        self._times: dict[str, float] = {}
        if timings is not None and timings.is_file():
            self._times = json.loads(timings.read_text())

    # ---- one stage

    def _start(self, name: str, done: Path | Sequence[Path] | None) -> str | None:
        """The stage's label, or None when every one of its outputs exists (skipped)."""
        outputs = [done] if isinstance(done, Path) else list(done or ())
        with self._lock:
            if self._stopped:
                raise Cancelled(name)
            self._k += 1
            label = f"[{self._k}/{self.total}] {name}" if self.total else name
        if outputs and all(p.exists() for p in outputs):
            return None
        return label

    def _finish(self, name: str, label: str, t0: float) -> None:
        seconds = time.time() - t0
        print(f"--- {label}: {seconds:.0f} s", flush=True)
        if self.timings is not None:
            with self._lock:
                self._times[name] = round(seconds, 1)
                atomic_write_json(self.timings, self._times)

    def run(self, name: str, cmd: list[str], done: Path | Sequence[Path] | None = None) -> bool:
        """Run ``cmd`` from the checkout root as stage ``name`` unless every ``done`` path exists.
        Returns whether it ran; a failing command raises MCLDetError naming the stage."""
        label = self._start(name, done)
        if label is None:
            return False
        log = self.log_dir / (name.replace(" ", "_") + ".log") if self.log_dir else None
        where = f" (log: {log})" if log else ""
        print(f"\n=== {label}{where}\n$ {' '.join(cmd)}", flush=True)
        t0 = time.time()
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") if log else nullcontext() as f:
            if f is not None:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
            with self._lock:
                if self._stopped:
                    raise Cancelled(name)
                stderr = subprocess.STDOUT if f is not None else None
                proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=stderr)
                self._procs.add(proc)
            rc = proc.wait()
            with self._lock:
                self._procs.discard(proc)
        if rc != 0:
            if self._stopped:
                raise Cancelled(name)
            if log is None:
                raise MCLDetError(f"stage '{name}' failed (exit {rc}); see its output above")
            tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
            print(f"--- {label} failed (exit {rc}); the end of {log}:\n{tail}", flush=True)
            raise MCLDetError(f"stage '{name}' failed (exit {rc}); its output is in {log}")
        self._finish(name, label, t0)
        return True

    def call(self, name: str, fn: Callable[[], object]) -> None:
        """An in-process step (data preparation), printed and timed as a stage."""
        label = self._start(name, None)
        print(f"\n=== {label}", flush=True)
        t0 = time.time()
        fn()
        self._finish(name, label, t0)

    # ---- the four stages

    def pretrain(
        self,
        name: str,
        config: str,
        out: Path,
        data: Path,
        opts: Sequence[str] = (),
        cohort: int | None = None,
    ) -> Path:
        """Pretrain into ``out``; returns its last checkpoint. Done when ``out/DONE`` exists: the
        checkpoint alone is also there after an interruption."""
        done = out / "DONE"
        if self.run(name, pretrain_cmd(config, out, data, opts, cohort), done):
            done.touch()
        return out / "checkpoint_last.pth"

    def convert(self, name: str, checkpoint: Path, weights: Path) -> Path:
        """Member 0 of ``checkpoint`` -> ``weights`` (and its settings YAML beside it)."""
        self.run(name, convert_cmd(checkpoint, weights), weights)
        return weights

    def detect(
        self,
        name: str,
        config: str,
        weights: Path,
        tag: str,
        seed: int,
        out: Path,
        opts: Sequence[str] = (),
        keep_weights: bool = False,
    ) -> Path:
        """Fine-tune and evaluate into ``out``; returns its results.json. Unless ``keep_weights``,
        the detector's model_final.pth goes once results.json exists (a report never reads it)."""
        results = out / "results.json"
        self.run(name, detect_cmd(config, weights, tag, seed, out, opts), results)
        if not keep_weights:
            drop_detector_weights(out)
        return results

    def report(self, name: str, runs: Sequence[Path], baseline: str, output: Path) -> Path:
        """Always runs (it is quick, and a resumed launcher may have new runs to show)."""
        self.run(name, report_cmd(runs, baseline, output))
        return output

    # ---- several chains at once

    def stop(self) -> None:
        """Stop the running stages and let no further stage start (pretraining resumes later from
        its last checkpoint)."""
        with self._lock:
            self._stopped = True
            for proc in self._procs:
                proc.terminate()

    def run_chains(self, chains: Sequence[Callable[[], None]], jobs: int) -> None:
        """Run independent chains of stages, ``jobs`` at a time. The first failure stops the
        running stages and every chain not yet started, and is raised."""

        def guarded(chain: Callable[[], None]) -> None:
            try:
                chain()
            except BaseException:
                self.stop()  # in this worker, before it could take up the next chain
                raise

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(guarded, chain) for chain in chains]
            try:
                errors = [e for f in as_completed(futures) if (e := f.exception()) is not None]
            except BaseException:  # Ctrl-C while waiting: stop the running stages too
                self.stop()
                pool.shutdown(cancel_futures=True)
                raise
        errors = [e for e in errors if not isinstance(e, Cancelled)]
        if errors:
            raise errors[0]
