"""Finite datasets (issue 13 #5): ``dataset_size=N`` makes every estimate exact in expectation
under sampling without replacement, and exact at B = N.

The truth is the dataset's own: |G|^2 = |mean_n g_n|^2 and tr(Sigma_N) = mean_n |g_n - G|^2
(population covariance), from a per-example autograd loop. Tolerances are float64 rounding
only (1e-9 relative): enumerating every equally likely draw makes the plain mean of the
per-step estimates (``ema_decay=1``) the exact expectation, with no sampling error.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

from noisescale import GradientNoiseScale

REL = 1e-9  # float64 rounding of a few hundred operations


def dataset(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    return x, y


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4, dtype=torch.float64), nn.Tanh(), nn.Linear(4, 1, dtype=torch.float64)
    )


def loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (net(x).squeeze(-1) - y).square().mean()


def truth(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Exact |G|^2 and tr(Sigma_N) of the dataset, from one backward per example."""
    grads = []
    for i in range(len(y)):
        net.zero_grad()
        loss(net, x[i : i + 1], y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))  # type: ignore[union-attr]
    net.zero_grad()
    g = torch.stack(grads)
    mean = g.mean(0)
    return float(mean.square().sum()), float((g - mean).square().sum(1).mean())


@pytest.mark.parametrize("method", ["per_example", "microbatch"])
def test_full_batch_steps_give_the_exact_full_dataset_values(method: str) -> None:
    """Before: full-batch steps on 200 examples gave a biased number with a zero-width interval
    (per_example: B_simple 11.37, interval 11.3698 to 11.3698, where the truth is 10.70).
    At B = N the per-example form is exact (|G|^2 and tr Sigma_N); the k-way form's |G|^2 is
    exact (the big batch is the full gradient) and its tr(Sigma_N) unbiased."""
    x, y = dataset(200)
    net = model()
    g_true, s_true = truth(net, x, y)
    meter = GradientNoiseScale(net, method=method, ema_decay=1.0, dataset_size=200)  # type: ignore[arg-type]
    for _ in range(3):  # the same full batch each step (lr = 0): identical estimates
        if method == "per_example":
            loss(net, x, y).backward()
        else:
            for xb, yb in zip(x.split(100), y.split(100), strict=True):
                (loss(net, xb, yb) / 2).backward()
        meter.update(200)
        net.zero_grad()
    est = meter.compute()
    assert est.grad_norm_sq == pytest.approx(g_true, rel=REL)
    if method == "per_example":
        assert est.trace_sigma == pytest.approx(s_true, rel=REL)
        assert est.resolved and est.b_simple == pytest.approx(s_true / g_true, rel=REL)
        assert est.b_simple_ci == pytest.approx((s_true / g_true,) * 2, rel=1e-6)  # no spread: exact


def _steps(method: str, n: int, draws: list[tuple[int, ...]], sizes: tuple[int, ...]) -> GradientNoiseScale:
    """One step per draw (an ordered tuple of distinct examples, cut into ``sizes``), lr = 0."""
    x, y = dataset(n, seed=1)
    net = model()
    meter = GradientNoiseScale(net, method=method, ema_decay=1.0, dataset_size=n)  # type: ignore[arg-type]
    for draw in draws:
        idx = torch.tensor(draw)
        for part in idx.split(list(sizes)):  # mean losses of unequal micro-batches, divided by k
            (loss(net, x[part], y[part]) / len(sizes)).backward()
        meter.update(microbatch_sizes=sizes if method == "microbatch" else None)
        net.zero_grad()
    return meter


@pytest.mark.parametrize(
    ("method", "sizes"),
    [("per_example", (3,)), ("per_example", (1, 3)), ("microbatch", (2, 1)), ("microbatch", (1, 1, 2))],
    ids=["per-example-B3", "per-example-unequal-weights", "microbatch-2+1", "microbatch-1+1+2"],
)
def test_every_draw_without_replacement_averages_to_the_truth(method: str, sizes: tuple[int, ...]) -> None:
    """Every ordered draw of sum(sizes) distinct examples out of N = 6, each once: the mean of the
    per-step estimates is their exact expectation, which must be the dataset's |G|^2 and tr Sigma_N.
    Unequal micro-batches with mean losses weight their examples unequally (a weighted big batch)."""
    n = 6
    x, y = dataset(n, seed=1)
    g_true, s_true = truth(model(), x, y)
    draws = list(itertools.permutations(range(n), sum(sizes)))
    est = _steps(method, n, draws, sizes).compute()
    assert est.grad_norm_sq == pytest.approx(g_true, rel=REL)
    assert est.trace_sigma == pytest.approx(s_true, rel=REL)


def test_without_dataset_size_the_same_draws_are_biased() -> None:
    """The documented bias: on draws without replacement the with-replacement estimator expects
    N/(N-1) tr(Sigma_N) (the sample variance) and |G|^2 - tr(Sigma_N)/(N-1), whatever B."""
    n = 6
    x, y = dataset(n, seed=1)
    g_true, s_true = truth(model(), x, y)
    net = model()
    meter = GradientNoiseScale(net, method="per_example", ema_decay=1.0)
    for draw in itertools.combinations(range(n), 3):
        loss(net, x[list(draw)], y[list(draw)]).backward()
        meter.update()
        net.zero_grad()
    est = meter.compute()
    assert est.trace_sigma == pytest.approx(
        s_true * n / (n - 1), rel=REL
    )  # the sample, not population, variance
    assert est.grad_norm_sq == pytest.approx(g_true - s_true / (n - 1), rel=REL)


@pytest.mark.parametrize("bad", [1, 0, 2.5, True, "200"])
def test_dataset_size_must_be_an_integer_of_at_least_two(bad: object) -> None:
    with pytest.raises(ValueError, match="dataset_size"):
        GradientNoiseScale(model(), method="per_example", dataset_size=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["per_example", "microbatch"])
def test_a_step_larger_than_the_dataset_raises(method: str) -> None:
    x, y = dataset(8)
    net = model()
    meter = GradientNoiseScale(net, method=method, dataset_size=6)  # type: ignore[arg-type]
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        (loss(net, xb, yb) / 2).backward()
    with pytest.raises(
        ValueError, match="8 examples cannot be drawn without replacement from dataset_size=6"
    ):
        meter.update(8)


def test_dataset_size_does_not_change_a_with_replacement_limit() -> None:
    """A huge N is the with-replacement estimator (the correction vanishes as 1/N)."""
    x, y = dataset(16)
    results = []
    for n in (None, 10**12):
        net = model()
        meter = GradientNoiseScale(net, method="per_example", ema_decay=1.0, dataset_size=n)
        for xb, yb in zip(x.split(8), y.split(8), strict=True):
            loss(net, xb, yb).backward()
            meter.update()
            net.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            results.append(meter.compute())
    assert results[1].trace_sigma == pytest.approx(results[0].trace_sigma, rel=1e-9)
    assert results[1].grad_norm_sq == pytest.approx(results[0].grad_norm_sq, rel=1e-9)
