"""A step-time model for ranking configurations (not a prediction of seconds to rely on).

    time = compute + communication + optimizer step     (no overlap assumed: an upper bound)

* compute: the FLOPs of the traced forward + backward (matmuls and attention; with activation
  checkpointing the recomputed forward is in the trace, about +1/3) at ``fp32_flops_per_s`` or,
  for bf16/fp16, ``bf16_flops_per_s`` (twice as fast by default: TF32 against bf16 tensor cores).
  Without a trace (a bare parameter count): 6 FLOPs per parameter and token, 8 with
  checkpointing.
* communication per rank, ring collectives over N ranks of b-byte elements: stages 0-2 move
  2 (N-1)/N b Psi (all-reduce = reduce-scatter + all-gather), stage 3 3 (N-1)/N b Psi (an
  all-gather in forward and again in backward, a reduce-scatter), at ``network_bytes_per_s``;
  N = 1 moves nothing. Low precision halves the bytes.
* optimizer step on the device: AdamW reads and writes 28 bytes per element it updates (fp32:
  param, grad, m, v in and param, m, v out; mixed precision: grad, master, m, v in and master, m,
  v, param out) at ``memory_bytes_per_s``; Psi elements in stage 0, Psi/N in stages 1-3.
  With ``offload="cpu"`` the host's C++ AdamW moves 24 + 2b bytes per element at
  ``host_bytes_per_s`` while the gradients go down and the parameters come back over PCIe (2b
  bytes per element at ``pcie_bytes_per_s``); ``HostAdamW`` pipelines the two, so the slower
  one counts.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Hardware", "StepTime", "step_time"]


@dataclass(kw_only=True)
class Hardware:
    """Sustained per-rank rates (not datasheet peaks). Defaults: an H100-class GPU in an NVLink node.

    bf16_flops_per_s: matmul rate in bf16/fp16 (about 40% of an H100's 989 TFLOP/s dense).
    fp32_flops_per_s: matmul rate in fp32 (TF32 tensor cores: half the bf16 rate).
    network_bytes_per_s: collective bus bandwidth per rank (NVLink ~ 100-350e9; InfiniBand ~ 25-50e9).
    memory_bytes_per_s: device memory bandwidth (HBM3 ~ 3e12; the optimizer step is bound by it).
    host_bytes_per_s: host memory bandwidth one rank's CPU AdamW gets (a socket's ~200e9 shared by 8 GPUs).
    pcie_bytes_per_s: host <-> device copy bandwidth (PCIe 5 x16 ~ 50e9 peak).
    """

    bf16_flops_per_s: float = 400e12
    fp32_flops_per_s: float = 200e12
    network_bytes_per_s: float = 100e9
    memory_bytes_per_s: float = 2.5e12
    host_bytes_per_s: float = 25e9
    pcie_bytes_per_s: float = 25e9

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Hardware.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float
    optimizer_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s + self.optimizer_s


ADAMW_DEVICE_BYTES = 28  # per updated element, read + written


def step_time(*, flops: float, num_params: int, world_size: int, stage: int, element_size: int, offload: str,
              hw: Hardware) -> StepTime:
    """The modelled time of one step (forward, backward, optimizer) on one rank."""
    rate = hw.fp32_flops_per_s if element_size >= 4 else hw.bf16_flops_per_s
    compute = flops / rate
    n = world_size
    volume = (3 if stage == 3 else 2) * (n - 1) / n * element_size * num_params
    comm = volume / hw.network_bytes_per_s
    updated = num_params / (n if stage >= 1 else 1)
    if offload == "cpu":
        host = (24 + 2 * element_size) * updated / hw.host_bytes_per_s
        pcie = 2 * element_size * updated / hw.pcie_bytes_per_s
        optimizer = max(host, pcie)
    else:
        optimizer = ADAMW_DEVICE_BYTES * updated / hw.memory_bytes_per_s
    return StepTime(compute, comm, optimizer)
