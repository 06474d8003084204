"""The model families, importable as ``parallax.models``: GPT-2 and the Llama-style decoders
(Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM). Models only: no parallelism inside.

    from parallax.models import from_preset
    model = from_preset("llama-tiny")          # or "tiny" (GPT-2), "qwen2.5-0.5b", ...
    loss = model(x, y); logits = model(x)
    model = from_hf("path/to/hf_dir")          # GPT-2, Llama, Mistral, Qwen2, Qwen3 (or a transformers model)
    to_hf(model, "out_dir")                    # loadable by transformers.AutoModelForCausalLM

Every family has the same contract: ``model(idx)`` -> logits (B, T, V), ``model(idx, targets)``
-> scalar loss, ``model(idx, targets, positions=positions)`` the same over a packed batch
(positions restart at 0 at each example; each attends only within itself),
``model.hidden_states(idx, positions)`` and ``model.logits(h)`` (what an inference engine calls), its repeated blocks in one ``nn.ModuleList``, and attention through
``Attention`` layers.
"""

from .attention import ATTENTION_BACKENDS, Attention, forward_context, get_forward_context
from .config import PRESETS, GPTConfig
from .gpt import GPT, MLP, Block, CausalSelfAttention
from .hf import from_hf, read_hf_config, to_hf
from .llama import Llama, LlamaAttention, LlamaDecoderLayer
from .llama_config import LLAMA_PRESETS, MODEL_TYPES, LlamaConfig
from .presets import ALL_PRESETS, ModelConfig, build_model, config_from_dict, config_from_preset, family_of, from_preset

__all__ = ["GPT", "GPTConfig", "PRESETS", "ATTENTION_BACKENDS", "Attention", "Block", "CausalSelfAttention", "MLP",
           "Llama", "LlamaAttention", "LlamaDecoderLayer", "LlamaConfig", "LLAMA_PRESETS", "MODEL_TYPES",
           "ALL_PRESETS", "ModelConfig", "build_model", "config_from_dict", "config_from_preset", "family_of", "from_preset",
           "forward_context", "get_forward_context", "from_hf", "read_hf_config", "to_hf"]
