"""A Lightning fit that logs the gradient noise scale (tiny MLP on synthetic data, CPU, seconds).

Run: ``python examples/lightning_fit.py`` (needs ``pip install 'noisescale[lightning]'``).
It trains with 2 accumulated micro-batches per step, so the callback uses the
microbatch method; under the DDP strategy it would use the replicas too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from noisescale.integrations.lightning import NoiseScaleCallback


class Regressor(pl.LightningModule):
    """A 2-layer MLP on noisy linear data; mean squared error (a mean over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(out_dir: str | Path, *, steps: int = 30) -> tuple[pl.Trainer, NoiseScaleCallback]:
    """Fit for ``steps`` optimizer steps; logs go to ``out_dir`` as CSV."""
    pl.seed_everything(0, verbose=False)
    x = torch.randn(2048, 8)
    y = x @ torch.linspace(-1, 1, 8) + 0.5 * torch.randn(2048)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    callback = NoiseScaleCallback(ema_decay=0.95)  # logs every log_every_n_steps of the Trainer
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=2,  # 2 micro-batches of 32 per step: B = 64 examples
        log_every_n_steps=5,
        callbacks=[callback],
        logger=CSVLogger(out_dir, name="lightning_fit"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), loader)
    return trainer, callback



if __name__ == "__main__":
    trainer, callback = main(tempfile.mkdtemp())
    est = callback.meter.compute()
    print(f"{est.describe('examples')} after {est.steps} steps "
          f"({est.examples:,} examples); logged as noise_scale/* through the Trainer's logger")  # fmt: skip
