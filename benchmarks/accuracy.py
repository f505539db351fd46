"""How accurate is B_simple after n examples? Relative error and interval coverage against the truth.

Two problems with a known answer, both measured at FIXED parameters (no optimiser
step), so that every step draws fresh i.i.d. examples from the same distribution:

* ``oracle``: the linear-regression oracle of SCIENCE.md (``nn.Linear(5, 1)`` at
  ``w = w* + delta``, Gaussian inputs): ``B_simple = 7.408`` exactly.
* ``mnist``: the MLP 784-1024-10 of ``benchmarks/overhead.py`` after a short seeded
  training run (``--train-steps`` SGD steps at B = 128, lr 0.1). Its true |G|^2 and
  tr(Sigma) over the 60,000 training images are computed exactly from all
  per-example gradients (closed-form per-example norms of the two Linear layers,
  float64, checked against ``torch.func``); batches are drawn WITH replacement, so
  ``E|G_B|^2 = |G|^2 + tr(Sigma_N)/B`` holds exactly.

Each method runs ``GradientNoiseScale(..., ema_decay=1.0)`` (plain mean over steps)
for steps of B = 128 examples: ``microbatch`` with k = 2, 4, 8, 16 backward passes
of 128/k examples, and ``per_example`` with one backward pass. After n examples
(n on a doubling grid) the meter's ``compute()`` gives ``b_simple`` and its 95%
interval. Over ``--repeats`` independent runs we report the median relative error
``|b_simple - truth| / truth``, the relative RMS error, and the coverage (share of runs
whose interval contains the truth; runs whose interval is still unbounded count as
not covering and are also reported as "unresolved").

Advice: the relative RMS error falls as ``c / sqrt(n)``; ``c`` is fitted on the
largest n of the grid, and ``n_10 = (1.96 c / 0.1)^2`` examples give a ±10% estimate
95% of the time.

Usage::

    python benchmarks/accuracy.py --quick
    python benchmarks/accuracy.py --json benchmarks/results/accuracy.json \\
        --markdown benchmarks/results/accuracy.md

References:
    McCandlish et al. (2018), arXiv:1812.06162, eq. (2.9) and appendix A.1.
    Fieller (1954), Some problems in interval estimation, JRSS B 16(2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Sleep at OpenMP barriers: on a shared machine spinning threads stall (see overhead.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import nn

from noisescale import GradientNoiseScale

Batch = tuple[torch.Tensor, torch.Tensor]
BATCH = 128  # examples per optimiser step, every method
KS = (2, 4, 8, 16)
TRUTH_CACHE = Path(__file__).parent / "results" / "mnist_truth.json"
# Per problem: (largest n, runs per cell), full and --quick. MNIST's B_simple is about 100x
# the oracle's, so it needs far more examples; its runs are also 100x dearer.
GRIDS = {"oracle": ((32_768, 100), (4_096, 10)), "mnist": ((131_072, 16), (8_192, 3))}


@dataclass
class Problem:
    """A model at fixed weights, how to draw training examples, and the exact answer."""

    name: str
    label: str
    unit: str
    model: nn.Module
    sample: Callable[[int, torch.Generator], Batch]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # MEAN over the examples
    truth: dict[str, float] = field(default_factory=dict)  # b_simple, grad_norm_sq, trace_sigma


# -- the oracle -----------------------------------------------------------------------------------
def oracle_problem() -> Problem:
    """Linear regression with Gaussian inputs at the SCIENCE.md test vector."""
    from noisescale.experiments.tasks import LINREG_DELTA, LINREG_LAMBDA, LINREG_SIGMA, linreg_truth

    lam = torch.tensor(LINREG_LAMBDA, dtype=torch.float64)
    model = nn.Linear(len(LINREG_LAMBDA), 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(LINREG_DELTA, dtype=torch.float64))  # w* = 0

    def sample(n: int, gen: torch.Generator) -> Batch:
        x = torch.randn(n, len(lam), dtype=torch.float64, generator=gen) * lam.sqrt()  # [n, d]
        return x, LINREG_SIGMA * torch.randn(n, dtype=torch.float64, generator=gen)  # y = w*.x + xi

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out.squeeze(-1) - y).square().mean()

    t = linreg_truth(LINREG_DELTA, LINREG_LAMBDA, LINREG_SIGMA)
    truth = {k: t[k] for k in ("b_simple", "grad_norm_sq", "trace_sigma")}
    return Problem("oracle", "linear-regression oracle (d=5)", "examples", model, sample, loss, truth)


# -- MNIST MLP at a fixed checkpoint --------------------------------------------------------------
def mnist_mlp(seed: int = 0) -> nn.Module:
    """The 784-1024-10 ReLU MLP of the overhead benchmark, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))


def train_checkpoint(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> nn.Module:
    """Plain SGD (lr 0.1, B = 128, sampled with replacement) from a seeded init."""
    model = mnist_mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (BATCH,), generator=gen)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def mlp_per_example_sq_norms(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[N]`` exact squared norms of each example's gradient of its own loss, float64.

    For a Linear layer with input ``a_n`` and output gradient ``d_n`` the weight
    gradient is ``d_n a_n^T``, of squared norm ``|d_n|^2 |a_n|^2``; the bias gradient
    is ``d_n`` (Goodfellow 2015).
    """
    lin1, lin2 = model[0], model[2]
    w1, b1, w2, b2 = (p.detach().double() for p in (lin1.weight, lin1.bias, lin2.weight, lin2.bias))
    x = x.double()
    pre = x @ w1.T + b1  # [N, 1024]
    h = pre.clamp(min=0)
    d2 = torch.softmax(h @ w2.T + b2, dim=1) - F.one_hot(y, 10).double()  # dL_n/dlogits [N, 10]
    d1 = (d2 @ w2) * (pre > 0)  # dL_n/dpre [N, 1024]
    sq2 = d2.square().sum(1)
    sq1 = d1.square().sum(1)
    return sq2 * (h.square().sum(1) + 1) + sq1 * (x.square().sum(1) + 1)


def exact_truth(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, chunk: int = 6000
) -> dict[str, float]:
    """|G|^2, tr(Sigma_N) and B_simple over the whole training set, float64.

    ``G`` is the mean of the per-example gradients ``(d_n a_n^T, d_n)`` of both layers,
    ``tr(Sigma_N) = mean_n |g_n|^2 - |G|^2`` (population covariance: batches are drawn
    with replacement).
    """
    lin1, lin2 = model[0], model[2]
    w1, b1, w2, b2 = (p.detach().double() for p in (lin1.weight, lin1.bias, lin2.weight, lin2.bias))
    grads = [torch.zeros_like(t) for t in (w1, b1, w2, b2)]
    sum_sq = 0.0
    for i in range(0, len(x), chunk):
        xb, yb = x[i : i + chunk].double(), y[i : i + chunk]
        pre = xb @ w1.T + b1  # [n, 1024]
        h = pre.clamp(min=0)
        d2 = torch.softmax(h @ w2.T + b2, dim=1) - F.one_hot(yb, 10).double()  # dL_n/dlogits [n, 10]
        d1 = (d2 @ w2) * (pre > 0)  # dL_n/dpre [n, 1024]
        torch._foreach_add_(grads, [d1.T @ xb, d1.sum(0), d2.T @ h, d2.sum(0)])
        sq2, sq1 = d2.square().sum(1), d1.square().sum(1)
        sum_sq += (sq2 * (h.square().sum(1) + 1) + sq1 * (xb.square().sum(1) + 1)).sum().item()
    n = len(x)
    g2 = sum((g / n).square().sum().item() for g in grads)
    trace_sigma = sum_sq / n - g2  # E|g_n|^2 - |G|^2
    return {"grad_norm_sq": g2, "trace_sigma": trace_sigma, "b_simple": trace_sigma / g2}


def check_per_example_formula(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative difference of the closed form from ``torch.func`` per-sample gradients."""
    from torch.func import functional_call, grad, vmap

    model64 = mnist_mlp()
    model64.load_state_dict(model.state_dict())
    model64.double()  # float32 loses digits in softmax - onehot of confident examples
    params = {k: v.detach() for k, v in model64.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model64, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    ref = sum(g.double().flatten(1).square().sum(1) for g in grads.values())
    return ((mlp_per_example_sq_norms(model, x, y) - ref).abs() / ref).max().item()


def fingerprint(model: nn.Module) -> float:
    """Sum of |weights|: tells whether a cached truth belongs to this checkpoint."""
    return sum(p.detach().double().abs().sum().item() for p in model.parameters())


def cached_truth(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, train_steps: int) -> dict[str, Any]:
    """:func:`exact_truth` of this checkpoint, from ``TRUTH_CACHE`` when it matches."""
    fp = fingerprint(model)
    cache = json.loads(TRUTH_CACHE.read_text()) if TRUTH_CACHE.is_file() else {}
    hit = cache.get(str(train_steps))
    if hit is not None and math.isclose(hit["fingerprint"], fp, rel_tol=1e-6):
        return hit
    err = check_per_example_formula(model, x[:64], y[:64])
    if err > 1e-8:  # both float64
        raise RuntimeError(f"closed-form per-example norms differ from torch.func by {err:.2e}")
    truth: dict[str, Any] = exact_truth(model, x, y)
    with torch.no_grad():
        truth["loss"] = F.cross_entropy(model(x), y).item()
    truth.update(train_steps=train_steps, fingerprint=fp, check_rel_err=err)
    cache[str(train_steps)] = truth
    TRUTH_CACHE.parent.mkdir(parents=True, exist_ok=True)
    TRUTH_CACHE.write_text(json.dumps(cache, indent=1) + "\n")
    return truth


def mnist_problem(train_steps: int) -> Problem:
    """The MNIST MLP after ``train_steps`` seeded SGD steps, with its exact noise scale."""
    from noisescale.experiments.data import load_mnist

    data = load_mnist()
    x, y = data.x_train, data.y_train
    model = train_checkpoint(x, y, train_steps)
    truth = cached_truth(model, x, y, train_steps)

    def sample(n: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(len(x), (n,), generator=gen)  # with replacement: Sigma_N exactly
        return x[idx], y[idx]

    label = f"MNIST MLP 784-1024-10 after {train_steps} SGD steps"
    return Problem("mnist", label, "images", model, sample, F.cross_entropy, truth)


# -- measuring ------------------------------------------------------------------------------------
def estimate_path(
    problem: Problem, method: str, k: int, checkpoints: list[int], seed: int
) -> list[dict[str, Any]]:
    """One run at fixed weights: the meter's estimate after each number of examples in ``checkpoints``."""
    gen = torch.Generator().manual_seed(seed)
    model = problem.model
    meter = GradientNoiseScale(
        model, method="per_example" if method == "per_example" else "microbatch", ema_decay=1.0
    )
    out, seen = [], 0
    try:
        for target in checkpoints:
            while seen < target:
                x, y = problem.sample(BATCH, gen)
                if method == "per_example":
                    problem.loss(model(x), y).backward()
                else:
                    for xb, yb in zip(x.chunk(k), y.chunk(k), strict=True):
                        (problem.loss(model(xb), yb) / k).backward()
                meter.update(batch_size=BATCH)
                model.zero_grad(set_to_none=True)
                seen += BATCH
            est = meter.compute()
            out.append(
                {
                    "n": seen,
                    "b_simple": est.b_simple,
                    "ci": est.b_simple_ci,
                    "grad_norm_sq": est.grad_norm_sq,
                    "trace_sigma": est.trace_sigma,
                }
            )
    finally:
        meter.remove()
    return out


def summarise(runs: list[list[dict[str, Any]]], truth: dict[str, float]) -> list[dict[str, Any]]:
    """Per number of examples: median and RMS relative error, coverage, resolved share."""
    rows = []
    b = truth["b_simple"]
    for i, n in enumerate(r["n"] for r in runs[0]):
        at = [run[i] for run in runs]
        rel = [math.inf if a["b_simple"] is None else abs(a["b_simple"] - b) / b for a in at]
        resolved = [a["ci"] is not None for a in at]
        covered = [a["ci"] is not None and a["ci"][0] <= b <= a["ci"][1] for a in at]
        finite = [r for r in rel if math.isfinite(r)]
        rows.append(
            {
                "n": n,
                "median_rel_err": statistics.median(rel),
                "rms_rel_err": math.sqrt(statistics.fmean(r * r for r in finite)) if finite else math.inf,
                "coverage": statistics.fmean(covered),
                "resolved": statistics.fmean(resolved),
                "rel_err_grad_norm_sq": statistics.median(
                    abs(a["grad_norm_sq"] - truth["grad_norm_sq"]) / truth["grad_norm_sq"] for a in at
                ),
                "rel_err_trace_sigma": statistics.median(
                    abs(a["trace_sigma"] - truth["trace_sigma"]) / truth["trace_sigma"] for a in at
                ),
                "repeats": len(at),
            }
        )
    return rows


def examples_for(rows: list[dict[str, Any]], target: float = 0.1) -> tuple[float, float]:
    """``(c, n)``: relative standard error ``c / sqrt(n)`` and the n for ±target 95% of the time.

    ``c`` comes from the median absolute relative error at the largest n, which is
    ``0.674 c / sqrt(n)`` for a normal error (the median resists the heavy tail of a
    ratio whose denominator is still noisy; the RMS does not).
    """
    last = rows[-1]
    c = last["median_rel_err"] * math.sqrt(last["n"]) / 0.6745
    return c, (1.96 * c / target) ** 2


# -- output ---------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return "∞" if not math.isfinite(x) else f"{100 * x:.0f}" if x >= 0.1 else f"{100 * x:.1f}"


def _cell(row: dict[str, Any]) -> str:
    """``error / coverage of the resolved runs``, plus the resolved share when not all are."""
    if row["resolved"] == 0:
        return f"{_pct(row['median_rel_err'])} / – (0 res.)"
    cell = f"{_pct(row['median_rel_err'])} / {_pct(row['coverage'] / row['resolved'])}"
    return cell if row["resolved"] == 1 else f"{cell} ({_pct(row['resolved'])} res.)"


def markdown(results: dict[str, Any]) -> str:
    """Per problem: median relative error / coverage by n, and the examples for ±10%."""
    parts = []
    for prob in results["problems"]:
        methods = prob["methods"]
        ns = [r["n"] for r in next(iter(methods.values()))["rows"]]
        t = prob["truth"]
        parts.append(
            f"**{prob['label']}**: true B_simple = {t['b_simple']:.4g} {prob['unit']} "
            f"(|G|² = {t['grad_norm_sq']:.4g}, tr Σ = {t['trace_sigma']:.4g}); "
            f"{prob['repeats']} runs per cell; steps of B = {BATCH}. Cells: median |relative error| "
            "of B_simple, % / share of the resolved runs whose 95% interval contains the truth, % "
            "(share of runs resolved, when not all). Last column: examples for ±10% 95% of the time, "
            f"from the 1/√n law at n = {ns[-1]:,} (≈: beyond the measured range).\n"
        )
        parts.append("| method | " + " | ".join(f"n = {n:,}" for n in ns) + " | n for ±10% |")
        parts.append("|---|" + "---:|" * (len(ns) + 1))
        for name, m in methods.items():
            n10 = m["n_for_10pct"]
            n10 = round(n10, 1 - math.floor(math.log10(n10)))  # 2 significant digits
            advice = f"{'≈' if n10 > ns[-1] else ''}{n10:,.0f}"
            parts.append(f"| {name} | " + " | ".join(_cell(r) for r in m["rows"]) + f" | {advice} |")
        parts.append("")
    return "\n".join(parts)


def run_problem(problem: Problem, ns: list[int], repeats: int, seed: int) -> dict[str, Any]:
    """All methods on one problem."""
    methods: dict[str, Any] = {}
    for i, (method, k) in enumerate([*(("microbatch", k) for k in KS), ("per_example", 1)]):
        name = method if method == "per_example" else f"microbatch k={k}"
        runs = [estimate_path(problem, method, k, ns, seed + 1000 * i + r) for r in range(repeats)]
        rows = summarise(runs, problem.truth)
        c, n10 = examples_for(rows)
        methods[name] = {"rows": rows, "rel_se_x_sqrt_n": c, "n_for_10pct": n10}
        print(f"  {problem.name} {name}: c = {c:.2f}, n(±10%) = {n10:,.0f}", file=sys.stderr)
    return {
        "name": problem.name,
        "label": problem.label,
        "unit": problem.unit,
        "truth": problem.truth,
        "repeats": repeats,
        "methods": methods,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run both problems, print and write the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small grids and few runs (a few minutes)")
    p.add_argument("--problems", nargs="+", choices=("oracle", "mnist"), default=["oracle", "mnist"])
    p.add_argument("--repeats", type=int, default=None, help="runs per cell (default: GRIDS)")
    p.add_argument("--max-examples", type=int, default=None, help="largest n (default: GRIDS)")
    p.add_argument("--train-steps", type=int, default=1000, help="SGD steps before the MNIST checkpoint")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write all numbers here")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    p.add_argument(
        "--from-json", type=Path, default=None, help="only rebuild the tables from a --json output"
    )
    args = p.parse_args(argv)
    if args.from_json is not None:
        table = markdown(json.loads(args.from_json.read_text()))
        print(table)
        if args.markdown:
            args.markdown.write_text(table)
        return 0
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    problems = []
    for name in args.problems:
        max_n, repeats = GRIDS[name][1 if args.quick else 0]
        max_n, repeats = args.max_examples or max_n, args.repeats or repeats
        ns = [BATCH * 8 * 2**i for i in range(int(math.log2(max_n / (BATCH * 8))) + 1)]
        problem = oracle_problem() if name == "oracle" else mnist_problem(args.train_steps)
        print(f"[{time.perf_counter() - t0:6.1f}s] {problem.label}: truth {problem.truth}", file=sys.stderr)
        problems.append(run_problem(problem, ns, repeats, args.seed))
    results = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "command": " ".join(
            ["python", "benchmarks/accuracy.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "wall_s": round(time.perf_counter() - t0, 1),
        "batch_size": BATCH,
        "problems": problems,
    }
    table = markdown(results)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
