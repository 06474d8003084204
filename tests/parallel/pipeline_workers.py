"""Rank-side code of the pipeline-parallel tests (spawned processes import it), and the
single-process references they are compared with."""

from __future__ import annotations

import torch

import parallax as px
from parallax.checkpoint.activation import checkpointed_blocks
from parallax.models import GPT, GPTConfig, Llama, LlamaConfig
from parallax.optim import AdamW
from parallax.parallel import ParallelDims, init_mesh, parallel_state
from parallax.parallel.pipeline import PipelineSchedule, build_stage
from parallax.zero import full_grads

OPTIMIZER = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
BATCH, SEQ = 4, 8


def make_model(family: str) -> torch.nn.Module:
    """Tiny models on seed 0: GPT with tied embeddings; a Llama family one untied with GQA."""
    torch.manual_seed(0)
    if family == "gpt":
        # No biases: the key projection's bias has a zero gradient in exact arithmetic, and AdamW
        # turns its rounding noise (1e-12) into full-size updates that no two summation orders share.
        return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=4, n_head=2, n_embd=32, dropout=0.0,
                             bias=False, attention="math"))
    return Llama(LlamaConfig(block_size=16, vocab_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
                             intermediate_size=48, tie_word_embeddings=False, attention="math"))


def batch(step: int, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    idx = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    targets = torch.roll(idx, -1, dims=1)
    targets[0, :3] = -100  # ignored targets: micro-batches hold unequal shares of the batch
    return idx, targets


def reference(family: str, steps: int, clip: float | None = None) -> dict:
    """One process, the plain model and AdamW on the whole batch."""
    model = make_model(family)
    opt = AdamW(model.parameters(), **OPTIMIZER)
    losses, norms, grads = [], [], {}
    for step in range(steps):
        idx, targets = batch(step)
        loss = model(idx, targets)
        loss.backward()
        loss = loss.detach()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        eval_loss = float(model(*batch(steps)))
    return {"params": params, "losses": losses, "norms": norms, "grads": grads, "eval_loss": eval_loss}


def suite(rank: int, world_size: int, cases: list[dict], zero3: bool = False) -> dict:
    """Each case on a fresh mesh, in one spawn (starting ranks costs more than the tiny runs);
    ``zero3``: also the error a ZeRO-3 stage gets."""
    results = [train(init_mesh(ParallelDims.for_world(world_size, pp=2)), **case) for case in cases]
    return {"cases": results, "zero3": zero3_refused(init_mesh(ParallelDims.for_world(world_size, pp=2)))
            if zero3 else None}


def _replica_batch(idx: torch.Tensor, targets: torch.Tensor, mesh) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This data-parallel replica's rows, and the loss weight that makes the replicas' averaged
    gradient the whole batch's mean: the replica's share of the targets times dp."""
    dp = mesh.dims.dp
    rows = BATCH // dp
    mine = slice(mesh.dp_rank * rows, (mesh.dp_rank + 1) * rows)
    weight = float((targets[mine] >= 0).sum()) * dp / float((targets >= 0).sum())
    return idx[mine], targets[mine], weight


def train(mesh, family: str, schedule: str, steps: int = 3, virtual_stages: int = 1, micro_batches: int = 2,
          zero_stage: int = 0, precision: str = "fp32", activation_checkpointing: bool = False,
          clip: float | None = None, inject_inf_step: int | None = None) -> dict:
    """PP=2 (x DP = world / 2) training with ``schedule``: this rank's parameters, losses, the
    first step's gradients, the clipped norms and the steps the loss scaler skipped.
    ``inject_inf_step``: at that step the first stage's gradients get an inf (only there)."""
    model = make_model(family)
    stage = build_stage(model, mesh, virtual_stages=virtual_stages)
    config = px.RuntimeConfig(zero_stage=zero_stage, precision=precision,
                              activation_checkpointing=activation_checkpointing)
    stage, opt = px.initialize(stage, config, group=mesh.dp_group, **OPTIMIZER)
    pipe = PipelineSchedule(stage, opt, mesh, schedule=schedule, micro_batches=micro_batches)
    losses, norms, grads, skipped = [], [], {}, []
    for step in range(steps):
        idx, targets, weight = _replica_batch(*batch(step), mesh)
        losses.append(float(pipe.train_step(idx, targets, weight=weight)))
        if step == 0:
            grads = full_grads(stage)
        if step == inject_inf_step and mesh.is_first_stage:
            opt.grad_shards()[0].view(-1)[0] = float("inf")
        if clip is not None:
            norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step()
        if opt.loss_scaler is not None:
            skipped.append(opt.loss_scaler.state_dict()["_consecutive_skips"] > 0)
        opt.zero_grad()
    eval_loss = float(pipe.eval_step(*batch(steps))) if mesh.dims.dp == 1 else None
    params = {n: p.detach().float().clone() for n, p in stage.named_parameters()}
    checkpointed = len(checkpointed_blocks(stage))
    return {"params": params, "losses": losses, "norms": norms, "grads": grads, "skipped": skipped,
            "pp_rank": mesh.pp_rank, "pp_tied": dict(parallel_state(stage).pp_tied), "checkpointed": checkpointed,
            "eval_loss": eval_loss}


def zero3_refused(mesh) -> str:
    """The error PipelineSchedule gives for a ZeRO-3 stage."""
    stage, opt = px.initialize(build_stage(make_model("gpt"), mesh), px.RuntimeConfig(zero_stage=3),
                               group=mesh.dp_group)
    try:
        PipelineSchedule(stage, opt, mesh)
    except ValueError as exc:
        return str(exc)
    return "accepted"


def tensor_pipeline(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """TP=2 x PP=2 (x DP = world / 4): each case's full parameters after training (gathered over
    the tensor-parallel group) and losses."""
    from parallax.parallel.tensor.plan import gather_tensor_parallel, parallelize

    out = []
    for case in cases:
        mesh = init_mesh(ParallelDims.for_world(world_size, tp=2, pp=2))
        model = parallelize(make_model(case["family"]), mesh, sequence_parallel=case["sequence_parallel"])
        stage = build_stage(model, mesh, virtual_stages=case.get("virtual_stages", 1))
        # No group: a parallel model is sharded over its mesh's data-parallel group by default.
        stage, opt = px.initialize(stage, px.RuntimeConfig(zero_stage=case["zero_stage"]), **OPTIMIZER)
        pipe = PipelineSchedule(stage, opt, mesh, schedule=case["schedule"], micro_batches=2)
        losses, norms = [], []
        for step in range(3):
            idx, targets, weight = _replica_batch(*batch(step), mesh)
            losses.append(float(pipe.train_step(idx, targets, weight=weight)))
            norms.append(float(opt.clip_grad_norm_(case["clip"])))
            opt.step()
            opt.zero_grad()
        params = {n: gather_tensor_parallel(stage, n, p.detach()).clone() for n, p in stage.named_parameters()}
        out.append({"params": params, "losses": losses, "norms": norms})
    return out
