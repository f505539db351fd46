"""``GradientNoiseScale``: the meter that drops into a PyTorch training loop.

A thin stateful wrapper: hooks record squared gradient norms (:mod:`noisescale.collect`),
the pure estimators turn them into unbiased |G|^2 and tr(Sigma) per step
(:mod:`noisescale.estimators`), bias-corrected averages keep them apart
(:mod:`noisescale.smoothing`) and B_simple with its interval is formed only in
:meth:`GradientNoiseScale.compute` (:mod:`noisescale.uncertainty`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(3, 1)
    >>> meter = GradientNoiseScale(model, method="microbatch")
    >>> for step in range(3):
    ...     for xb in torch.randn(2, 8, 3):  # k = 2 micro-batches of 8 examples
    ...         (model(xb).square().mean() / 2).backward()
    ...     meter.update(batch_size=16)
    ...     model.zero_grad()
    >>> meter.compute().steps
    3

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training,
    arXiv:1812.06162, eqs. (2.9), (A.1), (A.2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from noisescale.collect import GradientRecorder, MicrobatchRecord
from noisescale.estimators import (
    NoiseStats,
    effective_batch_size,
    microbatch_stats,
    per_example_stats,
)
from noisescale.smoothing import EmaState, decay_for_step, ema_init, ema_update
from noisescale.uncertainty import b_simple_interval

__all__ = ["GradientNoiseScale", "GroupEstimate", "NoiseScaleEstimate"]

Method = Literal["microbatch", "per_example"]
DEFAULT_EMA_DECAY = 0.99


def _opt(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


class GroupEstimate(NamedTuple):
    """B_simple of one parameter group (or of the whole model).

    ``b_simple`` is in examples (the unit the loss is averaged over); None when the
    averaged |G|^2 is not positive (not resolved). ``b_simple_ci`` is None while the
    interval is unbounded.
    """

    b_simple: float | None
    b_simple_ci: tuple[float, float] | None
    b_simple_se: float | None
    grad_norm_sq: float
    trace_sigma: float
    resolved: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (None becomes null)."""
        d = self._asdict()
        d["b_simple_ci"] = None if self.b_simple_ci is None else list(self.b_simple_ci)
        return d


class NoiseScaleEstimate(NamedTuple):
    """What :meth:`GradientNoiseScale.compute` returns.

    Attributes:
        b_simple: tr(Sigma)/|G|^2 from the averaged parts, examples; None if not resolved.
        b_simple_ci: confidence interval ``(low, high)`` (Fieller), or None if unbounded.
        b_simple_se: delta-method standard error, examples, or None.
        grad_norm_sq: averaged |G|^2 estimate (may be <= 0 early: then not resolved).
        trace_sigma: averaged tr(Sigma) estimate.
        resolved: True when |G|^2 is significantly positive and the interval bounded.
        steps: optimiser steps folded in since the last reset (skipped ones included).
        examples: examples seen in those steps.
        skipped_steps: steps skipped for non-finite gradients (e.g. AMP overflow).
        n_eff: effective number of steps in the average, ``(sum w)^2 / sum w^2``.
        groups: per parameter group estimates; the total is their mediant.
    """

    b_simple: float | None
    b_simple_ci: tuple[float, float] | None
    b_simple_se: float | None
    grad_norm_sq: float
    trace_sigma: float
    resolved: bool
    steps: int
    examples: int
    skipped_steps: int
    n_eff: float
    groups: dict[str, GroupEstimate]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (None becomes null, groups nested)."""
        d = self._asdict()
        d["b_simple_ci"] = None if self.b_simple_ci is None else list(self.b_simple_ci)
        d["groups"] = {k: v.to_dict() for k, v in self.groups.items()}
        return d


def default_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters grouped by the module that owns them (tied ones: first owner)."""
    groups: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                groups.setdefault(name or "model", []).append(p)
    return groups


class GradientNoiseScale:
    """Online gradient noise scale B_simple = tr(Sigma)/|G|^2 of a training run.

    .. math::

        B_{simple} = \\frac{\\mathrm{EMA}(\\mathcal{S})}{\\mathrm{EMA}(|\\mathcal{G}|^2)}

    Call :meth:`update` once per optimiser step, after the step's last backward and
    before gradient clipping, ``optimizer.step()`` and ``zero_grad()`` (it reads the
    accumulated ``.grad`` as the big batch; with a GradScaler, before or after
    ``scaler.unscale_`` both work). It never synchronises with the device;
    :meth:`compute` does, once.

    Args:
        model: the module being trained. Only parameters with ``requires_grad`` count.
        method: ``"microbatch"``: each of k >= 2 backward passes per step is a small
            batch (the usual gradient-accumulation loop; no extra cost).
            ``"per_example"``: exact per-example squared norms from layer hooks
            (``nn.Linear``, ``nn.Conv1d/2d``, ``nn.Embedding``, ``nn.LayerNorm``);
            lowest variance, works with one backward per step.
        reduction: how ONE micro-batch's loss is reduced over its examples:
            ``"mean"`` or ``"sum"``.
        accumulation: ``"mean"`` if each micro-batch loss is divided by k before
            backward, ``"sum"`` if not.
        ema_decay: per-step decay of the averages (default 0.99; 1.0 = plain mean).
        ema_examples: instead of ``ema_decay``, a time constant in examples:
            decay ``exp(-B / ema_examples)`` per step of B examples.
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any.
        confidence: level of ``b_simple_ci``.
        groups: named parameter groups (default: one per module owning parameters).
            The total is their mediant ``sum trSigma_j / sum |G_j|^2``.
        fallback: per_example only: allow the slower exact fallback for layers
            without a kernel (e.g. BatchNorm) instead of raising.

    Raises:
        ValueError: on an unknown method/reduction/accumulation or bad EMA settings,
            or when the model has no trainable parameter.
        noisescale.errors.UnsupportedLayerError: ``per_example`` on a model with a
            layer that has no kernel (and ``fallback=False``); the message names it.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method = "per_example",
        *,
        reduction: Literal["mean", "sum"] = "mean",
        accumulation: Literal["mean", "sum"] = "mean",
        ema_decay: float | None = None,
        ema_examples: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        confidence: float = 0.95,
        groups: Mapping[str, Iterable[nn.Parameter]] | None = None,
        fallback: bool = False,
    ) -> None:
        for arg, value, allowed in (
            ("method", method, ("microbatch", "per_example")),
            ("reduction", reduction, ("mean", "sum")),
            ("accumulation", accumulation, ("mean", "sum")),
        ):
            if value not in allowed:
                raise ValueError(f"Expected `{arg}` to be one of {allowed} but got {value!r}")
        if ema_decay is None and ema_examples is None:
            ema_decay = DEFAULT_EMA_DECAY
        decay_for_step(ema_decay=ema_decay, ema_examples=ema_examples, examples=1.0)  # validates
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"Expected `confidence` in (0, 1) but got {confidence}")
        named = {k: [p for p in v if p.requires_grad] for k, v in (groups or default_groups(model)).items()}
        named = {k: v for k, v in named.items() if v}
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to measure")
        self.method: Method = method
        self.reduction = reduction
        self.accumulation = accumulation
        self.ema_decay = ema_decay
        self.ema_examples = ema_examples
        self.confidence = confidence
        self.group_names = list(named)
        params = [p for ps in named.values() for p in ps]
        index = torch.tensor([j for j, ps in enumerate(named.values()) for _ in ps], device=params[0].device)
        per_example = None
        if method == "per_example":
            from noisescale.per_example import PerExampleNorms

            per_example = PerExampleNorms(model, list(named.values()), fallback=fallback)
        self._recorder = GradientRecorder(params, index, len(named), scaler=scaler, per_example=per_example)
        self._device = params[0].device
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every step so far (hooks stay attached)."""
        self._state: EmaState = ema_init(len(self.group_names) + 1, self._device)
        self._steps = 0
        self._examples = 0
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        self._recorder.pop()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume with identical results."""
        return {
            "ema": {k: v.clone() for k, v in self._state._asdict().items()},
            "steps": self._steps,
            "examples": self._examples,
            "skipped_steps": self._skipped.clone(),
            "group_names": list(self.group_names),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: if the parameter groups differ from this meter's.
        """
        if list(state_dict["group_names"]) != self.group_names:
            raise ValueError(
                f"state_dict was saved for groups {state_dict['group_names']} but this meter has "
                f"{self.group_names}"
            )
        self._state = EmaState(**{k: v.to(self._device) for k, v in state_dict["ema"].items()})
        self._steps = int(state_dict["steps"])
        self._examples = int(state_dict["examples"])
        self._skipped = torch.as_tensor(state_dict["skipped_steps"]).to(self._device)

    def remove(self) -> None:
        """Detach every hook from the model."""
        self._recorder.remove()

    # -- per step ------------------------------------------------------------------------------
    def update(self, batch_size: int | None = None, *, microbatch_sizes: Iterable[int] | None = None) -> None:
        """Fold in the optimiser step whose backward passes ran since the last call.

        Args:
            batch_size: examples in the step (all micro-batches). Required for
                ``microbatch`` unless ``microbatch_sizes`` is given (equal micro-batches
                are assumed); optional for ``per_example`` (counted from the inputs).
            microbatch_sizes: examples in each micro-batch, in backward order.

        Raises:
            RuntimeError: if no backward pass ran since the last update.
            noisescale.errors.SingleMicrobatchError: ``microbatch`` with one backward
                pass, or a step of one example.
            ValueError: if the sizes do not match the backward passes.
        """
        records = self._recorder.pop()
        if not records:
            raise RuntimeError(
                "meter.update() found no backward pass since the last update: call it once per "
                "optimizer step, after loss.backward() and before optimizer.zero_grad()"
            )
        big_sq = self._recorder.accumulated_sq_norms()
        if self.method == "microbatch":
            sizes = self._microbatch_sizes(len(records), batch_size, microbatch_sizes)
            stats = self._microbatch(records, sizes, big_sq)
        else:
            sizes = [int(r.per_example.shape[0]) for r in records if r.per_example is not None]
            if batch_size is not None and batch_size != sum(sizes):
                raise ValueError(
                    f"batch_size={batch_size} but the per-example hooks saw {sum(sizes)} examples "
                    f"(dim 0 of the layer inputs) in {len(records)} backward pass(es)"
                )
            stats = self._per_example(records, sizes, big_sq)
        examples = sum(sizes)
        g = torch.cat([stats.grad_norm_sq, stats.grad_norm_sq.sum(0, keepdim=True)])
        s = torch.cat([stats.trace_sigma, stats.trace_sigma.sum(0, keepdim=True)])
        beta = decay_for_step(ema_decay=self.ema_decay, ema_examples=self.ema_examples, examples=examples)
        self._state, finite = ema_update(self._state, g, s, beta)
        self._skipped += (~finite).to(torch.int64)
        self._steps += 1
        self._examples += examples

    def _microbatch_sizes(
        self, k: int, batch_size: int | None, microbatch_sizes: Iterable[int] | None
    ) -> list[int]:
        if microbatch_sizes is not None:
            sizes = [int(b) for b in microbatch_sizes]
            if len(sizes) != k:
                raise ValueError(f"got {len(sizes)} microbatch_sizes for {k} backward passes")
            return sizes
        if batch_size is None:
            raise ValueError("method='microbatch' needs update(batch_size=...) or microbatch_sizes=...")
        if batch_size % k:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by the {k} backward passes seen: pass "
                "microbatch_sizes=[...] for unequal micro-batches"
            )
        return [batch_size // k] * k

    def _microbatch(
        self, records: list[MicrobatchRecord], sizes: list[int], big_sq: torch.Tensor
    ) -> NoiseStats:
        """Undo the loss conventions: record i holds |c_i g_i|^2, .grad holds sum_i c_i g_i."""
        k = len(records)
        c = torch.tensor(
            [
                (b if self.reduction == "sum" else 1.0) / (k if self.accumulation == "mean" else 1.0)
                for b in sizes
            ],
            dtype=torch.float64,
        )
        b = torch.tensor(sizes, dtype=torch.float64)
        b_big = effective_batch_size(c, b)
        small = torch.stack([r.sq_norms for r in records]) / c.square().to(big_sq.device)[:, None]
        return microbatch_stats(
            small, b.to(big_sq.device), big_sq / float(c.sum()) ** 2, b_big.to(big_sq.device)
        )

    def _per_example(
        self, records: list[MicrobatchRecord], sizes: list[int], big_sq: torch.Tensor
    ) -> NoiseStats:
        """Record i holds |a_i g_n|^2 per example, with a_i the loss factor of micro-batch i."""
        k = len(records)
        a = [
            (1.0 / n if self.reduction == "mean" else 1.0) / (k if self.accumulation == "mean" else 1.0)
            for n in sizes
        ]
        total = sum(sizes)
        sum_sq = sum(r.per_example.sum(0) / ai**2 for r, ai in zip(records, a, strict=True))  # type: ignore[union-attr]
        weight = sum(n * ai for n, ai in zip(sizes, a, strict=True))
        b_big = weight**2 / sum(n * ai**2 for n, ai in zip(sizes, a, strict=True))
        return per_example_stats(sum_sq / total, big_sq / weight**2, b_big)

    # -- results -------------------------------------------------------------------------------
    def compute(self) -> NoiseScaleEstimate:
        """B_simple with its interval, total and per group (one host synchronisation)."""
        iv = b_simple_interval(self._state, self.confidence)

        def group(j: int) -> GroupEstimate:
            resolved = bool(iv.resolved[j])
            return GroupEstimate(
                b_simple=_opt(iv.b_simple[j]),
                b_simple_ci=(float(iv.low[j]), float(iv.high[j])) if resolved else None,
                b_simple_se=_opt(iv.se[j]),
                grad_norm_sq=float(iv.grad_norm_sq[j]) if self._steps else float("nan"),
                trace_sigma=float(iv.trace_sigma[j]) if self._steps else float("nan"),
                resolved=resolved,
            )

        total = group(len(self.group_names))
        return NoiseScaleEstimate(
            *total,
            steps=self._steps,
            examples=self._examples,
            skipped_steps=int(self._skipped),
            n_eff=float(iv.n_eff[-1]) if self._steps else 0.0,
            groups={name: group(j) for j, name in enumerate(self.group_names)},
        )
