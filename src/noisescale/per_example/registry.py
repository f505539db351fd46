"""Which layer types have an exact per-example kernel.

Lookup is by exact type: a subclass may override ``forward`` and compute something
else, so it is only supported once registered (:func:`register_kernel`, e.g. with
the parent's kernel when its forward is the parent's).
"""

from __future__ import annotations

from torch import nn

from noisescale.per_example import conv, embedding, groupnorm, layernorm, linear
from noisescale.per_example.kernel import Kernel

__all__ = ["find_kernel", "register_kernel", "supported_types"]

_KERNELS: dict[type[nn.Module], Kernel] = {
    nn.Linear: linear.KERNEL,
    nn.Conv1d: conv.CONV1D_KERNEL,
    nn.Conv2d: conv.CONV2D_KERNEL,
    nn.Embedding: embedding.KERNEL,
    nn.LayerNorm: layernorm.LAYER_NORM_KERNEL,
    nn.RMSNorm: layernorm.RMS_NORM_KERNEL,
    nn.GroupNorm: groupnorm.KERNEL,
}


def register_kernel(module_type: type[nn.Module], kernel: Kernel) -> None:
    """Make ``module_type`` supported by ``kernel`` (replacing any previous one).

    Args:
        module_type: the exact layer class.
        kernel: its per-example maths.

    Raises:
        TypeError: if ``module_type`` is not an ``nn.Module`` subclass or ``kernel`` not a Kernel.

    Example:
        >>> from noisescale.per_example import linear
        >>> class MyLinear(nn.Linear):
        ...     pass
        >>> register_kernel(MyLinear, linear.KERNEL)
        >>> find_kernel(MyLinear(2, 3)) is linear.KERNEL
        True
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"Expected `module_type` to be an nn.Module subclass but got {module_type!r}.")
    if not isinstance(kernel, Kernel):
        raise TypeError(f"Expected `kernel` to be a noisescale.per_example.Kernel but got {type(kernel)}.")
    _KERNELS[module_type] = kernel


def find_kernel(module: nn.Module) -> Kernel | None:
    """The kernel registered for ``type(module)``, or None if it has none.

    ``fully_shard`` (FSDP2) gives a layer it shards the class ``FSDP<Layer>(FSDPModule, Layer)``,
    with the layer's own forward: the kernel of ``Layer``. Any other subclass has none.

    Args:
        module: any layer.

    Returns:
        The kernel, or None.
    """
    cls = type(module)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == f"FSDP{bases[1].__name__}":
        cls = bases[1]
    return _KERNELS.get(cls)


def supported_types() -> tuple[type[nn.Module], ...]:
    """The layer types that currently have a kernel."""
    return tuple(_KERNELS)
