"""Train an RL task with A2C while measuring the gradient noise scale of the policy and the value.

One update collects a rollout of ``E = B / T`` independent environment copies for ``T`` steps
each (:class:`~noisescale.experiments.rl.env.VectorEnvs`), then back-propagates the A2C loss
(:func:`~noisescale.experiments.rl.agent.a2c_loss`, the mean over the observations) and steps::

    rollout = envs.rollout(model, T)                      # [E, T, ...], no gradient
    for copies in rollout.split(k):                       # k groups of E/k copies
        (a2c_loss(model, copies) / k).backward()          # mean over the group's observations
    meter.update(microbatch_sizes=[B/k] * k)              # or per_example: example_sizes=T
    optimizer.step(); optimizer.zero_grad()

It reuses :class:`~noisescale.experiments.training.TrainConfig` (``batch_size`` in observations,
``units_per_example = T``), the optimizer and meter of
:func:`~noisescale.experiments.training.optimizer_and_meter` (with the groups ``policy`` and
``value``) and :class:`~noisescale.experiments.training.TrainResult`.

**What counts as an example.** The copies are independent given the weights; the observations
of one copy are not (the same episode, a step apart). The k-way estimator over groups of copies
(``microbatch``) and the per-example estimator over copies (``per_example``: the model sees
``[E, T, obs]``, so each copy's rollout is one row, carrying ``T`` observations) are unbiased for
the noise of a batch of ``B`` observations drawn as ``B / T`` rollouts. ``example="observation"``
instead flattens the batch to ``[E T, obs]`` and treats each observation as an example: it
estimates ``tr Sigma_obs`` (the covariance of one observation's gradient) instead of
``tr Sigma_eff = T tr Cov(rollout mean)`` (the noise that actually averages out), and on the same
batch its |G|^2 exceeds the rollout view's by exactly ``(tr Sigma_eff - tr Sigma_obs) / B``. With
observations positively correlated within an episode B_simple comes out too low (measured on
CartPole: about 5x for the value network, ``benchmarks/rl_correlation.py``); the view exists to
measure that bias.

Runs are deterministic given ``seed`` and the number of torch threads: the weights
(``make_model(seed)``), each copy's resets (:func:`~noisescale.experiments.rl.env.env_seeds`)
and the action draws (a torch generator seeded with ``seed``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from noisescale.critical.goals import run_mean
from noisescale.experiments.records import StepRecord
from noisescale.experiments.rl.agent import a2c_loss
from noisescale.experiments.rl.env import VectorEnvs
from noisescale.experiments.rl.task import RLTask
from noisescale.experiments.training import TrainConfig, TrainResult, optimizer_and_meter, run_steps

__all__ = ["EXAMPLES", "RLStepRecord", "RLTrainer", "rl_results", "train_rl"]

EXAMPLES = ("rollout", "observation")  # what the per-example method counts as one example


@dataclasses.dataclass(frozen=True)
class RLStepRecord(StepRecord):
    """A :class:`~noisescale.experiments.training.StepRecord` (``loss`` is the A2C loss) plus returns.

    Attributes:
        mean_return: mean undiscounted return of the last ``return_window`` episodes finished
            (None before the first one ends).
        episodes: episodes finished so far.
    """

    mean_return: float | None = None
    episodes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The record of ``metrics.jsonl``: the supervised one plus ``mean_return`` and ``episodes``."""
        return {**super().to_dict(), "mean_return": self.mean_return, "episodes": self.episodes}


class RLTrainer:
    """An agent, its environments, optimizer and meter, advanced one update at a time.

    Use it as a context manager (or call :meth:`close`) to remove the meter's hooks and close
    the environments.

    Args:
        task: the RL task.
        config: hyperparameters (:meth:`TrainConfig.for_task` of the task); ``batch_size`` in
            observations, a multiple of ``microbatches x T``.
        example: what ``per_example`` counts as one example: ``"rollout"`` (a copy's ``T``
            observations, unbiased) or ``"observation"`` (biased: see the module docstring).

    Raises:
        ValueError: if ``config.units_per_example`` is not the task's ``T``, on DDP, or on
            ``example="observation"`` with another method than ``per_example``.
    """

    def __init__(self, task: RLTask, config: TrainConfig, *, example: str = "rollout") -> None:
        if config.units_per_example != task.rollout:
            raise ValueError(
                f"units_per_example={config.units_per_example} but a rollout of {task.name!r} is "
                f"{task.rollout} observations: build the config with TrainConfig.for_task(task)"
            )
        if example not in EXAMPLES or (example == "observation" and config.method != "per_example"):
            raise ValueError(f"example={example!r}: expected 'rollout', or 'observation' with per_example")
        if config.method == "ddp":
            raise ValueError(f"task {task.name!r} trains in one process: use per-example or microbatch")
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.task, self.config, self.example = task, config, example
        self.model = task.make_model(config.seed).to(config.device)
        self.envs = VectorEnvs(task.env_id, config.batch_size // task.rollout, config.seed)
        self.optimizer, self.scheduler, self.meter = optimizer_and_meter(
            self.model, config, groups=self.model.groups()
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.returns: deque[float] = deque(maxlen=task.return_window)
        self.best_return: float | None = None  # the highest mean_return() after any update so far
        self.episodes = 0
        self.steps_done = 0
        self.examples = 0
        self._start = time.perf_counter()

    def step(self) -> RLStepRecord:
        """One update: a rollout, k backward passes (groups of copies), meter update, optimizer step."""
        cfg, task, k = self.config, self.task, self.config.microbatches
        data = self.envs.rollout(
            self.model, task.rollout, self.generator, gamma=task.gamma, lam=task.gae_lambda
        )
        self.returns.extend(data.episode_returns)
        self.episodes += len(data.episode_returns)
        now = self.mean_return()
        if now is not None and (self.best_return is None or now > self.best_return):
            self.best_return = now
        tensors = [t.to(cfg.device) for t in (data.obs, data.actions, data.advantages, data.returns)]
        if self.example == "observation":  # rows = observations: the biased per-observation view
            tensors = [t.flatten(0, 1) for t in tensors]  # copy-major, so a split is still by copies
        loss_sum = 0.0
        for obs, actions, advantages, returns in zip(*(t.tensor_split(k) for t in tensors), strict=True):
            loss = a2c_loss(
                self.model, obs, actions, advantages, returns,
                value_coef=task.value_coef, entropy_coef=task.entropy_coef,
            )  # fmt: skip
            (loss / k).backward()
            loss_sum += float(loss.detach())
        if self.meter is not None:  # before the optimizer changes the gradients
            per_rollout = self.meter.method == "per_example" and self.example == "rollout"
            sizes = [cfg.batch_size // k] * k  # observations per group of copies
            self.meter.update(microbatch_sizes=sizes, example_sizes=task.rollout if per_rollout else None)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self.examples += cfg.batch_size
        measuring = self.meter is not None and self.steps_done % cfg.measure_every == 0
        return RLStepRecord(
            step=self.steps_done,
            examples=self.examples,
            loss=loss_sum / k,
            lr=lr,
            batch_size=cfg.batch_size,
            wall_time=time.perf_counter() - self._start,
            estimate=self.meter.compute() if self.meter is not None and measuring else None,
            mean_return=self.mean_return(),
            episodes=self.episodes,
        )

    def mean_return(self) -> float | None:
        """Mean return of the last ``return_window`` episodes finished (None before the first)."""
        return sum(self.returns) / len(self.returns) if self.returns else None

    def close(self) -> None:
        """Detach the meter's hooks and close the environments."""
        if self.meter is not None:
            self.meter.remove()
        self.envs.close()

    def __enter__(self) -> RLTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train_rl(
    task: RLTask,
    config: TrainConfig,
    *,
    callback: Callable[[StepRecord], None] | None = None,
    stop: Callable[[RLStepRecord, RLTrainer], bool] | None = None,
    example: str = "rollout",
) -> TrainResult:
    """Train ``task`` for ``config.steps`` updates, or until ``stop`` returns True.

    The counterpart of :func:`noisescale.experiments.training.train` for RL tasks.

    Args:
        task: the RL task.
        config: hyperparameters (see :class:`RLTrainer`).
        callback: called with every update's record.
        stop: ``stop(record, trainer)`` after every update; True ends the run.
        example: what ``per_example`` counts as one example (:class:`RLTrainer`).

    Returns:
        The agent, the records (:class:`RLStepRecord`) and the final estimate.
    """
    start = time.perf_counter()
    with RLTrainer(task, config, example=example) as trainer:
        records, stopped = run_steps(trainer, config.steps, callback, stop)
        estimate = None if trainer.meter is None else trainer.meter.compute()
    steps: list[StepRecord] = list(records)
    return TrainResult(trainer.model, config, steps, estimate, time.perf_counter() - start, stopped)


def rl_results(task: RLTask, result: TrainResult) -> dict[str, Any]:
    """What a run of an RL task adds to ``summary.json``: its returns and its settings.

    Returns:
        ``mean_return`` (of the last ``return_window`` episodes), ``return_window``,
        ``episodes``, ``group_run_means`` (per group, the run mean of its resolved smoothed B_simple
        and the number of steps it was resolved, as ``b_simple_run_mean`` for the total), the
        rollout length ``T`` and number of copies, and the A2C settings.
    """
    last = result.records[-1] if result.records else None
    measured = [(r.step, r.estimate) for r in result.records if r.estimate is not None]
    steps = [step for step, _ in measured]
    means = {}
    for name in measured[-1][1].groups if measured else ():
        values = [e.groups[name].b_simple for _, e in measured]
        mean = run_mean(steps, values, upto=steps[-1])
        means[name] = {"b_simple": mean, "resolved_steps": sum(v is not None for v in values)}
    return {
        "mean_return": last.mean_return if isinstance(last, RLStepRecord) else None,
        "return_window": task.return_window,
        "episodes": last.episodes if isinstance(last, RLStepRecord) else 0,
        "group_run_means": means,
        "env": task.env_id,
        "rollout": task.rollout,
        "envs": result.config.batch_size // task.rollout,
        "gamma": task.gamma,
        "gae_lambda": task.gae_lambda,
        "value_coef": task.value_coef,
        "entropy_coef": task.entropy_coef,
    }
