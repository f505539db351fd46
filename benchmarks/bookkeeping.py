"""Lower bounds on the cost of exact per-example norms: the layers' own backward does the work.

noisescale's ``per_example`` route hooks a layer's output gradient and adds its per-example
work (:mod:`noisescale.per_example`) to an unchanged backward. The least an exact method can
do instead is "bookkeeping" (Bu et al. 2023): replace the layer's backward so that the
per-example weight contributions it forms ARE the weight gradient (summed over examples),
with nothing computed twice. This module swaps the forward of every ``nn.Linear`` and/or
``nn.LayerNorm`` of a model for such a custom autograd function, for
``benchmarks/overhead.py`` (methods ``ln_bound`` and ``bookkeeping``) to time against a plain
step. No hooks, no check of parameter uses, no estimator: what is left is the arithmetic and
memory traffic any exact method pays on the machine. Embeddings are not replaced (their
per-example work is not counted in ``bookkeeping``), so the bound is below what a full
per-example method can reach.

- ``nn.LayerNorm`` (``x`` ``[N, *, D]``): the forward keeps the mean and ``1/sigma`` of
  :func:`torch.native_layer_norm`; the backward asks ATen for the input gradient only, and
  forms example ``n``'s ``[D]`` contributions ``sum_t go_nt * x_hat_nt`` (weight) and
  ``sum_t go_nt`` (bias), whose sums over examples are the parameter gradients.
- ``nn.Linear`` (``x`` ``[N, *, F]``): the backward forms example ``n``'s ``[O, F]``
  contribution ``sum_t go_nt x_nt^T`` with one batched product (the FLOPs of the weight
  gradient's own product), sums it over examples for the weight gradient, and takes its norm.

The per-example squared norms of every replaced layer are appended to a list, ``[N]`` each.

References:
    Bu, Wang, Zha, Karypis (2023), Differentially Private Optimization on Large Model at Small
    Cost, ICML, arXiv:2210.00038 (book-keeping).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.linear import sequence_weight_grads

__all__ = ["install"]


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float, sink: list[Tensor]) -> Tensor:
        out, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.sink = sink
        return out

    @staticmethod
    def backward(ctx: Any, go: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        gx = torch.ops.aten.native_layer_norm_backward(
            go, x, [x.shape[-1]], mean, rstd, weight, bias, [True, False, False]
        )[0]
        n, d = x.shape[0], x.shape[-1]
        centred_go = torch.sub(x, mean).mul_(go).view(n, -1, d)  # (x - mean) * go, [N, T, D]
        gw = torch.bmm(rstd.view(n, 1, -1), centred_go).view(n, d)  # sum_t go * x_hat
        gb = go.reshape(n, -1, d).sum(1)
        ctx.sink.append(gw.square().sum(1) + gb.square().sum(1))
        return gx, gw.sum(0), gb.sum(0), None, None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, sink: list[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sink = sink
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, go: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, weight = ctx.saved_tensors
        n = x.shape[0]
        x3, go3 = x.reshape(n, -1, x.shape[-1]), go.reshape(n, -1, go.shape[-1])
        per_example = sequence_weight_grads(x3, go3)  # [N, O, F], one batched product
        gb = go3.sum(1)  # [N, O]
        ctx.sink.append(torch.linalg.vector_norm(per_example, dim=(1, 2)).square() + gb.square().sum(1))
        return go @ weight, per_example.sum(0), gb.sum(0), None


def install(model: nn.Module, *, linear: bool) -> list[Tensor]:
    """Swap the forward of every LayerNorm (and with ``linear`` every Linear) of ``model``.

    Args:
        model: a network whose LayerNorms have weight and bias, and whose Linears have a bias.
        linear: replace the Linears too.

    Returns:
        The list each backward appends the replaced layers' ``[N]`` squared norms to.

    Raises:
        ValueError: a LayerNorm without affine parameters or a Linear without bias.
    """
    sink: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            if module.weight is None or module.bias is None:
                raise ValueError("the bound needs LayerNorms with weight and bias")
            module.forward = lambda x, m=module: _LayerNorm.apply(x, m.weight, m.bias, m.eps, sink)  # type: ignore[method-assign]
        elif linear and isinstance(module, nn.Linear):
            if module.bias is None:
                raise ValueError("the bound needs Linears with a bias")
            module.forward = lambda x, m=module: _Linear.apply(x, m.weight, m.bias, sink)  # type: ignore[method-assign]
    return sink
