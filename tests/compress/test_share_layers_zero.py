"""A model with shared blocks (``share_layers``) under ZeRO stages 1-3 on 2 gloo ranks equals
single-process PyTorch element-wise; each shared weight is stored once and stage 3 makes each
distinct block one unit, gathered for each of its calls (with activation checkpointing too)."""

from __future__ import annotations

from tests.compress import share_workers as sw
from tests.distributed.launch import run_ranks

CASES = [(1, False), (2, False), (3, False), (3, "block")]


def test_zero_stages_train_a_shared_model_as_one_process():
    families = ["gpt", "llama"]
    for by_family in run_ranks(sw.parity, 2, families, CASES, timeout_s=60):
        for family, result in by_family.items():
            _check(family, result)


def _check(family: str, result: dict) -> None:
    for case in CASES:
        assert result[case]["diff"] <= 1e-6, f"{family} {case}: {result[case]['diff']}"
        assert result[case]["stored"] == result["params"], (family, case)  # the shared blocks once
    assert result[(3, False)]["units"] == 1 + 2  # the root and the two distinct blocks
