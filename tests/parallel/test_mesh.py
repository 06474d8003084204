"""The (pp, dp, tp) mesh: rank layout (tp innermost) and each axis's groups, without processes."""

from __future__ import annotations

import pytest
import torch

from parallax.parallel.mesh import ParallelDims, _axis_groups
from parallax.parallel.state import tp_slice


def test_ranks_lay_tensor_parallel_innermost_and_pipeline_outermost():
    dims = ParallelDims(pp=2, dp=3, tp=2)
    coords = [dims.coordinates(r) for r in range(dims.world_size)]
    assert coords[:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)] and coords[-1] == (1, 2, 1)
    assert all(dims.rank_of(*dims.coordinates(r)) == r for r in range(12))
    assert _axis_groups(dims, "tp")[:2] == [[0, 1], [2, 3]]       # a node of 2 ranks holds one tp group
    assert _axis_groups(dims, "dp")[0] == [0, 2, 4]
    assert _axis_groups(dims, "pp")[0] == [0, 6]
    for axis in ("tp", "dp", "pp"):  # every rank in exactly one group of each axis
        assert sorted(r for g in _axis_groups(dims, axis) for r in g) == list(range(12))


def test_a_mesh_that_does_not_fill_the_world_is_refused():
    assert ParallelDims.for_world(8, tp=2, pp=2) == ParallelDims(pp=2, dp=2, tp=2)
    with pytest.raises(ValueError, match=r"tp=3 x pp=1 = 3 ranks does not divide the world size 8"):
        ParallelDims.for_world(8, tp=3)
    with pytest.raises(ValueError, match="does not match the world size 6"):
        ParallelDims(pp=2, dp=2, tp=2).check_world(6)
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        ParallelDims(tp=0)


def test_tp_slices_tile_the_dimension_like_torch_chunk():
    for size, tp in ((257, 2), (257, 3), (97, 4), (64, 4), (7, 4)):
        slices = [tp_slice(size, tp, r) for r in range(tp)]
        assert slices[0][0] == 0 and slices[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        chunks = [len(c) for c in torch.arange(size).chunk(tp)]
        assert [e - s for s, e in slices] == chunks + [0] * (tp - len(chunks))
