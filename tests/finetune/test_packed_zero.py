"""Packed SFT batches under ZeRO-3 (with and without activation checkpointing) on 2 gloo ranks
train exactly like a single process."""

from __future__ import annotations

from tests.distributed.launch import run_ranks
from tests.finetune import packed_workers


def test_packed_zero3_steps_equal_a_single_process():
    for diffs in run_ranks(packed_workers.packed_zero_parity, 2, "llama-tiny", 3, [False, True]):
        for checkpointing, diff in diffs.items():
            assert diff <= 1e-6, f"ZeRO-3 packed (activation checkpointing={checkpointing}) vs single process: {diff}"
