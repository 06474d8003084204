"""LoRA on CUDA: LoraLinear's forward and backward through px.ops.lora_linear (the fused Triton
op) and through the plain-PyTorch path, each against a float32 reference. Skipped without CUDA."""

import pytest
import torch
from torch import nn

import parallax as px
from parallax.peft import LoraConfig, LoraLinear
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def reference(x, weight, bias, A, B, scaling):
    """x @ W^T + b + scaling * (x @ A^T) @ B^T in float32."""
    x, weight, bias, A, B = (t.detach().float() for t in (x, weight, bias, A, B))
    return x @ weight.T + bias + scaling * (x @ A.T) @ B.T


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("fused", [True, False])
def test_lora_linear_on_cuda_matches_float32(monkeypatch, dtype, fused):
    op = getattr(px.ops, "lora_linear", None)
    if fused and op is None:
        pytest.skip("px.ops.lora_linear is not available")
    calls = []
    if fused:
        monkeypatch.setattr(px.ops, "lora_linear", lambda *a, **k: calls.append(1) or op(*a, **k))
    else:
        monkeypatch.setattr(px.ops, "lora_linear", None, raising=False)
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(96, 80).to("cuda", dtype))
    layer.update_layer("default", LoraConfig(r=8, lora_alpha=16, init_lora_weights=False))
    layer.active_adapters = ["default"]
    layer.base_layer.requires_grad_(False)
    x = torch.randn(3, 17, 96, device="cuda", dtype=dtype, requires_grad=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    y = layer(x)
    y.float().square().sum().backward()
    assert len(calls) == int(fused) and y.dtype == dtype
    x_ref, A_ref, B_ref = (t.detach().float().requires_grad_() for t in (x, A, B))
    y_ref = reference(x_ref, layer.base_layer.weight, layer.base_layer.bias, A_ref, B_ref, 2.0)
    y_ref.square().sum().backward()
    atol = TOLERANCES[dtype]
    assert_close(y.float(), y_ref, atol=atol, rtol=atol, name="output")
    scale = y_ref.abs().max().item()  # gradients of a sum of squares grow with the output
    for name, got, expected in (("x", x.grad, x_ref.grad), ("A", A.grad, A_ref.grad), ("B", B.grad, B_ref.grad)):
        assert_close(got.float(), expected, atol=atol * scale * 10, rtol=atol, name=f"grad {name}")
