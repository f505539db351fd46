"""Every kernel against a per-example autograd loop in float64 (BackPACK-style case list).

Each case builds a float64 model and a function giving its per-example losses
``[N]`` (reduction='none'); the batch loss is their mean. PerExampleNorms must give,
per parameter group, the squared norm of ``grad(loss_n) / N``; under a fixed diagonal
preconditioner ``P`` also its weighted squared norm ``sum_j P_j (grad(loss_n) / N)_j^2``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn

from noisescale.per_example import PerExampleNorms, conv, embedding, find_kernel, kernel, linear
from noisescale.preconditioner import Preconditioner
from tests.per_example.conftest import assert_norms_match, per_example_loss_reference, random_weights

F64 = torch.float64
N = 4  # examples

# torch's own forward of conv2d-same-even-kernel warns that it pads a copy of the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

Forward = Callable[[nn.Module], Tensor]  # model -> per-example losses [N]


class Case(NamedTuple):
    id: str
    build: Callable[[], tuple[nn.Module, Forward]]
    groups: Callable[[nn.Module], list[list[nn.Parameter]]] = lambda m: [
        [p]
        for p in m.parameters()
        if p.requires_grad  # one group per parameter: the strictest check
    ]


def pel(out: Tensor) -> Tensor:
    """A per-example loss ``[N]`` with non-trivial gradients everywhere."""
    return 0.5 * (out - 0.3).square().flatten(1).sum(1) + out.sin().flatten(1).sum(1)


def on(x: Tensor) -> Forward:
    return lambda model: pel(model(x))


def seq(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers).to(F64)


def randn(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=F64)


def tokens(vocab: int, *shape: int, pad: int | None = None) -> Tensor:
    idx = torch.randint(0, vocab, shape)
    if pad is not None:
        idx.view(-1)[::3] = pad  # padding positions in every example
    return idx


class TinyTransformer(nn.Module):
    """Embedding -> LayerNorm -> MLP over [N, T, D] with residual -> LayerNorm -> head."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        h = h + self.down(torch.nn.functional.gelu(self.up(self.ln1(h))))
        return self.head(self.ln2(h))


class TiedLM(TinyTransformer):
    """TinyTransformer whose output layer reuses the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight


def lm_loss(model: nn.Module, idx: Tensor) -> Tensor:
    """Per-example next-token cross-entropy summed over positions, ``[N]``."""
    logits = model(idx[:, :-1])
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")
    return ce.sum(1)


# [N, 6] indices with runs of equal values and padding index 1 in every example.
REPEATS = torch.tensor([[1, 2, 2, 3, 1, 2], [0, 0, 1, 3, 3, 3], [2, 1, 2, 2, 0, 1], [3, 3, 3, 3, 1, 0]])


def frozen_mlp() -> tuple[nn.Module, Forward]:
    model = seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # frozen weight, trainable bias
    model[2].requires_grad_(False)  # fully frozen layer in the middle
    return model, on(randn(N, 5))


def called_twice() -> tuple[nn.Module, Forward]:
    shared, head = nn.Linear(4, 4).to(F64), nn.Linear(4, 2).to(F64)
    model = nn.ModuleDict({"shared": shared, "head": head})
    x = randn(N, 3, 4)
    return model, lambda m: pel(m["head"](torch.tanh(m["shared"](torch.tanh(m["shared"](x))))))


def two_forwards() -> tuple[nn.Module, Forward]:
    model = seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x1, x2 = randn(N, 5), randn(N, 5)
    return model, lambda m: pel(m(x1)) + 2.0 * pel(m(x2))  # example n is the pair (x1[n], x2[n])


def conv_called_twice() -> tuple[nn.Module, Forward]:
    model = nn.ModuleDict({"conv": nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")}).to(F64)
    x = randn(N, 2, 5, 5)
    return model, lambda m: pel(m["conv"](torch.tanh(m["conv"](x))))


def mixed_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    first, last = model[0], model[2]
    return [[first.weight, last.bias], [first.bias], [last.weight]]


CASES = [
    Case("linear-2d", lambda: (seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), on(randn(N, 5)))),
    Case("linear-no-bias", lambda: (seq(nn.Linear(5, 3, bias=False)), on(randn(N, 5)))),
    # T^2 (O + F + 1) = 44 < (T + 1) O F = 72: Gram route.
    Case("linear-seq-gram", lambda: (seq(nn.Linear(6, 4)), on(randn(N, 2, 6)))),
    # T^2 (O + F + 1) = 216 > (T + 1) O F = 42: materialising route.
    Case("linear-seq-materialise", lambda: (seq(nn.Linear(3, 2)), on(randn(N, 6, 3)))),
    Case("linear-4d-input", lambda: (seq(nn.Linear(3, 5)), on(randn(N, 2, 3, 3)))),
    Case("conv1d", lambda: (seq(nn.Conv1d(3, 4, 3, stride=2, padding=1)), on(randn(N, 3, 9)))),
    Case(
        "conv1d-circular",
        lambda: (seq(nn.Conv1d(3, 2, 2, padding=1, padding_mode="circular")), on(randn(N, 3, 7))),
    ),
    Case(
        "conv2d-stride2-pad1-dil2",
        lambda: (seq(nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2)), on(randn(N, 3, 9, 9))),
    ),
    Case(
        "conv2d-groups2-same-reflect",
        lambda: (
            seq(nn.Conv2d(4, 6, 3, groups=2, padding="same", padding_mode="reflect")),
            on(randn(N, 4, 5, 5)),
        ),
    ),
    # T = 4 output positions, T^2 (O + F + 1) = 1296 < (T + 1) O F = 2880: the Gram route inside a conv.
    Case("conv2d-gram", lambda: (seq(nn.Conv2d(8, 8, 3)), on(randn(N, 8, 4, 4)))),
    Case(
        "conv1d-groups3-dil2-replicate",
        lambda: (
            seq(nn.Conv1d(6, 9, 3, groups=3, dilation=2, padding=2, padding_mode="replicate")),
            on(randn(N, 6, 8)),
        ),
    ),
    # (10 - 2) / 3 is not whole: the last input position is never seen.
    Case("conv1d-stride3-valid", lambda: (seq(nn.Conv1d(2, 3, 2, stride=3)), on(randn(N, 2, 10)))),
    # An even kernel with padding="same" pads one side more than the other.
    Case(
        "conv2d-same-even-kernel",
        lambda: (seq(nn.Conv2d(3, 4, (2, 4), padding="same")), on(randn(N, 3, 5, 6))),
    ),
    Case(
        "conv2d-depthwise-stride-dilation-no-bias",
        lambda: (
            seq(nn.Conv2d(4, 8, 3, stride=(2, 3), dilation=(1, 2), groups=4, bias=False)),
            on(randn(N, 4, 10, 11)),
        ),
    ),
    Case(
        "conv2d-replicate-tuple-padding",
        lambda: (
            seq(nn.Conv2d(2, 3, (3, 2), padding=(2, 1), padding_mode="replicate")),
            on(randn(N, 2, 4, 5)),
        ),
    ),
    # Unpadded inputs are read in place: a permuted (channels-last) input and one at a storage offset.
    Case(
        "conv2d-channels-last-input",
        lambda: (seq(nn.Conv2d(3, 2, 2)), on(randn(N, 5, 6, 3).permute(0, 3, 1, 2))),
    ),
    Case("conv2d-offset-input", lambda: (seq(nn.Conv2d(3, 2, 2, stride=2)), on(randn(N + 1, 3, 5, 5)[1:]))),
    Case("conv-called-twice", conv_called_twice),
    Case("embedding-indices-n", lambda: (seq(nn.Embedding(7, 3), nn.Linear(3, 2)), on(tokens(7, N)))),
    Case(
        "embedding-indices-nt-padding",
        lambda: (seq(nn.Embedding(5, 3, padding_idx=1)), on(tokens(5, N, 6, pad=1))),
    ),
    Case(
        "embedding-scale-grad-by-freq",
        lambda: (seq(nn.Embedding(5, 3, scale_grad_by_freq=True)), on(tokens(5, N, 6))),
    ),
    # V = 20 > T = 6 (sorted runs), repeated indices in every example.
    Case("embedding-runs-padding", lambda: (seq(nn.Embedding(20, 3, padding_idx=1)), on(REPEATS))),
    Case(
        "embedding-runs-scale-grad-by-freq",
        lambda: (seq(nn.Embedding(20, 3, scale_grad_by_freq=True)), on(tokens(4, N, 6))),
    ),
    Case("embedding-indices-n-a-b", lambda: (seq(nn.Embedding(6, 3)), on(tokens(6, N, 2, 3)))),
    Case("layernorm-1d", lambda: (seq(nn.Linear(6, 6), nn.LayerNorm(6)), on(randn(N, 3, 6)))),
    Case("layernorm-2d-shape", lambda: (seq(nn.LayerNorm((3, 4))), on(randn(N, 2, 3, 4)))),
    Case("layernorm-no-bias", lambda: (seq(nn.LayerNorm(5, bias=False)), on(randn(N, 5)))),
    Case("rmsnorm", lambda: (seq(nn.RMSNorm((2, 3))), on(randn(N, 4, 2, 3)))),
    Case("groupnorm", lambda: (seq(nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4)), on(randn(N, 2, 4, 4)))),
    Case("transformer-block", lambda: (TinyTransformer().to(F64), lambda m: lm_loss(m, tokens(11, N, 6)))),
    Case("frozen-layers", frozen_mlp),
    Case("tied-embedding-head", lambda: (TiedLM().to(F64), lambda m: lm_loss(m, tokens(11, N, 6)))),
    Case("module-called-twice", called_twice),
    Case("two-forwards-one-backward", two_forwards),
    Case(
        "several-groups",
        lambda: (seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), on(randn(N, 5))),
        groups=mixed_groups,
    ),
]


def run_case(
    case: Case, *, precondition: bool = False
) -> tuple[Tensor | None, Tensor, list[list[nn.Parameter]], dict[Tensor, Tensor] | None]:
    """Backward the mean loss with PerExampleNorms attached; return (pop(), losses, groups, weights)."""
    torch.manual_seed(0)
    model, forward = case.build()
    groups = case.groups(model)
    weights = random_weights(groups) if precondition else None
    pre = None if weights is None else Preconditioner(list(weights), weights)
    pe = PerExampleNorms(model, groups, preconditioner=pre)
    losses = forward(model)
    losses.mean().backward(retain_graph=True)
    got = pe.pop()
    pe.remove()
    return got, losses, groups, weights


def check_pairs(got: Tensor | None, losses: Tensor, groups: list[list[nn.Parameter]], weights: Any) -> None:
    """``[N, 2 G]``: the plain norms, then the weighted ones, each against the autograd loop."""
    plain = per_example_loss_reference(losses, groups)
    assert_norms_match(
        got, torch.cat([plain, per_example_loss_reference(losses, groups, weights=weights)], 1)
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_preconditioned_norms_match_per_example_autograd(case: Case) -> None:
    """Every kernel's weighted norms (cheap forms, materialised chunks, shared parameters), plain ones too."""
    check_pairs(*run_case(case, precondition=True))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_per_example_autograd(
    case: Case, per_example_reference: Callable, check_norms: Callable
) -> None:
    got, losses, groups, _ = run_case(case)
    expected = per_example_reference(losses, groups)
    assert bool((expected > 0).all()), "every group should get a gradient from every example"
    check_norms(got, expected)


SEQUENCE_CASES = [c for c in CASES if c.id.startswith(("linear-seq", "linear-4d", "conv", "transformer"))]


@pytest.mark.parametrize("rows", [None, 1, 3], ids=["default-chunks", "1-row-chunks", "3-row-chunks"])
@pytest.mark.parametrize("gram", [True, False], ids=["gram", "materialise"])
@pytest.mark.parametrize("case", SEQUENCE_CASES, ids=[c.id for c in SEQUENCE_CASES])
def test_sequence_routes_and_chunks_are_exact(
    case: Case,
    gram: bool,
    rows: int | None,
    monkeypatch: pytest.MonkeyPatch,
    per_example_reference: Callable,
    check_norms: Callable,
) -> None:
    """Either sequence route, on the whole batch or in chunks of examples (N = 4 = 3 + 1)."""
    monkeypatch.setattr(linear, "use_gram", lambda t, o, f: gram)
    if rows is not None:
        for module in (linear, conv):
            monkeypatch.setattr(module, "chunk_rows", lambda per_row: rows)
    got, losses, groups, _ = run_case(case)
    check_norms(got, per_example_reference(losses, groups))


@pytest.mark.parametrize("rows", [1, 3], ids=["1-row-chunks", "3-row-chunks"])
@pytest.mark.parametrize("case", SEQUENCE_CASES, ids=[c.id for c in SEQUENCE_CASES])
def test_preconditioned_chunks_are_exact(case: Case, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weighted norms of sequences and convolutions in chunks of examples (N = 4 = 3 + 1)."""
    for module in (linear, conv, kernel):
        monkeypatch.setattr(module, "chunk_rows", lambda per_row: rows)
    check_pairs(*run_case(case, precondition=True))


EMBEDDING_CASES = [c for c in CASES if c.id.startswith(("embedding", "transformer"))]


@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "preconditioned"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sorted-runs"])
@pytest.mark.parametrize("case", EMBEDDING_CASES, ids=[c.id for c in EMBEDDING_CASES])
def test_both_embedding_routes_are_exact(
    case: Case,
    dense: bool,
    precondition: bool,
    monkeypatch: pytest.MonkeyPatch,
    per_example_reference: Callable,
    check_norms: Callable,
) -> None:
    monkeypatch.setattr(embedding, "use_dense", lambda v, t: dense)
    got, losses, groups, weights = run_case(case, precondition=precondition)
    if precondition:
        check_pairs(got, losses, groups, weights)
    else:
        check_norms(got, per_example_reference(losses, groups))


def test_route_choices_count_the_work() -> None:
    """The cases above exercise the routes their comments claim; the benchmark transformer's
    layers (T = 128, D = 128) materialise, long rows of few positions take the Gram route."""
    assert linear.use_gram(2, 4, 6)
    assert not linear.use_gram(6, 2, 3)
    assert linear.use_gram(4, 8, 72)
    assert not any(linear.use_gram(128, o, f) for o, f in [(384, 128), (128, 128), (512, 128), (128, 512)])
    assert linear.use_gram(16, 1024, 1024)
    assert embedding.use_dense(5, 6)
    assert not embedding.use_dense(20, 6)


def test_chunk_rows_follow_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 100)
    assert kernel.chunk_rows(30) == 3
    assert kernel.chunk_rows(101) == 1
    assert kernel.chunk_rows(0) == 100


@pytest.mark.parametrize(
    "layer", [nn.LayerNorm(6), nn.RMSNorm(6), nn.GroupNorm(2, 6)], ids=["layernorm", "rmsnorm", "groupnorm"]
)
def test_norm_kernels_leave_their_inputs_alone(layer: nn.Module) -> None:
    """The normalized input is formed and multiplied in place: never the layer input or gradient."""
    x, go = randn(N, 6, 6), randn(N, 6, 6)
    x0, go0 = x.clone(), go.clone()
    kernel_ = find_kernel(layer)
    assert kernel_ is not None
    kernel_.norms(layer.to(F64), x, go, kernel_.params)
    assert torch.equal(x, x0)
    assert torch.equal(go, go0)


def test_frozen_parameters_in_groups_are_ignored(
    per_example_reference: Callable, check_norms: Callable
) -> None:
    """Passing frozen parameters in `groups` leaves their group at zero and the rest exact."""
    case = Case(
        "frozen-in-groups", frozen_mlp, groups=lambda m: [list(m[0].parameters()), list(m[2].parameters())]
    )
    got, losses, groups, _ = run_case(case)
    expected = per_example_reference(losses, groups)
    assert got is not None
    assert bool((got[:, 1] == 0).all())
    check_norms(got[:, :1], expected[:, :1])


def test_sum_reduction_gives_unscaled_norms(per_example_reference: Callable, check_norms: Callable) -> None:
    """With loss.sum() the norms are |g_n|^2 (the lead rescales mean-loss norms by N^2)."""
    torch.manual_seed(0)
    model = seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    groups = [list(model.parameters())]
    pe = PerExampleNorms(model, groups)
    losses = pel(model(randn(N, 5)))
    losses.sum().backward(retain_graph=True)
    got = pe.pop()
    check_norms(got, per_example_reference(losses, groups, reduction="sum"))


def test_a_forward_without_backward_keeps_results_exact(
    per_example_reference: Callable, check_norms: Callable
) -> None:
    """An extra grad-enabled forward (never backpropagated) only moves the next backward to the
    materialising path."""
    torch.manual_seed(0)
    model = seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    groups = [[p] for p in model.parameters()]
    pe = PerExampleNorms(model, groups)
    model(randn(N, 5))  # e.g. a logging forward without torch.no_grad()
    losses = pel(model(randn(N, 5)))
    losses.mean().backward(retain_graph=True)
    got = pe.pop()
    check_norms(got, per_example_reference(losses, groups))


def test_activation_checkpointing(per_example_reference: Callable, check_norms: Callable) -> None:
    """Non-reentrant checkpointing reruns the forward (and its hooks) inside backward: still exact."""
    torch.manual_seed(0)
    model = seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    groups = [[p] for p in model.parameters()]
    pe = PerExampleNorms(model, groups)
    x = randn(N, 5)
    losses = pel(torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False))
    losses.mean().backward(retain_graph=True)
    got = pe.pop()
    pe.remove()
    check_norms(got, per_example_reference(losses, groups))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_backward(per_example_reference: Callable, check_norms: Callable) -> None:
    """A double-backward pass (create_graph=True, e.g. a gradient penalty) gives the same norms,
    which carry no graph; torch.autograd.grad, which never reaches .grad, gives none (the
    kernels do no work for an evaluation probe or a penalty)."""
    torch.manual_seed(0)
    model = seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    groups = [[p] for p in model.parameters()]
    pe = PerExampleNorms(model, groups)
    losses = pel(model(randn(N, 5)))
    torch.autograd.grad(losses.mean(), list(model.parameters()), create_graph=True, retain_graph=True)
    assert pe.pop() is None
    losses.mean().backward(create_graph=True)
    got = pe.pop()
    pe.remove()
    model.zero_grad(set_to_none=True)  # .grad holds a graph through the parameters
    assert got is not None
    assert not got.requires_grad
    check_norms(got, per_example_reference(losses, groups))
