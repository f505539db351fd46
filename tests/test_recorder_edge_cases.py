"""The recorder's hook path under AMP, odd layouts, checkpointing and unusual backward calls.

Every record is checked against gradients computed on a hook-free copy of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from noisescale import GradientNoiseScale
from noisescale.collect import EAGER_NUMEL, GradientRecorder

Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _reference(model: nn.Module, loss: Loss, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[P]`` float64 squared norms of each backward's gradient, on a copy without hooks."""
    twin = copy.deepcopy(model)
    out = []
    for x in xs:
        twin.zero_grad(set_to_none=True)
        loss(twin, x).backward()
        out.append(
            torch.stack(
                [
                    torch.zeros((), dtype=torch.float64) if p.grad is None else p.grad.double().square().sum()
                    for p in twin.parameters()
                ]
            )
        )
    return out


def _records(model: nn.Module, loss: Loss, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[P]`` squared norms the recorder filed for each backward."""
    recorder = GradientRecorder(list(model.parameters()))
    for x in xs:
        loss(model, x).backward()
    sq = recorder.sq_norms(recorder.pop())
    recorder.remove()
    return list(sq)


def _mlp(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """A large first layer (normed in its hook) and a small head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 160), nn.Tanh(), nn.Linear(160, 3)).to(dtype)
    assert model[0].weight.numel() >= EAGER_NUMEL > model[2].weight.numel()
    return model


def _mse(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().square().mean()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_are_normed_without_overflow(dtype: torch.dtype) -> None:
    model = _mlp(dtype)
    xs = 30 * torch.randn(2, 8, 256, dtype=dtype)  # gradient norms above 256: float16 squares overflow
    got = _records(model, _mse, xs)
    assert all(torch.isfinite(g).all() for g in got)
    for g, want in zip(got, _reference(model, _mse, xs), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-3, atol=0.0)


def test_grad_scaler_scale_changes_between_steps() -> None:
    """Each record is divided by the scale in force at its backward, which update() doubles."""
    model = _mlp(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: the reference stays valid
    recorder = GradientRecorder(list(model.parameters()), scaler=scaler)
    xs = torch.randn(3, 2, 8, 256)
    scales, got = [], []
    for step in xs:
        for x in step:
            scaler.scale(_mse(model, x)).backward()
        scales.append(scaler.get_scale())
        scaler.step(optimizer)
        scaler.update()  # after the backward passes: their records keep the scale they ran with
        got += list(recorder.sq_norms(recorder.pop()))
        optimizer.zero_grad()
    assert scales == [16.0, 32.0, 64.0]
    for g, want in zip(got, _reference(model, _mse, xs.flatten(0, 1)), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=0.0)


def test_channels_last_conv_weights_keep_float64_precision() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Tanh(), nn.Conv2d(64, 2, 3)).double()
    for conv in (model[0], model[2]):
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    assert model[0].weight.numel() >= EAGER_NUMEL and not model[0].weight.is_contiguous()
    xs = [
        x.contiguous(memory_format=torch.channels_last)
        for x in torch.randn(2, 2, 64, 7, 7, dtype=torch.float64)
    ]
    for g, want in zip(_records(model, _mse, xs), _reference(model, _mse, xs), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=0.0)


class _Branchy(nn.Module):
    """The trunk runs twice per forward; the side head only on some calls."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(256, 256, dtype=torch.float64)
        self.head = nn.Linear(256, 2, dtype=torch.float64)
        self.side = nn.Linear(256, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(torch.tanh(self.trunk(x))))
        out = self.head(h).square().mean()
        return out + self.side(h).square().mean() if x[0, 0] > 0 else out


def test_unused_and_reused_parameters() -> None:
    torch.manual_seed(0)
    model = _Branchy()
    xs = torch.randn(4, 5, 256, dtype=torch.float64)
    xs[:, 0, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x)

    got = _records(model, loss, xs)
    assert [bool(g[-1] > 0) for g in got] == [True, False, True, False]
    for g, want in zip(got, _reference(model, loss, xs), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=0.0)


def test_autograd_grad_files_no_record_and_a_penalty_is_part_of_the_backward() -> None:
    """torch.autograd.grad never reaches .grad: no record. The penalised loss's backward is one record."""
    model = _mlp()
    xs = torch.randn(2, 8, 256, dtype=torch.float64)

    def penalised(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        loss = _mse(m, x)
        grads = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
        return loss + 0.1 * sum(g.square().sum() for g in grads)

    recorder = GradientRecorder(list(model.parameters()))
    torch.autograd.grad(_mse(model, xs[0]), list(model.parameters()))
    assert recorder.pop() == []
    recorder.remove()
    for g, want in zip(_records(model, penalised, xs), _reference(model, penalised, xs), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=0.0)


def test_backward_with_inputs_records_only_the_parameters_it_fills() -> None:
    """backward(inputs=[...]) fills those parameters' .grad only; autograd.grad of a subset fills nothing."""
    model = _mlp()
    params = list(model.parameters())
    first = params[:2]  # the large first layer: weight (hook-normed) and bias
    recorder = GradientRecorder(params)
    x = torch.randn(8, 256, dtype=torch.float64)
    torch.autograd.grad(_mse(model, x), first)
    _mse(model, x).backward(inputs=first)
    got = recorder.sq_norms(recorder.pop())
    recorder.remove()
    assert all(p.grad is None for p in params[2:])
    want = torch.stack([p.grad.square().sum() for p in first] + [torch.zeros((), dtype=torch.float64)] * 2)
    torch.testing.assert_close(got, want[None], rtol=1e-12, atol=0.0)


def test_retain_graph_backward_twice_files_two_records() -> None:
    model = _mlp()
    x = torch.randn(8, 256, dtype=torch.float64)
    recorder = GradientRecorder(list(model.parameters()))
    loss = _mse(model, x)
    loss.backward(retain_graph=True)
    loss.backward()
    got = list(recorder.sq_norms(recorder.pop()))
    (want,) = _reference(model, _mse, x[None])
    assert len(got) == 2
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-12, atol=0.0)


class _Checkpointed(nn.Module):
    """An embedding-like input layer, a checkpointed block and (optionally) a head."""

    def __init__(self, reentrant: bool, head: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(16, 256, dtype=torch.float64)
        self.block = nn.Sequential(nn.Linear(256, 256, dtype=torch.float64), nn.Tanh())
        self.head = nn.Linear(256, 2, dtype=torch.float64) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.block, torch.tanh(self.inp(x)), use_reentrant=self.reentrant)
        return (h if self.head is None else self.head(h)).square().mean()


@pytest.mark.parametrize("head", [True, False], ids=["head-outside", "block-last"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_one_record_per_backward_call(reentrant: bool, head: bool) -> None:
    torch.manual_seed(0)
    model = _Checkpointed(reentrant, head)
    xs = torch.randn(3, 5, 16, dtype=torch.float64)

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x)

    got = _records(model, loss, xs)
    assert len(got) == 3
    for g, want in zip(got, _reference(model, loss, xs), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=0.0)


def test_reentrant_checkpoint_splitting_a_parameter_raises_at_update() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8, dtype=torch.float64)
    meter = GradientNoiseScale(layer, method="microbatch")
    for x in torch.randn(2, 4, 8, dtype=torch.float64):
        h = checkpoint(layer, layer(x), use_reentrant=True)  # the same weight inside and outside
        h.square().mean().backward()
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        meter.update(batch_size=8)
    layer.zero_grad()
    for x in torch.randn(2, 4, 8, dtype=torch.float64):  # the meter goes on
        layer(x).square().mean().backward()
    meter.update(batch_size=8)
    assert meter.compute().steps == 1


def _backward_that_raises(model: nn.Module, x: torch.Tensor) -> None:
    """A backward of ``_mlp`` that fills the head's gradients, then raises before the first layer."""
    hidden = model[1](model[0](x))
    hidden.register_hook(lambda g: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        model[2](hidden).square().mean().backward()


@pytest.mark.parametrize("backward_after", [False, True], ids=["update-next", "backward-then-update"])
def test_update_after_a_backward_that_raised_says_to_skip_the_step(backward_after: bool) -> None:
    """.grad holds part of the dead backward's gradient, even once another backward has run."""
    model = _mlp()
    meter = GradientNoiseScale(model, method="microbatch")
    x = torch.randn(8, 256, dtype=torch.float64)
    _mse(model, x).backward()
    _backward_that_raises(model, x)
    if backward_after:
        _mse(model, x).backward()
    with pytest.raises(RuntimeError, match="raised before it finished"):
        meter.update(batch_size=16)
    model.zero_grad()
    for xb in torch.randn(2, 8, 256, dtype=torch.float64):
        _mse(model, xb).backward()
    meter.update(batch_size=16)
    assert meter.compute().steps == 1


def test_remove_leaves_no_hooks_and_no_records() -> None:
    model = _mlp()
    meter = GradientNoiseScale(model, method="microbatch")
    meter.remove()
    for p in model.parameters():
        assert not p._backward_hooks and not p._post_accumulate_grad_hooks
    for x in torch.randn(2, 8, 256, dtype=torch.float64):
        _mse(model, x).backward()
    with pytest.raises(RuntimeError, match="no backward pass"):
        meter.update(batch_size=16)


def _run(meters: list[GradientNoiseScale], model: nn.Module, clip: float | None = None) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for x in torch.randn(2, 8, 256, dtype=torch.float64, generator=gen):
            _mse(model, x).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        for meter in meters:
            meter.update(batch_size=16)
        model.zero_grad()


def test_two_meters_on_one_model_agree_with_a_single_one() -> None:
    single = _mlp()
    one = GradientNoiseScale(single, method="microbatch")
    _run([one], single)
    double = _mlp()
    two = [GradientNoiseScale(double, method="microbatch") for _ in range(2)]
    _run(two, double)
    assert two[0].compute() == two[1].compute() == one.compute()


def test_after_backward_snapshot_ignores_clipping_before_update() -> None:
    plain = _mlp()
    reference = GradientNoiseScale(plain, method="microbatch")
    _run([reference], plain)
    clipped = _mlp()
    meter = GradientNoiseScale(clipped, method="microbatch", read_grad="after_backward")
    _run([meter], clipped, clip=1e-3)
    got, want = meter.compute(), reference.compute()
    assert got.grad_norm_sq == pytest.approx(want.grad_norm_sq, rel=1e-9)
    assert got.trace_sigma == pytest.approx(want.trace_sigma, rel=1e-9)


def test_per_example_records_match_per_example_gradients() -> None:
    """One record per backward; each row is that example's contribution, |g_n / N|^2 per layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    twin = copy.deepcopy(model)
    meter = GradientNoiseScale(model, method="per_example")
    xs = torch.randn(2, 4, 6, dtype=torch.float64)
    for x in xs:
        _mse(model, x).backward()
    records = meter._recorder.pop()
    assert len(records) == 2
    for record, x in zip(records, xs, strict=True):
        for n in range(len(x)):
            grads = torch.autograd.grad(twin(x[n : n + 1]).square().mean() / len(x), list(twin.parameters()))
            want = torch.stack([sum(g.square().sum() for g in grads[i : i + 2]) for i in (0, 2)])
            torch.testing.assert_close(record.per_example[n].double(), want, rtol=1e-6, atol=0.0)  # type: ignore[index]


@pytest.mark.parametrize("backward_after", [False, True], ids=["update-next", "backward-then-update"])
def test_per_example_parts_of_a_backward_that_raised_are_dropped(backward_after: bool) -> None:
    """After the update that reports the failed backward, the next step equals a fresh meter's."""
    estimates = []
    for fail_first in (False, True):
        torch.manual_seed(0)
        model = _mlp()
        meter = GradientNoiseScale(model, method="per_example")
        if fail_first:
            x = torch.randn(8, 256, dtype=torch.float64)
            _backward_that_raises(model, x)
            if backward_after:
                _mse(model, x).backward()
            with pytest.raises(RuntimeError, match="raised before it finished"):
                meter.update()
            model.zero_grad()
        _mse(
            model, torch.randn(8, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        ).backward()
        meter.update()
        estimates.append(meter.compute())
    assert estimates[0] == estimates[1]


def _estimate_after(prelude: Callable[[nn.Module], None], method: str) -> tuple[float, float, int]:
    """(|G|^2, tr Sigma, examples) of one clean 2-micro-batch step run after ``prelude(model)``."""
    torch.manual_seed(0)
    model = _mlp()
    meter = GradientNoiseScale(model, method=method, ema_decay=1.0)  # type: ignore[arg-type]
    prelude(model)
    for x in torch.randn(2, 6, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1)):
        (_mse(model, x) / 2).backward()
    meter.update(batch_size=12)
    est = meter.compute()
    return est.grad_norm_sq, est.trace_sigma, est.examples


def _raise_midway(model: nn.Module) -> None:
    """One good micro-batch, then one whose backward raises halfway, then zero_grad()."""
    x = torch.randn(6, 256, dtype=torch.float64)
    (_mse(model, x) / 2).backward()
    _backward_that_raises(model, x)
    model.zero_grad()


def _skip_a_step(model: nn.Module) -> None:
    """A whole step dropped with zero_grad() and no update()."""
    for x in torch.randn(2, 6, 256, dtype=torch.float64):
        (_mse(model, x) / 2).backward()
    model.zero_grad()


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
@pytest.mark.parametrize("prelude", [_raise_midway, _skip_a_step], ids=["raised-midway", "skipped-step"])
def test_zero_grad_without_update_starts_the_step_afresh(
    prelude: Callable[[nn.Module], None], method: str
) -> None:
    """Records made before zero_grad() set every .grad to None are gone from .grad: they must not count."""
    clean = _estimate_after(lambda model: None, method)
    got = _estimate_after(prelude, method)
    assert got[2] == clean[2] == 12
    assert got[:2] == pytest.approx(clean[:2], rel=1e-12)


def test_casting_the_model_after_creating_the_meter() -> None:
    """model.to(dtype) gives parameters new AccumulateGrad nodes; the recorder must still see every one."""
    xs = torch.randn(2, 6, 256, dtype=torch.float64)
    estimates = []
    for cast_first in (True, False):
        torch.manual_seed(0)
        model = _mlp(torch.float32)
        if cast_first:
            model.double()
        meter = GradientNoiseScale(model, method="microbatch", ema_decay=1.0)
        if not cast_first:
            model.double()
        for x in xs:
            (_mse(model, x) / 2).backward()
        meter.update(batch_size=12)
        estimates.append(meter.compute())
    assert estimates[0].grad_norm_sq == estimates[1].grad_norm_sq
    assert estimates[0].trace_sigma == estimates[1].trace_sigma


class _WorkspaceBiasAdd(torch.autograd.Function):
    """``x + b`` whose backward returns ``b``'s gradient in one persistent buffer (fused-kernel style)."""

    workspace = torch.empty(4, dtype=torch.float64)

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x + b

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.sum(g, 0, out=_WorkspaceBiasAdd.workspace)  # overwritten by every backward
        return g, _WorkspaceBiasAdd.workspace


@pytest.mark.parametrize("source", ["workspace", "backward(gradient)"])
def test_gradient_buffers_reused_after_the_backward_keep_their_norms(source: str) -> None:
    """A hook's gradient may be a buffer that is overwritten later: its norm is taken at once."""
    torch.manual_seed(0)
    b = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    recorder = GradientRecorder([b])
    buffer = torch.empty(4, dtype=torch.float64)
    expected = []
    for _ in range(3):
        if source == "workspace":
            w = torch.randn(5, 4, dtype=torch.float64)
            (_WorkspaceBiasAdd.apply(torch.randn(5, 4, dtype=torch.float64), b) * w).sum().backward()
            expected.append(w.sum(0).square().sum())
        else:  # pipeline style: a receive buffer reused by every micro-batch, reaching b unchanged
            buffer.copy_(torch.randn(4, dtype=torch.float64))
            (torch.randn(4, dtype=torch.float64) + b).backward(buffer)
            expected.append(buffer.square().sum())
    buffer.zero_()
    expected.append(b.grad.square().sum())
    got = recorder.sq_norms(recorder.pop(), big=True)[:, 0]
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-12, atol=0.0)


def test_records_hold_no_gradient() -> None:
    """Memory stays flat however many backward passes run before update(): only 0-d norms are kept."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
    recorder = GradientRecorder(list(model.parameters()))
    for _ in range(5):
        model(torch.randn(3, 16)).sum().backward()
    records = recorder.pop()
    assert len(records) == 5
    assert all(v is None or v.dim() == 0 for r in records for v in r.values)  # type: ignore[union-attr]
