"""Entry-point wrapper: user errors become one line on stderr and a non-zero exit, never a
traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .errors import MCLDetError
from .preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted

EXIT_USER_ERROR = 2


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
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    sys.exit(int(code or 0))
