"""Split a model into pipeline stages by its blocks.

``stage_layout`` cuts the ``n_layer`` blocks into ``pp * virtual_stages`` contiguous chunks
(pipeline order) whose largest cost is as small as possible; rank ``r`` holds chunks ``r,
r + pp, r + 2 pp, ...`` (Megatron's interleaving). ``build_stage`` keeps only this rank's modules
under their ORIGINAL names (the blocks in an ``nn.ModuleDict`` keyed by block index in place of
the ``nn.ModuleList``), so parameter names, optimizer state and checkpoints stay the full
model's: the first stage also holds the embeddings, the last the final norm and the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from parallax.models.loss import check_token_ids
from parallax.models.rope import inv_frequencies, rope_tables
from parallax.parallel.mesh import Mesh
from parallax.parallel.state import ParallelState, attach_parallel_state, parallel_state

__all__ = ["check_pipeline", "stage_layout", "build_stage", "PipelineStage", "Family"]

Balance = str | Sequence[float]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_pipeline(n_layer: int, pp: int, virtual_stages: int = 1) -> None:
    """Raise ValueError unless ``n_layer`` blocks split into ``pp * virtual_stages`` chunks of at
    least one block each (what the launcher checks before spawning any rank)."""
    _positive_int("n_layer", n_layer)
    _positive_int("pp", pp)
    _positive_int("virtual_stages", virtual_stages)
    chunks = pp * virtual_stages
    if n_layer < chunks:
        raise ValueError(f"n_layer={n_layer} blocks cannot be split into pp={pp} x virtual_stages={virtual_stages} "
                         f"= {chunks} pipeline chunks of at least one block each: use fewer stages or virtual "
                         f"stages (at most {n_layer} chunks)")


def _block_costs(n_layer: int, balance: Balance) -> list[float]:
    if isinstance(balance, str):
        if balance != "params":
            raise ValueError(f"balance must be 'params' or a list of per-block costs, got {balance!r}")
        return [1.0] * n_layer
    costs = list(balance)
    if len(costs) != n_layer:
        raise ValueError(f"balance gives {len(costs)} per-block costs for n_layer={n_layer} blocks")
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0:
            raise ValueError(f"balance[{i}] must be a non-negative number, got {c!r}")
    return [float(c) for c in costs]


def _min_max_cost(prefix: list[float], chunks: int) -> float:
    """The smallest achievable largest chunk cost of a contiguous split into ``chunks`` nonempty
    chunks (dynamic programming over block prefixes)."""
    n = len(prefix) - 1
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[i]: first i blocks in k chunks
    for k in range(1, chunks + 1):
        nxt = [inf] * (n + 1)
        for i in range(k, n - (chunks - k) + 1):
            nxt[i] = min(max(best[j], prefix[i] - prefix[j]) for j in range(k - 1, i))
        best = nxt
    return best[n]


def _split(costs: list[float], chunks: int) -> list[range]:
    """Contiguous chunks minimising the largest chunk cost; among such splits, each chunk takes as
    many blocks as the bound allows (so with equal costs the earlier chunks get the extra blocks)."""
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    bound = _min_max_cost(prefix, chunks)
    tolerance = 1e-9 * max(1.0, abs(bound))
    n, start, out = len(costs), 0, []
    for k in range(chunks):
        end = start + 1
        last_allowed = n - (chunks - k - 1)  # leave one block for each later chunk
        while end < last_allowed and prefix[end + 1] - prefix[start] <= bound + tolerance:
            end += 1
        if k == chunks - 1:
            end = n
        out.append(range(start, end))
        start = end
    return out


def stage_layout(n_layer: int, pp: int, virtual_stages: int = 1, balance: Balance = "params") -> list[list[range]]:
    """Per pipeline rank, the block-index ranges (chunks) it holds, in its execution order.

    ``balance``: ``"params"`` (blocks of equal cost: a model's blocks have equal parameter counts;
    ``build_stage`` passes the real counts) or one non-negative cost per block (e.g. the planner's
    per-block time). The ``pp * virtual_stages`` chunks are contiguous and minimise the largest
    chunk cost; chunk ``c`` goes to rank ``c % pp``.
    """
    check_pipeline(n_layer, pp, virtual_stages)
    chunks = _split(_block_costs(n_layer, balance), pp * virtual_stages)
    return [[chunks[v * pp + r] for v in range(virtual_stages)] for r in range(pp)]


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its parts (attribute paths from the model's root)."""

    name: str
    container: str  # the ModuleDict/Module holding embeddings, blocks and final norm
    first: tuple[str, ...]  # modules of ``container`` on the first stage
    blocks: str  # the ModuleList of blocks inside ``container``
    norm: str  # the final norm inside ``container``
    embedding: str  # the token embedding inside ``container`` (a tie partner of lm_head)


GPT_FAMILY = Family("gpt", "transformer", ("wte", "wpe", "drop"), "h", "ln_f", "wte")
LLAMA_FAMILY = Family("llama", "model", ("embed_tokens",), "layers", "norm", "embed_tokens")


def pipeline_family(model: nn.Module) -> Family:
    """The pipeline layout of a parallax GPT or Llama-family model; ValueError for others."""
    for family in (GPT_FAMILY, LLAMA_FAMILY):
        container = getattr(model, family.container, None)
        if container is not None and isinstance(getattr(container, family.blocks, None), nn.ModuleList) \
                and hasattr(model, "lm_head") and hasattr(model, "config"):
            return family
    raise ValueError(f"build_stage splits parallax's GPT and Llama-family models (blocks in transformer.h or "
                     f"model.layers, an lm_head and a config); got {type(model).__name__}")


class PipelineStage(nn.Module):
    """This rank's part of a model: the chunks of blocks of ``stage_layout``, the embeddings on the
    first stage and the final norm + LM head on the last, under the full model's names.

    ``chunks``: the block ranges this rank holds, in execution order (virtual stages);
    ``virtual_stage(i)`` is chunk ``i``'s position in the whole pipeline (0 .. pp * v - 1).
    The forward pieces are ``embed``, ``run_blocks`` and ``head_loss`` (the schedule calls them).
    """

    def __init__(self, model: nn.Module, family: Family, mesh: Mesh, chunks: list[range]) -> None:
        super().__init__()
        self.family = family
        self.config = model.config
        self.mesh = mesh
        self.chunks = chunks
        self.num_chunks_total = mesh.dims.pp * len(chunks)
        # Not a reference to the full model: that would keep every other stage's blocks alive here.
        self.position_offset = model.position_offset
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # rotary inverse frequencies per device (Llama)
        full = getattr(model, family.container)
        parts: dict[str, nn.Module] = {}
        if mesh.is_first_stage:
            parts.update({name: getattr(full, name) for name in family.first})
        blocks = getattr(full, family.blocks)
        parts[family.blocks] = nn.ModuleDict({str(i): blocks[i] for chunk in chunks for i in chunk})
        if mesh.is_last_stage:
            parts[family.norm] = getattr(full, family.norm)
        self.add_module(family.container, nn.ModuleDict(parts))
        if mesh.is_last_stage:
            self.lm_head = model.lm_head

    def virtual_stage(self, chunk: int) -> int:
        return chunk * self.mesh.dims.pp + self.mesh.pp_rank

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def _part(self, name: str) -> nn.Module:
        return getattr(self, self.family.container)[name]

    def _positions(self, idx: torch.Tensor) -> torch.Tensor:
        """(1, T) positions of idx (B, T), shifted by the model's prefix-tuning offset."""
        return torch.arange(idx.size(1), device=idx.device)[None] + self.position_offset

    def block_context(self, idx: torch.Tensor) -> tuple:
        """The extra arguments every block of this family takes for tokens idx (B, T): none for
        GPT, the rotary cos/sin (1, T, D // 2) for Llama (recomputed on each stage, as the model does)."""
        if self.family is not LLAMA_FAMILY:
            return ()
        if idx.device not in self._inv_freq:
            cfg = self.config
            self._inv_freq[idx.device] = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(idx.device)
        return rope_tables(self._inv_freq[idx.device], self._positions(idx))

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline stage holds part of a model: run it with "
                           "parallax.parallel.pipeline.PipelineSchedule.train_step / eval_step")

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """First stage: token ids idx (B, T) -> the residual stream (B, T, C), or (B, T / tp, C)
        when the embedding is sequence-parallel."""
        check_token_ids(idx, self.config.block_size)
        tokens = self._part(self.family.embedding)(idx)
        if self.family is LLAMA_FAMILY:
            return tokens
        positions = self._part("wpe")(self._positions(idx)[0])  # (T, C), or (T / tp, C) if TP split it
        local = tokens.size(1)
        if positions.size(0) != local:  # sequence-parallel tokens, full positions: this rank's slice of T
            positions = positions[self.mesh.tp_rank * local:(self.mesh.tp_rank + 1) * local]
        return self._part("drop")(tokens + positions)

    def run_blocks(self, chunk: int, x: torch.Tensor, context: tuple) -> torch.Tensor:
        """Chunk ``chunk``'s blocks on the residual stream x."""
        blocks = self._part(self.family.blocks)
        for i in self.chunks[chunk]:
            x = blocks[str(i)](x, *context)
        return x

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Last stage: the mean cross-entropy of targets (B, T) (negative ones ignored) from the
        residual stream x, through the final norm and the LM head (vocab-parallel under TP)."""
        return lm_head_loss(self.lm_head, self._part(self.family.norm)(x), targets)


def lm_head_loss(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``parallax.parallel.tensor.loss.lm_head_loss`` (vocab-parallel when the head is), or the
    plain fused loss where tensor parallelism is not installed."""
    try:
        from parallax.parallel.tensor.loss import lm_head_loss as tensor_lm_head_loss
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("parallax.parallel.tensor"):
            raise  # tensor parallelism is there but broken: say so
        from parallax.models.loss import lm_loss

        return lm_loss(h, head.weight, targets, reduction)
    return tensor_lm_head_loss(head, h, targets, reduction)


def _block_param_counts(blocks: nn.ModuleList) -> list[float]:
    return [float(sum(p.numel() for p in block.parameters())) for block in blocks]


def _check_unshared(blocks: nn.ModuleList) -> None:
    if len({id(b) for b in blocks}) != len(blocks):
        raise ValueError("pipeline parallelism needs distinct blocks: this model shares layers across positions "
                         "(share_layers > 1), which would put one block's weights on several stages")


def build_stage(model: nn.Module, mesh: Mesh, virtual_stages: int = 1, balance: Balance = "params") -> nn.Module:
    """This rank's ``PipelineStage`` of ``model`` (a parallax GPT or Llama family, TP-parallelized
    or not), or ``model`` itself when ``mesh.dims.pp == 1``; either carries the ParallelState.

    ``balance="params"`` balances the blocks' parameter counts; a list gives a cost per block.
    A token embedding tied to the LM head lives on the first stage as ``<container>.<embedding>.weight``
    and on the last as ``lm_head.weight``; both are entered in ``ParallelState.pp_tied`` (name ->
    the other holder's global rank), and the schedule sums their gradients before each step.
    """
    state = parallel_state(model) or ParallelState(mesh)
    if mesh.dims.pp == 1:
        attach_parallel_state(model, state)
        return model
    family = pipeline_family(model)
    blocks = getattr(getattr(model, family.container), family.blocks)
    _check_unshared(blocks)
    costs = _block_param_counts(blocks) if balance == "params" else balance
    layout = stage_layout(len(blocks), mesh.dims.pp, virtual_stages, costs)
    stage = PipelineStage(model, family, mesh, layout[mesh.pp_rank])
    embedding = getattr(getattr(model, family.container), family.embedding)
    tied = model.lm_head.weight is embedding.weight
    embedding_name = f"{family.container}.{family.embedding}.weight"
    # The full model names a tied matrix once, after the embedding; the last stage calls it lm_head.weight.
    full_name = {n: n for n, _ in stage.named_parameters()}
    pp_tied = {}
    if tied and mesh.is_first_stage:
        pp_tied[embedding_name] = mesh.pp_ranks[-1]
    if tied and mesh.is_last_stage:
        pp_tied["lm_head.weight"] = mesh.pp_ranks[0]
        full_name["lm_head.weight"] = embedding_name
    stage_state = ParallelState(
        mesh, tp_dims={n: state.tp_dims[f] for n, f in full_name.items() if f in state.tp_dims},
        tp_partial_grads={n for n, f in full_name.items() if f in state.tp_partial_grads},
        pp_tied=pp_tied, sequence_parallel=state.sequence_parallel)
    attach_parallel_state(stage, stage_state)
    return stage
