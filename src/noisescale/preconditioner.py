r"""Diagonal preconditioners for the preconditioned noise scale: Adam's, or fixed weights.

With a diagonal preconditioner ``P`` (a non-negative weight per parameter entry) every
squared norm the meter records becomes :math:`|g|_P^2 = \sum_j P_j g_j^2`. The same
estimators applied to these norms give :math:`G^T P G` and :math:`\mathrm{tr}(P\Sigma)`, and

.. math::

    B_P = \frac{\mathrm{tr}(P \Sigma)}{G^T P G},

the noise scale of the preconditioned gradient ``P^{1/2} g`` (AdaptDL/Pollux, Qiao et al.
2021; SCIENCE.md), in examples like B_simple.

Adam (``torch.optim.Adam``/``AdamW``): :math:`P = 1/(\sqrt{\hat v} + \epsilon)` with
:math:`\hat v` = ``exp_avg_sq / (1 - beta2**step)`` (``max_exp_avg_sq`` with ``amsgrad``)
and ``eps``, ``betas`` of the parameter's group: the denominator of Adam's update. It is
read once per optimiser step, when the step's first backward pass needs it, from the
state that ``optimizer.step()`` left at the previous step (a hook on the optimizer marks
it stale after each ``step()`` and ``load_state_dict()``): ``v`` of the steps before this
one, while the update of this step will also include this step's squared gradient. A parameter
that has a gradient but no Adam state yet (before the first ``optimizer.step()``, or the
first time it gets a gradient) has no preconditioner: its weights are NaN, the step's
preconditioned norms are NaN, and the preconditioned series skips that step (counted in
its ``skipped_steps``); the raw series is unaffected. ``1/eps`` in its place would weight
those entries 10^8 times more than the others, a number of no optimiser. Likewise an entry
whose second moment is exactly 0 (it never had a gradient: the embedding row of a token not
drawn yet) gets weight 0, not ``1/eps``: Adam's own update there divides by the current
gradient's magnitude, which ``v`` of the previous steps does not know; such an entry counts
from the step after its first gradient. (With ``1/eps``, one rare token drawn for the first
time moved B_P of the shakespeare model a thousandfold.)

Cost: Adam's weights are computed once per step (a few elementwise passes over the
parameters) and kept for the step: ``P^{1/2}`` for the ``microbatch`` norms (one tensor of
the parameters' size), and ``P`` too for the per-example kernels (a second one). Every
weighted norm is an elementwise product and a norm more per gradient.

A fixed mapping ``{parameter: weights}`` (other diagonal optimisers, tests) must give
every measured parameter a finite, non-negative tensor of its shape. Under DDP the weights
must be the same on every rank: Adam's are (its state follows the all-reduced gradients);
a mapping is the caller's to keep so.

Shape letters: ``P`` a parameter's shape.

References:
    Kingma, Ba (2015), Adam: A Method for Stochastic Optimization, arXiv:1412.6980.
    Qiao et al. (2021), Pollux, OSDI, arXiv:2008.12260 (the preconditioned gradient noise scale).
    McCandlish et al. (2018), arXiv:1812.06162, eq. (2.9) and appendix A.1.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Literal, TypeAlias

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Preconditioner", "PreconditionerSpec", "weighted"]

PreconditionerSpec: TypeAlias = Literal["adam"] | Mapping[Tensor, Tensor]
"""``"adam"`` (with ``optimizer=`` an Adam/AdamW), or ``{parameter: non-negative weights of its shape}``."""

_FIX = (
    "pass preconditioner={parameter: weights} instead, a mapping of finite non-negative tensors of each "
    "parameter's shape (e.g. your optimizer's 1/(sqrt(v) + eps))"
)


def weighted(tensor: Tensor, root: Tensor) -> Tensor:
    """``tensor * root``, whose squared norm is the P-weighted squared norm (``root = P^{1/2}``).

    Args:
        tensor: a gradient ``[*P]``, dense or sparse (``nn.Embedding(sparse=True)``).
        root: ``[*P]`` square roots of the weights.

    Returns:
        A dense tensor (a sparse gradient's coalesced values times their roots), in at least
        the roots' dtype.
    """
    if tensor.is_sparse:
        coalesced = tensor.coalesce()
        return coalesced.values() * root[tuple(coalesced.indices())]
    return tensor * root


class Preconditioner:
    """The weights ``P`` of every measured parameter, for the current optimiser step.

    Args:
        params: the measured parameters, in the meter's order.
        spec: ``"adam"``, or ``{parameter: weights}``.
        optimizer: the Adam/AdamW whose state gives the weights (``"adam"`` only).
        model: to name parameters in errors (optional).

    Raises:
        ValueError: ``"adam"`` without an Adam/AdamW optimizer (the message names the fix:
            pass a mapping), a measured parameter the optimizer does not hold or the
            mapping lacks, weights of the wrong shape, negative or non-finite, or a mapping
            key that is not a parameter of the model; an unknown string.
        TypeError: ``spec`` is neither ``"adam"`` nor a mapping of tensors.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        spec: PreconditionerSpec,
        optimizer: torch.optim.Optimizer | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.params = list(params)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._names = {} if model is None else {id(p): n for n, p in model.named_parameters()}
        self._lock = threading.Lock()
        self._weights: list[Tensor] | None = None
        self._roots: list[Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._handles: list[RemovableHandle] = []
        self.kind: Literal["adam", "mapping"]
        if isinstance(spec, str):
            if spec != "adam":
                raise ValueError(f"Expected `preconditioner` to be 'adam' or a mapping but got {spec!r}")
            self.kind = "adam"
            self.optimizer = self._check_adam(optimizer)
            self._handles = [  # its state changes only in step() and load_state_dict()
                self.optimizer.register_step_post_hook(self._forget),
                self.optimizer.register_load_state_dict_post_hook(self._forget),
            ]
        elif isinstance(spec, Mapping):
            self.kind = "mapping"
            self._weights = self._check_mapping(spec)
        else:
            raise TypeError(
                f"Expected `preconditioner` to be 'adam' or a mapping {{parameter: weights}} but got "
                f"{type(spec).__name__}"
            )

    def _name(self, p: Tensor) -> str:
        return self._names.get(id(p), f"of shape {list(p.shape)}")

    def _check_adam(self, optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            given = "no optimizer" if optimizer is None else type(optimizer).__name__
            raise ValueError(
                f"preconditioner='adam' reads the second moments of torch.optim.Adam or AdamW, passed as "
                f"optimizer=, but got {given}: pass the Adam/AdamW, or {_FIX}"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for p in self.params:
            if id(p) not in held:
                raise ValueError(
                    f"parameter {self._name(p)} is measured but not in the optimizer, so Adam gives it no "
                    f"preconditioner: leave it out of the meter's groups, or {_FIX}"
                )
        return optimizer

    def _check_mapping(self, spec: Mapping[Tensor, Tensor]) -> list[Tensor]:
        named = [k for k in spec if not isinstance(k, Tensor)]
        if named:
            raise ValueError(
                f"preconditioner is keyed by {type(named[0]).__name__} {named[0]!r}, not by parameters: "
                "key it by the parameter tensors themselves, e.g. "
                "{p: weights for name, p in model.named_parameters()}"
            )
        given = {id(k): v for k, v in spec.items()}
        known = set(self._index) | set(self._names)
        strangers = [k for k in spec if id(k) not in known]
        if strangers:
            raise ValueError(
                f"preconditioner has weights for {len(strangers)} tensor(s) that are not parameters of the "
                f"model (shapes {[list(k.shape) for k in strangers]}): key the mapping by its parameters"
            )
        out = []
        for p in self.params:
            w = given.get(id(p))
            if w is None:
                raise ValueError(
                    f"preconditioner has no weights for parameter {self._name(p)}: give every measured "
                    "parameter a tensor of its shape (ones leave it unweighted)"
                )
            w = torch.as_tensor(w)
            if w.is_complex():
                raise ValueError(
                    f"preconditioner weights for parameter {self._name(p)} are complex ({w.dtype}): "
                    "give real, non-negative weights"
                )
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(
                    f"preconditioner weights for parameter {self._name(p)} have shape {list(w.shape)}, the "
                    f"parameter has shape {list(p.shape)}: give one weight per entry"
                )
            w = w.detach().to(device=p.device, dtype=_dtype(p)).contiguous()
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(
                    f"preconditioner weights for parameter {self._name(p)} must be finite and non-negative "
                    "(a diagonal preconditioner is positive semi-definite)"
                )
            out.append(w)
        return out

    def weights(self) -> list[Tensor]:
        """``P`` of every parameter ``[*P]``, in at least float32, for the current step."""
        with self._lock:
            if self._weights is None:
                self._weights = [d.reciprocal_() for d in self._denominators()]
            return self._weights

    def roots(self) -> list[Tensor]:
        """``P^{1/2}`` of every parameter, for :func:`weighted`, for the current step."""
        with self._lock:
            if self._roots is None:
                if self._weights is not None:
                    self._roots = [w.sqrt() for w in self._weights]
                else:
                    self._roots = [d.rsqrt_() for d in self._denominators()]
            return self._roots

    def weight(self, p: Tensor) -> Tensor:
        """``P`` of one measured parameter, for the current step."""
        return self.weights()[self._index[id(p)]]

    def _forget(self, *args: object) -> None:
        """Optimizer hook: forget Adam's weights; the next use reads the state the optimizer now holds."""
        with self._lock:
            self._weights = self._roots = None

    def remove(self) -> None:
        """Detach the hooks on the optimizer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _denominators(self) -> list[Tensor]:
        """Adam's ``sqrt(v_hat) + eps`` per parameter (NaN where it has no state yet), fresh tensors."""
        assert self.optimizer is not None, "a mapping's weights are fixed"
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        out = []
        with torch.no_grad():
            for p in self.params:
                group = group_of[id(p)]
                state = self.optimizer.state.get(p)
                key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
                if not state or key not in state:
                    out.append(torch.full_like(p, math.nan, dtype=_dtype(p)))
                    continue
                v, step, beta2 = state[key].to(_dtype(p)), state["step"], group["betas"][1]
                if isinstance(step, Tensor) and step.device.type != "cpu":  # capturable/fused: no host sync
                    root_bias = (1 - beta2 ** step.to(torch.float64)).sqrt()
                    d = v.sqrt().div_(root_bias).add_(group["eps"])
                else:  # as torch.optim.Adam computes it
                    d = v.sqrt().div_(math.sqrt(1 - beta2 ** float(step))).add_(group["eps"])
                out.append(d.masked_fill_(v == 0, math.inf))  # never had a gradient: weight 0, not 1/eps
        return out


def _dtype(p: Tensor) -> torch.dtype:
    """Weights are kept in at least float32 (a float16 ``1/eps`` would overflow)."""
    return torch.promote_types(p.dtype, torch.float32)
