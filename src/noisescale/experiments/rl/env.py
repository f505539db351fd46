"""Independent copies of a gymnasium environment, stepped together, and the rollouts of an update.

``E`` copies of the environment run in a ``gymnasium.vector.SyncVectorEnv`` (one process, in
order), each with its own seed, so the rollouts of different copies are independent given the
weights: a group of copies is an independent micro-batch for the k-way estimator. Within one
copy, consecutive observations are strongly correlated (the same episode a step apart).

A rollout runs every copy ``T`` steps with actions sampled from the policy (a seeded torch
generator), then computes advantages (:func:`~noisescale.experiments.rl.agent.gae`) at the same
weights. A copy whose episode ends is reset at once (gymnasium's same-step autoreset): a
terminated episode stops its returns there; a truncated one (CartPole-v1 ends at 500 steps) is
bootstrapped with ``gamma V(s_final)``, since the time limit is not part of the task. Every
finished episode's return (undiscounted, the score) is recorded.

gymnasium is an optional dependency (``pip install 'noisescale[rl]'``), imported when the
environments are made.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch

from noisescale.errors import DatasetNotFoundError
from noisescale.experiments.rl.agent import ActorCritic, gae

__all__ = ["Rollout", "VectorEnvs", "env_seeds", "require_gymnasium"]


def require_gymnasium(env_id: str) -> ModuleType:
    """The gymnasium module.

    Raises:
        DatasetNotFoundError: if gymnasium is not installed (the message says how to install it).
    """
    try:
        import gymnasium
    except ImportError:
        raise DatasetNotFoundError(
            f"the RL tasks need gymnasium for {env_id}: pip install 'noisescale[rl]' (or gymnasium)"
        ) from None
    return gymnasium


class Rollout(NamedTuple):
    """One update's data: ``E`` environments x ``T`` steps, environment-major.

    Attributes:
        obs: ``[E, T, observations]`` float32 observations.
        actions: ``[E, T]`` int64 actions taken.
        advantages: ``[E, T]`` GAE advantages.
        returns: ``[E, T]`` value targets (advantages + values).
        episode_returns: undiscounted returns of the episodes that ended during the rollout,
            in the order they ended.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    episode_returns: list[float]


def env_seeds(seed: int, n_envs: int) -> list[int]:
    """Distinct, reproducible reset seeds of ``n_envs`` copies for a run seed (numpy's SeedSequence).

    Example:
        >>> a, b = env_seeds(0, 2), env_seeds(1, 2)
        >>> len(set(a + b))
        4
    """
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(n_envs)]


class VectorEnvs:
    """``n_envs`` seeded copies of a gymnasium environment with a discrete action space.

    Args:
        env_id: gymnasium id, e.g. ``"CartPole-v1"``.
        n_envs: ``E``, independent copies.
        seed: the run's seed; copy ``i`` is reset with ``env_seeds(seed, E)[i]``.

    Raises:
        DatasetNotFoundError: if gymnasium is not installed (the message says how to install it).
    """

    def __init__(self, env_id: str, n_envs: int, seed: int) -> None:
        gymnasium = require_gymnasium(env_id)
        vector = gymnasium.vector
        copies = [lambda: gymnasium.make(env_id) for _ in range(n_envs)]
        self.env = vector.SyncVectorEnv(copies, autoreset_mode=vector.AutoresetMode.SAME_STEP)
        self.n_envs = n_envs
        seeds: list[int | None] = list(env_seeds(seed, n_envs))
        obs, _ = self.env.reset(seed=seeds)
        self.obs = np.asarray(obs, dtype=np.float32)  # [E, observations]
        self.score = np.zeros(n_envs)  # undiscounted return of each copy's current episode

    @property
    def observation_size(self) -> int:
        """Entries of one observation."""
        return int(np.prod(self.env.single_observation_space.shape or (1,)))

    @property
    def action_count(self) -> int:
        """Number of discrete actions."""
        return int(self.env.single_action_space.n)

    @torch.no_grad()
    def rollout(
        self, model: ActorCritic, steps: int, generator: torch.Generator, *, gamma: float, lam: float
    ) -> Rollout:
        """Run every copy ``steps`` steps with the policy, then compute the advantages.

        Args:
            model: the agent (evaluated without gradients; the caller back-propagates later).
            steps: ``T``, steps per copy.
            generator: CPU generator of the action draws.
            gamma: discount factor.
            lam: GAE lambda.

        Returns:
            The rollout (see :class:`Rollout`).
        """
        e = self.n_envs
        obs = torch.zeros(steps, e, self.obs.shape[1])
        actions = torch.zeros(steps, e, dtype=torch.int64)
        rewards, values = torch.zeros(steps, e), torch.zeros(steps, e)
        ends = torch.zeros(steps, e, dtype=torch.bool)
        finished: list[float] = []
        for t in range(steps):
            obs[t] = torch.from_numpy(self.obs)
            logits, values[t] = model(obs[t])
            actions[t] = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
            next_obs, reward, terminated, truncated, info = self.env.step(actions[t].numpy())
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
            self.score += reward
            cut = np.flatnonzero(truncated & ~terminated)
            if len(cut):  # the time limit is not part of the task: bootstrap from the final state
                rewards[t, cut] += gamma * self._values(model, info, cut)
            done = terminated | truncated
            ends[t] = torch.from_numpy(done)
            finished += [float(s) for s in self.score[done]]
            self.score[done] = 0.0
            self.obs = np.asarray(next_obs, dtype=np.float32)
        last_value = model(torch.from_numpy(self.obs))[1]
        adv = gae(rewards.T, values.T, ends.T, last_value, gamma=gamma, lam=lam)
        obs_first = obs.transpose(0, 1).contiguous()  # [E, T, observations]
        return Rollout(obs_first, actions.T.contiguous(), adv, adv + values.T, finished)

    @staticmethod
    def _values(model: ActorCritic, info: dict[str, Any], envs: np.ndarray) -> torch.Tensor:
        """Values of the final observations of the episodes ``envs`` ended (same-step autoreset)."""
        final = np.stack([np.asarray(info["final_obs"][i], dtype=np.float32) for i in envs])
        return model(torch.from_numpy(final))[1]

    def close(self) -> None:
        """Close the environments."""
        self.env.close()
