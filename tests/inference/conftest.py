"""The inference tests run tiny models: one intra-op thread is fastest for them, and it keeps
them quick on a shared, busy machine (where idle OpenMP threads spin against other processes)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
