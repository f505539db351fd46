"""Bad input gets a clear error or "not resolved", never a wrong number (meter and CLI)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from noisescale import GradientNoiseScale, UnsupportedLayerError
from noisescale.cli.app import app

runner = CliRunner()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))


def accumulate(model: nn.Module, k: int = 2, n: int = 8, factor: float = 1.0) -> None:
    for _ in range(k):
        (factor * model(torch.randn(n, 5)).square().mean() / k).backward()


def assert_not_resolved(est: object) -> None:
    assert est.b_simple is None and est.b_simple_ci is None and not est.resolved  # type: ignore[attr-defined]


# -- the meter ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_compute_before_any_update_is_not_resolved(method: str) -> None:
    est = GradientNoiseScale(mlp(), method=method).compute()  # type: ignore[arg-type]
    assert_not_resolved(est)
    assert est.steps == 0 and est.examples == 0 and est.n_eff == 0.0


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_every_step_non_finite_is_skipped_and_not_resolved(method: str) -> None:
    model = mlp()
    meter = GradientNoiseScale(model, method=method)  # type: ignore[arg-type]
    for _ in range(4):
        accumulate(model, factor=float("nan"))
        meter.update(16)
        model.zero_grad()
    est = meter.compute()
    assert_not_resolved(est)
    assert est.steps == 4 and est.skipped_steps == 4


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_update_after_zero_grad_raises(method: str) -> None:
    model = mlp()
    meter = GradientNoiseScale(model, method=method)  # type: ignore[arg-type]
    accumulate(model)
    model.zero_grad()
    with pytest.raises(RuntimeError, match=r"before optimizer\.zero_grad"):
        meter.update(16)


def test_update_twice_after_one_step_raises() -> None:
    model = mlp()
    meter = GradientNoiseScale(model, method="microbatch")
    accumulate(model)
    meter.update(16)
    with pytest.raises(RuntimeError, match="no backward pass"):
        meter.update(16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"confidence": 1.5}, "confidence"),
        ({"confidence": float("nan")}, "confidence"),
        ({"ema_decay": 2.0}, "ema_decay"),
        ({"ema_decay": float("nan")}, "ema_decay"),
        ({"ema_examples": 0.0}, "ema_examples"),
        ({"accumulation": "none"}, "accumulation"),
        ({"read_grad": "never"}, "read_grad"),
        ({"sync_every": 0}, "sync_every"),
        ({"sync_every": 2.5}, "sync_every"),
    ],
)
def test_bad_constructor_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradientNoiseScale(mlp(), method="microbatch", **kwargs)


def test_sync_in_one_process_folds_in_and_changes_nothing() -> None:
    """sync() is a collective only under DDP; in one process it folds in the pending steps."""
    model = mlp()
    meter = GradientNoiseScale(model, method="microbatch", sync_every=1)
    for step in range(3):
        accumulate(model)
        meter.update(16)
        model.zero_grad()
        if step == 1:
            meter.sync()
    synced = meter.compute()
    assert synced.steps == 3 and synced.examples == 48
    meter.sync()
    assert meter.compute() == synced


def test_no_trainable_parameters() -> None:
    with pytest.raises(ValueError, match="requires_grad"):
        GradientNoiseScale(nn.Sequential(nn.ReLU()), method="per_example")


def test_microbatch_sizes_of_the_wrong_length() -> None:
    model = mlp()
    meter = GradientNoiseScale(model, method="microbatch")
    accumulate(model)
    with pytest.raises(ValueError, match="3 microbatch_sizes for 2 backward passes"):
        meter.update(microbatch_sizes=[8, 8, 8])


class OwnParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@pytest.mark.parametrize(
    ("layer", "name"),
    [(OwnParameter(), "OwnParameter"), (nn.PReLU(5), "PReLU"), (nn.BatchNorm1d(5), "BatchNorm1d")],
)
def test_per_example_names_the_unsupported_layer(layer: nn.Module, name: str) -> None:
    model = nn.Sequential(nn.Linear(5, 5), layer, nn.Linear(5, 1))
    with pytest.raises(UnsupportedLayerError, match=f"'1' \\({name}\\)"):
        GradientNoiseScale(model, method="per_example")


class Regroup(nn.Module):
    """The second layer sees 2N rows: dim 0 is no longer the example index."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).reshape(-1, 3))


def test_per_example_layers_seeing_different_batch_dims_raise() -> None:
    model = Regroup()
    GradientNoiseScale(model, method="per_example")
    with pytest.raises(RuntimeError, match=r"'a' \(Linear\) saw 8 examples .* 'b' \(Linear\) saw 16"):
        model(torch.randn(8, 6)).square().mean().backward()  # raised by the hooks, before update()


def test_load_state_dict_of_another_model_raises() -> None:
    saved = GradientNoiseScale(nn.Linear(5, 1), method="microbatch").state_dict()
    with pytest.raises(ValueError, match="group_names"):
        GradientNoiseScale(mlp(), method="microbatch").load_state_dict(saved)


# -- the CLI ------------------------------------------------------------------------------------
def one_line_error(args: list[str], match: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], result.stderr


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--batch-size", "0"], "batch_size"),
        (["--steps", "0"], "--steps"),
        (["--lr", "-1"], "lr"),
        (["--batch-size", "1"], "at least 2 examples"),
        (["--method", "microbatch", "--microbatches", "1"], "at least 2 micro-batches"),
        (["--method", "microbatch", "--batch-size", "128", "--microbatches", "3"], "not divisible by 3"),
    ],
)
def test_measure_bad_options(tmp_path: Path, args: list[str], match: str) -> None:
    base = ["measure", "--task", "linreg", "--threads", "1", "--no-progress", "--out", str(tmp_path / "o")]
    one_line_error([*base, *args], match)
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("batch_size,steps\n16,100\n", "at least 3"),
        ("batch_size,steps\n16,100\n32,x\n64,20\n", "line 3: column `steps` ('x') is not a number"),
        ("batch_size,steps\n16,100\n32,-60\n64,20\n", "line 3: column `steps` must be positive"),
        ("batch_size,steps\n16,100\n32,0\n64,20\n", "line 3: column `steps` must be positive"),
        ("batch_size,steps\n16,100\n32,nan\n64,20\n128,15\n", "is not finite"),
        ("batch_size,steps\n16,100\n16,100\n16,100\n", "appears on lines 2, 3, 4"),
        ("batch_size,steps\n16,100\n32,200\n64,400\n128,800\n", "steps increase with batch size"),
    ],
)
def test_fit_bad_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "sweep.csv"
    path.write_text(text)
    one_line_error(["fit", str(path), "--no-plots"], match)


def test_fit_missing_file(tmp_path: Path) -> None:
    one_line_error(["fit", str(tmp_path / "missing.csv"), "--no-plots"], "no such file")


def test_fit_jsonl_overflowing_number(tmp_path: Path) -> None:
    path = tmp_path / "sweep.jsonl"
    path.write_text('{"batch_size": 16, "steps": 10}\n{"batch_size": 32, "steps": 1e400}\n')
    one_line_error(["fit", str(path), "--no-plots"], "line 2: column `steps` ('inf') is not finite")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ([], "give --b-crit"),
        (["--b-crit", "-5"], "--b-crit must be positive"),
        (["--b-crit", "nan"], "--b-crit must be positive"),
        (["--b-crit", "100", "--s-min", "-3"], "--s-min must be positive"),
        (["--b-crit", "100", "--batch-size", "0"], "batch_sizes"),
        (["--b-crit", "100", "--exchange-rate", "0"], "exchange_rate"),
        (["--loss", "2", "--b-star", "100"], "give both --b-star and --alpha-b"),
        (["--loss", "-2", "--b-star", "100", "--alpha-b", "0.21"], "--loss must be positive"),
    ],
)
def test_predict_bad_values(args: list[str], match: str) -> None:
    one_line_error(["predict", *args], match)


def test_predict_from_truncated_json(tmp_path: Path) -> None:
    path = tmp_path / "fit.json"
    path.write_text("{\n")
    one_line_error(["predict", "--from", str(path)], "not valid JSON")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--batch-size", "8", "--batch-size", "8", "--batch-size", "16"], "at least 3 batch sizes"),
        (["--lr-step", "1"], "lr_step > 1"),
        (["--min-steps", "100", "--max-steps", "10"], "min_steps <= max_steps"),
        (["--method", "microbatch", "--microbatches", "3"], "multiple of microbatches=3"),
    ],
)
def test_sweep_bad_options_before_training(tmp_path: Path, args: list[str], match: str) -> None:
    out = tmp_path / "sweep"
    one_line_error(["sweep", "--task", "linreg", "--no-progress", "--out", str(out), *args], match)
    assert not (out / "results.csv").exists()


# -- regressions for problems this file's review found -------------------------------------------
def test_float16_gradients_with_large_norms_are_measured() -> None:
    """fp16 squared norms above 65504 used to overflow: now squared in float64."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1).half()
    meter = GradientNoiseScale(model, method="microbatch")
    for _ in range(5):
        for _ in range(2):
            x = (20 * torch.randn(8, 5)).half()
            (model(x).float().square().mean() / 2).backward()
        meter.update(16)
        model.zero_grad()
    est = meter.compute()
    assert est.skipped_steps == 0
    assert math.isfinite(est.grad_norm_sq) and est.grad_norm_sq > 256.0**2


@pytest.mark.parametrize(
    ("batch_size", "sizes"),
    [(-16, None), (0, None), (16, [-8, 24]), (16, [4, 4]), ("16", None)],
    ids=["negative", "zero", "negative-micro", "disagree", "string"],
)
def test_bad_sizes_in_update_raise(batch_size: object, sizes: list[int] | None) -> None:
    model = nn.Linear(5, 1)
    meter = GradientNoiseScale(model, method="microbatch")
    for _ in range(2):
        (model(torch.randn(8, 5)).square().mean() / 2).backward()
    with pytest.raises(ValueError, match=r"batch_size|microbatch_sizes"):
        meter.update(batch_size, microbatch_sizes=sizes)  # type: ignore[arg-type]


def test_parameter_used_outside_its_layer_is_refused_by_per_example() -> None:
    """`F.linear(h, self.b.weight)` bypasses the per-example hooks: an error, never a wrong number."""

    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Linear(5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.b.weight, self.b.bias)

    model = Bypass()
    GradientNoiseScale(model, method="per_example")
    loss = model(torch.randn(8, 5)).square().mean()
    with pytest.raises(UnsupportedLayerError, match=r"'b\.(weight|bias)' .* outside the layer"):
        loss.backward()


def test_unresolved_estimate_has_no_b_simple() -> None:
    """A single step cannot bound B_simple: b_simple, its interval and SE are all None."""
    model = nn.Linear(5, 1)
    meter = GradientNoiseScale(model, method="microbatch")
    for _ in range(2):
        (model(torch.randn(8, 5)).square().mean() / 2).backward()
    meter.update(16)
    est = meter.compute()
    assert not est.resolved
    assert est.b_simple is None and est.b_simple_ci is None and est.b_simple_se is None
