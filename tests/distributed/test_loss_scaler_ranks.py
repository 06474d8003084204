"""px.amp.LossScaler on 2 gloo ranks: a non-finite gradient on one rank skips the step on all."""

from __future__ import annotations

from tests.distributed import amp_workers as aw
from tests.distributed.launch import run_ranks

CASES = [(2, "fp32"), (2, "bf16"), (3, "fp32")]  # (ZeRO stage, precision); one spawn for all


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank():
    for rank, result in enumerate(run_ranks(aw.overflow_on_one_rank, 2, CASES, timeout_s=30)):
        for stage, precision in CASES:
            r = result[(stage, precision)]
            where = (rank, stage, precision, r)
            # clean, inf loss on rank 1, NaN gradient on rank 1, clean: parameters
            # (px.zero.full_state_dict) unchanged on both ranks exactly on the poisoned steps.
            assert r["skipped"] == [False, True, True, False], where
            # hysteresis=2: the first overflow is tolerated, the second halves the scale.
            assert r["scales"] == [1024.0, 1024.0, 512.0, 512.0], where
            assert r["grad_dtypes"] == [{"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]], where
        # A plain torch optimizer under the same process group skips together too.
        plain = result["plain"]
        assert plain["skipped"] and plain["result"] is None and plain["scale"] == 4.0, (rank, plain)


def test_the_min_scale_error_names_the_same_parameter_on_every_rank():
    for rank, r in enumerate(run_ranks(aw.error_at_min_scale, 2, 2, timeout_s=30)):
        # 4 -> 2 -> 1, one skip at the minimum, and the 4th skip in a row raises on every rank.
        assert r["step"] == 3 and r["scales"] == [2.0, 1.0, 1.0], (rank, r)
        assert r["parameters"] == [aw.BAD_PARAM], (rank, r)
        assert aw.BAD_PARAM in r["message"], (rank, r)
