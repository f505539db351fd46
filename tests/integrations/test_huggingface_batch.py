"""BatchSizeCallback in a real Hugging Face Trainer run: gradient_accumulation_steps follows the controller.

The same regression as the Lightning test (B_simple about 55-85 examples from the start); the Trainer
runs SGD with a constant schedule, so the learning rate changes only by the rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from noisescale.control.rules import SGDRule
from noisescale.integrations.huggingface import NoiseScaleCallback
from noisescale.integrations.huggingface_batch import BatchSizeCallback

MICRO, LR, N = 8, 0.002, 12_000


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(5, 1, bias=False)
        with torch.no_grad():
            self.net.weight.copy_(1.0 + 0.05**0.5 * torch.tensor([[1.0, -1.0, 0.0, 0.0, 0.0]]) / 2**0.5)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": 0.5 * (self.net(x).squeeze(-1) - labels).square().mean()}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 5, generator=g)
        self.y = self.x.sum(1) + 0.7 * torch.randn(N, generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Windows(transformers.TrainerCallback):
    """Micro-batches and learning rate of each optimizer step."""

    def __init__(self, trainer: transformers.Trainer) -> None:
        self.trainer = trainer
        self.steps: list[dict[str, Any]] = []
        self._n = 0

    def on_substep_end(self, *args: Any, **kwargs: Any) -> None:
        self._n += 1

    def on_pre_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self.steps.append({"micro": self._n + 1, "lr": self.trainer.optimizer.param_groups[0]["lr"]})
        self._n = 0


def _trainer(tmp_path: Path) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=Regression(), args=args, train_dataset=Data())


def test_accumulation_follows_the_controller_at_aligned_steps(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    noise = NoiseScaleCallback(trainer, ema_decay=0.98)
    batch = BatchSizeCallback(
        trainer, noise, rule=SGDRule(), max_batch_size=128, check_every=5, critical_factor=2.0, hysteresis=0.0
    )
    windows = Windows(trainer)
    for callback in (noise, batch, windows):
        trainer.add_callback(callback)
    trainer.train()
    controller = batch.controller
    assert controller is not None
    schedule = controller.schedule
    assert len(schedule) >= 2 and schedule[0].batch_size == 16, schedule
    steps = windows.steps
    done = 0  # micro-batches of the epoch before each step
    starts = []
    for s in steps:
        starts.append(done)
        done += s["micro"]
    lr = LR
    for change, following in zip(schedule[1:], [*schedule[2:], None], strict=True):
        k = change.batch_size // MICRO
        switch = next(i for i in range(change.step, len(steps)) if starts[i] % k == 0)
        assert switch - change.step < k  # waited for alignment only
        end = len(steps) - 1 if following is None else following.step  # the epoch's last window may be short
        assert all(s["micro"] == k for s in steps[switch:end]), [s["micro"] for s in steps[switch:end]]
        assert all(s["micro"] != k for s in steps[change.step : switch])
        kappa = change.batch_size / (steps[switch - 1]["micro"] * MICRO)
        assert lr < steps[switch]["lr"] <= lr * kappa * (1 + 1e-12)  # SGD rule: above 1x, at most linear
        lr = steps[switch]["lr"]
    assert controller.examples == N  # one epoch, every example counted once
    assert trainer.args.gradient_accumulation_steps == controller.micro_batches


def test_the_noise_callback_must_come_first(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    noise = NoiseScaleCallback(trainer)
    trainer.add_callback(BatchSizeCallback(trainer, noise, max_batch_size=64))
    trainer.add_callback(noise)
    with pytest.raises(RuntimeError, match="before the BatchSizeCallback"):
        trainer.train()
