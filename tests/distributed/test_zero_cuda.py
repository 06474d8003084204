"""ZeRO stages 0-3 on one CUDA rank (NCCL, world size 1) against plain AdamW: the GPU check of
the code paths that the gloo tests cover on CPU (one GPU cannot run several NCCL ranks)."""

from __future__ import annotations

import pytest
import torch

import parallax as px
from tests.distributed import gradient_workers as gw
from tests.distributed import zero_workers as zw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_matches_adamw_on_one_gpu(nccl_group, stage, tmp_path):
    torch.manual_seed(0)
    ref = zw.TinyNet().cuda()
    ref_opt = torch.optim.AdamW(zw._groups(ref), lr=1e-2, betas=(0.9, 0.95))
    torch.manual_seed(0)
    model = zw.TinyNet().cuda()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005),
                               param_groups=zw._groups(model), lr=1e-2, betas=(0.9, 0.95))
    for step in range(10):
        idx, tgt = (t.cuda() for t in zw._batches(step, 0, 8, 5, 11))
        ref(idx, tgt).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
        opt.backward(model(idx, tgt))
        opt.clip_grad_norm_(0.05)
        opt.step()
        opt.zero_grad()
    full = px.zero.full_state_dict(model)
    for name, value in ref.state_dict().items():
        assert (full[name] - value.cpu()).abs().max() <= 1e-5, name
    px.checkpoint.save(tmp_path / "c", model, opt, step=10)
    px.checkpoint.load(tmp_path / "c", model, opt)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_block_dropped_on_odd_steps_is_not_stepped_on_one_gpu(nccl_group, stage):
    """LayerDrop with parallax's CUDA AdamW: the dropped block (no gradient) keeps its moments,
    step count and weights, as in torch.optim.AdamW."""
    gates = gw.SCHEDULES["layerdrop"].gates
    torch.manual_seed(0)
    ref = gw.GatedNet().cuda()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    model, opt = px.initialize(gw.GatedNet().cuda(), px.RuntimeConfig(zero_stage=stage), lr=1e-2, weight_decay=0.1)
    for step in range(6):
        idx, tgt = (t.cuda() for t in gw._batch(step, 0))
        ref(idx, tgt, gates(step, 0, 0)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        opt.backward(model(idx, tgt, gates(step, 0, 0)))
        opt.step()
        opt.zero_grad()
    full = px.zero.full_state_dict(model)
    for name, value in ref.state_dict().items():
        assert (full[name] - value.cpu()).abs().max() <= 1e-5, name
