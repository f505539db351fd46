r"""Exact, slower per-example contributions for layers without a kernel.

When the gradients with respect to a layer call's outputs arrive, the layer is run
again, functionally (``torch.func.functional_call``), on the same inputs, with
detached copies of the parameters asked for as leaves and clones of all its buffers
(so BatchNorm running statistics are not updated a second time), and with the
random number generators rewound to their state at the original call (so dropout
masks repeat). Example ``n``'s contribution is then the vector-Jacobian product of
the outputs with the output gradients masked to row ``n``:

.. math::

    \Delta\theta_n = J_\theta^T (e_n \odot go), \qquad \sum_n \Delta\theta_n = J_\theta^T go,

one backward pass through the layer per example (a loop over ``N``). The recompute
calls the layer's ``forward`` directly, so its own forward hooks do not run again;
hooks of the layers inside it do (noisescale's are suspended meanwhile).

For BatchNorm in train mode no example has a gradient of its own: the batch
statistics couple them. The contribution above is the decomposition of the batch
gradient by the batch index of the output gradient, with the batch statistics held
fixed; the contributions still sum to the true gradient exactly, but they are not
the gradients each example would give alone (Opacus rejects BatchNorm for this
reason). Prefer GroupNorm or LayerNorm when per-example gradients matter.

Shape letters: ``N`` examples (dim 0 of every output), ``P`` a parameter's shape.

References:
    Goodfellow (2015), Efficient Per-Example Gradient Computations, arXiv:1510.01799.
    Ioffe, Szegedy (2015), Batch Normalization, arXiv:1502.03167.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import get_device_states, set_device_states

from noisescale.per_example.kernel import accumulation_dtype

__all__ = [
    "RngState",
    "SavedCall",
    "capture_rng",
    "detach_inputs",
    "output_tensors",
    "per_example_grads",
    "per_example_norm_pairs",
    "per_example_norms",
]


class RngState(NamedTuple):
    """Random number generator states at the start of a layer call."""

    cpu: Tensor  # torch.get_rng_state(), uint8
    device_type: str  # accelerator type of the inputs ("cuda" when there is none)
    devices: list[int]  # accelerator indices the inputs live on
    states: list[Tensor]  # their generator states, one per index


class SavedCall(NamedTuple):
    """What one forward call of an unsupported layer needs for its recompute."""

    args: tuple[Any, ...]  # positional inputs, tensors detached
    kwargs: dict[str, Any]  # keyword inputs, tensors detached
    rng: RngState  # generators at the start of the call
    outputs: tuple[int, ...]  # positions (in output_tensors order) of the outputs that require grad
    names: tuple[str, ...]  # parameters, relative to the layer, this call accounts for


def capture_rng(args: tuple[Any, ...], kwargs: dict[str, Any]) -> RngState:
    """Record the CPU and input-device generator states (call it before the forward).

    Args:
        args: the call's positional inputs.
        kwargs: the call's keyword inputs.

    Returns:
        The states, replayed by :func:`per_example_grads`.
    """
    inputs = (*args, *kwargs.values())
    device_type = next(
        (t.device.type for t in inputs if isinstance(t, Tensor) and t.device.type not in ("cpu", "meta")),
        "cuda",
    )
    devices, states = get_device_states(*inputs)
    return RngState(torch.get_rng_state(), device_type, devices, states)


def output_tensors(output: Any) -> tuple[Any, ...]:
    """A layer's outputs as a flat tuple: a tensor, or the items of a tuple/list."""
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def detach_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Detach the tensors among a call's inputs, so the recompute stays local to the layer."""

    def detach(a: Any) -> Any:
        return a.detach() if isinstance(a, Tensor) else a

    return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}


class _Bare(nn.Module):
    """Calls a layer's ``forward`` without going through its hooks."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer.forward(*args, **kwargs)


@contextmanager
def _replayed_rng(rng: RngState) -> Iterator[None]:
    with torch.random.fork_rng(devices=rng.devices, device_type=rng.device_type):
        torch.set_rng_state(rng.cpu)
        set_device_states(rng.devices, rng.states, device_type=rng.device_type)
        yield


def _rows(
    module: nn.Module, call: SavedCall, grads_out: Sequence[Tensor | None], names: tuple[str, ...]
) -> Iterator[tuple[Tensor, ...]]:
    """Yield example ``n``'s contribution to each parameter in ``names``, for n = 0..N-1."""
    params = dict(module.named_parameters())
    leaves = {name: params[name].detach().requires_grad_() for name in names}
    buffers = {f"layer.{name}": b.clone() for name, b in module.named_buffers()}
    swapped = {f"layer.{name}": leaf for name, leaf in leaves.items()}
    with torch.enable_grad(), _replayed_rng(call.rng):
        out = output_tensors(functional_call(_Bare(module), (swapped, buffers), call.args, call.kwargs))
    pairs = [(out[i], g) for i, g in zip(call.outputs, grads_out, strict=True) if g is not None]
    outs, cots = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    n = cots[0].shape[0]
    for row in range(n):
        masked = []
        for g in cots:
            m = torch.zeros_like(g)
            m[row] = g[row]
            masked.append(m)
        grads = torch.autograd.grad(
            outs, tuple(leaves.values()), masked, retain_graph=row < n - 1, allow_unused=True
        )
        yield tuple(
            torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves.values(), strict=True)
        )


def per_example_grads(
    module: nn.Module, call: SavedCall, grads_out: Sequence[Tensor | None], names: tuple[str, ...]
) -> dict[str, Tensor]:
    """Per-example contributions of any layer, by recompute and one VJP per example.

    Args:
        module: the layer.
        call: what its forward call saved.
        grads_out: gradient w.r.t. each output in ``call.outputs`` (``[N, *]``, None
            for an output that got none); at least one is not None.
        names: parameter names relative to ``module`` (``module.named_parameters()``).

    Returns:
        ``{name: [N, *P]}``, summing over ``N`` to the batch gradient of this call.
    """
    rows = list(_rows(module, call, grads_out, names))
    return {
        name: torch.stack([r[j] for r in rows]).to(accumulation_dtype(rows[0][j].dtype))
        for j, name in enumerate(names)
    }


def _row_norms(
    module: nn.Module,
    call: SavedCall,
    grads_out: Sequence[Tensor | None],
    names: tuple[str, ...],
    weights: dict[str, Tensor] | None,
) -> Tensor:
    """``[N, len(names)]`` squared norms of each example's contributions, then as many weighted ones."""
    rows = []
    for r in _rows(module, call, grads_out, names):
        sq = [g.to(accumulation_dtype(g.dtype)).square() for g in r]
        if weights is not None:
            sq += [s * weights[name].to(s.dtype) for s, name in zip(sq, names, strict=True)]
        rows.append(torch.stack([s.sum() for s in sq]))
    return torch.stack(rows)


def per_example_norms(
    module: nn.Module, call: SavedCall, grads_out: Sequence[Tensor | None], names: tuple[str, ...]
) -> dict[str, Tensor]:
    """Squared norms of :func:`per_example_grads`, without keeping ``N`` copies of each parameter.

    Args:
        module: the layer.
        call: what its forward call saved.
        grads_out: gradient w.r.t. each output in ``call.outputs`` (None where absent).
        names: parameter names relative to ``module``.

    Returns:
        ``{name: [N]}``.
    """
    norms = _row_norms(module, call, grads_out, names, None)
    return {name: norms[:, j] for j, name in enumerate(names)}


def per_example_norm_pairs(
    module: nn.Module,
    call: SavedCall,
    grads_out: Sequence[Tensor | None],
    names: tuple[str, ...],
    weights: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """:func:`per_example_norms` and the ``weights``-weighted ones, from the same per-example rows.

    Args:
        module: the layer.
        call: what its forward call saved.
        grads_out: gradient w.r.t. each output in ``call.outputs`` (None where absent).
        names: parameter names relative to ``module``.
        weights: ``{name: [*P]}`` a diagonal preconditioner: ``sum_j P_j g_nj^2``.

    Returns:
        ``({name: [N]}, {name: [N]})``.
    """
    norms = _row_norms(module, call, grads_out, names, weights)
    k = len(names)
    return (
        {name: norms[:, j] for j, name in enumerate(names)},
        {name: norms[:, k + j] for j, name in enumerate(names)},
    )
