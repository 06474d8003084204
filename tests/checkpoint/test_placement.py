"""Checkpoint placement: a rank's elements found in the slices a checkpoint saved at another
tensor-parallel layout, who writes what, and the manifest's merged metadata (no processes)."""

from __future__ import annotations

import pytest
import torch

from parallax.checkpoint.placement import CheckpointError, Place, RankRole, Region, check_coverage, merge_meta
from parallax.parallel import Mesh, ParallelDims, ParallelState

FULL = torch.arange(6 * 10 * 3, dtype=torch.float32).reshape(6, 10, 3)


def _slices(dim: int | None, parts: int) -> list[Place]:
    if dim is None:
        return [Place(tuple(FULL.shape))]
    size = FULL.shape[dim] // parts
    return [Place(tuple(FULL.shape), dim, i * size, (i + 1) * size) for i in range(parts)]


def _local(place: Place) -> torch.Tensor:
    t = FULL if place.dim is None else FULL.narrow(place.dim, place.start, place.end - place.start)
    return t.reshape(-1)


@pytest.mark.parametrize("saved_dim, saved_parts", [(None, 1), (0, 2), (1, 5), (2, 3)])
@pytest.mark.parametrize("target_dim, target_parts", [(None, 1), (0, 3), (1, 2), (2, 3)])
def test_a_region_is_read_from_the_saved_slices(saved_dim, saved_parts, target_dim, target_parts):
    saved = _slices(saved_dim, saved_parts)
    for target in _slices(target_dim, target_parts):
        n = target.numel
        for start, end in ((0, n), (1, n - 1), (7, 8), (n // 2, n), (29, 31)):
            region = Region("w", saved, target, start, end)
            got = region.assemble([_local(r.place)[r.start: r.end] for r in region.reads])
            assert torch.equal(got, _local(target)[start:end]), (target, start, end)
            row = target.numel // target.local_shape[0]
            rows = -(-end // row) - start // row  # the target's rows that hold [start, end)
            for r in region.reads:  # from each saved slice, at most those rows
                assert r.end - r.start <= rows * (r.place.numel // r.place.local_shape[0]), (target, r)


def test_a_region_of_a_0_dim_parameter():
    place = Place(())
    assert Region("s", [place], place, 0, 1).reads[0].end == 1


def test_a_missing_slice_is_an_error():
    with pytest.raises(CheckpointError, match="elements 0..180 of w .* in no shard"):
        Region("w", _slices(0, 2)[:1], Place(tuple(FULL.shape)), 0, FULL.numel())


def _role(tp: int, tp_rank: int, tp_dims: dict, pp_tied: dict | None = None, pp: int = 1) -> RankRole:
    dims = ParallelDims(pp=pp, tp=tp)
    rank = dims.rank_of(0, 0, tp_rank)
    return RankRole(ParallelState(Mesh(dims, rank, None, None, None), tp_dims=tp_dims, pp_tied=pp_tied or {}), 0)


def test_places_and_who_writes():
    role = _role(2, 1, {"w": 1})
    assert role.saved_place("w", (4, 3)) == Place((4, 6), 1, 3, 6)
    assert role.saved_place("b", (4,)) == Place((4,))
    assert role.saves("w") and not role.saves("b")  # b is replicated: tensor-parallel rank 0 writes it
    assert role.target_place("w", (4, 6), (4, 3)) == Place((4, 6), 1, 3, 6)
    with pytest.raises(CheckpointError, match=r"parameter w: the checkpoint's full shape \(4, 1\) does not split "
                                              "into tp=2"):
        role.target_place("w", (4, 1), (4, 3))
    with pytest.raises(CheckpointError, match=r"the checkpoint holds shape \(4, 5\), the model \(4, 3\)"):
        role.target_place("w", (4, 5), (4, 3))  # rank 1 of an uneven split holds 2 columns of 5
    with pytest.raises(CheckpointError, match=r"parameter w: the checkpoint holds shape \(4, 8\), the model \(4, 3\) "
                                              r"\(its slice 1 of tp=2 along dim 1\)"):
        role.target_place("w", (4, 8), (4, 3))
    last = RankRole(ParallelState(Mesh(ParallelDims(pp=2), 1, None, None, None), pp_tied={"head.weight": 0}), 0)
    assert not last.saves("head.weight") and last.saves("norm.weight")
    assert RankRole(None, 1).saves("anything") and not RankRole(None, 1).saves_replicated


def _shard(rank, params, pp_tied, entries=()):
    return {"rank": rank, "file": f"shard_{rank:05d}.safetensors", "params": params, "aliases": {}, "buffers": {},
            "pp_tied": pp_tied, "entries": list(entries)}


def test_a_pipeline_tied_parameter_is_listed_once_under_the_writer_name():
    meta = {"shape": [10, 4], "dtype": "float32", "requires_grad": True}
    shards = [_shard(0, {"embed.weight": meta}, {"embed.weight": 1}), _shard(1, {}, {"head.weight": 0})]
    params, aliases, _ = merge_meta(shards)
    assert list(params) == ["embed.weight"] and aliases == {"head.weight": "embed.weight"}
    with pytest.raises(CheckpointError, match="names no parameter tied back"):
        merge_meta([_shard(0, {"embed.weight": meta}, {}), _shard(1, {}, {"head.weight": 0})])


def test_coverage_catches_a_parameter_written_twice_or_partly():
    params = {"w": {"shape": [2, 3]}}
    piece = {"name": "w", "start": 0, "end": 6}
    check_coverage(params, [_shard(0, {}, {}, [piece])])
    with pytest.raises(CheckpointError, match="written by two ranks .*ParallelState.pp_tied"):
        check_coverage(params, [_shard(0, {}, {}, [piece]), _shard(1, {}, {}, [piece])])
    with pytest.raises(CheckpointError, match="wrote 4 of its 6 elements"):
        check_coverage(params, [_shard(0, {}, {}, [{"name": "w", "start": 0, "end": 4}])])


def _sectioned(dim: int, sections: tuple[int, ...], tp: int) -> list[Place]:
    return [Place(tuple(FULL.shape), dim, sections=sections, rank=r, tp=tp) for r in range(tp)]


def _uneven(dim: int, tp: int) -> list[Place]:
    from parallax.parallel.state import tp_slice

    return [Place(tuple(FULL.shape), dim, *tp_slice(FULL.shape[dim], tp, r)) for r in range(tp)]


@pytest.mark.parametrize("saved, targets", [
    (_sectioned(1, (4, 2, 4), 2), [Place(tuple(FULL.shape))]),        # fused q, k, v at tp=2 -> one process
    (_sectioned(1, (4, 2, 4), 2), _sectioned(1, (4, 2, 4), 1)),       # ... -> tp=1 written as sections
    ([Place(tuple(FULL.shape))], _sectioned(0, (2, 2, 2), 2)),        # one process -> tp=2 sections
    (_uneven(1, 3), _sectioned(1, (4, 2, 4), 2)),                     # an uneven split -> sections
    (_sectioned(1, (4, 2, 4), 2), _uneven(1, 4)),                     # sections -> an uneven split
])
def test_sectioned_and_uneven_slices_reshard(saved, targets):
    """A fused projection's slice is one piece of each section (not a box of the full tensor); a
    vocabulary that tp does not divide splits unevenly (torch.chunk's sizes)."""
    local = {place: place.take(FULL).reshape(-1) for place in saved}
    for target in targets:
        expected = target.take(FULL).reshape(-1)
        for start, end in ((0, target.numel), (3, target.numel - 2)):
            region = Region("w", saved, target, start, end)
            got = region.assemble([local[r.place][r.start: r.end] for r in region.reads])
            assert torch.equal(got, expected[start:end]), (target, start, end)
    assert Place.from_json(FULL.shape, saved[0].to_json()) == saved[0]


def test_a_sectioned_place_holds_its_slice_of_each_section():
    place = Place((10, 3), 0, sections=(4, 2, 4), rank=1, tp=2)
    assert place.segments() == [(2, 4), (5, 6), (8, 10)] and place.local_shape == (5, 3)
    source, full = torch.arange(1, 31.0).reshape(10, 3), torch.zeros(10, 3)
    place.put(full, place.take(source))
    assert torch.equal(full[[2, 3, 5, 8, 9]], source[[2, 3, 5, 8, 9]]) and full[[0, 1, 4, 6, 7]].abs().sum() == 0
