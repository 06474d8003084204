"""ZeRO data parallelism (stages 0-3) for any nn.Module, on torch.distributed.

    model = px.zero.shard(model, stage=3, prefetch=1, bucket_mb=25)
    opt = px.zero.ZeroOptimizer(model, px.optim.AdamW, lr=3e-4)
    loss = model(x, y); opt.backward(loss); opt.step(); opt.zero_grad()
"""

from parallax.zero.comm import CollectiveError
from parallax.zero.module import STAGES, ZeroModule, default_units, shard
from parallax.zero.optimizer import ZeroOptimizer
from parallax.zero.state import full_grads, full_state_dict, memory_report

__all__ = ["CollectiveError", "STAGES", "ZeroModule", "ZeroOptimizer", "default_units", "full_grads",
           "full_state_dict", "memory_report", "shard"]
