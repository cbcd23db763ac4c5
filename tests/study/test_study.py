"""The study runner (tools/study.py): the spec's checks, the stage graph and its fingerprints,
what a rerun does, the GPU-hour estimate against hand arithmetic, and (slow) whole toy studies
through the real commands: the toy VOC study and the Fashion-MNIST study at tiny size."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from clitools import run_tool
from study_toy import DETECT_OPTS, PRETRAIN_OPTS, toy_spec

from mcl_det.data.fashion_mnist import write_idx
from mcl_det.study.estimate import estimate, load_figures, slurm_jobs
from mcl_det.study.graph import build_graph
from mcl_det.study.plan import describe_force, plan_run
from mcl_det.study.spec import load_spec
from mcl_det.study.state import DONE, FAILED, mark, read_record
from mcl_det.utils.errors import MCLDetError

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "tools" / "study.py"
SHIPPED = sorted((ROOT / "studies").glob("*.yaml"))


def _graph(spec: Path, *opts: str):
    study = load_spec(spec, list(opts))
    return study, {s.id: s for s in build_graph(study)}


def _kinds(stages) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in stages.values():
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


# ----------------------------------------------------------------------------- the spec


def test_every_shipped_study_loads_and_builds(monkeypatch):
    monkeypatch.chdir(ROOT)  # the specs' paths are relative to the checkout, as documented
    assert {p.stem for p in SHIPPED} >= {"demo", "fashion_mnist", "moco_r50x2_voc_coco"}
    for spec in SHIPPED:
        study, stages = _graph(spec)
        assert study.cfg.BASELINE in study.arms
        assert list(stages)[-1] == "report"
    _, demo = _graph(ROOT / "studies/demo.yaml")
    assert _kinds(demo) == {"data": 1, "pretrain": 2, "export": 2, "detect": 2, "report": 1}
    _, moco = _graph(ROOT / "studies/moco_r50x2_voc_coco.yaml")
    assert _kinds(moco) == {"pretrain": 2, "export": 2, "detect": 12, "report": 1}
    assert moco["pretrain.mcl"].nodes == 4 and moco["pretrain.mcl"].gpus == 8
    assert "--num-gpus" in moco["detect.voc.mcl.seed4"].command()  # 8 GPUs per trial
    study, fashion = _graph(ROOT / "studies/fashion_mnist.yaml")
    assert _kinds(fashion) == {"data": 2, "pretrain": 12, "export": 12, "detect": 12, "report": 1}
    assert study.comparisons() == {
        "sup_baseline": ["sup_baseline", "sup_mcl"],
        "selfsup_baseline": ["selfsup_baseline", "selfsup_mcl"],
    }


def _write(tmp_path: Path, spec: dict) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _base(tmp_path: Path) -> dict:
    return yaml.safe_load(toy_spec(tmp_path).read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(EPOCHS=3), "bad study spec .*EPOCHS"),
        (lambda s: s["ARMS"]["mcl"].update(MEMBR=1), r"bad ARMS.mcl .*MEMBR"),
        (lambda s: s["PROTOCOLS"]["voc"].update(TRAILS=5), r"bad PROTOCOLS.voc .*TRAILS"),
        (lambda s: s.update(BASELINE="nope"), "BASELINE 'nope' is not an arm"),
        (lambda s: s["ARMS"]["mcl"].update(BASELINE="nope"), "arm mcl: BASELINE 'nope'"),
        (lambda s: s["ARMS"]["mcl"].update(PRETRAIN="no/such.yaml"), "arm mcl: PRETRAIN not found"),
        (
            lambda s: s["PROTOCOLS"]["voc"].update(CONFIG="no/such.yaml"),
            "protocol voc: CONFIG not found",
        ),
        (lambda s: s["ARMS"]["mcl"].update(WEIGHTS=__file__), "exactly one of PRETRAIN"),
        (lambda s: s["ARMS"]["mcl"].update(OPTS=["SEED"]), "KEY VALUE pairs"),
        (lambda s: s["ARMS"]["mcl"].update(MEMBER=-1), "MEMBER must be >= 0"),
        (lambda s: s.update(SEEDS=[0, 0]), r"SEEDS \[0, 0\] repeats"),
        (lambda s: s.update(SEEDS=[0]), r"trial seeds \[1\] have no pretraining"),
        (lambda s: s.update(OUTPUT_DIR=""), "sets no OUTPUT_DIR"),
        (lambda s: s.update(PROTOCOLS={}), "defines no PROTOCOLS"),
        (lambda s: s["ARMS"].update({"a b": {}}), "use letters, digits"),
    ],
)
def test_spec_errors_name_the_problem(tmp_path, change, message):
    spec = _base(tmp_path)
    change(spec)
    with pytest.raises(MCLDetError, match=message):
        load_spec(_write(tmp_path, spec))


def test_spec_overrides_are_checked_like_the_file(tmp_path):
    spec = toy_spec(tmp_path)
    study = load_spec(spec, ["ARMS.mcl.MEMBER", "1", "PROTOCOLS.voc.TRIALS", "3"])
    assert study.cfg.ARMS.mcl.MEMBER == 1 and study.trial_seeds("voc") == [0, 1, 2]
    with pytest.raises(MCLDetError, match="ARMS.mcl.NOPE"):
        load_spec(spec, ["ARMS.mcl.NOPE", "1"])


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = run_tool(STUDY, "run", tmp_path / "missing.yaml")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: study spec not found: {tmp_path / 'missing.yaml'} (check the path)"
    ]
    spec = _base(tmp_path)
    spec["ARMS"]["mcl"]["MEMBR"] = 1
    r = run_tool(STUDY, "plan", _write(tmp_path, spec))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "MEMBR" in r.stderr and "Traceback" not in r.stderr
    r = run_tool(STUDY, "rnu", tmp_path / "s.yaml")
    assert r.returncode == 2 and "unknown study command 'rnu'" in r.stderr


# ----------------------------------------------------------------------------- the graph


def test_graph_stages_commands_and_dependencies(tmp_path):
    study, g = _graph(toy_spec(tmp_path))
    out = study.out
    assert list(g) == [
        "data.0", "data.1",
        "pretrain.mcl", "export.mcl", "pretrain.baseline", "export.baseline",
        "detect.voc.mcl.seed0", "detect.voc.mcl.seed1",
        "detect.voc.baseline.seed0", "detect.voc.baseline.seed1",
        "report",
    ]  # fmt: skip
    assert g["pretrain.mcl"].deps == ["data.0", "data.1"]
    assert g["export.mcl"].deps == ["pretrain.mcl"]
    assert g["detect.voc.mcl.seed1"].deps == ["export.mcl"]
    assert set(g["report"].deps) == {s for s in g if s.startswith("detect.")}
    pre = g["pretrain.mcl"].command()
    assert pre[:3] == [sys.executable, "-m", "mcl_det.cli.pretrain"] and "--auto-resume" in pre
    assert pre[pre.index("OUTPUT_DIR") + 1] == str(out / "pretrain" / "mcl")
    assert "--overwrite" in g["pretrain.mcl"].command("overwrite")
    exp = g["export.mcl"].command()
    assert exp[-4:] == [
        str(out / "pretrain/mcl/checkpoint_last.pth"), str(out / "weights/mcl.pkl"),
        "--member", "0",
    ]  # fmt: skip
    det = g["detect.voc.baseline.seed1"].command()
    assert det[det.index("MODEL.WEIGHTS") + 1] == str(out / "weights/baseline.pkl")
    assert det[det.index("SEED") + 1] == "1" and det[det.index("MCL_DET.WEIGHTS_TAG") + 1] == (
        "baseline"
    )
    assert det[det.index("OUTPUT_DIR") + 1] == str(out / "detect/voc/baseline/seed1")
    assert slurm_jobs(list(g.values())) == (9, 2)  # 7 single jobs + one array per arm


def test_paired_seeds_fine_tune_their_own_pretraining(monkeypatch):
    monkeypatch.chdir(ROOT)
    study, g = _graph(ROOT / "studies/fashion_mnist.yaml")
    for seed in (0, 1, 2):
        det = g[f"detect.scenes.sup_mcl.seed{seed}"]
        assert det.deps == [f"export.sup_mcl.seed{seed}"]
        args = det.command()
        assert args[args.index("MODEL.WEIGHTS") + 1] == str(
            study.out / "weights" / f"sup_mcl_seed{seed}.pkl"
        )
        pre = g[f"pretrain.sup_mcl.seed{seed}"].command()
        assert pre[pre.index("SEED") + 1] == str(seed)
        assert pre[pre.index("OUTPUT_DIR") + 1] == str(study.out / f"pretrain/sup_mcl/seed{seed}")
    # {OUTPUT_DIR} is the study's folder, in the data arguments and the options alike
    assert g["data.0"].args[:2] == ["--root", str(study.out / "data")]
    voc = g["detect.scenes.sup_mcl.seed0"].args
    assert str(study.out / "data/scenes/voc") in voc[voc.index("MCL_DET.DATASETS.VOC") + 1]


def test_weights_and_checkpoint_arms_skip_their_stages(tmp_path):
    spec = _base(tmp_path)
    spec["ARMS"]["mcl"] = {"WEIGHTS": __file__}
    spec["ARMS"]["baseline"] = {"CHECKPOINT": __file__, "MEMBER": 1}
    _, g = _graph(_write(tmp_path, spec))
    assert "pretrain.mcl" not in g and "export.mcl" not in g and "pretrain.baseline" not in g
    assert g["export.baseline"].args[-2:] == ["--member", "1"]
    det = g["detect.voc.mcl.seed0"].args
    assert det[det.index("MODEL.WEIGHTS") + 1] == __file__
    assert g["detect.voc.mcl.seed0"].deps == ["data.0", "data.1"]


def _fingerprints(spec: Path, *opts: str) -> dict[str, str]:
    return {sid: s.fingerprint for sid, s in _graph(spec, *opts)[1].items()}


def test_fingerprints_change_with_what_a_stage_computes_only(tmp_path):
    spec = toy_spec(tmp_path)
    base = _fingerprints(spec)
    assert len(set(base.values())) == len(base)  # every stage its own

    def changed(*opts: str) -> set[str]:
        new = _fingerprints(spec, *opts)
        return {sid for sid in base if new[sid] != base[sid] and sid != "report"}

    # the exported member: that export and the trials fine-tuned from it, nothing else
    assert changed("ARMS.mcl.MEMBER", "1") == {
        "export.mcl", "detect.voc.mcl.seed0", "detect.voc.mcl.seed1",
    }  # fmt: skip
    # where and how a stage runs never makes it stale
    resources = ["SLURM.PARTITION", "gpu", "SLURM.CPUS_PER_GPU", "2", "PROTOCOLS.voc.GPUS", "2"]
    resources += ["ARMS.mcl.TIME_MIN", "10", "ARMS.mcl.NODES", "2", "THREADS", "2"]
    assert changed(*resources) == set()
    # a detection override: only the detection trials
    assert changed("PROTOCOLS.voc.OPTS", str(DETECT_OPTS + ["SOLVER.BASE_LR", 0.1])) == {
        s for s in base if s.startswith("detect.")
    }
    # a pretraining override cascades through the export to the trials
    assert changed("ARMS.baseline.OPTS", str(PRETRAIN_OPTS + ["SEED", 3])) >= {
        "pretrain.baseline", "export.baseline", "detect.voc.baseline.seed1",
    }  # fmt: skip


def test_editing_a_config_or_its_base_makes_its_stages_stale(tmp_path):
    base_cfg = tmp_path / "Base.yaml"
    base_cfg.write_text((ROOT / "pretrain/configs/toy.yaml").read_text())
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "Base.yaml"\n')
    spec = _base(tmp_path)
    spec["ARMS"]["mcl"]["PRETRAIN"] = str(child)
    path = _write(tmp_path, spec)
    before = _fingerprints(path)
    with base_cfg.open("a") as f:
        f.write("# an edit of the base\n")
    after = _fingerprints(path)
    stale = {sid for sid in before if before[sid] != after[sid]}
    assert stale >= {"pretrain.mcl", "export.mcl", "detect.voc.mcl.seed0"}
    assert not any("baseline" in sid for sid in stale)


# ----------------------------------------------------------------------------- a rerun


def _finish(study, stages, ids) -> None:
    by_id = {s.id: s for s in stages}
    for sid in ids:
        mark(study.out, sid, DONE, by_id[sid].fingerprint, exit=0)


def test_rerun_keeps_finished_stages_and_reruns_failed_ones(tmp_path):
    study = load_spec(toy_spec(tmp_path))
    stages = build_graph(study)
    ids = [s.id for s in stages]
    assert [s.id for s in plan_run(study, stages).todo] == ids  # a fresh study runs everything
    _finish(study, stages, ids[:-1])
    failed = "detect.voc.mcl.seed1"
    mark(study.out, failed, FAILED, stages[ids.index(failed)].fingerprint, exit=1)
    p = plan_run(study, stages)
    assert [s.id for s in p.todo] == [failed, "report"]  # the report follows new results
    assert p.overwrite == set() and describe_force(p) is None
    _finish(study, stages, [failed, "report"])
    assert plan_run(study, stages).todo == []  # all done: nothing runs


def test_a_changed_spec_is_refused_unless_forced(tmp_path):
    spec = toy_spec(tmp_path)
    study = load_spec(spec)
    stages = build_graph(study)
    _finish(study, stages, [s.id for s in stages])
    study2 = load_spec(spec, ["ARMS.mcl.MEMBER", "1"])
    stages2 = build_graph(study2)
    with pytest.raises(MCLDetError, match="export.mcl.*--force"):
        plan_run(study2, stages2)
    p = plan_run(study2, stages2, force=True)
    rerun = {"export.mcl", "detect.voc.mcl.seed0", "detect.voc.mcl.seed1"}
    assert {s.id for s in p.todo} == rerun | {"report"}
    assert p.overwrite == rerun
    assert describe_force(p) == f"--force: replacing 3 stale stage(s): {', '.join(sorted(rerun))}"


# ----------------------------------------------------------------------------- the estimate


def test_gpu_hours_match_hand_arithmetic(monkeypatch):
    monkeypatch.chdir(ROOT)
    study, g = _graph(ROOT / "studies/moco_r50x2_voc_coco.yaml")
    figures = load_figures()
    # 200 epochs of ImageNet-1k (1281167 images) at 256 per step, 1396 img/s per GPU (H200)
    pre = estimate(study, g["pretrain.mcl"], figures)
    assert pre.gpu_hours == pytest.approx(200 * (1281167 // 256) * 256 / 1396 / 3600)
    # VOC R50-C4: 24k iterations at 16 images = 8 GPU-equivalents of 2 images at 0.1252 s/it
    voc = estimate(study, g["detect.voc.baseline.seed3"], figures)
    assert voc.gpu_hours == pytest.approx(24000 * 0.1252 * 8 / 3600)
    # COCO Mask R-CNN R50-FPN 1x: detectron2's V100 figure, 0.261 s/it
    coco = estimate(study, g["detect.coco.mcl.seed0"], figures)
    assert coco.gpu_hours == pytest.approx(90000 * 0.261 * 8 / 3600)
    assert estimate(study, g["export.mcl"], figures).gpu_hours == 0.0


def test_plan_prints_the_total_and_names_missing_figures(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    r = run_tool(STUDY, "plan", "studies/moco_r50x2_voc_coco.yaml")
    assert r.returncode == 0, r.stderr
    total = 2 * 200 * 5004 * 256 / 1396 / 3600 + 10 * 24000 * 0.1252 * 8 / 3600
    total += 2 * 90000 * 0.261 * 8 / 3600
    assert f"GPU-hours: {math.ceil(total)}" in r.stdout  # 274: rounded up, a request's size
    assert "17 stages; on SLURM 9 jobs (4 arrays of detection trials)" in r.stdout
    # a model nobody measured: a '?' and the reason, not a made-up number
    spec = _base(tmp_path)
    spec["ARMS"]["mcl"]["OPTS"] += ["MODEL.ARCH", "resnet34"]
    spec["ARMS"]["mcl"]["IMAGES"] = 1000  # its data are not made yet
    r = run_tool(STUDY, "plan", _write(tmp_path, spec))
    assert r.returncode == 0, r.stderr
    assert "no estimate: pretrain.mcl: no measured throughput for selfsup resnet34" in r.stdout
    assert "+ unknown (below)" in r.stdout
    assert "no estimate: pretrain.baseline: images unknown" in r.stdout  # and no IMAGES given


# ----------------------------------------------------------------------------- whole studies


def _study(*args, timeout: float = 900):
    r = run_tool(STUDY, *args, timeout=timeout, OMP_NUM_THREADS="1")
    return r, r.stdout + r.stderr


def _ran(text: str) -> list[str]:
    """The stages a ``run`` started, from its ``=== [k/n] <stage> (log: ...)`` lines."""
    return [line.split()[2] for line in text.splitlines() if line.startswith("=== [")]


@pytest.mark.slow
def test_toy_study_end_to_end_rerun_failure_and_force(tmp_path):
    import torch

    spec = toy_spec(tmp_path)
    out = tmp_path / "study"
    # one trial's output folder is a file: that stage fails, the others go on (--keep-going)
    blocker = out / "detect" / "voc" / "mcl" / "seed1"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    r, text = _study("run", spec, "--jobs", "2", "--keep-going")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "detect.voc.mcl.seed1 failed" in text and "report: not run" in text
    assert read_record(out, "detect.voc.mcl.seed1").state == FAILED
    assert read_record(out, "detect.voc.baseline.seed1").state == DONE

    blocker.unlink()
    r, text = _study("run", spec)
    assert r.returncode == 0, text[-3000:]
    assert _ran(text) == ["detect.voc.mcl.seed1", "report"]  # only the failed one (+ report)

    # stage 1: one checkpoint per cohort holding both members; the baseline has the MCL
    # interaction terms off
    for arm in ("mcl", "baseline"):
        ckpt = torch.load(out / "pretrain" / arm / "checkpoint_last.pth", weights_only=True)
        assert ckpt["format"] == "mcl_det.pretrain/v1" and len(ckpt["archs"]) == 2
        assert any(k.startswith("members.1.encoder.") for k in ckpt["model"])
    base_cfg = (out / "pretrain" / "baseline" / "config.yaml").read_text()
    assert "W_ICL: 0.0" in base_cfg and "W_SOFT_VCL: 0.0" in base_cfg
    # stage 2: detectron2 weights + the settings they need
    for arm in ("mcl", "baseline"):
        assert "RGB" in (out / "weights" / f"{arm}.yaml").read_text()
    # stage 3: a results.json per trial, fine-tuned from that arm's weights; the detector's
    # final weights are deleted once it is written (CLEANUP.DETECTOR_WEIGHTS)
    for arm in ("mcl", "baseline"):
        for seed in (0, 1):
            run = out / "detect" / "voc" / arm / f"seed{seed}"
            res = json.loads((run / "results.json").read_text())
            assert res["finished"] and res["task"] == "voc" and res["weights_tag"] == arm
            assert res["seed"] == seed and res["iteration"] == 2
            assert res["weights"] == str(out / "weights" / f"{arm}.pkl")
            assert set(res["metrics"]["bbox"]) >= {"AP", "AP50", "AP75"}
            assert not (run / "model_final.pth").exists()
    # stage 4: the table compares MCL with the baseline and says what each arm trained with
    report = (out / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")]
    assert {"baseline", "mcl"} <= set(rows) and "Δ AP50" in report and "MDE80" in report
    assert "Pretraining loss terms: baseline: VCL 1; mcl: VCL 1, ICL 1, Soft VCL 1, " in report
    assert json.loads((out / "report.json").read_text())[0]["baseline"] == "baseline"

    # status: one row per stage, all done
    r, text = _study("status", out)
    assert r.returncode == 0 and "11 stages: 11 done" in text
    # a rerun of a finished study runs nothing and changes no result
    results = {p: p.read_bytes() for p in out.glob("detect/**/results.json")}
    records = {p.name: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    r, text = _study("run", spec)
    assert r.returncode == 0 and _ran(text) == []
    assert {p: p.read_bytes() for p in out.glob("detect/**/results.json")} == results
    new = {p.name: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    assert {k: v for k, v in new.items() if k != "report.json"} == {
        k: v for k, v in records.items() if k != "report.json"
    }

    # another member exported: refused (one line naming the stages and the change) ...
    r, text = _study("run", spec, "ARMS.mcl.MEMBER", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "export.mcl" in r.stderr and "ARMS.mcl.MEMBER: 0 -> 1" in r.stderr
    assert "--force" in r.stderr and "Traceback" not in r.stderr
    # ... unless --force, which says what it replaces and reruns exactly that
    r, text = _study("run", spec, "ARMS.mcl.MEMBER", "1", "--force")
    assert r.returncode == 0, text[-3000:]
    assert "--force: replacing 3 stale stage(s)" in text
    assert sorted(_ran(text)) == sorted(
        ["export.mcl", "detect.voc.mcl.seed0", "detect.voc.mcl.seed1", "report"]
    )
    assert results[out / "detect/voc/baseline/seed0/results.json"] == (
        (out / "detect/voc/baseline/seed0/results.json").read_bytes()
    )  # the baseline's trials are untouched
    assert "# MCL_DET: member: 1 (" in (out / "weights" / "mcl.yaml").read_text()


def _synthetic_fashion(d: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """idx files like Debian's: bright class-sized rectangles on black, labels 0..9 cycling."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            hw = 6 + int(c)
            y0, x0 = rng.integers(0, 28 - hw, size=2)
            images[i, y0 : y0 + hw, x0 : x0 + hw] = rng.integers(120, 256)
        write_idx(d / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels)
    return d


def _tiny_fashion_spec(tmp_path: Path, fm: Path) -> Path:
    """The shipped Fashion-MNIST study at minimal size (one seed, 2 images per class, 2-3
    iterations per stage): its structure runs for real; its numbers mean nothing."""
    spec = yaml.safe_load((ROOT / "studies/fashion_mnist.yaml").read_text())
    spec["OUTPUT_DIR"] = str(tmp_path / "fashion")
    spec["SEEDS"] = [0]
    spec["THREADS"] = 1
    spec["DATA"] = [
        f"{spec['DATA'][0]} --fashion-dir {fm} --limit-per-class 2 --val-limit-per-class 1",
        "--root {OUTPUT_DIR}/data --what fashion-scenes --num-train 4 --num-test 2 "
        f"--fashion-dir {fm}",
    ]
    tiny = "SOLVER.IMS_PER_BATCH 8 MODEL.QUEUE_SIZE 32 SUP.BANK_NEGATIVES 8 MONITOR.KNN_K 3 "
    tiny += "MONITOR.LOG_PERIOD 1 MONITOR.PROGRESS False"
    for arm in spec["ARMS"].values():
        arm["PRETRAIN"] = str(ROOT / arm["PRETRAIN"])
        arm["OPTS"] = arm["OPTS"] + tiny.split()
    p = spec["PROTOCOLS"]["scenes"]
    p["CONFIG"] = str(ROOT / p["CONFIG"])
    p["OPTS"] = p["OPTS"][:2] + [
        "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", 1,
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.MIN_SIZE_TEST", 96,
        "INPUT.MAX_SIZE_TEST", 128, "SOLVER.IMS_PER_BATCH", 2,
    ]  # fmt: skip
    path = tmp_path / "fashion.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_fashion_study_end_to_end_at_tiny_size(tmp_path):
    spec = _tiny_fashion_spec(tmp_path, _synthetic_fashion(tmp_path / "fm"))
    out = tmp_path / "fashion"
    r, text = _study("run", spec, "--jobs", "2")
    assert r.returncode == 0, text[-3000:]
    records = [json.loads(p.read_text()) for p in (out / "stages").glob("*.json")]
    assert len(records) == 15  # 2 data, 4 pretrain, 4 export, 4 detect, 1 report
    assert all(r["state"] == DONE and r["attempt"] == 1 for r in records)
    report = (out / "report.md").read_text()
    assert "## sup_mcl vs sup_baseline" in report
    assert "## selfsup_mcl vs selfsup_baseline" in report
    assert "sup_baseline: CE 1; sup_mcl: CE 1, VCL 0.1, ICL 0.1, Soft VCL 1, Soft ICL 1" in report
    assert "selfsup_mcl: VCL 1, ICL 1, Soft VCL 1, Soft ICL 1" in report
    assert "knn_top1" in report  # the members' pretraining metrics reach the report
    for arm in ("sup_mcl", "sup_baseline", "selfsup_mcl", "selfsup_baseline"):
        res = json.loads((out / "detect/scenes" / arm / "seed0/results.json").read_text())
        assert res["finished"] and res["weights_tag"] == arm and res["seed"] == 0
        assert res["run_name"] == f"scenes_{arm}_seed0" and res["max_iter"] == 2
        # CLEANUP.PRETRAIN_CHECKPOINTS: the checkpoints go once member 0 is exported; the log
        # (read by the report) stays
        pre = out / "pretrain" / arm / "seed0"
        assert not list(pre.glob("checkpoint*")) and (pre / "log.jsonl").is_file()
        assert (out / "weights" / f"{arm}_seed0.pkl").is_file()
    # the missing checkpoints are not mistaken for unfinished pretraining: nothing reruns
    r, text = _study("run", spec)
    assert r.returncode == 0 and _ran(text) == []


def test_a_missing_fashion_mnist_fails_its_data_stage_with_the_apt_command(tmp_path):
    spec = _tiny_fashion_spec(tmp_path, tmp_path / "nowhere")
    r, text = _study("run", spec)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "data.0 failed (exit 2)" in text
    assert "apt-get install -y dataset-fashion-mnist" in text and str(tmp_path / "nowhere") in text
    assert read_record(tmp_path / "fashion", "data.0").state == FAILED
    assert read_record(tmp_path / "fashion", "pretrain.sup_mcl.seed0") is None  # nothing else ran
