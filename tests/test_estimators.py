"""The pure estimators against exact enumeration and the linear-regression oracle."""

from __future__ import annotations

import itertools

import pytest
import torch

from noisescale import (
    SingleMicrobatchError,
    effective_batch_size,
    microbatch_stats,
    per_example_stats,
    two_batch_stats,
)
from tests import oracle


def test_two_batch_exact_values() -> None:
    # E|G_B|^2 = |G|^2 + trS/B with |G|^2 = 1, trS = 16: B=4 -> 5, B=8 -> 3.
    s = two_batch_stats(torch.tensor(5.0), 4, torch.tensor(3.0), 8)
    assert s.grad_norm_sq.item() == pytest.approx(1.0)
    assert s.trace_sigma.item() == pytest.approx(16.0)


def test_equal_batches_raise() -> None:
    with pytest.raises(SingleMicrobatchError, match="k >= 2"):
        two_batch_stats(torch.tensor(1.0), 8, torch.tensor(1.0), 8)
    with pytest.raises(SingleMicrobatchError, match="k >= 2"):
        microbatch_stats(torch.ones(1, 1), torch.ones(1), torch.ones(1), torch.tensor(1.0))
    with pytest.raises(SingleMicrobatchError, match="at least 2"):
        per_example_stats(torch.ones(1), torch.ones(1), 1)


def test_uniform_1_3_example_is_unbiased_by_enumeration() -> None:
    """SCIENCE.md: gradients uniform on {1, 3}, B_small = 1, B_big = 2: E|G|^2 = 4, E S = 1."""
    gs, ss = [], []
    for a, b in itertools.product([1.0, 3.0], repeat=2):
        st = two_batch_stats(torch.tensor(a * a), 1, torch.tensor(((a + b) / 2) ** 2), 2)
        gs.append(st.grad_norm_sq.item())
        ss.append(st.trace_sigma.item())
    assert sum(gs) / 4 == pytest.approx(4.0)
    assert sum(ss) / 4 == pytest.approx(1.0)
    # The mean of per-step ratios is useless (-19/7 in SCIENCE.md's enumeration of the pairs).
    assert sum(s / g for s, g in zip(ss, gs, strict=True)) / 4 == pytest.approx(-19 / 7)


def test_k_way_matches_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    k, b = 4, 8
    g = oracle.per_example_grads((k, b), gen).mean(1)  # [k, d] micro-batch gradients
    m = g.square().sum(1).mean()
    gbar = g.mean(0).square().sum()
    st = microbatch_stats(g.square().sum(1), torch.full((k,), float(b)), gbar, torch.tensor(float(k * b)))
    assert st.grad_norm_sq.item() == pytest.approx(((k * gbar - m) / (k - 1)).item())
    assert st.trace_sigma.item() == pytest.approx((b * k * (m - gbar) / (k - 1)).item())


def test_per_example_is_bessel_corrected_spread() -> None:
    gen = torch.Generator().manual_seed(1)
    g = oracle.per_example_grads((16,), gen)
    st = per_example_stats(g.square().sum(1).mean(), g.mean(0).square().sum(), 16)
    assert st.trace_sigma.item() == pytest.approx(((g - g.mean(0)).square().sum() / 15).item())


def test_effective_batch_size() -> None:
    sizes = torch.tensor([4.0, 8.0, 12.0])
    assert effective_batch_size(sizes, sizes).item() == pytest.approx(24.0)  # weights b_i / B: B
    eq = torch.ones(3)
    assert effective_batch_size(eq, torch.full((3,), 8.0)).item() == pytest.approx(24.0)  # k b


@pytest.mark.parametrize(
    ("k", "b", "sizes"),
    [(2, 16, None), (4, 8, None), (32, 1, None), (3, None, [4, 10, 18])],
    ids=["k2", "k4", "per-example", "unequal"],
)
def test_unbiased_on_oracle(k: int, b: int | None, sizes: list[int] | None) -> None:
    """Monte Carlo mean of the per-step estimates equals the truth within 4 standard errors.

    4 SE bounds a false failure at ~6e-5 per quantity; the SE is the sample SD / sqrt(R).
    """
    gen = torch.Generator().manual_seed(2)
    sizes_l = sizes or [b] * k
    r = 20000
    grads = [oracle.per_example_grads((r, n), gen) for n in sizes_l]  # each [R, n, d]
    micro = torch.stack([g.mean(1) for g in grads], 1)  # [R, k, d]
    big = torch.cat(grads, 1).mean(1)  # weights b_i / B
    size_t = torch.tensor(sizes_l, dtype=torch.float64)
    st = microbatch_stats(
        micro.square().sum(-1).T, size_t, big.square().sum(-1), effective_batch_size(size_t, size_t)
    )
    for est, truth in ((st.grad_norm_sq, oracle.GRAD_NORM_SQ), (st.trace_sigma, oracle.TRACE_SIGMA)):
        se = est.std() / r**0.5
        assert abs(est.mean().item() - truth) < 4 * se.item()
