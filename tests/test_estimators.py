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
from noisescale.estimators import (
    loss_factors,
    microbatch_coefficients,
    per_example_coefficients,
    sampling_variance,
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


# -- loss conventions, the estimators as matrices, finite datasets -------------------------------


@pytest.mark.parametrize(
    ("reduction", "accumulation", "expected"),
    [
        ("mean", "mean", (1 / 3, 1 / 3, 1 / 3)),
        ("mean", "sum", (1.0, 1.0, 1.0)),
        ("sum", "mean", (2 / 3, 4 / 3, 6 / 3)),
        ("sum", "sum", (2.0, 4.0, 6.0)),
        ("mean", "example_mean", (2 / 12, 4 / 12, 6 / 12)),  # reduction unused
    ],
)
def test_loss_factors_of_every_convention(
    reduction: str, accumulation: str, expected: tuple[float, ...]
) -> None:
    got = loss_factors([2, 4, 6], reduction=reduction, accumulation=accumulation)  # type: ignore[arg-type]
    assert got == pytest.approx(expected, rel=1e-15)


def test_example_mean_under_ddp_uses_every_ranks_examples() -> None:
    """Loss = sum / N_all x W on each rank: c_i = n_i W / N_all (DDP then divides .grad by W)."""
    assert loss_factors([3, 5], accumulation="example_mean", step_examples=20, world_size=2) == (0.3, 0.5)
    with pytest.raises(ValueError, match="`accumulation`"):
        loss_factors([3], accumulation="tokens")  # type: ignore[arg-type]


@pytest.mark.parametrize("world_size", [1, 2])
def test_microbatch_matrix_applies_the_k_way_estimator(world_size: int) -> None:
    """Random records: the matrix times the raw squared norms equals microbatch_stats on the
    undone norms (float64 rounding only)."""
    gen = torch.Generator().manual_seed(0)
    sizes, factors = [3, 5, 4], [0.5, 2.0, 1.5]
    g = torch.randn(3, 7, generator=gen, dtype=torch.float64)  # mean-loss gradients
    c = torch.tensor(factors, dtype=torch.float64)
    recorded = torch.cat(
        [(c[:, None] * g).square().sum(1), ((c[:, None] * g).sum(0) / world_size).square().sum()[None]]
    )
    rows = microbatch_coefficients(sizes, factors, world_size=world_size) @ recorded
    w = c / c.sum()
    big = (w[:, None] * g).sum(0)
    ref = microbatch_stats(
        g.square().sum(1),
        torch.tensor(sizes),
        big.square().sum(),
        effective_batch_size(w, torch.tensor(sizes, dtype=torch.float64)),
    )
    assert rows[:2].tolist() == pytest.approx(torch.stack(ref).tolist(), rel=1e-12)
    assert float(rows[2]) == pytest.approx(float((w * g.square().sum(1)).sum()), rel=1e-12)
    assert float(rows[3]) == pytest.approx(float(big.square().sum()), rel=1e-12)
    assert rows[3] <= rows[2]  # Jensen: a convex combination never exceeds its parts' mean


def test_per_example_matrix_applies_the_per_example_estimator() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.tensor([0.25] * 4 + [0.1] * 6, dtype=torch.float64)  # two micro-batches' per-example factors
    g = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    sq = g.square().sum(1)
    big = (a[:, None] * g).sum(0)
    x = torch.stack([sq.sum(), (a * sq).sum(), big.square().sum()])
    rows = per_example_coefficients(10, float(a.sum()), float(a.square().sum())) @ x
    u = a / a.sum()
    ref = per_example_stats(sq.mean(), (u[:, None] * g).sum(0).square().sum(), float(1 / u.square().sum()))
    assert rows[:2].tolist() == pytest.approx(torch.stack(ref).tolist(), rel=1e-12)
    assert float(rows[2]) == pytest.approx(float((u * sq).sum()), rel=1e-12)


def test_sampling_variance_matches_the_finite_population_formula() -> None:
    """(1/B)(N - B)/(N - 1) for a plain mean (SCIENCE.md); 1 for one example; 0 at B = N."""
    inv = 1.0 / torch.tensor([1.0, 4.0, 10.0], dtype=torch.float64)
    assert sampling_variance(inv, 10).tolist() == pytest.approx([1.0, (1 / 4) * 6 / 9, 0.0], abs=1e-15)
    assert torch.equal(sampling_variance(inv, None), inv)


@pytest.mark.parametrize("b", [2, 3, 5, 6])
def test_per_example_is_exactly_unbiased_without_replacement(b: int) -> None:
    """All C(6, b) subsets of a population of 6 gradient vectors: the mean estimate is the
    population's |G|^2 and tr(Sigma_N) (exact enumeration, float64 rounding only)."""
    pop = torch.randn(6, 3, generator=torch.Generator().manual_seed(b), dtype=torch.float64)
    g_true = float(pop.mean(0).square().sum())
    s_true = float((pop - pop.mean(0)).square().sum(1).mean())
    est = []
    for subset in itertools.combinations(range(6), b):
        g = pop[list(subset)]
        est.append(
            torch.stack(
                per_example_stats(g.square().sum(1).mean(), g.mean(0).square().sum(), b, dataset_size=6)
            )
        )
    mean = torch.stack(est).mean(0)
    assert mean.tolist() == pytest.approx([g_true, s_true], rel=1e-10)
