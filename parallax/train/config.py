"""``TrainConfig``: every knob of ``parallax train``, validated, loadable from TOML/JSON (its flags:
``parallax.train.arguments``)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from parallax.models import ModelConfig, config_from_preset, read_hf_config
from parallax.runtime_config import RuntimeConfig

__all__ = ["ConfigError", "TrainConfig", "load_config_file"]

DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("gpipe", "1f1b", "interleaved")


class ConfigError(ValueError):
    """A training configuration value or file that cannot be used; the message names it."""


def _field(default: Any, help: str, **kw: Any) -> Any:
    """A TrainConfig field whose ``help`` is its documentation and its ``--flag``'s help text."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(kw_only=True)
class TrainConfig:
    """Configuration of one training run; each field's ``help`` (``parallax train --help``) says
    what it does. A bad value raises ``ConfigError`` naming the field."""

    preset: str = _field("tiny", "model preset, random init ({presets}); --model overrides its fields")
    hf: str | None = _field(None, "start from a Hugging Face model directory (config.json + safetensors: GPT-2, "
                                  "Llama, Mistral, Qwen2, Qwen3) instead of --preset, with its tokenizer unless "
                                  "--tokenizer is given; --model overrides config fields such as attention")
    model: dict[str, Any] = _field({}, "override a model config field, e.g. --model n_layer=2 (repeatable)")
    share_layers: int | None = _field(None, "cross-layer weight sharing (ALBERT), training from scratch: every K "
                                            "consecutive blocks share one set of weights (n_layer must be a "
                                            "multiple of K); the model config's share_layers")
    tokenizer: str | None = _field(None, "byte (UTF-8 bytes, 257 ids) or a tokenizer directory (tokenizer.json + "
                                         "tokenizer_config.json, e.g. from `parallax tokenizer train`); default: "
                                         "the --hf directory, else byte. A preset's vocab_size is the tokenizer's "
                                         "unless --model vocab_size=N is given")
    data: str | None = _field(None, "a .txt / .jsonl file or a directory of them (default: the built-in corpus, "
                                    "CPython's documentation text)")
    val_fraction: float = _field(0.1, "share of the data held out for validation")
    steps: int = _field(1500, "optimizer steps in the whole run (a resumed run continues up to this count)")
    batch_size: int = _field(16, "sequences per micro-batch per process; the global batch is batch_size x "
                                 "grad_accum x nproc")
    grad_accum: int = _field(1, "micro-batches per optimizer step (gradient accumulation; gradients sync once, "
                                "on the last)")
    block_size: int | None = _field(None, "tokens per sequence (default: the preset's context length)")
    lr: float = _field(2e-3, "peak learning rate: linear warmup, then cosine decay to lr x min_lr_ratio")
    min_lr_ratio: float = _field(0.1, "final learning rate as a share of lr, in [0, 1]")
    warmup_steps: int = _field(20, "steps of linear learning-rate warmup")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only; biases and norms get none)")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this (0: no clipping)")
    eval_interval: int = _field(250, "validate every N steps (and at the end)")
    eval_batches: int = _field(16, "batches of the fixed validation set per evaluation")
    log_interval: int = _field(10, "log loss and tokens/s every N steps")
    checkpoint_interval: int = _field(500, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _field(2, "keep the newest N checkpoints")
    sample_tokens: int = _field(200, "tokens of the sample generated at the end (0: none)")
    out: str = _field("out", "run directory: metrics.jsonl, loss.png, checkpoints/")
    resume: bool = _field(False, "continue from the newest checkpoint in --out")
    overwrite: bool = _field(False, "replace a previous run in --out")
    nproc: int = _field(1, "processes on this node (relaunched under torchrun; gloo on CPU, NCCL on GPU)")
    nnodes: int = _field(1, "nodes of a multi-node run: start `parallax train ... --nnodes N --node-rank R "
                            "--master-addr HOST` on each (torchrun's static rendezvous); world size nnodes x nproc")
    node_rank: int = _field(0, "this node's index in a multi-node run, 0 .. nnodes-1")
    master_addr: str = _field("127.0.0.1", "address of node 0 (the rendezvous host) in a multi-node run")
    master_port: int = _field(29500, "TCP port of the rendezvous on the master address")
    tp: int = _field(1, "tensor-parallel degree: each layer's matrices split over tp ranks (within a node); "
                        "heads, KV heads and the vocabulary must divide by it")
    pp: int = _field(1, "pipeline-parallel degree: the blocks split into pp stages (across nodes); n_layer must "
                        "divide by pp x virtual_stages")
    micro_batches: int = _field(1, "pipeline micro-batches per batch (--pp > 1): batch_size must divide by it; "
                                   "the bubble is (pp-1)/(micro_batches+pp-1)")
    schedule: str = _field("1f1b", "pipeline schedule: gpipe, 1f1b or interleaved (1F1B over virtual stages)",
                           choices=("gpipe", "1f1b", "interleaved"))
    virtual_stages: int = _field(1, "model chunks per pipeline rank (the interleaved schedule; 2 or more)")
    sequence_parallel: bool = _field(False, "with --tp: split the norms' and dropouts' activations along the "
                                            "sequence (reduce-scatter / all-gather instead of all-reduce)")
    zero_stage: int = _field(0, "ZeRO stage: 0 gradient all-reduce; 1 + sharded optimizer state; 2 + sharded "
                                "gradients; 3 + sharded parameters", choices=(0, 1, 2, 3))
    bucket_mb: float = _field(25.0, "gradient bucket size in MB (stages 0-2)")
    prefetch: int = _field(1, "stage 3: units gathered ahead of use")
    timeout_s: float = _field(600.0, "every collective fails with a clear error after this many seconds")
    precision: str = _field("fp32", "parameters, compute and communication dtype (bf16/fp16 keep fp32 master "
                                    "weights; fp16 adds dynamic loss scaling)", choices=("fp32", "bf16", "fp16"))
    offload: str = _field("none", "cpu: fp32 master weights and Adam moments in pinned host memory, stepped by "
                                  "the C++ AdamW (stages 1-3)", choices=("none", "cpu"))
    activation_checkpointing: str = _field("off", "recompute activations in backward: off, block (every repeated "
                                                  "block) or every_n:K")
    plan: str = _field("off", "a device memory size (16GB, 80GiB) or auto: the memory planner picks the fastest "
                              "zero_stage / precision / offload / activation_checkpointing that fits (those given "
                              "explicitly are kept); off")
    seed: int = _field(1337, "seed of initialisation, data order and dropout")
    canaries: int = _field(0, "privacy canaries (The Secret Sharer): N random secrets 'my PIN is 4 8 1 9 2 7' per "
                              "--canary-repeats count, inserted into the training split only and written to "
                              "OUT/canaries.json (measure with python -m parallax.eval.safety.canaries); 0: none")
    canary_repeats: str = _field("1,4,16", "how many times each canary is inserted: comma-separated counts, N "
                                           "canaries for each")
    canary_digits: int = _field(6, "digits of each canary's secret (10^digits candidates)")
    device: str = _field("auto", "auto: cuda when available, else cpu", choices=DEVICES)

    # Tensor/pipeline parallelism parallelize the model families' own modules and loss; a config
    # that adds adapters or another loss sets this False (its --tp/--pp is refused).
    supports_model_parallel: ClassVar[bool] = True

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval",
                    "checkpoint_interval", "keep_checkpoints", "nproc", "nnodes", "master_port", "tp", "pp",
                    "micro_batches", "virtual_stages")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "sample_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size <= 0):
            raise ConfigError(f"block_size must be a positive integer or unset, got {self.block_size!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        self._check_canaries()
        self._check_mesh()
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: continue the run or replace it")
        if self.plan not in ("off", "auto"):
            from parallax.planner import parse_bytes

            try:
                parse_bytes(self.plan, "plan")
            except ValueError as exc:
                raise ConfigError(f"{exc}; or 'auto' (this machine's memory), or 'off'") from None
        if not isinstance(self.model, dict):
            raise ConfigError(f"model must be a table of model config fields, got {self.model!r}")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise ConfigError(f"tokenizer must be 'byte' or a tokenizer directory, got {self.tokenizer!r}")
        if self.hf is not None and (not isinstance(self.hf, str) or not self.hf):
            raise ConfigError(f"hf must be a Hugging Face model directory, got {self.hf!r}")
        if (self.share_layers is not None or self.model.get("share_layers", 1) != 1) and self.hf is not None:
            raise ConfigError("share_layers: weight sharing is for training from scratch (a --preset); the layers "
                              f"of --hf {self.hf} hold different weights")
        try:
            self.model_config()
            self.runtime_config()
        except (ValueError, OSError) as exc:
            raise ConfigError(str(exc)) from None

    def _check_mesh(self) -> None:
        """The launch and mesh fields on their own (sizes against the model:
        ``parallax.train.parallelism.check_model_parallel``)."""
        if self.model_parallel and not self.supports_model_parallel:
            raise ConfigError(f"tp/pp: tensor and pipeline parallelism are for `parallax train`; `{self.command}` "
                              "adds adapters, packed rows or another loss, which they do not split (use --nproc "
                              "with --zero-stage for data parallelism)")
        if isinstance(self.node_rank, bool) or not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank must be in 0 .. nnodes-1 = {self.nnodes - 1}, got {self.node_rank!r}")
        if not isinstance(self.master_addr, str) or not self.master_addr:
            raise ConfigError(f"master_addr must be a host name or address, got {self.master_addr!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        world = self.world_size
        if world % (self.tp * self.pp):
            raise ConfigError(f"the mesh tp={self.tp} x pp={self.pp} = {self.tp * self.pp} ranks does not divide the "
                              f"world size nnodes x nproc = {world}")
        if self.pp == 1 and (self.micro_batches != 1 or self.schedule == "interleaved" or self.virtual_stages != 1):
            raise ConfigError("micro_batches, schedule interleaved and virtual_stages are pipeline settings: "
                              "they need --pp 2 or more")
        if self.batch_size % self.micro_batches:
            raise ConfigError(f"micro_batches {self.micro_batches} must divide batch_size {self.batch_size} "
                              "(each micro-batch has batch_size / micro_batches sequences)")
        if (self.schedule == "interleaved") != (self.virtual_stages > 1):
            raise ConfigError(f"schedule {self.schedule!r} with virtual_stages {self.virtual_stages}: the interleaved "
                              "schedule runs 2 or more virtual stages per rank, the others 1")
        if self.pp > 1 and self.grad_accum != 1:
            raise ConfigError("grad_accum: with --pp the pipeline's micro-batches accumulate the gradients; "
                              "use --micro-batches instead")
        if self.pp > 1 and self.zero_stage == 3:
            raise ConfigError("zero_stage 3 does not compose with --pp (each micro-batch would re-gather every "
                              "stage's parameters); use zero_stage 1 or 2 with pipeline parallelism")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("sequence_parallel splits the activations over the tensor-parallel ranks: it needs --tp 2 or more")

    @property
    def world_size(self) -> int:
        """Ranks of the run: torchrun's WORLD_SIZE inside a rank (the launch flags stay with the
        parent), else nnodes x nproc."""
        return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else self.nnodes * self.nproc

    @property
    def command(self) -> str:
        """The CLI command of this config class, for messages (``FinetuneConfig`` -> finetune)."""
        return type(self).__name__.removesuffix("Config").lower()

    @property
    def model_parallel(self) -> bool:
        """Tensor or pipeline parallelism is on (the mesh has tp or pp > 1)."""
        return self.tp > 1 or self.pp > 1

    def _check_canaries(self) -> None:
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) or self.canaries < 0:
            raise ConfigError(f"canaries must be a non-negative integer, got {self.canaries!r}")
        try:
            self.canary_set()
        except ValueError as exc:
            raise ConfigError(f"canaries: {exc}") from None

    def canary_set(self) -> list[Any]:
        """The run's canaries (``parallax.eval.safety.canaries.Canary``), drawn from ``seed``: the
        same for every process and on resume; empty when ``canaries`` is 0."""
        from parallax.eval.safety.canaries import make_canaries, parse_repeats

        repeats = parse_repeats(self.canary_repeats, "canary_repeats")
        return make_canaries(self.canaries, repeats, self.seed, self.canary_digits) if self.canaries else []

    @property
    def model_name(self) -> str:
        """What the run trains, for logs: the preset or the Hugging Face directory."""
        return self.preset if self.hf is None else f"hf:{self.hf}"

    @property
    def tokenizer_source(self) -> str:
        """The tokenizer to load: --tokenizer, else the --hf directory, else 'byte'."""
        return self.tokenizer or self.hf or "byte"

    def model_config(self, tokenizer_vocab_size: int | None = None) -> ModelConfig:
        """The model's config: the preset (or the --hf directory's), then ``model`` overrides,
        then ``block_size``.

        With ``tokenizer_vocab_size`` (the tokenizer's ``vocab_size``), a preset's ``vocab_size``
        is that, unless ``model`` sets one; the model's vocabulary must cover the tokenizer's
        (ConfigError naming both).
        """
        overrides = dict(self.model)
        if self.block_size is not None:
            overrides["block_size"] = self.block_size
        if self.share_layers is not None:
            overrides["share_layers"] = self.share_layers
        if self.hf is not None:
            config = read_hf_config(self.hf, **overrides)
            where = f"the model of --hf {self.hf}"
        else:
            if tokenizer_vocab_size is not None:
                overrides.setdefault("vocab_size", tokenizer_vocab_size)
            config = config_from_preset(self.preset, **overrides)
            where = "--model vocab_size"
        if tokenizer_vocab_size is not None and config.vocab_size < tokenizer_vocab_size:
            raise ConfigError(f"model vocab_size {config.vocab_size} ({where}) is smaller than the vocabulary of the "
                              f"tokenizer {self.tokenizer_source} ({tokenizer_vocab_size} ids); "
                              + ("use the model's tokenizer" if self.hf else
                                 "raise it or leave it unset to take the tokenizer's"))
        return config

    def load_tokenizer(self):
        """The run's tokenizer (``parallax.data.load_tokenizer(self.tokenizer_source)``); TokenizerError if unusable."""
        from parallax.data import load_tokenizer

        return load_tokenizer(self.tokenizer_source)

    def load_data(self, tokenizer: Any, model_config: ModelConfig) -> Any:
        """The run's dataset: ``get_batch``, ``iter_eval_batches`` (tuples of model arguments),
        ``check_block_size``, ``content_hash``, ``tokenizer`` (``parallax.data.TokenDataset``); the
        canaries, if any, inserted into its training split."""
        from parallax.data import load_dataset

        insert = [(c.text, c.repeats) for c in self.canary_set()]
        return load_dataset(self.data, tokenizer=tokenizer, val_fraction=self.val_fraction, insert=insert,
                            insert_seed=self.seed)

    def build_model(self, model_config: ModelConfig) -> Any:
        """The model before ``px.initialize``: a random initialisation of the preset, or the --hf
        directory's weights (on the CPU)."""
        from parallax.models import build_model, from_hf

        if self.hf is None:
            return build_model(model_config)
        overrides = dict(self.model)
        if self.block_size is not None:
            overrides["block_size"] = self.block_size
        return from_hf(self.hf, **overrides)

    def plan_model(self, model_config: ModelConfig) -> Any:
        """What ``--plan`` plans for: the model config (every parameter trained)."""
        return model_config

    def checkpoint_metadata(self, model: Any) -> dict[str, str]:
        """Extra (str -> str) metadata for every checkpoint of the run (none for pretraining)."""
        return {}

    def batch_loss(self, model: Any, batch: Any) -> tuple[Any, int, dict[str, Any]]:
        """(mean loss of one batch, the loss units it averages: its trained targets, statistics
        to log: each a sum over the units) -- the loop weights micro-batches by units."""
        return model(*batch), int((batch[1] >= 0).sum()), {}

    def prepare_training(self, model: Any, ds: Any, info: Any, device: Any, resuming: bool) -> None:
        """Called on every rank after the model is built (and resumed), before the first step."""

    def runtime_config(self) -> RuntimeConfig:
        checkpointing = False if self.activation_checkpointing == "off" else self.activation_checkpointing
        return RuntimeConfig(zero_stage=self.zero_stage, bucket_mb=self.bucket_mb, prefetch=self.prefetch,
                             timeout_s=self.timeout_s, precision=self.precision, offload=self.offload,
                             activation_checkpointing=checkpointing)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | Path, config_cls: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """Fields of config_cls from a .toml or .json file; an unreadable file or an unknown key raises ConfigError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".json":
            values = json.loads(raw)
        elif path.suffix == ".toml":
            values = _toml().loads(raw.decode())
        else:
            raise ConfigError(f"config {path} must be a .toml or .json file")
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot parse config {path}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must hold a table of fields")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config {path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return values


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli
    except ImportError:
        raise ConfigError("reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    return tomli
