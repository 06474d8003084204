"""The evaluation tests' model: a tiny random-initialised transformers Llama with a Llama 3 style
tokenizer (BOS added by its post-processor), saved as a Hugging Face directory (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from parallax.data import load_tokenizer
from tests.data.tokenizer_dirs import write_style


def write_tiny_llama(path: Path, *, layers: int = 2, positions: int = 64, seed: int = 0) -> Path:
    import transformers

    write_style(path, "llama3")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=load_tokenizer(path).vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=True))
    hf.save_pretrained(path)
    return path
