"""What every multi-process run promises when a worker dies (written once; docs/DESIGN.md).

- Collectives time out: every process group is created with a timeout (pretraining's
  ``DIST.TIMEOUT_S``, detection's ``MCL_DET.DIST_TIMEOUT_S``, both :data:`DEFAULT_TIMEOUT_S` by
  default), and :func:`prepare_collectives` sets ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` so that a
  collective that failed or timed out tears the process down instead of leaving it blocked.
- A group torchrun restarted (``--max-restarts N``; ``TORCHELASTIC_RESTART_COUNT`` > 0)
  continues the run it belongs to: :func:`elastic_mode` turns the run mode the command line asked
  for into ``--auto-resume``'s (continue from the last complete checkpoint of this run, refuse a
  folder holding another run), because by then OUTPUT_DIR holds this run's own outputs, which
  ``new`` would refuse and ``--overwrite`` would delete.
"""

from __future__ import annotations

import os

# detectron2's launch default (30 min): long enough for what one rank does while the others wait
# in a collective (rank 0's kNN monitor over the whole train set, a large checkpoint write), and
# still a bound on how long a peer lost without a trace (a dead machine) can block the others.
DEFAULT_TIMEOUT_S = 1800
# NCCL: abort the communicator and end the process on a failed or timed-out collective (what
# torchrun's agent sets for its workers when the variable is unset; gloo raises by itself).
ASYNC_ERROR_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
ASYNC_ERROR_TEARDOWN = "1"
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"


def prepare_collectives() -> None:
    """Before a process group is created (here, or in processes started from here): a failed
    collective ends the process. A value the user set is kept."""
    os.environ.setdefault(ASYNC_ERROR_ENV, ASYNC_ERROR_TEARDOWN)


def restart_count() -> int:
    """How many times torchrun restarted this worker group (0: first attempt, or no torchrun)."""
    try:
        return max(int(os.environ.get(RESTART_ENV, "0")), 0)
    except ValueError:
        return 0


def elastic_mode(mode: str) -> str:
    """The run mode (``mcl_det.utils.rundir.RUN_MODES``) of this attempt: a restarted torchrun
    group continues by ``--auto-resume``'s rules unless ``--resume`` (continue whatever config
    the checkpoint has) or ``--auto-resume`` already says so."""
    if restart_count() > 0 and mode in ("new", "overwrite"):
        return "auto"
    return mode
