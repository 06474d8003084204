"""``parallelize(model, mesh)``: tensor parallelism for parallax's GPT and Llama families and for
Hugging Face's ``LlamaForCausalLM`` (and its Mistral/Qwen2/Qwen3 siblings) and
``GPT2LMHeadModel``, by module names, without editing the model code (torchtitan's rule).

Per block (Megatron-LM's plan): the attention's q, k, v projections are column-parallel (each
rank holds n_head/tp query heads and n_kv_head/tp key/value heads; GPT's fused ``c_attn`` is
split by heads within each of its q, k and v sections) and its output projection row-parallel;
the MLP's up (and gate) projections column-parallel, its down projection row-parallel. The token
embedding is vocabulary-parallel and the LM head column-parallel over the vocabulary (tied or
not; split like torch.chunk, so tp need not divide the vocabulary): the loss is the
vocabulary-parallel cross-entropy, and ``model.logits(h)`` / ``model(idx)``
all-gather the full logits. Norms and position embeddings are replicated.

With ``sequence_parallel`` (parallax's families) the residual stream between the tensor-parallel
regions is split along the sequence, (B, T/tp, C): the norms see a part of the sequence each and
their gradients are summed over the group by a gradient hook (``ParallelState.tp_partial_grads``).

The model's class is swapped for a subclass (as ``px.zero.shard`` does) whose ``forward`` calls
``lm_head_loss``; attention modules get a subclass whose ``forward`` takes the head counts and the
sequence length from the projections' local outputs, and (Llama family) lets q, k and v, and the
MLP's gate and up, share one all-gather / gradient all-reduce of their input.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallax import ops
from parallax.models.attention import PackedSegments
from parallax.models.config import GPTConfig
from parallax.models.gpt import GPT
from parallax.models.layers import rotary_embedding
from parallax.models.llama import Llama
from parallax.models.llama_config import LlamaConfig
from parallax.parallel.mesh import Mesh
from parallax.parallel.state import ParallelState, attach_parallel_state, parallel_state
from parallax.parallel.tensor.comm import all_gather_along, all_gather_slices, all_reduce_, split_to_region
from parallax.parallel.tensor.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                             split_range)
from parallax.parallel.tensor.loss import lm_head_loss

__all__ = ["parallelize", "check_tensor_parallel", "tp_sections", "gather_tensor_parallel"]

log = logging.getLogger(__name__)

# Hugging Face model types planned like Llama (same module names) and like GPT-2.
HF_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
HF_GPT2_TYPES = ("gpt2",)


# ------------------------------------------------------------------------------------------ sizes


def _sizes(config_or_model: Any) -> dict[str, int]:
    """The sizes tensor parallelism splits, by a descriptive name: heads, KV heads, vocabulary,
    MLP width, of a parallax config, a parallax model or a Hugging Face model / config."""
    config = getattr(config_or_model, "config", config_or_model)
    if isinstance(config, GPTConfig):
        return {"n_head": config.n_head, "n_kv_head": config.kv_heads, "vocab_size": config.vocab_size,
                "MLP width (n_inner)": config.mlp_width}
    if isinstance(config, LlamaConfig):
        return {"n_head": config.n_head, "n_kv_head": config.kv_heads, "vocab_size": config.vocab_size,
                "intermediate_size": config.intermediate_size}
    model_type = getattr(config, "model_type", None)
    if model_type in HF_LLAMA_TYPES:
        return {"num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads or config.num_attention_heads,
                "vocab_size": config.vocab_size, "intermediate_size": config.intermediate_size}
    if model_type in HF_GPT2_TYPES:
        return {"n_head": config.n_head, "vocab_size": config.vocab_size,
                "MLP width (n_inner)": config.n_inner or 4 * config.n_embd}
    raise TypeError(f"tensor parallelism has a plan for parallax's GPT and Llama families and Hugging Face's "
                    f"{', '.join(HF_LLAMA_TYPES + HF_GPT2_TYPES)} models; got {type(config_or_model).__name__}")


def check_tensor_parallel(config_or_model: Any, tp: int) -> None:
    """Raise ValueError, naming the size and tp, unless the tensor-parallel degree ``tp`` divides
    every size the plan splits (query heads, key/value heads, MLP width) but the vocabulary, which
    is split like torch.chunk (257 byte ids over tp = 2: 129 + 128) and only needs an id on every
    rank. The launcher calls it before spawning ranks."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer; got {tp!r}")
    sizes = _sizes(config_or_model)
    try:
        split_range(sizes.pop("vocab_size"), tp, 0, "vocab_size")
    except ValueError as exc:
        raise ValueError(f"tensor parallelism: {exc}") from None
    for name, size in sizes.items():
        if size % tp:
            raise ValueError(f"tensor parallelism: {name} = {size} is not divisible by tp = {tp} "
                             f"(each of the {tp} ranks must hold an equal share); choose a tp that divides it")


# -------------------------------------------------------------------------- swapped-in forwards


class _TensorParallelCausalLM:
    """Mixin for a parallax model: the loss through ``lm_head_loss`` (vocabulary-parallel)."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Full logits (B, T, V) for idx (B, T), or with targets (B, T) the loss (see the model's forward)."""
        h = self.hidden_states(idx, positions, packed=positions is not None)
        return self.logits(h) if targets is None else lm_head_loss(self.lm_head, h, targets, reduction)


class _TensorParallelGPTAttention:
    """Mixin for GPT's CausalSelfAttention holding n_head/tp, n_kv_head/tp heads."""

    def forward(self, x: torch.Tensor, segments: PackedSegments | None = None) -> torch.Tensor:
        """x (B, T, C) (sequence parallel: (B, T/tp, C)) -> the same shape."""
        qkv = self.c_attn(x)  # (B, T, (nh + 2 nkv) hs) of the local heads; the full T
        B, T, _ = qkv.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        y = self.attend(q, k, v, segments).reshape(B, T, q_dim)
        return self.resid_dropout(self.c_proj(y))


class _TensorParallelLlamaAttention:
    """Mixin for LlamaAttention holding n_head/tp, n_kv_head/tp heads."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: PackedSegments | None = None) -> torch.Tensor:
        """x (B, T, C) (sequence parallel: (B, T/tp, C)) -> the same shape."""
        x = self.q_proj.enter(x)  # one all-gather (sequence parallel) / gradient all-reduce for q, k and v
        q = self.q_proj(x, input_entered=True)  # (B, T, H/tp * D); the full T
        B, T, _ = q.shape
        q = q.view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x, input_entered=True).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x, input_entered=True).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary_embedding(q, k, cos, sin)
        y = self.attend(q, k, v, segments)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))


class _TensorParallelSwiGLU:
    """Mixin for the Llama family's SwiGLU: gate and up share one entry into the region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) (sequence parallel: (B, T/tp, C)) -> the same shape."""
        x = self.gate_proj.enter(x)
        gate, up = self.gate_proj(x, input_entered=True), self.up_proj(x, input_entered=True)
        # The kernel on CUDA, the PyTorch reference on CPU (SwiGLU's own rule).
        return self.down_proj(ops.swiglu(gate, up, backend=None if gate.is_cuda else "reference"))


class _TensorParallelHFCausalLM:
    """Mixin for a Hugging Face causal LM: with ``labels`` the loss is the vocabulary-parallel
    cross-entropy of the (internally shifted) labels and ``logits`` is None; without, the
    model's own forward, whose LM head gathers the full logits."""

    def forward(self, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any):
        if labels is None:
            return super().forward(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = self.base_model(*args, **kwargs)
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]  # Hugging Face's shift: token t predicts t + 1
        loss = lm_head_loss(self.lm_head, out.last_hidden_state, shifted)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None))


def _swap_class(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if not issubclass(cls, mixin):
        module.__class__ = type(f"TensorParallel{cls.__name__}", (mixin, cls), {})


# ---------------------------------------------------------------------------------- the plans


class _Planner:
    """Replaces modules by their tensor-parallel versions and records what it split."""

    def __init__(self, model: nn.Module, mesh: Mesh, sequence_parallel: bool) -> None:
        self.model = model
        self.group = mesh.tp_group
        self.tp = mesh.dims.tp
        self.sp = sequence_parallel
        self.always_partial: list[nn.Parameter] = []  # grads partial even without sequence parallelism
        self.scattered: list[nn.Parameter] = []  # replicated params whose output is split along the sequence

    def column(self, parent: nn.Module, name: str, gather_output: bool = False,
               sections: list[int] | None = None) -> ColumnParallelLinear:
        layer = ColumnParallelLinear.from_module(getattr(parent, name), self.group, gather_output=gather_output,
                                                 sequence_parallel=self.sp, sections=sections)
        setattr(parent, name, layer)
        return layer

    def row(self, parent: nn.Module, name: str) -> RowParallelLinear:
        layer = RowParallelLinear.from_module(getattr(parent, name), self.group, sequence_parallel=self.sp)
        setattr(parent, name, layer)
        return layer

    def embedding_and_head(self, parent: nn.Module, embedding: str) -> None:
        """The token embedding (vocabulary-parallel) and the LM head (column-parallel over the
        vocabulary, gathering full logits when called), tied again if they were."""
        tied = self.model.lm_head.weight is getattr(parent, embedding).weight
        emb = VocabParallelEmbedding.from_module(getattr(parent, embedding), self.group, sequence_parallel=self.sp)
        setattr(parent, embedding, emb)
        head = self.column(self.model, "lm_head", gather_output=True)
        if tied:
            head.weight = emb.weight


def _unique(modules) -> list[nn.Module]:
    """Each module once (a block shared by several positions, ``share_layers``, is split once)."""
    return list({id(m): m for m in modules}.values())


def _local_heads(attn: nn.Module, tp: int) -> None:
    attn.n_head //= tp
    attn.n_kv_head //= tp
    attn.attend.n_head, attn.attend.n_kv_head = attn.n_head, attn.n_kv_head


def _plan_gpt(p: _Planner) -> None:
    cfg = p.model.config
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for block in _unique(p.model.transformer.h):
        p.column(block.attn, "c_attn", sections=[q_dim, kv_dim, kv_dim])
        p.row(block.attn, "c_proj")
        _local_heads(block.attn, p.tp)
        _swap_class(block.attn, _TensorParallelGPTAttention)
        p.column(block.mlp, "c_fc")
        p.row(block.mlp, "c_proj")
    p.embedding_and_head(p.model.transformer, "wte")
    if p.sp:
        # The position embeddings are added to the sequence-split token embeddings: keep this
        # rank's positions (the backward all-gathers, so their gradient is complete on every rank).
        wpe = p.model.transformer.wpe
        # (T, C) or (B, T, C): the sequence is the next-to-last dimension.
        wpe.register_forward_hook(lambda module, args, out: split_to_region(out, -2, p.group))
        p.scattered.append(wpe.weight)


def _plan_llama(p: _Planner, hugging_face: bool = False) -> None:
    """parallax's Llama family, or (``hugging_face``) Hugging Face's, whose attention infers its
    head counts from the projections' widths."""
    for layer in _unique(p.model.model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            p.column(attn, name)
        p.row(attn, "o_proj")
        if not hugging_face:
            _local_heads(attn, p.tp)
            _swap_class(attn, _TensorParallelLlamaAttention)
        if hasattr(attn, "q_norm"):  # shared by the heads, which are split: each rank's grad is partial
            p.always_partial += [attn.q_norm.weight, attn.k_norm.weight]
        p.column(layer.mlp, "gate_proj")
        p.column(layer.mlp, "up_proj")
        p.row(layer.mlp, "down_proj")
        if not hugging_face:
            _swap_class(layer.mlp, _TensorParallelSwiGLU)
    p.embedding_and_head(p.model.model, "embed_tokens")


def _plan_hf_gpt2(p: _Planner) -> None:
    C = p.model.config.n_embd
    for block in _unique(p.model.transformer.h):
        attn = block.attn
        p.column(attn, "c_attn", sections=[C, C, C])
        p.row(attn, "c_proj")
        attn.split_size = C // p.tp  # the local q, k, v widths
        attn.num_heads //= p.tp
        p.column(block.mlp, "c_fc")
        p.row(block.mlp, "c_proj")
    p.embedding_and_head(p.model.transformer, "wte")


def _family(model: nn.Module) -> str:
    if isinstance(model, GPT):
        return "gpt"
    if isinstance(model, Llama):
        return "llama"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if type(model).__module__.startswith("transformers") and hasattr(model, "lm_head"):
        if model_type in HF_LLAMA_TYPES:
            return "hf_llama"
        if model_type in HF_GPT2_TYPES:
            return "hf_gpt2"
    raise TypeError(f"tensor parallelism has no plan for {type(model).__name__}: parallax's GPT and Llama "
                    f"families and Hugging Face's {', '.join(HF_LLAMA_TYPES + HF_GPT2_TYPES)} causal LMs have one")


PLANS = {"gpt": _plan_gpt, "llama": _plan_llama, "hf_llama": lambda p: _plan_llama(p, hugging_face=True),
         "hf_gpt2": _plan_hf_gpt2}


# ------------------------------------------------------------------------------ parallelize


def _all_reduce_grad_hook(group):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_(grad.clone(), group, "all-reduce of a partial gradient (a norm under sequence parallelism)")

    return hook


def parallelize(model: nn.Module, mesh: Mesh, sequence_parallel: bool = False) -> nn.Module:
    """Split ``model`` over ``mesh``'s tensor-parallel group in place; returns the same object.

    Call it on every rank with the same full model (same seed): each rank keeps its slice of
    every split weight, so the parallel model computes exactly what the full one does.
    ``model(idx, targets)`` returns the same loss and ``model(idx)`` the full logits (B, T, V).
    Attaches (or updates) the model's ``ParallelState``: ``tp_dims`` (every split parameter and
    the dimension split, aliases of tied ones included), ``full_shapes`` (their unsplit shapes:
    the vocabulary may split unevenly), ``tp_partial_grads``. Raises ValueError when tp does not
    divide the heads, KV heads or MLP width, or the vocabulary is too small (``check_tensor_parallel``).
    With tp == 1 only the state is attached.
    """
    state = parallel_state(model) or ParallelState(mesh)
    if state.tp_dims:
        raise ValueError("this model is already tensor parallel; parallelize a freshly built model")
    family = _family(model)
    tp = mesh.dims.tp
    check_tensor_parallel(model, tp)
    if sequence_parallel and family not in ("gpt", "llama"):
        raise ValueError(f"sequence parallelism is available for parallax's GPT and Llama families; "
                         f"{type(model).__name__} gets tensor parallelism without it (sequence_parallel=False)")
    state.mesh, state.sequence_parallel = mesh, bool(sequence_parallel and tp > 1)
    attach_parallel_state(model, state)
    if tp == 1:
        return model
    planner = _Planner(model, mesh, state.sequence_parallel)
    PLANS[family](planner)
    _swap_class(model, _TensorParallelHFCausalLM if family.startswith("hf") else _TensorParallelCausalLM)
    _record(model, state, planner)
    log.info("tensor parallel: %s over tp=%d (sequence parallel %s): %d split parameter(s), %d partial",
             type(model).__name__, tp, state.sequence_parallel, len(state.tp_dims), len(state.tp_partial_grads))
    return model


def _record(model: nn.Module, state: ParallelState, planner: _Planner) -> None:
    """Fill ``state.tp_dims`` / ``full_shapes`` / ``tp_sections`` / ``tp_partial_grads`` and hook the
    partial gradients."""
    split: dict[int, tuple[int, tuple[int, ...]]] = {}  # id(param) -> (split dimension, full shape)
    sections: dict[int, tuple[int, ...]] = {}
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            split[id(module.weight)] = module.weight_split_dim, module.full_weight_shape
            if isinstance(module, ColumnParallelLinear) and module.bias is not None:
                split[id(module.bias)] = 0, (module.out_features,)
            if isinstance(module, ColumnParallelLinear) and module.sections:
                sections.update({id(t): tuple(module.sections) for t in (module.weight, module.bias) if t is not None})
    partial = {id(p) for p in planner.always_partial}
    if state.sequence_parallel:
        scattered = {id(p) for p in planner.scattered}
        partial |= {id(p) for p in model.parameters() if id(p) not in split and id(p) not in scattered}
    hooked: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in split:
            state.tp_dims[name], state.full_shapes[name] = split[id(param)]
            if id(param) in sections:
                state.tp_sections[name] = sections[id(param)]
        elif id(param) in partial and param.requires_grad:
            state.tp_partial_grads.add(name)
            if id(param) not in hooked:
                param.register_hook(_all_reduce_grad_hook(planner.group))
                hooked.add(id(param))


# ------------------------------------------------------------------------------ full tensors


def tp_sections(model: nn.Module) -> dict[str, list[int]]:
    """Parameters split section by section (a fused q, k, v projection): name -> the full sizes
    of the sections along its split dimension. Rank r holds its slice of each section, side by
    side; every other split parameter is one contiguous slice."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, ColumnParallelLinear) and module.sections:
            for pname in ("weight", "bias"):
                if getattr(module, pname) is not None:
                    out[f"{prefix}.{pname}" if prefix else pname] = list(module.sections)
    return out


@torch.no_grad()
def gather_tensor_parallel(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of parameter ``name`` (or of its gradient, ``tensor``), all-gathered over the
    tensor-parallel group (a collective: every rank of the group calls it); replicated ones as they are.
    Its full size comes from ``ParallelState.full_shapes`` (an uneven vocabulary split), else tp x
    the local size."""
    state = parallel_state(model)
    if state is None or name not in state.tp_dims or state.mesh.dims.tp == 1:
        return tensor
    dim, tp = state.tp_dims[name], state.mesh.dims.tp
    owner = model.get_submodule(name.rpartition(".")[0])
    sections = owner.sections if isinstance(owner, ColumnParallelLinear) else None
    if not sections:
        full = state.full_shapes[name][dim] if name in state.full_shapes else tensor.size(dim) * tp
        return all_gather_slices(tensor, dim, full, state.mesh.tp_group, f"gather of {name}")
    pieces = all_gather_along(tensor.unsqueeze(0), 0, state.mesh.tp_group, f"gather of {name}").unbind(0)
    local = [s // tp for s in sections]
    per_rank = [piece.split(local, dim) for piece in pieces]
    return torch.cat([torch.cat([rank_parts[i] for rank_parts in per_rank], dim) for i in range(len(sections))], dim)
