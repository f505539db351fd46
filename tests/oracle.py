"""The closed-form linear-regression oracle of SCIENCE.md, as a sampler for tests.

x ~ N(0, diag(lam)), y = w*.x + xi, xi ~ N(0, sigma^2), per-example loss 0.5 (w.x - y)^2,
delta = w - w*. Per-example gradient: g = x (x.delta - xi).
At the SCIENCE.md test vector: |G|^2 = 3.75, tr(Sigma) = 27.78, B_simple = 7.408.
"""

from __future__ import annotations

import torch

LAM = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
DELTA = torch.tensor([0.5, -0.3, 0.8, 1.0, -2.0], dtype=torch.float64)
SIGMA = 0.7
GRAD_NORM_SQ = 3.75
TRACE_SIGMA = 27.78
B_SIMPLE = 7.408


def sample_xy(shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[*shape, 5]`` and targets ``[*shape]`` with w* = 0 (so w = delta)."""
    x = torch.randn(*shape, 5, dtype=torch.float64, generator=generator) * LAM.sqrt()
    y = SIGMA * torch.randn(*shape, dtype=torch.float64, generator=generator)
    return x, y


def per_example_grads(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Per-example gradients ``[*shape, 5]`` at w = delta: g = x (x.delta - y)."""
    x, y = sample_xy(shape, generator)
    return x * (x @ DELTA - y).unsqueeze(-1)


# A fixed diagonal preconditioner for the oracle (weights per coordinate).
PRECONDITIONER = torch.tensor([0.5, 2.0, 1.0, 4.0, 0.25], dtype=torch.float64)


def preconditioned_truth(p: torch.Tensor = PRECONDITIONER) -> tuple[float, float, float]:
    """``(G^T P G, tr(P Sigma), B_P)`` at the test vector, for ``P = diag(p)``.

    From SCIENCE.md's G = Lam delta and Sigma = (delta^T Lam delta + sigma^2) Lam + Lam delta delta^T Lam:
    tr(P Sigma) = (delta^T Lam delta + sigma^2) sum_i p_i lam_i + sum_i p_i (lam_i delta_i)^2 and
    G^T P G = sum_i p_i (lam_i delta_i)^2.
    """
    g = LAM * DELTA
    grad_norm_sq = float((p * g.square()).sum())
    trace_sigma = float((DELTA @ (LAM * DELTA) + SIGMA**2) * (p * LAM).sum()) + grad_norm_sq
    return grad_norm_sq, trace_sigma, trace_sigma / grad_norm_sq
