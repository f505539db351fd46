"""The one evaluation of a model on a task: loss and error on fixed subsets, the same for every run.

:class:`Probe` draws its subsets once from a fixed seed (the training loss on a subset of the
training set, the loss and error on a subset of the held-out set: the test set, or for
``shakespeare`` the validation plays): ``noisescale measure`` and every run of a sweep evaluate
through it. Losses are means per example of the task's loss, which for ``shakespeare`` is the mean
over the predicted tokens in nats; :func:`bits` converts it to bits per character.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from noisescale.experiments.tasks import Task

__all__ = ["Probe", "bits", "evaluate", "train_loss"]

_SUBSET_SEED = 0  # seed of the fixed evaluation subsets, the same for every run
_TRAIN_SUBSET_SIZE = 10_000
_EVAL_CHUNK = 2048  # examples per forward pass when evaluating (memory only)


def bits(loss: float) -> float:
    """A cross-entropy in nats per token as bits per token (per character for a character model).

    Example:
        >>> round(bits(math.log(4)), 12)
        2.0
    """
    return loss / math.log(2)


@torch.no_grad()
def _mean_loss_and_error(
    task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = _EVAL_CHUNK
) -> tuple[float, float | None]:
    """Mean loss and error fraction of ``model`` over ``(x, y)``, in chunks of ``batch_size``."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    loss_total, wrong = 0.0, 0
    try:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            loss_total += float(task.loss_fn(out, yb)) * len(yb)
            if task.classification:
                wrong += int((out.argmax(-1) != yb).sum())
    finally:
        model.train(was_training)
    n = len(y)
    return loss_total / n, (wrong / n if task.classification else None)


class Probe:
    """Fixed evaluation subsets of a task, the same for every run: training loss, test loss and error.

    The subsets are drawn once from a generator seeded with ``seed``: the training subset first
    (a random permutation of the training set, or fresh draws of an infinite task), then the test
    subset from the same generator.

    Args:
        task: the task.
        train_examples: examples in the training subset (all of them if the set is smaller).
        test_examples: examples in the test subset; None for the whole test set.
        seed: seed of the subsets.

    Example:
        >>> from noisescale.experiments.tasks import get_task
        >>> probe = Probe(get_task("linreg"), train_examples=64, test_examples=32)
        >>> len(probe.y), len(probe.y_test)
        (64, 32)
    """

    def __init__(
        self, task: Task, train_examples: int, test_examples: int | None = None, *, seed: int = _SUBSET_SEED
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        if task.x_train is None or task.y_train is None:
            self.x, self.y = task.sample_batch(train_examples, gen)
        else:
            idx = torch.randperm(len(task.x_train), generator=gen)[:train_examples]
            self.x, self.y = task.x_train[idx], task.y_train[idx]
        if test_examples is None:
            self.x_test, self.y_test = task.x_test, task.y_test
        else:
            idx = torch.randperm(len(task.x_test), generator=gen)[:test_examples]
            self.x_test, self.y_test = task.x_test[idx], task.y_test[idx]
        self.task = task

    def train_loss(self, model: nn.Module) -> float:
        """Mean loss per example on the training subset."""
        return _mean_loss_and_error(self.task, model, self.x, self.y)[0]

    def test(self, model: nn.Module) -> tuple[float, float | None]:
        """``(test_loss, test_error)`` on the test subset; the error is None for regression tasks."""
        return _mean_loss_and_error(self.task, model, self.x_test, self.y_test)


def evaluate(task: Task, model: nn.Module, *, batch_size: int = _EVAL_CHUNK) -> tuple[float, float | None]:
    """Test loss and test error of ``model`` on the task's whole test set.

    Returns:
        ``(test_loss, test_error)``: mean loss per example, and the fraction misclassified
        (None for regression tasks). ``batch_size`` only bounds the memory of a forward pass.
    """
    return _mean_loss_and_error(task, model, task.x_test, task.y_test, batch_size)


def train_loss(task: Task, model: nn.Module, *, size: int = _TRAIN_SUBSET_SIZE) -> float:
    """Mean loss per example on the fixed training subset of :class:`Probe` of ``size`` examples."""
    return Probe(task, size, test_examples=0).train_loss(model)
