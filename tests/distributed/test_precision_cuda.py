"""Mixed precision and offload on one CUDA rank (NCCL, world size 1): the GPU check of what
tests/distributed/test_precision_offload.py covers on gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import precision_workers as pw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("precision, stage", [("bf16", 2), ("fp16", 3), ("bf16", 0)])
def test_low_precision_on_one_gpu_reaches_the_fp32_loss(nccl_group, precision, stage):
    """The tiny GPT on CUDA: after 200 steps, within 2% of the fp32 run's loss; fp16 with
    px.initialize's default loss scale (2**16) steps from the first iteration and keeps its scale."""
    reference = pw.gpt_run(0, 1, "fp32", stage, 200, device="cuda")
    low = pw.gpt_run(0, 1, precision, stage, 200, device="cuda")
    if precision == "fp16":
        pw.assert_the_default_loss_scale_holds(low)
    pw.assert_reaches_the_fp32_loss(low, reference)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_offload_with_clipping_on_gpu_equals_the_device_optimizer(nccl_group, stage):
    """The gradient copies to the host wait for the clipping still queued on the current stream."""
    pw.assert_offload_equals_the_device_optimizer(pw.clipped_runs(0, 1, [stage], ["none", "cpu"], device="cuda"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_on_gpu_equals_the_device_optimizer(nccl_group, precision, stage):
    """Pinned host state, side-stream copies: the same numbers as the optimizer on the GPU."""
    device = pw.tiny_net_run(0, 1, stage, "none", precision, device="cuda")
    host = pw.tiny_net_run(0, 1, stage, "cpu", precision, device="cuda")
    for name in device["state"]:
        assert torch.equal(device["state"][name].cpu(), host["state"][name].cpu()), (precision, stage, name)
    assert host["dtype"] == ("torch.float32" if precision == "fp32" else "torch.bfloat16")
