"""Exact per-example squared gradient norms without per-example gradients.

:class:`PerExampleNorms` hooks a model's layers and, after each backward pass,
returns the ``[N, G]`` squared norms of each example's contribution to each
parameter group's gradient. One kernel module per layer type (Linear, Conv1d/2d,
Embedding, LayerNorm/RMSNorm, GroupNorm); :func:`register_kernel` adds more, and
``fallback=True`` covers any other layer exactly, more slowly.
"""

from noisescale.per_example.collector import PerExampleNorms
from noisescale.per_example.kernel import Kernel
from noisescale.per_example.registry import find_kernel, register_kernel, supported_types

__all__ = [
    "Kernel",
    "PerExampleNorms",
    "find_kernel",
    "register_kernel",
    "supported_types",
]
