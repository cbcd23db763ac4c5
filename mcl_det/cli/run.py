"""The run layer every command shares, written once: exit codes, ``--resume`` / ``--auto-resume``
/ ``--overwrite``, the output folder a run holds, and the local launcher with its workers.

Exit codes (what shells, schedulers and ``mcl_det.submit.StageJob`` read): 0 done; 2 a user error,
printed as one ``error:`` line; 75 stopped on request with a checkpoint (``mcl_det.utils.preempt``:
requeue and ``--auto-resume``); 130 Ctrl-C. A command's ``main`` runs under :func:`run_main`; a
worker process it spawns runs its body under :func:`worker_main`, which ends with the same codes,
and :func:`launch` turns the exit of the first worker that failed back into the command's outcome,
so a run on N local processes ends exactly as the same run in one process would.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..utils.elastic import elastic_mode, restart_count
from ..utils.errors import MCLDetError
from ..utils.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, forward_signals
from ..utils.rundir import RunDir, check_output_path, open_run_dir

EXIT_USER_ERROR = 2
EXIT_CRASH = 1  # what Python itself exits with on an uncaught exception

# ----------------------------------------------------------------------------- main processes


class ReportedError(MCLDetError):
    """A user error a worker process has already printed as its ``error:`` line: the command
    exits 2 without printing a second one."""


def run_main(main: Callable[[], int | None]) -> None:
    """Run ``main`` and exit. ``MCLDetError`` -> ``error: ...`` + exit 2; Ctrl-C -> ``interrupted``
    + exit 130; a requested stop (``Preempted``: SIGTERM/SIGUSR1, see ``mcl_det.utils.preempt``)
    -> its message + exit 75, the code schedulers are told to requeue on.

    Set ``MCL_DET_DEBUG=1`` to get the full traceback of a user error instead.
    """
    try:
        code = main()
    except MCLDetError as e:
        if os.environ.get("MCL_DET_DEBUG"):
            raise
        if not isinstance(e, ReportedError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    sys.exit(int(code or 0))


# ----------------------------------------------------------------------------- run modes

RESUME_HELP = "continue the run in OUTPUT_DIR from its last checkpoint"
# flag (argparse dest) -> mcl_det.utils.rundir.RUN_MODES entry
_MODE_OF_FLAG = {"resume": "resume", "auto_resume": "auto", "overwrite": "overwrite"}


def add_run_mode_flags(
    parser: argparse.ArgumentParser, resume_help: str | None = RESUME_HELP
) -> None:
    """Add ``--resume``, ``--auto-resume`` and ``--overwrite`` (read back by :func:`run_mode`).

    ``resume_help=None``: the parser has its own ``--resume`` (detectron2's
    ``default_argument_parser``), only the other two are added.
    """
    if resume_help is not None:
        parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue if OUTPUT_DIR holds this run's checkpoint, else start (requeued jobs)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="OUTPUT_DIR holds an earlier run: delete its outputs and start afresh",
    )


def run_mode(args: argparse.Namespace) -> str:
    """The ``open_run_dir`` mode the flags ask for: ``new`` (none), ``resume``, ``auto``
    (--auto-resume) or ``overwrite``; two of them at once are a user error.

    A worker group torchrun restarted (``--max-restarts``) continues its run by ``--auto-resume``'s
    rules whatever the flags (``mcl_det.utils.elastic.elastic_mode``; ``--resume`` stays).
    """
    chosen = [f for f in _MODE_OF_FLAG if getattr(args, f, False)]
    if len(chosen) > 1:
        flags = " and ".join("--" + f.replace("_", "-") for f in chosen)
        raise MCLDetError(f"{flags} contradict each other; pass one of them")
    asked = _MODE_OF_FLAG[chosen[0]] if chosen else "new"
    mode = elastic_mode(asked)
    if restart_count() and _rank() == 0:
        how = "by --auto-resume's rules" if mode == "auto" else f"as --{mode} asks"
        print(
            f"torchrun restart {restart_count()}: continuing the run from its last complete "
            f"checkpoint {how}",
            file=sys.stderr,
            flush=True,
        )
    return mode


# ----------------------------------------------------------------------------- the output folder


def claim_output_dir(
    path: str | os.PathLike,
    mode: str,
    outputs: Sequence[str],
    *,
    owner: bool = True,
    checkpoints: Sequence[str] = (),
    keep: Sequence[str | os.PathLike] = (),
    run_differs: Callable[[Path], str | None] | None = None,
) -> RunDir:
    """The output folder of a run, before any expensive work; use as
    ``with claim_output_dir(...) as run:`` (``run.resume``: continue the run found there).

    ``owner``: this process holds the folder for the whole run (``open_run_dir``: checks, lock,
    refuse / resume / overwrite, stale temporary files removed and listed on stderr) and releases
    it when the ``with`` block ends, however it ends. The other processes of a multi-machine or
    torchrun job (not the owner) only check that the folder can be written; their ``resume`` is
    what ``mode`` asks for (``resume``, ``auto``), the owner's decision is theirs to receive.
    """
    if not owner:
        return RunDir(check_output_path(path, "dir", "OUTPUT_DIR"), mode in ("resume", "auto"))
    run = open_run_dir(
        path, mode, outputs, checkpoints=checkpoints, keep=keep, run_differs=run_differs
    )
    for f in run.removed_tmp:
        print(f"removed a stale temporary file: {f}", file=sys.stderr, flush=True)
    return run


# ----------------------------------------------------------------------------- workers


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))  # set by our launcher and by torchrun


def worker_main(body: Callable[..., Any], *args: Any) -> None:
    """Run ``body(*args)`` in a spawned worker process and end it with the run's exit codes:
    a user error prints its ``error:`` line and exits 2, a requested stop exits 75 (rank 0 says
    where the checkpoint is), Ctrl-C exits 130 quietly (the launcher says it), anything else
    prints its traceback (a bug to report) and exits 1."""
    try:
        body(*args)
    except MCLDetError as e:
        if os.environ.get("MCL_DET_DEBUG"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except Preempted as e:
        if _rank() == 0:
            print(f"preempted: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if _collective_failed(e) and not os.environ.get("MCL_DET_DEBUG"):
            # a peer died (the launcher names it) or timed out: the cause is elsewhere, not a
            # bug here, so one line instead of a traceback
            what = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            print(f"worker rank {_rank()}: a collective failed ({what})", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(EXIT_CRASH)
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(EXIT_CRASH)


def _collective_failed(e: BaseException) -> bool:
    """Whether ``e`` was raised inside torch.distributed (a collective or the process group)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    where = os.sep + os.path.join("torch", "distributed") + os.sep
    return isinstance(e, RuntimeError) and bool(frames) and where in frames[-1].filename


def _worker_pids() -> list[int]:
    return [c.pid for c in multiprocessing.active_children() if c.pid is not None]


def launch(
    spawn: Callable[..., None],
    body: Callable[..., Any],
    nprocs: int,
    args: tuple = (),
    *,
    output_dir: str | os.PathLike,
    first_rank: int = 0,
) -> None:
    """Run ``body(*args)`` in ``nprocs`` local worker processes, each under :func:`worker_main`,
    and end as one process would.

    ``spawn(fn, nprocs, args=args)`` starts the processes and waits for them (our
    ``mcl_det.pretrain.distributed.launch``, or detectron2's ``launch`` with its machine flags
    bound): both go through ``torch.multiprocessing``, which stops the other workers when one
    fails and reports the first one that did. While they run, SIGTERM / SIGUSR1 received here are
    passed on to them (they checkpoint and exit 75). How the first failing worker ended becomes:
    75 -> ``Preempted`` (exit 75), 2 -> ``ReportedError`` (exit 2, its line is already printed),
    130 -> ``KeyboardInterrupt`` (exit 130), any other code or a signal -> one ``error:`` line
    naming its rank (``first_rank`` + its index on this machine) and its exit code or signal.
    ``output_dir``: where the checkpoints are, for the messages.
    """
    import torch.multiprocessing as mp

    try:
        with forward_signals(_worker_pids):
            spawn(functools.partial(worker_main, body), nprocs, args=args)
    except mp.ProcessExitedException as e:
        raise worker_outcome(e, output_dir, first_rank) from None
    except mp.ProcessRaisedException as e:  # raised before worker_main ran (process group set-up)
        if os.environ.get("MCL_DET_DEBUG"):
            print(e, file=sys.stderr, flush=True)
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        what = lines[-1].strip() if lines else type(e).__name__
        raise MCLDetError(
            f"worker rank {first_rank + e.error_index} failed before training started ({what}); "
            "set MCL_DET_DEBUG=1 to see its traceback"
        ) from None


def worker_outcome(e: Any, output_dir: str | os.PathLike, first_rank: int = 0) -> BaseException:
    """The exception a command raises for the worker ``e`` (a ``ProcessExitedException``: its
    ``error_index``, ``exit_code``, ``signal_name``) names; see :func:`launch`."""
    rank = first_rank + int(e.error_index)
    again = (
        f"earlier checkpoints in {output_dir} are intact: --auto-resume continues from the last one"
    )
    if e.signal_name:
        return MCLDetError(f"worker rank {rank} was killed by {e.signal_name}; {again}")
    if e.exit_code == EXIT_PREEMPTED:
        return Preempted(f"worker processes stopped with a checkpoint in {output_dir}")
    if e.exit_code == EXIT_USER_ERROR:
        return ReportedError(f"worker rank {rank} stopped on the error above")
    if e.exit_code == EXIT_INTERRUPTED:
        return KeyboardInterrupt()
    return MCLDetError(
        f"worker rank {rank} failed with exit code {e.exit_code} (its output is above); {again}"
    )
