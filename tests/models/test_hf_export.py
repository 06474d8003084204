"""to_hf: transformers' AutoModelForCausalLM loads every family with all its weights and equal
logits, single file or sharded, tied weights stored once; the directory is replaced atomically."""

import json

import pytest
import torch

from parallax.models import GPT, GPTConfig, Llama, LlamaConfig, from_hf, to_hf
from parallax.models.hf_write import parse_size
from tests.models.hf_models import assert_logits_match, load_hf_directory

safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = dict(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

# One parallax model per HF architecture and feature.
CONFIGS = {
    "gpt2": GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=64),
    "llama": LlamaConfig(model_type="llama", **TINY, rope_theta=500000.0, rope_scaling=LLAMA3,
                         tie_word_embeddings=True),
    "llama_bias": LlamaConfig(model_type="llama", **TINY, attention_bias=True, attention_out_bias=True,
                              mlp_bias=True),
    "mistral": LlamaConfig(model_type="mistral", **TINY, sliding_window=6),
    "qwen2": LlamaConfig(model_type="qwen2", **TINY, attention_bias=True, tie_word_embeddings=True),
    "qwen3": LlamaConfig(model_type="qwen3", **TINY, head_dim=24, qk_norm=True),
    "qwen3_window": LlamaConfig(model_type="qwen3", **TINY, qk_norm=True, sliding_window=5),
}
ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "llama_bias": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "qwen3_window": "Qwen3ForCausalLM"}


def parallax_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised parallax model with every tensor perturbed (norms start at 1, biases at 0)."""
    torch.manual_seed(seed)
    config = CONFIGS[kind]
    model = (GPT if isinstance(config, GPTConfig) else Llama)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_transformers_loads_the_export(tmp_path, kind):
    ours = parallax_model(kind)
    to_hf(ours, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    theirs = load_hf_directory(tmp_path / "out")
    assert type(theirs).__name__ == ARCHITECTURE[kind]
    assert_logits_match(ours, theirs)
    back = from_hf(tmp_path / "out", attention=ours.config.attention)
    assert back.config == ours.config
    assert_same_weights(back, ours)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "mistral"])
def test_sharded_export(tmp_path, kind):
    ours = parallax_model(kind)
    to_hf(ours, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == shards
    assert ("lm_head.weight" in index["weight_map"]) == (kind == "mistral")  # the others tie it
    sizes = {}
    for shard in shards:
        with safetensors_torch.safe_open(str(tmp_path / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes.update({name: f.get_tensor(name).nbytes for name in f.keys()})
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert sizes.keys() == index["weight_map"].keys()
    assert_logits_match(ours, load_hf_directory(tmp_path))
    assert_same_weights(from_hf(tmp_path), ours)


def test_tied_weights_are_stored_once(tmp_path):
    to_hf(parallax_model("llama"), tmp_path)
    with safetensors_torch.safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_bf16_export(tmp_path):
    ours = parallax_model("qwen3").to(torch.bfloat16)
    to_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_weights(from_hf(tmp_path), ours)


def test_gpt2_export_transposes_conv1d_weights(tmp_path):
    ours = parallax_model("gpt2")
    to_hf(ours, tmp_path)
    with safetensors_torch.safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("transformer.h.0.mlp.c_fc.weight")
    assert torch.equal(stored, ours.transformer.h[0].mlp.c_fc.weight.t())


# ---------------------------------------------------------------------------- the directory


def test_replaces_a_model_directory_keeping_its_other_files(tmp_path):
    out = tmp_path / "out"
    to_hf(parallax_model("llama"), out, max_shard_size="20KB")
    (out / "tokenizer.json").write_text('{"model": {}}')
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("kept")
    ours = parallax_model("llama", seed=1)
    to_hf(ours, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "extra", "model.safetensors", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    assert (out / "extra" / "notes.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no backup, no temporary directory left
    assert_same_weights(from_hf(out), ours)


def test_a_failed_export_leaves_the_old_directory_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "out"
    to_hf(parallax_model("qwen2"), out, max_shard_size="20KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = safetensors_torch.save_file
    calls = []

    def save_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors_torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        to_hf(parallax_model("qwen2", seed=1), out, max_shard_size="20KB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_previous_export_killed_between_its_renames(tmp_path):
    # Killed after renaming the old directory to its backup name, before renaming the new one in:
    # the next export takes the other files from the backup and removes it.
    out = tmp_path / "out"
    to_hf(parallax_model("llama"), out)
    (out / "tokenizer_config.json").write_text("{}")
    out.rename(tmp_path / "out.prev")
    to_hf(parallax_model("llama"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "tokenizer_config.json").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no config.json; not replacing it"):
        to_hf(parallax_model("llama"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_refuses_a_model_that_is_not_parallax(tmp_path):
    with pytest.raises(TypeError, match="to_hf expects a parallax GPT or Llama model; got Linear"):
        to_hf(torch.nn.Linear(2, 2), tmp_path)


def test_refuses_tensors_that_are_not_the_full_ones(tmp_path):
    ours = parallax_model("mistral")
    ours.lm_head.weight = torch.nn.Parameter(torch.zeros(97 * 64 // 2))  # e.g. a rank's flat shard
    with pytest.raises(ValueError, match=r"not the full tensors of its config: lm_head.weight: \[3104\] "
                                         r"\(config: \[97, 64\]\)"):
        to_hf(ours, tmp_path)


@pytest.mark.parametrize("size, expected", [(123, 123), ("20KB", 20_000), ("5GB", 5 * 10**9), ("1MiB", 2**20),
                                            ("2gib", 2 * 2**30), ("100B", 100)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", [0, -5, True, 1.5, "5 parsecs", "0GB", "GB", None])
def test_bad_max_shard_size(tmp_path, size):
    with pytest.raises(ValueError, match="max_shard_size"):
        to_hf(parallax_model("llama"), tmp_path, max_shard_size=size)
