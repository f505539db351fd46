"""A plain training loop writing the gradient noise scale to TensorBoard (CPU, seconds).

Run: ``python examples/tensorboard_loop.py`` then ``tensorboard --logdir runs/tensorboard_loop``
(needs ``pip install 'noisescale[tensorboard]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from noisescale import GradientNoiseScale
from noisescale.integrations.tensorboard import NoiseScaleWriter


def main(log_dir: str | Path, *, steps: int = 40, k: int = 4, batch: int = 64) -> GradientNoiseScale:
    """Train an MLP on noisy linear data with k accumulated micro-batches; write every 10 steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    meter = GradientNoiseScale(model, method="microbatch", optimizer=opt, ema_decay=0.95)
    writer = NoiseScaleWriter(log_dir)
    w_true = torch.linspace(-1, 1, 8)
    for step in range(1, steps + 1):
        x = torch.randn(batch, 8)
        y = x @ w_true + 0.5 * torch.randn(batch)
        for xb, yb in zip(x.chunk(k), y.chunk(k), strict=True):  # k micro-batches
            (nn.functional.mse_loss(model(xb).squeeze(-1), yb) / k).backward()
        meter.update(batch_size=batch)  # before clipping / optimizer.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            writer.write(meter.compute(), step)
    writer.close()
    return meter



if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tensorboard_loop")
    est = main(out).compute()
    print(f"{est.describe('examples')} after {est.steps} steps; events in {out}")
