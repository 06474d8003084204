"""Weight-only quantization (``px.compress.quantize``, ``QuantLinear``): the RTN grids and their
storage, models of both families through training code, the engine and checkpoints, W8A8, and bad input.
GPTQ's own tests are in test_gptq.py, QLoRA's in test_qlora.py."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from torch import nn

from parallax import compress
from parallax.compress import QuantLinear
from parallax.compress.common import module_kinds, target_linears
from parallax.inference import LLM, SamplingParams
from parallax.models import from_preset
from parallax.ops.quant_linear import unpack_int4
from tests.helpers import assert_close
from tests.inference.test_engine_families import build, recompute_greedy

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def linear(in_features: int, out_features: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(out_features, 1) * 4)  # rows of different ranges
    return layer


def tokens(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_int8_rtn_is_symmetric_per_channel_within_half_a_step():
    base = linear(50, 37)
    layer = QuantLinear.from_linear(base, bits=8)
    W = base.weight.detach()
    scales = W.abs().amax(dim=1) / 127
    assert_close(layer.scales, scales, atol=0, rtol=1e-7, name="scales")
    assert layer.qweight.dtype == torch.int8 and int(layer.qweight.abs().max()) == 127
    error = (layer.dequantized_weight() - W).abs()
    assert bool((error <= scales[:, None] / 2 * (1 + 1e-5)).all()), "an int8 weight is off by more than half a step"


@pytest.mark.parametrize("group_size", [16, 32])
def test_int4_rtn_is_asymmetric_per_group_within_half_a_step(group_size):
    base = linear(64, 24, seed=1)
    layer = QuantLinear.from_linear(base, bits=4, group_size=group_size)
    W = base.weight.detach().reshape(24, 64 // group_size, group_size)
    low, high = W.amin(-1).clamp(max=0), W.amax(-1).clamp(min=0)
    scales = (high - low) / 15
    assert_close(layer.scales, scales, atol=0, rtol=1e-6, name="scales")
    assert_close(layer.zeros, torch.round(-low / scales), atol=0, name="zeros")
    error = (layer.dequantized_weight().reshape_as(W) - W).abs()
    assert bool((error <= scales[..., None] / 2 * (1 + 1e-5)).all()), "an int4 weight is off by more than half a step"


def test_int4_storage_is_packed_two_codes_per_byte_exactly():
    base = linear(64, 10, seed=2)
    layer = QuantLinear.from_linear(base, bits=4, group_size=32)
    W = base.weight.detach().reshape(10, 2, 32)
    scales, zeros = layer.scales[..., None], layer.zeros[..., None]
    codes = (torch.round(W / scales) + zeros).clamp(0, 15).reshape(10, 64).to(torch.uint8)
    assert layer.qweight.shape == (10, 32) and layer.qweight.dtype == torch.uint8
    assert torch.equal(unpack_int4(layer.qweight), codes)
    assert torch.equal(layer.qweight[:, 0] & 0x0F, codes[:, 0]) and torch.equal(layer.qweight[:, 0] >> 4, codes[:, 1])
    assert torch.equal(layer.dequantized_weight(), ((codes.float() - zeros.reshape(10, 2).repeat_interleave(32, 1))
                                                    * scales.reshape(10, 2).repeat_interleave(32, 1)))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_requantizing_a_small_update_keeps_the_grid_and_moves_weights_by_at_most_the_update(bits, group_size):
    """What merging a LoRA adapter into a quantized layer relies on; and unmerging restores the codes."""
    layer = QuantLinear.from_linear(linear(64, 16, seed=4), bits=bits, group_size=group_size)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    base = layer.dequantized_weight()
    layer.requantize_(base)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items()), "requantizing W_deq changed it"
    groups = layer.scales.reshape(16, -1)
    step = groups.repeat_interleave(64 // groups.shape[1], dim=1)
    if bits == 4:  # codes 0 .. 15 stand for (code - zero) * step
        zero = layer.zeros.repeat_interleave(group_size, dim=1)
        low, high = (-zero - 0.45) * step, (15 - zero + 0.45) * step
    else:  # codes -127 .. 127 stand for code * step
        low, high = -127.45 * step, 127.45 * step
    shift = (torch.rand(16, 64, generator=torch.Generator().manual_seed(5)) - 0.5) * 3 * step  # up to 1.5 steps
    delta = torch.minimum(torch.maximum(base + shift, low), high) - base  # the sum stays on the grid's range
    layer.requantize_(base + delta)
    assert torch.equal(layer.scales, before["scales"]), "a small update changed the grid"
    error = (layer.dequantized_weight() - base - delta).abs()
    assert bool((error <= torch.minimum(delta.abs(), step / 2) * (1 + 1e-5) + 1e-9).all())
    assert not torch.equal(layer.qweight, before["qweight"]), "the update was meant to move some codes"
    layer.requantize_(layer.dequantized_weight() - delta)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items()), "unmerging did not restore the codes"


def test_requantizing_a_weight_beyond_the_grid_gives_that_group_a_fresh_grid():
    layer = QuantLinear.from_linear(linear(64, 4, seed=6), bits=4, group_size=32)
    scales = layer.scales.clone()
    weight = layer.dequantized_weight()
    weight[0, 0] += 10 * float(scales.max()) * 16
    layer.requantize_(weight)
    expected = QuantLinear.from_linear(linear(64, 4, seed=6), bits=4, group_size=32)
    expected.load_weight_(weight)
    assert torch.equal(layer.scales[0, 0], expected.scales[0, 0]) and not torch.equal(layer.scales[0, 0], scales[0, 0])
    assert torch.equal(layer.scales[1:], scales[1:]) and torch.equal(layer.scales[0, 1], scales[0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_bytes_are_what_the_bits_say(dtype):
    """int8: 1 byte per weight + a scale per row; int4: half a byte + a scale and zero per group."""
    base = linear(256, 64).to(dtype)
    element = torch.finfo(dtype).bits // 8
    for bits, group, expected in ((8, None, 64 * 256 + 64 * element + 64 * element),
                                  (4, 128, 64 * 128 + 2 * 64 * 2 * element + 64 * element)):
        layer = QuantLinear.from_linear(base, bits=bits, group_size=group)
        stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        assert stored == expected, (bits, stored, expected)
        assert layer.dtype == dtype and layer(torch.randn(3, 256, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("preset,group_size", [("tiny", 128), ("llama-tiny", 32)])
def test_quantize_replaces_every_linear_but_the_head_and_keeps_outputs_close(preset, group_size):
    torch.manual_seed(0)
    model = from_preset(preset).eval()
    x = tokens(2, 24)
    with torch.no_grad():
        reference = model(x)
    targets = [fqn for fqn, _ in target_linears(model)]
    for bits, group, tolerance in ((8, None, 0.03), (4, group_size, 0.3)):
        quantized = compress.quantize(copy.deepcopy(model), bits=bits, group_size=group)
        modules = dict(quantized.named_modules())
        assert all(isinstance(modules[fqn], QuantLinear) and modules[fqn].bits == bits for fqn in targets)
        assert type(quantized.lm_head) is nn.Linear
        with torch.no_grad():
            logits = quantized(x)
        assert torch.isfinite(logits).all()
        relative = float((logits - reference).norm() / reference.norm())
        assert relative < tolerance, (bits, relative)


def test_quantized_model_trains_its_remaining_float_parameters():
    """Training code runs unchanged: the loss backpropagates through the quantized layers."""
    torch.manual_seed(0)
    model = compress.quantize(from_preset("tiny"), bits=4, group_size=32)
    x = tokens(2, 16)
    model(x[:, :-1], x[:, 1:]).backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    assert model.transformer.h[0].attn.c_attn.bias.grad is not None


def test_spec_and_state_dict_rebuild_the_quantized_model_exactly():
    """What px.compress.save/load do: record {fqn: spec} (JSON), build the plain model, replace
    the layers from their specs, load the state dict strictly."""
    torch.manual_seed(0)
    model = compress.quantize(from_preset("llama-tiny"), bits=4, group_size=32, filter_fn=lambda m, fqn: "mlp" in fqn)
    compress.quantize(model, bits=8)  # the rest (attention) in int8: two kinds in one model
    specs = {fqn: (type(m).__name__, json.loads(json.dumps(m.spec())))
             for fqn, m in model.named_modules() if isinstance(m, QuantLinear)}
    torch.manual_seed(1)
    rebuilt = from_preset("llama-tiny")
    for fqn, (kind, spec) in specs.items():
        compress.common.set_module(rebuilt, fqn, module_kinds()[kind].from_spec(spec))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = tokens(2, 20)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_dequantize_gives_dense_layers_with_the_same_outputs():
    torch.manual_seed(0)
    model = compress.quantize(from_preset("tiny"), bits=4, group_size=64).eval()
    x = tokens(1, 16)
    with torch.no_grad():
        expected = model(x)
        dense = compress.dequantize(model)
        assert not any(isinstance(m, QuantLinear) for m in dense.modules())
        assert_close(dense(x), expected, atol=1e-5, name="logits")


@pytest.mark.parametrize("family,bits,activations", [("gpt2", 8, None), ("llama", 4, None), ("qwen2", 8, "int8")])
def test_engine_greedy_equals_the_quantized_models_own_recompute(family, bits, activations):
    model = compress.quantize(build(family), bits=bits, group_size=32 if bits == 4 else None, activations=activations)
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 7, 19)]
    outs = LLM(model, block_size=8, max_num_seqs=3).generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == recompute_greedy(model, prompt, 10), (family, len(prompt))


def test_w8a8_is_close_to_weight_only_int8_and_exact_in_integers():
    torch.manual_seed(0)
    model = from_preset("llama-tiny").eval()
    x = tokens(2, 24)
    with torch.no_grad():
        w8 = compress.quantize(copy.deepcopy(model), bits=8)(x)
        w8a8_model = compress.quantize(copy.deepcopy(model), bits=8, activations="int8")
        w8a8 = w8a8_model(x)
    assert float((w8a8 - w8).norm() / w8.norm()) < 0.02
    layer = w8a8_model.model.layers[0].mlp.down_proj
    h = torch.randn(5, layer.in_features)
    with torch.no_grad():
        out = layer(h)
    x_scales = h.abs().amax(1, keepdim=True) / 127
    x_codes = torch.round(h / x_scales)
    expected = (x_codes.double() @ layer.qweight.double().t()) * x_scales.double() * layer.scales.double()
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="W8A8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_features", [16, 97, 128])
def test_int8_on_cpu_in_16_bit_matches_the_reference_with_and_without_autograd(dtype, in_features):
    """Inference in 16 bits runs ATen's int8 weight-only matmul (where its kernel supports the
    width); with autograd, the differentiable reference. Both compute the dequantized layer."""
    from parallax.ops.quant_linear import int8_linear_ref

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(in_features, 45).to(dtype), bits=8)
    x = torch.randn(3, 5, in_features, dtype=dtype)
    expected = int8_linear_ref(x.double(), layer.qweight, layer.scales.double(), layer.bias.double())
    with torch.no_grad():
        fast = layer(x)
    x.requires_grad_(True)
    slow = layer(x)
    slow.sum().backward()
    for y in (fast, slow):
        assert y.dtype == dtype and y.shape == (3, 5, 45)
        assert_close(y.double(), expected, atol=0.05, rtol=0.02)
    assert x.grad is not None


def test_int8_on_cpu_reads_weights_at_any_address_and_loaded_models_are_aligned(tmp_path):
    """ATen's int8 kernel crashes on weights that are not 64-byte aligned (safetensors hands out
    views at file offsets): such weights take the reference, and px.compress.load copies them."""
    from parallax.ops.quant_linear import int8_linear_ref

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(128, 384).to(torch.bfloat16), bits=8)
    storage = torch.empty(layer.qweight.numel() + 24, dtype=torch.int8)
    layer.qweight = storage[24:].view_as(layer.qweight).copy_(layer.qweight)  # 24 bytes off alignment
    x = torch.randn(64, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert_close(y.double(), int8_linear_ref(x.double(), layer.qweight, layer.scales.double(), layer.bias.double()),
                 atol=0.05, rtol=0.02)
    model = from_preset("tiny", n_layer=1).bfloat16()
    compress.quantize(model, bits=8)
    compress.save(model, tmp_path / "q")
    loaded = compress.load(tmp_path / "q")
    assert all(m.qweight.data_ptr() % 64 == 0 for m in loaded.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.equal(loaded(torch.arange(100)[None]), model(torch.arange(100)[None]))


def test_w8a8_refuses_autograd():
    layer = QuantLinear.from_linear(linear(16, 8), bits=8, activations="int8")
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(torch.randn(2, 16, requires_grad=True))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits must be one of"),
    (dict(bits=8, group_size=128), "group_size must be None"),
    (dict(bits=4, group_size=48), r"group_size 48 does not divide .* 'transformer.h.0.attn.c_attn' \(128"),
    (dict(bits=4, group_size=0), "group_size must be a positive int"),
    (dict(method="awq"), "method must be one of"),
    (dict(bits=4, activations="int8"), "needs bits=8"),
    (dict(activations="fp8"), "activations must be one of"),
    (dict(method="gptq"), "calib: method 'gptq' needs calibration data"),
    (dict(method="gptq", calib=tokens(2, 64)), "at least 4 calibration sequences"),
    (dict(method="gptq", calib=tokens(4, 16)), r"as many calibration tokens .* \(512, layer 'transformer.h.0.mlp.c_proj'"),
    (dict(method="gptq", calib=tokens(8, 64), damp=0), "damp must be a positive float"),
    (dict(filter_fn=lambda module, fqn: False), "no nn.Linear to quantize"),
])
def test_bad_arguments_are_refused_naming_them_and_leave_the_model_unchanged(kwargs, match):
    model = from_preset("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        compress.quantize(model, **kwargs)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits,group_size,activations", [(8, None, None), (4, 128, None), (8, None, "int8")])
def test_cuda_quantized_model_computes_what_the_cpu_one_does(bits, group_size, activations):
    """The CUDA path (the dequantizing kernels; torch._int_mm for W8A8) against the CPU reference, in
    float32 and in bfloat16; GPTQ runs on the device too."""
    torch.manual_seed(0)
    model = compress.quantize(from_preset("tiny"), bits=bits, group_size=group_size, activations=activations).eval()
    x = tokens(3, 40)
    with torch.no_grad():
        expected = model(x)
        on_gpu = copy.deepcopy(model).cuda()
        assert_close(on_gpu(x.cuda()), expected, atol=2e-3, rtol=2e-3, name="fp32 logits")
        in_bf16 = on_gpu.to(torch.bfloat16)(x.cuda()).float().cpu()
    assert float((in_bf16 - expected).norm() / expected.norm()) < 0.03
    if activations is None:
        calib = tokens(8, 64).cuda()
        gptq = compress.quantize(from_preset("tiny").cuda(), bits=bits, group_size=group_size, method="gptq", calib=calib)
        with torch.no_grad():
            assert torch.isfinite(gptq(x.cuda())).all()
