"""FLOPs per example against hand counts: 2 FLOPs per multiply-add, forward + backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisescale.flops import flops_per_example


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def test_mlp_matches_the_hand_count() -> None:
    """The MNIST MLP: forward 2n per weight; backward 4n (input and weight gradients), 2n for layer 1.

    Biases, ReLU and the loss are element-wise: not counted.
    """
    x, y = torch.randn(64, 784), torch.randint(10, (64,))
    n = [784 * 256, 256 * 256, 256 * 10]
    hand = 2 * sum(n) + 2 * n[0] + 4 * (n[1] + n[2])
    assert hand == 1_211_392
    assert flops_per_example(mlp(), nn.functional.cross_entropy, x, y) == hand
    # In tokens: the same batch counted as 64 x 8 units costs an eighth per unit.
    assert flops_per_example(mlp(), nn.functional.cross_entropy, x, y, examples=512) == hand / 8


def test_frozen_layers_cost_only_their_forward_and_what_flows_through_them() -> None:
    model = mlp()
    model[0].requires_grad_(False)  # no weight gradient, and layer 2's input needs no gradient either
    n = [784 * 256, 256 * 256, 256 * 10]
    hand = 2 * sum(n) + 2 * n[1] + 4 * n[2]
    x, y = torch.randn(16, 784), torch.randint(10, (16,))
    assert flops_per_example(model, nn.functional.cross_entropy, x, y) == hand


def test_conv_net_matches_the_hand_count() -> None:
    """The Fashion-MNIST CNN: a k x k convolution costs 2 k^2 C_in C_out per output pixel."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )  # fmt: skip
    conv1 = 2 * 28 * 28 * 8 * 1 * 25
    conv2 = 2 * 14 * 14 * 16 * 8 * 25
    linear = 2 * 784 * 10
    hand = 2 * conv1 + 3 * conv2 + 3 * linear  # conv1 has no input gradient
    x, y = torch.randn(4, 1, 28, 28), torch.randint(10, (4,))
    assert flops_per_example(model, nn.functional.cross_entropy, x, y) == hand == 4_437_440


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (nn.Linear(3, 2).requires_grad_(False), {}, "no parameter that requires grad"),
        (nn.Linear(3, 2), {"examples": 0}, "`examples` > 0 but got 0"),
        (nn.Linear(3, 2), {"loss_fn": nn.MSELoss(reduction="none")}, "must return a scalar"),
    ],
    ids=["frozen", "zero_examples", "per_example_loss"],
)
def test_bad_input_gets_a_clear_error(model: nn.Module, kwargs: dict, match: str) -> None:
    loss_fn = kwargs.pop("loss_fn", nn.functional.mse_loss)
    with pytest.raises(ValueError, match=match):
        flops_per_example(model, loss_fn, torch.randn(4, 3), torch.randn(4, 2), **kwargs)
