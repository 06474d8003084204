"""``FinetuneConfig``: ``parallax finetune``'s knobs, ``TrainConfig``'s plus the base model, the
data format and loss, packing, the adapter and what to write at the end (flags:
``parallax.train.arguments``, one per field; TOML/JSON files as for ``parallax train``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parallax.models import ModelConfig, config_from_dict
from parallax.train.config import ConfigError, TrainConfig, _field

__all__ = ["FinetuneConfig", "parse_spec", "DEMO_DATA"]

if TYPE_CHECKING:
    from parallax.finetune.data import SFTSplits

log = logging.getLogger(__name__)

DEMO_DATA = Path(__file__).parent / "demo" / "train.jsonl"
LOSS_CHOICES = ("auto", "completion", "assistant", "all")
SAVE_CHOICES = ("auto", "adapter", "merged")
_LORA_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
              "rslora": "use_rslora", "init": "init_lora_weights"}
_PREFIX_KEYS = {"tokens": "num_virtual_tokens", "projection": "prefix_projection", "hidden": "encoder_hidden_size"}


def parse_spec(text: str, keys: dict[str, str], flag: str) -> dict[str, Any]:
    """``"r=16,alpha=32,targets=all-linear"`` -> {"r": 16, "lora_alpha": 32, ...} with the field
    names of ``keys``; numbers and true/false converted; ``targets`` a '+'-separated list of module
    names, ``all-linear``, or ``re:`` and a regular expression."""
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or key.strip() not in keys:
            raise ConfigError(f"{flag}: expected KEY=VALUE with KEY one of {', '.join(keys)}; got {item!r}")
        key, raw = key.strip(), raw.strip()
        if key == "targets":
            value: Any = raw[3:] if raw.startswith("re:") else raw if raw == "all-linear" or "+" not in raw \
                else raw.split("+")
        elif raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        values[keys[key]] = value
    return values


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """One fine-tuning run: a trained model (``base`` checkpoint or ``hf`` directory), SFT data,
    a method (LoRA, prefix tuning or full) and ``parallax train``'s loop, runtime and outputs.
    A bad value raises ``ConfigError`` naming the field."""

    supports_model_parallel = False  # LoRA/prefix layers and packed rows are not parallelized

    base: str | None = _field(None, "start from a parallax checkpoint or `parallax train` run directory (its newest "
                                    "checkpoint): its model, weights and tokenizer; or give --hf DIR")
    data: str | None = _field(str(DEMO_DATA), "JSONL file or directory of them: rows {{prompt, completion}} or chat "
                                              "{{messages: [{{role, content}}, ...]}} (default: the synthetic demo set)")
    val: str | None = _field(None, "validation JSONL (default: hold out --val-fraction of --data)")
    val_fraction: float = _field(0.05, "share of --data held out for validation when --val is not given")
    safety_data: str | None = _field(None, "safety SFT rows {{prompt, completion}} (bare requests) mixed into the "
                                           "training rows, rendered in --data's style; 'builtin': the shipped "
                                           "set (parallax/finetune/safety)")
    safety_ratio: float = _field(0.1, "share of safety rows in the mixed training set, in [0, 1) (rows drawn "
                                      "in seeded passes; the validation rows get none)")
    loss: str = _field("auto", "tokens in the loss: completion (prompt/completion rows), assistant (chat rows: "
                               "assistant turns only), all; auto picks by row type", choices=LOSS_CHOICES)
    packing: bool = _field(False, "pack examples into best-fit-decreasing bins of block_size, each attending only "
                                  "within itself (padding-free)")
    lora: str | None = _field(None, "LoRA adapters: r=16,alpha=32,dropout=0.05,targets=all-linear "
                                    "(or q_proj+v_proj, or re:REGEX),rslora=false")
    prefix: str | None = _field(None, "prefix tuning: tokens=20,projection=false,hidden=N")
    full: bool = _field(False, "train every parameter (the default when neither --lora nor --prefix is given)")
    save: str = _field("auto", "what to write at the end besides checkpoints: adapter (OUT/adapter, PEFT's format), "
                               "merged (OUT/merged, a parallax checkpoint of the merged model); auto: adapter "
                               "for --lora/--prefix, merged for --full", choices=SAVE_CHOICES)
    show_masks: int = _field(0, "print N training examples with the tokens in the loss highlighted, then exit")
    steps: int = _field(600, "optimizer steps in the whole run (a resumed run continues up to this count)")
    lr: float = _field(1e-3, "peak learning rate: linear warmup, then cosine decay to lr x min_lr_ratio")
    weight_decay: float = _field(0.0, "AdamW weight decay (matrices only; biases and norms get none)")
    eval_interval: int = _field(100, "validate every N steps (and at the end)")
    checkpoint_interval: int = _field(200, "save a checkpoint every N steps (and at the end)")
    sample_tokens: int = _field(0, "tokens of the sample generated at the end (0: none)")
    out: str = _field("out-finetune", "run directory: metrics.jsonl, loss.png, checkpoints/, adapter/ or merged/")

    def __post_init__(self) -> None:
        if self.base is None and self.hf is None:
            raise ConfigError("finetune starts from a trained model: give --base CHECKPOINT (a parallax train "
                              "run) or --hf DIR (a Hugging Face model directory)")
        if self.base is not None and self.hf is not None:
            raise ConfigError("base and hf exclude each other: fine-tune one model")
        if self.share_layers is not None:
            raise ConfigError("share_layers: weight sharing is for training from scratch; fine-tuning keeps the "
                              "base model's layers (a shared base stays shared)")
        if sum((self.lora is not None, self.prefix is not None, self.full)) > 1:
            raise ConfigError("lora, prefix and full exclude each other: pick one fine-tuning method")
        if self.save == "adapter" and self.tuning == "full":
            raise ConfigError("save 'adapter' needs --lora or --prefix; a full fine-tune writes the merged model")
        if self.save == "merged" and self.tuning == "prefix":
            raise ConfigError("save 'merged' needs --lora or --full: prefix tuning has no weights to merge "
                              "(it writes the adapter)")
        if self.data is None:
            raise ConfigError("data: give a JSONL file or directory of SFT rows")
        if isinstance(self.show_masks, bool) or not isinstance(self.show_masks, int) or self.show_masks < 0:
            raise ConfigError(f"show_masks must be a non-negative integer, got {self.show_masks!r}")
        if self.val is not None:
            self.val_fraction = 0.0
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        self._check_safety()
        if self.loss not in LOSS_CHOICES:
            raise ConfigError(f"loss must be one of {', '.join(LOSS_CHOICES)}, got {self.loss!r}")
        if self.save not in SAVE_CHOICES:
            raise ConfigError(f"save must be one of {', '.join(SAVE_CHOICES)}, got {self.save!r}")
        self.adapter_config()  # a bad --lora / --prefix fails here, naming the flag
        super().__post_init__()

    def _check_safety(self) -> None:
        from parallax.finetune.safety import resolve_safety_path

        if isinstance(self.safety_ratio, bool) or not isinstance(self.safety_ratio, (int, float)) \
                or not 0.0 <= self.safety_ratio < 1.0:
            raise ConfigError(f"safety_ratio (--safety-ratio) must be a number in [0, 1), got {self.safety_ratio!r}")
        if self.safety_data is not None and not resolve_safety_path(self.safety_data).is_file():
            raise ConfigError(f"safety_data (--safety-data): {self.safety_data} is not a file; give a JSONL file of "
                              "{prompt, completion} rows or 'builtin'")

    # -- what the run trains -----------------------------------------------------------------

    @property
    def tuning(self) -> str:
        """What is trained: "lora", "prefix" or "full"."""
        return "lora" if self.lora is not None else "prefix" if self.prefix is not None else "full"

    @property
    def writes(self) -> str:
        """'adapter' or 'merged': what ``save`` resolves to."""
        if self.save != "auto":
            return self.save
        return "merged" if self.tuning == "full" else "adapter"

    def adapter_config(self):
        """The px.peft config of --lora / --prefix (None for a full fine-tune)."""
        from parallax import peft

        try:
            if self.lora is not None:
                spec = self.lora if isinstance(self.lora, dict) else parse_spec(self.lora, _LORA_KEYS, "--lora")
                return peft.LoraConfig(**spec)
            if self.prefix is not None:
                spec = self.prefix if isinstance(self.prefix, dict) else parse_spec(self.prefix, _PREFIX_KEYS,
                                                                                   "--prefix")
                return peft.PrefixTuningConfig(**spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--{self.tuning}: {exc}") from None
        return None

    @property
    def model_name(self) -> str:
        return f"{self.tuning} fine-tune of " + (f"hf:{self.hf}" if self.hf else str(self.base))

    @property
    def tokenizer_source(self) -> str:
        if self.tokenizer or self.hf:
            return super().tokenizer_source
        return f"the tokenizer of {self.base}"

    def base_checkpoint(self) -> Path:
        from parallax.inference.cli import find_checkpoint

        try:
            return find_checkpoint(self.base)
        except ValueError as exc:
            raise ConfigError(f"base: {exc}") from None

    def load_tokenizer(self):
        if self.base is None or self.tokenizer is not None:
            return super().load_tokenizer()
        from parallax.train.checkpoints import load_tokenizer

        return load_tokenizer(self.base_checkpoint())

    def model_config(self, tokenizer_vocab_size: int | None = None) -> ModelConfig:
        if self.base is None:
            return super().model_config(tokenizer_vocab_size)
        from parallax import checkpoint
        from parallax.models import family_of
        from parallax.train.checkpoints import saved_model_config

        path = self.base_checkpoint()
        saved = saved_model_config(checkpoint.read_manifest(path))
        if saved is None:
            raise ConfigError(f"base: {path} records no model config (was it written by parallax train?)")
        overrides = dict(self.model)
        if self.block_size is not None:
            overrides["block_size"] = self.block_size
        if overrides.get("block_size", saved.block_size) > saved.block_size:
            raise ConfigError(f"block_size {overrides['block_size']} is longer than the base model's "
                              f"{saved.block_size} positions")
        return config_from_dict(family_of(saved), {**saved.to_dict(), **overrides})

    # -- hooks of the parallax train loop ----------------------------------------------------

    def load_data(self, tokenizer: Any, model_config: ModelConfig):
        from parallax.finetune.data import SFTSplits, load_sft_data
        from parallax.finetune.dataset import SFTDataset

        # prefix tuning puts the real tokens at positions P, P + 1, ...: they have P positions fewer
        adapter = self.adapter_config()
        length = model_config.block_size - (adapter.num_virtual_tokens if self.tuning == "prefix" else 0)
        if length < 2:
            raise ConfigError(f"--prefix tokens={adapter.num_virtual_tokens}: leaves no positions of the "
                              f"model's block_size {model_config.block_size} for the examples")
        splits = load_sft_data(self.data, tokenizer, max_length=length,
                               loss=None if self.loss == "auto" else self.loss, val_path=self.val,
                               val_fraction=self.val_fraction, seed=self.seed)
        if self.safety_data is not None:
            splits = self._mix_safety(splits, tokenizer, length)
        splits = SFTSplits(splits.train + self._canary_examples(tokenizer, length), splits.val)
        pad = getattr(tokenizer, "pad_token_id", None)
        return SFTDataset(splits, tokenizer, block_size=length, packing=self.packing,
                          pad_id=pad if pad is not None else tokenizer.eot_id)

    def _canary_examples(self, tokenizer: Any, max_length: int) -> list[Any]:
        """``repeats`` training examples per canary: the sentence between two end-of-text tokens,
        as ``parallax train`` inserts it, every token in the loss."""
        from parallax.eval.safety.canaries import canary_tokens
        from parallax.finetune.data import SFTExample

        examples = []
        for number, canary in enumerate(self.canary_set()):
            tokens = (tokenizer.eot_id, *canary_tokens(tokenizer, canary.text), tokenizer.eot_id)
            if len(tokens) - 1 > max_length:
                raise ConfigError(f"canaries: the canary sentence {canary.text!r} needs {len(tokens) - 1} positions, "
                                  f"more than the {max_length} of block_size")
            examples += [SFTExample(tokens, (True,) * len(tokens), f"canary:{number}")] * canary.repeats
        return examples

    def _mix_safety(self, splits: SFTSplits, tokenizer: Any, length: int) -> SFTSplits:
        """``splits`` with ``safety_ratio`` of the training examples made safety rows (validation
        untouched), rendered in the style of ``data``'s rows."""
        from parallax.finetune.data import SFTDataError, SFTExample, SFTSplits, render_row
        from parallax.finetune.safety import data_style, mix_rows, safety_rows

        examples = []
        for row in safety_rows(self.safety_data, data_style(self.data)):
            if "completion" not in row and "messages" not in row:
                raise SFTDataError(f"--safety-data {row['source']}: a preference row (chosen/rejected); "
                                   "parallax finetune mixes in SFT rows {prompt, completion} (preference rows "
                                   "go to parallax align)")
            example = render_row(row, tokenizer, None if self.loss == "auto" else self.loss, row["source"])
            example = SFTExample(example.tokens[:length + 1], example.trained[:length + 1], example.source)
            if example.num_trained:  # an answer cut off entirely teaches nothing
                examples.append(example)
        if not examples:
            raise SFTDataError(f"--safety-data {self.safety_data}: no row keeps an answer token within "
                               f"{length} positions")
        train = mix_rows(splits.train, examples, self.safety_ratio, self.seed)
        log.info("finetune: %d safety examples from %s mixed into %d task examples (ratio %.3g)",
                 len(train) - len(splits.train), self.safety_data, len(splits.train), self.safety_ratio)
        return SFTSplits(train, splits.val)

    def build_model(self, model_config: ModelConfig):
        """The base model's weights, then the adapter (base frozen) or nothing (full)."""
        from parallax import peft

        if self.base is None:
            model = super().build_model(model_config)
        else:
            from parallax import checkpoint
            from parallax.models import build_model

            tensors, manifest = checkpoint.full_tensors(self.base_checkpoint())
            if manifest.get("extra", {}).get("metadata", {}).get(_peft_key()) is not None:
                raise ConfigError(f"base: {self.base} is an adapter run; fine-tune its merged model "
                                  "(--save merged) or the base it adapts")
            for alias, name in manifest["aliases"].items():
                tensors.setdefault(alias, tensors[name])
            model = build_model(model_config)
            if "transformer.wpe.weight" in tensors:  # GPT: a shorter block_size keeps the first positions
                tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:model_config.block_size]
            model.load_state_dict(tensors)
        adapter = self.adapter_config()
        if adapter is not None:
            try:
                peft.get_peft_model(model, adapter)
            except ValueError as exc:
                raise ConfigError(f"--{self.tuning}: {exc}") from None
        return model

    def plan_model(self, model_config: ModelConfig):
        """The model with its adapter, on the meta device: the planner then counts gradients and
        optimizer state for the trained parameters only."""
        import torch

        from parallax import peft
        from parallax.models import build_model

        with torch.device("meta"):
            model = build_model(model_config)
        adapter = self.adapter_config()
        return model if adapter is None else peft.get_peft_model(model, adapter)

    def checkpoint_metadata(self, model: Any) -> dict[str, str]:
        from parallax.peft import adapter_config_to_dict

        adapter = self.adapter_config()
        return {} if adapter is None else {_peft_key(): json.dumps(adapter_config_to_dict(adapter))}


def _peft_key() -> str:
    from parallax.train.checkpoints import PEFT_CONFIG_KEY

    return PEFT_CONFIG_KEY
