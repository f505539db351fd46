"""The built-in reinforcement-learning tasks: an environment, the agent and the defaults of a run.

- ``cartpole``: gymnasium's ``CartPole-v1`` (reward 1 per step, at most 500 steps an episode),
  an :class:`~noisescale.experiments.rl.agent.ActorCritic` (policy 4-64-64-2 and value 4-64-64-1,
  tanh) trained with A2C and Adam; unit OBSERVATIONS (one environment step).

An update's batch is ``B = E T`` observations: ``E`` independent copies of the environment, each
run ``T`` steps (the rollout). One copy's rollout is one *example* of ``T`` observations, as a
window of ``T`` tokens is one example of ``shakespeare``: its observations are correlated, the
copies are independent. So ``B`` is a multiple of ``T``, micro-batches are groups of copies
(``E`` divisible by ``k``) and the ``per_example`` method takes per-copy gradient norms
(``update(example_sizes=T)``); either way B_simple is in observations.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    section 3 and Table 1 (Atari: B_simple 1,000-20,000 observations; Dota: 2.4x10^7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from noisescale.experiments.rl.agent import ActorCritic
from noisescale.experiments.rl.env import require_gymnasium
from noisescale.experiments.tasks import seeded

__all__ = ["RL_TASK_NAMES", "RLTask", "get_rl_task"]


@dataclasses.dataclass(frozen=True)
class RLTask:
    """An environment, its agent and the defaults of a run (the fields :class:`TrainConfig` reads).

    Attributes:
        name: registry name, e.g. ``"cartpole"``.
        env_id: gymnasium id.
        make_model: ``make_model(seed)`` builds the agent with deterministic initial weights.
        rollout: ``T``, steps each environment copy runs per update (observations per example).
        gamma: discount factor.
        gae_lambda: lambda of the advantage estimates.
        value_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus.
        return_window: episodes the reported mean return is over (the last ones finished).
        batch_size: default observations per update (``E T``).
        lr: default learning rate.
        optimizer: default optimizer (``"adamw"`` with no weight decay is Adam).
        steps: default updates of a run.
        microbatches: default micro-batches (groups of copies) of the ``microbatch`` method.
        ema_decay: default per-step decay of the meter's averages.
        ema_examples: default averaging time constant in observations (None: ``ema_decay``).
        unit: what batch sizes count: ``"observations"``.
        warmup_steps: default warmup steps (none).
        weight_decay: default weight decay (none).
    """

    name: str
    env_id: str
    make_model: Callable[[int], ActorCritic]
    rollout: int
    gamma: float
    gae_lambda: float
    value_coef: float
    entropy_coef: float
    return_window: int
    batch_size: int
    lr: float
    optimizer: str
    steps: int
    microbatches: int
    ema_decay: float | None
    ema_examples: float | None = None
    unit: str = "observations"
    warmup_steps: int = 0
    weight_decay: float = 0.0

    @property
    def units_per_example(self) -> int:
        """Observations in one example, a copy's rollout: ``T``."""
        return self.rollout


def _cartpole() -> RLTask:
    # A2C with Adam (lr 1e-3), 16 copies x 16 steps = 256 observations per update, 600 updates
    # (153,600 observations): see the README for the run (mean return and B_simple against
    # observations). The decay 0.98 averages about 50 updates.
    return RLTask(
        name="cartpole",
        env_id="CartPole-v1",
        make_model=seeded(lambda: ActorCritic(4, 2, hidden=64)),
        rollout=16,
        gamma=0.99,
        gae_lambda=0.95,
        value_coef=0.5,
        entropy_coef=0.0,
        return_window=20,
        batch_size=256,
        lr=1e-3,
        optimizer="adamw",
        steps=600,
        microbatches=4,
        ema_decay=0.98,
    )


_REGISTRY: dict[str, Callable[[], RLTask]] = {"cartpole": _cartpole}
RL_TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_rl_task(name: str) -> RLTask:
    """Build a built-in RL task by name.

    Raises:
        ValueError: if the name is unknown.
        DatasetNotFoundError: if gymnasium is not installed (the message says how to install it).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown RL task {name!r}: expected one of {', '.join(RL_TASK_NAMES)}")
    task = _REGISTRY[name]()
    require_gymnasium(task.env_id)
    return task
