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


def test_bf16_offload_with_clipping_equals_the_device_optimizer():
    """World size 1, stages 1-3: the host optimizer steps the clipped gradients (the CPU side of
    test_precision_cuda.py's stream-order test)."""
    pw.assert_offload_equals_the_device_optimizer(run_ranks(pw.clipped_runs, 1, [1, 2, 3], ["none", "cpu"])[0])


def test_mixed_precision_keeps_fp32_master_shards():
    for r in run_ranks(pw.tiny_net_run, 2, 2, "none", "bf16"):
        assert r["dtype"] == "torch.bfloat16"
        # fp32 master + exp_avg + exp_avg_sq for this rank's shard: 12 bytes per parameter
        assert r["report"]["optimizer_bytes"] == 12 * r["shard_params"], r["report"]


@pytest.fixture(scope="module")
def fp32_gpt_run() -> dict:
    """The fp32 reference of the low-precision GPT runs: 2 ranks, stage 2 (the stages train alike)."""
    return run_ranks(pw.gpt_run, 2, "fp32", 2, 200, timeout_s=120)[0]


def test_bf16_training_reaches_the_fp32_loss(fp32_gpt_run):
    """The tiny GPT on 2 ranks: after 200 steps, within 2% of the fp32 run's loss."""
    pw.assert_reaches_the_fp32_loss(run_ranks(pw.gpt_run, 2, "bf16", 2, 200, timeout_s=120)[0], fp32_gpt_run)


def test_fp16_at_the_default_loss_scale_steps_at_once_and_reaches_the_fp32_loss(fp32_gpt_run):
    """px.initialize's own LossScaler (init_scale=2**16) on the tiny GPT, stage 3, 2 ranks: the loss
    (about 5.5 at first) scaled in fp16 was inf, so the first steps were skipped and the scale backed off."""
    fp16 = run_ranks(pw.gpt_run, 2, "fp16", 3, 200, timeout_s=120)[0]
    pw.assert_the_default_loss_scale_holds(fp16)
    pw.assert_reaches_the_fp32_loss(fp16, fp32_gpt_run)


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
