"""Rank-side code of the tensor-parallelism tests (spawned processes import it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallax.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy)
from parallax.parallel.tensor.layers import shard_slice

TOL = dict(rtol=1e-5, atol=1e-6)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, **tol) -> None:
    torch.testing.assert_close(actual, expected, **(tol or TOL), msg=lambda m: f"{what}: {m}")


def _seq_chunk(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, 1)[rank]


def _run(module: nn.Module, x: torch.Tensor, grad_out_fn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output and input gradient of module(x) under the upstream gradient grad_out_fn(output)."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    y = module(x)
    y.backward(grad_out_fn(y))
    return y.detach(), x.grad


def layer_checks(rank: int, world: int) -> None:
    """Every layer against its full plain-PyTorch module: outputs, input gradients and parameter
    gradients (this rank's slice), with odd unsplit sizes, with and without sequence parallelism."""
    torch.manual_seed(0)
    B, T = 3, 2 * world
    g = torch.Generator().manual_seed(1)

    def upstream(shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(hash(shape) % 1000))

    # Column: 7 inputs, 10 outputs (5 per rank); gathered and sharded output; fused sections.
    for gather, sections in ((True, None), (False, None), (False, [4, 2, 4])):
        full = nn.Linear(7, 10)
        x = torch.randn(B, T, 7, generator=g)
        y_ref, gx_ref = _run(full, x, lambda y: upstream(tuple(y.shape)))
        layer = ColumnParallelLinear.from_module(full, None, gather_output=gather, sections=sections)
        if gather:
            y, gx = _run(layer, x, lambda y: upstream(tuple(y.shape)))
            _close(y, y_ref, "column output")
        else:
            y, gx = _run(layer, x, lambda y: shard_slice(upstream(tuple(y_ref.shape)), -1, rank, world, sections))
            _close(y, shard_slice(y_ref, -1, rank, world, sections), f"column output shard (sections={sections})")
        _close(gx, gx_ref, f"column input grad (gather={gather}, sections={sections})")
        _close(layer.weight.grad, shard_slice(full.weight.grad, 0, rank, world, sections), "column weight grad")
        _close(layer.bias.grad, shard_slice(full.bias.grad, 0, rank, world, sections), "column bias grad")

    # Row: 10 inputs (5 per rank), 7 outputs; split here or already split.
    for parallel_input in (False, True):
        full = nn.Linear(10, 7)
        x = torch.randn(B, T, 10, generator=g)
        y_ref, gx_ref = _run(full, x, lambda y: upstream(tuple(y.shape)))
        layer = RowParallelLinear.from_module(full, None, input_is_parallel=parallel_input)
        x_in = shard_slice(x, -1, rank, world) if parallel_input else x
        y, gx = _run(layer, x_in, lambda y: upstream(tuple(y.shape)))
        _close(y, y_ref, "row output")
        _close(gx, shard_slice(gx_ref, -1, rank, world) if parallel_input else gx_ref, "row input grad")
        _close(layer.weight.grad, shard_slice(full.weight.grad, 1, rank, world), "row weight grad")
        _close(layer.bias.grad, full.bias.grad, "row bias grad")

    # Hugging Face's Conv1D layout (weight (in, out)) as column and row layers.
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(10, 7)
    nn.init.normal_(conv.bias)
    x = torch.randn(B, T, 7, generator=g)
    y_ref, gx_ref = _run(conv, x, lambda y: upstream(tuple(y.shape)))
    layer = ColumnParallelLinear.from_module(conv, None, gather_output=True)
    y, gx = _run(layer, x, lambda y: upstream(tuple(y.shape)))
    _close(y, y_ref, "Conv1D column output")
    _close(gx, gx_ref, "Conv1D column input grad")
    _close(layer.weight.grad, shard_slice(conv.weight.grad, 1, rank, world), "Conv1D column weight grad")
    conv = Conv1D(7, 10)
    x = torch.randn(B, T, 10, generator=g)
    y_ref, gx_ref = _run(conv, x, lambda y: upstream(tuple(y.shape)))
    layer = RowParallelLinear.from_module(conv, None, input_is_parallel=False)
    y, gx = _run(layer, x, lambda y: upstream(tuple(y.shape)))
    _close(y, y_ref, "Conv1D row output")
    _close(gx, gx_ref, "Conv1D row input grad")
    _close(layer.weight.grad, shard_slice(conv.weight.grad, 0, rank, world), "Conv1D row weight grad")

    # Vocabulary-parallel embedding, width 7, every id used: 10 ids (5 per rank), id 6's row padding;
    # 2 * world + 1 ids, which tp does not divide (torch.chunk's split: the last rank holds fewer),
    # the last id's row padding.
    for vocab, padding_idx in ((10, 6), (2 * world + 1, 2 * world)):
        full = nn.Embedding(vocab, 7, padding_idx=padding_idx)
        idx = torch.arange(B * T).remainder(vocab).view(B, T)
        y_ref, _ = _run(full, idx, lambda y: upstream(tuple(y.shape)))
        layer = VocabParallelEmbedding.from_module(full, None)
        y, _ = _run(layer, idx, lambda y: upstream(tuple(y.shape)))
        _close(y, y_ref, f"embedding output ({vocab} ids)")
        _close(layer.weight.grad, shard_slice(full.weight.grad, 0, rank, world), f"embedding weight grad ({vocab} ids)")

    # A column-parallel LM head over a vocabulary tp does not divide, gathering the full logits
    # (the shorter slice padded for the all-gather, then trimmed).
    full = nn.Linear(7, 2 * world + 1, bias=False)
    x = torch.randn(B, T, 7, generator=g)
    y_ref, gx_ref = _run(full, x, lambda y: upstream(tuple(y.shape)))
    layer = ColumnParallelLinear.from_module(full, None, gather_output=True)
    y, gx = _run(layer, x, lambda y: upstream(tuple(y.shape)))
    _close(y, y_ref, "uneven column gathered output")
    _close(gx, gx_ref, "uneven column input grad")
    _close(layer.weight.grad, shard_slice(full.weight.grad, 0, rank, world), "uneven column weight grad")

    _sequence_parallel_checks(rank, world, B, T, g, upstream)


def _sequence_parallel_checks(rank, world, B, T, g, upstream) -> None:
    """Sequence-parallel inputs/outputs are this rank's part of the sequence (B, T/tp, ...); a
    row layer's bias gradient is a partial sum over ranks."""
    full = nn.Linear(7, 10)
    x = torch.randn(B, T, 7, generator=g)
    y_ref, gx_ref = _run(full, x, lambda y: upstream(tuple(y.shape)))
    layer = ColumnParallelLinear.from_module(full, None, sequence_parallel=True)
    y, gx = _run(layer, _seq_chunk(x, rank, world), lambda y: shard_slice(upstream(tuple(y_ref.shape)), -1, rank, world))
    _close(y, shard_slice(y_ref, -1, rank, world), "sequence-parallel column output")
    _close(gx, _seq_chunk(gx_ref, rank, world), "sequence-parallel column input grad")
    _close(layer.weight.grad, shard_slice(full.weight.grad, 0, rank, world), "sequence-parallel column weight grad")

    full = nn.Linear(10, 7)
    x = torch.randn(B, T, 10, generator=g)
    y_ref, gx_ref = _run(full, x, lambda y: upstream(tuple(y.shape)))
    layer = RowParallelLinear.from_module(full, None, sequence_parallel=True)
    y, gx = _run(layer, shard_slice(x, -1, rank, world),
                 lambda y: _seq_chunk(upstream(tuple(y_ref.shape)), rank, world))
    _close(y, _seq_chunk(y_ref, rank, world), "sequence-parallel row output")
    _close(gx, shard_slice(gx_ref, -1, rank, world), "sequence-parallel row input grad")
    _close(layer.weight.grad, shard_slice(full.weight.grad, 1, rank, world), "sequence-parallel row weight grad")
    bias_grad = layer.bias.grad.clone()
    dist.all_reduce(bias_grad)
    _close(bias_grad, full.bias.grad, "sequence-parallel row bias grad summed over ranks")

    full = nn.Embedding(10, 7)
    idx = torch.arange(B * T).remainder(10).view(B, T)
    y_ref, _ = _run(full, idx, lambda y: upstream(tuple(y.shape)))
    layer = VocabParallelEmbedding.from_module(full, None, sequence_parallel=True)
    y, _ = _run(layer, idx, lambda y: _seq_chunk(upstream(tuple(y_ref.shape)), rank, world))
    _close(y, _seq_chunk(y_ref, rank, world), "sequence-parallel embedding output")
    _close(layer.weight.grad, shard_slice(full.weight.grad, 0, rank, world), "sequence-parallel embedding grad")


def layer_and_loss_checks(rank: int, world: int) -> dict[str, str | None]:
    """Both check groups in one launch (spawning ranks costs more than the checks): what failed, by group."""
    out: dict[str, str | None] = {}
    for check in (layer_checks, cross_entropy_checks):
        try:
            check(rank, world)
            out[check.__name__] = None
        except AssertionError as exc:
            out[check.__name__] = f"rank {rank}: {exc}"
    return out


def cross_entropy_checks(rank: int, world: int) -> None:
    """Both vocabulary-parallel losses against F.cross_entropy on the full logits: loss (mean and
    per row, ignored rows included) and the gradients of the logits / of h and the weight, with a
    vocabulary tp divides and one it does not (each rank its torch.chunk slice)."""
    for V in (11 * world, 97):
        _cross_entropy_checks(rank, world, V)


def _cross_entropy_checks(rank: int, world: int, V: int) -> None:
    N, C = 13, 6
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 7]] = -100
    logits = (3 * torch.randn(N, V, generator=g)).requires_grad_()
    row_weights = torch.rand(N, generator=g)
    for reduction in ("mean", "none"):
        ref = F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
        (ref if reduction == "mean" else (ref * row_weights).sum()).backward()
        shard = shard_slice(logits.detach(), 1, rank, world).requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, targets, None, reduction=reduction, vocab_size=V)
        (loss if reduction == "mean" else (loss * row_weights).sum()).backward()
        _close(loss, ref.detach(), f"vocab-parallel cross-entropy (V={V}, {reduction})")
        _close(shard.grad, shard_slice(logits.grad, 1, rank, world), f"vocab-parallel logits grad (V={V}, {reduction})")
        logits.grad = None

    h = torch.randn(N, C, generator=g, requires_grad=True)
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    for reduction in ("mean", "none"):
        ref = F.cross_entropy(h @ weight.t(), targets, ignore_index=-100, reduction=reduction)
        (ref if reduction == "mean" else (ref * row_weights).sum()).backward()
        h_tp = h.detach().clone().requires_grad_()
        w_tp = shard_slice(weight.detach(), 0, rank, world).requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(h_tp, w_tp, targets, None, reduction=reduction, chunk_rows=4,
                                                   vocab_size=V)
        (loss if reduction == "mean" else (loss * row_weights).sum()).backward()
        what = f"(V={V}, {reduction})"
        _close(loss, ref.detach(), f"fused vocab-parallel cross-entropy {what}")
        _close(h_tp.grad, h.grad, f"fused vocab-parallel grad of h {what}")
        _close(w_tp.grad, shard_slice(weight.grad, 0, rank, world), f"fused vocab-parallel weight grad {what}")
        h.grad = weight.grad = None


# ------------------------------------------------------------------------------ whole models

import parallax as px  # noqa: E402
from parallax.models import GPTConfig, LlamaConfig, build_model  # noqa: E402
from parallax.parallel import ParallelDims, init_mesh, parallel_state  # noqa: E402
from parallax.parallel.tensor import gather_tensor_parallel, parallelize  # noqa: E402

OPT = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# The byte tokenizer's vocabulary, which tp = 2 does not divide: the embedding and the LM head
# split it 129 + 128, like torch.chunk.
BATCH, SEQ, VOCAB = 4, 8, 257


def model_config(family: str):
    """Tiny models with odd unsplit sizes and grouped-query attention (n_kv_head < n_head)."""
    if family == "gpt":
        return GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=36,
                         attention="math")
    if family == "llama":
        return LlamaConfig(model_type="llama", block_size=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2,
                           n_embd=32, intermediate_size=42, tie_word_embeddings=False, attention="math")
    # Qwen3: per-head q/k norms (their weights are shared by heads that tensor parallelism splits),
    # q/k/v biases and a tied LM head.
    return LlamaConfig(model_type="qwen3", block_size=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=32, head_dim=12, intermediate_size=42, qk_norm=True, attention_bias=True,
                       tie_word_embeddings=True, attention="math")


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def reference_run(family: str, steps: int, clip: float | None) -> dict:
    """One process, the plain model and torch.optim.AdamW on the whole batch."""
    torch.manual_seed(0)
    model = build_model(model_config(family))
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    losses, norms = [], []
    for step in range(steps):
        idx, targets = _batch(step)
        loss = model(idx, targets)
        loss.backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    logits = model(_batch(steps)[0]).detach()
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": losses,
            "norms": norms, "logits": logits}


def tensor_parallel_run(rank: int, world: int, family: str, tp: int, stage: int = 0, steps: int = 3,
                        sequence_parallel: bool = False, clip: float | None = None, precision: str = "fp32",
                        checkpointing: bool = False) -> dict:
    """The same training on a (dp, tp) mesh: parallelize, ZeRO over the data-parallel group, each
    data-parallel rank on its rows of the batch. Returns the full parameters (gathered), the batch
    losses, the clipped norms and the full logits of one more batch."""
    mesh = init_mesh(ParallelDims.for_world(world, tp=tp))
    torch.manual_seed(0)
    model = build_model(model_config(family))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    rng = torch.get_rng_state()
    parallelize(model, mesh, sequence_parallel=sequence_parallel)
    # Slices of unequal sizes must not leave the ranks' generators (batches, dropout) apart.
    parallelize_drew_random_numbers = not torch.equal(rng, torch.get_rng_state())
    state = parallel_state(model)
    wrong_full_shapes = sorted(n for n in {*state.tp_dims, *state.full_shapes}
                               if n not in state.tp_dims or state.full_shapes.get(n) != shapes[n])
    config = px.RuntimeConfig(zero_stage=stage, precision=precision, activation_checkpointing=checkpointing,
                              timeout_s=60)
    model, opt = px.initialize(model, config, group=mesh.dp_group, **OPT)
    rows = slice(mesh.dp_rank * BATCH // mesh.dims.dp, (mesh.dp_rank + 1) * BATCH // mesh.dims.dp)
    losses, norms = [], []
    for step in range(steps):
        idx, targets = _batch(step)
        loss = model(idx[rows], targets[rows])
        opt.backward(loss)
        if clip is not None:
            norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step()
        opt.zero_grad()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean, group=mesh.dp_group)
        losses.append(mean.item() / mesh.dims.dp)
    logits = model(_batch(steps)[0]).detach().float()
    full = px.zero.full_state_dict(model)
    params = {name: gather_tensor_parallel(model, name, t).float() for name, t in full.items()}
    return {"params": params, "losses": losses, "norms": norms, "logits": logits,
            "wrong_full_shapes": wrong_full_shapes, "parallelize_drew_random_numbers": parallelize_drew_random_numbers}


def _diffs(run: dict, ref: dict) -> dict:
    """Largest absolute difference per parameter, and for the logits; None for a missing name."""
    out = {name: (float((run["params"][name] - p).abs().max()) if name in run["params"]
                  and run["params"][name].shape == p.shape else None) for name, p in ref["params"].items()}
    out["<logits>"] = float((run["logits"] - ref["logits"]).abs().max())
    return out


# Cases of the 2-rank test module (tp = 2): name -> keyword arguments of tensor_parallel_run.
TWO_RANK_CASES = {
    "gpt": dict(family="gpt"),
    "llama": dict(family="llama"),
    "qwen3": dict(family="qwen3"),
    "gpt_sp": dict(family="gpt", sequence_parallel=True),
    "qwen3_sp": dict(family="qwen3", sequence_parallel=True),
    "gpt_clip": dict(family="gpt", clip=0.05),
    "llama_sp_clip_ckpt": dict(family="llama", sequence_parallel=True, clip=0.05, checkpointing=True),
    "gpt_bf16": dict(family="gpt", precision="bf16"),
}
# Cases of the 4-rank test (tp = 2 x dp = 2) with ZeRO stages 1-3.
FOUR_RANK_CASES = {
    "gpt_stage1_clip": dict(family="gpt", stage=1, clip=0.05),
    "llama_stage2_sp": dict(family="llama", stage=2, sequence_parallel=True),
    "qwen3_stage3_clip": dict(family="qwen3", stage=3, clip=0.05),
    "gpt_stage3_sp_ckpt": dict(family="gpt", stage=3, sequence_parallel=True, checkpointing=True),
}


def two_rank_checks(rank: int, world: int) -> dict:
    """Everything of the 2-rank tests in one launch (spawning ranks costs more than the checks)."""
    return {"layers": layer_and_loss_checks(rank, world), "models": model_cases(rank, world, TWO_RANK_CASES),
            "hf": hf_checks(rank, world)}


def four_rank_checks(rank: int, world: int) -> dict:
    return {"models": model_cases(rank, world, FOUR_RANK_CASES)}


def model_cases(rank: int, world: int, cases: dict) -> dict:
    """Every case against the single-process reference (computed here): parameter and logits
    differences, losses and clipped norms of both."""
    out, refs, params = {}, {}, {}
    for name, kwargs in cases.items():
        key = (kwargs["family"], kwargs.get("clip"))
        if key not in refs:
            refs[key] = reference_run(kwargs["family"], 3, kwargs.get("clip"))
        ref = refs[key]
        run = tensor_parallel_run(rank, world, tp=2, **kwargs)
        params[name] = run["params"]
        out[name] = {"diffs": _diffs(run, ref), "losses": run["losses"], "ref_losses": ref["losses"],
                     "norms": run["norms"], "ref_norms": ref["norms"],
                     **{k: run[k] for k in ("wrong_full_shapes", "parallelize_drew_random_numbers")}}
    for sp_case in [c for c in cases if c.endswith("_sp") and c[:-3] in cases]:
        plain = params[sp_case[:-3]]
        out[sp_case]["vs_plain"] = max(float((params[sp_case][k] - plain[k]).abs().max()) for k in plain)
    return out


# ------------------------------------------------------------------------------ Hugging Face


def _hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    def llama():
        return LlamaForCausalLM(HFLlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=42,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=16, attention_bias=True, pad_token_id=5))

    def gpt2():
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                          eos_token_id=0))

    return {"hf_llama": llama, "hf_gpt2": gpt2}


def hf_checks(rank: int, world: int) -> dict:
    """Hugging Face models parallelized with tp = world: loss, every gradient and the logits
    against the unparallelized model's; largest absolute differences."""
    mesh = init_mesh(ParallelDims.for_world(world, tp=world))
    idx, labels = _batch(0)
    labels[0, :3] = -100
    out = {}
    for name, make in _hf_models().items():
        torch.manual_seed(0)
        ref = make()
        ref_loss = ref(input_ids=idx, labels=labels).loss
        ref_loss.backward()
        torch.manual_seed(0)
        model = parallelize(make(), mesh)
        loss = model(input_ids=idx, labels=labels).loss
        loss.backward()
        diffs = {"<loss>": abs(loss.item() - ref_loss.item()),
                 "<logits>": float((model(idx).logits - ref(idx).logits).abs().max())}
        for pname, p in model.named_parameters():
            grad = gather_tensor_parallel(model, pname, p.grad)
            expected = ref.get_parameter(pname).grad
            diffs[pname] = float((grad - expected).abs().max()) if grad.shape == expected.shape else None
        out[name] = diffs
    return out
