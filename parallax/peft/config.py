"""``LoraConfig``: Hugging Face PEFT's LoRA fields, validated, and their ``adapter_config.json`` form."""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ALL_LINEAR = "all-linear"
INIT_CHOICES = (True, False, "gaussian")
BIAS_CHOICES = ("none",)
PEFT_TYPE = "LORA"
TASK_TYPE = "CAUSAL_LM"

# adapter_config.json fields whose non-default values change what PEFT computes and that parallax
# does not implement: loading such a file is refused by name rather than computing something else.
_UNSUPPORTED_PEFT_FIELDS: dict[str, Any] = {
    "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
    "layers_pattern": None, "layer_replication": None, "modules_to_save": None, "exclude_modules": None,
    "target_parameters": None, "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
}


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA hyper-parameters with PEFT's names and meanings.

    r: the rank of the update B @ A (A is (r, in), B is (out, r)).
    lora_alpha: the update is scaled by lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
    lora_dropout: dropout probability on the input of A (training only).
    target_modules: ``"all-linear"`` (every nn.Linear except the output head), a list of module
        names each matching a module whose dotted name equals it or ends with ``"." + name``, or
        one regular expression string that must match a module's full dotted name.
    init_lora_weights: True (A Kaiming-uniform with a=sqrt(5), B zero: the model starts
        unchanged), "gaussian" (A normal with std 1/r, B zero) or False (nn.Linear's default init
        for both: a random non-zero update, for tests).
    bias: "none" (no bias is trained; the only value implemented).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | list[str] = ALL_LINEAR
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer (the LoRA rank); got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a positive finite number; got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be a probability in [0, 1); got {self.lora_dropout!r}")
        self.target_modules = _checked_targets(self.target_modules)
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be True or False; got {self.use_rslora!r}")
        if not _valid_init(self.init_lora_weights):
            raise ValueError(f"LoraConfig.init_lora_weights must be one of {list(INIT_CHOICES)}; "
                             f"got {self.init_lora_weights!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoraConfig.bias must be one of {list(BIAS_CHOICES)}; got {self.bias!r}")

    @property
    def scaling(self) -> float:
        """The factor of the update: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def to_peft_dict(self, target_modules: list[str], base_model_name_or_path: str | None,
                     fan_in_fan_out: bool) -> dict[str, Any]:
        """The adapter_config.json fields PEFT reads, with target_modules resolved as PEFT saves
        them ("all-linear" becomes the full names of the modules it matched)."""
        saved_targets = sorted(target_modules) if self.all_linear else self.target_modules
        return {
            "peft_type": PEFT_TYPE, "task_type": TASK_TYPE, "base_model_name_or_path": base_model_name_or_path,
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": saved_targets, "use_rslora": self.use_rslora, "bias": self.bias,
            "init_lora_weights": self.init_lora_weights, "fan_in_fan_out": fan_in_fan_out,
            "inference_mode": True, "revision": None, **_UNSUPPORTED_PEFT_FIELDS,
        }

    @classmethod
    def from_peft_dict(cls, fields: Mapping[str, Any], where: str) -> "LoraConfig":
        """The config of a PEFT adapter_config.json (``where`` names the file in errors);
        ValueError naming a field whose value parallax does not implement."""
        peft_type = fields.get("peft_type")
        if peft_type != PEFT_TYPE:
            raise ValueError(f"{where}: peft_type is {peft_type!r}; px.peft.load_adapter reads {PEFT_TYPE!r} adapters")
        for name, default in _UNSUPPORTED_PEFT_FIELDS.items():
            value = fields.get(name, default)
            if value not in (default, None, {}, [], False):
                raise ValueError(f"{where}: {name}={value!r} is not supported by parallax's LoRA "
                                 f"(supported: {default!r})")
        known = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None, "use_rslora": False,
                 "bias": "none"}
        values = {name: fields.get(name, default) for name, default in known.items()}
        if values["target_modules"] is None:
            raise ValueError(f"{where}: target_modules is missing; parallax needs the adapted module names")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def _valid_init(init: Any) -> bool:
    return init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")


def _checked_targets(targets: Any) -> str | list[str]:
    if isinstance(targets, str):
        if not targets:
            raise ValueError("LoraConfig.target_modules must not be empty; use \"all-linear\", a list of module "
                             "names or a regular expression")
        return targets
    if isinstance(targets, (list, tuple, set, frozenset)) and targets \
            and all(isinstance(t, str) and t for t in targets):
        return sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
    raise ValueError("LoraConfig.target_modules must be \"all-linear\", a non-empty list of module names or a "
                     f"regular expression string; got {targets!r}")
