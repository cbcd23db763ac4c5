"""Running an entry point the way a user does, for the CLI tests."""

import os
import subprocess
import sys
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
