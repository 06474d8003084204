"""The reference GPT: structure, init, attention backends, tied weights, training, generation."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from parallax.models import GPT, Block, GPTConfig


def small_config(**overrides) -> GPTConfig:
    fields = dict(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    return GPTConfig(**{**fields, **overrides})


def random_ids(config: GPTConfig, B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_parameter_names_follow_nanogpt_and_hf():
    model = GPT(small_config(n_layer=1))
    names = set(model.state_dict())
    block = {
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
        "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
        "mlp.c_proj.weight", "mlp.c_proj.bias",
    }
    top = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
           "transformer.ln_f.bias", "lm_head.weight"}
    assert names == top | {"transformer.h.0." + n for n in block}
    assert isinstance(model.transformer.h, nn.ModuleList)
    assert all(isinstance(b, Block) for b in model.transformer.h)


def test_bias_false_removes_every_bias():
    model = GPT(small_config(bias=False))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    model(random_ids(model.config, 2, 5))


def test_gqa_shrinks_kv_projection():
    config = small_config(n_head=4, n_kv_head=1)
    attn = GPT(config).transformer.h[0].attn
    assert attn.c_attn.weight.shape == (config.n_embd + 2 * config.head_dim, config.n_embd)


def test_gpt2_init():
    torch.manual_seed(0)
    config = small_config(n_layer=3, n_embd=256, vocab_size=512)
    model = GPT(config)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            std = 0.02 / math.sqrt(2 * config.n_layer)
            assert p.std().item() == pytest.approx(std, rel=0.05), name
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 2e-3, name


def test_num_params():
    model = GPT(small_config())
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - model.transformer.wpe.weight.numel()
    # The tied matrix is counted once.
    untied = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert untied - total == model.lm_head.weight.numel()


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(small_config())
    x = random_ids(model.config, 3, 9, seed=1)
    y = random_ids(model.config, 3, 9, seed=2)
    y[0, :4] = -1  # ignored positions
    logits = model(x)
    assert logits.shape == (3, 9, model.config.vocab_size)
    assert logits.dtype == torch.float32
    loss = model(x, y)
    assert loss.shape == ()
    expected = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_model_computes_its_loss_in_fp32(dtype):
    """Logits stay in the model's dtype; the softmax and cross-entropy run in fp32, so the gradient
    of a loss scaled by fp16's default loss scale 2**16 reaches the logits finite."""
    torch.manual_seed(0)
    model = GPT(small_config()).to(dtype)
    x = random_ids(model.config, 3, 9, seed=1)
    y = random_ids(model.config, 3, 9, seed=2)
    logits = model(x)
    assert logits.dtype == dtype
    loss = model(x, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)),
                               atol=1e-6, rtol=1e-6)  # fused linear + cross-entropy: another summation order
    (loss * 2.0**16).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_forward_is_causal():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    x = random_ids(model.config, 2, 12, seed=1)
    x2 = x.clone()
    x2[:, 7:] = random_ids(model.config, 2, 5, seed=2)
    torch.testing.assert_close(model(x)[:, :7], model(x2)[:, :7])


def test_sequence_longer_than_block_size_raises():
    model = GPT(small_config(block_size=8))
    model(random_ids(model.config, 1, 8))
    with pytest.raises(ValueError, match="block_size"):
        model(random_ids(model.config, 1, 9))


def test_idx_must_be_2d():
    model = GPT(small_config())
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 7, 97])
def test_math_and_sdpa_backends_agree(n_kv_head, T):
    torch.manual_seed(T * 10 + n_kv_head)
    config = small_config(block_size=128, n_head=4, n_kv_head=n_kv_head, attention="math")
    math_model = GPT(config)
    sdpa_model = GPT(small_config(block_size=128, n_head=4, n_kv_head=n_kv_head, attention="sdpa"))
    sdpa_model.load_state_dict(math_model.state_dict())
    x = random_ids(config, 2, T, seed=T)
    y = random_ids(config, 2, T, seed=T + 1)

    torch.testing.assert_close(sdpa_model(x), math_model(x), atol=1e-5, rtol=1e-5)
    math_model(x, y).backward()
    sdpa_model(x, y).backward()
    math_grads, sdpa_grads = _grads(math_model), _grads(sdpa_model)
    for name in math_grads:
        torch.testing.assert_close(sdpa_grads[name], math_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_gqa_equals_mha_with_repeated_kv_heads(attention):
    # A KV head serving a group of query heads is the same as every query head in the group
    # having its own copy of that KV head.
    torch.manual_seed(0)
    gqa = GPT(small_config(n_head=4, n_kv_head=2, attention=attention))
    mha = GPT(small_config(n_head=4, attention=attention))
    state = gqa.state_dict()
    C, hs = gqa.config.n_embd, gqa.config.head_dim
    for i in range(gqa.config.n_layer):
        for suffix in ("weight", "bias"):
            key = f"transformer.h.{i}.attn.c_attn.{suffix}"
            q, k, v = state[key].split([C, 2 * hs, 2 * hs])
            k = k.unflatten(0, (2, hs)).repeat_interleave(2, dim=0).flatten(0, 1)
            v = v.unflatten(0, (2, hs)).repeat_interleave(2, dim=0).flatten(0, 1)
            state[key] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    x = random_ids(gqa.config, 2, 11)
    torch.testing.assert_close(mha(x), gqa(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_dropout_active_in_train_mode_only(attention):
    torch.manual_seed(0)
    model = GPT(small_config(dropout=0.5, attention=attention))
    x = random_ids(model.config, 2, 9)
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


def test_tied_weights():
    torch.manual_seed(0)
    model = GPT(small_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    x = random_ids(model.config, 2, 9, seed=1)
    y = random_ids(model.config, 2, 9, seed=2)
    model(x, y).backward()
    tied_grad = model.transformer.wte.weight.grad

    # The same model with the two uses untied: the tied gradient is the sum of theirs.
    untied = copy.deepcopy(model)
    untied.zero_grad(set_to_none=True)
    untied.lm_head.weight = nn.Parameter(untied.transformer.wte.weight.detach().clone())
    untied(x, y).backward()
    embedding_grad = untied.transformer.wte.weight.grad
    head_grad = untied.lm_head.weight.grad
    assert embedding_grad.abs().sum() > 0 and head_grad.abs().sum() > 0
    torch.testing.assert_close(tied_grad, embedding_grad + head_grad)


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_training_reduces_loss(attention):
    torch.manual_seed(0)
    model = GPT(small_config(attention=attention))
    seq = random_ids(model.config, 1, 33, seed=3).repeat(4, 1)  # (4, 33): one sequence, memorised
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(model.config.vocab_size), rel=0.1)
    assert losses[-1] < 0.25 * losses[0], losses
    assert model.lm_head.weight is model.transformer.wte.weight


def test_generate_greedy_is_argmax_of_full_recompute():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    prompt = random_ids(model.config, 3, 5)
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (3, 11)
    assert out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    for t in range(5, 11):
        assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))
    assert torch.equal(model.generate(prompt, 6, temperature=0), out)
    assert torch.equal(model.generate(prompt, 6, top_k=1), out)


def test_generate_sampling_uses_generator():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    prompt = random_ids(model.config, 2, 4)
    a = model.generate(prompt, 8, temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 12)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < model.config.vocab_size


def test_generate_top_k_restricts_choices():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    prompt = random_ids(model.config, 64, 4)
    out = model.generate(prompt, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(0))
    top3 = model(prompt)[:, -1].topk(3).indices  # (64, 3)
    assert (out[:, -1:] == top3).any(dim=1).all()


def test_generate_crops_context_to_block_size():
    torch.manual_seed(0)
    model = GPT(small_config(block_size=8)).eval()
    prompt = random_ids(model.config, 2, 6)
    out = model.generate(prompt, 5, temperature=0)
    assert out.shape == (2, 11)
    assert torch.equal(out[:, -1], model(out[:, -9:-1])[:, -1].argmax(-1))


def test_generate_rejects_bad_arguments():
    model = GPT(small_config()).eval()
    prompt = random_ids(model.config, 1, 3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
