"""The study spec: one YAML file that says what an MCL-vs-baseline transfer comparison runs.

A study has *arms* (a pretraining config + overrides and the member to export, or an existing
checkpoint / detectron2 weights file), detection *protocols* (a detectron2 config + overrides and
its trials) and a baseline arm. Every key is checked like every other config of the project: the
top level, each arm and each protocol are yacs nodes with fixed keys, so a misspelt key is an
error, and ``KEY VALUE`` overrides (``ARMS.mcl.MEMBER 1``, ``PROTOCOLS.voc.TRIALS 7``) work as for
the stages themselves. The resolved spec is saved as ``OUTPUT_DIR/study.yaml``.

Paths (configs, checkpoints, weights, the reference) are relative to the directory the command
runs in, as for every other command; ``{OUTPUT_DIR}`` in an option or a data argument stands for
the study's folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from yacs.config import CfgNode

from ..config import merge_cfg
from ..utils.errors import MCLDetError

# keys whose values only say where and how a stage runs, never what it computes: changing them
# never makes a finished stage stale
RESOURCE_KEYS = ("NODES", "GPUS_PER_NODE", "GPUS", "TIME_MIN", "IMAGES", "SLURM")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
PLACEHOLDER = "{OUTPUT_DIR}"


def arm_defaults() -> CfgNode:
    """One arm: where its detectron2 weights come from."""
    a = CfgNode()
    a.PRETRAIN = ""  # pretraining config (pretrain/configs/*.yaml); "" with CHECKPOINT / WEIGHTS
    a.COHORT = 0  # --cohort M (0: the config's)
    a.OPTS = []  # KEY VALUE overrides of the pretraining config
    a.MEMBER = 0  # the member exported to detectron2
    a.BEST_MEMBER = False  # export the member with the best recorded kNN / top-1 instead
    a.CHECKPOINT = ""  # an existing checkpoint (ours, MoCo's, torchvision's): no pretraining
    a.WEIGHTS = ""  # an existing detectron2 .pkl: neither pretraining nor export
    a.BASELINE = ""  # the arm this one is compared with ("" = the study's BASELINE)
    a.NODES = 1  # pretraining resources: machines (SLURM) ...
    a.GPUS_PER_NODE = 1  # ... and GPUs on each (locally: --num-gpus when > 1)
    a.TIME_MIN = 2880  # SLURM time limit of one pretraining slot (requeued after it)
    a.IMAGES = 0  # training images, for `plan` when DATA.ROOT is not on this machine
    return a


def protocol_defaults() -> CfgNode:
    """One detection protocol: a detectron2 config fine-tuned from every arm's weights."""
    p = CfgNode()
    p.CONFIG = ""  # detection_configs/*.yaml
    p.OPTS = []  # KEY VALUE overrides (MODEL.WEIGHTS, SEED, OUTPUT_DIR are the study's)
    p.TRIALS = 1  # seeds 0..TRIALS-1 (MoCo's VOC protocol: 5)
    p.SEEDS = []  # explicit seeds instead of TRIALS
    p.GPUS = 1  # GPUs per trial (one machine)
    p.TIME_MIN = 720
    return p


def study_defaults() -> CfgNode:
    c = CfgNode()
    c.NAME = ""
    c.OUTPUT_DIR = ""  # the study's folder (required)
    c.BASELINE = "baseline"  # the arm every other arm is compared with
    c.REFERENCE = ""  # published numbers shown beside ours (tools/references/*.yaml)
    # pretraining replicas: [] = one pretraining per arm; [0, 1, 2] = one per seed, and the
    # detection trial with seed k fine-tunes the weights of pretraining seed k (paired seeds)
    c.SEEDS = []
    c.DETECTRON2_DATASETS = ""  # for the detection stages ("" = the caller's environment)
    c.DATA = []  # data preparations: argument strings of tools/make_toy_data.py, in order
    c.THREADS = 0  # torch threads per stage when several run at once on a CPU (0: cores / jobs)
    c.ARMS = CfgNode(new_allowed=True)
    c.PROTOCOLS = CfgNode(new_allowed=True)
    c.REPORT = CfgNode()
    c.REPORT.EFFECT = 0.0  # > 0: the report says how many trials detect this effect (AP points)
    c.REPORT.PER_CLASS = False
    c.CLEANUP = CfgNode()
    c.CLEANUP.DETECTOR_WEIGHTS = True  # delete model_final.pth once results.json is written
    c.CLEANUP.PRETRAIN_CHECKPOINTS = False  # delete checkpoints once the member is exported
    c.SLURM = CfgNode()  # defaults for --cluster slurm (the command line's flags win)
    c.SLURM.PARTITION = ""
    c.SLURM.ACCOUNT = ""
    c.SLURM.CPUS_PER_GPU = 8
    c.SLURM.SBATCH = []  # extra sbatch options, KEY=VALUE
    c.SLURM.MAX_REQUEUES = 20
    c.SLURM.ARRAY_PARALLELISM = 64  # detection trials of one array running at once
    return c


@dataclass(frozen=True)
class Study:
    """A resolved, checked spec: the yacs node plus paths made absolute."""

    cfg: CfgNode
    path: Path  # the spec file
    out: Path  # OUTPUT_DIR, absolute

    @property
    def arms(self) -> dict[str, CfgNode]:
        return dict(self.cfg.ARMS)

    @property
    def protocols(self) -> dict[str, CfgNode]:
        return dict(self.cfg.PROTOCOLS)

    @property
    def baselines(self) -> set[str]:
        """The study's BASELINE and every arm another arm names as its BASELINE."""
        named = {a.BASELINE for a in self.cfg.ARMS.values() if a.BASELINE}
        return {self.cfg.BASELINE} | named

    def baseline_of(self, arm: str) -> str:
        """The arm ``arm`` is compared with (itself for a baseline)."""
        if arm in self.baselines:
            return arm
        return self.cfg.ARMS[arm].BASELINE or self.cfg.BASELINE

    def comparisons(self) -> dict[str, list[str]]:
        """baseline arm -> the arms compared with it (the baseline first): one report each."""
        groups: dict[str, list[str]] = {}
        for name in self.cfg.ARMS:
            b = self.baseline_of(name)
            groups.setdefault(b, [b])
            if name != b:
                groups[b].append(name)
        return groups

    def trial_seeds(self, protocol: str) -> list[int]:
        p = self.cfg.PROTOCOLS[protocol]
        if p.SEEDS:
            return [int(s) for s in p.SEEDS]
        if self.cfg.SEEDS and p.TRIALS == 1 and not p.SEEDS:
            return [int(s) for s in self.cfg.SEEDS]  # paired: one trial per pretraining seed
        return list(range(int(p.TRIALS)))

    def expand(self, text: str) -> str:
        return text.replace(PLACEHOLDER, str(self.out))

    def opts(self, values: Sequence) -> list[str]:
        """KEY VALUE overrides as strings, ``{OUTPUT_DIR}`` filled in."""
        return [self.expand(str(v)) for v in values]

    def data_args(self) -> list[list[str]]:
        return [shlex.split(self.expand(str(d))) for d in self.cfg.DATA]


def _as_node(value: object, template: CfgNode, what: str) -> CfgNode:
    """``value`` (a mapping from the YAML) checked against ``template``: unknown keys are an
    error, as in every config of the project."""
    if not isinstance(value, dict):
        raise MCLDetError(f"{what} must be a mapping of keys, got {type(value).__name__}")
    node = template.clone()
    try:
        node.merge_from_other_cfg(CfgNode(value))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        msg = " ".join(str(e.args[0] if e.args else e).split())
        raise MCLDetError(
            f"bad {what}: {msg} (check the key against the spec's defaults)"
        ) from None
    return node


def load_spec(path: str | os.PathLike, opts: Sequence[str] = ()) -> Study:
    """Read, check and resolve a study spec (+ ``KEY VALUE`` overrides). Raises ``MCLDetError``
    for a missing file, an unknown key, an unknown arm, a missing config or weights file."""
    p = Path(path)
    if not p.is_file():
        raise MCLDetError(f"study spec not found: {p} (check the path)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise MCLDetError(f"cannot parse study spec {p}: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise MCLDetError(f"study spec {p} must be a mapping of keys")
    arms, protocols = raw.pop("ARMS", None) or {}, raw.pop("PROTOCOLS", None) or {}
    cfg = study_defaults()
    top = CfgNode(raw)
    try:
        cfg.merge_from_other_cfg(top)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        msg = " ".join(str(e.args[0] if e.args else e).split())
        raise MCLDetError(f"bad study spec {p}: {msg} (unknown key or wrong type)") from None
    for group, items, template in (
        ("ARMS", arms, arm_defaults()),
        ("PROTOCOLS", protocols, protocol_defaults()),
    ):
        if not isinstance(items, dict):
            raise MCLDetError(f"{group} in {p} must map names to settings")
        for name, value in items.items():
            if not NAME_RE.match(str(name)):
                raise MCLDetError(
                    f"{group} name {name!r} in {p}: use letters, digits, '_' and '-' only"
                )
            cfg[group][str(name)] = _as_node(value or {}, template, f"{group}.{name} in {p}")
    merge_cfg(cfg, None, list(opts))
    study = Study(cfg, p.resolve(), Path(os.path.abspath(cfg.OUTPUT_DIR or ".")))
    check(study)
    cfg.freeze()
    return study


def _exists(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise MCLDetError(f"{what} not found: {path} (check the path in the study spec)")


def check(study: Study) -> None:
    """Cross-key rules a per-key type check cannot see."""
    c, where = study.cfg, study.path
    if not c.OUTPUT_DIR:
        raise MCLDetError(f"{where} sets no OUTPUT_DIR; add OUTPUT_DIR: output/<study name>")
    if not c.ARMS:
        raise MCLDetError(f"{where} defines no ARMS; add at least the baseline arm")
    if c.BASELINE not in c.ARMS:
        raise MCLDetError(
            f"BASELINE {c.BASELINE!r} is not an arm of {where} (arms: {', '.join(c.ARMS)})"
        )
    if c.REFERENCE:
        _exists(c.REFERENCE, "REFERENCE")
    if c.REPORT.EFFECT < 0:
        raise MCLDetError(f"REPORT.EFFECT must be >= 0 AP points, got {c.REPORT.EFFECT}")
    seeds = [int(s) for s in c.SEEDS]
    if len(set(seeds)) != len(seeds):
        raise MCLDetError(f"SEEDS {seeds} repeats a seed")
    for name, a in c.ARMS.items():
        sources = [k for k in ("PRETRAIN", "CHECKPOINT", "WEIGHTS") if a[k]]
        if len(sources) != 1:
            raise MCLDetError(
                f"arm {name}: give exactly one of PRETRAIN, CHECKPOINT, WEIGHTS "
                f"(got {', '.join(sources) or 'none'})"
            )
        _exists(a[sources[0]], f"arm {name}: {sources[0]}")
        if a.BASELINE and a.BASELINE not in c.ARMS:
            raise MCLDetError(f"arm {name}: BASELINE {a.BASELINE!r} is not an arm")
        if len(a.OPTS) % 2:
            raise MCLDetError(f"arm {name}: OPTS must be KEY VALUE pairs")
        if a.MEMBER < 0:
            raise MCLDetError(f"arm {name}: MEMBER must be >= 0 (or set BEST_MEMBER True)")
        if a.NODES < 1 or a.GPUS_PER_NODE < 0 or a.TIME_MIN < 1 or a.COHORT < 0:
            raise MCLDetError(f"arm {name}: NODES, TIME_MIN >= 1; GPUS_PER_NODE, COHORT >= 0")
        if seeds and not a.PRETRAIN:
            raise MCLDetError(f"arm {name}: SEEDS replicate pretraining, which this arm skips")
    if not c.PROTOCOLS:
        raise MCLDetError(f"{where} defines no PROTOCOLS; add at least one detection protocol")
    for name, p in c.PROTOCOLS.items():
        _exists(p.CONFIG, f"protocol {name}: CONFIG")
        if len(p.OPTS) % 2:
            raise MCLDetError(f"protocol {name}: OPTS must be KEY VALUE pairs")
        if p.TRIALS < 1 or p.GPUS < 0 or p.TIME_MIN < 1:
            raise MCLDetError(f"protocol {name}: TRIALS, TIME_MIN >= 1; GPUS >= 0")
        trial = study.trial_seeds(name)
        if len(set(trial)) != len(trial):
            raise MCLDetError(f"protocol {name}: SEEDS {trial} repeats a seed")
        missing = sorted(set(trial) - set(seeds)) if seeds else []
        if missing:
            raise MCLDetError(
                f"protocol {name}: trial seeds {missing} have no pretraining of that seed "
                f"(SEEDS {seeds}); the trial with seed k fine-tunes pretraining seed k"
            )


def config_chain_digest(path: str) -> str:
    """sha256 over a YAML config and every ``_BASE_`` it names (recursively): a finished stage is
    stale when any file its config is built from changed."""
    h = hashlib.sha256()
    seen: set[str] = set()
    todo = [os.path.abspath(path)]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        try:
            data = Path(f).read_bytes()
        except OSError:
            h.update(f"missing:{f}".encode())
            continue
        h.update(f.encode() + b"\0" + data)
        try:
            base = (yaml.safe_load(data) or {}).get("_BASE_")
        except (yaml.YAMLError, AttributeError):
            base = None
        bases = [base] if isinstance(base, str) else list(base or [])
        todo += [os.path.join(os.path.dirname(f), b) for b in bases if isinstance(b, str)]
    return h.hexdigest()
