"""Stop a training run cleanly when the scheduler asks: finish the step, checkpoint, exit 75.

Clusters announce preemption and the end of a time slot with a signal (SLURM: SIGTERM before
killing, or the ``--signal`` of the job, SIGUSR1/SIGUSR2). Killing the process there and then loses
everything since the last periodic checkpoint and can tear a checkpoint in half, so the handlers
installed here only raise a flag while a training loop runs; the loop polls it once per iteration
(cheap: one attribute read), writes an atomic checkpoint and raises :class:`Preempted`, which
``mcl_det.cli.run`` (``run_main``, ``worker_main``) turns into exit code :data:`EXIT_PREEMPTED`.
Outside the loop (model building, evaluation) there is no step to finish, so a signal raises
:class:`Preempted` at once.

Usage (the same in pretraining and detection)::

    with preempt.handle_preemption() as stop:          # installs, and restores on exit
        with stop.deferred():                          # signals only set the flag in here
            for it in range(start, max_iter):
                step()
                if stop.requested(sync=True):          # every rank stops at the same step
                    save_checkpoint(it)                # atomic
                    raise stop.preempted(f"checkpoint {path} written after iteration {it}")
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

# EX_TEMPFAIL of sysexits.h ("temporary failure, the user is invited to retry"): the code SLURM's
# RequeueExit / HTCondor's on_exit_remove are usually configured with; tools/submit.py requeues
# through submitit instead and does not depend on it.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it (128 + SIGINT)
PREEMPT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(BaseException):
    """The run stopped on request and can be resumed (``--auto-resume``/``--resume``).

    A ``BaseException`` like ``KeyboardInterrupt``: training loops that log and re-raise
    ``Exception`` (detectron2's) must not report a requested stop as a crash.
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


class PreemptFlag:
    """Set by the signal handlers; polled by the training loop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = 0

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request"

    def requested(self, sync: bool = False) -> bool:
        """Whether a stop was requested; ``sync=True`` asks every distributed rank (collective:
        call it on all ranks at the same step) so that they all stop after the same iteration."""
        local = self.signum is not None
        return any_rank(local) if sync else local

    @contextlib.contextmanager
    def deferred(self) -> Iterator[PreemptFlag]:
        """Inside: a signal only sets the flag (the loop polls it). Outside: it raises at once."""
        self._deferring += 1
        try:
            yield self
        finally:
            self._deferring -= 1

    def preempted(self, what: str) -> Preempted:
        """The exception to raise after the checkpoint is written; ``what`` says where it is."""
        return Preempted(
            f"stopped by {self.signal_name}: {what}; rerun with --auto-resume (or --resume) "
            f"to continue",
            self.signum,
        )

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        if not self._deferring:
            raise Preempted(
                f"stopped by {self.signal_name} outside a training step (nothing to checkpoint); "
                "rerun with --auto-resume (or --resume) to continue",
                signum,
            )


_current: PreemptFlag | None = None


def current() -> PreemptFlag | None:
    """The flag of the innermost active :func:`handle_preemption`, or None."""
    return _current


@contextlib.contextmanager
def handle_preemption(
    signals: Sequence[signal.Signals] = PREEMPT_SIGNALS,
) -> Iterator[PreemptFlag]:
    """Install the stop handlers for ``signals``; the previous handlers come back on exit.

    Outside the main thread (where Python cannot install handlers) the flag is returned unarmed.
    """
    global _current
    flag = PreemptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag._handle) for s in signals}
    outer, _current = _current, flag
    try:
        yield flag
    finally:
        _current = outer
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def forward_signals(
    pids: Callable[[], Iterable[int]], signals: Sequence[signal.Signals] = PREEMPT_SIGNALS
) -> Iterator[None]:
    """While inside, ``signals`` received here are passed on to the processes ``pids()`` names
    (a launcher whose workers do the training and checkpointing)."""
    import os

    def forward(signum: int, frame: object) -> None:
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over all torch.distributed ranks (just ``flag`` without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
