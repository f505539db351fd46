"""The benchmark scripts still run (smallest configurations, seconds), and their MNIST truth is exact.

No timing is asserted: the numbers depend on the machine. BackPACK and Opacus are
optional (the ``bench`` extra), so the smoke runs use only torch-based methods.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_overhead_smallest_run_writes_records(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    run_script(
        "overhead.py",
        "--models", "mlp", "transformer", "shakespeare",
        "--methods", "microbatch", "per_example", "layernorm", "ln_bound", "bookkeeping", "naive",
        "--naive-examples", "2", "--repeats", "1", "--block-s", "0.001", "--threads", "1",
        "--json", str(out),
    )  # fmt: skip
    records = json.loads(out.read_text())["records"]
    got = {(r["model"], r["method"]) for r in records}
    assert ("mlp", "microbatch") in got and ("transformer", "per_example") in got
    assert {("shakespeare", "per_example"), ("shakespeare", "layernorm")} <= got
    statuses = {(r["model"], r["method"]): r["status"] for r in records}
    assert statuses[("shakespeare", "layernorm")] == "ok" and statuses[("mlp", "layernorm")] != "ok"
    assert statuses[("shakespeare", "ln_bound")] == statuses[("shakespeare", "bookkeeping")] == "ok"
    for r in records:
        assert set(r) >= {"ratio_median", "ms_median", "peak_mb", "status"}
        if r["status"] == "ok":
            assert r["ms_median"] > 0 and r["ratio_median"] > 0


@pytest.mark.slow
def test_preconditioned_smallest_run_writes_ratios(tmp_path: Path) -> None:
    out = tmp_path / "preconditioned.json"
    run_script("preconditioned.py", "--models", "mlp", "--rounds", "1", "--steps", "1", "--json", str(out))
    rows = json.loads(out.read_text())["results"]["mlp"]
    assert rows["microbatch+P"]["ratio_median"] > 0 and rows["per_example+P"]["ratio_median"] > 0


@pytest.mark.slow
def test_accuracy_smallest_run_writes_tables(tmp_path: Path) -> None:
    out = tmp_path / "accuracy.json"
    run_script(
        "accuracy.py", "--problems", "oracle", "--repeats", "2", "--max-examples", "1024",
        "--threads", "1", "--json", str(out),
    )  # fmt: skip
    problem = json.loads(out.read_text())["problems"][0]
    assert problem["truth"]["b_simple"] == pytest.approx(7.408)
    assert set(problem["methods"]) == {f"microbatch k={k}" for k in (2, 4, 8, 16)} | {"per_example"}


def test_mnist_truth_matches_brute_force() -> None:
    """The closed-form |G|^2 and tr(Sigma_N) of the accuracy benchmark, against an autograd loop."""
    acc = load_benchmark("accuracy")
    model = acc.mnist_mlp(seed=3)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 784, generator=gen), torch.randint(10, (40,), generator=gen)
    truth = acc.exact_truth(model, x, y, chunk=16)
    model64 = acc.mnist_mlp(seed=3).double()
    params = list(model64.parameters())
    rows = []
    for xi, yi in zip(x.double(), y, strict=True):
        grads = torch.autograd.grad(F.cross_entropy(model64(xi[None]), yi[None]), params)
        rows.append(torch.cat([gr.flatten() for gr in grads]))
    g = torch.stack(rows)  # [N, P] per-example gradients
    mean = g.mean(0)
    assert truth["grad_norm_sq"] == pytest.approx(mean.square().sum().item(), rel=1e-10)
    # population covariance (1/N): batches are drawn with replacement
    assert truth["trace_sigma"] == pytest.approx((g - mean).square().sum(1).mean().item(), rel=1e-10)


@pytest.mark.parametrize("linear", [False, True])
def test_bookkeeping_bound_is_exact(linear: bool) -> None:
    """The overhead bound's layers give autograd's gradients and the per-example kernels' norms."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    install = load_benchmark("bookkeeping").install
    from noisescale.experiments.transformer import CharTransformer, lm_loss
    from noisescale.per_example import PerExampleNorms

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return CharTransformer(vocabulary=7, context=5, width=8, depth=1, heads=2).double()

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(7, (4, 5), generator=gen), torch.randint(7, (4, 5), generator=gen)
    kinds = (torch.nn.LayerNorm, torch.nn.Linear) if linear else (torch.nn.LayerNorm,)
    ref, bound = build(), build()
    params = [p for m in ref.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)]
    kernels = PerExampleNorms(ref, [params])
    lm_loss(ref(x), y).backward()
    sink = install(bound, linear=linear)
    lm_loss(bound(x), y).backward()
    assert len(sink) == sum(isinstance(m, kinds) for m in bound.modules())
    torch.testing.assert_close(torch.stack(sink).sum(0), kernels.pop()[:, 0], rtol=1e-12, atol=0)
    for a, b in zip(ref.parameters(), bound.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-15)


def test_switch_vs_fixed_smallest_run_compares_with_the_sweep(tmp_path: Path) -> None:
    """Switching runs from a tiny digits measurement's checkpoints, against a one-row sweep table."""
    from noisescale.experiments.branch import BranchConfig, run_branched
    from noisescale.experiments.tasks import get_task

    config = BranchConfig.for_task(
        get_task("digits"), batch_size=8, kappas=(1, 2), points=(0, 64), window=128, checks=4,
        replicas=1, max_examples=128, method=None,
    )  # fmt: skip
    run_branched(config, tmp_path / "branch", n_bootstrap=10)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.csv").write_text(
        "metric,goal,batch_size,steps,steps_low,steps_high,reached,run,lr,b_simple,unit\n"
        "train_loss,2.2,16,12.5,12,13,True,16_0.1,0.1,,images\n"
    )
    out = tmp_path / "switch.json"
    run_script(
        "switch_vs_fixed.py", "--branch", str(tmp_path / "branch"), "--sweep", str(sweep), "--goal", "2.2",
        "--points", "64", "--kappas", "1", "2", "--replicas", "2", "--cap", "4096", "--json", str(out),
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["unit"] == "images" and [r["batch_size"] for r in result["rows"]] == [8, 16]
    for row in result["rows"]:
        assert row["sweep_base"] is None  # the table has no run at the base batch 8
        reached = [v for v in row["images_from_init"] if v is not None]
        assert reached and all(v > 64 for v in reached)  # from initialisation: the switch point and after
    assert result["rows"][1]["sweep_fixed"] == 12.5 * 16
