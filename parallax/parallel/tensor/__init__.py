"""Tensor parallelism (Megatron-LM): split each layer's weights over the ranks of a
tensor-parallel group, by module names, without editing the model code.

    model = build_model(config)                          # the full model, same seed on every rank
    parallelize(model, mesh, sequence_parallel=False)    # in place: column/row/vocab-parallel layers
    loss = model(idx, targets)                           # vocabulary-parallel loss, = the full model's
"""

from parallax.parallel.tensor.comm import (copy_to_region, gather_from_region, gather_from_sequence,
                                           reduce_from_region, reduce_scatter_to_sequence, scatter_to_sequence,
                                           split_to_region)
from parallax.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from parallax.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from parallax.parallel.tensor.loss import lm_head_loss
from parallax.parallel.tensor.plan import check_tensor_parallel, gather_tensor_parallel, parallelize, tp_sections

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "copy_to_region",
           "reduce_from_region", "gather_from_region", "split_to_region", "scatter_to_sequence",
           "gather_from_sequence", "reduce_scatter_to_sequence", "vocab_parallel_cross_entropy",
           "vocab_parallel_linear_cross_entropy", "lm_head_loss", "parallelize", "check_tensor_parallel",
           "gather_tensor_parallel", "tp_sections"]
