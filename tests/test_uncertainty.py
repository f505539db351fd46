"""Averaging and the B_simple interval: bias correction, skipping, and tested coverage."""

from __future__ import annotations

import math

import pytest
import torch

from noisescale.estimators import microbatch_stats, per_example_stats
from noisescale.smoothing import ema_fold, ema_init, ema_means
from noisescale.uncertainty import b_simple_interval
from tests import oracle


def test_bias_corrected_mean_is_exact_weighted_mean() -> None:
    st = ema_init(1)
    xs = [1.0, 2.0, 4.0]
    for x in xs:
        st, _ = ema_fold(st, torch.tensor([[x], [2 * x]])[None], [0.5])
    w = [0.5 * 0.25, 0.5 * 0.5, 0.5]  # (1 - beta) beta^(t_last - t)
    g, s = ema_means(st)
    assert g.item() == pytest.approx(sum(wi * x for wi, x in zip(w, xs, strict=True)) / sum(w))
    assert s.item() == pytest.approx(2 * g.item())


def test_plain_mean_when_decay_is_one() -> None:
    st = ema_init(1)
    for x in [1.0, 2.0, 6.0]:
        st, _ = ema_fold(st, torch.tensor([[x], [x]])[None], [1.0])
    assert ema_means(st)[0].item() == pytest.approx(3.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_step_is_skipped_not_averaged(bad: float) -> None:
    st = ema_init(2)
    st, ok1 = ema_fold(st, torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None], [0.9])
    ref = st
    st, ok2 = ema_fold(st, torch.tensor([[bad, 2.0], [3.0, 4.0]])[None], [0.9])
    assert bool(ok1.all())
    assert not bool(ok2.any())
    for a, b in zip(st, ref, strict=True):
        assert torch.equal(a, b)


def test_folding_many_steps_at_once_equals_one_at_a_time() -> None:
    """Varying decays (0, 1 and in between), a skipped step: equal to float64 rounding."""
    gen = torch.Generator().manual_seed(0)
    stats = torch.randn(12, 2, 3, generator=gen, dtype=torch.float64).exp()
    stats[5, 1, 2] = float("nan")
    betas = [0.9, 0.5, 1.0, 0.99, 0.0, 0.7, 0.9, 1.0, 0.3, 0.95, 0.8, 0.6]
    one = ema_init(3)
    ok_one = []
    for x, beta in zip(stats, betas, strict=True):
        one, ok = ema_fold(one, x[None], [beta])
        ok_one.append(bool(ok))
    many = ema_init(3)
    many, ok_first = ema_fold(many, stats[:4], betas[:4])  # and in two unequal parts
    many, ok_rest = ema_fold(many, stats[4:], betas[4:])
    torch.testing.assert_close(many, one, rtol=1e-13, atol=0.0)
    assert torch.cat([ok_first, ok_rest]).tolist() == ok_one == [t != 5 for t in range(12)]
    with pytest.raises(ValueError, match="2 decays for 12 steps"):
        ema_fold(many, stats, [0.9, 0.9])
    for bad in (stats[:0], stats[0], stats[:, :, :2]):  # no step; one step's [2, P]; wrong P
        with pytest.raises(ValueError, match="expected stats of shape"):
            ema_fold(many, bad, [0.9] * len(bad))


def test_not_resolved_when_grad_norm_sq_not_positive() -> None:
    st = ema_init(1)
    for g in [-1.0, 0.5, -0.3]:
        st, _ = ema_fold(st, torch.tensor([[g], [10.0]])[None], [1.0])
    iv = b_simple_interval(st)
    assert not bool(iv.resolved[0])
    assert math.isnan(iv.b_simple[0])
    assert math.isnan(iv.low[0])


def _oracle_states(method: str, repeats: int, steps: int, beta: float, seed: int, weights=None):
    """Average `steps` per-step estimates for `repeats` independent runs at once (repeats = series).

    ``weights``: a diagonal preconditioner P, the squared norms are then sum_j P_j g_j^2."""
    gen = torch.Generator().manual_seed(seed)
    st = ema_init(repeats)
    p = torch.ones(5, dtype=torch.float64) if weights is None else weights

    def sq(g: torch.Tensor) -> torch.Tensor:
        return g.square() @ p

    for _ in range(steps):
        if method == "per_example":
            g = oracle.per_example_grads((repeats, 16), gen)  # [R, B, d]
            stats = per_example_stats(sq(g).mean(1), sq(g.mean(1)), 16)
        else:
            k = int(method[1:])
            g = oracle.per_example_grads((repeats, k, 32 // k), gen).mean(2)  # [R, k, d]
            stats = microbatch_stats(sq(g).T, torch.full((k,), 32.0 / k), sq(g.mean(1)), torch.tensor(32.0))
        st, _ = ema_fold(st, torch.stack([stats.grad_norm_sq, stats.trace_sigma])[None], [beta])
    return st


@pytest.mark.parametrize(
    ("method", "steps", "beta"),
    [("k2", 300, 1.0), ("k4", 150, 1.0), ("k8", 300, 0.99), ("per_example", 100, 0.98)],
    ids=["k2-mean", "k4-mean", "k8-ema", "per-example-ema"],
)
def test_interval_coverage_on_oracle(method: str, steps: int, beta: float) -> None:
    """Over 1000 independent repeats the 95% interval holds the truth in 90-99% of them.

    With 1000 repeats the observed coverage of a calibrated 95% interval has SD 0.7%, so
    the band [90%, 99%] is > 5 SD wide on either side: a failure means miscalibration.
    """
    iv = b_simple_interval(_oracle_states(method, 1000, steps, beta, seed=3))
    assert bool(iv.resolved.all())
    covered = ((iv.low <= oracle.B_SIMPLE) & (iv.high >= oracle.B_SIMPLE)).double().mean().item()
    assert 0.90 <= covered <= 0.99, covered
    # The standard error agrees with the spread of the point estimates across repeats (within 20%).
    assert iv.se.median().item() == pytest.approx(iv.b_simple.std().item(), rel=0.2)


@pytest.mark.parametrize(
    ("method", "steps", "beta"),
    [("k4", 150, 1.0), ("per_example", 100, 0.98)],
    ids=["k4-mean", "per-example-ema"],
)
def test_preconditioned_interval_coverage_on_oracle(method: str, steps: int, beta: float) -> None:
    """The same machinery on P-weighted squared norms (the meter's preconditioned series): its 95%
    interval holds the closed form tr(P Sigma)/(G^T P G) = 9.5927 in 90-99% of 1000 repeats."""
    _, _, truth = oracle.preconditioned_truth()
    iv = b_simple_interval(_oracle_states(method, 1000, steps, beta, seed=4, weights=oracle.PRECONDITIONER))
    assert bool(iv.resolved.all())
    covered = ((iv.low <= truth) & (iv.high >= truth)).double().mean().item()
    assert 0.90 <= covered <= 0.99, covered
    assert iv.se.median().item() == pytest.approx(iv.b_simple.std().item(), rel=0.2)
