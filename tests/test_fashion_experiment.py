"""The Fashion-MNIST experiment runner (benchmarks/fashion_mnist_experiment.py, on the stages of
tools/stages.py): set-up errors, loss-term listing, the stage runner with fake stages, and the whole
pipeline at tiny size through the real CLIs on a synthetic idx directory (no Debian package)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from clitools import run_tool

from mcl_det.data.fashion_mnist import write_idx
from mcl_det.utils.errors import MCLDetError

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "fashion_mnist_experiment.py"


def _load_runner():
    """The runner script as a module (it puts tools/ on sys.path for its stages module)."""
    spec = importlib.util.spec_from_file_location("fashion_mnist_experiment", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fashion = _load_runner()
import stages  # noqa: E402  (tools/stages.py, on sys.path through the runner)


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


def test_missing_data_names_path_and_command(tmp_path):
    # the error names the path and the apt command
    s = fashion.FashionSettings(out=tmp_path / "out", fashion_dir=tmp_path / "nowhere")
    with pytest.raises(MCLDetError) as e:
        fashion.prepare_data(s)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install -y dataset-fashion-mnist" in msg


def test_cli_missing_data_is_one_line_error(tmp_path):
    r = run_tool(RUNNER, "--tiny", "--out", tmp_path / "out", "--fashion-dir", tmp_path / "nowhere")
    assert r.returncode == 2
    assert (
        r.stderr.strip().startswith("error: Fashion-MNIST not found")
        and "Traceback" not in r.stderr
    )


def test_active_terms_read_from_the_shipped_configs():
    def terms(run: str) -> str:
        cfg, mode = fashion.RUNS[run]
        return fashion.active_terms(fashion.shipped_config(cfg), mode)

    assert terms("sup_mcl") == "CE 1, VCL 0.1, ICL 0.1, Soft VCL 1, Soft ICL 1"
    assert terms("sup_baseline") == "CE 1"
    assert terms("selfsup_mcl") == "VCL 1, ICL 1, Soft VCL 1, Soft ICL 1"
    assert terms("selfsup_baseline") == "VCL 1"


def test_mcl_and_baseline_configs_differ_only_in_interaction_weights():
    # the comparison is fair only if the baseline is the same recipe with the MCL terms off
    from mcl_det.pretrain.config import setup_pretrain_cfg

    for mode in ("sup", "selfsup"):
        mcl = setup_pretrain_cfg(str(ROOT / fashion.RUNS[f"{mode}_mcl"][0]))
        base = setup_pretrain_cfg(str(ROOT / fashion.RUNS[f"{mode}_baseline"][0]))
        a, b = mcl.clone(), base.clone()
        for c in (a, b):
            c.defrost()
            c.OUTPUT_DIR = ""
            for k in ("W_VCL", "W_ICL", "W_SOFT_VCL", "W_SOFT_ICL"):
                c.LOSS[k] = 0.0
        assert a == b
        assert mcl.LOSS.W_ICL > 0 and base.LOSS.W_ICL == 0


def test_missing_default_package_is_an_error_and_installs_nothing(monkeypatch, tmp_path):
    # even as root with apt-get at hand, the runner installs nothing: it says what to run
    import os

    import mcl_det.data.fashion_mnist as fm

    calls = []
    monkeypatch.setattr(fm, "DEFAULT_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: calls.append(cmd))
    with pytest.raises(MCLDetError, match="not found") as e:
        fashion.prepare_data(fashion.FashionSettings(out=tmp_path / "out"))
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "--fashion-dir" in msg
    assert calls == []


def test_interrupted_pretraining_resumes_and_settings_reach_the_commands(tmp_path):
    s = fashion.FashionSettings(out=tmp_path, seeds=(3,), pretrain_epochs=5, det_iters=40)
    pre, cfg = tmp_path / "pre", fashion.RUNS["selfsup_mcl"][0]

    def pretrain_cmd() -> list[str]:
        return stages.pretrain_cmd(cfg, pre, tmp_path / "data", fashion.pretrain_opts(s, 3))

    cmd = pretrain_cmd()
    assert "--resume" not in cmd
    assert cmd[cmd.index("SEED") + 1] == "3" and cmd[cmd.index("SOLVER.EPOCHS") + 1] == "5"
    pre.mkdir()
    (pre / "checkpoint_last.pth").write_bytes(b"")
    assert "--resume" in pretrain_cmd()
    opts = fashion.detect_opts(s, "sup_mcl", 3)
    det = stages.detect_cmd(fashion.DET_CONFIG, tmp_path / "w.pkl", "sup_mcl", 3, tmp_path, opts)
    assert det[det.index("MCL_DET.WEIGHTS_TAG") + 1] == "sup_mcl"
    assert det[det.index("SOLVER.MAX_ITER") + 1] == "40" and det[det.index("SEED") + 1] == "3"
    assert det[det.index("SOLVER.STEPS") + 1] == "(32,)"
    assert str(tmp_path / "data" / "scenes" / "voc") in det[det.index("MCL_DET.DATASETS.VOC") + 1]


def test_resuming_with_other_sizes_is_an_error(tmp_path):
    s = fashion.FashionSettings(out=tmp_path / "out", seeds=(0,))
    fashion.check_settings(s)
    fashion.check_settings(
        fashion.FashionSettings(out=tmp_path / "out", seeds=(0, 1, 2))
    )  # more seeds: fine
    with pytest.raises(MCLDetError, match="per_class"):
        fashion.check_settings(fashion.FashionSettings(out=tmp_path / "out", per_class=7))


def _fake_stages(monkeypatch, fail: str = "", slow: str = ""):
    """Replace the stage commands by tiny Python one-liners that write each stage's output file
    (the detection of ``fail`` exits 3 instead, and that of ``slow`` sleeps 30 s first)."""

    def py(code: str) -> list[str]:
        return [sys.executable, "-c", code]

    def write(folder: Path, name: str, text: str) -> str:
        return (
            f"import pathlib; p = pathlib.Path({str(folder)!r}); "
            f"p.mkdir(parents=True, exist_ok=True); (p / {name!r}).write_text({text!r}); "
        )

    def pretrain(config, out, data, opts=(), cohort=None):
        return py(write(out, "checkpoint_last.pth", "ck"))

    def convert(ckpt, w, member=0):
        return py(
            write(w.parent, w.name, "") + f"(p / {w.name!r}).write_text(open({str(ckpt)!r}).read())"
        )

    def det(config, w, run, seed, out, opts=()):
        if fail and fail == f"{run} {seed}":
            return py("import sys; print('boom'); sys.exit(3)")
        code = "import time; time.sleep(30); " if slow == f"{run} {seed}" else ""
        return py(code + write(out, "results.json", "{}") + write(out, "model_final.pth", "m"))

    monkeypatch.setattr(stages, "pretrain_cmd", pretrain)
    monkeypatch.setattr(stages, "convert_cmd", convert)
    monkeypatch.setattr(stages, "detect_cmd", det)
    monkeypatch.setattr(fashion, "prepare_data", lambda s: (s.out / "data", s.out / "scenes"))

    def report(s):
        (s.out / "report.md").write_text("report")
        return s.out / "report.md"

    monkeypatch.setattr(fashion, "write_report", report)


@pytest.mark.parametrize("jobs", [1, 2])
def test_every_chain_runs_once_and_consumed_checkpoints_go(tmp_path, monkeypatch, jobs):
    _fake_stages(monkeypatch)
    s = fashion.FashionSettings(out=tmp_path, seeds=(0, 1), jobs=jobs)
    fashion.run_fashion_experiment(s)
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert len(timings) == 2 * 4 * 3  # every stage of every (run, seed) ran exactly once
    for seed in (0, 1):
        for run in fashion.RUNS:
            assert (tmp_path / "weights" / f"{run}_seed{seed}_member0.pkl").read_text() == "ck"
            assert not (
                tmp_path / "pretrain" / run / f"seed{seed}" / "checkpoint_last.pth"
            ).exists()
            det = tmp_path / "detection" / run / f"seed{seed}"
            assert (det / "results.json").exists() and not (det / "model_final.pth").exists()
    assert (tmp_path / "logs").is_dir() == (jobs > 1)
    # a second call finds everything done: no stage runs (its fakes would rewrite the timings)
    before = (tmp_path / "timings.json").read_text()
    fashion.run_fashion_experiment(s)
    assert (tmp_path / "timings.json").read_text() == before


def test_a_failing_stage_stops_the_others_and_names_its_log(tmp_path, monkeypatch, capsys):
    # the self-supervised chains start first, side by side: one fails while the other sleeps
    _fake_stages(monkeypatch, fail="selfsup_baseline 0", slow="selfsup_mcl 0")
    s = fashion.FashionSettings(out=tmp_path, seeds=(0,), jobs=2)
    t0 = time.time()
    failed = r"'detection selfsup_baseline seed 0' failed \(exit 3\)"
    with pytest.raises(MCLDetError, match=failed + r".*detection_selfsup_baseline_seed_0.log"):
        fashion.run_fashion_experiment(s)
    assert time.time() - t0 < 25  # the 30 s detection running beside it was stopped
    assert "boom" in capsys.readouterr().out  # the end of the failing stage's log is shown
    pre = tmp_path / "pretrain"
    assert (pre / "selfsup_mcl" / "seed0" / "DONE").exists()  # finished stages stay done
    assert not (tmp_path / "detection" / "selfsup_mcl" / "seed0" / "results.json").exists()
    assert not (pre / "sup_mcl" / "seed0").exists()  # no new chain starts after a failure


@pytest.mark.slow
def test_tiny_experiment_end_to_end_and_resume(tmp_path):
    fm = _synthetic_fashion(tmp_path / "fm")
    out = tmp_path / "out"
    args = ["--tiny", "--out", out, "--fashion-dir", fm]
    r = run_tool(RUNNER, *args, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert report in r.stdout  # printed too
    for run in fashion.RUNS:
        res = json.loads((out / "detection" / run / "seed0" / "results.json").read_text())
        assert res["finished"] and res["weights_tag"] == run and res["seed"] == 0
        assert res["run_name"] == f"fashion_{run}_seed0" and res["max_iter"] == 2
        assert run in report  # a row per run (MCL and baseline, both modes)
        assert (out / "pretrain" / run / "seed0" / "DONE").exists()
    assert "## supervised: sup_mcl vs sup_baseline" in report
    assert "## selfsup: selfsup_mcl vs selfsup_baseline" in report
    assert (
        "sup_baseline: CE 1;" in report
        and "selfsup_mcl: VCL 1, ICL 1, Soft VCL 1, Soft ICL 1" in report
    )
    # the member metrics of the pretraining logs reach the report
    assert "knn_top1" in report and "top1" in report
    # two stages at once (the default --jobs 2): each stage's output in its own log
    assert r.stdout.count("(log: ") == 12 and len(list((out / "logs").glob("*.log"))) == 12
    assert "pretrain/main.py" in (out / "logs" / "pretrain_sup_mcl_seed_0.log").read_text()
    # resumable: a second call skips every stage (no stage header; only the reports run)
    r2 = run_tool(RUNNER, *args, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "=== [" not in r2.stdout and "tools/report.py" in r2.stdout
    # checkpoints are deleted once converted / evaluated (no --keep-checkpoints); a resume
    # does not mistake the missing checkpoint for an unfinished pretraining
    for run in fashion.RUNS:
        pre = out / "pretrain" / run / "seed0"
        assert not list(pre.glob("checkpoint*")) and (pre / "log.jsonl").is_file()
        assert (out / "weights" / f"{run}_seed0_member0.pkl").is_file()
        det = out / "detection" / run / "seed0"
        assert not (det / "model_final.pth").exists() and (det / "metrics.json").is_file()
