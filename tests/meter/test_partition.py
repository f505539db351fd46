"""Which parameters the meter measures: a tied tensor counted once, never in two groups (issue 13 #2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisescale import GradientNoiseScale
from noisescale.errors import ParameterGroupError
from noisescale.experiments.transformer import CharTransformer
from noisescale.meter import default_groups, layernorm_groups
from noisescale.meter.partition import measured_groups, partition


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight, tied through the module (the README's way)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4, dtype=torch.float64)
        self.mid = nn.Linear(4, 4, dtype=torch.float64)
        self.head = nn.Linear(4, 7, bias=False, dtype=torch.float64)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


def _tied_groups(model: TiedLM) -> dict[str, list[nn.Parameter]]:
    return {
        "embedding": [model.emb.weight],
        "body": list(model.mid.parameters()),
        "head": [model.head.weight],
    }


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_a_tensor_in_two_groups_is_refused_by_both_methods(method: str) -> None:
    """Before: microbatch counted the tied weight twice (|G|^2 doubled), per_example raised a bare
    ValueError from its hooks. Now both refuse, naming the parameter and both groups."""
    model = TiedLM()
    with pytest.raises(ParameterGroupError, match=r"emb\.weight = head\.weight.*'embedding' and 'head'"):
        GradientNoiseScale(model, method=method, groups=_tied_groups(model))  # type: ignore[arg-type]


def test_the_refusal_is_a_value_error_that_says_the_fix() -> None:
    model = TiedLM()
    with pytest.raises(ValueError, match="List it in one group only"):
        measured_groups(_tied_groups(model), model)


def test_a_tensor_listed_twice_in_one_group_counts_once() -> None:
    """A group is a set of tensors: the tied weight named twice in one group is measured once,
    exactly as when it is named once (same numbers, both methods)."""
    model = TiedLM()
    once = measured_groups({"all": list(model.parameters())}, model)
    twice = measured_groups({"all": [*model.parameters(), model.head.weight]}, model)
    assert [id(p) for p in twice["all"]] == [id(p) for p in once["all"]]


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_tied_weights_count_once_by_default(method: str) -> None:
    """The default groups list a tied tensor under its first owner only; |G|^2 of the total equals
    the sum over the groups (nothing counted twice)."""
    model = TiedLM()
    assert "head" not in default_groups(model)
    meter = GradientNoiseScale(model, method=method, ema_decay=1.0)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for tokens in torch.randint(0, 7, (2, 6, 3), generator=gen):
            logits = model(tokens)
            (
                nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="sum") / 2
            ).backward()
        meter.update(12)
        model.zero_grad()
    est = meter.compute()
    assert est.grad_norm_sq == pytest.approx(sum(g.grad_norm_sq for g in est.groups.values()), rel=1e-12)


def test_no_trainable_parameter_is_refused() -> None:
    model = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ParameterGroupError, match="requires_grad"):
        measured_groups(default_groups(model) or {"model": list(model.parameters())}, model)


def test_series_are_groups_then_optimizer_groups_then_total() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.SGD(
        [
            {"params": [model[0].weight, model[1].weight], "name": "w"},
            {"params": [model[0].bias, model[1].bias]},
        ]
    )
    part = partition(default_groups(model), opt)
    assert part.group_names == ["0", "1"] and part.param_group_names == ["w", "param_group_1"]
    assert part.series.shape == (2 + 2 + 1, len(part.cells))
    assert part.series[-1].tolist() == [1.0] * len(part.cells)
    assert (part.series[:2].sum(0) == 1).all() and (part.series[2:4].sum(0) == 1).all()


@pytest.mark.parametrize("method", ["per_example", "microbatch"])
def test_layernorm_only_mode_hooks_the_layernorms_alone(method: str) -> None:
    """``groups=layernorm_groups(model)``: no other layer or tensor gets a hook, and the estimate is
    exactly the LayerNorm groups' share of a meter over every parameter (their mediant)."""

    def model_and_meter(cheap: bool) -> tuple[nn.Module, GradientNoiseScale]:
        torch.manual_seed(0)
        model = CharTransformer(vocabulary=9, context=5, width=8, depth=2, heads=2).double()
        groups = layernorm_groups(model) if cheap else None
        return model, GradientNoiseScale(model, method=method, groups=groups, ema_decay=1.0)

    model, meter = model_and_meter(cheap=True)
    assert list(meter.group_names) == [
        "blocks.0.ln_1",
        "blocks.0.ln_2",
        "blocks.1.ln_1",
        "blocks.1.ln_2",
        "ln_f",
    ]
    for name, module in model.named_modules():
        hooked = bool(module._forward_hooks or module._forward_pre_hooks)
        assert hooked == (method == "per_example" and isinstance(module, nn.LayerNorm)), name
    for name, p in model.named_parameters():
        assert bool(p._backward_hooks) == (".ln_" in name or name.startswith("ln_f")), name

    full_model, full = model_and_meter(cheap=False)
    ids = torch.randint(9, (6, 5), generator=torch.Generator().manual_seed(1))
    for m, mtr in ((model, meter), (full_model, full)):
        for part in ids.chunk(2):
            (m(part).logsumexp(-1).mean() / 2).backward()
        mtr.update(6)
    cheap, every = meter.compute(), full.compute()
    norms = [every.groups[name] for name in meter.group_names]
    assert cheap.trace_sigma == pytest.approx(sum(g.trace_sigma for g in norms), rel=1e-12)
    assert cheap.grad_norm_sq == pytest.approx(sum(g.grad_norm_sq for g in norms), rel=1e-12)


def test_layernorm_only_mode_needs_a_layernorm() -> None:
    with pytest.raises(ParameterGroupError, match=r"no nn\.LayerNorm or nn\.RMSNorm"):
        layernorm_groups(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2, elementwise_affine=False)))
