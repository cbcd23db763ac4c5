"""Suite-wide fixtures."""

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
