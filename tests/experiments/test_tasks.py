"""Built-in tasks (the linear-regression oracle against SCIENCE.md) and the training loop that runs them."""

from __future__ import annotations

import math

import pytest
import torch

from noisescale.experiments.evaluation import Probe, evaluate, train_loss
from noisescale.experiments.records import StepRecord
from noisescale.experiments.tasks import (
    CLASSIFICATION_TASKS,
    LINREG_DELTA,
    LINREG_LAMBDA,
    LINREG_SIGMA,
    TASK_NAMES,
    get_task,
    linreg_truth,
)
from noisescale.experiments.training import TrainConfig, Trainer, train

# ----------------------------------------------------------------------------------------------
# The closed-form oracle (SCIENCE.md, "A closed-form oracle for tests")


def test_linreg_truth_matches_science_md() -> None:
    t = linreg_truth(LINREG_DELTA, LINREG_LAMBDA, LINREG_SIGMA)
    # SCIENCE.md prints these to 4-7 significant digits; 1e-4 is below its last printed digit.
    expected = {
        "loss": 1.78,
        "grad_norm_sq": 3.75,
        "trace_sigma": 27.78,
        "b_simple": 7.408,
        "trace_h_sigma": 59.25,
        "g_h_g": 8.2975,
        "b_noise": 7.140705,
        "eps_max": 0.4519434,
        "delta_loss_max": 0.8473938,
    }
    for key, value in expected.items():
        assert t[key] == pytest.approx(value, abs=1e-4), key


def test_linreg_truth_optimal_step_at_b16() -> None:
    """eps_opt(16) and dL_opt(16) of SCIENCE.md follow from the truth via eqs. (2.6), (2.7)."""
    t = linreg_truth(LINREG_DELTA, LINREG_LAMBDA, LINREG_SIGMA)
    assert t["eps_max"] / (1 + t["b_noise"] / 16) == pytest.approx(0.3124837, abs=1e-6)
    assert t["delta_loss_max"] / (1 + t["b_noise"] / 16) == pytest.approx(0.5859070, abs=1e-6)
    assert t["grad_norm_sq"] + t["trace_sigma"] / 16 == pytest.approx(5.48625, abs=1e-9)


@pytest.mark.parametrize("delta", [(1.0, 0.0, 0.0), (0.3, -0.4, 1.2)], ids=["axis", "generic"])
def test_linreg_truth_isotropic(delta: tuple[float, ...]) -> None:
    """Lambda = I: B_simple = B_noise = 1 + d (1 + sigma^2 / |delta|^2)."""
    t = linreg_truth(delta, (1.0, 1.0, 1.0), 0.5)
    expected = 1 + 3 * (1 + 0.25 / sum(d * d for d in delta))
    assert t["b_simple"] == pytest.approx(expected, rel=1e-12)
    assert t["b_noise"] == pytest.approx(expected, rel=1e-12)


def test_linreg_truth_at_the_optimum_is_not_a_number() -> None:
    assert math.isnan(linreg_truth((0.0, 0.0), (1.0, 2.0), 0.7)["b_simple"])


def test_linreg_task_samples_the_oracle_distribution() -> None:
    """Monte Carlo moments of the task's data at its initial weights match the closed forms.

    With 200,000 examples the relative standard errors are about 0.3% (loss), 0.6% (tr Sigma)
    and 0.8% (|G|^2) (measured over seeds); 3% is more than 3.5 standard errors.
    """
    task = get_task("linreg")
    model = task.make_model(0)
    truth = task.truth(model)
    assert truth["b_simple"] == pytest.approx(7.408, abs=1e-4)
    x, y = task.sample_batch(200_000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        residual = model(x).squeeze(-1) - y  # [N]
        loss = task.loss_fn(model(x), y)
    grads = x * residual.unsqueeze(-1)  # per-example gradients of (w.x - y)^2 / 2, [N, 5]
    g_bar = grads.mean(0)
    assert float(loss) == pytest.approx(truth["loss"], rel=0.03)
    assert float(g_bar.square().sum()) == pytest.approx(truth["grad_norm_sq"], rel=0.03)
    assert float((grads - g_bar).square().sum(1).mean()) == pytest.approx(truth["trace_sigma"], rel=0.03)


# ----------------------------------------------------------------------------------------------
# The registry


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_model_data_and_loss_fit_together(name: str) -> None:
    task = get_task(name)
    model = task.make_model(0)
    x, y = task.sample_batch(8, torch.Generator().manual_seed(0))
    assert x.shape[0] == y.shape[0] == 8
    loss = task.loss_fn(model(x), y)
    assert loss.shape == ()
    assert math.isfinite(float(loss.detach()))
    assert task.unit in ("images", "examples", "tokens")
    assert (task.unit == "tokens") == (task.units_per_example > 1)  # a window of T tokens is one example
    assert task.batch_size % (task.microbatches * task.units_per_example) == 0
    assert task.classification == (name in CLASSIFICATION_TASKS)  # the sweep checks goals by name


@pytest.mark.parametrize("name", TASK_NAMES)
def test_make_model_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    task = get_task(name)
    state = torch.random.get_rng_state()
    a, b = task.make_model(0), task.make_model(0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    if name != "linreg":  # the oracle always starts at w* + delta
        c = task.make_model(1)
        assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_sample_batch_is_reproducible() -> None:
    task = get_task("digits")
    x1, y1 = task.sample_batch(32, torch.Generator().manual_seed(3))
    x2, y2 = task.sample_batch(32, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2)
    assert torch.equal(y1, y2)


def test_get_task_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        get_task("cifar")


# ----------------------------------------------------------------------------------------------
# The training loop


def test_config_defaults_follow_the_method() -> None:
    task = get_task("digits")
    assert TrainConfig.for_task(task).microbatches == 1
    assert TrainConfig.for_task(task, method="microbatch").microbatches == task.microbatches
    cfg = TrainConfig.for_task(task, ema_examples=5000.0)
    assert (cfg.ema_decay, cfg.ema_examples) == (None, 5000.0)
    assert TrainConfig.for_task(task, method="per-example").method == "per_example"


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"batch_size": 30, "microbatches": 4}, ValueError, "not divisible by 4 micro-batches"),
        ({"method": "microbatch", "microbatches": 1}, ValueError, "at least 2 micro-batches"),
        ({"method": "adam"}, ValueError, "one of 'per-example', 'microbatch', 'ddp', 'fsdp' but got 'adam'"),
        ({"lr": -1.0}, ValueError, "lr and momentum >= 0"),
        ({"batchsize": 3}, TypeError, "unknown TrainConfig fields"),
        ({"seed": 2**64}, ValueError, "expected `seed` in"),
    ],
    ids=["indivisible", "one-microbatch", "bad-method", "negative-lr", "typo", "seed-too-big"],
)
def test_config_rejects_bad_settings(overrides: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        TrainConfig.for_task(get_task("digits"), **overrides)


def test_train_config_takes_every_spelling_of_the_one_method_parser() -> None:
    task = get_task("digits")
    assert TrainConfig.for_task(task, method="Per-Example").method == "per_example"
    assert TrainConfig.for_task(task, method="microbatch").method == "microbatch"


def test_probe_subsets_are_fixed_and_shared_by_train_loss() -> None:
    # One evaluation subset rule: train_loss() evaluates on the Probe's training subset.
    task = get_task("digits")
    model = task.make_model(0)
    a, b = Probe(task, 256, 64), Probe(task, 256, 64)
    assert torch.equal(a.x, b.x) and torch.equal(a.x_test, b.x_test)
    assert train_loss(task, model, size=256) == a.train_loss(model)
    loss, error = a.test(model)
    assert loss > 0 and 0 <= error <= 1


@pytest.mark.parametrize("method", ["per_example", "microbatch"])
def test_training_is_deterministic(method: str) -> None:
    task = get_task("digits")
    # threads=1 here and below: two OpenMP threads on a shared 2-core machine can be 10x slower.
    cfg = TrainConfig.for_task(task, method=method, steps=5, seed=7, threads=1)
    first, second = train(task, cfg), train(task, cfg)
    assert [r.loss for r in first.records] == [r.loss for r in second.records]
    assert first.estimate.b_simple == second.estimate.b_simple
    assert first.estimate.steps == 5
    assert first.records[-1].examples == 5 * task.batch_size


def test_train_records_callback_and_stop() -> None:
    task = get_task("digits")
    seen: list[StepRecord] = []
    result = train(
        task,
        TrainConfig.for_task(task, steps=50, threads=1),
        callback=seen.append,
        stop=lambda record, trainer: record.step == 3,
    )
    assert result.stopped
    assert [r.step for r in result.records] == [1, 2, 3] == [r.step for r in seen]
    record = result.records[-1].to_dict()
    assert {"step", "examples", "loss", "lr", "batch_size", "grad_norm_sq", "trace_sigma", "b_simple"} <= set(
        record
    )


def test_training_lowers_the_loss() -> None:
    task = get_task("digits")
    cfg = TrainConfig.for_task(task, steps=150, method=None, threads=1)
    before = train_loss(task, task.make_model(cfg.seed))
    result = train(task, cfg)
    assert result.estimate is None
    assert train_loss(task, result.model) < 0.5 * before
    test_loss, test_error = evaluate(task, result.model)
    assert test_loss < 0.5 * before
    assert 0.0 <= test_error < 0.3


def test_linreg_lr_zero_keeps_the_oracle_point() -> None:
    task = get_task("linreg")
    with Trainer(task, TrainConfig.for_task(task, steps=3)) as trainer:
        for _ in range(3):
            trainer.step()
        weights = next(trainer.model.parameters()).detach().reshape(-1)
    assert torch.allclose(weights, torch.tensor(LINREG_DELTA))
    test_loss, test_error = evaluate(task, trainer.model)
    assert test_error is None
    # 10,000 fixed test examples: relative standard error about 1%, so 5% is a safe margin.
    assert test_loss == pytest.approx(1.78, rel=0.05)
