"""Packed SFT batches under ZeRO-3 (with and without activation checkpointing) on 2 gloo ranks
train exactly like a single process."""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_ranks
from tests.finetune import packed_workers


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_zero3_steps_equal_a_single_process(checkpointing):
    for diff in run_ranks(packed_workers.packed_zero_parity, 2, "llama-tiny", 3, checkpointing):
        assert diff <= 1e-6, f"ZeRO-3 packed vs single process: {diff}"
