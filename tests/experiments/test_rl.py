"""The RL task `cartpole`: shapes and units, GAE, rollouts, the loop's determinism, and the meter's
three views of a batch (groups of copies, copies, observations) against brute-force autograd."""

from __future__ import annotations

import dataclasses
import math

import gymnasium
import pytest
import torch

from noisescale.experiments.rl import RL_TASK_NAMES, RLTrainer, get_rl_task, train_rl
from noisescale.experiments.rl.agent import ActorCritic, a2c_loss, gae
from noisescale.experiments.rl.env import Rollout, VectorEnvs, env_seeds
from noisescale.experiments.tasks import TASK_NAMES
from noisescale.experiments.training import TrainConfig

TASK = get_rl_task("cartpole")


def small(**overrides: object) -> TrainConfig:
    """A short run of 4 copies x 16 steps (64 observations), one thread."""
    values: dict = {"batch_size": 64, "steps": 6, "threads": 1, "method": "per_example", **overrides}
    return TrainConfig.for_task(TASK, **values)


# ----------------------------------------------------------------------------------------------
# The task


def test_cartpole_counts_observations_and_a_rollout_is_an_example() -> None:
    assert RL_TASK_NAMES == ("cartpole",)
    assert not set(RL_TASK_NAMES) & set(TASK_NAMES)
    assert TASK.unit == "observations"
    assert TASK.units_per_example == TASK.rollout == 16
    assert TASK.batch_size % (TASK.microbatches * TASK.rollout) == 0
    config = TrainConfig.for_task(TASK)
    assert (config.batch_size, config.units_per_example, config.optimizer) == (256, 16, "adamw")
    with pytest.raises(ValueError, match="multiple of 64"):  # 4 micro-batches of whole rollouts
        TrainConfig.for_task(TASK, method="microbatch", batch_size=96)
    with pytest.raises(ValueError, match="unknown RL task 'pong'"):
        get_rl_task("pong")


def test_agent_shapes_and_groups_partition_the_parameters() -> None:
    model = TASK.make_model(0)
    logits, values = model(torch.zeros(5, 16, 4))
    assert logits.shape == (5, 16, 2) and values.shape == (5, 16)
    groups = model.groups()
    assert list(groups) == ["policy", "value"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # disjoint and complete
    again, other = TASK.make_model(0), TASK.make_model(1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))
    assert not torch.equal(next(model.parameters()), next(other.parameters()))


def test_gae_equals_the_sum_of_discounted_td_errors() -> None:
    gen = torch.Generator().manual_seed(0)
    e, t, gamma, lam = 3, 7, 0.9, 0.8
    rewards, values = torch.randn(e, t, generator=gen), torch.randn(e, t, generator=gen)
    ends = torch.rand(e, t, generator=gen) < 0.3
    last = torch.randn(e, generator=gen)
    got = gae(rewards, values, ends, last, gamma=gamma, lam=lam)
    nxt = torch.cat([values[:, 1:], last[:, None]], 1)
    delta = rewards + gamma * (~ends) * nxt - values  # one-step TD errors
    for i in range(e):
        for s in range(t):  # A_s = sum_l (gamma lam)^l delta_{s+l}, stopping after an episode's end
            want, w = 0.0, 1.0
            for u in range(s, t):
                want += w * float(delta[i, u])
                if ends[i, u]:
                    break
                w *= gamma * lam
            assert float(got[i, s]) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_env_seeds_are_distinct_and_reproducible() -> None:
    assert env_seeds(3, 4) == env_seeds(3, 4)
    assert len(set(env_seeds(3, 4) + env_seeds(4, 4))) == 8
    envs = VectorEnvs("CartPole-v1", 4, seed=0)
    assert len({tuple(o) for o in envs.obs.tolist()}) == 4  # every copy starts elsewhere
    envs.close()


def test_a_truncated_episode_is_bootstrapped_and_a_finished_one_is_scored() -> None:
    # CartPole cut at 5 steps (random actions never topple it that fast): every 5th step is a
    # truncation, whose target must include gamma V(s_final). A value head that outputs c
    # everywhere makes the target exact: R_t = sum_{i < 5 - t} gamma^i + gamma^(5 - t) c.
    cartpole = "gymnasium.envs.classic_control:CartPoleEnv"
    gymnasium.register("CartPoleFive-v0", entry_point=cartpole, max_episode_steps=5)
    model, c, gamma = ActorCritic(4, 2), 3.0, 0.9
    with torch.no_grad():
        last = model.value[-1]
        last.weight.zero_()
        last.bias.fill_(c)
    envs = VectorEnvs("CartPoleFive-v0", 2, seed=0)
    data = envs.rollout(model, 10, torch.Generator().manual_seed(0), gamma=gamma, lam=1.0)
    assert data.obs.shape == (2, 10, 4) and data.actions.shape == data.returns.shape == (2, 10)
    for t in range(10):
        k = 5 - t % 5  # steps left in the episode
        want = sum(gamma**i for i in range(k)) + gamma**k * c
        assert data.returns[:, t].tolist() == pytest.approx([want, want], rel=1e-6)
    assert data.episode_returns == [5.0] * 4  # two episodes per copy, 5 steps each


# ----------------------------------------------------------------------------------------------
# The loop


def test_a_run_is_deterministic_given_its_seed() -> None:
    def run(seed: int) -> list[dict]:
        result = train_rl(TASK, small(seed=seed, steps=8))
        return [{k: v for k, v in r.to_dict().items() if k != "wall_time"} for r in result.records]

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a != c
    assert a[-1]["examples"] == 8 * 64 and a[-1]["episodes"] > 0 and a[-1]["mean_return"] > 0


def test_the_meter_reports_policy_and_value_and_their_mediant() -> None:
    est = train_rl(TASK, small(steps=5)).estimate
    assert est is not None and set(est.groups) == {"policy", "value"}
    g = est.groups
    assert est.grad_norm_sq == pytest.approx(g["policy"].grad_norm_sq + g["value"].grad_norm_sq, rel=1e-9)
    assert est.trace_sigma == pytest.approx(g["policy"].trace_sigma + g["value"].trace_sigma, rel=1e-9)


def _one_update(config: TrainConfig, example: str = "rollout") -> tuple[RLTrainer, Rollout, ActorCritic]:
    """One update of a trainer whose rollout is captured; returns the weights before the step."""
    trainer = RLTrainer(TASK, config, example=example)
    before = TASK.make_model(config.seed)
    before.load_state_dict(trainer.model.state_dict())
    seen: list[Rollout] = []
    rollout = trainer.envs.rollout
    trainer.envs.rollout = lambda *a, **k: seen.append(rollout(*a, **k)) or seen[-1]  # type: ignore[method-assign]
    trainer.step()
    return trainer, seen[0], before


def _flat_grads(
    model: ActorCritic, data: Rollout, rows: list[slice] | None, flatten: bool
) -> list[torch.Tensor]:
    """Gradients of the mean A2C loss of each piece, in float64 (one per group of copies / observation)."""
    model = model.double()
    tensors = [data.obs.double(), data.actions, data.advantages.double(), data.returns.double()]
    if flatten:
        tensors = [t.flatten(0, 1) for t in tensors]
    pieces = rows if rows is not None else [slice(i, i + 1) for i in range(len(tensors[0]))]
    out = []
    for piece in pieces:
        model.zero_grad()
        coefs = {"value_coef": TASK.value_coef, "entropy_coef": TASK.entropy_coef}
        loss = a2c_loss(model, *(t[piece] for t in tensors), **coefs)
        loss.backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return out


def _k_way(grads: list[torch.Tensor], size: int) -> tuple[float, float, float]:
    """|G|^2, tr(Sigma) of the k-way estimator (SCIENCE.md, appendix A.1) and the mean squared norm."""
    k = len(grads)
    g = torch.stack(grads)
    mean_sq = float(g.square().sum(1).mean())
    bar_sq = float(g.mean(0).square().sum())
    return (k * bar_sq - mean_sq) / (k - 1), size * k * (mean_sq - bar_sq) / (k - 1), mean_sq


@pytest.mark.parametrize(
    ("method", "microbatches", "example", "pieces", "size"),
    [
        ("microbatch", 4, "rollout", 4, 32),  # 4 groups of 2 copies x 16 steps
        ("per_example", 1, "rollout", 8, 16),  # 8 copies of 16 observations
        ("per_example", 1, "observation", 128, 1),  # 128 observations, as if independent
    ],
)
def test_one_step_equals_the_brute_force_estimator(
    method: str, microbatches: int, example: str, pieces: int, size: int
) -> None:
    # Micro-batches are groups of whole copies (rows of [E, T, obs]), per_example's examples are
    # copies unless asked for observations: the meter's first step (ema_decay = 1: the step itself)
    # must equal the k-way formula applied to gradients taken one piece at a time.
    config = small(method=method, microbatches=microbatches, batch_size=128, ema_decay=1.0, steps=1)
    trainer, data, before = _one_update(config, example)
    est = trainer.meter.compute()
    trainer.close()
    flatten = example == "observation"
    rows = None if method == "per_example" else [slice(2 * i, 2 * i + 2) for i in range(4)]
    grads = _flat_grads(before, data, rows, flatten)
    assert len(grads) == pieces
    g2, tr, mean_sq = _k_way(grads, size)  # float32 meter: errors of order 1e-6 of the squared norms
    assert est.grad_norm_sq == pytest.approx(g2, rel=1e-4, abs=1e-5 * mean_sq)
    assert est.trace_sigma == pytest.approx(tr, rel=1e-4)


def test_observation_examples_need_the_per_example_method() -> None:
    with pytest.raises(ValueError, match="'observation' with per_example"):
        RLTrainer(TASK, small(method="microbatch", microbatches=2), example="observation")
    with pytest.raises(ValueError, match="a rollout of 'cartpole' is 16 observations"):
        RLTrainer(TASK, dataclasses.replace(small(), units_per_example=1))
    with pytest.raises(ValueError, match="replaces the task's own parameter groups"):
        RLTrainer(TASK, small(only="layernorm"))


def test_mean_return_is_over_the_last_episodes() -> None:
    with RLTrainer(TASK, small(method=None)) as trainer:
        assert trainer.mean_return() is None and trainer.best_return is None
        while trainer.episodes <= TASK.return_window:
            record = trainer.step()
        assert len(trainer.returns) == TASK.return_window
        assert record.mean_return == pytest.approx(sum(trainer.returns) / TASK.return_window)
        assert trainer.best_return is not None and trainer.best_return >= record.mean_return
        assert math.isfinite(record.loss)


def test_the_observation_view_differs_by_the_correlation_exactly() -> None:
    # On one batch both per-example views subtract their tr Sigma / B from the same |g_bar|^2, so
    # |G|^2_obs - |G|^2_rollout = (tr Sigma_eff - tr Sigma_obs) / B: an identity, not a statistic.
    config = small(batch_size=128, ema_decay=1.0, steps=1)
    views = {}
    for example in ("rollout", "observation"):
        trainer, _, _ = _one_update(config, example)
        views[example] = trainer.meter.compute()
        trainer.close()
    for group in ("policy", "value"):
        r, o = views["rollout"].groups[group], views["observation"].groups[group]
        scale = max(abs(r.grad_norm_sq), r.trace_sigma / 128)
        want = (r.trace_sigma - o.trace_sigma) / 128
        assert o.grad_norm_sq - r.grad_norm_sq == pytest.approx(want, abs=1e-5 * scale)


def test_the_correlation_benchmark_runs() -> None:
    from tests.test_benchmarks_smoke import run_script

    run_script("rl_correlation.py", "--updates", "3", "--trained", "2", "--batch-size", "64")
