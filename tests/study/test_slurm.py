"""tools/submit.py on a real SLURM cluster (CI starts one with tools/slurm_local.sh): a toy
pretraining job runs to the end; stopped mid-training by SLURM's time-limit signal, by
``scontrol requeue`` and by a real preemption, it is requeued, resumes from its checkpoint and ends
with the uninterrupted run's weights, bit for bit. Plus submitit's job arrays and afterok.

Without a cluster (no ``sinfo``, or no controller answers) the tests skip, unless
MCL_DET_REQUIRE_SLURM=1 (set by .ci/run): then they fail, naming what is missing.
Every wait has a deadline; the jobs a test submits are cancelled when it ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from clitools import run_tool
from pretrain_toy import toy_opts

from mcl_det.data.toy import make_toy_imagenet
from mcl_det.pretrain.checkpoint import load_checkpoint
from mcl_det.pretrain.config import setup_pretrain_cfg
from mcl_det.pretrain.engine import train

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "tools" / "submit.py"
TOY = str(ROOT / "pretrain" / "configs" / "toy.yaml")
LAST = "checkpoint_last.pth"
REQUIRE_ENV = "MCL_DET_REQUIRE_SLURM"
START_HINT = 'start one with: eval "$(bash tools/slurm_local.sh start)" (root)'
# 6 epochs of 3 iterations: long enough that a signal sent after the first iteration lands
# inside the training loop, short enough for a few seconds of training per job
EPOCHS = {"SOLVER.EPOCHS": "6"}
ITERS = 18
JOB_DEADLINE_S = 600  # submission to result, a requeue included (KillWait 30 s + restart)


def _sh(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def slurm_problem() -> str | None:
    """Why SLURM can't run jobs from here (None: it can)."""
    missing = [
        c
        for c in ("sinfo", "sbatch", "squeue", "scancel", "scontrol", "srun")
        if shutil.which(c) is None
    ]
    if missing:
        return f"SLURM client commands not found: {', '.join(missing)}"
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # sinfo would retry reading it for a minute
        return f"SLURM_CONF={conf} does not exist"
    defaults = ("/etc/slurm/slurm.conf", "/run/slurm/conf/slurm.conf")  # the latter: configless
    if not conf and not any(os.path.isfile(p) for p in defaults):
        return f"no SLURM configuration (SLURM_CONF unset, no {' or '.join(defaults)})"
    try:
        r = _sh("sinfo", "-h", "-o", "%T", timeout=20)
    except subprocess.TimeoutExpired:
        return "no SLURM controller answers (sinfo timed out after 20 s)"
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no SLURM controller answers (sinfo: {err})"
    states = r.stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node is up (sinfo: {' '.join(states) or 'no nodes'})"
    return None


def skip_or_fail(problem: str) -> None:
    """Skip on a machine without SLURM; fail where the caller asked for it (CI)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {problem}; {START_HINT}", pytrace=False)
    pytest.skip(f"{problem} ({START_HINT})")


@pytest.fixture(scope="module")
def slurm():
    problem = slurm_problem()
    if problem:
        skip_or_fail(problem)


@pytest.fixture
def job_env(monkeypatch):
    """What a submitted job inherits (sbatch exports the submitter's environment): this
    checkout's mcl_det, one thread, user errors as one line."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MCL_DET_DEBUG", raising=False)


@pytest.fixture
def job_name():
    """A name unique to the test; its jobs are cancelled when the test ends, pass or fail."""
    name = f"mcl_det-test-{uuid.uuid4().hex[:8]}"
    yield name
    for n in (name, f"{name}-preemptor"):
        try:
            _sh("scancel", "--name", n)
        except (OSError, subprocess.TimeoutExpired):
            pass


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    make_toy_imagenet(root, num_classes=4, train_per_class=6, val_per_class=2, size=32)
    return root


@pytest.fixture(scope="module")
def reference(slurm, data_root, tmp_path_factory):
    """The uninterrupted run, in this process, that every SLURM job must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(setup_pretrain_cfg(TOY, toy_opts(data_root, out, **EPOCHS), cohort=2))
    return out


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _submit(
    tmp_path, data_root, name: str, *, wait: bool
) -> tuple[subprocess.CompletedProcess, Path]:
    """``tools/submit.py pretrain`` of the toy run to SLURM, as a user types it."""
    out = tmp_path / "run"
    ours = ["pretrain", "--gpus-per-node", "0", "--cpus-per-gpu", "1", "--time", "30"]
    ours += ["--name", name, "--job-dir", str(tmp_path / "jobs" / "%j")]
    ours += ["--wait"] if wait else []
    r = run_tool(SUBMIT, *ours, "--", *toy_opts(data_root, out, **EPOCHS), timeout=JOB_DEADLINE_S)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r, out


def _job_id(r: subprocess.CompletedProcess) -> str:
    m = re.search(r"submitted pretrain as job (\d+)", r.stdout)
    assert m, r.stdout
    return m.group(1)


def _slurm_says(job_id: str) -> str:
    try:
        return _sh("scontrol", "show", "job", job_id).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol show job {job_id}: {e}"


def _result(job, deadline_s: float = JOB_DEADLINE_S):
    """job.result(), but failing after ``deadline_s`` instead of waiting forever: without
    accounting (sacct) submitit sees a job end only through its result file."""
    t0 = time.monotonic()
    while not job.done():
        if time.monotonic() - t0 > deadline_s:
            pytest.fail(
                f"job {job.job_id} gave no result in {deadline_s:.0f} s; SLURM says:\n"
                f"{_slurm_says(job.job_id)}\nstdout:\n{(job.stdout() or '')[-2000:]}\n"
                f"stderr:\n{(job.stderr() or '')[-3000:]}"
            )
        time.sleep(1)
    return job.result()


def _train_iterations(out: Path) -> list[int]:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [r["iteration"] for r in records if r.get("type") == "train"]


def _wait_training(job, out: Path, deadline_s: float = 300) -> None:
    """Until the stage has done its first iteration (it is inside the training loop)."""
    t0 = time.monotonic()
    while not _train_iterations(out):
        assert not job.done(), f"job ended before training:\n{job.stderr()}"
        if time.monotonic() - t0 > deadline_s:
            pytest.fail(
                f"job {job.job_id} did not start training in {deadline_s:.0f} s; SLURM "
                f"says:\n{_slurm_says(job.job_id)}"
            )
        time.sleep(0.2)


def test_slurm_missing_is_named_and_fails_only_where_required(tmp_path, monkeypatch):
    """The skip/fail switch itself: a cluster that isn't there is reported, and becomes a failure
    with MCL_DET_REQUIRE_SLURM=1 (runs anywhere, cluster or not)."""
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no_such_slurm.conf"))
    problem = slurm_problem()
    assert problem and ("not found" in problem or "no_such_slurm.conf does not exist" in problem)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV}=1 but "):
        skip_or_fail(problem)
    monkeypatch.delenv(REQUIRE_ENV)
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail(problem)


@pytest.mark.slow
def test_toy_pretraining_job_runs_to_the_end(
    slurm, data_root, reference, tmp_path, job_env, job_name
):
    r, out = _submit(tmp_path, data_root, job_name, wait=True)
    job_id = _job_id(r)
    assert f"job {job_id} finished" in r.stdout
    assert load_checkpoint(out / LAST)["iteration"] == ITERS
    assert _same_weights(out / LAST, reference / LAST)
    log = next((tmp_path / "jobs" / job_id).glob("*_log.out")).read_text()
    assert f"JobEnvironment(job_id={job_id}," in log  # submitit's SLURM environment ran it
    assert "attempt 1:" in log and "attempt 2:" not in log
    assert "JobState=COMPLETED" in _slurm_says(job_id)


def _interrupt_usr2(job, name):
    """What SLURM sends before the time limit (submitit's ``--signal=USR2@90``), to every
    process of the job step."""
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)


def _interrupt_requeue(job, name):
    """An admin's (or a script's) requeue: SIGTERM to the job's processes, SIGKILL after
    KillWait, back to the queue."""
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=30)


def _interrupt_preempt(job, name):
    """A job of a higher-priority partition that needs the whole node: SLURM preempts ours
    (PreemptMode=REQUEUE; tools/slurm_local.sh's partition 'preempt')."""
    r = _sh("sinfo", "-h", "-p", "preempt", "-o", "%c")
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip("no partition 'preempt' (the one tools/slurm_local.sh configures)")
    cpus = r.stdout.split()[0].rstrip("+")
    cmd = ["sbatch", "--parsable", "-p", "preempt", "-c", cpus, "-J", f"{name}-preemptor"]
    cmd += ["-o", "/dev/null", "--wrap", "sleep 2"]
    subprocess.run(cmd, check=True, timeout=30, capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "interrupt",
    [_interrupt_usr2, _interrupt_requeue, _interrupt_preempt],
    ids=["time-limit-signal", "scontrol-requeue", "preemption"],
)
def test_interrupted_job_requeues_and_resumes_to_the_same_weights(
    slurm, data_root, reference, tmp_path, job_env, job_name, interrupt
):
    import submitit

    r, out = _submit(tmp_path, data_root, job_name, wait=False)
    job = submitit.SlurmJob(folder=tmp_path / "jobs" / "%j", job_id=_job_id(r))
    _wait_training(job, out)
    interrupt(job, job_name)
    assert _result(job) == 0
    log = job.stdout() or ""
    assert log.count("attempt ") == 2, log[-3000:]  # stopped once, run again by SLURM
    m = re.search(r"resumed from \S+ at iteration (\d+)", log)
    assert m and 0 < int(m.group(1)) < ITERS, log[-3000:]  # a checkpoint inside the loop
    assert "Restarts=1" in _slurm_says(job.job_id)  # requeued by SLURM, not resubmitted
    assert load_checkpoint(out / LAST)["iteration"] == ITERS
    assert _same_weights(out / LAST, reference / LAST)


@pytest.mark.slow
def test_job_array_then_afterok_dependency(slurm, tmp_path, job_env, job_name):
    """submitit's map_array is one ``sbatch --array``; a job with afterok on it starts only
    once every task succeeded (each task leaves a file after a pause; it sees all of them)."""
    import submitit

    marks = tmp_path / "marks"
    marks.mkdir()

    def task(i):
        time.sleep(2)
        (marks / str(i)).write_text(os.environ["SLURM_ARRAY_TASK_ID"])
        return i * i

    ex = submitit.AutoExecutor(folder=tmp_path / "jobs" / "%j")
    assert ex.cluster == "slurm"
    ex.update_parameters(name=job_name, timeout_min=10, cpus_per_task=1, slurm_array_parallelism=2)
    tasks = ex.map_array(task, [1, 2, 3])
    array_id = tasks[0].job_id.split("_")[0]
    assert [t.job_id for t in tasks] == [f"{array_id}_{i}" for i in range(3)]
    ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{array_id}"})
    after = ex.submit(lambda: sorted(p.name for p in marks.iterdir()))
    assert [_result(t, 300) for t in tasks] == [1, 4, 9]
    assert {p.name: p.read_text() for p in marks.iterdir()} == {"1": "0", "2": "1", "3": "2"}
    assert _result(after, 300) == ["1", "2", "3"]


# ----------------------------------------------------------------------------- a whole study


def _study_spec(tmp_path: Path) -> Path:
    """The toy study (tests/study_toy.py) with 18 pretraining iterations, so that a requeue lands
    inside the training loop, and one CPU per job, so that two jobs share the node."""
    from study_toy import toy_spec

    spec = yaml.safe_load(toy_spec(tmp_path).read_text())
    for arm in spec["ARMS"].values():
        opts = arm["OPTS"]
        opts[opts.index("SOLVER.MAX_ITER") + 1] = ITERS
        arm["GPUS_PER_NODE"] = 0  # a CPU cluster
    spec["PROTOCOLS"]["voc"]["GPUS"] = 0
    spec["NAME"] = f"test-{uuid.uuid4().hex[:8]}"
    spec["SLURM"] = {"CPUS_PER_GPU": 1, "MAX_REQUEUES": 3}
    path = tmp_path / "slurm_study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _results(out: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(out)): json.loads(p.read_text())["metrics"]
        for p in sorted(out.glob("detect/**/results.json"))
    }


@pytest.mark.slow
def test_toy_study_on_slurm_survives_a_requeue_and_matches_the_local_run(slurm, tmp_path, job_env):
    """``tools/study.py run --cluster slurm --wait``: every stage a SLURM job (the trials of an
    arm one array, afterok between them); the MCL pretraining job is requeued mid-training, resumes
    from its checkpoint, and the study ends with the local run's weights and AP, bit for bit."""
    from mcl_det.study.state import read_record

    study_py = ROOT / "tools" / "study.py"
    spec = _study_spec(tmp_path)
    local, remote = tmp_path / "local", tmp_path / "slurm"
    r = run_tool(study_py, "run", spec, "OUTPUT_DIR", local, "--jobs", "2", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    cmd = [sys.executable, str(study_py), "run", str(spec), "OUTPUT_DIR", str(remote)]
    cmd += ["--cluster", "slurm", "--wait"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while not _train_iterations(remote / "pretrain" / "mcl"):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() - t0 < JOB_DEADLINE_S, "pretrain.mcl never started training"
            time.sleep(0.2)
        job_id = read_record(remote, "pretrain.mcl").job_id
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        text, _ = proc.communicate(timeout=2 * JOB_DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in (remote / "stages").glob("*.json"):  # nothing of ours stays in the queue
            rec = json.loads(p.read_text())
            if rec.get("job_id"):
                _sh("scancel", rec["job_id"].split("_")[0])
    assert proc.returncode == 0, text[-4000:]
    assert "submitted pretrain.mcl as job" in text and "(after " in text
    assert re.search(r"submitted detect\.voc\.mcl\.seed0, detect\.voc\.mcl\.seed1 as array", text)
    trial = read_record(remote, "detect.voc.mcl.seed1")
    assert trial.state == "done" and trial.job_id.endswith("_1")  # task 1 of its array
    # the requeue: SLURM ran the same job again, which resumed inside the loop
    log = Path(read_record(remote, "pretrain.mcl").log).read_text()
    assert log.count("attempt ") == 2, log[-3000:]
    m = re.search(r"resumed from \S+ at iteration (\d+)", log)
    assert m and 0 < int(m.group(1)) < ITERS, log[-3000:]
    assert "Restarts=1" in _slurm_says(job_id)
    # ... and nothing differs from the local study
    for arm in ("mcl", "baseline"):
        last = Path("pretrain") / arm / LAST
        done = load_checkpoint(local / last)["iteration"]  # the epochs end before MAX_ITER
        assert load_checkpoint(remote / last)["iteration"] == done > int(m.group(1))
        assert _same_weights(remote / last, local / last), arm
    assert _results(remote) == _results(local) and len(_results(local)) == 4
    assert "| mcl " in (remote / "report.md").read_text()


@pytest.mark.slow
def test_a_job_slurm_refuses_is_one_error_line(slurm, tmp_path, job_env):
    """A GPU asked of a node without one: sbatch refuses; one ``error:`` line names the stage."""
    spec = _study_spec(tmp_path)
    text = spec.read_text().replace("GPUS_PER_NODE: 0", "GPUS_PER_NODE: 1")
    spec.write_text(text)
    out = tmp_path / "refused"
    r = run_tool(ROOT / "tools" / "study.py", "run", spec, "OUTPUT_DIR", out, "--cluster", "slurm")
    try:
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert (
            r.stderr.strip()
            .splitlines()[-1]
            .startswith("error: SLURM refused the job of pretrain.")
        )
    finally:
        for p in (out / "stages").glob("*.json"):
            rec = json.loads(p.read_text())
            if rec.get("job_id"):
                _sh("scancel", rec["job_id"].split("_")[0])
