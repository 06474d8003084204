"""GPTQ: the per-layer solver against round-to-nearest on random correlated inputs, its exact
agreement with RTN when the inputs are uncorrelated, the Hessian, and the block-by-block pass over
models of both families (each block calibrated on the outputs of the blocks already quantized)."""

from __future__ import annotations

import copy

import pytest
import torch

from parallax import compress
from parallax.compress import QuantLinear, gptq
from parallax.compress.gptq import HessianAccumulator, gptq_weight
from parallax.compress.quant_linear import round_to_nearest
from parallax.models import from_preset
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

K, N, ROWS = 256, 48, 1024


def correlated_inputs(seed: int = 0) -> torch.Tensor:
    """(ROWS, K) activations with correlated features and a few loud channels, as in a transformer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, K, generator=g) @ (torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K))
    x[:, :4] *= 8
    return x


def weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05


def output_error(x: torch.Tensor, w: torch.Tensor, buffers: dict, bits: int, group_size: int | None) -> float:
    layer = QuantLinear(K, N, bits, group_size)
    layer.load_quantized_(buffers)
    return float((x @ w.t() - x @ layer.dequantized_weight().t()).norm())


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    accumulator = HessianAccumulator(K, x.device)
    accumulator(None, (x,), None)
    return accumulator.hessian()


def test_hessian_is_twice_the_mean_outer_product():
    x = correlated_inputs()
    accumulator = HessianAccumulator(K, x.device)
    for rows in x.split(300):
        accumulator(None, (rows.reshape(3, -1, K) if len(rows) == 300 else rows,), None)
    assert_close(accumulator.hessian(), 2 * x.t() @ x / ROWS, atol=1e-3, rtol=1e-5, name="H")


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (4, 32, False), (4, 128, True), (8, None, False)])
def test_gptq_lowers_the_layer_output_error_below_round_to_nearest(bits, group_size, act_order):
    x, w = correlated_inputs(), weight()
    rtn = output_error(x, w, round_to_nearest(w, bits, group_size, torch.float32), bits, group_size)
    buffers = gptq_weight(w, hessian_of(x), bits, group_size, torch.float32, act_order=act_order)
    ours = output_error(x, w, buffers, bits, group_size)
    assert ours < 0.8 * rtn, f"GPTQ ||XW^T - XWq^T|| = {ours:.4f}, RTN {rtn:.4f}"


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, None)])
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(bits, group_size):
    """A diagonal Hessian spreads no error to other columns: GPTQ then rounds each weight to nearest."""
    w = weight()
    energy = torch.rand(K, generator=torch.Generator().manual_seed(3)) + 0.5
    buffers = gptq_weight(w, torch.diag(energy), bits, group_size, torch.float32)
    expected = round_to_nearest(w, bits, group_size, torch.float32)
    assert buffers.keys() == expected.keys()
    assert all(torch.equal(buffers[name], expected[name]) for name in expected)


def test_a_hessian_that_cannot_be_factored_names_damp():
    with pytest.raises(ValueError, match="raise damp"):
        gptq_weight(weight(), -torch.eye(K), 8, None, torch.float32)


def test_each_block_is_calibrated_on_the_outputs_of_the_quantized_blocks_before_it(monkeypatch):
    """The Hessian GPTQ used for a layer of block 1 is the one the final (quantized) model's block 0
    outputs give; with float block-0 outputs it would differ."""
    torch.manual_seed(0)
    model = from_preset("tiny").eval()
    calib = torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(0))
    used = []
    real = gptq.gptq_weight
    monkeypatch.setattr(gptq, "gptq_weight", lambda w, h, *a, **kw: used.append(h) or real(w, h, *a, **kw))
    compress.quantize(model, bits=4, group_size=32, method="gptq", calib=calib)
    assert len(used) == 16  # 4 blocks x (c_attn, c_proj, c_fc, c_proj), in module order
    block = model.transformer.h[1]
    accumulator = HessianAccumulator(block.attn.c_attn.in_features, calib.device)
    handle = block.attn.c_attn.register_forward_pre_hook(lambda m, args: accumulator(m, args, None))
    with torch.no_grad():
        model(calib)
    handle.remove()
    assert_close(used[4], accumulator.hessian(), atol=1e-5, rtol=1e-5, name="block 1 c_attn Hessian")


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_gptq_model_beats_round_to_nearest_on_its_calibration_data(preset):
    torch.manual_seed(0)
    model = from_preset(preset).eval()
    calib = torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(calib)
        rtn = compress.quantize(copy.deepcopy(model), bits=4, group_size=32)(calib)
        quantized = compress.quantize(copy.deepcopy(model), bits=4, group_size=32, method="gptq", calib=calib)
        ours = quantized(calib)
    assert all(isinstance(m, QuantLinear) for fqn, m in quantized.named_modules() if fqn.endswith("proj"))
    assert torch.isfinite(ours).all()
    assert float((ours - reference).norm()) < 0.8 * float((rtn - reference).norm())
    assert quantized.training is False


def test_layers_outside_repeated_blocks_are_calibrated_on_a_pass_of_the_whole_model():
    """A one-block model has no repeated blocks: its layers take their Hessians from full forwards."""
    torch.manual_seed(0)
    model = from_preset("tiny", n_layer=1).eval()
    calib = torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(2))
    assert gptq.repeated_blocks(model) == ([], [])
    with torch.no_grad():
        reference = model(calib)
        rtn = compress.quantize(copy.deepcopy(model), bits=4, group_size=32)(calib)
        ours = compress.quantize(model, bits=4, group_size=32, method="gptq", calib=calib)(calib)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 4
    assert float((ours - reference).norm()) < 0.8 * float((rtn - reference).norm())
