"""FLOPs per example of one training step's forward and backward pass, counted by torch.

:func:`flops_per_example` runs the model and the gradient of its loss once under
``torch.utils.flop_counter.FlopCounterMode``, which counts the operations it has formulas for:
matrix multiplications, convolutions and attention, two FLOPs per multiply-add. Element-wise work
(activations, normalisation, the loss, the optimizer) is not counted; it is usually a few percent.
For a linear layer of ``n`` weights that is ``2n`` FLOPs per example forward and ``4n`` backward
(the gradient with respect to its input and to its weight), the ``6N`` of Kaplan et al. (2020), or
``4n`` for a first layer, whose input needs no gradient.

Training compute is then ``C = E * FLOPs per example`` for ``E`` examples (:mod:`noisescale.critical.predict`:
PF-days, ``C/C_min = 1 + B/B_crit``, wall-clock time).

References:
    Kaplan et al. (2020), Scaling Laws for Neural Language Models, arXiv:2001.08361, section 2.1
    (C = 6N per token).
    OpenAI (2018), AI and Compute (PF-days).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["flops_per_example"]


def flops_per_example(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    examples: int | None = None,
) -> float:
    """FLOPs of a forward pass and the backward pass to every trainable parameter, per example.

    The backward is ``torch.autograd.grad`` with respect to the parameters that require grad, as
    a training step computes it; the model's ``.grad`` is not touched.

    Args:
        model: the model, in the mode it trains in.
        loss_fn: ``loss_fn(model(inputs), targets)``, a scalar loss.
        inputs: ``[B, *F]`` one batch (on the model's device).
        targets: ``[B, *T]``.
        examples: how many units of the batch size the batch holds (default ``B``; for a language
            model measured in tokens, the batch's tokens).

    Returns:
        FLOPs per example (or per token), forward plus backward.

    Raises:
        ValueError: if the model has no trainable parameter, ``examples`` is not positive, or the loss
            is not a scalar.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> x, y = torch.randn(32, 784), torch.randint(10, (32,))
        >>> flops_per_example(model, nn.functional.cross_entropy, x, y)  # 2x784x256 + 6x256x10 + 2x784x256
        818176.0
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad: a training step has no backward")
    count = len(inputs) if examples is None else examples
    if count <= 0:
        raise ValueError(f"Expected `examples` > 0 but got {count}")
    with FlopCounterMode(display=False) as counter:
        loss = loss_fn(model(inputs), targets)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn returned shape {list(loss.shape)}: it must return a scalar loss")
        torch.autograd.grad(loss, params, allow_unused=True)
    return counter.get_total_flops() / count
