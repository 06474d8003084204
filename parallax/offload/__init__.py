"""CPU offload: optimizer state in pinned host memory, updated by the C++ AdamW with overlapped copies."""

from parallax.offload.host_adamw import HostAdamW

__all__ = ["HostAdamW"]
