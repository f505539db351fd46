"""noisescale.options: the one method parser and the one validated averaging spec."""

import math

import pytest

from noisescale.options import DEFAULT_EMA_DECAY, METHODS, SINGLE_PROCESS_METHODS, Averaging, parse_method


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("per-example", "per_example"),
        ("Per_Example", "per_example"),
        (" microbatch ", "microbatch"),
        ("ddp", "ddp"),
    ],
)
def test_parse_method_accepts_every_spelling(given: str, expected: str) -> None:
    assert parse_method(given) == expected


def test_parse_method_refuses_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'per-example', 'microbatch', 'ddp'.*'vmap'"):
        parse_method("vmap")
    with pytest.raises(ValueError, match="'per-example', 'microbatch' but got 'ddp'"):
        parse_method("ddp", SINGLE_PROCESS_METHODS)
    assert set(SINGLE_PROCESS_METHODS) < set(METHODS)


def test_averaging_default_and_forms() -> None:
    assert Averaging.of() == Averaging(ema_decay=DEFAULT_EMA_DECAY, ema_examples=None)
    assert Averaging.of(ema_decay=0.5).decay(examples=1e6) == 0.5  # per step, whatever the batch
    # In examples: a step of 100 examples with a time constant of 1,000 decays by exp(-0.1).
    assert Averaging.of(ema_examples=1000.0).decay(examples=100) == pytest.approx(math.exp(-0.1), rel=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ema_decay": 0.9, "ema_examples": 10.0}, "exactly one"),
        ({"ema_decay": None, "ema_examples": None}, "exactly one"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"ema_decay": None, "ema_examples": 0.0}, "ema_examples"),
        ({"ema_decay": None, "ema_examples": math.inf}, "ema_examples"),
    ],
)
def test_averaging_refuses_bad_values(kwargs: dict[str, float | None], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Averaging(**kwargs)
