r"""The settings of a branched-training measurement (``config.json`` of ``noisescale branch``).

A base run trains the task at batch size ``B`` and learning rate ``eta`` (by default the centre
of the task's sweep rule ``eta(B) = eta_max/(1 + B_*/B)``, McCandlish et al. 2018, eq. 2.6 and
appendix A.3, so that the base is near its best learning rate). At each branch point (examples
seen, or the first check at or below a training loss) it branches copies at ``kappa B`` with the
learning rate

.. math::

    \eta_\kappa = \eta \left(\frac{1 + B_*/B}{1 + B_*/(\kappa B)}\right)^p,

the ratio of eq. 2.6's best learning rates at ``kappa B`` and ``B``: with ``B_* = inf`` it is
``eta kappa^p``, ``p = 1`` for SGD (linear scaling), ``p = 1/2`` for Adam(W) (the square-root
rule of Malladi et al. 2022, used by Merrill et al. 2025). Linear scaling holds for SGD only
while ``kappa B << B_noise`` (eq. 2.6): beyond it the learning rate overshoots the stable one and
the branch fails for that reason, so the built-in SGD tasks default to the finite ``B_*`` of
their sweep rule (measured in pilot runs), i.e. every branch runs at the sweep's learning rate for
its batch. Each branch trains for ``window`` examples (at least ``checks`` steps of the largest
branch, so that every branch moves between two checks), evaluated at the same examples,
``replicas`` times with different data. ``readings`` are losses at which the base run's B_crit
from initialisation is read (:func:`noisescale.critical.branched.cumulative_chain`) without
branching there: what a sweep's goals need, at no cost in branches.

The defaults per task, and the cost they were chosen for, are in ``_DEFAULTS``.

References:
    Merrill et al. (2025), Critical Batch Size Revisited, arXiv:2505.23971, section 3.1.
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162.
    Malladi et al. (2022), On the SDEs and Scaling Rules for Adaptive Gradient Algorithms,
    arXiv:2205.10287.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from noisescale.critical.branched import TOLERANCE_KINDS, check_branch_grid
from noisescale.errors import BranchConfigError
from noisescale.experiments.sweep.config import SWEEP_TASKS, SweepConfig
from noisescale.experiments.tasks import Task
from noisescale.experiments.training import TrainConfig
from noisescale.io import settings_fields, settings_to_dict
from noisescale.options import SINGLE_PROCESS_METHODS, parse_method

__all__ = ["BRANCH_FORMAT", "LR_POWER", "BranchConfig"]

BRANCH_FORMAT = 1  # version of config.json and of the records
LR_POWER = {"sgd": 1.0, "adam": 0.5, "adamw": 0.5}  # learning rate x kappa^p when the batch grows by kappa
_MAX_SEED = 2**63


@dataclasses.dataclass(frozen=True)
class BranchConfig:
    """Everything that determines a branched measurement; batch sizes and examples in the task's unit.

    Attributes:
        task: built-in task name.
        batch_size: ``B``, the base run's batch.
        lr: ``eta``, the base run's learning rate.
        kappas: the multipliers, increasing integers from 1 (branches at ``kappa B``).
        points: examples seen at which to branch (multiples of ``B``; 0: at initialisation, which
            the cumulative B_crit needs).
        loss_points: training losses at which to branch (the first check at or below each).
        readings: training losses at which to read the B_crit from initialisation without
            branching (the first check of the base run at or below each): where a sweep's goals are.
        window: examples each branch trains (a multiple of ``lcm(kappas) B``, at least ``checks``
            of them so that every branch takes a step between two checks), the least one when
            ``window_ratio`` is set.
        window_ratio: a point at ``x`` examples trains its branches for ``window_ratio x`` examples
            (rounded down to whole units, at least ``window``): windows grow with training like
            the gaps between geometric points; 0 keeps every window at ``window``.
        checks: evaluations per window (at the same examples in every branch).
        replicas: data streams per branch point (the interval resamples them).
        tolerance: ``tau`` (``"examples"``: a branch keeps up when it needs at most ``1 + tau``
            times the examples of each smaller one) or ``epsilon`` (``"loss"``, in loss units).
        tolerance_kind: ``"examples"`` or ``"loss"`` (:mod:`noisescale.critical.branched`).
        lr_power: ``p`` of the branch learning rate (1 SGD, 0.5 Adam; 0 keeps it).
        lr_b_star: ``B_*`` of the branch learning rate, examples (inf: ``eta kappa^p``).
        smoothing: EMA weight of the newest check (the paper's ``alpha = 0.5``; 1: none).
        eval_examples: training examples of the fixed subset the losses are evaluated on.
        eval_growth: the base run checks its loss at steps growing by this factor.
        max_examples: the base run's budget, at least the last examples point (loss points not
            reached by then are reported as such).
        ema_examples: time constant of the base run's B_simple averages, examples.
        method: the base run's noise-scale estimator (``"per_example"``, ``"microbatch"``) or None.
        seed: initial weights and data of the base run; branch streams derive from it.
        threads: torch threads (results are deterministic for a given number).
        format: version of the directory layout.
    """

    task: str
    batch_size: int
    lr: float
    kappas: tuple[int, ...]
    points: tuple[int, ...]
    window: int
    loss_points: tuple[float, ...] = ()
    readings: tuple[float, ...] = ()
    window_ratio: float = 0.0
    checks: int = 8
    replicas: int = 3
    tolerance: float = 1.0
    tolerance_kind: str = "examples"
    lr_power: float = 1.0
    lr_b_star: float = math.inf
    smoothing: float = 0.5
    eval_examples: int = 2048
    eval_growth: float = 1.1
    max_examples: int = 100_000
    ema_examples: float = 10_000.0
    method: str | None = "per_example"
    seed: int = 0
    threads: int = 1
    format: int = BRANCH_FORMAT

    def __post_init__(self) -> None:
        """Normalise and validate every field; the messages say what to change."""
        try:
            kappas = check_branch_grid(self.kappas)
        except ValueError as exc:
            raise BranchConfigError(str(exc)) from None
        object.__setattr__(self, "kappas", kappas)
        object.__setattr__(self, "points", tuple(sorted({int(p) for p in self.points})))
        for name in ("loss_points", "readings"):
            values = tuple(sorted({float(v) for v in getattr(self, name)}, reverse=True))
            object.__setattr__(self, name, values)
        if self.method is not None:
            try:
                object.__setattr__(self, "method", parse_method(self.method, SINGLE_PROCESS_METHODS))
            except ValueError as exc:
                raise BranchConfigError(f"the base run is one process: {exc}") from None
        b = self.batch_size
        if b < 1 or not 0 < self.lr < math.inf:
            raise BranchConfigError(f"expected batch_size >= 1 and a finite lr > 0 but got {b} and {self.lr}")
        if not self.points and not self.loss_points:
            raise BranchConfigError("give at least one branch point: examples (--at) or a loss (--at-loss)")
        for p in self.points:
            if p < 0 or p % b:
                raise BranchConfigError(
                    f"branch point {p} is not 0 or a positive multiple of the base batch {b}: "
                    f"use {max(b, p // b * b)} or {max(b, -(-p // b) * b)}"
                )
        if not all(0 < v < math.inf for v in (*self.loss_points, *self.readings)):
            raise BranchConfigError(
                f"loss points and readings must be positive and finite, got "
                f"{list(self.loss_points)} and {list(self.readings)}"
            )
        unit = self.unit_examples
        if self.window < 1 or self.window % unit:
            fix = max(unit, round(self.window / unit) * unit)
            raise BranchConfigError(
                f"window {self.window} is not a positive multiple of lcm(kappa) x B = {unit} examples "
                f"(every branch must reach each check exactly): use {fix}"
            )
        if self.checks >= 1 and self.window < self.checks * unit:
            raise BranchConfigError(
                f"window {self.window} gives the largest branch fewer steps than the {self.checks} checks "
                f"(lcm(kappa) x B = {unit} examples between two checks at least, so that every branch "
                f"steps between them): use a window of {self.checks * unit} or fewer checks"
            )
        if not 0 <= self.window_ratio < math.inf:
            raise BranchConfigError(
                f"expected window_ratio >= 0 (0: a fixed window) but got {self.window_ratio}"
            )
        if self.checks < 1 or self.replicas < 1 or self.eval_examples < 1 or self.threads < 1:
            raise BranchConfigError("checks, replicas, eval_examples and threads must be at least 1")
        if self.tolerance_kind not in TOLERANCE_KINDS or not 0 <= self.tolerance < math.inf:
            raise BranchConfigError(
                f"expected tolerance_kind in {TOLERANCE_KINDS} and a finite tolerance >= 0 "
                f"but got {self.tolerance_kind!r} and {self.tolerance}"
            )
        if not (0 <= self.lr_power < math.inf and self.lr_b_star > 0 and 0 < self.smoothing <= 1):
            raise BranchConfigError("expected lr_power >= 0, lr_b_star > 0 and smoothing in (0, 1]")
        if not 1 < self.eval_growth < math.inf:
            raise BranchConfigError(f"expected eval_growth > 1 but got {self.eval_growth}")
        if self.max_examples < max(self.points, default=1):
            last = max(self.points)
            raise BranchConfigError(
                f"max_examples {self.max_examples} is below the last branch point {last}: raise it"
            )
        if not 0 <= self.seed < _MAX_SEED:
            raise BranchConfigError(f"expected 0 <= seed < 2**63 but got {self.seed}")
        try:  # the checks of a run (micro-batches, averaging) before any training
            self.train_config()
        except ValueError as exc:
            raise BranchConfigError(str(exc)) from None

    @property
    def unit_examples(self) -> int:
        """``lcm(kappas) B``: the examples in which every branch takes whole steps."""
        return math.lcm(*self.kappas) * self.batch_size

    def window_at(self, examples: int) -> int:
        """The window of a point at ``examples`` seen: ``window_ratio x`` in whole units, >= ``window``."""
        grown = int(self.window_ratio * examples) // self.unit_examples * self.unit_examples
        return max(self.window, grown)

    def check_examples(self, window: int | None = None) -> tuple[int, ...]:
        """Examples at which every branch is evaluated: 0, about ``window/checks`` apart, the window.

        Args:
            window: the point's window (:meth:`window_at`); default ``window``.
        """
        units = (self.window if window is None else window) // self.unit_examples
        every = max(1, round(units / self.checks))
        marks = sorted({*range(every, units, every), units})
        return (0, *(m * self.unit_examples for m in marks))

    def branch_lr(self, kappa: int) -> float:
        """The learning rate at ``kappa B`` (module docstring), to 6 significant digits (stable records)."""
        b, bs = self.batch_size, self.lr_b_star
        ratio = float(kappa) if math.isinf(bs) else (1 + bs / b) / (1 + bs / (kappa * b))
        return float(f"{self.lr * ratio**self.lr_power:.6g}")

    def train_config(self, task: Task | None = None, **overrides: Any) -> TrainConfig:
        """The base run's settings (with ``overrides`` for a branch); the task's other defaults when given.

        Raises:
            ValueError: if they make no valid run.
        """
        steps = -(-self.max_examples // self.batch_size)
        values: dict[str, Any] = {
            "batch_size": self.batch_size,
            "microbatches": 2 if self.method == "microbatch" else 1,
            "lr": self.lr,
            "steps": steps,
            "method": self.method,
            "seed": self.seed,
            "ema_decay": None,
            "ema_examples": self.ema_examples,
            "measure_every": steps + 1,  # estimates are read at the checks only
            "threads": self.threads,
            **overrides,
        }
        return TrainConfig(**values) if task is None else TrainConfig.for_task(task, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (sequences as lists; an infinite ``lr_b_star`` becomes null when written)."""
        return settings_to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BranchConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            BranchConfigError: on unknown keys or invalid values.
        """
        fields = settings_fields(cls, values, what="branch", error=BranchConfigError)
        if "lr_b_star" in fields and fields["lr_b_star"] is None:  # JSON null: inf
            fields["lr_b_star"] = math.inf
        return cls(**fields)

    @classmethod
    def for_task(cls, task: Task, **overrides: Any) -> BranchConfig:
        """The defaults of a task, with every override that is not None applied.

        The learning rate defaults to the centre of the task's sweep rule at the base batch
        (else the task's own), ``lr_power`` to the rule of the task's optimizer, and ``lr_b_star``
        to the sweep rule's ``B_*`` for SGD (else inf).

        Raises:
            BranchConfigError: for an unknown setting or an invalid value.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        values: dict[str, Any] = {**_defaults(task), **given}
        optimizer = str(getattr(TrainConfig.for_task(task, method=None), "optimizer", "sgd")).lower()
        rule = SweepConfig.for_task(task.name) if task.name in SWEEP_TASKS else None
        if "lr" not in given:
            values["lr"] = task.lr if rule is None else rule.learning_rate(int(values["batch_size"]), 0)
        if "lr_power" not in given:
            values["lr_power"] = LR_POWER.get(optimizer, 1.0)
        if "lr_b_star" not in given and rule is not None and optimizer == "sgd":
            values["lr_b_star"] = rule.lr_b_star
        return cls.from_dict({"task": task.name, **values})


def _geometric(low: int, high: int) -> list[int]:
    out = [low]
    while out[-1] * 2 <= high:
        out.append(out[-1] * 2)
    return out


# Per task: the base batch well below the sweep's B_crit, so that the grid kappa B brackets it;
# points at initialisation and then doubling, spanning the sweep's goals, so that the cumulative
# B_crit is defined at each; windows half the gap to the next point and at least `checks` (8) steps
# of the largest branch: with one step the largest branch's curve is a single jump, and the early
# points, which weigh most in the cumulative B_crit's S_min, then read it as falling behind (on
# MNIST, windows of 512 images put B_crit <= 16 at 1,024 images). Cost measured with one torch
# thread (docs/critical-batch-size.md).
_DEFAULTS: dict[str, dict[str, Any]] = {
    # Sweep: B_crit 43-115 images at training losses 0.4-0.1, reached after 3k-50k images.
    "mnist": {
        "batch_size": 16,
        "kappas": (1, 2, 4, 8, 16, 32),
        "points": [0, *_geometric(512, 65_536)],
        "window": 4096,
        "window_ratio": 0.5,
        "ema_examples": 10_000.0,
        "max_examples": 200_000,
    },
    # Sweep: B_crit about 20 images at losses 0.5-0.2, reached after 0.6k-1.6k images.
    "digits": {
        "batch_size": 8,
        "kappas": (1, 2, 4, 8, 16, 32),
        "points": [0, *_geometric(128, 4096)],
        "window": 2048,
        "window_ratio": 0.5,
        "eval_examples": 1438,
        "ema_examples": 2000.0,
        "max_examples": 20_000,
    },
    # Sweep: B_crit 20-40 images; the conv net trains about 3,000 images/s on one core.
    "fashion-mnist": {
        "batch_size": 8,
        "kappas": (1, 2, 4, 8, 16, 32),
        "points": [0, *_geometric(256, 16_384)],
        "window": 2048,
        "window_ratio": 0.5,
        "eval_examples": 1024,
        "ema_examples": 5000.0,
        "max_examples": 100_000,
    },
    # The quadratic oracle: B_noise = 7.14 examples at the initial weights, rising without bound
    # as the loss falls to its floor sigma^2/2 = 0.245.
    "linreg": {
        "batch_size": 2,
        "kappas": (1, 2, 4, 8, 16, 32),
        "points": [0, *_geometric(32, 1024)],
        "window": 512,
        "window_ratio": 0.5,
        "ema_examples": 500.0,
        "max_examples": 20_000,
    },
}


def _defaults(task: Task) -> dict[str, Any]:
    """The task's entry of ``_DEFAULTS``, or defaults derived from its measuring run (batch, steps)."""
    if task.name in _DEFAULTS:
        return dict(_DEFAULTS[task.name])
    b, total = task.batch_size, task.steps * task.batch_size
    return {
        "batch_size": b,
        "kappas": (1, 2, 4, 8),
        "points": [0, *_geometric(16 * b, max(16 * b, total // 2))],
        "window": 16 * 8 * b,
        "window_ratio": 0.5,
        "max_examples": total,
    }
