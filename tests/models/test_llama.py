"""The Llama-style family: config validation, presets with the published shapes, the attention
backends with sliding windows, the loss, and the forward-context contract the engine uses.
(Equality with transformers' implementations: tests/models/test_hf_*.py and
tests/inference/test_engine_families.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallax import ops

from parallax.models import (LLAMA_PRESETS, Attention, Llama, LlamaConfig, build_model, config_from_preset,
                             forward_context, from_preset)
from parallax.models.attention import ATTENTION_BACKENDS
from parallax.models.rope import inv_frequencies

# Published parameter counts (tied embeddings counted once).
PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "qwen2.5-0.5b": 494_032_768, "smollm2-135m": 134_515_008,
             "mistral-7b": 7_241_732_096, "qwen3-0.6b": 596_049_920}


def tiny(**overrides) -> LlamaConfig:
    fields = dict(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)
    return LlamaConfig(**{**fields, **overrides})


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_shapes(name):
    with torch.device("meta"):
        model = from_preset(name)
    assert isinstance(model, Llama)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name", [n for n in LLAMA_PRESETS if n.endswith("-tiny")])
def test_tiny_presets_train_a_step_on_cpu(name):
    torch.manual_seed(0)
    model = from_preset(name)
    x = torch.randint(0, 257, (2, 40))
    loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "gemma", "model_type must be one of"),
    ("n_kv_head", 3, "n_kv_head must divide n_head"),
    ("n_layer", 0, "n_layer"),
    ("head_dim", 7, "head_dim must be even"),
    ("rms_norm_eps", 0.0, "rms_norm_eps must be a positive number"),
    ("rope_theta", -1.0, "rope_theta"),
    ("sliding_window", 0, "sliding_window"),
    ("qk_norm", 1, "qk_norm must be True or False"),
    ("dropout", 1.0, "dropout"),
    ("attention", "xformers", "attention must be one of"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn'.*does not implement"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "lacks"),
    ("rope_scaling", {"rope_type": "linear", "factor": -2.0}, "positive number"),
])
def test_bad_config_values_raise_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{field: value})


def test_unknown_fields_and_presets_raise():
    with pytest.raises(ValueError, match="unknown LlamaConfig fields"):
        LlamaConfig.from_dict({"hidden_size": 8})
    with pytest.raises(ValueError, match="unknown preset"):
        config_from_preset("llama-9000")


def test_config_round_trips_through_a_dict():
    cfg = LlamaConfig.from_preset("llama-tiny")
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.head_dim == cfg.n_embd // cfg.n_head


def test_llama3_scaling_keeps_high_frequencies_and_divides_low_ones():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    plain, scaled = inv_frequencies(32, 10000.0, None), inv_frequencies(32, 10000.0, scaling)
    wavelength = 2 * torch.pi / plain
    high, low = wavelength < 64 / 4, wavelength > 64 / 1
    assert torch.equal(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    assert high.any() and low.any()


@pytest.mark.parametrize("window", [None, 5, 40])
def test_backends_agree_with_and_without_a_sliding_window(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 23, 4, 8), torch.randn(2, 23, 2, 8), torch.randn(2, 23, 2, 8)
    expected = ATTENTION_BACKENDS["math"](q.double(), k.double(), v.double(), 0.0, window)
    # by hand: query i sees keys j with i - window < j <= i
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(2, dim=2)) / 8 ** 0.5
    i, j = torch.arange(23)[:, None], torch.arange(23)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    by_hand = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~allowed, float("-inf")).softmax(-1),
                           v.double().repeat_interleave(2, dim=2))
    torch.testing.assert_close(expected, by_hand)
    for name in ("sdpa", "auto"):
        torch.testing.assert_close(ATTENTION_BACKENDS[name](q, k, v, 0.0, window), expected.float(),
                                   atol=1e-5, rtol=1e-5)


def test_flash_backend_refuses_a_window_that_cuts_the_sequence():
    q = torch.zeros(1, 9, 2, 16)
    with pytest.raises(ValueError, match="no sliding window"):
        ATTENTION_BACKENDS["flash"](q, q, q, 0.0, 4)


def test_the_window_changes_the_model_only_beyond_its_length():
    torch.manual_seed(0)
    windowed = Llama(tiny(sliding_window=8, attention="math")).eval()
    full = Llama(tiny(attention="math")).eval()
    full.load_state_dict(windowed.state_dict())
    x = torch.randint(0, 61, (1, 20))
    a, b = windowed(x), full(x)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_forward_is_causal_and_positions_are_relative():
    torch.manual_seed(0)
    model = Llama(tiny(qk_norm=True, attention_bias=True)).eval()
    x = torch.randint(0, 61, (2, 12))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 61
    torch.testing.assert_close(model(x)[:, :7], model(x2)[:, :7])
    positions = torch.arange(12)[None]
    torch.testing.assert_close(model.logits(model.hidden_states(x, positions)), model(x))
    # rotary attention sees relative positions: a uniform shift changes nothing, spreading them does
    torch.testing.assert_close(model.logits(model.hidden_states(x, positions + 3)), model(x), atol=1e-5, rtol=1e-5)
    assert (model.logits(model.hidden_states(x, positions * 2)) - model(x)).abs().max() > 1e-4


def test_loss_is_fp32_cross_entropy_and_ignores_negative_targets():
    torch.manual_seed(0)
    model = Llama(tiny(tie_word_embeddings=True))
    x = torch.randint(0, 61, (2, 10))
    y = x.clone()
    y[0, :4] = -100
    y[1, -2:] = -1
    expected = F.cross_entropy(model(x).float().view(-1, 61), y.view(-1).clamp(min=-100).where(y.view(-1) >= 0, -100),
                               ignore_index=-100)
    torch.testing.assert_close(model(x, y), expected)


def test_sequences_longer_than_the_model_raise():
    model = Llama(tiny(block_size=8))
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="positions must have shape"):
        model.hidden_states(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long))


def test_attention_layers_hand_q_k_v_to_an_active_forward_context():
    """The engine's contract: inside forward_context every Attention layer calls ctx.attend with
    (B, T, H, D) / (B, T, Hkv, D) tensors, in module order, and uses what it returns."""
    model = build_model(tiny(sliding_window=6))
    seen = []

    class Recorder:
        def attend(self, layer, q, k, v):
            seen.append((layer, q.shape, k.shape, v.shape))
            return torch.zeros_like(q)

    x = torch.randint(0, 61, (1, 5))
    with forward_context(Recorder()):
        h = model.hidden_states(x)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert [s[0] for s in seen] == layers and len(layers) == 2
    assert all(s[1:] == ((1, 5, 4, 8), (1, 5, 2, 8), (1, 5, 2, 8)) for s in seen)
    assert layers[0].sliding_window == 6
    # outside the context the backend runs again
    assert not torch.equal(model.hidden_states(x), h)


def test_bf16_model_keeps_fp32_rotary_tables():
    torch.manual_seed(0)
    model = Llama(tiny(block_size=4096)).to(torch.bfloat16)
    x = torch.randint(0, 61, (1, 4))
    model(x)
    (table,) = model._inv_freq.values()
    assert table.dtype == torch.float32
    assert model(x, x).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_runs_the_fused_kernels_and_matches_the_references(dtype, monkeypatch):
    """On CUDA the family runs the Triton RMSNorm, rotary, SwiGLU and linear + cross-entropy
    kernels; loss and every gradient equal the same model on the PyTorch references."""
    from models import layers, loss as loss_module

    torch.manual_seed(0)
    model = Llama(tiny(n_embd=256, n_head=4, n_kv_head=2, intermediate_size=512, vocab_size=1000, qk_norm=True,
                       block_size=128)).to("cuda", dtype)
    x = torch.randint(0, 1000, (2, 97), device="cuda")
    results = {}
    for path in ("fused", "reference"):
        if path == "reference":
            monkeypatch.setattr(layers, "_backend", lambda t: "reference")
            fused = ops.linear_cross_entropy
            monkeypatch.setattr(loss_module.ops, "linear_cross_entropy",
                                lambda *a, backend=None, **kw: fused(*a, backend="reference", **kw))
        model.zero_grad(set_to_none=True)
        loss = model(x, x)
        loss.backward()
        results[path] = (loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()})
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(results["fused"][0], results["reference"][0], **tol)
    for name, grad in results["fused"][1].items():
        torch.testing.assert_close(grad.float(), results["reference"][1][name].float(), **tol, msg=name)
