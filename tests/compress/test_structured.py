"""px.compress.prune(method="structured"): whole MLP channels (and Llama key/value head groups with
their query heads) are removed. The pruned model's outputs equal the original's with the removed
channels' / heads' output-projection columns zeroed; the removed ones are the least important
(||W_down[:, j]|| * ||X_j|| over the calibration tokens); the model is smaller, its config rebuilds it
(build_model, to_hf -> transformers) and it serves through the paged engine with greedy tokens
equal to its own cache-free generation; a training checkpoint reloads it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from parallax import compress
from parallax.inference import LLM, SamplingParams
from parallax.models import GPT, GPTConfig, Llama, LlamaConfig, build_model, to_hf
from parallax.train.checkpoints import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

VOCAB = 97
# family -> (config, targets); the Qwen2 model has GQA (4 heads, 2 KV heads) and q/k/v biases.
CASES = {
    "gpt2": (GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32), ("mlp",)),
    "qwen2": (LlamaConfig(model_type="qwen2", block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=64, intermediate_size=48, attention_bias=True, tie_word_embeddings=True),
              ("mlp", "heads")),
    # 3 heads left must divide n_embd: transformers' LlamaConfig (not Qwen2's) checks it
    "llama": (LlamaConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, n_embd=48, head_dim=16,
                          intermediate_size=40), ("heads",)),
}
# (output projection of the MLP, of attention) per family
OUT_PROJ = {GPT: ("mlp.c_proj", "attn.c_proj"), Llama: ("mlp.down_proj", "self_attn.o_proj")}


def build(family: str) -> nn.Module:
    """A random model whose greedy choices do not hinge on rounding (scaled-up projections)."""
    torch.manual_seed(0)
    config, _ = CASES[family]
    model = GPT(config) if isinstance(config, GPTConfig) else Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                p.mul_(20)
    return model.eval()


def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h if isinstance(model, GPT) else model.model.layers


def kept_columns(original: nn.Linear, pruned: nn.Linear) -> torch.Tensor:
    """Which input columns of ``original`` survive in ``pruned`` (found by value)."""
    same = (original.weight.T[None] == pruned.weight.T[:, None]).all(dim=-1)  # (kept, in)
    assert (same.sum(dim=1) == 1).all()
    return same.nonzero()[:, 1]


def masked_copy(original: nn.Module, pruned: nn.Module) -> nn.Module:
    """``original`` with the output-projection columns of what ``pruned`` lost zeroed."""
    masked = copy.deepcopy(original)
    for block, kept_block in zip(blocks(masked), blocks(pruned)):
        for name in OUT_PROJ[type(original)]:
            weight = block.get_submodule(name).weight
            removed = torch.ones(weight.shape[1], dtype=torch.bool)
            removed[kept_columns(block.get_submodule(name), kept_block.get_submodule(name))] = False
            with torch.no_grad():
                weight[:, removed] = 0
    return masked


@pytest.fixture(scope="module", params=list(CASES))
def pruned_pair(request) -> tuple[nn.Module, nn.Module]:
    original = build(request.param)
    pruned = compress.prune(copy.deepcopy(original), 0.25, "structured", calib(), targets=CASES[request.param][1],
                            round_to=1)
    return original, pruned


def test_outputs_equal_the_masked_original(pruned_pair):
    original, pruned = pruned_pair
    x = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_copy(original, pruned)(x), rtol=1e-5, atol=1e-5)


def test_the_model_and_config_shrink_by_the_requested_counts(pruned_pair):
    original, pruned = pruned_pair
    assert pruned.num_params() < original.num_params()
    config, old = pruned.config, original.config
    if isinstance(pruned, GPT):
        assert (config.n_inner, config.mlp_width) == (96, 96)  # 128 channels, 25% removed
        return
    mlp_kept = 36 if old.model_type == "qwen2" else old.intermediate_size
    assert config.intermediate_size == mlp_kept
    assert (config.n_head, config.n_kv_head, config.head_dim) == ((2, 1, 16) if old.kv_heads == 2 else (3, 3, 16))
    assert blocks(pruned)[0].self_attn.q_proj.out_features == config.n_head * 16


def test_each_layer_removes_its_least_important_channels():
    model, tokens = build("gpt2"), calib()
    inputs = []
    hooks = [b.mlp.c_proj.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in blocks(model)]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    pruned = compress.prune(copy.deepcopy(model), 0.5, "structured", tokens)
    for block, kept_block, x in zip(blocks(model), blocks(pruned), inputs):
        score = block.mlp.c_proj.weight.norm(dim=0) * x.reshape(-1, x.shape[-1]).norm(dim=0)  # (128,)
        kept = torch.zeros_like(score, dtype=torch.bool)
        kept[kept_columns(block.mlp.c_proj, kept_block.mlp.c_proj)] = True
        assert int(kept.sum()) == 64 and score[kept].min() > score[~kept].max()
    kept_per_layer = [kept_columns(b.mlp.c_proj, k.mlp.c_proj) for b, k in zip(blocks(model), blocks(pruned))]
    assert not torch.equal(*kept_per_layer)  # each layer chooses its own


def test_config_rebuilds_the_pruned_model(pruned_pair, tmp_path):
    _, pruned = pruned_pair
    rebuilt = build_model(pruned.config)
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), pruned(x), rtol=0, atol=0)


def test_a_training_checkpoint_reloads_the_pruned_model(pruned_pair, tmp_path):
    _, pruned = pruned_pair
    saved = copy.deepcopy(pruned)  # save_model wraps the model it writes (ZeRO stage 0)
    save_model(tmp_path / "ckpt", saved, step=1, model_config=saved.config, tokenizer={"kind": "byte"})
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == pruned.config
    x = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), pruned(x), rtol=0, atol=0)


def test_to_hf_round_trips_through_transformers(pruned_pair, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, pruned = pruned_pair
    to_hf(pruned, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, pruned(x), rtol=1e-4, atol=1e-4)


def test_serves_through_the_paged_engine(pruned_pair):
    _, pruned = pruned_pair
    prompt = torch.randint(0, VOCAB, (9,)).tolist()
    served = LLM(pruned, block_size=16, num_blocks=8).generate(prompt, SamplingParams(max_tokens=12, temperature=0))
    recomputed = pruned.generate(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    assert served[0].token_ids == recomputed


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=("heads",)), "heads.*GPT"),
    (dict(targets="mlp"), "targets"),
    (dict(targets=("mlp", "layers")), "targets"),
    (dict(sparsity=0.01), "sparsity.*keeps"),
    (dict(filter_fn=lambda m, fqn: True), "filter_fn"),
    (dict(round_to=0), "round_to"),
    (dict(scope="global"), "scope"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress.prune(build("gpt2"), **{"sparsity": 0.25, "method": "structured", "calib": calib(), **kwargs})


def test_heads_need_one_group_removed_and_one_kept():
    with pytest.raises(ValueError, match="sparsity.*head groups"):
        compress.prune(build("qwen2"), 0.2, "structured", calib(), targets=("heads",))


def test_a_model_of_no_known_family_is_an_error():
    with pytest.raises(ValueError, match="GPT or Llama"):
        compress.prune(nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8)), 0.5, "structured", calib())
