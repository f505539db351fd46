"""BatchSizeCallback in a real Lightning fit: accumulate_grad_batches follows the controller, aligned.

Linear regression started near its optimum (|delta|^2 = 0.01, noise 0.7, 5 inputs): B_simple is about
1 + 5 (1 + 0.49 / 0.01) = 251 examples from the start, so a run at 16 examples grows within a few looks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from noisescale.control.rules import SGDRule
from noisescale.integrations.lightning import NoiseScaleCallback
from noisescale.integrations.lightning_batch import BatchSizeCallback

MICRO, LR, STEPS = 8, 0.002, 100


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(5, 1, bias=False)
        with torch.no_grad():
            self.net.weight.copy_(1.0 + 0.05**0.5 * torch.tensor([[1.0, -1.0, 0.0, 0.0, 0.0]]) / 2**0.5)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return 0.5 * (self.net(x).squeeze(-1) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class Windows(pl.Callback):
    """What each optimizer step was: its micro-batches, the epoch's batch count, the lr it used."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._n = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._n += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        self.steps.append({"micro": self._n, "ready": ready, "lr": optimizer.param_groups[0]["lr"]})
        self._n = 0


def _fit(tmp_path: Path, steps: int, callbacks: list[pl.Callback], ckpt: str | None = None) -> pl.Trainer:
    torch.manual_seed(0)
    x = torch.randn(60_000, 5)
    y = x.sum(1) + 0.7 * torch.randn(60_000)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Regression(), DataLoader(TensorDataset(x, y), batch_size=MICRO), ckpt_path=ckpt)
    return trainer


def _callbacks() -> tuple[NoiseScaleCallback, BatchSizeCallback, Windows]:
    noise = NoiseScaleCallback(ema_decay=0.98)
    batch = BatchSizeCallback(
        noise, micro_batch_size=MICRO, max_batch_size=128, check_every=5, rule=SGDRule(), critical_factor=2.0,
        hysteresis=0.0,
    )  # fmt: skip
    return noise, batch, Windows()


def test_accumulation_follows_the_controller_at_aligned_steps(tmp_path: Path) -> None:
    noise, batch, windows = _callbacks()
    trainer = _fit(tmp_path, STEPS, [noise, batch, windows])
    controller = batch.controller
    assert controller is not None
    schedule = controller.schedule
    assert len(schedule) >= 2 and schedule[0].batch_size == 16, schedule
    assert trainer.accumulate_grad_batches == controller.micro_batches
    lr = LR
    for change, following in zip(schedule[1:], [*schedule[2:], None], strict=True):
        k = change.batch_size // MICRO
        switch = next(i for i, s in enumerate(windows.steps) if i >= change.step and s["micro"] == k)
        before = windows.steps[change.step : switch]
        assert all(s["micro"] != k for s in before) and len(before) < k  # waited for alignment only
        assert (windows.steps[switch]["ready"] - k) % k == 0  # the new window starts at a multiple of k
        end = len(windows.steps) if following is None else following.step
        assert all(s["micro"] == k for s in windows.steps[switch:end])
        assert windows.steps[switch]["lr"] > lr  # the SGD rule raised the rate with the batch
        lr = windows.steps[switch]["lr"]
    assert controller.examples == sum(s["micro"] for s in windows.steps) * MICRO
    assert noise.meter is not None and noise.meter.compute().steps == STEPS  # no window discarded


class Resumed(pl.Callback):
    """The callback's state when the resumed fit starts training."""

    def __init__(self, batch: BatchSizeCallback) -> None:
        self.batch = batch
        self.seen: tuple[int, int, int] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        controller = self.batch.controller
        assert controller is not None
        self.seen = (controller.steps, controller.batch_size, trainer.accumulate_grad_batches)


def test_a_resumed_fit_restores_the_controller_and_the_accumulation(tmp_path: Path) -> None:
    noise, batch, _ = _callbacks()
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=50, save_top_k=-1)
    _fit(tmp_path, STEPS, [noise, batch, saver])
    assert batch.controller is not None
    full = batch.controller.schedule
    at_50 = [c for c in full if c.step <= 50]
    assert len(at_50) >= 2  # a change was decided and applied before the checkpoint
    noise2, batch2, _ = _callbacks()
    resumed = Resumed(batch2)
    trainer = _fit(tmp_path, STEPS, [noise2, batch2, resumed], ckpt=str(tmp_path / "epoch=0-step=50.ckpt"))
    assert resumed.seen == (50, at_50[-1].batch_size, at_50[-1].batch_size // MICRO)
    assert batch2.controller is not None and batch2.controller.schedule[: len(at_50)] == at_50
    assert trainer.global_step == STEPS


def test_the_noise_callback_must_come_first(tmp_path: Path) -> None:
    noise, batch, _ = _callbacks()
    with pytest.raises(RuntimeError, match="before the BatchSizeCallback"):
        _fit(tmp_path, 2, [batch, noise])
