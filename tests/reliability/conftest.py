"""Set-up shared by the reliability tests: one thread (tiny tensors; OpenMP waits on the shared
cores cost more than the arithmetic)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
