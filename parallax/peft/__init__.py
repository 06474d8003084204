"""Parameter-efficient fine-tuning with Hugging Face PEFT's semantics and file format.

    cfg = px.peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    model = px.peft.get_peft_model(model, cfg)      # in place; only the adapters train
    model.save_adapter("out")                       # adapter_config.json + adapter_model.safetensors
    model = model.merge_and_unload()                # plain nn.Linear layers again
    px.peft.load_adapter(model, "out")              # a PEFT-format adapter directory (LoRA or prefix)

    model = px.peft.get_peft_model(model, px.peft.PrefixTuningConfig(num_virtual_tokens=20))  # prefix tuning
"""

from .config import LoraConfig
from .lora import LoraLinear
from .model import (PeftModelMixin, PrefixModelMixin, adapter_config_from_dict, adapter_config_to_dict,
                    adapter_state_dict, get_peft_model, load_adapter)
from .prefix import PrefixTuningConfig

__all__ = ["LoraConfig", "LoraLinear", "PeftModelMixin", "PrefixModelMixin", "PrefixTuningConfig",
           "adapter_config_from_dict", "adapter_config_to_dict", "adapter_state_dict", "get_peft_model", "load_adapter"]
