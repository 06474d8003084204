"""from_hf for every family: logits equal transformers' (fp32, 1e-4) from save_pretrained directories
(single file or sharded), from model objects, with both rope config layouts; the weights are read one
tensor at a time; a checkpoint that does not fit is one error naming the tensors and the file."""

import json
import weakref

import pytest
import torch

from parallax.models import GPT, Llama, from_hf
from parallax.models.rope import inv_frequencies
from tests.models.hf_models import (
    KINDS,
    assert_logits_match,
    hf_model,
    load_hf_directory,
)

safetensors_torch = pytest.importorskip("safetensors.torch")


def assert_owns_weights(ours, hf) -> None:
    hf_ptrs = {t.untyped_storage().data_ptr() for t in hf.state_dict().values()}
    assert not hf_ptrs & {p.untyped_storage().data_ptr() for p in ours.parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_from_save_pretrained_directory(tmp_path, kind):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert isinstance(ours, GPT if kind == "gpt2" else Llama)
    assert_logits_match(ours, hf)


@pytest.mark.parametrize("kind", KINDS)
def test_from_model_object(kind):
    hf = hf_model(kind)
    ours = from_hf(hf, attention="math")
    assert ours.config.attention == "math"
    assert_logits_match(ours, hf)
    assert_owns_weights(ours, hf)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_from_base_model_object(kind):
    hf = hf_model(kind, tie_word_embeddings=True)
    assert_logits_match(from_hf(hf.model), hf)  # LlamaModel / Qwen3Model: no "model." prefix, no lm_head


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen3"])
def test_from_sharded_directory(tmp_path, kind):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_logits_match(from_hf(str(tmp_path)), hf)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zipfile", "legacy"])
def test_from_pytorch_model_bin(tmp_path, zipfile):
    hf = hf_model("qwen3")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    assert_logits_match(from_hf(tmp_path), hf)


def test_from_sharded_pytorch_model_bin(tmp_path):
    hf = hf_model("mistral")
    hf.config.save_pretrained(tmp_path)
    state = hf.state_dict()
    halves = {"pytorch_model-00001-of-00002.bin": dict(list(state.items())[:10]),
              "pytorch_model-00002-of-00002.bin": dict(list(state.items())[10:])}
    for file, part in halves.items():
        torch.save(part, tmp_path / file)
    weight_map = {name: file for file, part in halves.items() for name in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_logits_match(from_hf(tmp_path), hf)


def test_config_mapping():
    config = from_hf(hf_model("qwen3_window", attention_dropout=0.1)).config
    assert (config.model_type, config.n_layer, config.n_head, config.n_kv_head, config.n_embd) == ("qwen3", 2, 4, 2, 64)
    assert (config.head_dim, config.intermediate_size, config.block_size, config.vocab_size) == (16, 96, 128, 97)
    assert config.qk_norm and config.tie_word_embeddings and not config.attention_bias
    assert (config.sliding_window, config.dropout, config.rms_norm_eps) == (5, 0.1, 1e-6)
    llama = from_hf(hf_model("llama_bias")).config
    assert llama.attention_bias and llama.attention_out_bias and llama.mlp_bias and not llama.tie_word_embeddings
    qwen2 = from_hf(hf_model("qwen2")).config
    assert qwen2.attention_bias and not qwen2.attention_out_bias and not qwen2.mlp_bias


def test_bf16_checkpoint_gives_a_bf16_model(tmp_path):
    hf = hf_model("qwen2").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    for name, t in hf.state_dict().items():
        if name != "lm_head.weight":  # tied
            assert torch.equal(ours.state_dict()[name], t), name


# ---------------------------------------------------------------------------- both rope config layouts

# A tiny config.json as published Llama 3.2 files have it: top-level rope_theta and rope_scaling,
# torch_dtype, transformers 4.x's fields.
LLAMA32_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": 96, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 97,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}

ROPE_LAYOUTS = {
    "top-level llama3": {},
    "top-level, older 'type' key": {"rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
    "top-level, no scaling": {"rope_scaling": None},
    "rope_parameters llama3": {"rope_parameters": {**LLAMA32_CONFIG["rope_scaling"], "rope_theta": 500000.0}},
    "rope_parameters default": {"rope_parameters": {"rope_type": "default", "rope_theta": 300000.0}},
}


@pytest.mark.parametrize("layout", ROPE_LAYOUTS)
def test_rope_config_layouts(tmp_path, layout):
    hf_config = {**LLAMA32_CONFIG, **ROPE_LAYOUTS[layout]}
    if "rope_parameters" in ROPE_LAYOUTS[layout]:
        del hf_config["rope_theta"], hf_config["rope_scaling"]
    hf_model("llama").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    theirs = load_hf_directory(tmp_path)
    ours = from_hf(tmp_path)
    cfg = ours.config
    # The rotation angles themselves: at 20 positions a wrong scaling of the slow frequencies could hide in 1e-4.
    assert torch.equal(inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), theirs.model.rotary_emb.inv_freq)
    assert_logits_match(ours, theirs)


# ---------------------------------------------------------------------------- lazy reading


class CountingSafeOpen:
    """safetensors' safe_open, recording how many tensors it returned earlier are still alive each
    time a tensor is read."""

    real = safetensors_torch.safe_open
    returned: list = []
    alive_at_reads: list = []

    def __init__(self, *args, **kwargs) -> None:
        self.f = self.real(*args, **kwargs)

    def __enter__(self) -> "CountingSafeOpen":
        self.f.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def get_tensors(self) -> dict[str, torch.Tensor]:  # what safetensors.torch.load_file calls
        return {name: self.get_tensor(name) for name in self.f.keys()}

    def get_tensor(self, name: str) -> torch.Tensor:
        self.alive_at_reads.append(sum(ref() is not None for ref in self.returned))
        tensor = self.f.get_tensor(name)
        self.returned.append(weakref.ref(tensor))
        return tensor


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
@pytest.mark.parametrize("shard_size", ["20KB", "50GB"])
def test_reads_one_source_tensor_at_a_time(tmp_path, monkeypatch, kind, shard_size):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path, max_shard_size=shard_size)
    alive_at_reads: list[int] = []
    monkeypatch.setattr(CountingSafeOpen, "returned", [])
    monkeypatch.setattr(CountingSafeOpen, "alive_at_reads", alive_at_reads)
    monkeypatch.setattr(safetensors_torch, "safe_open", CountingSafeOpen)
    ours = from_hf(tmp_path)
    monkeypatch.undo()
    assert len(alive_at_reads) == len(hf.state_dict()) - 1  # every tensor but the tied LM head
    assert max(alive_at_reads) == 0, f"earlier source tensors were still alive at reads: {alive_at_reads}"
    assert_logits_match(ours, hf)


# ---------------------------------------------------------------------------- checkpoints that do not fit


def saved_tensors(directory) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(directory / "model.safetensors"))


def resave(directory, tensors) -> None:
    safetensors_torch.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    hf_model("mistral").save_pretrained(tmp_path)
    tensors = saved_tensors(tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["lm_head.weight"]
    resave(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"missing tensors: model.layers.1.mlp.up_proj.weight, lm_head.weight") as e:
        from_hf(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_unexpected_tensor_is_named_with_its_file(tmp_path):
    hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    tensors = safetensors_torch.load_file(str(tmp_path / shard))
    tensors["model.layers.5.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    safetensors_torch.save_file(tensors, str(tmp_path / shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"unexpected tensors: model.layers.5.self_attn.q_proj.weight \({shard}\)"):
        from_hf(tmp_path)


def test_wrong_shape_is_named_with_its_file(tmp_path):
    hf_model("qwen2").save_pretrained(tmp_path)
    tensors = saved_tensors(tmp_path)
    tensors["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(31)
    resave(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"wrong shapes: model.layers.0.self_attn.k_proj.bias is \[31\] in "
                                         r"model.safetensors, the model needs \[32\]"):
        from_hf(tmp_path)


def test_gpt2_transposed_weight_shape_is_checked(tmp_path):
    hf_model("gpt2").save_pretrained(tmp_path)
    tensors = saved_tensors(tmp_path)
    tensors["transformer.h.0.mlp.c_fc.weight"] = tensors["transformer.h.0.mlp.c_fc.weight"].t().contiguous()
    resave(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"transformer.h.0.mlp.c_fc.weight is \[256, 64\] in model.safetensors, "
                                         r"the model needs \[64, 256\]"):
        from_hf(tmp_path)


def test_missing_shard_is_named(tmp_path):
    hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        from_hf(tmp_path)


def test_corrupt_file_is_named(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        from_hf(tmp_path)


def test_gpt_from_hf_refuses_another_family(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama' model, not a GPT"):
        GPT.from_hf(tmp_path)


def test_model_object_must_look_like_a_transformers_model():
    with pytest.raises(TypeError, match="from_hf expects a directory or a transformers model"):
        from_hf(torch.nn.Linear(2, 2))
