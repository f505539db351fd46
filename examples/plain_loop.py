"""The gradient noise scale of a plain PyTorch loop with gradient accumulation (CPU, seconds).

Run: ``python examples/plain_loop.py``. Each step back-propagates k = 4 micro-batches;
their gradients are the small batches and the accumulated gradient is the big one, so
measuring costs one fused norm per backward (McCandlish et al. 2018, appendix A.1).
"""

from __future__ import annotations

import torch
from torch import nn

from noisescale import GradientNoiseScale


def main(*, steps: int = 100, k: int = 4, batch: int = 64) -> GradientNoiseScale:
    """Train an MLP on noisy linear data (mean-squared error, mean over each micro-batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=0.95)
    w_true = torch.linspace(-1, 1, 8)
    for _ in range(steps):
        x = torch.randn(batch, 8)
        y = x @ w_true + 0.5 * torch.randn(batch)
        for xb, yb in zip(x.chunk(k), y.chunk(k), strict=True):
            loss = nn.functional.mse_loss(model(xb).squeeze(-1), yb)
            (loss / k).backward()  # accumulation="mean" (the default)
        meter.update(batch_size=batch)  # after the last backward, before clipping and step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return meter



if __name__ == "__main__":
    est = main().compute()
    print(f"{est.describe('examples')} after {est.steps} steps")
    for name, g in est.groups.items():  # per module; the total is their mediant
        print(f"  module {name}: {g.describe('examples')}")
