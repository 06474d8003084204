"""Mixed precision (bf16/fp16 compute and communication, fp32 master shards) and CPU offload."""

from __future__ import annotations

import pytest
import torch

import parallax as px
from tests.distributed import precision_workers as pw
from tests.distributed.launch import run_ranks


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_offload_equals_the_device_optimizer_element_wise(precision):
    for stage in (1, 2, 3):
        device = run_ranks(pw.tiny_net_run, 2, stage, "none", precision)
        host = run_ranks(pw.tiny_net_run, 2, stage, "cpu", precision)
        for a, b in zip(device, host):
            for name in a["state"]:
                assert torch.equal(a["state"][name], b["state"][name]), (precision, stage, name)
            # Host memory: 12 bytes per shard parameter (master, m, v) plus two staging slots.
            itemsize = 2 if precision == "bf16" else 4
            bound = 12 * b["shard_params"] + 2 * 2 * b["largest_shard"] * itemsize
            assert b["host_bytes"] <= bound, (stage, b["host_bytes"], bound)


def test_mixed_precision_keeps_fp32_master_shards():
    for r in run_ranks(pw.tiny_net_run, 2, 2, "none", "bf16"):
        assert r["dtype"] == "torch.bfloat16"
        # fp32 master + exp_avg + exp_avg_sq for this rank's shard: 12 bytes per parameter
        assert r["report"]["optimizer_bytes"] == 12 * r["shard_params"], r["report"]


@pytest.mark.parametrize("precision, stage", [("bf16", 2), ("fp16", 3)])
def test_low_precision_training_reaches_the_fp32_loss(precision, stage):
    """The tiny GPT on 2 ranks: after 200 steps, within 2% of the fp32 run's loss."""
    reference = run_ranks(pw.gpt_losses, 2, "fp32", stage, 200, timeout_s=120)[0]
    low = run_ranks(pw.gpt_losses, 2, precision, stage, 200, timeout_s=120)[0]
    ref_tail, low_tail = sum(reference[-20:]) / 20, sum(low[-20:]) / 20
    assert abs(low_tail - ref_tail) <= 0.02 * ref_tail, (precision, low_tail, ref_tail)
    assert low_tail < reference[0] - 2.0, "it must actually learn"


def test_a_bf16_checkpoint_resumes_in_fp32_from_the_master_weights(tmp_path):
    for worst in run_ranks(pw.bf16_to_fp32_resume, 2, str(tmp_path / "c")):
        assert worst == 0.0


def test_bad_precision_and_offload_requests_are_explained():
    with pytest.raises(ValueError, match="precision must be one of"):
        px.RuntimeConfig(precision="fp8")
    with pytest.raises(ValueError, match="offload must be one of"):
        px.RuntimeConfig(offload="nvme")
    with pytest.raises(ValueError, match="offload supports stages 1-3"):
        px.RuntimeConfig(zero_stage=0, offload="cpu")


def test_fp16_overflow_on_one_rank_skips_the_step_on_both(tmp_path):
    for r in run_ranks(pw.fp16_overflow_on_one_rank, 2, str(tmp_path / "c")):
        assert r["skipped"] == [False, False, True, False], r
        assert r["scales"] == [256.0, 256.0, 128.0, 128.0], r  # hysteresis=1: back off at once
        assert r["restored_scale"] == 128.0, "the loss scale travels with the checkpoint"
