"""GPT.from_hf: logits match transformers' GPT-2, from an object or a save_pretrained directory."""

import json
import sys

import pytest
import torch

from parallax.models import GPT, to_hf
from parallax.models.hf_gpt2 import config_from_hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB = 97


def hf_gpt2(seed: int = 0, **config_overrides) -> "transformers.GPT2LMHeadModel":
    """A randomly initialised HF GPT-2 (nothing downloaded), in eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager", **config_overrides,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    # HF initialises biases to 0 and LayerNorm to 1; perturb every tensor so all of them are checked.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_logits_match(ours: GPT, hf, T: int = 37) -> None:
    x = random_ids(3, T)
    with torch.no_grad():
        expected = hf(x).logits
        actual = ours.eval()(x)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def assert_owns_weights(ours: GPT, hf) -> None:
    hf_ptrs = {t.untyped_storage().data_ptr() for t in hf.state_dict().values()}
    our_ptrs = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    assert not hf_ptrs & our_ptrs
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(1.0)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_from_model_object(attention):
    hf = hf_gpt2()
    ours = GPT.from_hf(hf, attention=attention)
    assert ours.config.attention == attention
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert_logits_match(ours, hf)
    assert_owns_weights(ours, hf)


def test_from_base_model_object():
    hf = hf_gpt2()
    ours = GPT.from_hf(hf.transformer)  # GPT2Model: no "transformer." prefix, no lm_head
    assert_logits_match(ours, hf)


def test_from_save_pretrained_directory_without_transformers(tmp_path, monkeypatch):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # the directory path must not need it
    ours = GPT.from_hf(tmp_path)
    monkeypatch.undo()
    assert_logits_match(ours, hf)
    assert_owns_weights(ours, hf)


def test_from_hub_layout_directory(tmp_path):
    # The hub's openai-community/gpt2 checkpoint: GPT2Model names (no "transformer." prefix),
    # no lm_head, and the causal-mask buffers that older transformers versions saved.
    from safetensors.torch import save_file

    hf = hf_gpt2()
    hf.config.to_json_file(tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in hf.transformer.state_dict().items()}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(tmp_path / "model.safetensors"))
    assert_logits_match(GPT.from_hf(tmp_path), hf)


def test_from_sharded_directory(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_logits_match(GPT.from_hf(str(tmp_path)), hf)


def test_from_pytorch_model_bin_directory(tmp_path):
    hf = hf_gpt2()
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert_logits_match(GPT.from_hf(tmp_path), hf)


def test_directory_without_weights(tmp_path):
    hf_gpt2().config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_hf(tmp_path)


def test_config_mapping():
    hf = hf_gpt2(layer_norm_epsilon=1e-6, embd_pdrop=0.2, attn_pdrop=0.2, resid_pdrop=0.2)
    config = GPT.from_hf(hf).config
    assert (config.block_size, config.vocab_size) == (64, VOCAB)
    assert (config.n_layer, config.n_head, config.n_embd) == (2, 4, 64)
    assert config.n_kv_head is None and config.bias
    assert config.layer_norm_eps == 1e-6
    assert config.dropout == 0.2
    assert_logits_match(GPT.from_hf(hf), hf)


def test_differing_dropouts_need_an_override():
    hf_config = json.loads(hf_gpt2(attn_pdrop=0.0).config.to_json_string())
    with pytest.raises(ValueError, match="dropout"):
        config_from_hf(hf_config)
    assert config_from_hf(hf_config, dropout=0.05).dropout == 0.05


@pytest.mark.parametrize(
    "field, value",
    [
        ("activation_function", "relu"),
        ("tie_word_embeddings", False),
        ("scale_attn_by_inverse_layer_idx", True),
        ("scale_attn_weights", False),
        ("model_type", "llama"),
    ],
)
def test_unsupported_hf_config_raises(field, value):
    hf_config = json.loads(hf_gpt2().config.to_json_string())
    hf_config[field] = value
    with pytest.raises(ValueError, match=field):
        config_from_hf(hf_config)


def test_mlp_width_n_inner_imports_and_exports(tmp_path):
    """A GPT-2 whose MLP is not 4 * n_embd wide (HF's n_inner; what structured pruning leaves)."""
    hf = hf_gpt2(n_inner=100)
    ours = GPT.from_hf(hf)
    assert ours.config.n_inner == 100 and ours.transformer.h[0].mlp.c_fc.out_features == 100
    assert_logits_match(ours, hf)
    to_hf(ours, tmp_path)
    assert_logits_match(ours, transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval())
    assert GPT.from_hf(hf_gpt2(n_inner=256)).config.n_inner is None  # 4 * n_embd is the default width


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"])
def test_tanh_gelu_variants_match(activation):
    hf = hf_gpt2(activation_function=activation)
    assert_logits_match(GPT.from_hf(hf), hf)
