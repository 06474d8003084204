"""ZeRO gradients against single-process PyTorch, element-wise: parameters unused in a step,
the reduced gradients themselves, and gradient clipping."""

from __future__ import annotations

import math

import pytest

from tests.distributed import gradient_workers as gw
from tests.distributed.launch import run_ranks

STAGES = (0, 1, 2, 3)


def _worst(diffs: dict[str, float]) -> tuple[str, float]:
    name = max(diffs, key=diffs.get)
    return name, diffs[name]


def test_parameters_unused_in_a_step_are_skipped_as_single_process_torch_skips_them():
    """LayerDrop (block 1 dropped by every rank on odd steps), a conditional head and an expert
    used by both ranks, one or none (data-dependent; each alone in its flat buffer in stages
    0-2), and accumulation (the head used in one micro-step of one rank): with SGD (momentum
    0.9) and AdamW (weight decay 0.1), a parameter that no rank used has no gradient and is not
    stepped, one used by some ranks gets the average with zeros from the others. Gradients at
    every step and parameters after 6 steps equal the single-process run's; also with
    zero_grad(set_to_none=False), after which torch steps every parameter that had a gradient,
    and with the optimizer offloaded to the CPU (HostAdamW).

    Stage 3 gathers each unit on every rank, so data-dependent use is tested outside the units
    (the head, in the root unit); the expert, inside a unit, at stages 0-2."""
    cases = [(schedule, opt, stage) for schedule in ("layerdrop", "heads", "routing", "accumulation")
             for opt in ("sgd", "adamw") for stage in STAGES if not (schedule == "routing" and stage == 3)]
    cases += [("layerdrop_zeroed", "adamw", stage) for stage in STAGES]  # zero_grad(set_to_none=False)
    cases += [(schedule, "adamw_offload", stage) for schedule in ("layerdrop", "heads") for stage in (1, 2, 3)]
    for rank_results in run_ranks(gw.unused_parameters, 2, cases, 6, timeout_s=60):
        for r in rank_results:
            name, diff = _worst(r["grads"])
            assert diff <= 1e-6, f"{r['case']}: gradient of {name} differs by {diff:.3g} (inf: None on one side)"
            name, diff = _worst(r["params"])
            assert diff <= 1e-6, f"{r['case']}: {name} differs by {diff:.3g}"


def test_reduced_gradients_equal_single_process_gradients():
    """px.zero.full_grads (what the optimizer steps with: reduced, averaged over ranks) equals
    torch's p.grad element-wise at every stage, every parameter used."""
    cases = [("always", "sgd", stage) for stage in STAGES]
    for rank_results in run_ranks(gw.unused_parameters, 2, cases, 2, timeout_s=60):
        for r in rank_results:
            name, diff = _worst(r["grads"])
            assert diff <= 1e-6, f"{r['case']}: gradient of {name} differs by {diff:.3g}"


def test_clip_grad_norm_matches_torch_for_the_2_norm_and_the_max_norm():
    """opt.clip_grad_norm_ returns torch.nn.utils.clip_grad_norm_'s total norm (each rank holds
    only its shard: the inf-norm is the largest entry on any rank) and clips alike."""
    for rank_results in run_ranks(gw.clipping, 2, list(STAGES), [2.0, math.inf], timeout_s=60):
        for r in rank_results:
            assert r["norms"] == pytest.approx(r["ref_norms"], rel=1e-6), r["case"]
            assert min(r["norms"]) > r["max_norm"], f"{r['case']}: no clipping happened"
            assert r["params"] <= 1e-6, f"{r['case']}: parameters differ by {r['params']:.3g}"


def test_per_parameter_adam_steps_survive_a_checkpoint_across_world_sizes_and_stages(tmp_path):
    """Under LayerDrop the dropped block has taken fewer Adam steps than the rest: saved at 2
    ranks (stage 2) and resumed at 1 (stage 3), the run goes on as single-process torch."""
    pytest.importorskip("safetensors")
    run_ranks(gw.save_layerdrop, 2, 2, 3, str(tmp_path / "c"))
    worst = run_ranks(gw.resume_layerdrop, 1, 3, 3, str(tmp_path / "c"))[0]
    assert worst <= 1e-6, worst
