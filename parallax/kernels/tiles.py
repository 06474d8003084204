"""Tile scheduling shared by the matmul kernels (``lora_linear``, ``quant_linear``)."""

import triton
import triton.language as tl

__all__ = ["_tile_ids"]


@triton.jit
def _tile_ids(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's row tile and column tile, grouped GROUP_M row tiles at a time (row tiles of one
    group reuse the same column tiles of the weight while it is in L2)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m
