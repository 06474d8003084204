"""Tensor and pipeline parallelism composed with ZeRO data parallelism on a ``(pp, dp, tp)`` mesh.

Parallelism stays out of the model code (torchtitan's rule): ``parallelize`` swaps a model's
linear layers and embeddings for tensor-parallel ones by module names, and the pipeline splits
a model into stages by its blocks.
"""

from parallax.parallel.mesh import Mesh, ParallelDims, init_mesh
from parallax.parallel.state import ParallelState, attach_parallel_state, parallel_state

__all__ = ["Mesh", "ParallelDims", "init_mesh", "ParallelState", "attach_parallel_state", "parallel_state"]
