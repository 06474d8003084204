"""Low-rank factorization (``px.compress.low_rank``): SVD factors, rank choice by energy, global
budget and fixed rank, both model families through training and the paged engine, spec round trip,
bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from parallax.compress import LowRankLinear, low_rank, target_linears
from parallax.compress.common import module_kinds
from parallax.inference import LLM, SamplingParams
from parallax.models import GPT, GPTConfig, Llama, LlamaConfig


def _linear_with_spectrum(s: list[float], in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    """An nn.Linear whose weight has singular values ``s`` (random orthonormal U, V) and a bias."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, len(s), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, len(s), generator=gen, dtype=torch.float64))
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T)
    return layer


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32))
    return Llama(LlamaConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                             intermediate_size=48, model_type=family, tie_word_embeddings=family == "qwen2",
                             attention_bias=family == "qwen2"))


@torch.no_grad()
def _compressible(model: nn.Module, rank: int = 8) -> nn.Module:
    """Every target weight cut to its best rank-``rank`` approximation: a random initialisation's
    flat spectrum would keep every layer dense at any useful energy."""
    for _, layer in target_linears(model):
        u, s, vh = torch.linalg.svd(layer.weight, full_matrices=False)
        layer.weight.copy_(u[:, :rank] * s[:rank] @ vh[:rank])
    return model


def _dense_params(model: nn.Module) -> int:
    return sum(layer.weight.numel() for _, layer in target_linears(model))


def _target_params(model: nn.Module) -> int:
    """Weights of the (factored or dense) layers that replaced the targets."""
    low = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    factored = sum(m.up.weight.numel() + m.down.weight.numel() for m in low)
    inner = {id(m.up) for m in low} | {id(m.down) for m in low}
    return factored + sum(layer.weight.numel() for _, layer in target_linears(model) if id(layer) not in inner)


# --------------------------------------------------------------------------------------------
# the factorization


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_full_rank_reproduces_the_layer(dtype):
    torch.manual_seed(1)
    layer = nn.Linear(24, 17).to(dtype)
    factored = LowRankLinear.from_linear(layer, 17)
    assert factored.up.weight.dtype == dtype and factored.down.weight.shape == (17, 24)
    x = torch.randn(5, 3, 24, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(factored(x), layer(x), rtol=tol, atol=tol)


def test_truncation_is_the_best_rank_r_approximation():
    """The factors keep the top singular values: the error is exactly the dropped ones (Eckart-Young)."""
    s = [8.0, 4.0, 2.0, 1.0, 0.5]
    layer = _linear_with_spectrum(s, 12, 9).double()
    factored = LowRankLinear.from_linear(layer, 2)
    residual = layer.weight - factored.up.weight @ factored.down.weight
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:3], torch.tensor(s[2:], dtype=torch.float64))


def test_energy_picks_the_smallest_rank_reaching_the_threshold(caplog):
    # squared singular values 16, 9, 4, 1 (of 30): cumulative energy 0.533, 0.833, 0.967, 1.0
    model = nn.Sequential(_linear_with_spectrum([4.0, 3.0, 2.0, 1.0], 40, 30))
    with caplog.at_level(logging.INFO, logger="parallax.compress.low_rank"):
        low_rank(model, energy=0.9)
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 3
    assert "0 (30 x 40): rank 3, energy 0.9667" in caplog.text
    for energy, expected in ((0.5, 1), (0.84, 3), (0.833, 2), (1.0, 4)):
        model = nn.Sequential(_linear_with_spectrum([4.0, 3.0, 2.0, 1.0], 40, 30))
        assert low_rank(model, energy).get_submodule("0").rank == expected, energy


def test_a_rank_that_saves_nothing_stays_dense():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(64, 64))
    low_rank(model, rank=4)  # 4 * 16 = 64 = 8 * 8: no saving; 4 * 128 < 64 * 64
    assert type(model[0]) is nn.Linear and isinstance(model[1], LowRankLinear)


@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_budget_bounds_the_parameters_and_spends_it_by_energy(budget):
    """Layers of very different spectra: the budget holds (within one layer's rank step), and the
    steep-spectrum layer gets a higher share of its energy than a flat one at the same rank."""
    torch.manual_seed(0)
    steep = _linear_with_spectrum([2.0 ** -i for i in range(32)], 32, 48, seed=1)
    flat = _linear_with_spectrum([1.0] * 32, 48, 32, seed=2)
    model = nn.Sequential(steep, nn.Linear(32, 48), flat)
    dense = _dense_params(model)
    low_rank(model, budget=budget)
    held = _target_params(model)
    assert budget * dense - (48 + 32) < held <= budget * dense
    assert isinstance(model[0], LowRankLinear) and model[0].rank <= 8  # 99.99% of its energy by rank 8


def test_global_budget_spends_rank_where_the_energy_share_is_highest():
    """Shares of squared singular values: steep 100/109, 9/109 (0.083), then ~1e-6 each; flat 1/32
    (0.031) each. 30% of 2 x 32 x 32 weights = 614 parameters = rank 1 each + 7 steps of 64: the
    steep layer's second value first, then six of the flat layer's."""
    steep = _linear_with_spectrum([10.0, 3.0] + [0.01] * 30, 32, 32, seed=3)
    flat = _linear_with_spectrum([1.0] * 32, 32, 32, seed=4)
    model = nn.Sequential(steep, flat)
    low_rank(model, budget=0.3)
    assert (model[0].rank, model[1].rank) == (2, 7)


def test_budget_keeps_filling_cheaper_layers_after_a_costly_one_stops():
    """A wide layer (320 parameters per rank, energy shares 0.4/0.3/0.2/0.1) and a narrow one (32
    per rank, 1/16 each), 1192 parameters: rank 1 each (352), the wide layer's 2nd and 3rd (640);
    its 4th no longer fits, yet six more of the narrow layer's do."""
    wide = _linear_with_spectrum([0.4 ** 0.5, 0.3 ** 0.5, 0.2 ** 0.5, 0.1 ** 0.5], 256, 64, seed=5)
    narrow = _linear_with_spectrum([1.0] * 16, 16, 16, seed=6)
    model = nn.Sequential(wide, narrow)  # never run: the shapes need not chain
    low_rank(model, budget=1192 / (256 * 64 + 16 * 16))
    assert (model[0].rank, model[1].rank) == (3, 7)


# --------------------------------------------------------------------------------------------
# models: forward, training, engine, spec


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_models_forward_after_low_rank(family):
    """Layers of rank 8 factored at 99.999% energy: the same outputs with fewer parameters."""
    model = _compressible(_model(family))
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    targets = len(target_linears(model))
    low_rank(model, energy=0.99999)
    assert sum(isinstance(m, LowRankLinear) and m.rank <= 8 for m in model.modules()) == targets
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)


def test_recovery_fine_tuning_trains_the_factors():
    model = _model("llama")
    targets = len(target_linears(model))
    low_rank(model, rank=4)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    factors = [p for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
    assert len(factors) == 2 * targets  # every layer factored: down and up weights (Llama has no biases)

    def loss() -> torch.Tensor:
        logits = model(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    first = loss()
    first.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors)
    torch.optim.SGD(factors, lr=0.5).step()
    with torch.no_grad():
        assert loss() < first


@torch.no_grad()
def _recompute_greedy(model: nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]))[0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) > 1e-4, "near-tie: the comparison would hinge on rounding"
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_engine_greedy_equals_the_low_rank_models_recompute(family):
    model = low_rank(_compressible(_model(family)), energy=0.75).eval()
    assert any(isinstance(m, LowRankLinear) and m.rank < 8 for m in model.modules())  # truncated below 8
    with torch.no_grad():  # sharper logits, so that no greedy choice is a near-tie
        model.lm_head.weight.mul_(8) if family == "llama" else model.transformer.wte.weight.mul_(8)
    prompts = [[5, 17, 3, 88, 41, 2, 9], list(range(20, 41))]
    outs = LLM(model, block_size=8, num_blocks=32).generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _recompute_greedy(model, prompt, 8), prompt


def test_spec_round_trip_through_state_dict():
    torch.manual_seed(2)
    layer = LowRankLinear.from_linear(nn.Linear(20, 12).to(torch.bfloat16), 5)
    assert module_kinds()["LowRankLinear"] is LowRankLinear
    spec = layer.spec()
    assert spec == {"in_features": 20, "out_features": 12, "rank": 5, "bias": True, "dtype": "bfloat16"}
    rebuilt = LowRankLinear.from_spec(spec)
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(3, 20, dtype=torch.bfloat16)
    assert torch.equal(rebuilt(x), layer(x))
    no_bias = LowRankLinear.from_spec(dict(spec, bias=False, dtype="float32"))
    assert no_bias.up.bias is None and no_bias.up.weight.dtype == torch.float32


def test_filter_fn_limits_the_targets():
    model = _model("llama")
    low_rank(model, rank=4, filter_fn=lambda module, fqn: fqn.endswith("mlp.down_proj"))
    replaced = [fqn for fqn, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert replaced == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_argument():
    model = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(ValueError, match=r"rank=7 is above min\(in, out\) = 6 of 0 \(6 x 8\)"):
        low_rank(model, rank=7)
    for energy in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
            low_rank(model, energy)
    for budget in (0, 1, 1.2):
        with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\)"):
            low_rank(model, budget=budget)
    with pytest.raises(ValueError, match="give budget or rank, not both"):
        low_rank(model, budget=0.5, rank=2)
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        low_rank(model, rank=0)
    with pytest.raises(ValueError, match="min_rank must be a positive int, got 2.0"):
        low_rank(model, min_rank=2.0)
    with pytest.raises(ValueError, match=r"budget=0.1: the target layers at min_rank=5 already hold more"):
        low_rank(nn.Sequential(nn.Linear(64, 64)), budget=0.1, min_rank=5)
    with pytest.raises(ValueError, match=r"LowRankLinear: rank=9 is above min\(in_features, out_features\) = 8"):
        LowRankLinear(8, 10, 9)
    assert type(model[0]) is nn.Linear  # nothing was replaced by the failed calls
