"""Sharded checkpoints: resharding across world sizes and stages, integrity, consolidation."""

from __future__ import annotations

import json

import pytest
import torch

import parallax as px
from tests.distributed import checkpoint_workers as cw
from tests.distributed import zero_workers as zw
from tests.distributed.launch import run_ranks

pytest.importorskip("safetensors")


def _continue_matches(directory, world, stage, reference):
    for losses in run_ranks(zw.resume_from, world, stage, 5, str(directory)):
        assert losses == pytest.approx(reference[5:], abs=2e-6), (world, stage)


def test_save_at_2_ranks_resume_at_1_and_4_and_across_stages(tmp_path):
    reference = zw.reference_losses(10)
    first = run_ranks(zw.save_after, 2, 2, 5, str(tmp_path / "c"))[0]
    assert first == pytest.approx(reference[:5], abs=2e-6)
    manifest = px.checkpoint.read_manifest(tmp_path / "c")
    assert (manifest["world_size"], manifest["stage"], manifest["step"]) == (2, 2, 5)
    assert manifest["aliases"] == {"head.weight": "embed.weight"}
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    _continue_matches(tmp_path / "c", 1, 0, reference)  # 2 -> 1, stage 2 -> 0
    _continue_matches(tmp_path / "c", 4, 3, reference)  # 2 -> 4, stage 2 -> 3


def test_save_at_4_stage_3_resume_at_2_stage_1_and_1_to_4(tmp_path):
    reference = zw.reference_losses(10)
    run_ranks(zw.save_after, 4, 3, 5, str(tmp_path / "c4"))
    _continue_matches(tmp_path / "c4", 2, 1, reference)  # 4 -> 2, stage 3 -> 1
    run_ranks(zw.save_after, 1, 0, 5, str(tmp_path / "c1"))
    _continue_matches(tmp_path / "c1", 4, 2, reference)  # 1 -> 4


def test_bad_checkpoints_give_clear_errors_and_leave_the_model_untouched(tmp_path):
    run_ranks(zw.save_after, 2, 2, 2, str(tmp_path / "c"))
    result = run_ranks(cw.bad_loads, 1, str(tmp_path / "c"))[0]
    assert "parameter embed.weight" in result["mismatch"] and "first mismatch" in result["mismatch"]
    assert result["untouched"]
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    message = run_ranks(cw.load_corrupted, 2, str(tmp_path / "c"))[0]
    assert "shard_00001.safetensors is corrupted" in message and "SHA-256" in message
    with pytest.raises(px.checkpoint.CheckpointError, match="not a parallax checkpoint"):
        px.checkpoint.read_manifest(tmp_path / "nowhere")


def test_consolidate_writes_the_full_model_once(tmp_path):
    from safetensors import safe_open

    full = run_ranks(cw.full_and_consolidated, 2, str(tmp_path / "c"), str(tmp_path / "full.safetensors"))[0]
    with safe_open(str(tmp_path / "full.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["parallax.aliases"]) == {"head.weight": "embed.weight"}
        for name in keys:
            assert torch.equal(f.get_tensor(name), full[name]), name
    assert keys == set(full) - {"head.weight"}  # the tied head is stored once


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    directory = tmp_path / "c"
    for rank, message in enumerate(run_ranks(cw.save_fails_midway, 2, str(directory), timeout_s=20)):
        assert "failed on rank 1" in message and "disk full" in message and "intact" in message, (rank, message)
    assert px.checkpoint.read_manifest(directory)["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"
