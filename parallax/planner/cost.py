"""A step-time model for ranking configurations (not a prediction of seconds to rely on).

    time = compute + pipeline bubble + communication + optimizer step     (no overlap assumed)

* compute: the FLOPs of the traced forward + backward (matmuls and attention; with activation
  checkpointing the recomputed forward is in the trace, about +1/3) at ``fp32_flops_per_s`` or,
  for bf16/fp16, ``bf16_flops_per_s`` (twice as fast by default: TF32 against bf16 tensor cores).
  Without a trace (a bare parameter count): 6 FLOPs per parameter and token, 8 with
  checkpointing. A rank of a ``tp`` x ``pp`` model-parallel group computes 1/(tp pp) of them.
* data-parallel communication per rank, ring collectives over N = dp ranks of b-byte elements:
  stages 0-2 move 2 (N-1)/N b Psi (all-reduce = reduce-scatter + all-gather), stage 3
  3 (N-1)/N b Psi (an all-gather in forward and again in backward, a reduce-scatter), Psi being
  the parameters this rank's model-parallel shard holds; N = 1 moves nothing. Low precision
  halves the bytes. The link is ``network_bytes_per_s`` while the group stays within a node
  (``ranks_per_node``); across nodes the all-reduce is hierarchical (NCCL's: reduce-scatter in
  the node, all-reduce of 1/g of the bytes across nodes, all-gather in the node, g being the
  group's ranks per node), so a rank gets g x ``inter_node_bytes_per_s`` (its node's NICs are
  shared by the tp groups of the node).
* tensor-parallel communication (Megatron-LM, Shoeybi et al. 2019, section 3): every layer
  all-reduces its (B, T, C) activations twice in forward and twice in backward (and twice more
  when checkpointing recomputes the forward), each a ring all-reduce of 2 (tp-1)/tp of the bytes,
  on the intra-node link (the tensor-parallel group is the innermost mesh dimension).
* pipeline: the bubble idles each stage for (p-1)/(m+p-1) of the pipelined time (GPipe and 1F1B;
  interleaved with v virtual stages: (p-1)/(v m+p-1)), i.e. adds (p-1)/(v m) of the busy time;
  each micro-batch's activations go forward and its gradients back (v times with interleaving).
* optimizer step on the device: AdamW reads and writes 28 bytes per element it updates (fp32:
  param, grad, m, v in and param, m, v out; mixed precision: grad, master, m, v in and master, m,
  v, param out) at ``memory_bytes_per_s``; Psi elements in stage 0, Psi/N in stages 1-3.
  With ``offload="cpu"`` the host's C++ AdamW moves 24 + 2b bytes per element at
  ``host_bytes_per_s`` while the gradients go down and the parameters come back over PCIe (2b
  bytes per element at ``pcie_bytes_per_s``); ``HostAdamW`` pipelines the two, so the slower
  one counts.

Every collective also pays ``latency_s`` per ring step (2 (n-1) steps for an all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Hardware", "StepTime", "step_time", "ring_allreduce_s", "bubble_fraction", "tensor_parallel_comm_s",
           "pipeline_p2p_s", "link_bytes_per_s", "data_parallel_bytes_per_s", "gpt_step_flops", "SCHEDULES"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(kw_only=True)
class Hardware:
    """Sustained per-rank rates (not datasheet peaks). Defaults: an H100-class GPU in an NVLink node.

    bf16_flops_per_s: matmul rate in bf16/fp16 (about 40% of an H100's 989 TFLOP/s dense).
    fp32_flops_per_s: matmul rate in fp32 (TF32 tensor cores: half the bf16 rate).
    network_bytes_per_s: collective bus bandwidth per rank within a node (NVLink ~ 100-350e9).
    inter_node_bytes_per_s: the same between nodes (InfiniBand, one 400 Gb/s NIC per GPU ~ 50e9).
    memory_bytes_per_s: device memory bandwidth (HBM3 ~ 3e12; the optimizer step is bound by it).
    host_bytes_per_s: host memory bandwidth one rank's CPU AdamW gets (a socket's ~200e9 shared by 8 GPUs).
    pcie_bytes_per_s: host <-> device copy bandwidth (PCIe 5 x16 ~ 50e9 peak).
    ranks_per_node: ranks that share the intra-node link (a group of consecutive ranks no larger
        than this communicates at ``network_bytes_per_s``).
    latency_s: time of one step of a ring collective or of a point-to-point message, besides
        the bytes (0 by default: large messages).
    """

    bf16_flops_per_s: float = 400e12
    fp32_flops_per_s: float = 200e12
    network_bytes_per_s: float = 100e9
    inter_node_bytes_per_s: float = 50e9
    memory_bytes_per_s: float = 2.5e12
    host_bytes_per_s: float = 25e9
    pcie_bytes_per_s: float = 25e9
    ranks_per_node: int = 8
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Hardware.{name} must be a number, got {value!r}")
            if name == "latency_s":
                if not value >= 0:
                    raise ValueError(f"Hardware.latency_s must be >= 0, got {value!r}")
            elif not value > 0:
                raise ValueError(f"Hardware.{name} must be a positive number, got {value!r}")
        if self.ranks_per_node != int(self.ranks_per_node):
            raise ValueError(f"Hardware.ranks_per_node must be a whole number, got {self.ranks_per_node!r}")
        self.ranks_per_node = int(self.ranks_per_node)


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float  # tensor-parallel + pipeline point-to-point + data-parallel
    optimizer_s: float
    bubble_s: float = 0.0  # pipeline fill and drain
    tp_comm_s: float = 0.0
    p2p_s: float = 0.0
    dp_comm_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.compute_s + self.bubble_s + self.comm_s + self.optimizer_s


ADAMW_DEVICE_BYTES = 28  # per updated element, read + written


def link_bytes_per_s(extent: int, hw: Hardware) -> float:
    """Bandwidth of a group whose ranks lie within ``extent`` consecutive ranks: intra-node when
    they fit in one node, else the inter-node link."""
    return hw.network_bytes_per_s if extent <= hw.ranks_per_node else hw.inter_node_bytes_per_s


def data_parallel_bytes_per_s(tp: int, dp: int, hw: Hardware) -> float:
    """Effective per-rank bandwidth of the data-parallel all-reduce (see the module docstring)."""
    if tp * dp <= hw.ranks_per_node:
        return hw.network_bytes_per_s
    per_node = max(1, hw.ranks_per_node // tp)
    return min(hw.network_bytes_per_s, per_node * hw.inter_node_bytes_per_s)


def ring_allreduce_s(nbytes: float, n: int, bytes_per_s: float, latency_s: float = 0.0) -> float:
    """A ring all-reduce of ``nbytes`` over ``n`` ranks: 2 (n-1) steps, each sending nbytes / n."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * latency_s + 2 * (n - 1) / n * nbytes / bytes_per_s


def bubble_fraction(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle share of a pipelined step: (p-1) / (v m + p-1) (GPipe, 1F1B: v = 1)."""
    return (pp - 1) / (virtual_stages * micro_batches + pp - 1)


def tensor_parallel_comm_s(*, tokens: int, hidden: int, layers: int, tp: int, element_size: int, hw: Hardware,
                           recompute: bool = False) -> float:
    """All-reduces of the (tokens, hidden) activations of ``layers`` layers over ``tp`` ranks:
    2 in forward + 2 in backward per layer, 2 more when the forward is recomputed. Sequence
    parallelism replaces each by a reduce-scatter + all-gather: the same bytes."""
    per_layer = 6 if recompute else 4
    nbytes = tokens * hidden * element_size
    return per_layer * layers * ring_allreduce_s(nbytes, tp, link_bytes_per_s(tp, hw), hw.latency_s)


def pipeline_p2p_s(*, tokens: int, hidden: int, pp: int, micro_batches: int, element_size: int, hw: Hardware,
                   split: int = 1, virtual_stages: int = 1, extent: int | None = None) -> float:
    """Point-to-point traffic of one stage: each micro-batch's (tokens, hidden) activations sent on
    and their gradients sent back (``virtual_stages`` times each), ``split`` ways (sequence
    parallelism or Megatron's scatter/gather send 1/tp per rank). ``extent``: the ranks one
    pipeline spans (default: more than a node, i.e. the inter-node link)."""
    if pp <= 1:
        return 0.0
    link = link_bytes_per_s(extent if extent is not None else hw.ranks_per_node + 1, hw)
    transfers = 2 * micro_batches * virtual_stages
    return transfers * (hw.latency_s + tokens * hidden * element_size / split / link)


def step_time(*, flops: float, num_params: int, world_size: int, stage: int, element_size: int, offload: str,
              hw: Hardware, tp: int = 1, pp: int = 1, micro_batches: int = 1, virtual_stages: int = 1,
              tokens: int = 0, hidden: int = 0, layers: int = 0, recompute: bool = False,
              sequence_parallel: bool = False, p2p_split: int | None = None) -> StepTime:
    """The modelled time of one step (forward, backward, optimizer) on one rank.

    ``flops``: one micro-batch's forward + backward FLOPs of the whole model; ``num_params``: the
    parameters this rank's model-parallel shard holds; ``world_size``: the data-parallel ranks
    (dp). With ``tp``/``pp`` > 1: ``tokens`` per micro-batch, the model's ``hidden`` width and
    ``layers`` (the whole model's; a stage runs layers / pp). ``p2p_split``: how many ways a
    pipeline send is split (default tp with sequence parallelism, else 1; Megatron-LM's
    scatter/gather optimization also sends 1/tp per rank).
    """
    rate = hw.fp32_flops_per_s if element_size >= 4 else hw.bf16_flops_per_s
    compute = micro_batches * flops / (tp * pp) / rate
    dp = world_size
    volume = (3 if stage == 3 else 2) * (dp - 1) / dp * element_size * num_params
    dp_comm = 0.0
    if dp > 1:
        dp_comm = volume / data_parallel_bytes_per_s(tp, dp, hw) + 2 * (dp - 1) * hw.latency_s
    tp_comm = 0.0
    if tp > 1:
        tp_comm = micro_batches * tensor_parallel_comm_s(tokens=tokens, hidden=hidden, layers=layers // pp, tp=tp,
                                                         element_size=element_size, hw=hw, recompute=recompute)
    p2p = pipeline_p2p_s(tokens=tokens, hidden=hidden, pp=pp, micro_batches=micro_batches,
                         element_size=element_size, hw=hw,
                         split=p2p_split or (tp if sequence_parallel else 1),
                         virtual_stages=virtual_stages, extent=tp * dp * pp)
    bubble = (compute + tp_comm) * (pp - 1) / (virtual_stages * micro_batches)
    updated = num_params / (dp if stage >= 1 else 1)
    if offload == "cpu":
        host = (24 + 2 * element_size) * updated / hw.host_bytes_per_s
        pcie = 2 * element_size * updated / hw.pcie_bytes_per_s
        optimizer = max(host, pcie)
    else:
        optimizer = ADAMW_DEVICE_BYTES * updated / hw.memory_bytes_per_s
    return StepTime(compute, tp_comm + p2p + dp_comm, optimizer, bubble, tp_comm, p2p, dp_comm)


def gpt_step_flops(*, batch: int, seq: int, layers: int, hidden: int, vocab: int, recompute: bool = False) -> float:
    """Matmul FLOPs of a GPT's forward + backward (Narayanan et al. 2021, eq. 3).

    Forward per layer: 24 B s h^2 (QKV, projection, 4h MLP) + 4 B s^2 h (attention); the logits
    2 B s h V; backward twice the forward; activation recomputation runs the layers' forward
    again: 96 B s l h^2 (1 + s/(6h)) + 6 B s h V (72 without recomputation).
    """
    per_layer = 24 * batch * seq * hidden**2 + 4 * batch * seq**2 * hidden
    return (4 if recompute else 3) * layers * per_layer + 6 * batch * seq * hidden * vocab
