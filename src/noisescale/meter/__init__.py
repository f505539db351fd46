"""``GradientNoiseScale``: the meter that drops into a PyTorch training loop.

A thin stateful wrapper: hooks record squared gradient norms (:mod:`noisescale.collect`);
:mod:`noisescale.meter.steps` types one step's records and, with the loss conventions and
the estimators as matrices of :mod:`noisescale.estimators`, makes its unbiased |G|^2 and
tr(Sigma); :mod:`noisescale.meter.state` averages them apart (:mod:`noisescale.smoothing`);
B_simple with its interval is formed only in :meth:`GradientNoiseScale.compute`
(:mod:`noisescale.meter.averages`, :mod:`noisescale.uncertainty`, :mod:`noisescale.meter.results`).
Under a diagonal preconditioner (Adam's) the same rows, weighted, give the preconditioned
noise scale next to the raw one (:mod:`noisescale.preconditioner`). Under DDP the steps
travel between the ranks through :mod:`noisescale.meter.exchange`; which parameters are
measured and how they are reported is :mod:`noisescale.meter.partition`.

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

Data-parallel training: wrap the model in DistributedDataParallel (or ``fully_shard`` it)
first; the meter then measures over every replica's micro-batches
(:mod:`noisescale.meter.parallel`). Per-layer values: one estimate per module (``groups``)
and, given the optimizer, per optimizer parameter group (``param_groups``); the total is the
mediant of either.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training,
    arXiv:1812.06162, eqs. (2.9), (A.1), (A.2).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NoReturn

import torch
from torch import nn

from noisescale.collect import GradientRecorder, MicrobatchRecord
from noisescale.errors import SingleMicrobatchError
from noisescale.estimators import (
    ACCUMULATIONS,
    REDUCTIONS,
    Accumulation,
    Reduction,
    check_dataset_size,
    loss_factors,
)
from noisescale.meter.averages import Averages
from noisescale.meter.exchange import Exchange
from noisescale.meter.parallel import data_parallel
from noisescale.meter.partition import default_groups, layernorm_groups, measured_groups, partition
from noisescale.meter.results import GroupEstimate, NoiseScaleEstimate
from noisescale.meter.state import check_settings, settings_of
from noisescale.meter.steps import (
    MicrobatchStep,
    check_count,
    check_within_dataset,
    microbatch_matrix,
    per_example_matrix,
    per_example_step,
    split_sizes,
    unit_rows,
)
from noisescale.options import Averaging, Method, parse_method
from noisescale.preconditioner import Preconditioner, PreconditionerSpec

__all__ = ["GradientNoiseScale", "GroupEstimate", "NoiseScaleEstimate", "default_groups", "layernorm_groups"]

DEFAULT_SYNC_EVERY = 16  # DDP: steps whose rows one collective exchanges
ReadGrad = Literal["at_update", "after_backward"]


class GradientNoiseScale:
    r"""Online gradient noise scale B_simple = tr(Sigma)/|G|^2 of a training run.

    .. math::

        B_{simple} = \frac{\mathrm{EMA}(\mathcal{S})}{\mathrm{EMA}(|\mathcal{G}|^2)}

    Call :meth:`update` once per optimiser step, after the step's last backward and
    before gradient clipping, ``optimizer.step()`` and ``zero_grad()`` (it reads the
    accumulated ``.grad`` as the big batch; with a GradScaler, before or after
    ``scaler.unscale_`` both work). In one process it never reads from the device (a
    step with new micro-batch sizes sends it one small matrix); :meth:`compute` reads, once.

    Under DDP (a model wrapped in DistributedDataParallel, process group initialised)
    call :meth:`update` on every rank every step, with the same number of backward
    passes on every rank (sizes may differ); the big gradient is the mean DDP's own
    all-reduce leaves in ``.grad`` (with ``read_grad="after_backward"``, read right
    after it, so clipping before :meth:`update` does no harm); under ``fully_shard`` the
    same, from the shards of ``.grad`` (:mod:`noisescale.fsdp`). The ranks exchange their
    rows in one small asynchronous collective every ``sync_every`` steps
    (:mod:`noisescale.meter.exchange`); :meth:`compute` needs no collective and covers
    the steps exchanged so far (``compute().steps``); :meth:`sync`, called on every
    rank, exchanges the rest first (the integrations do this before they log).

    Impossible records are never a number: a step whose big-batch squared norm exceeds
    the weighted mean of the small ones' (beyond float rounding), or an averaged tr(Sigma)
    significantly negative, sets ``contradiction`` on the estimate (saying what to check),
    keeps it unresolved until :meth:`reset`, and :meth:`compute` warns once.

    It holds hooks and cannot be pickled: :meth:`load_state_dict` a :meth:`state_dict` instead.

    Args:
        model: the module being trained (``fully_shard`` or not), or its DistributedDataParallel
            wrapper. Only parameters with ``requires_grad`` count.
        method: ``"microbatch"``: each of k >= 2 backward passes per step is a small
            batch (the usual gradient-accumulation loop; no extra cost).
            ``"per_example"``: exact per-example squared norms from layer hooks
            (``nn.Linear``, ``nn.Conv1d/2d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``,
            ``nn.GroupNorm``); lowest variance, works with one backward per step.
            ``"ddp"``: the k-way estimator over ``W`` replicas x ``m`` micro-batches
            (``m >= 1``); selected automatically when a DDP model is given with
            ``"microbatch"``; ``"fsdp"``: the same for a ``fully_shard`` (FSDP2) model
            (:mod:`noisescale.fsdp`). Spellings such as ``"per-example"`` are accepted
            (:func:`noisescale.options.parse_method`).
        reduction: how ONE micro-batch's loss is reduced over its examples:
            ``"mean"`` or ``"sum"``.
        accumulation: ``"mean"`` if each micro-batch loss is divided by k before
            backward, ``"sum"`` if not (under DDP: the k of this rank).
            ``"example_mean"``: each micro-batch loss is the SUM of its per-example losses
            divided by the examples (tokens) of the whole step, every rank's (token-weighted
            LM losses, HF's ``num_items_in_batch``; :func:`noisescale.estimators.loss_factors`).
        ema_decay: per-step decay of the averages (default 0.99; 1.0 = plain mean).
        ema_examples: instead of ``ema_decay``, a time constant in examples: decay
            ``exp(-B / ema_examples)`` per step of B examples (:class:`noisescale.options.Averaging`).
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any.
        confidence: level of ``b_simple_ci``.
        groups: named parameter groups (default: one per module owning parameters).
            The total is their mediant ``sum trSigma_j / sum |G_j|^2``; only their layers and
            tensors are hooked (:func:`layernorm_groups`: the cheap transformer mode). A tensor
            listed twice in one group counts once; one tensor in two groups is refused.
        fallback: per_example only: allow the slower exact fallback for layers
            without a kernel (e.g. BatchNorm) instead of raising.
        optimizer: also report B_simple per optimizer parameter group (named by the
            group's ``"name"`` key, else ``param_group_<i>``).
        preconditioner: also measure the noise scale under a diagonal preconditioner ``P``,
            B_P = tr(P Sigma)/(G^T P G), reported next to the raw one in
            ``compute().preconditioned``: ``"adam"`` (``optimizer`` an Adam/AdamW; ``P =
            1/(sqrt(v_hat) + eps)`` read from its state before each step's ``optimizer.step()``;
            steps before it has state are not counted) or ``{parameter: non-negative weights
            of its shape}`` (:mod:`noisescale.preconditioner`).
        read_grad: when the big batch is read: ``"at_update"`` (``.grad`` at :meth:`update`) or
            ``"after_backward"`` (a snapshot after every backward, under DDP after its all-reduce:
            right even if the gradients are clipped before :meth:`update`; one more norm per backward).
        sync_every: under DDP, the optimiser steps whose rows one collective exchanges
            (1 = every step); ignored in one process. The same on every rank.
        dataset_size: N, examples in the dataset, when every step's examples are drawn
            WITHOUT replacement from it (shuffled epochs, full-batch steps): the exact
            finite-population correction (:mod:`noisescale.estimators`). None (default)
            assumes sampling with replacement: draws without replacement then give B_simple
            about ``N / (N - 1 - B_simple)`` times too large, negligible while B_simple << N.

    Raises:
        ValueError: on an unknown method/reduction/accumulation or bad EMA settings,
            ``method="ddp"``/``"fsdp"`` without a DDP/``fully_shard`` model, ``sync_every`` below
            1, or ``dataset_size`` not an integer >= 2.
        noisescale.errors.ParameterGroupError: (a ValueError) when the model has no
            trainable parameter, or one tensor is in two ``groups`` (named with both groups).
        noisescale.distributed.DistributedSetupError: FSDP1, DeepSpeed ZeRO, HSDP or tensor
            parallelism (:func:`noisescale.fsdp.sharded_model`, saying what works instead).
        noisescale.errors.UnsupportedLayerError: ``per_example`` on a model with a
            layer that has no kernel (and ``fallback=False``); the message names it.
        ValueError: (preconditioner) ``"adam"`` without an Adam/AdamW ``optimizer``, or a
            measured parameter without weights; weights of the wrong shape, negative or not finite.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method = "per_example",
        *,
        reduction: Reduction = "mean",
        accumulation: Accumulation = "mean",
        ema_decay: float | None = None,
        ema_examples: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        confidence: float = 0.95,
        groups: Mapping[str, Iterable[nn.Parameter]] | None = None,
        fallback: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        read_grad: ReadGrad = "at_update",
        sync_every: int = DEFAULT_SYNC_EVERY,
        dataset_size: int | None = None,
        preconditioner: PreconditionerSpec | None = None,
    ) -> None:
        method = parse_method(method)
        for arg, value, allowed in (
            ("reduction", reduction, REDUCTIONS),
            ("accumulation", accumulation, ACCUMULATIONS),
            ("read_grad", read_grad, ("at_update", "after_backward")),
        ):
            if value not in allowed:
                raise ValueError(f"Expected `{arg}` to be one of {allowed} but got {value!r}")
        self.averaging = Averaging.of(ema_decay, ema_examples)
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"Expected `confidence` in (0, 1) but got {confidence}")
        check_count("sync_every", sync_every, "optimizer steps")
        self.dataset_size = check_dataset_size(dataset_size)
        parallel = data_parallel(model, method, preconditioned=preconditioner is not None)
        method, module = parallel.method, parallel.module
        part = partition(
            measured_groups(default_groups(module) if groups is None else groups, module), optimizer
        )
        self.method: Method = method
        self.reduction: Reduction = reduction
        self.accumulation: Accumulation = accumulation
        self.confidence = confidence
        self.group_names = part.group_names
        self.param_group_names = part.param_group_names
        params = [p for ps in part.cells for p in ps]
        self.preconditioner = (
            None if preconditioner is None else Preconditioner(params, preconditioner, optimizer, module)
        )
        self._averages = Averages(part, preconditioned=self.preconditioner is not None)
        per_example = None
        if method == "per_example":
            from noisescale.per_example import PerExampleNorms

            with parallel.layers_gathered():  # FSDP2: the kernels see the unsharded parameters
                cells = [parallel.hooked(c) or c for c in part.cells]
                pre = self.preconditioner
                per_example = PerExampleNorms(module, cells, fallback=fallback, preconditioner=pre)
        snapshot, local = read_grad == "after_backward", parallel.world_size > 1  # each backward's norms too
        self._recorder = GradientRecorder(
            params,
            scaler=scaler,
            per_example=per_example,
            snapshot=snapshot,
            backward_norms=local,
            preconditioner=self.preconditioner,
            hooked=parallel.hooked(params),
            cleared=None if parallel.sharded is None else parallel.sharded.cleared,
        )
        self._sync_counter = parallel.replicas  # DDP's or FSDP2's check of each step's reduction
        self.world_size = parallel.world_size
        self._exchange = None
        if parallel.replicas is not None:
            self._exchange = Exchange(
                method,
                reduction=reduction,
                accumulation=accumulation,
                process_group=parallel.replicas.process_group,
                world_size=self.world_size,
                dataset_size=self.dataset_size,
                sharded=parallel.sharded is not None,
            )
        self.sync_every = int(sync_every)
        self._warned = False  # compute() warned about a contradiction since the last reset
        self.reset()

    @property
    def ema_decay(self) -> float | None:
        """The per-step decay, or None when the averaging is set in examples."""
        return self.averaging.ema_decay

    @property
    def ema_examples(self) -> float | None:
        """The averaging time constant in examples, or None."""
        return self.averaging.ema_examples

    def __getstate__(self) -> NoReturn:
        """Refuse: the meter holds hooks on the model.

        Raises:
            TypeError: always; the message says to save :meth:`state_dict` instead.
        """
        raise TypeError(
            "a GradientNoiseScale holds hooks on its model and cannot be pickled or copied: save "
            "meter.state_dict() (plain tensors and numbers) and load_state_dict() it into a meter made "
            "on the restored model"
        )

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every step so far (hooks stay attached). Needs no collective."""
        self._drop_pending()
        self._averages.reset()
        self._warned = False
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
        return {**self._averages.state_dict(), "settings": settings_of(self)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (also one saved before ``contradicted_steps`` existed).

        Raises:
            ValueError: if the groups, method, loss conventions, dataset_size, averaging or
                preconditioner differ.
        """
        check_settings(state_dict.get("settings", {}), settings_of(self))
        self._averages.load_state_dict(state_dict)
        self._drop_pending()

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
        if self._exchange is not None:
            dropped = self._exchange.drop_unsent()  # still sent at a later sync(): every rank's shapes match
            if dropped:
                warnings.warn(
                    f"meter.remove() dropped the last {dropped} DDP step(s), not exchanged between the ranks "
                    "yet: call meter.sync() on every rank before remove() (or compute()) to count them.",
                    stacklevel=2,
                )
        self._recorder.remove()
        if self.preconditioner is not None:
            self.preconditioner.remove()
        if self._sync_counter is not None:
            self._sync_counter.remove()

    # -- per step ------------------------------------------------------------------------------
    def update(
        self,
        batch_size: int | None = None,
        *,
        microbatch_sizes: Iterable[int] | None = None,
        example_sizes: int | Iterable[int] | None = None,
    ) -> None:
        """Fold in the optimiser step whose backward passes ran since the last call.

        Args:
            batch_size: examples in the step (all micro-batches; under DDP, those of this
                rank). Required for ``microbatch``/``ddp`` unless ``microbatch_sizes`` is
                given (equal micro-batches are assumed); optional for ``per_example``
                (counted from the inputs).
            microbatch_sizes: examples in each micro-batch, in backward order (this rank's).
            example_sizes: ``per_example`` in one process only: the loss units (tokens) of each
                example (row of dim 0), in backward order, or one int for all; B_simple is then
                in these units (:func:`noisescale.meter.steps.unit_rows`; sizes on the host).

        Raises:
            RuntimeError: if no backward pass ran since the last update, or one raised
                halfway (the step is dropped: zero the gradients and go on), or reentrant
                checkpointing split a parameter's gradient (use ``use_reentrant=False``).
            noisescale.errors.SingleMicrobatchError: ``microbatch`` with one backward
                pass, or a step of one example.
            ValueError: if the sizes do not match the backward passes, or a step has more
                examples than ``dataset_size``.
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
        if self._sync_counter is not None:
            self._sync_counter.check_step(len(records))
        if example_sizes is not None:  # per_example in loss units (tokens)
            self._units(records, batch_size, example_sizes)
        elif self.method == "per_example":
            self._per_example(records, batch_size)
        else:
            self._microbatch(records, split_sizes(len(records), batch_size, microbatch_sizes))
        if self._exchange is not None and len(self._exchange.unsent) >= self.sync_every:
            self._settle()  # the exchange started before: its collective had sync_every steps to finish
            self._exchange.start()

    def sync(self) -> None:
        """Exchange every step so far between the DDP ranks and fold them in.

        Without it, :meth:`compute` lags up to ``sync_every - 1`` steps behind. A
        collective under DDP: call it on every rank at the same step (e.g. before logging
        or checkpointing), or some rank waits forever; calling it every step costs what
        ``sync_every=1`` costs. In one process it only folds in the pending steps.
        """
        self._settle()
        if self._exchange is not None:
            self._exchange.start()
            self._settle()

    def _microbatch(self, records: list[MicrobatchRecord], sizes: tuple[int, ...]) -> None:
        """Record i holds |c_i g_i|^2; ``.grad`` holds sum_i c_i g_i (/ W under DDP)."""
        cells = self._averages.cells_of(self._recorder.sq_norms(records, big=True))  # [k + 1, C]
        check_within_dataset(sum(sizes), self.dataset_size)  # under DDP this rank's; every rank's later
        if self._exchange is not None:
            if len(records) * self.world_size < 2:  # raise now, not when the step settles
                raise SingleMicrobatchError(
                    "one process with one backward pass per step: the ddp method needs W x micro-batches "
                    ">= 2 (launch 2 or more processes, or accumulate 2 or more micro-batches)"
                )
            self._exchange.add(MicrobatchStep(cells[:-1], cells[-1], sizes))
            return
        factors = loss_factors(sizes, reduction=self.reduction, accumulation=self.accumulation)
        matrix = microbatch_matrix(sizes, factors, 1, self.dataset_size, cells.device)
        self._averages.add(matrix @ cells, sum(sizes), self.averaging)  # the estimator is linear: one product

    def _per_example(self, records: list[MicrobatchRecord], batch_size: int | None) -> None:
        """Record i holds |a_i g_n|^2 per example (a_i: micro-batch i's loss factor); DDP: |c_i g_i|^2 too."""
        step = per_example_step(
            [r.per_example for r in records],
            self._averages.cells_of(self._recorder.sq_norms(records if self._exchange else [], big=True)),
            batch_size=batch_size,
            reduction=self.reduction,
            accumulation=self.accumulation,
            placeholder_factors=self._exchange is not None and self._exchange.placeholder_factors,
        )
        check_within_dataset(step.examples, self.dataset_size)
        if self._exchange is not None:
            self._exchange.add(step)
            return
        matrix = per_example_matrix(
            step.examples, step.weight, step.weight2, 1, self.dataset_size, step.big.device
        )
        self._averages.add(matrix @ torch.cat([step.sums, step.big[None]]), step.examples, self.averaging)

    def _units(
        self, records: list[MicrobatchRecord], batch_size: int | None, sizes: int | Iterable[int]
    ) -> None:
        """A ``per_example`` step whose examples carry ``sizes`` loss units each (one process)."""
        if self.method != "per_example" or self._exchange is not None or self.dataset_size is not None:
            raise ValueError("example_sizes is for method='per_example' in one process, without dataset_size")
        big = self._averages.cells_of(self._recorder.sq_norms([], big=True))[0]
        rows, units = unit_rows(
            [r.per_example for r in records], big, sizes, batch_size, self.reduction, self.accumulation
        )
        self._averages.add(rows, units, self.averaging)

    def _drop_pending(self) -> None:
        """Forget the steps not folded in yet; the unsent DDP ones are still sent (shapes match)."""
        self._averages.drop_pending()
        if self._exchange is not None:
            self._exchange.drop()

    def _settle(self) -> None:
        """Fold in the steps since the last fold, in order, at once.

        One process: the pending steps' rows. DDP: the exchange started, less the steps
        dropped before it was sent.
        """
        self._averages.settle(self.averaging)
        collected = None if self._exchange is None else self._exchange.collect()
        if collected is not None:
            self._averages.fold(*collected, self.averaging)

    # -- results -------------------------------------------------------------------------------
    def compute(self) -> NoiseScaleEstimate:
        """B_simple with its interval, total and per group (one host synchronisation).

        Before any step it returns ``steps == 0``, ``resolved`` False, ``b_simple`` None and
        NaN |G|^2 and tr(Sigma) (no error). Under DDP it covers the steps exchanged so far
        (every ``sync_every`` steps, or at :meth:`sync`) and waits for the last exchange's
        collective; no collective of its own. Warns once (until :meth:`reset`) when the
        records contradict "the big batch is the mean of the small ones" (``contradiction``).
        Under a preconditioner ``preconditioned`` holds the preconditioned estimate.
        """
        self._settle()
        estimate = self._averages.estimate(self.confidence)
        parts = [estimate.contradiction] + [g.contradiction for g in estimate.groups.values()]
        if estimate.preconditioned is not None:
            parts.append(estimate.preconditioned.contradiction)
        reason = next((r for r in parts if r is not None), None)
        if reason is not None and not self._warned:
            self._warned = True
            warnings.warn(f"noisescale: {reason}", RuntimeWarning, stacklevel=2)
        return estimate
