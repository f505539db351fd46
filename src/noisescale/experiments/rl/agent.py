r"""The actor-critic agent of the RL tasks: policy and value networks, advantages and the A2C loss.

The policy and the value function are two MLPs that share no weight, so the meter's groups
``policy`` and ``value`` (:meth:`ActorCritic.groups`) hold exactly the gradients of the policy
loss (and entropy bonus) and of the value loss: their noise scales were found to differ by
about 10x in PPO (arXiv:2206.10027).

The loss of one observation ``t`` is the A2C objective (Mnih et al. 2016)

.. math::

    \ell_t = -\log\pi(a_t|s_t)\,\hat A_t + c_v\,\tfrac12\,(V(s_t) - \hat R_t)^2
             - c_e\,\mathcal H[\pi(\cdot|s_t)]

with generalised advantage estimates ``A_t`` and value targets ``R_t = A_t + V(s_t)``
(Schulman et al. 2016) computed from the rollout at the weights being updated; an update's loss
is the MEAN over its observations. Advantages are not normalised over the batch: a batch-wide
normalisation would couple the environments' gradients, which the k-way estimator needs to be
independent.

References:
    Mnih et al. (2016), Asynchronous Methods for Deep Reinforcement Learning, arXiv:1602.01783.
    Schulman et al. (2016), High-Dimensional Continuous Control Using Generalized Advantage
    Estimation, arXiv:1506.02438, eq. (16).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ActorCritic", "a2c_loss", "gae"]


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """``n_in -> hidden -> hidden -> n_out`` with tanh, the usual small RL network."""
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_out)
    )


class ActorCritic(nn.Module):
    """A policy MLP (action logits) and a value MLP, without shared weights.

    Args:
        observations: size of an observation (4 for CartPole).
        actions: number of discrete actions (2 for CartPole).
        hidden: width of the two hidden layers of each network.

    Example:
        >>> model = ActorCritic(4, 2)
        >>> logits, value = model(torch.zeros(3, 5, 4))  # [E, T, obs] -> [E, T, 2], [E, T]
        >>> tuple(logits.shape), tuple(value.shape), list(model.groups())
        ((3, 5, 2), (3, 5), ['policy', 'value'])
    """

    def __init__(self, observations: int, actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.policy = _mlp(observations, hidden, actions)
        self.value = _mlp(observations, hidden, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits ``[..., actions]`` and values ``[...]`` of observations ``[..., observations]``."""
        return self.policy(obs), self.value(obs).squeeze(-1)

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """The meter's parameter groups: ``{"policy": [...], "value": [...]}``."""
        return {"policy": list(self.policy.parameters()), "value": list(self.value.parameters())}


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    ends: torch.Tensor,
    last_value: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    r"""Generalised advantage estimates of a rollout (Schulman et al. 2016, eq. 16).

    .. math::

        \delta_t = r_t + \gamma (1 - d_t) V_{t+1} - V_t,\qquad
        \hat A_t = \delta_t + \gamma\lambda (1 - d_t) \hat A_{t+1}

    where ``d_t = 1`` when the episode ended at step ``t`` (then ``V_{t+1}`` is the value of the
    next episode's first observation and is not used; a truncated episode's bootstrap
    ``gamma V(s_final)`` belongs in ``r_t``), and ``V_T`` is ``last_value``. With ``lam = 1`` the
    advantage plus ``V_t`` is the discounted return bootstrapped at the rollout's end.

    Args:
        rewards: ``[E, T]`` rewards.
        values: ``[E, T]`` values ``V(s_t)``.
        ends: ``[E, T]`` bool, the episode ended at step ``t``.
        last_value: ``[E]`` value of the observation after the rollout.
        gamma: discount factor in [0, 1].
        lam: the GAE lambda in [0, 1].

    Returns:
        ``[E, T]`` advantages.

    Example:
        >>> r, v, d = torch.ones(1, 3), torch.zeros(1, 3), torch.tensor([[False, True, False]])
        >>> gae(r, v, d, torch.tensor([10.0]), gamma=0.5, lam=1.0)
        tensor([[1.5000, 1.0000, 6.0000]])
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for t in range(rewards.shape[1] - 1, -1, -1):
        live = (~ends[:, t]).to(rewards.dtype)
        delta = rewards[:, t] + gamma * live * next_value - values[:, t]
        running = delta + gamma * lam * live * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages


def a2c_loss(
    model: ActorCritic,
    obs: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    *,
    value_coef: float,
    entropy_coef: float,
) -> torch.Tensor:
    """The A2C loss, MEAN over the observations given (see the module docstring).

    Args:
        model: the agent.
        obs: ``[..., observations]`` observations (e.g. ``[E, T, 4]``, or flattened ``[E T, 4]``).
        actions: ``[...]`` actions taken (int64).
        advantages: ``[...]`` advantage estimates (no gradient).
        returns: ``[...]`` value targets (no gradient).
        value_coef: ``c_v``, weight of the value loss.
        entropy_coef: ``c_e``, weight of the entropy bonus.

    Returns:
        The scalar loss.
    """
    logits, values = model(obs)
    log_probs = logits.log_softmax(-1)
    chosen = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    per_observation = (
        -chosen * advantages + value_coef * 0.5 * (values - returns).square() - entropy_coef * entropy
    )
    return per_observation.mean()
