"""B_noise from Hessian-vector products: exact products, the oracle's truth, coverage, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from noisescale import DoubleBackwardError, estimate_b_noise
from noisescale.b_noise import RATIOS, hessian_weighted_stats, hvp_products, ratio_rows
from noisescale.estimators import microbatch_stats
from noisescale.experiments.tasks import get_task, linreg_truth
from noisescale.smoothing import ema_fold, ema_init
from noisescale.uncertainty import b_simple_interval
from tests import oracle

TRUTH = linreg_truth(oracle.DELTA.numpy())  # B_noise = 7.140705, B_simple = 7.408 (SCIENCE.md)


def oracle_products(shape: tuple[int, ...], k: int, b: int, gen: torch.Generator):
    """Closed-form micro-batch gradients and Hessians of the oracle (H_i = X_i^T X_i / b).

    Returns ``gram [*shape, k, k]``, ``cross [*shape, k, k]`` (``cross[j, i] = g_j . H_{i+1} g_i``),
    the gradients ``[*shape, k, d]`` and each micro-batch's own ``H_i g_i``.
    """
    x, y = oracle.sample_xy((*shape, k, b), gen)  # [..., k, b, d], [..., k, b]
    g = (x * (x @ oracle.DELTA - y).unsqueeze(-1)).mean(-2)  # [..., k, d]
    hess = torch.einsum("...bd,...be->...de", x, x) / b  # [..., k, d, d]
    u = torch.einsum("...kde,...ke->...kd", hess.roll(-1, dims=-3), g)  # H_{i+1} g_i
    own = torch.einsum("...kde,...ke->...kd", hess, g)  # H_i g_i: the same examples
    return g @ g.transpose(-1, -2), g @ u.transpose(-1, -2), g, own


def test_hvp_products_equal_explicit_hessians() -> None:
    """Gram and cross products against explicit per-micro-batch Hessians of a tanh MLP, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(13, 3, dtype=torch.float64), torch.randint(2, (13,))  # micro-batches 5, 4, 4
    loss_fn = nn.functional.cross_entropy
    gram, cross, sizes = hvp_products(model, loss_fn, x, y, 3)
    names = [n for n, _ in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss_at(theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        pieces = theta.split([s.numel() for s in shapes])
        parts = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return loss_fn(functional_call(model, parts, (xb,)), yb)

    parts = list(zip(x.tensor_split(3), y.tensor_split(3), strict=True))
    grads = torch.stack([torch.func.grad(loss_at)(theta0, xb, yb) for xb, yb in parts])  # [k, P]
    hessians = [torch.func.hessian(loss_at)(theta0, xb, yb) for xb, yb in parts]
    u = torch.stack([hessians[(i + 1) % 3] @ grads[i] for i in range(3)])
    assert sizes.tolist() == [5.0, 4.0, 4.0]
    torch.testing.assert_close(gram, grads @ grads.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cross, grads @ u.T, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


def test_unbiased_on_oracle_and_same_batch_hessian_is_not() -> None:
    """200,000 batches: each part's mean lies within 4 standard errors of the closed form.

    Taking each micro-batch's Hessian from its own examples (the naive g^T H_b g) misses by
    dozens of standard errors: the bias the cyclic pairing removes.
    """
    gen = torch.Generator().manual_seed(0)
    k, b, n = 4, 8, 200_000
    sizes = torch.full((k,), float(b), dtype=torch.float64)
    gram, cross, g, own = oracle_products((n,), k, b, gen)
    stats = hessian_weighted_stats(gram, cross, sizes)
    truth = [TRUTH["grad_norm_sq"], TRUTH["g_h_g"], TRUTH["trace_sigma"], TRUTH["trace_h_sigma"]]
    parts = torch.cat([stats.grad_norm_sq, stats.trace_sigma], -1)  # [n, 4]
    z = (parts.mean(0) - torch.tensor(truth, dtype=torch.float64)) / (parts.std(0) / math.sqrt(n))
    assert z.abs().max() < 4, z
    g_bar = g.mean(-2)
    naive = microbatch_stats(
        (g * own).sum(-1).T, sizes, (g_bar * own.mean(-2)).sum(-1), torch.tensor(float(k * b))
    )  # g_i^T H_i g_i and g^T H_B g with H_B the batch's own Hessian
    for value, exact in ((naive.grad_norm_sq, TRUTH["g_h_g"]), (naive.trace_sigma, TRUTH["trace_h_sigma"])):
        assert abs(value.mean() - exact) / (value.std() / math.sqrt(n)) > 30


def _oracle_intervals(repeats: int, batches: int, k: int, b: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.full((k,), float(b), dtype=torch.float64)
    state = ema_init(len(RATIOS) * repeats)
    for _ in range(batches):
        gram, cross, _, _ = oracle_products((repeats,), k, b, gen)
        rows = ratio_rows(hessian_weighted_stats(gram, cross, sizes))  # [R, 2, 3]
        state, _ = ema_fold(state, rows.transpose(0, 1).reshape(2, -1)[None], [1.0])
    iv = b_simple_interval(state)
    return iv, lambda field: field.view(repeats, len(RATIOS))


@pytest.mark.parametrize(("k", "b"), [(4, 8), (3, 5)], ids=["k4b8", "k3b5"])
def test_interval_coverage_on_oracle(k: int, b: int) -> None:
    """1000 repeats of 100 batches: the 95% intervals of B_noise and eps_max hold the truth 90-99%.

    A calibrated 95% interval covers in 95% +- 0.7% (1 SD) of 1000 repeats: the band is > 5 SD wide
    on either side. The standard error matches the spread of the estimates across repeats (20%).
    """
    iv, per = _oracle_intervals(1000, 100, k, b, seed=3)
    assert bool(per(iv.resolved).all())
    for i, name in ((1, "b_noise"), (2, "eps_max")):
        low, high = per(iv.low)[:, i], per(iv.high)[:, i]
        covered = ((low <= TRUTH[name]) & (high >= TRUTH[name])).double().mean().item()
        assert 0.90 <= covered <= 0.99, (name, covered)
    assert per(iv.se)[:, 1].median().item() == pytest.approx(per(iv.b_simple)[:, 1].std().item(), rel=0.2)


def _linreg_batches(n: int, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    task, gen = get_task("linreg"), torch.Generator().manual_seed(seed)
    return [tuple(t.double() for t in task.generate(size, gen)) for _ in range(n)]  # type: ignore[misc]


def test_estimate_b_noise_on_linreg_task_is_the_closed_form_computation() -> None:
    """The task's nn.Linear through autograd equals the closed-form products, batch for batch.

    And the estimate lies within 4 of its standard errors of B_noise = 7.140705 (the truth at the
    model's float32 weights; 400 batches of 32 examples).
    """
    task = get_task("linreg")
    model = task.make_model(0).double()
    data = _linreg_batches(400, 32, seed=5)
    est = estimate_b_noise(model, task.loss_fn, data, microbatches=4)
    delta = model.weight.detach().reshape(-1)  # w* = 0
    state = ema_init(len(RATIOS))
    for x, y in data:
        xs, ys = x.view(4, 8, 5), y.view(4, 8)
        g = (xs * (xs @ delta - ys).unsqueeze(-1)).mean(1)
        u = torch.einsum("kbd,kbe,ke->kd", xs.roll(-1, 0), xs.roll(-1, 0), g) / 8
        sizes = torch.full((4,), 8.0, dtype=torch.float64)
        rows = ratio_rows(hessian_weighted_stats(g @ g.T, g @ u.T, sizes))
        state, _ = ema_fold(state, rows[None], [1.0])
    iv = b_simple_interval(state)
    assert est.b_noise == pytest.approx(float(iv.b_simple[1]), rel=1e-10)
    assert est.b_noise_ci == pytest.approx((float(iv.low[1]), float(iv.high[1])), rel=1e-10)
    assert est.b_simple == pytest.approx(float(iv.b_simple[0]), rel=1e-10)
    assert est.eps_max == pytest.approx(float(iv.b_simple[2]), rel=1e-10)
    truth = task.truth(model)
    assert est.resolved and est.reason is None and est.batches == 400 and est.examples == 12_800
    assert abs(est.b_noise - truth["b_noise"]) < 4 * est.b_noise_se
    assert est.b_noise_ci[0] < truth["b_noise"] < est.b_noise_ci[1]
    assert est.describe().startswith("B_noise = 7.")
    assert est.to_dict()["b_noise_ci"] == list(est.b_noise_ci)


def test_units_per_example_scales_batch_sizes_not_step_sizes() -> None:
    """Windows of T tokens with a loss averaged over the tokens: B in tokens is T times B in windows."""
    task = get_task("linreg")
    model = task.make_model(0).double()
    data = _linreg_batches(40, 32, seed=2)
    windows = estimate_b_noise(model, task.loss_fn, data)
    tokens = estimate_b_noise(model, task.loss_fn, data, units_per_example=64)
    assert tokens.b_noise == pytest.approx(64 * windows.b_noise, rel=1e-12)
    assert tokens.b_simple == pytest.approx(64 * windows.b_simple, rel=1e-12)
    assert tokens.eps_max == pytest.approx(windows.eps_max, rel=1e-12) and tokens.examples == 64 * 1280
    with pytest.raises(ValueError, match="`units_per_example` to be an integer >= 1 but got 0"):
        estimate_b_noise(model, task.loss_fn, data, units_per_example=0)


def test_negative_curvature_is_not_resolved_and_says_why() -> None:
    """The negated oracle loss is concave: G^T H G < 0, no optimal step, no B_noise, no eps_max."""
    task = get_task("linreg")
    model = task.make_model(0).double()
    est = estimate_b_noise(model, lambda out, y: -task.loss_fn(out, y), _linreg_batches(50, 32, seed=1))
    assert est.g_h_g < 0 and est.trace_h_sigma < 0
    assert est.b_noise is None and est.b_noise_ci is None and est.eps_max is None and not est.resolved
    assert "curves downward" in est.reason and "undefined here" in est.reason
    assert est.b_simple is not None  # B_simple does not depend on the curvature
    assert est.describe().startswith("B_noise not resolved: the averaged G^T H G is")


def test_one_batch_and_a_non_finite_batch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    data = [(torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)) for _ in range(5)]
    loss_fn = lambda out, y: nn.functional.mse_loss(out.squeeze(-1), y)  # noqa: E731
    one = estimate_b_noise(model, loss_fn, data[:1], microbatches=4)
    assert one.b_noise is None and "2 or more batches" in one.reason
    data[2][0][0, 0] = float("inf")
    skipped = estimate_b_noise(model, loss_fn, data)
    assert skipped.skipped_batches == 1 and skipped.batches == 4 and skipped.examples == 40
    nan = estimate_b_noise(
        model, lambda out, y: loss_fn(out, y) * float("nan"), data
    )  # said "one batch" before
    assert nan.batches == 0 and nan.skipped_batches == 5 and "every batch gave non-finite" in nan.reason


class _NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.square()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _Distances(nn.Module):  # torch.cdist has no double backward
    def __init__(self) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, self.centres).sum(-1, keepdim=True)


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoDoubleBackward.apply(x)


@pytest.mark.parametrize(
    ("kwargs", "data", "error", "match"),
    [
        ({"microbatches": 2}, None, ValueError, "integer >= 3 but got 2"),
        ({"microbatches": True}, None, ValueError, "integer >= 3 but got True"),
        ({"confidence": 1.0}, None, ValueError, "confidence"),
        ({}, [], ValueError, "yielded no batch"),
        ({}, [(torch.zeros(3, 2), torch.zeros(3))], ValueError, "batch 0 has 3 examples, fewer than the 4"),
        ({}, [(torch.zeros(8, 2), torch.zeros(7))], ValueError, "batch 0: 8 inputs but 7 targets"),
        ({}, [torch.zeros(8, 2)], TypeError, "expected a pair"),
        ({}, [(torch.zeros(8, 2), torch.tensor(0.0))], ValueError, "both need dim 0 over the examples"),
        ({}, [(torch.zeros(8, 2), [0.0] * 8)], TypeError, "expected tensors but got Tensor, list"),
        ({"loss_fn": nn.MSELoss(reduction="none")}, None, ValueError, "must return the MEAN loss"),
        ({"model": nn.Sequential(nn.Linear(2, 3), _Square(), nn.Linear(3, 1))}, None, DoubleBackwardError,
         "curvature would be dropped"),
        ({"model": _Distances()}, None, DoubleBackwardError, "_cdist_backward' is not implemented.*MATH"),
        ({"loss_fn": lambda out, y: _NoDoubleBackward.apply(out - y).mean()}, None, DoubleBackwardError,
         "once_differentiable"),
        ({"loss_fn": lambda out, y: (out * y).mean()}, None, DoubleBackwardError, "linear in every"),
    ],
    ids=["k2", "k_bool", "confidence", "no_batches", "small_batch", "lengths", "not_pair", "scalar_target",
         "not_tensor", "sum_loss", "once_differentiable", "cdist", "gradient_without_graph", "linear_loss"],
)  # fmt: skip
def test_bad_input_gets_a_clear_error(kwargs: dict, data: list | None, error: type, match: str) -> None:
    model = kwargs.pop("model", nn.Linear(2, 1))
    loss_fn = kwargs.pop("loss_fn", nn.functional.mse_loss)
    data = [(torch.randn(8, 2), torch.randn(8, 1))] * 2 if data is None else data
    with pytest.raises(error, match=match):
        estimate_b_noise(model, loss_fn, data, **kwargs)


def test_frozen_model_is_refused() -> None:
    model = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        estimate_b_noise(model, nn.functional.mse_loss, [(torch.randn(8, 2), torch.randn(8, 1))] * 2)
