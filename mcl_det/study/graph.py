"""A study as a dependency graph of stages, each one run of a toolkit command.

data -> pretrain (per arm [and seed]) -> export (the member to detectron2) -> detect (per
protocol, arm and trial seed) -> report. Every stage is a command line of one of the toolkit's
own commands (``python -m mcl_det.cli.<command>``), so a study runs exactly what a user types,
here or on a cluster node. Its *fingerprint* covers what it computes (its command without the
resource flags, the content of its config files, its inputs' fingerprints): a finished stage whose
fingerprint changed is stale, and is rerun only when ``--force`` says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .spec import Study, config_chain_digest

KINDS = ("data", "pretrain", "export", "detect", "report")


@dataclass
class Stage:
    """One node: ``module`` run with ``args`` (+ the run-mode flag for pretrain / detect)."""

    id: str  # "pretrain.mcl", "detect.voc.mcl.seed0": also its file names
    kind: str  # one of KINDS
    module: str  # python -m <module>
    args: list[str]
    deps: list[str] = field(default_factory=list)
    out: Path | None = None  # the stage's own folder / file
    arm: str = ""
    protocol: str = ""
    seed: int | None = None
    gpus: int = 0  # per node (0: CPU)
    nodes: int = 1
    time_min: int = 60
    inputs: list[str] = field(default_factory=list)  # config files that shape its result
    fingerprint: str = ""

    @property
    def resumable(self) -> bool:
        """Pretraining and detection take --auto-resume / --overwrite; the rest just rerun."""
        return self.kind in ("pretrain", "detect")

    def command(self, mode: str = "auto", local_gpus: bool = True) -> list[str]:
        """The command line. ``mode``: ``auto`` (continue this stage's own run if one is there)
        or ``overwrite`` (replace a stale one: --force). ``local_gpus``: add ``--num-gpus``
        (on SLURM the job adds the distributed flags itself)."""
        cmd = [sys.executable, "-m", self.module]
        if self.resumable:
            cmd.append("--overwrite" if mode == "overwrite" else "--auto-resume")
            if local_gpus and self.gpus > 1:
                cmd += ["--num-gpus", str(self.gpus)]
        return cmd + self.args


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _abs(path: str) -> str:
    return os.path.abspath(path)


def build_graph(study: Study) -> list[Stage]:
    """Every stage of ``study`` in an order where each comes after its dependencies."""
    c, out = study.cfg, study.out
    stages: list[Stage] = []
    data_ids = []
    for i, args in enumerate(study.data_args()):
        s = Stage(f"data.{i}", "data", "mcl_det.cli.make_toy_data", args)
        stages.append(s)
        data_ids.append(s.id)
    seeds = [int(x) for x in c.SEEDS]
    weights: dict[tuple[str, int | None], str] = {}  # (arm, pretraining seed) -> .pkl
    weight_stage: dict[tuple[str, int | None], str | None] = {}
    for name, a in c.ARMS.items():
        if a.WEIGHTS:
            weights[(name, None)], weight_stage[(name, None)] = _abs(a.WEIGHTS), None
            continue
        for seed in seeds or [None]:
            tag = "" if seed is None else f".seed{seed}"
            file_tag = "" if seed is None else f"_seed{seed}"
            deps, ckpt = list(data_ids), _abs(a.CHECKPOINT) if a.CHECKPOINT else ""
            if a.PRETRAIN:
                pre = out / "pretrain" / name / (f"seed{seed}" if seed is not None else "")
                pre = Path(os.path.normpath(pre))
                args = ["--config-file", _abs(a.PRETRAIN)]
                args += ["--cohort", str(a.COHORT)] if a.COHORT else []
                args += study.opts(a.OPTS)
                args += ["SEED", str(seed)] if seed is not None else []
                args += ["OUTPUT_DIR", str(pre)]
                p = Stage(
                    f"pretrain.{name}{tag}",
                    "pretrain",
                    "mcl_det.cli.pretrain",
                    args,
                    deps,
                    pre,
                    arm=name,
                    seed=seed,
                    gpus=a.GPUS_PER_NODE,
                    nodes=a.NODES,
                    time_min=a.TIME_MIN,
                    inputs=[a.PRETRAIN],
                )
                stages.append(p)
                deps, ckpt = [p.id], str(pre / "checkpoint_last.pth")
            pkl = out / "weights" / f"{name}{file_tag}.pkl"
            e = Stage(
                f"export.{name}{tag}",
                "export",
                "mcl_det.cli.convert_to_d2",
                [ckpt, str(pkl), "--member", "best" if a.BEST_MEMBER else str(a.MEMBER)],
                deps,
                pkl,
                arm=name,
                seed=seed,
                time_min=30,
            )
            stages.append(e)
            weights[(name, seed)], weight_stage[(name, seed)] = str(pkl), e.id
    det_ids = []
    for pname, p in c.PROTOCOLS.items():
        for name in c.ARMS:
            for seed in study.trial_seeds(pname):
                key = (name, seed if (name, seed) in weights else None)
                run = out / "detect" / pname / name / f"seed{seed}"
                args = ["--config-file", _abs(p.CONFIG), *study.opts(p.OPTS)]
                args += ["MODEL.WEIGHTS", weights[key], "MCL_DET.WEIGHTS_TAG", name]
                args += ["MCL_DET.RUN_NAME", f"{pname}_{name}_seed{seed}"]
                args += ["SEED", str(seed), "OUTPUT_DIR", str(run)]
                dep = weight_stage[key]
                d = Stage(
                    f"detect.{pname}.{name}.seed{seed}",
                    "detect",
                    "mcl_det.cli.train_net",
                    args,
                    [dep] if dep else list(data_ids),
                    run,
                    arm=name,
                    protocol=pname,
                    seed=seed,
                    gpus=p.GPUS,
                    time_min=p.TIME_MIN,
                    inputs=[p.CONFIG],
                )
                stages.append(d)
                det_ids.append(d.id)
    stages.append(
        Stage(
            "report",
            "report",
            "mcl_det.cli.study",
            ["report", str(out)],
            det_ids,
            out / "report.md",
            time_min=30,
        )
    )
    _fingerprint(stages, study)
    return stages


def _fingerprint(stages: list[Stage], study: Study) -> None:
    """What each stage computes, its inputs' fingerprints included (changes cascade)."""
    by_id = {s.id: s for s in stages}
    extra = {"env": study.cfg.DETECTRON2_DATASETS}
    for s in stages:  # in dependency order
        if s.kind == "report":  # a report has no result of its own to protect: always rewritten
            s.fingerprint = _digest(
                [study.cfg.REPORT, study.cfg.REFERENCE, study.cfg.BASELINE, study.comparisons()]
            )
            continue
        s.fingerprint = _digest(
            {
                "command": [s.module, *s.args],
                "configs": [config_chain_digest(f) for f in s.inputs],
                "deps": [by_id[d].fingerprint for d in s.deps],
                **(extra if s.kind == "detect" else {}),
            }
        )


def dependents(stages: list[Stage], ids: set[str]) -> set[str]:
    """``ids`` and every stage that (transitively) depends on one of them."""
    found = set(ids)
    for s in stages:  # dependency order: one pass suffices
        if any(d in found for d in s.deps):
            found.add(s.id)
    return found
