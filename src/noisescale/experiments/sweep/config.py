r"""The configuration of a batch-size sweep: the grid, the learning-rate rule, the goals, the budgets.

For a geometric grid of batch sizes ``B`` (in the task's unit: images, examples, tokens or
observations) a sweep trains the task with its optimizer (plain SGD without momentum, the
optimizer of the paper's analysis, for the image tasks; AdamW after a warmup for ``shakespeare``;
Adam for ``cartpole``) at a few
learning rates per batch size, centred on the rule of McCandlish et al. (2018), appendix A.3,

.. math::

    \epsilon(B) = \frac{\epsilon_{max}}{(1 + B_*/B)^{\alpha}}

(``alpha = 1`` for SGD, eq. 2.6; ``alpha = 1/2``, a square-root rule, for Adam, appendix E), on a
geometric grid ``epsilon(B) * step^i``. The defaults of each built-in task, and the pilot runs
they come from, are in ``_DEFAULTS``.

An RL task (``cartpole``) has return goals, reached when the mean return of the last episodes is
at or above the level; RL is noisy, so each of its runs trains ``seeds`` seeds in lockstep and is
judged by their median (:mod:`noisescale.experiments.sweep.run`).

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    eq. (2.6), appendix A.2-A.3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

from noisescale.errors import SweepConfigError
from noisescale.experiments.rl import RL_TASK_NAMES
from noisescale.experiments.tasks import CLASSIFICATION_TASKS
from noisescale.experiments.training import TrainConfig
from noisescale.io import settings_fields, settings_to_dict
from noisescale.options import SINGLE_PROCESS_METHODS, parse_method

__all__ = ["METRICS", "SWEEP_FORMAT", "SWEEP_TASKS", "Goal", "RunSpec", "SweepConfig", "lr_rule"]

SWEEP_FORMAT = 1  # version of config.json and of the run records
METRICS = ("train_loss", "validation_loss", "test_error", "mean_return")
_MAX_SEED = 2**63  # seeds are in [0, 2**63)


def lr_rule(batch_size: float, lr_max: float, b_star: float, alpha: float = 1.0) -> float:
    r"""Centre of the learning-rate grid at a batch size.

    .. math::

        \epsilon(B) = \epsilon_{max} / (1 + B_*/B)^{\alpha}

    Args:
        batch_size: B, examples per step.
        lr_max: ``epsilon_max``, the learning rate at very large batches.
        b_star: ``B_*``, examples; below it the rule grows about linearly in B.
        alpha: 1 for SGD (eq. 2.6); about 0.5 for Adam (appendix E).

    Returns:
        The learning rate.

    Example:
        >>> lr_rule(100, 1.0, 100)
        0.5

    References:
        McCandlish et al. (2018), arXiv:1812.06162, eq. (2.6) and appendix A.3.
    """
    return lr_max / (1.0 + b_star / batch_size) ** alpha


class Goal(NamedTuple):
    """One target of a sweep: a level of a metric, reached at or below it (at or above: a return)."""

    metric: str  # "train_loss" (a training subset), "validation_loss" (held-out), "test_error", "mean_return"
    level: float


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Everything that determines a sweep's runs (saved as ``config.json``).

    Attributes:
        task: built-in task name (:func:`noisescale.experiments.tasks.get_task`).
        batch_sizes: the grid, examples per step (geometric by default).
        lr_max: ``epsilon_max`` of the learning-rate rule.
        lr_b_star: ``B_*`` of the rule, examples.
        lr_alpha: exponent of the rule (1: SGD).
        lr_step: ratio between neighbouring learning rates of a batch size's grid.
        lr_points: learning rates per batch size before widening (centred on the rule).
        max_widenings: extra learning rates per batch size at most.
        loss_goals: training-loss levels (mean loss per example on ``eval_examples`` training examples).
        validation_loss_goals: held-out loss levels (mean loss per unit on ``eval_test_examples``
            examples of the task's held-out set: the validation plays of ``shakespeare``, the test
            set of the image tasks, which have no other split).
        error_goals: test-error levels (fraction misclassified on ``eval_test_examples`` test examples).
        return_goals: mean-return levels of an RL task (the best mean undiscounted return of the last
            ``return_window`` episodes so far, median over the ``seeds``), reached at or above.
        max_steps: largest step budget of a run.
        max_examples: example budget of a run: the step budget is ``max_examples / B`` clipped to
            ``[min_steps, max_steps]``, so small batches get many steps and large ones few.
        min_steps: smallest step budget of a run (large batches still need ``S_min`` steps).
        eval_examples: training examples in the fixed subset the loss goals are checked on.
        eval_test_examples: test examples in the fixed subset the error goals are checked on.
        eval_growth: goals are checked at steps growing by this factor (at least one step apart).
        method: the meter's estimator, ``"per_example"`` or ``"microbatch"``.
        microbatches: micro-batches per step (1 for per_example; >= 2 for microbatch).
        ema_examples: time constant of the meter's averages, examples (validated by
            :class:`noisescale.options.Averaging`).
        momentum: SGD momentum (0: plain SGD).
        optimizer: ``"sgd"`` or ``"adamw"`` (:mod:`noisescale.experiments.optim`).
        warmup_steps: steps of the linear learning-rate warmup of every run.
        weight_decay: weight decay (AdamW: decoupled, on the matrices).
        units_per_example: units of a batch size one example carries (the task's: 64 tokens a
            ``shakespeare`` window, 16 observations a ``cartpole`` rollout, else 1).
        seed: initial weights and data stream of every run.
        seeds: seeds per run, ``seed, seed + 1, ...``, trained in lockstep (RL tasks only).
        format: version of the sweep directory layout.
    """

    task: str
    batch_sizes: tuple[int, ...]
    lr_max: float
    lr_b_star: float
    lr_alpha: float = 1.0
    lr_step: float = 2.0
    lr_points: int = 3
    max_widenings: int = 2
    loss_goals: tuple[float, ...] = ()
    validation_loss_goals: tuple[float, ...] = ()
    error_goals: tuple[float, ...] = ()
    return_goals: tuple[float, ...] = ()
    max_steps: int = 10_000
    max_examples: int = 1_000_000
    min_steps: int = 1000
    eval_examples: int = 2048
    eval_test_examples: int = 2048
    eval_growth: float = 1.1
    method: str = "per_example"
    microbatches: int = 1
    ema_examples: float = 10_000.0
    momentum: float = 0.0
    optimizer: str = "sgd"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    units_per_example: int = 1
    seed: int = 0
    seeds: int = 1
    format: int = SWEEP_FORMAT

    def __post_init__(self) -> None:
        """Normalise the sequences and validate every field; the messages say what to change."""
        sizes = tuple(sorted({int(b) for b in self.batch_sizes}))
        object.__setattr__(self, "batch_sizes", sizes)
        for name in ("loss_goals", "validation_loss_goals", "error_goals"):
            levels = sorted({float(g) for g in getattr(self, name)}, reverse=True)
            object.__setattr__(self, name, tuple(levels))
        object.__setattr__(self, "return_goals", tuple(sorted({float(g) for g in self.return_goals})))
        try:  # a sweep trains each run in one process: no ddp
            object.__setattr__(self, "method", parse_method(self.method, SINGLE_PROCESS_METHODS))
        except ValueError as exc:
            raise SweepConfigError(f"a sweep trains each run in one process: {exc}") from None
        # Comparisons are written so that NaN fails them.
        if len(sizes) < 3 or sizes[0] < 2:
            raise SweepConfigError(f"expected at least 3 batch sizes >= 2 but got {list(sizes)}")
        losses = self.loss_goals + self.validation_loss_goals
        rl = self.task in RL_TASK_NAMES
        if rl != bool(self.return_goals) or (rl and (losses or self.error_goals)):
            raise SweepConfigError(
                f"task {self.task!r} needs return goals and no other goals"
                if rl
                else f"task {self.task!r} is not an RL task, so it has no return: give loss or error goals"
            )
        if not all(0 < g < math.inf for g in self.return_goals):
            raise SweepConfigError(f"return goals must be positive and finite, got {list(self.return_goals)}")
        if not (self.seeds >= 1 and (rl or self.seeds == 1)):
            raise SweepConfigError(f"seeds={self.seeds}: expected 1, or more for an RL task")
        if not losses and not self.error_goals and not rl:
            raise SweepConfigError("a sweep needs at least one goal: give a loss goal or an error goal")
        if not all(0 < g < math.inf for g in losses):
            raise SweepConfigError(f"loss goals must be positive and finite, got {list(losses)}")
        if set(losses) & set(self.error_goals):
            raise SweepConfigError("a loss goal and an error goal have the same value: make them differ")
        if not all(0 < g < 1 for g in self.error_goals):
            raise SweepConfigError(f"error goals are fractions in (0, 1), got {list(self.error_goals)}")
        if self.error_goals and self.task not in CLASSIFICATION_TASKS:
            raise SweepConfigError(
                f"task {self.task!r} is not a classification task, so it has no test error: "
                "give loss goals only"
            )
        if not (
            0 < self.lr_max < math.inf
            and 0 <= self.lr_b_star < math.inf
            and 0 <= self.lr_alpha < math.inf
            and 1 < self.lr_step < math.inf
            and self.lr_points >= 1
        ):
            raise SweepConfigError(
                "expected finite lr_max > 0, lr_b_star >= 0, lr_alpha >= 0, lr_step > 1 and lr_points >= 1"
            )
        if min(self.min_steps, self.max_examples, self.eval_examples, self.eval_test_examples) < 1:
            raise SweepConfigError("budgets and evaluation subsets must be at least 1")
        if self.min_steps > self.max_steps:
            raise SweepConfigError(
                f"expected min_steps <= max_steps but got {self.min_steps} > {self.max_steps}"
            )
        if sizes[-1] > self.max_examples:
            raise SweepConfigError(
                f"batch size {sizes[-1]} is above the example budget of a run, max_examples="
                f"{self.max_examples}: drop it or raise max_examples"
            )
        if not (1 < self.eval_growth < math.inf and self.max_widenings >= 0):
            raise SweepConfigError("expected finite eval_growth > 1 and max_widenings >= 0")
        if not 0 <= self.seed <= _MAX_SEED - self.seeds:
            raise SweepConfigError(f"expected 0 <= seed and seed + seeds <= 2**63 but got {self.seed}")
        if self.microbatches >= 1 and any(b % self.microbatches for b in sizes):
            raise SweepConfigError(f"every batch size must be a multiple of microbatches={self.microbatches}")
        # The checks of a single run (micro-batches, momentum, averaging), before any training.
        for b in sizes:
            try:
                self.train_config(b, self.learning_rate(b, 0))
            except ValueError as exc:
                raise SweepConfigError(str(exc)) from None

    @property
    def goals(self) -> list[Goal]:
        """Loss, validation-loss and error goals (highest first), then return goals (lowest first)."""
        return (
            [Goal("train_loss", g) for g in self.loss_goals]
            + [Goal("validation_loss", g) for g in self.validation_loss_goals]
            + [Goal("test_error", g) for g in self.error_goals]
            + [Goal("mean_return", g) for g in self.return_goals]
        )

    def budget(self, batch_size: int) -> int:
        """Step budget of a run: ``ceil(max_examples / B)`` clipped to ``[min_steps, max_steps]``."""
        return max(self.min_steps, min(self.max_steps, math.ceil(self.max_examples / batch_size)))

    def base_lr_indices(self) -> range:
        """Indices of the initial learning-rate grid, centred on 0 (the rule's value)."""
        return range(-(self.lr_points // 2), self.lr_points - self.lr_points // 2)

    def learning_rate(self, batch_size: int, index: int) -> float:
        """Learning rate ``epsilon(B) * lr_step**index`` (see :func:`lr_rule`)."""
        center = lr_rule(batch_size, self.lr_max, self.lr_b_star, self.lr_alpha)
        return float(f"{center * self.lr_step**index:.6g}")  # 6 digits: stable file names and JSON

    def train_config(self, batch_size: int, lr: float) -> TrainConfig:
        """The settings of the run at ``batch_size`` and ``lr``, with its step budget.

        Raises:
            ValueError: if they make no valid run (e.g. the microbatch method with one micro-batch).
        """
        budget = self.budget(batch_size)
        return TrainConfig(
            batch_size=batch_size,
            microbatches=self.microbatches,
            lr=lr,
            steps=budget,
            method=self.method,
            seed=self.seed,
            momentum=self.momentum,
            optimizer=self.optimizer,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            units_per_example=self.units_per_example,
            ema_decay=None,
            ema_examples=self.ema_examples,
            measure_every=budget + 1,  # estimates are read at the checks only (one host sync each)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (sequences as lists)."""
        return settings_to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SweepConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            SweepConfigError: on unknown keys or invalid values.
        """
        return cls(**settings_fields(cls, values, what="sweep", error=SweepConfigError))

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> SweepConfig:
        """The defaults of a built-in task, with every override that is not None applied.

        Raises:
            SweepConfigError: for a task without sweep defaults, an unknown setting or an invalid value.
        """
        if task not in SWEEP_TASKS:
            raise SweepConfigError(
                f"no sweep defaults for task {task!r}: expected one of {', '.join(SWEEP_TASKS)}"
            )
        values = {**_DEFAULTS[task], **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict({"task": task, **values})


def _grid(low: int, high: int, factor: int = 2) -> list[int]:
    """Geometric grid ``low, low*factor, ...`` up to ``high``."""
    out = [low]
    while out[-1] * factor <= high:
        out.append(out[-1] * factor)
    return out


# Defaults per task (the reasoning and the measured cost are in docs/sweeps.md).
_DEFAULTS: dict[str, dict[str, Any]] = {
    # MLP 784-256-256-10. Pilot runs (plain SGD, seed 0): the fastest learning rate to a
    # training loss of 0.1 was about 0.4-0.5 at B = 64 and 1.0 at B = 1024 (2.0 diverges),
    # hence lr_max = 1 and B_* = 64. B_crit is about 130 images at that goal.
    "mnist": {
        "batch_sizes": _grid(16, 2048, 2),
        "lr_max": 1.0,
        "lr_b_star": 64.0,
        "loss_goals": [0.4, 0.2, 0.1],
        "error_goals": [0.05],
        "max_steps": 10_000,
        "max_examples": 600_000,
        "min_steps": 1000,
        "eval_test_examples": 4096,
    },
    # Conv net of tasks.py (slow on a CPU: about 1,000 images/s). Pilot runs (plain SGD, seed 0):
    # the fastest learning rate was about 0.2 at B = 32 and 0.4 at B = 256, and twice that left
    # every unit dead (so did 0.42 at B = 256 in a first sweep: the edge of stability is
    # abrupt), hence a centre a little lower, lr_max = 0.35 and B_* = 32. B_crit was 30-60
    # images at these goals in the pilot runs.
    "fashion-mnist": {
        "batch_sizes": _grid(8, 256, 2),
        "lr_max": 0.35,
        "lr_b_star": 32.0,
        "loss_goals": [0.8, 0.6, 0.5],
        "error_goals": [0.2],
        "max_steps": 3000,
        "max_examples": 100_000,
        "min_steps": 300,
        "eval_examples": 1024,
        "eval_test_examples": 1024,
        "eval_growth": 1.2,
        "ema_examples": 5000.0,
    },
    "digits": {
        "batch_sizes": _grid(8, 512, 4),
        "lr_max": 0.8,
        "lr_b_star": 64.0,
        "loss_goals": [0.5, 0.2],
        "error_goals": [0.1],
        "max_steps": 2000,
        "max_examples": 200_000,
        "min_steps": 200,
        "eval_examples": 1438,
        "eval_test_examples": 359,
        "ema_examples": 2000.0,
    },
    # Noisy linear regression: the loss floor is sigma^2/2 = 0.245 (SCIENCE.md oracle).
    "linreg": {
        "batch_sizes": _grid(2, 128, 4),
        "lr_max": 0.3,
        "lr_b_star": 8.0,
        "loss_goals": [0.6, 0.35],
        "max_steps": 1000,
        "max_examples": 20_000,
        "min_steps": 50,
        "ema_examples": 500.0,
    },
    # The character GPT of tasks.py under AdamW, batch sizes in tokens (windows of 64), goals in
    # validation loss (nats per character on 256 windows of the held-out plays). Pilot runs (seed
    # 0, the rule's learning rate): 1.95 nats took 4,416 steps at B = 256, 2,118 at 512, 407 at
    # 4,096 and 288 at 16,384 (B_crit about 5,000 tokens from the two ends); 1.85 nats took 5,467
    # steps at 512 and 718 at 4,096 (B_crit far beyond 4,096), hence goals down to 1.95 nats, a
    # grid up to 16,384 tokens and budgets (4M tokens, at least 400 steps) above those runs'.
    "shakespeare": {
        "batch_sizes": _grid(256, 16_384, 2),
        "lr_max": 6e-3,
        "lr_b_star": 2048.0,
        "lr_alpha": 0.5,
        "validation_loss_goals": [2.2, 2.05, 1.95],
        "optimizer": "adamw",
        "warmup_steps": 20,
        "weight_decay": 0.1,
        "units_per_example": 64,
        "max_steps": 16_000,
        "max_examples": 4_000_000,
        "min_steps": 400,
        "eval_examples": 256,
        "eval_test_examples": 256,
        "eval_growth": 1.2,
        "ema_examples": 200_000.0,
        "max_widenings": 1,
    },
    # A2C with Adam on CartPole-v1, batch sizes in observations (16-step rollouts of B/16
    # environment copies), 3 seeds per run; a goal is the median over the seeds of the best mean
    # return of 20 episodes. Pilot runs (3 seeds, the rule's learning rate): mean return 195 took
    # 290, 132 and 65 updates at B = 64, 256 and 1,024 (B_crit about 300 observations), 475 took
    # 1,251 and 621 updates at B = 64 and 256 and was not reached in 300,000 observations at 1,024.
    "cartpole": {
        "batch_sizes": _grid(32, 2048, 2),
        "lr_max": 3e-3,
        "lr_b_star": 1024.0,
        "lr_alpha": 0.5,
        "return_goals": [195.0, 475.0],
        "optimizer": "adamw",
        "units_per_example": 16,
        "seeds": 3,
        "max_steps": 6000,
        "max_examples": 400_000,
        "min_steps": 200,
        "eval_growth": 1.05,
        "ema_examples": 25_000.0,
    },
}


SWEEP_TASKS: tuple[str, ...] = tuple(_DEFAULTS)


class RunSpec(NamedTuple):
    """One run of a sweep: a batch size and a learning rate of its grid."""

    batch_size: int  # examples per step
    lr_index: int  # the learning rate is epsilon(B) * lr_step**lr_index

    def lr(self, config: SweepConfig) -> float:
        """The run's learning rate."""
        return config.learning_rate(self.batch_size, self.lr_index)

    def name(self, config: SweepConfig) -> str:
        """File stem of the run's record, ``<B>_<lr>``."""
        return f"{self.batch_size}_{self.lr(config):.6g}"
