"""Diagonal preconditioners: the oracle's closed form, Adam's weights against its own state, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from noisescale.preconditioner import Preconditioner, weighted
from tests import oracle


def test_closed_form_follows_from_sigma_and_g() -> None:
    """tr(P Sigma) and G^T P G from SCIENCE.md's matrices, and a Monte Carlo check of E|g|_P^2 = both."""
    lam, delta, p = oracle.LAM, oracle.DELTA, oracle.PRECONDITIONER
    g = lam * delta
    sigma = (delta @ (lam * delta) + oracle.SIGMA**2) * torch.diag(lam) + torch.outer(g, g)
    grad_norm_sq, trace_sigma, b_p = oracle.preconditioned_truth()
    assert trace_sigma == pytest.approx(float(torch.trace(torch.diag(p) @ sigma)), rel=1e-14)
    assert grad_norm_sq == pytest.approx(float(g @ torch.diag(p) @ g), rel=1e-14)
    assert b_p == pytest.approx(trace_sigma / grad_norm_sq, rel=1e-14)
    # P = 1 gives SCIENCE.md's unweighted numbers.
    ones = oracle.preconditioned_truth(torch.ones(5, dtype=torch.float64))
    assert ones == pytest.approx((oracle.GRAD_NORM_SQ, oracle.TRACE_SIGMA, oracle.B_SIMPLE), rel=1e-4)
    # E sum_j p_j g_nj^2 = G^T P G + tr(P Sigma) over per-example gradients: within 5 standard errors.
    samples = oracle.per_example_grads((400_000,), torch.Generator().manual_seed(0))
    norms = samples.square() @ p
    se = norms.std().item() / math.sqrt(len(norms))
    assert abs(norms.mean().item() - (grad_norm_sq + trace_sigma)) < 5 * se
    means = samples.mean(0)  # E g = G, coordinate-wise within 5 standard errors
    assert bool(((means - g).abs() < 5 * samples.std(0) / math.sqrt(len(samples))).all())


def _adam_run(
    amsgrad: bool, cls: type[torch.optim.Optimizer], steps: int
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    opt = cls(
        [
            {"params": model[0].parameters(), "eps": 1e-3},
            {"params": model[2].parameters(), "betas": (0.8, 0.9)},
        ],
        lr=0.01,
        amsgrad=amsgrad,
    )
    for _ in range(steps):
        model(torch.randn(6, 4, dtype=torch.float64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_adam_weights_are_its_update_denominator(amsgrad: bool, cls: type[torch.optim.Optimizer]) -> None:
    """P = 1/(sqrt(v / (1 - beta2^t)) + eps), per group's betas and eps, from the optimizer's own state."""
    model, opt = _adam_run(amsgrad, cls, steps=3)
    params = list(model.parameters())
    pre = Preconditioner(params, "adam", opt, model)
    for p, w, r in zip(params, pre.weights(), pre.roots(), strict=True):
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        state = opt.state[p]
        v = state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
        v_hat = v / (1 - group["betas"][1] ** float(state["step"]))
        expected = 1.0 / (v_hat.sqrt() + group["eps"])
        torch.testing.assert_close(w, expected, rtol=1e-13, atol=0.0)
        torch.testing.assert_close(r, expected.sqrt(), rtol=1e-13, atol=0.0)
        assert pre.weight(p) is w


def test_adam_weight_is_zero_where_the_second_moment_is_zero() -> None:
    """An embedding row never drawn has v = 0: weight 0 (counted from its first gradient), not 1/eps."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3).double()
    opt = torch.optim.AdamW(emb.parameters(), lr=0.01)
    emb(torch.tensor([0, 1, 1])).square().sum().backward()  # rows 2, 3, 4 get no gradient
    opt.step()
    pre = Preconditioner([emb.weight], "adam", opt, emb)
    (w,), (r,) = pre.weights(), pre.roots()
    assert bool((w[2:] == 0).all()) and bool((r[2:] == 0).all())
    v_hat = opt.state[emb.weight]["exp_avg_sq"][:2] / (1 - 0.999)
    torch.testing.assert_close(w[:2], 1.0 / (v_hat.sqrt() + 1e-8), rtol=1e-13, atol=0.0)


def test_adam_weights_follow_the_optimizer_and_are_nan_before_its_state() -> None:
    model, opt = _adam_run(False, torch.optim.AdamW, steps=0)
    pre = Preconditioner(list(model.parameters()), "adam", opt, model)
    assert all(bool(w.isnan().all()) for w in pre.weights())  # no second moment yet: no preconditioner
    model(torch.randn(6, 4, dtype=torch.float64)).square().mean().backward()
    assert all(bool(w.isnan().all()) for w in pre.weights())  # read once per step: still the step's own
    opt.step()  # the optimizer's hook marks them stale
    first = [w.clone() for w in pre.weights()]
    assert all(bool(w.isfinite().all()) for w in first)
    saved = copy.deepcopy(opt.state_dict())  # its tensors are the state itself
    model(torch.randn(6, 4, dtype=torch.float64)).square().mean().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(first, pre.weights(), strict=True))
    opt.load_state_dict(saved)  # back to the first step's state: so are the weights
    for a, b in zip(first, pre.weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)
    pre.remove()
    opt.step()  # no hook any more: the weights stay as read
    for a, b in zip(first, pre.weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)


def test_mapping_weights_are_kept_in_the_parameter_dtype_and_device() -> None:
    model = nn.Linear(3, 2).half()
    mapping = {
        model.weight: torch.full((2, 3), 4.0, dtype=torch.float64),
        model.bias: torch.ones(2, dtype=torch.int64),
    }
    pre = Preconditioner(list(model.parameters()), mapping, None, model)
    assert [w.dtype for w in pre.weights()] == [
        torch.float32,
        torch.float32,
    ]  # never float16: 1/eps overflows it
    assert pre.roots()[0].unique().tolist() == [2.0]
    assert pre.kind == "mapping"


def test_weighted_handles_sparse_gradients() -> None:
    root = torch.arange(12.0).view(4, 3)
    dense = torch.zeros(4, 3)
    dense[1], dense[3] = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 2.0])
    sparse = torch.sparse_coo_tensor(
        torch.tensor([[3, 1, 3]]),
        torch.tensor([[-1.0, 0.5, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]),
        (4, 3),
        check_invariants=True,
    )
    assert weighted(sparse, root).square().sum().item() == pytest.approx((dense * root).square().sum().item())


def _linear() -> tuple[nn.Module, list[nn.Parameter]]:
    model = nn.Linear(3, 2)
    return model, list(model.parameters())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda m, ps: ("adam", torch.optim.SGD(ps, lr=0.1)),
            r"got SGD: pass the Adam/AdamW, or pass preconditioner=\{parameter: weights\}",
        ),
        (lambda m, ps: ("adam", None), "got no optimizer"),
        (
            lambda m, ps: ("adam", torch.optim.Adam([m.weight])),
            "parameter bias is measured but not in the optimizer",
        ),
        (lambda m, ps: ({m.weight: torch.ones(2, 3)}, None), "no weights for parameter bias"),
        (
            lambda m, ps: ({m.weight: torch.ones(3, 2), m.bias: torch.ones(2)}, None),
            r"weight have shape \[3, 2\], the parameter has shape \[2, 3\]",
        ),
        (
            lambda m, ps: ({m.weight: -torch.ones(2, 3), m.bias: torch.ones(2)}, None),
            "must be finite and non-negative",
        ),
        (
            lambda m, ps: ({m.weight: torch.ones(2, 3), m.bias: torch.tensor([1.0, math.inf])}, None),
            "must be finite and non-negative",
        ),
        (
            lambda m, ps: ({m.weight: torch.ones(2, 3), m.bias: torch.tensor([1.0, math.nan])}, None),
            "must be finite and non-negative",
        ),
        (
            lambda m, ps: (
                {m.weight: torch.ones(2, 3), m.bias: torch.ones(2), torch.zeros(2): torch.ones(2)},
                None,
            ),
            "not parameters of the model",
        ),
        (lambda m, ps: ("sgd", None), "to be 'adam' or a mapping but got 'sgd'"),
        (  # an AttributeError from deep inside before
            lambda m, ps: ({n: torch.ones_like(p) for n, p in m.named_parameters()}, None),
            "keyed by str 'weight', not by parameters",
        ),
        (  # the imaginary part was dropped with a warning before
            lambda m, ps: ({m.weight: torch.ones(2, 3, dtype=torch.complex64), m.bias: torch.ones(2)}, None),
            "are complex",
        ),
    ],
    ids=[
        "sgd",
        "no-optimizer",
        "not-in-optimizer",
        "missing",
        "shape",
        "negative",
        "inf",
        "nan",
        "stranger",
        "name",
        "keyed-by-names",
        "complex",
    ],
)
def test_bad_preconditioners_are_refused_with_the_fix(make, match: str) -> None:  # type: ignore[no-untyped-def]
    model, params = _linear()
    spec, opt = make(model, params)
    with pytest.raises(ValueError, match=match):
        Preconditioner(params, spec, opt, model)


def test_a_preconditioner_of_another_type_is_refused() -> None:
    model, params = _linear()
    with pytest.raises(TypeError, match="'adam' or a mapping"):
        Preconditioner(params, [torch.ones(2, 3), torch.ones(2)], None, model)  # type: ignore[arg-type]
