"""Suite-wide fixtures."""

import signal

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test runs torch on one thread.

    The test tensors and models are tiny, and on a 2-core machine shared with other processes
    torch's second OpenMP thread spin-waits: toy steps were measured 4-10x slower with 2 threads
    (a 3x6 log_softmax: 8 ms with 2 threads, 4 us with 1). Subprocesses are not affected.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def live_sigint():
    """The tools' subprocesses start with SIGINT live, as under a user's terminal.

    A suite started in the background by a non-interactive shell (``cmd &``, nohup) inherits SIGINT
    ignored, exec keeps an ignored signal ignored, and Python then installs no KeyboardInterrupt
    handler: the Ctrl-C tests would see their tool finish normally. A handled signal is reset to
    its default at exec, so handling it here gives every child a live SIGINT.
    """
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
