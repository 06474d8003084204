"""Fixtures of the distributed tests that run in the test process itself (one CUDA rank)."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def nccl_group():
    """A world-size-1 NCCL process group: one GPU cannot run several NCCL ranks."""
    assert not dist.is_initialized()
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
