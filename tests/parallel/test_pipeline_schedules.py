"""Pipeline schedules and the stage split, in one process (no ranks)."""

from __future__ import annotations

import pytest
import torch

from parallax.models import GPT, GPTConfig, Llama, LlamaConfig
from parallax.parallel import Mesh, ParallelDims
from parallax.parallel.pipeline import (
    Action,
    bubble_fraction,
    build_stage,
    check_pipeline,
    schedule_actions,
    simulate,
    stage_layout,
)
from parallax.zero.module import default_units

CASES = [("gpipe", 4, 8, 1), ("gpipe", 3, 2, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 3, 1), ("1f1b", 2, 1, 1),
         ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 2), ("interleaved", 4, 4, 3), ("interleaved", 2, 6, 2)]


@pytest.mark.parametrize("kind,pp,m,v", CASES)
def test_every_action_once_forward_before_backward_and_runnable(kind, pp, m, v):
    actions = schedule_actions(kind, pp, m, v)
    for rank, mine in enumerate(actions):
        expected = {Action(op, i, c * pp + rank) for op in ("forward", "backward") for i in range(m) for c in range(v)}
        assert len(mine) == 2 * m * v and set(mine) == expected
        for position, a in enumerate(mine):
            if a.op == "backward":
                assert mine.index(Action("forward", a.micro_batch, a.stage)) < position
    simulate(actions)  # raises if the cross-rank dependencies deadlock


@pytest.mark.parametrize("kind,pp,m,v", CASES)
@pytest.mark.parametrize("forward_time,backward_time", [(1.0, 2.0), (1.0, 1.0)])
def test_simulated_bubble_equals_the_formula(kind, pp, m, v, forward_time, backward_time):
    measured = simulate(schedule_actions(kind, pp, m, v), forward_time, backward_time)["bubble"]
    assert measured == pytest.approx(bubble_fraction(pp, m, v), abs=1e-12)
    assert bubble_fraction(pp, m, v) == pytest.approx((pp - 1) / (v * m + pp - 1))


def test_one_f_one_b_holds_at_most_pp_micro_batches_in_flight():
    """1F1B's point: rank r keeps at most pp - r activations alive (GPipe keeps all m)."""
    for rank, mine in enumerate(schedule_actions("1f1b", 4, 8)):
        live, most = 0, 0
        for a in mine:
            live += 1 if a.op == "forward" else -1
            most = max(most, live)
        assert most == 4 - rank


def test_simulate_detects_a_deadlock():
    bad = [[Action("forward", 0, 0), Action("backward", 0, 0)],
           [Action("backward", 0, 1), Action("forward", 0, 1)]]
    with pytest.raises(ValueError, match="before its forward"):
        simulate(bad)
    crossed = [[Action("forward", 1, 0), Action("forward", 0, 0)], [Action("forward", 0, 1), Action("forward", 1, 1)]]
    assert simulate(crossed)["makespan"] == 4.0  # rank 1 waits for micro-batch 0, but it runs
    f, b = (lambda i, s: Action("forward", i, s)), (lambda i, s: Action("backward", i, s))
    cycle = [[f(0, 0), b(0, 0), f(1, 0), b(1, 0)], [f(1, 1), b(1, 1), f(0, 1), b(0, 1)]]
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(cycle)


@pytest.mark.parametrize("args,match", [
    (("interleaved", 2, 3, 2), "micro_batches a multiple of pp"),
    (("1f1b", 2, 4, 2), "virtual_stages=2 needs schedule 'interleaved'"),
    (("zigzag", 2, 4, 1), "schedule must be one of"),
    (("1f1b", 2, 0, 1), "micro_batches must be a positive integer"),
])
def test_bad_schedule_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        schedule_actions(*args)


def test_layout_balances_costs_and_interleaves_chunks():
    assert stage_layout(4, 2) == [[range(0, 2)], [range(2, 4)]]
    assert stage_layout(5, 2) == [[range(0, 3)], [range(3, 5)]]
    assert stage_layout(8, 2, virtual_stages=2) == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]
    # One expensive block: alone on its stage; the rest share the other.
    assert stage_layout(4, 2, balance=[1, 1, 1, 6]) == [[range(0, 3)], [range(3, 4)]]
    assert stage_layout(6, 3, balance=[5, 1, 1, 1, 1, 5]) == [[range(0, 1)], [range(1, 5)], [range(5, 6)]]


@pytest.mark.parametrize("args,match", [
    ((3, 2, 2), r"n_layer=3 blocks cannot be split into pp=2 x virtual_stages=2 = 4"),
    ((4, 0, 1), "pp must be a positive integer"),
    ((4, 2, 0), "virtual_stages must be a positive integer"),
])
def test_check_pipeline_names_the_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        check_pipeline(*args)


@pytest.mark.parametrize("balance,match", [([1, 2], "2 per-block costs for n_layer=4"),
                                           ([1, 1, -1, 1], r"balance\[2\] must be a non-negative"),
                                           ("flops", "balance must be 'params'")])
def test_bad_balance(balance, match):
    with pytest.raises(ValueError, match=match):
        stage_layout(4, 2, balance=balance)


def _mesh(pp_rank: int, pp: int = 2) -> Mesh:
    """A mesh without process groups: enough for build_stage, which communicates nothing."""
    return Mesh(ParallelDims(pp=pp), rank=pp_rank, tp_group=None, dp_group=None, pp_group=None,
                pp_ranks=list(range(pp)))


def _gpt(n_layer: int = 4) -> GPT:
    return GPT(GPTConfig(block_size=16, vocab_size=67, n_layer=n_layer, n_head=2, n_embd=32))


def test_stages_keep_the_full_models_names_and_share_out_every_parameter():
    model = _gpt()
    full = {n for n, _ in model.named_parameters()}
    first, last = (build_stage(model, _mesh(r)) for r in (0, 1))
    first_names = {n for n, _ in first.named_parameters()}
    last_names = {n for n, _ in last.named_parameters()}
    assert first_names == {"transformer.wte.weight", "transformer.wpe.weight"} | {
        n for n in full if n.startswith(("transformer.h.0.", "transformer.h.1."))}
    # The tied LM head: the embedding matrix under the name lm_head.weight on the last stage.
    assert last_names - full == {"lm_head.weight"} and first_names | last_names == full | {"lm_head.weight"}
    assert first._parallax_parallel.pp_tied == {"transformer.wte.weight": 1}
    assert last._parallax_parallel.pp_tied == {"lm_head.weight": 0}
    assert set(first.state_dict()) <= set(model.state_dict())


def test_llama_untied_has_no_pp_tied_and_interleaved_chunks():
    model = Llama(LlamaConfig(block_size=16, vocab_size=67, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
                              intermediate_size=48, tie_word_embeddings=False))
    stage = build_stage(model, _mesh(1), virtual_stages=2)
    names = {n for n, _ in stage.named_parameters()}
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"1", "3"}
    assert "lm_head.weight" in names and "model.norm.weight" in names and "model.embed_tokens.weight" not in names
    assert stage._parallax_parallel.pp_tied == {}
    assert stage.chunks == [range(1, 2), range(3, 4)] and stage.virtual_stage(1) == 3


def test_default_units_finds_a_stages_blocks():
    """Activation checkpointing and ZeRO units find the blocks of a stage's ModuleDict (one is enough)."""
    model = _gpt(n_layer=2)
    for r in (0, 1):
        stage = build_stage(model, _mesh(r))
        assert default_units(stage) == [model.transformer.h[r]]
    assert default_units(torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})) == []


def test_build_stage_refuses_shared_layers_and_other_models():
    shared = GPT(GPTConfig(block_size=16, vocab_size=67, n_layer=4, n_head=2, n_embd=32, share_layers=2))
    with pytest.raises(ValueError, match="share_layers"):
        build_stage(shared, _mesh(0))
    with pytest.raises(ValueError, match="parallax's GPT and Llama-family"):
        build_stage(torch.nn.Linear(2, 2), _mesh(0))
