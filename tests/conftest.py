"""Fixtures shared across test folders."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_intraop_thread():
    """Tiny models run fastest on one intra-op thread, and it keeps them quick on a shared, busy
    machine (where idle OpenMP threads spin against other processes). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_intraop_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
