"""Tiny randomly initialised transformers models of every family parallax imports (nothing is
downloaded), and the logits comparison the Hugging Face tests share."""

import pytest
import torch

from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB = 97
SEQ = 20  # longer than the sliding windows below, so that they cut

_LLAMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    bos_token_id=1, eos_token_id=2)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# kind -> (transformers config class name, its fields): one per feature each family adds.
HF_CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB,
                                bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", dict(_LLAMA_SHAPE, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama_bias": ("LlamaConfig", dict(_LLAMA_SHAPE, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(_LLAMA_SHAPE, sliding_window=6)),
    "qwen2": ("Qwen2Config", dict(_LLAMA_SHAPE, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_LLAMA_SHAPE, head_dim=24)),
    "qwen3_window": ("Qwen3Config", dict(_LLAMA_SHAPE, head_dim=16, use_sliding_window=True, sliding_window=5,
                                         max_window_layers=0, tie_word_embeddings=True)),
}
KINDS = list(HF_CONFIGS)


def hf_config(kind: str, **overrides):
    class_name, fields = HF_CONFIGS[kind]
    return getattr(transformers, class_name)(**{**fields, **overrides})


def hf_model(kind: str, seed: int = 0, **overrides):
    """A randomly initialised transformers causal LM of ``kind``, eager attention, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind, **overrides),
                                                          attn_implementation="eager").eval()
    # transformers initialises biases to 0 and norms to 1: perturb every tensor so all are checked.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def load_hf_directory(directory):
    """transformers' model from a directory (eager attention), after checking it loaded every weight."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def random_ids(B: int = 3, T: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a parallax or transformers model."""
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out).float()


def assert_logits_match(ours, theirs, atol: float = 1e-4) -> None:
    x = random_ids()
    assert_close(logits(ours, x), logits(theirs, x), atol=atol, rtol=1e-4, name="logits")
