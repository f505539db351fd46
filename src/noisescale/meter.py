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

Data-parallel training (:mod:`noisescale.distributed`): wrap the model in
DistributedDataParallel first and the meter measures over all replicas
(``method="ddp"``, chosen for ``"microbatch"`` too), ``k = W x micro-batches``, with
one small asynchronous collective every ``sync_every`` steps; ``method="per_example"``
combines every rank's per-example norms the same way. After :meth:`GradientNoiseScale.sync`
on every rank, every rank holds the same estimate of every step.

Per-layer values: the estimate has one entry per module (``groups``) and, given the
optimizer, per optimizer parameter group (``param_groups``); both partitions are sums
of cells (module x parameter group), and the total is the mediant of either.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training,
    arXiv:1812.06162, eqs. (2.9), (A.1), (A.2).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from noisescale import distributed as nsdist
from noisescale.collect import GradientRecorder, MicrobatchRecord
from noisescale.errors import SingleMicrobatchError
from noisescale.estimators import (
    NoiseStats,
    effective_batch_size,
    microbatch_stats,
    per_example_stats,
)
from noisescale.smoothing import FIELDS, decay_for_step, ema_fold, ema_init
from noisescale.uncertainty import b_simple_interval

__all__ = ["GradientNoiseScale", "GroupEstimate", "NoiseScaleEstimate"]

Method = Literal["microbatch", "per_example", "ddp"]
DEFAULT_EMA_DECAY = 0.99
_MAX_PENDING = 32  # one process: steps whose estimates update() keeps before folding them in
DEFAULT_SYNC_EVERY = 16  # DDP: steps whose rows one collective exchanges


def _opt(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def _check_count(name: str, value: object, unit: str = "examples") -> None:
    """Raise unless ``value`` is a positive integer (a number of ``unit``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer ({unit}) but got {value!r}")


class GroupEstimate(NamedTuple):
    """B_simple of one parameter group (or of the whole model).

    ``b_simple`` is in examples (the unit the loss is averaged over). ``b_simple``,
    ``b_simple_ci`` and ``b_simple_se`` are None while not resolved: the averaged |G|^2
    is not significantly positive, so the interval is unbounded.
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
        groups: per parameter group estimates (default: one per module); the total is
            their mediant.
        param_groups: per optimizer parameter group (empty unless the meter was given
            the optimizer); the total is their mediant too.
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
    param_groups: Mapping[str, GroupEstimate] = {}  # never mutated

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (None becomes null, groups nested)."""
        d = self._asdict()
        d["b_simple_ci"] = None if self.b_simple_ci is None else list(self.b_simple_ci)
        d["groups"] = {k: v.to_dict() for k, v in self.groups.items()}
        d["param_groups"] = {k: v.to_dict() for k, v in self.param_groups.items()}
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


class _Partition(NamedTuple):
    """Cells (module group x optimizer parameter group) and how series sum them."""

    cells: list[list[nn.Parameter]]  # the C cells, each a list of parameters
    series: torch.Tensor  # [S, C] float64 0/1: rows = groups, then param groups, then the total
    group_names: list[str]
    param_group_names: list[str]


def _partition(
    named: Mapping[str, list[nn.Parameter]], optimizer: torch.optim.Optimizer | None
) -> _Partition:
    """Split the measured parameters into cells; per-step estimates are additive over them."""
    owner: dict[int, int] = {}
    pg_names: list[str] = []
    if optimizer is not None:
        for i, group in enumerate(optimizer.param_groups):
            pg_names.append(str(group.get("name", f"param_group_{i}")))
            for p in group["params"]:
                owner.setdefault(id(p), i)
    cells: dict[tuple[int, int], list[nn.Parameter]] = {}
    for j, params in enumerate(named.values()):
        for p in params:
            cells.setdefault((j, owner.get(id(p), -1)), []).append(p)
    keys = list(cells)
    rows = [[float(key[0] == j) for key in keys] for j in range(len(named))]
    rows += [[float(key[1] == i) for key in keys] for i in range(len(pg_names))]
    rows.append([1.0] * len(keys))
    series = torch.tensor(rows, dtype=torch.float64)
    return _Partition([cells[k] for k in keys], series, list(named), pg_names)


def _weighted_microbatch(
    sq: torch.Tensor, sizes: torch.Tensor, factor: torch.Tensor, big_sq: torch.Tensor, weight: torch.Tensor
) -> NoiseStats:
    """k-way estimate when record i holds ``|factor_i g_i|^2`` and the big gradient is ``sum_i weight_i g_i``.

    Args:
        sq: ``[K, C]`` recorded squared norms.
        sizes: ``[K]`` examples per micro-batch.
        factor: ``[K]`` loss factor of each recorded gradient (reduction and accumulation).
        big_sq: ``[C]`` squared norm of the big gradient.
        weight: ``[K]`` coefficient of each mean-loss micro-batch gradient in the big one
            (``factor`` in one process; ``factor / W`` after DDP's averaging).
    """
    small = sq / factor.square()[:, None]
    b_big = effective_batch_size(weight, sizes)
    return microbatch_stats(small, sizes, big_sq / weight.sum().square(), b_big)


class _Exchange(NamedTuple):
    """One collective over several DDP steps' local rows, started on every rank."""

    work: Any  # wait on it before reading ``outputs``
    # every rank's [M, C + 3] rows (microbatch), or the summed [N, C + 3] (per_example)
    outputs: list[torch.Tensor]
    backward_passes: list[int]  # this rank's backward passes in each of the N steps
    big: torch.Tensor  # [N, C]: each step's big-batch squared norms
    skip: int  # leading steps exchanged only so that every rank's collective has the same shape


class GradientNoiseScale:
    """Online gradient noise scale B_simple = tr(Sigma)/|G|^2 of a training run.

    .. math::

        B_{simple} = \\frac{\\mathrm{EMA}(\\mathcal{S})}{\\mathrm{EMA}(|\\mathcal{G}|^2)}

    Call :meth:`update` once per optimiser step, after the step's last backward and
    before gradient clipping, ``optimizer.step()`` and ``zero_grad()`` (it reads the
    accumulated ``.grad`` as the big batch; with a GradScaler, before or after
    ``scaler.unscale_`` both work). In one process it never reads from the device (a
    step with new micro-batch sizes sends it one small matrix); :meth:`compute` reads, once.

    Under DDP (a model wrapped in DistributedDataParallel, process group initialised)
    call :meth:`update` on every rank every step, with the same number of backward
    passes on every rank (sizes may differ); the big gradient is the mean DDP's own
    all-reduce leaves in ``.grad`` (with ``read_grad="after_backward"``, read right
    after it, so clipping before :meth:`update` does no harm). The ranks exchange their
    rows in one small asynchronous collective every ``sync_every`` steps, not every
    step (a collective per step cost up to 6% of a DDP step on CPU in
    ``benchmarks/ddp_overhead.py``); an exchange costs a few host synchronisations
    (its sizes sent, every rank's sizes read back, the estimators' small matrices sent),
    the steps in between none. :meth:`compute` needs no collective (rank 0 may call it
    alone) and covers the steps exchanged so far, on every rank: up to
    ``sync_every - 1`` steps behind, and nothing before the first exchange
    (``compute().steps`` says how many). :meth:`sync`, called on every rank, exchanges
    the rest first (the integrations do this before they log, the CLI at the end).

    Args:
        model: the module being trained, or its DistributedDataParallel wrapper. Only
            parameters with ``requires_grad`` count.
        method: ``"microbatch"``: each of k >= 2 backward passes per step is a small
            batch (the usual gradient-accumulation loop; no extra cost).
            ``"per_example"``: exact per-example squared norms from layer hooks
            (``nn.Linear``, ``nn.Conv1d/2d``, ``nn.Embedding``, ``nn.LayerNorm``,
            ``nn.RMSNorm``, ``nn.GroupNorm``);
            lowest variance, works with one backward per step.
            ``"ddp"``: the k-way estimator over ``W`` replicas x ``m`` micro-batches
            (``m >= 1``); selected automatically when a DDP model is given with
            ``"microbatch"``.
        reduction: how ONE micro-batch's loss is reduced over its examples:
            ``"mean"`` or ``"sum"``.
        accumulation: ``"mean"`` if each micro-batch loss is divided by k before
            backward, ``"sum"`` if not (under DDP: the k of this rank).
            ``"example_mean"``: each micro-batch loss is the SUM of its per-example
            losses divided by the number of examples in the whole step (under DDP:
            of all ranks, times W to undo DDP's averaging), so the step's gradient is
            the mean over all its examples whatever the micro-batch sizes (HF Trainer
            with ``num_items_in_batch``, token-weighted language-model losses);
            ``reduction`` is then not used.
        ema_decay: per-step decay of the averages (default 0.99; 1.0 = plain mean).
        ema_examples: instead of ``ema_decay``, a time constant in examples:
            decay ``exp(-B / ema_examples)`` per step of B examples.
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any.
        confidence: level of ``b_simple_ci``.
        groups: named parameter groups (default: one per module owning parameters).
            The total is their mediant ``sum trSigma_j / sum |G_j|^2``.
        fallback: per_example only: allow the slower exact fallback for layers
            without a kernel (e.g. BatchNorm) instead of raising.
        optimizer: also report B_simple per optimizer parameter group (named by the
            group's ``"name"`` key, else ``param_group_<i>``).
        read_grad: when the big batch is read: ``"at_update"`` (the accumulated
            ``.grad`` when :meth:`update` runs) or ``"after_backward"`` (snapshot at the
            end of every backward, under DDP after its all-reduce has reached ``.grad``:
            right even if the gradients are clipped before :meth:`update`; one more
            fused norm per backward).
        sync_every: under DDP, the optimiser steps whose rows one collective exchanges
            (1 = every step); ignored in one process. The same on every rank.

    Raises:
        ValueError: on an unknown method/reduction/accumulation or bad EMA settings,
            when the model has no trainable parameter, ``method="ddp"`` without a
            DistributedDataParallel model, or ``sync_every`` below 1.
        noisescale.distributed.DistributedSetupError: on an FSDP or DTensor model.
        noisescale.errors.UnsupportedLayerError: ``per_example`` on a model with a
            layer that has no kernel (and ``fallback=False``); the message names it.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method = "per_example",
        *,
        reduction: Literal["mean", "sum"] = "mean",
        accumulation: Literal["mean", "sum", "example_mean"] = "mean",
        ema_decay: float | None = None,
        ema_examples: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        confidence: float = 0.95,
        groups: Mapping[str, Iterable[nn.Parameter]] | None = None,
        fallback: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        read_grad: Literal["at_update", "after_backward"] = "at_update",
        sync_every: int = DEFAULT_SYNC_EVERY,
    ) -> None:
        for arg, value, allowed in (
            ("method", method, ("microbatch", "per_example", "ddp")),
            ("reduction", reduction, ("mean", "sum")),
            ("accumulation", accumulation, ("mean", "sum", "example_mean")),
            ("read_grad", read_grad, ("at_update", "after_backward")),
        ):
            if value not in allowed:
                raise ValueError(f"Expected `{arg}` to be one of {allowed} but got {value!r}")
        if ema_decay is None and ema_examples is None:
            ema_decay = DEFAULT_EMA_DECAY
        decay_for_step(ema_decay=ema_decay, ema_examples=ema_examples, examples=1.0)  # validates
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"Expected `confidence` in (0, 1) but got {confidence}")
        _check_count("sync_every", sync_every, "optimizer steps")
        module = nsdist.unwrap_model(model)
        nsdist.check_supported_parallelism(module)
        ddp = model if isinstance(model, DistributedDataParallel) else None
        if ddp is not None and method == "microbatch":
            method = "ddp"
        if method == "ddp" and ddp is None:
            raise ValueError(
                "method='ddp' measures a DistributedDataParallel model: wrap the model first "
                "(noisescale.distributed.wrap_ddp), or use method='microbatch' in one process"
            )
        named = {k: [p for p in v if p.requires_grad] for k, v in (groups or default_groups(module)).items()}
        named = {k: v for k, v in named.items() if v}
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to measure")
        self.method: Method = method
        self.reduction = reduction
        self.accumulation = accumulation
        self.ema_decay = ema_decay
        self.ema_examples = ema_examples
        self.confidence = confidence
        part = _partition(named, optimizer)
        self.group_names = part.group_names
        self.param_group_names = part.param_group_names
        params = [p for ps in part.cells for p in ps]
        self._device = params[0].device
        self._series = part.series.to(self._device)  # [S, C]
        cell = torch.tensor([j for j, ps in enumerate(part.cells) for _ in ps], device=self._device)
        self._param_cells = torch.nn.functional.one_hot(cell, len(part.cells)).to(torch.float64)  # [P, C]
        self._param_series = self._param_cells @ self._series.T  # [P, S]
        # The estimators as matrices, made once per distinct (sizes, loss factors) and device.
        self._coefficients = functools.lru_cache(maxsize=64)(self._make_coefficients)
        self._per_example_coefficients = functools.lru_cache(maxsize=64)(self._make_per_example_coefficients)
        per_example = None
        if method == "per_example":
            from noisescale.per_example import PerExampleNorms

            per_example = PerExampleNorms(module, part.cells, fallback=fallback)
        self._recorder = GradientRecorder(
            params, scaler=scaler, per_example=per_example, snapshot=read_grad == "after_backward"
        )
        self._sync_counter: nsdist.SyncCounter | None = None
        self._process_group = None
        self.world_size = 1
        if ddp is not None:
            self._sync_counter = nsdist.SyncCounter(ddp)
            self._process_group = ddp.process_group
            self.world_size = self._sync_counter.world_size
        self.sync_every = int(sync_every)
        self._pending: list[tuple[torch.Tensor, int]] = []  # one process: each step's [2, S] stats, examples
        # DDP, per step not exchanged yet: local [m, C] norms (per_example: [1, C] sums), [C] big
        # norms, and each row's (size, loss factor, m) (per_example: examples, weight, weight^2).
        self._unsent: list[tuple[torch.Tensor, torch.Tensor, list[tuple[float, float, float]]]] = []
        self._unsent_skip = 0  # leading unsent steps dropped on this rank (reset, load, remove)
        self._exchange: _Exchange | None = None  # DDP: the collective started, not folded in yet
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every step so far (hooks stay attached). Needs no collective."""
        self._drop_pending()
        self._state = ema_init(self._series.shape[0], self._device)  # [9, S]
        self._steps = 0
        self._examples = 0
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        self._recorder.pop()
        if self._sync_counter is not None:
            self._sync_counter.pop()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume with identical results.

        Under DDP it holds the steps exchanged so far (the same on every rank): call
        :meth:`sync` on every rank first to include the latest, or a resumed run misses
        up to ``sync_every - 1`` steps.
        """
        self._settle()
        return {
            "ema": {k: v.clone() for k, v in zip(FIELDS, self._state, strict=True)},
            "steps": self._steps,
            "examples": self._examples,
            "skipped_steps": self._skipped.clone(),
            "group_names": list(self.group_names),
            "param_group_names": list(self.param_group_names),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: if the parameter groups differ from this meter's.
        """
        for key, mine in (("group_names", self.group_names), ("param_group_names", self.param_group_names)):
            theirs = list(state_dict.get(key, []))
            if theirs != mine:
                raise ValueError(f"state_dict was saved for {key} {theirs} but this meter has {mine}")
        self._drop_pending()
        self._state = torch.stack([torch.as_tensor(state_dict["ema"][k]) for k in FIELDS]).to(self._device)
        self._steps = int(state_dict["steps"])
        self._examples = int(state_dict["examples"])
        self._skipped = torch.as_tensor(state_dict["skipped_steps"]).to(self._device)

    def discard(self) -> None:
        """Drop the backward passes since the last :meth:`update` without folding them in.

        For a step whose loss conventions differ from the declared ones, e.g. the short
        last accumulation window of an epoch that a framework still divides by the full
        number of micro-batches. Under DDP call it on every rank.
        """
        self._recorder.pop()
        if self._sync_counter is not None:
            self._sync_counter.pop()

    def remove(self) -> None:
        """Detach every hook from the model (DDP's own all-reduce is untouched).

        Needs no collective; under DDP, steps not exchanged yet are dropped with a
        warning (call :meth:`sync` on every rank first).
        """
        self._settle()
        dropped = len(self._unsent) - self._unsent_skip
        if dropped:
            warnings.warn(
                f"meter.remove() dropped the last {dropped} DDP step(s), not exchanged between the ranks "
                "yet: call meter.sync() on every rank before remove() (or compute()) to count them.",
                stacklevel=2,
            )
        self._unsent_skip = len(self._unsent)  # still sent at a later sync(): every rank's shapes match
        self._recorder.remove()
        if self._sync_counter is not None:
            self._sync_counter.remove()

    # -- per step ------------------------------------------------------------------------------
    def update(self, batch_size: int | None = None, *, microbatch_sizes: Iterable[int] | None = None) -> None:
        """Fold in the optimiser step whose backward passes ran since the last call.

        Args:
            batch_size: examples in the step (all micro-batches; under DDP, those of this
                rank). Required for ``microbatch``/``ddp`` unless ``microbatch_sizes`` is
                given (equal micro-batches are assumed); optional for ``per_example``
                (counted from the inputs).
            microbatch_sizes: examples in each micro-batch, in backward order (this rank's).

        Raises:
            RuntimeError: if no backward pass ran since the last update, or one raised
                halfway (the step is dropped: zero the gradients and go on), or reentrant
                checkpointing split a parameter's gradient (use ``use_reentrant=False``).
            noisescale.errors.SingleMicrobatchError: ``microbatch`` with one backward
                pass, or a step of one example.
            ValueError: if the sizes do not match the backward passes.
            noisescale.distributed.DistributedSetupError: under DDP, if no all-reduce ran
                this step (every micro-step was under ``no_sync``).
        """
        problem = self._recorder.problem()
        records = self._recorder.pop()
        if problem is not None:
            if self._sync_counter is not None:
                self._sync_counter.pop()
            raise RuntimeError(problem)
        if not records:
            raise RuntimeError(
                "meter.update() found no backward pass since the last update: call it once per "
                "optimizer step, after loss.backward() and before optimizer.zero_grad()"
            )
        self._check_syncs(len(records))
        if self.method == "per_example":
            big_sq = self._recorder.sq_norms([], big=True)[0]  # [P]: .grad, or its snapshot
            self._per_example(records, batch_size, big_sq @ self._param_cells)
        else:
            sizes = self._microbatch_sizes(len(records), batch_size, microbatch_sizes)
            self._microbatch(records, sizes)
        if len(self._pending) >= _MAX_PENDING:
            self._settle()
        if len(self._unsent) >= self.sync_every:
            self._start_exchange()

    def sync(self) -> None:
        """Exchange every step so far between the DDP ranks and fold them in.

        Without it, :meth:`compute` lags up to ``sync_every - 1`` steps behind. A
        collective under DDP: call it on every rank at the same step (e.g. before logging
        or checkpointing), or some rank waits forever; calling it every step costs what
        ``sync_every=1`` costs. In one process it only folds in the pending steps.
        """
        if self._sync_counter is not None:
            self._start_exchange()
        self._settle()

    def _check_syncs(self, backward_passes: int) -> None:
        """Under DDP: raise if no all-reduce ran this step, warn if more than one did."""
        if self._sync_counter is None:
            return
        syncs = self._sync_counter.pop()
        if not syncs:
            raise nsdist.DistributedSetupError(
                "no DDP gradient all-reduce ran since the last update(): every micro-step was "
                "inside model.no_sync(), so .grad holds this rank's gradient only. Run the last "
                "micro-step of each optimizer step outside no_sync()."
            )
        if syncs > 1:
            warnings.warn(
                f"DDP all-reduced the gradients in {syncs} of the {backward_passes} backward passes of "
                "this step: the forward pass of a non-final micro-step ran outside model.no_sync() "
                "(DDP decides at forward time), so each micro-step paid a full all-reduce (or a "
                "forward ran without a backward). The noise scale is still right (noisescale records "
                "each backward's own gradient), but put the forward AND the backward inside "
                "`with model.no_sync():`.",
                stacklevel=3,
            )

    def _microbatch_sizes(
        self, k: int, batch_size: int | None, microbatch_sizes: Iterable[int] | None
    ) -> list[int]:
        if batch_size is not None:
            _check_count("batch_size", batch_size)
        if microbatch_sizes is not None:
            sizes = list(microbatch_sizes)
            for b in sizes:
                _check_count("microbatch_sizes", b)
            if len(sizes) != k:
                raise ValueError(f"got {len(sizes)} microbatch_sizes for {k} backward passes")
            if batch_size is not None and batch_size != sum(sizes):
                raise ValueError(f"batch_size={batch_size} but microbatch_sizes sum to {sum(sizes)}")
            return [int(b) for b in sizes]
        if batch_size is None:
            raise ValueError(f"method={self.method!r} needs update(batch_size=...) or microbatch_sizes=...")
        if batch_size % k:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by the {k} backward passes seen: pass "
                "microbatch_sizes=[...] for unequal micro-batches"
            )
        return [batch_size // k] * k

    def _microbatch(self, records: list[MicrobatchRecord], sizes: list[int]) -> None:
        """Undo the loss conventions: record i holds |c_i g_i|^2, .grad holds sum_i c_i g_i (/ W)."""
        k = len(records)
        if self.accumulation == "example_mean":  # sum over the examples / all examples of the step
            factors = [b / sum(sizes) for b in sizes]  # under DDP: redone from every rank's sizes
        else:
            factors = [
                (b if self.reduction == "sum" else 1.0) / (k if self.accumulation == "mean" else 1.0)
                for b in sizes
            ]
        sq = self._recorder.sq_norms(records, big=True)  # [k + 1, P]: the micro-batches, then .grad
        if self._sync_counter is None:  # the estimator and the sums into series are linear: one product each
            coefficients = self._coefficients(tuple(sizes), tuple(factors), self._device)
            self._pending.append((coefficients @ sq @ self._param_series, sum(sizes)))
            return
        if k * self.world_size < 2:  # raise now, not when the step settles
            raise SingleMicrobatchError(
                "one process with one backward pass per step: the ddp method needs W x micro-batches "
                ">= 2 (launch 2 or more processes, or accumulate 2 or more micro-batches)"
            )
        cells = sq @ self._param_cells  # [k + 1, C]
        self._unsent.append((cells[:k], cells[k], [(b, c, k) for b, c in zip(sizes, factors, strict=True)]))

    def _make_coefficients(
        self, sizes: tuple[int, ...], factors: tuple[float, ...], device: torch.device
    ) -> torch.Tensor:
        """``[2, k + 1]``: the step's (|G|^2, tr Sigma) estimates are this times its ``k + 1`` squared norms.

        The k-way estimator is linear in the recorded squared norms (k micro-batches, then
        the big batch), so its values on the unit vectors are its matrix. Under DDP the
        k = W m micro-batches are every rank's, rank-major, and DDP's all-reduce divides
        the big gradient by W.
        """
        k = len(sizes)
        unit = torch.eye(k + 1, dtype=torch.float64)
        c = torch.tensor(factors, dtype=torch.float64)
        b = torch.tensor(sizes, dtype=torch.float64)
        return torch.stack(_weighted_microbatch(unit[:k], b, c, unit[k], c / self.world_size)).to(device)

    def _make_per_example_coefficients(
        self, small: float, big: float, b_big: float, device: torch.device
    ) -> torch.Tensor:
        """``[2, 2]``: the (|G|^2, tr Sigma) estimates are this times (summed per-example squared
        norms, big-batch squared norm): :func:`per_example_stats` of ``small`` times the first and
        ``big`` times the second over ``b_big`` examples."""
        x = torch.tensor([[small, 0.0], [0.0, big]], dtype=torch.float64)
        return torch.stack(per_example_stats(x[0], x[1], b_big)).to(device)

    def _per_example(
        self, records: list[MicrobatchRecord], batch_size: int | None, big_sq: torch.Tensor
    ) -> None:
        """Record i holds |a_i g_n|^2 per example, with a_i the loss factor of micro-batch i."""
        if any(r.per_example is None for r in records):
            raise RuntimeError(
                "a backward pass produced parameter gradients but no per-example norms: a parameter "
                "was used outside the layer that owns it (e.g. `h @ emb.weight.T`). Tie weights through "
                "a module (`head.weight = emb.weight`) or use method='microbatch'."
            )
        sizes = [int(r.per_example.shape[0]) for r in records]  # type: ignore[union-attr]
        if batch_size is not None:
            _check_count("batch_size", batch_size)
        if batch_size is not None and batch_size != sum(sizes):
            raise ValueError(
                f"batch_size={batch_size} but the per-example hooks saw {sum(sizes)} examples "
                f"(dim 0 of the layer inputs) in {len(records)} backward pass(es)"
            )
        k = len(records)
        if self.accumulation == "example_mean":  # under DDP: rescaled by every rank's count
            a = [1.0 / sum(sizes)] * k
        else:
            a = [
                (1.0 / n if self.reduction == "mean" else 1.0) / (k if self.accumulation == "mean" else 1.0)
                for n in sizes
            ]
        if self._sync_counter is not None and self.accumulation == "example_mean":
            a = [1.0] * k  # raw sums: the factor W / N_all is known once every rank's count is in
        sum_sq = sum(r.per_example.sum(0) / ai**2 for r, ai in zip(records, a, strict=True))  # type: ignore[union-attr]
        weight = sum(n * ai for n, ai in zip(sizes, a, strict=True))
        weight2 = sum(n * ai**2 for n, ai in zip(sizes, a, strict=True))
        if self._sync_counter is None:
            total = sum(sizes)
            coefficients = self._per_example_coefficients(
                1 / total, 1 / weight**2, weight**2 / weight2, self._device
            )
            stats = coefficients @ torch.stack([sum_sq.to(torch.float64), big_sq])
            self._pending.append((stats @ self._series.T, total))
            return
        self._unsent.append((sum_sq.to(torch.float64)[None], big_sq, [(sum(sizes), weight, weight2)]))

    def _start_exchange(self) -> None:
        """Start one collective over the unsent DDP steps (every rank calls this at the same step).

        The exchange started before is folded in first: its collective has had
        ``sync_every`` steps to finish.
        """
        self._settle()
        unsent, self._unsent = self._unsent, []
        skip, self._unsent_skip = self._unsent_skip, 0
        if not unsent:
            return
        meta = torch.tensor([row for _, _, rows in unsent for row in rows], dtype=torch.float64)
        rows = torch.cat([torch.cat([x for x, _, _ in unsent]), meta.to(self._device)], dim=1)  # one copy
        big = torch.stack([b for _, b, _ in unsent])  # [N, C]
        if self.method == "per_example":  # [N, C + 3] sums, additive over ranks
            work, outputs = nsdist.reduce_sums(rows, self._process_group), [rows]
        else:  # [M, C + 3] rows of every rank
            work, outputs = nsdist.gather_rows(rows, self._process_group)
        self._exchange = _Exchange(work, outputs, [len(x) for x, _, _ in unsent], big, skip)

    def _drop_pending(self) -> None:
        """Forget the steps not folded in yet; the unsent DDP ones are still sent (shapes match)."""
        if self._exchange is not None:
            self._exchange.work.wait()
        self._pending, self._exchange = [], None
        self._unsent_skip = len(self._unsent)

    def _exchanged_stats(self, exchange: _Exchange) -> tuple[torch.Tensor, list[int]]:
        """The ``[N, 2, C]`` estimates and examples of the ``N`` steps of one exchange.

        Waits for its collective and reads back its last three columns (one host
        synchronisation): every rank's micro-batch sizes, loss factors and backward passes per step
        (microbatch, ``[W][M][3]``), or each step's summed examples, weights and squared
        weights (per_example, ``[1][N][3]``); the estimators' matrices, made on the host,
        reach the device in one copy.

        Raises:
            noisescale.distributed.DistributedSetupError: if the ranks ran different
                numbers of backward passes in a step.
        """
        n, w, cpu = self._series.shape[1], self.world_size, torch.device("cpu")
        exchange.work.wait()
        gathered = torch.stack(exchange.outputs)  # [W, M, C + 3], or [1, N, C + 3]
        tail = gathered[..., n:].tolist()
        coefficients, examples, start = [], [], 0
        if self.method == "per_example":
            for total, weight, weight2 in tail[0]:
                weight, weight2, scale = weight / w, weight2 / w**2, 1.0
                if self.accumulation == "example_mean":  # each example's factor was W / N_all
                    weight, weight2, scale = 1.0, 1.0 / total, (total / w) ** 2
                coefficients.append(
                    self._per_example_coefficients(scale / total, 1 / weight**2, weight**2 / weight2, cpu)
                )
                examples.append(round(total))
            x = torch.stack([gathered[0, :, :n], exchange.big], dim=1)  # [N, 2, C]
            return torch.stack(coefficients).to(self._device) @ x, examples
        m = exchange.backward_passes
        for m_t in m:  # each step's k = W m_t micro-batches, rank-major
            step = [row for rank in tail for row in rank[start : start + m_t]]
            if any(row[2] != m_t for row in step):
                raise nsdist.DistributedSetupError(
                    f"the ranks ran different numbers of backward passes in one step ({m_t} here, "
                    f"{sorted({round(row[2]) for row in step})} in all): call update() on every rank "
                    "after the same number of micro-steps"
                )
            sizes = [round(row[0]) for row in step]
            factors = [row[1] for row in step]
            if self.accumulation == "example_mean":  # the loss was sum / N_all * W on each rank
                factors = [b * w / sum(sizes) for b in sizes]
            coefficients.append(self._coefficients(tuple(sizes), tuple(factors), cpu))  # [2, W m_t + 1]
            examples.append(sum(sizes))
            start += m_t
        ranks = gathered[..., :n]  # [W, M, C]
        if len(set(m)) == 1:  # one product: [N, 2, W m + 1] @ [N, W m + 1, C]
            small = ranks.unflatten(1, (len(m), m[0])).transpose(0, 1).flatten(1, 2)
            x = torch.cat([small, exchange.big[:, None]], 1)
            return torch.stack(coefficients).to(self._device) @ x, examples
        stats = [  # steps with different numbers of backward passes
            c.to(self._device) @ torch.cat([part.flatten(0, 1), big[None]])
            for c, part, big in zip(coefficients, ranks.split(m, dim=1), exchange.big, strict=True)
        ]
        return torch.stack(stats), examples

    def _settle(self) -> None:
        """Fold in the steps since the last fold, in order, at once.

        One process: the pending ``[2, S]`` estimates. DDP: the exchange started, less
        the steps dropped before it was sent.
        """
        if self._sync_counter is None:
            pending, self._pending = self._pending, []
            if not pending:
                return
            steps = torch.stack([stats for stats, _ in pending])
            examples = [e for _, e in pending]
        else:
            exchange, self._exchange = self._exchange, None
            if exchange is None or exchange.skip >= len(exchange.backward_passes):
                if exchange is not None:
                    exchange.work.wait()
                return
            stats, counts = self._exchanged_stats(exchange)
            steps = stats[exchange.skip :] @ self._series.T  # [N, 2, S]
            examples = counts[exchange.skip :]
        betas = [
            decay_for_step(ema_decay=self.ema_decay, ema_examples=self.ema_examples, examples=e)
            for e in examples
        ]
        self._state, finite = ema_fold(self._state, steps, betas)
        self._skipped += (~finite).sum()
        self._steps += len(steps)
        self._examples += sum(examples)

    # -- results -------------------------------------------------------------------------------
    def compute(self) -> NoiseScaleEstimate:
        """B_simple with its interval, total and per group (one host synchronisation).

        Under DDP it covers the steps exchanged so far (every ``sync_every`` steps, or at
        :meth:`sync`) and waits for the last exchange's collective; no collective of its own.
        """
        self._settle()
        iv = b_simple_interval(self._state, self.confidence)

        def group(j: int) -> GroupEstimate:
            resolved = bool(iv.resolved[j])
            return GroupEstimate(
                b_simple=_opt(iv.b_simple[j]) if resolved else None,
                b_simple_ci=(float(iv.low[j]), float(iv.high[j])) if resolved else None,
                b_simple_se=_opt(iv.se[j]),
                grad_norm_sq=float(iv.grad_norm_sq[j]) if self._steps else float("nan"),
                trace_sigma=float(iv.trace_sigma[j]) if self._steps else float("nan"),
                resolved=resolved,
            )

        m = len(self.group_names)
        total = group(self._series.shape[0] - 1)
        return NoiseScaleEstimate(
            *total,
            steps=self._steps,
            examples=self._examples,
            skipped_steps=int(self._skipped),
            n_eff=float(iv.n_eff[-1]) if self._steps else 0.0,
            groups={name: group(j) for j, name in enumerate(self.group_names)},
            param_groups={name: group(m + i) for i, name in enumerate(self.param_group_names)},
        )
