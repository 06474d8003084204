"""Checkpoints of tensor/pipeline/data-parallel (3D) models: saved per rank, reloaded at another
``(pp, dp, tp)`` layout and ZeRO stage; parameters and AdamW state compared element-wise (as
full tensors) with a single-process torch run."""

from __future__ import annotations

import pytest
import torch

import parallax as px
from tests.distributed import checkpoint_3d_workers as w
from tests.distributed.launch import run_ranks

pytest.importorskip("safetensors")

STEPS = 2


def _assemble(reports: list[dict]) -> dict:
    """{(kind, name): full tensor} from every rank's report; each element must be covered."""
    locals_: dict[tuple, torch.Tensor] = {}  # (kind, name, place) -> this place's tensor (flat)
    covered: dict[tuple, torch.Tensor] = {}
    steps: dict[str, set] = {}
    for rank_report in reports:
        for place, values in rank_report["params"]:
            locals_[("param",) + place] = values.reshape(-1)
            covered[("param",) + place] = torch.ones(values.numel(), dtype=torch.bool)
        for place, local_shape, start, end, state in rank_report["state"]:
            for key, value in state.items():
                if value.dim() == 0:
                    steps.setdefault(place[0], set()).add(float(value))
                    continue
                k = (f"state.{key}",) + place
                flat = locals_.setdefault(k, torch.zeros(local_shape.numel(), dtype=value.dtype))
                flat[start:end] = value.reshape(-1)
                covered.setdefault(k, torch.zeros(local_shape.numel(), dtype=torch.bool))[start:end] = True
    out: dict[tuple, torch.Tensor] = {}
    for (kind, name, full_shape, dim, lo), flat in locals_.items():
        assert covered[(kind, name, full_shape, dim, lo)].all(), (kind, name, "not every element was reported")
        full = out.setdefault((kind, name), torch.full(full_shape, float("nan")))
        target = full if dim is None else full.narrow(dim, lo, flat.numel() // (full.numel() // full_shape[dim]))
        target.copy_(flat.reshape(target.shape))
    return out, steps


def _assert_matches(reports: list[dict], steps: int) -> None:
    got, step_counts = _assemble(reports)
    expected = w.reference(steps)
    assert set(got) == {key for key in expected if key[0] != "state.step"}
    for key, want in expected.items():
        if key[0] == "state.step":
            assert step_counts[key[1]] == {float(want)}, key
        else:
            assert torch.equal(got[key], want), (key, (got[key] - want).abs().max())


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    """Saved at (pp, dp, tp) = (1, 1, 2), ZeRO-2, after STEPS steps; and the ranks' reports."""
    directory = tmp_path_factory.mktemp("ckpt3d") / "tp2"
    return directory, run_ranks(w.save_after, 2, (1, 1, 2), 2, STEPS, str(directory))


@pytest.fixture(scope="module")
def tp2_loads(tp2_checkpoint):
    """The tp2 checkpoint loaded at (pp, dp, tp) = (1, 2, 1) ZeRO-1 and (2, 1, 1) ZeRO-0, then by
    each rank alone as a plain model (and as one of other shapes)."""
    return run_ranks(w.load_and_step_also_alone, 2, [((1, 2, 1), 1), ((2, 1, 1), 0)], str(tp2_checkpoint[0]))


def _assert_loaded_then_stepped(ranks: list[dict]) -> None:
    _assert_matches([r["loaded"] for r in ranks], STEPS)
    _assert_matches([r["stepped"] for r in ranks], STEPS + 1)


def test_tensor_parallel_checkpoint_loads_at_other_layouts(tp2_checkpoint, tp2_loads):
    directory, saved = tp2_checkpoint
    _assert_matches(saved, STEPS)

    manifest = px.checkpoint.read_manifest(directory)
    assert (manifest["world_size"], manifest["mesh"]) == (2, {"pp": 1, "dp": 1, "tp": 2})
    assert manifest["params"]["blocks.1.proj.weight"]["shape"] == [w.WIDTH, w.HIDDEN]  # full shapes
    slices = {(e["name"], e["slice"]["start"]) for s in manifest["shards"] for e in s["entries"] if "slice" in e}
    assert ("blocks.1.proj.weight", w.HIDDEN // 2) in slices and ("embed.weight", 0) in slices
    full, _ = px.checkpoint.full_tensors(directory)
    reference = w.reference(STEPS)
    assert all(torch.equal(full[name], reference[("param", name)]) for name in manifest["params"])

    for layout in zip(*(rank["layouts"] for rank in tp2_loads)):
        _assert_loaded_then_stepped(layout)
    for rank in tp2_loads:
        _assert_loaded_then_stepped([rank["alone"]])


def test_pipeline_checkpoint_loads_at_tensor_parallel_zero3(tmp_path):
    directory = tmp_path / "pp2dp2"
    saved = run_ranks(w.save_after, 4, (2, 2, 1), 1, STEPS, str(directory))  # ZeRO-1 over dp = 2
    _assert_matches(saved, STEPS)
    manifest = px.checkpoint.read_manifest(directory)
    assert manifest["aliases"] == {"head.weight": "embed.weight"}  # the tied head on the last stage: stored once
    assert "head.weight" not in manifest["params"]

    # (pp, dp, tp) = (1, 1, 2) ZeRO-3 and (2, 1, 1) ZeRO-2
    for layout in zip(*run_ranks(w.load_and_step, 2, [((1, 1, 2), 3), ((2, 1, 1), 2)], str(directory))):
        _assert_loaded_then_stepped(layout)


def test_a_model_of_other_full_shapes_is_a_clear_error(tp2_loads):
    message = tp2_loads[0]["mismatch"]
    assert "parameter blocks.0.fc.weight" in message and f"({w.HIDDEN}, {w.WIDTH})" in message, message
    assert f"({w.HIDDEN + 2}, {w.WIDTH})" in message and "first mismatch" in message, message
