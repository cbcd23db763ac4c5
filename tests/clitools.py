"""Running an entry point the way a user does, for the CLI tests."""

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tool(
    script: str | Path, *args, cwd: Path = ROOT, timeout: float = 120, **env_extra: str
) -> subprocess.CompletedProcess:
    """Run ``python script args...`` in a subprocess without MCL_DET_DEBUG (so user errors print
    their one line, not a traceback); ``env_extra`` adds environment variables."""
    env = {**os.environ, **env_extra}
    env.pop("MCL_DET_DEBUG", None)
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a user error: exit 2, no traceback anywhere in the output."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errs = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errs) == 1, r.stderr[-3000:]
    return errs[0]


def file_digests(d: Path) -> dict[str, str]:
    """sha256 of every file below ``d`` but the lock file a refused run leaves: the proof that a
    refused or failed run left the earlier files as they were."""
    from mcl_det.utils.io import sha256_file

    files = [p for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(d)): sha256_file(p) for p in files}


_LOCK_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from mcl_det.utils.rundir import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[int]:
    """Another process holds the run lock of ``folder``, as a concurrent run would; yields its
    pid. On exit it is killed (SIGKILL, like a crash: the kernel drops the lock)."""
    p = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(folder), str(ROOT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "locked"
        yield p.pid
    finally:
        p.kill()
        p.wait()


def signal_lock_holders_parent(folder: Path, sig: int) -> None:
    """Send ``sig`` to the parent of the process holding ``folder``'s run lock: the submitit job
    around a training command, as SLURM signals it before the time limit or on preemption."""
    pid = int((Path(folder) / ".lock").read_text().split()[1])
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(parent, sig)
