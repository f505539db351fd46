"""Time and memory of one training step with noisescale and with the other per-example tools.

Every method runs a COMPLETE optimiser step (forward, backward, whatever the tool adds,
``optimizer.step()``, ``zero_grad``) on its own copy of the same model, and is timed
side by side with its baseline in the same process:

=================  =============================================================  ==================
method             what one step does                                             baseline
=================  =============================================================  ==================
``plain``          forward + backward + SGD step on the whole batch               (itself)
``accum``          the same batch as ``k`` micro-batches (loss / k each)          (itself)
``microbatch``     ``accum`` + ``GradientNoiseScale(method="microbatch").update``  ``accum``
``reads``          ``accum`` + only the reads that exact micro-batch norms need:   ``accum``
                   a hook takes each backward's squared gradient norm per
                   parameter, and each ``.grad`` is normed once per step (no
                   bookkeeping: the least any exact ``microbatch`` method pays)
``per_example``    ``plain`` + ``GradientNoiseScale(method="per_example").update`` ``plain``
``layernorm``      ``per_example`` measuring the LayerNorms only                    ``plain``
                   (``groups=layernorm_groups(model)``: the cheap transformer mode)
``ln_bound``       ``plain`` with each LayerNorm forming its per-example norms in  ``plain``
                   its own backward (``benchmarks/bookkeeping.py``: no hooks, no
                   checks, no estimator): the least an exact ``layernorm`` pays
``bookkeeping``    ``ln_bound`` with the Linears too (their per-example             ``plain``
                   contributions ARE the weight gradient); embeddings not counted
``backpack``       ``plain`` inside ``with backpack(BatchL2Grad())`` + norms       ``plain``
``opacus``         ``GradSampleModule`` forward/backward (``grad_sample``) + norms  ``plain``
``vmap``           ``vmap(grad(loss))`` per-sample gradients + norms, their mean    ``plain``
                   as ``.grad`` + SGD step
``naive``          one backward per example + norms, their mean as ``.grad``        ``plain``
``b_noise``        one B_noise probe of the batch (``noisescale.estimate_b_noise``   ``accum``
                   per batch): ``k`` forward passes, ``k`` backward passes keeping
                   their graph and ``k`` Hessian-vector products (no SGD step)
=================  =============================================================  ==================

"+ norms" means the ``[B]`` per-example squared gradient norms summed over all
parameters, which is all a noise-scale estimate needs from the tool.

Method of measurement (noisy shared machines): ``--repeats`` rounds; in each round
every method runs a block of steps (sized to last about ``--block-s`` seconds, after
warm-up), in an order rotated each round. A method's ratio is its time per step
divided by its baseline's time per step IN THE SAME ROUND; the table reports the
median over rounds of the ms per step and of the ratio (with its interquartile
range), the median ratio of process CPU time (less sensitive to other processes
taking the cores; with one thread it equals the wall-clock ratio of an idle
machine), and the ratio of each method's fastest round to its baseline's.
``meter.compute()`` is not timed: a user calls it once per logging interval.

Peak memory: each (model, method) runs again in a forked child process that builds
the model and the batch, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
and runs warm-up plus a few steps. ``peak_mb`` is the peak resident set size above
the level after set-up, in MiB: activations, gradients, per-example buffers and the
tool's own tensors, as the operating system sees them (torch's CPU allocator has no
peak statistic; ``tracemalloc`` does not see it). It includes pages the allocator
keeps after freeing, so treat differences under a few MiB as noise.

Usage::

    python benchmarks/overhead.py --quick                       # under 3 minutes
    python benchmarks/overhead.py --json benchmarks/results/overhead.json \\
        --markdown benchmarks/results/overhead.md                # the table of docs/benchmarks.md

References:
    McCandlish et al. (2018), arXiv:1812.06162, appendix A.1 (what the norms are for).
    Goodfellow (2015), Efficient Per-Example Gradient Computations, arXiv:1510.01799.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Sleep, not spin, while waiting at OpenMP barriers (must be set before torch loads).
# On a shared 2-core machine spinning threads that get descheduled made the same
# plain step vary from 20 to 190 ms; with PASSIVE it stays within a few percent.
# Set OMP_WAIT_POLICY=ACTIVE in the environment to measure the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import nn

Step = Callable[[], None]
Batch = tuple[torch.Tensor, torch.Tensor]
PLAIN_BASELINE = {
    "per_example", "layernorm", "ln_bound", "bookkeeping", "backpack", "opacus", "vmap", "naive"
}  # fmt: skip
ALL_METHODS = (
    "plain", "accum", "microbatch", "reads", "per_example", "layernorm", "ln_bound", "bookkeeping",
    "backpack", "opacus", "vmap", "naive", "b_noise",
)  # fmt: skip


# -- models ---------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LayerNorm transformer block; attention projections are plain ``nn.Linear``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D] -> [B, T, D]``, causal."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)  # 3 x [B, T, D]
        q, k, v = (
            t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v)
        )  # [B, H, T, D/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D/H]
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A 2-layer character transformer (nanoGPT-like, untied head), d=128, context 128."""

    def __init__(
        self, vocab: int = 65, d: int = 128, context: int = 128, layers: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids -> ``[B, T, V]`` logits."""
        B, T = idx.shape
        # Positions indexed per example ([B, T]) so that dim 0 is the example for every layer.
        pos = torch.arange(T, device=idx.device).expand(B, T)
        return self.head(self.ln_f(self.blocks(self.tok(idx) + self.pos(pos))))


def seq_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all positions of all examples."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: how to build it, its batch and its MEAN loss."""

    name: str
    label: str
    batch_size: int
    build: Callable[[], nn.Module]
    data: Callable[[int, torch.Generator], Batch]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    backpack: bool  # whether BackPACK's BatchL2Grad supports every layer
    units: int = 1  # units of the loss one example carries (tokens of a window): per_example's example_sizes
    optimizer: str = "sgd"  # the model's own training step: "sgd" (lr 1e-3) or "adamw" (its task's)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),  # [B, 16, 28, 28]
        nn.ReLU(),
        nn.MaxPool2d(2),  # [B, 16, 14, 14]
        nn.Conv2d(16, 32, 5, padding=2),  # [B, 32, 14, 14]
        nn.ReLU(),
        nn.MaxPool2d(2),  # [B, 32, 7, 7]
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def _shakespeare_spec(name: str, label: str, windows: int) -> ModelSpec:
    """The shakespeare task's model, data, token-mean loss and AdamW at ``windows`` windows of 64 tokens."""
    return ModelSpec(
        name,
        f"{label} ({windows * 64:,} tokens), AdamW",
        windows,
        lambda: _shakespeare().make_model(0),
        lambda n, g: _shakespeare().sample_batch(n, g),
        seq_loss,
        False,
        units=64,
        optimizer="adamw",
    )


SPECS = {
    "mlp": ModelSpec(
        "mlp",
        "MLP 784-1024-10, B=128",
        128,
        _mlp,
        lambda n, g: (torch.rand(n, 784, generator=g), torch.randint(10, (n,), generator=g)),
        F.cross_entropy,
        True,
    ),
    "cnn": ModelSpec(
        "cnn",
        "CNN 2 conv (16, 32) + linear, 28x28, B=128",
        128,
        _cnn,
        lambda n, g: (torch.rand(n, 1, 28, 28, generator=g), torch.randint(10, (n,), generator=g)),
        F.cross_entropy,
        True,
    ),
    "transformer": ModelSpec(
        "transformer",
        "char transformer 2x128, T=128, B=32",
        32,
        CharTransformer,
        lambda n, g: (torch.randint(65, (n, 128), generator=g), torch.randint(65, (n, 128), generator=g)),
        seq_loss,
        False,  # no LayerNorm in BatchL2Grad
    ),
    # The model of `noisescale measure --task shakespeare` with its own batch (32 windows of 64
    # characters: 2,048 tokens), loss (mean over the tokens) and optimizer (AdamW).
    "shakespeare": _shakespeare_spec(
        "shakespeare", "shakespeare task: char GPT 2x96, T=64, B=32 windows", 32
    ),
    # The same model at 4x the batch: how the fixed per-layer costs amortise (asked for by name; not in
    # the default run).
    "shakespeare-8k": _shakespeare_spec("shakespeare-8k", "shakespeare task model, B=128 windows", 128),
}
DEFAULT_MODELS = [name for name in SPECS if name != "shakespeare-8k"]
BOUNDS = ("ln_bound", "bookkeeping")  # asked for by name: not tools, so not in the default run
DEFAULT_METHODS = [m for m in ALL_METHODS if m not in BOUNDS]


def _shakespeare() -> Any:
    """The built-in task (its texts are loaded once)."""
    from noisescale.experiments.tasks import get_task

    return get_task("shakespeare")


# -- methods: each returns a closure running one full optimiser step --------------------------------
class Unsupported(Exception):
    """The method cannot run this model; the message says why."""


def _sgd(model: nn.Module, spec: ModelSpec | None = None) -> torch.optim.Optimizer:
    """The model's optimizer: SGD at lr 1e-3, or for the shakespeare task its AdamW."""
    if spec is not None and spec.optimizer == "adamw":
        from noisescale.experiments.optim import make_optimizer

        return make_optimizer(model.parameters(), "adamw", lr=3e-3, weight_decay=0.1)[0]
    return torch.optim.SGD(model.parameters(), lr=1e-3)


def _sq_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """``[B]`` per-example squared norms summed over parameters, from ``[B, *shape]`` tensors."""
    return torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0)


@dataclass(frozen=True)
class Options:
    """Settings shared by the methods."""

    k: int = 4  # micro-batches per step of accum / microbatch
    naive_examples: int = 16  # examples the naive loop really runs (its time is scaled to the batch)
    device: str = "cpu"  # where the models, batches and tools run


def _plain(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    opt, (x, y) = _sgd(model, spec), batch

    def step() -> None:
        spec.loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _accum(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options, meter: Any = None) -> Step:
    opt, k = _sgd(model, spec), opts.k
    micro = list(zip(batch[0].chunk(k), batch[1].chunk(k), strict=True))

    def step() -> None:
        for xb, yb in micro:
            (spec.loss(model(xb), yb) / k).backward()
        if meter is not None:
            meter.update(batch_size=spec.batch_size * spec.units)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _microbatch(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    from noisescale import GradientNoiseScale

    return _accum(spec, model, batch, opts, GradientNoiseScale(model, method="microbatch"))


class _ReadsOnly:
    """The memory reads exact per-micro-batch norms cannot avoid, and nothing else.

    A tensor hook per parameter takes the norm of each backward's gradient
    (:func:`noisescale.collect.norm`, as the recorder does); :meth:`update` takes those
    of the accumulated ``.grad`` and drops them all. Its time over ``accum`` is the
    floor any exact ``microbatch`` implementation pays on this machine.
    """

    def __init__(self, model: nn.Module) -> None:
        from noisescale.collect import norm

        self.norm = norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.norms: list[torch.Tensor] = []
        for p in self.params:
            p.register_hook(lambda g: self.norms.append(self.norm(g)))

    def update(self, batch_size: int) -> None:
        """Norm every ``.grad`` (the big batch) and drop all the norms."""
        for p in self.params:
            if p.grad is not None:
                self.norm(p.grad)
        self.norms.clear()


def _reads(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    return _accum(spec, model, batch, opts, _ReadsOnly(model))


def _per_example(
    spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options, *, layernorm: bool = False
) -> Step:
    try:
        from noisescale.per_example import PerExampleNorms  # noqa: F401
    except ImportError as err:
        raise Unsupported(f"noisescale.per_example not importable ({err})") from err
    from noisescale import GradientNoiseScale

    groups = None
    if layernorm:
        from noisescale import layernorm_groups

        groups = layernorm_groups(model)
    meter = GradientNoiseScale(model, method="per_example", groups=groups)
    opt, (x, y) = _sgd(model, spec), batch
    sizes = {"example_sizes": spec.units} if spec.units > 1 else {"batch_size": spec.batch_size}

    def step() -> None:
        spec.loss(model(x), y).backward()
        meter.update(**sizes)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _layernorm(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    if not any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        raise Unsupported("no LayerNorm in this model")
    return _per_example(spec, model, batch, opts, layernorm=True)


def _bound(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options, *, linear: bool) -> Step:
    """A plain step whose LayerNorms (and Linears) form per-example norms in their own backward."""
    if not any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        raise Unsupported("no LayerNorm in this model")
    from bookkeeping import install

    sink = install(model, linear=linear)
    opt, (x, y) = _sgd(model, spec), batch

    def step() -> None:
        spec.loss(model(x), y).backward()
        torch.stack(sink).sum(0)  # [B] per-example squared norms, summed over the layers
        sink.clear()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _ln_bound(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    return _bound(spec, model, batch, opts, linear=False)


def _bookkeeping(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    return _bound(spec, model, batch, opts, linear=True)


def _backpack(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    if not spec.backpack:
        raise Unsupported("BackPACK BatchL2Grad has no LayerNorm")
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(model)
    opt, (x, y) = _sgd(model, spec), batch
    params = list(model.parameters())

    def step() -> None:
        loss = spec.loss(model(x), y)
        with backpack(BatchL2Grad()):
            loss.backward()
        torch.stack([p.batch_l2 for p in params]).sum(0)  # [B]
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _opacus(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt, (x, y) = _sgd(gsm, spec), batch
    params = [p for p in gsm.parameters() if p.requires_grad]

    def step() -> None:
        spec.loss(gsm(x), y).backward()
        _sq_norms([p.grad_sample for p in params])  # [B]
        opt.step()
        gsm.zero_grad(set_to_none=True)  # also drops grad_sample

    return step


def _vmap(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    from torch.func import functional_call, grad, vmap

    opt, (x, y) = _sgd(model, spec), batch
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return spec.loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def step() -> None:
        grads = per_sample({n: p.detach() for n, p in zip(names, params, strict=True)}, x, y)
        _sq_norms([grads[n] for n in names])  # [B]
        for n, p in zip(names, params, strict=True):
            p.grad = grads[n].mean(0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _naive(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    """One backward per example over the first ``opts.naive_examples`` examples only.

    Examples are independent, so the time of the full batch is this time times
    ``B / naive_examples`` (:func:`time_scale`).
    """
    opt = _sgd(model, spec)
    x, y = (t[: opts.naive_examples] for t in batch)
    params = list(model.parameters())

    def step() -> None:
        total = [torch.zeros_like(p) for p in params]
        sq = torch.empty(len(x))
        for i in range(len(x)):
            grads = torch.autograd.grad(spec.loss(model(x[i : i + 1]), y[i : i + 1]), params)
            sq[i] = sum(g.square().sum() for g in grads)
            torch._foreach_add_(total, grads)
        for p, g in zip(params, total, strict=True):
            p.grad = g / len(x)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _b_noise(spec: ModelSpec, model: nn.Module, batch: Batch, opts: Options) -> Step:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from noisescale.b_noise import hessian_weighted_stats, hvp_products

    def step() -> None:
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
            hessian_weighted_stats(*hvp_products(model, spec.loss, *batch, opts.k))

    return step


METHODS: dict[str, Callable[[ModelSpec, nn.Module, Batch, Options], Step]] = {
    "plain": _plain,
    "accum": _accum,
    "microbatch": _microbatch,
    "reads": _reads,
    "per_example": _per_example,
    "layernorm": _layernorm,
    "ln_bound": _ln_bound,
    "bookkeeping": _bookkeeping,
    "backpack": _backpack,
    "opacus": _opacus,
    "vmap": _vmap,
    "naive": _naive,
    "b_noise": _b_noise,
}


def baseline_of(method: str) -> str:
    """The method whose time divides this one's: same loop without the measurement."""
    if method in ("microbatch", "reads", "b_noise"):
        return "accum"
    return "plain" if method in PLAIN_BASELINE else method


def time_scale(spec: ModelSpec, method: str, opts: Options) -> float:
    """Factor from measured time per step to time per step of the full batch."""
    return spec.batch_size / min(opts.naive_examples, spec.batch_size) if method == "naive" else 1.0


def build(spec: ModelSpec, method: str, opts: Options, seed: int = 0) -> Step:
    """A fresh model (same weights for every method), a fixed batch, and the method's step."""
    torch.manual_seed(seed)
    model = spec.build().to(opts.device)
    x, y = spec.data(spec.batch_size, torch.Generator().manual_seed(seed))
    batch = (x.to(opts.device), y.to(opts.device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus/BackPACK construction chatter
        return METHODS[method](spec, model, batch, opts)


# -- memory (forked children) ---------------------------------------------------------------------
def preload(methods: list[str]) -> None:
    """Import the tools once, before forking, so that no child pays (or measures) an import."""
    from noisescale import GradientNoiseScale

    with contextlib.suppress(Exception):  # first meter: its lazy imports (torch.distributed.tensor)
        GradientNoiseScale(nn.Linear(1, 1), method="microbatch").remove()
    for method, module in (
        ("per_example", "noisescale.per_example"),
        ("backpack", "backpack"),
        ("opacus", "opacus"),
    ):
        if method in methods:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(conn: Any, spec: ModelSpec, method: str, opts: Options, steps: int) -> None:
    try:
        step = build(spec, method, opts)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        base = _status_kib("VmRSS")
        for _ in range(steps):
            step()
        conn.send((_status_kib("VmHWM") - base) / 1024)
    except Exception as err:  # reported, never fatal for the benchmark
        conn.send(f"{type(err).__name__}: {err}")
    finally:
        conn.close()


def peak_mb(spec: ModelSpec, method: str, opts: Options, steps: int) -> float | str:
    """Peak RSS (MiB) above the post-set-up level over ``steps`` steps, in a forked child."""
    if not os.path.exists("/proc/self/clear_refs"):
        return "n/a"
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_child, args=(send, spec, method, opts, steps))
    proc.start()
    send.close()
    out = recv.recv() if recv.poll(600) else "timeout"
    proc.join()
    return out


# -- timing ---------------------------------------------------------------------------------------
def _time_block(step: Step, n: int, device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per step over ``n`` steps (the device's queue drained)."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - w0) / n, (time.process_time() - c0) / n


def time_model(
    spec: ModelSpec, methods: list[str], opts: Options, *, repeats: int, block_s: float
) -> dict[str, Any]:
    """Interleaved timing of ``methods`` on one model.

    Returns:
        ``{"wall": {method: [s/step per round]}, "cpu": {...}, "status": {...}, "n_steps": {...}}``.
    """
    steps: dict[str, Step] = {}
    status: dict[str, str] = {}
    for m in methods:
        try:
            step = build(spec, m, opts)
            step()  # first call: lazy initialisation
            steps[m], status[m] = step, "ok"
        except Unsupported as err:
            status[m] = f"unsupported: {err}"
        except Exception as err:
            status[m] = f"error: {type(err).__name__}: {err}"
    n_steps = {m: max(1, round(block_s / _time_block(s, 1, opts.device)[0])) for m, s in steps.items()}
    for m, s in steps.items():
        _time_block(s, min(n_steps[m], 3), opts.device)  # warm-up
    wall: dict[str, list[float]] = {m: [] for m in steps}
    cpu: dict[str, list[float]] = {m: [] for m in steps}
    order = list(steps)
    for r in range(repeats):
        for m in order[r % len(order) :] + order[: r % len(order)]:
            w, c = _time_block(steps[m], n_steps[m], opts.device)
            wall[m].append(w * time_scale(spec, m, opts))
            cpu[m].append(c * time_scale(spec, m, opts))
    return {"wall": wall, "cpu": cpu, "status": status, "n_steps": n_steps}


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summarise(
    spec: ModelSpec, run: dict[str, Any], peaks: dict[str, float | str], opts: Options
) -> list[dict[str, Any]]:
    """One record per method: medians, ratio to the baseline of the same round, memory."""
    records = []
    wall, cpu = run["wall"], run["cpu"]
    for m, status in run["status"].items():
        rec: dict[str, Any] = {
            "model": spec.name,
            "model_label": spec.label,
            "method": m,
            "batch_size": spec.batch_size,
            "k": opts.k if m in ("accum", "microbatch", "reads", "b_noise") else None,
            "examples_run": min(opts.naive_examples, spec.batch_size) if m == "naive" else spec.batch_size,
            "baseline": baseline_of(m),
            "status": status,
            "ms_median": None,
            "ratio_median": None,
            "peak_mb": peaks.get(m) if isinstance(peaks.get(m), float) else None,
        }
        base = baseline_of(m)
        if status == "ok" and base in wall:
            ms = [1e3 * t for t in wall[m]]
            ratios = [a / b for a, b in zip(wall[m], wall[base], strict=True)]
            cpu_ratios = [a / b for a, b in zip(cpu[m], cpu[base], strict=True)]
            rec.update(
                ms_median=statistics.median(ms),
                ms_quartiles=_quartiles(ms),
                ratio_median=statistics.median(ratios),
                ratio_quartiles=_quartiles(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                ratio_of_fastest=min(wall[m]) / min(wall[base]),
                cpu_ms_median=1e3 * statistics.median(cpu[m]),
                cpu_ratio_median=statistics.median(cpu_ratios),
                repeats=len(ratios),
                steps_per_block=run["n_steps"][m],
            )
        if isinstance(peaks.get(m), str):
            rec["peak_note"] = peaks[m]
        records.append(rec)
    return records


# -- output ---------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_start": os.getloadavg(),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(records: list[dict[str, Any]]) -> str:
    """The overhead table in GitHub markdown (ratios to the method's baseline in the same round)."""
    lines = [
        "| model | method | ms / step | × baseline, wall: median (IQR) | × baseline, CPU time | "
        "× baseline, fastest rounds | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['model_label']} | {r['method']} | {r['status']} | | | | |")
            continue
        q1, q3 = r["ratio_quartiles"]
        ratio = f"**{r['ratio_median']:.2f}** ({q1:.2f}–{q3:.2f})"
        cpu, fastest = f"{r['cpu_ratio_median']:.2f}", f"{r['ratio_of_fastest']:.2f}"
        if r["method"] == r["baseline"]:
            ratio, cpu, fastest = "1", "1", "1"
        method = r["method"] + (f" (k={r['k']})" if r["k"] else "")
        if r["examples_run"] != r["batch_size"]:
            method += f" ({r['examples_run']} ex. × {r['batch_size'] // r['examples_run']})"
        lines.append(
            f"| {r['model_label']} | {method} | {_fmt(r['ms_median'], '.1f')} | {ratio} | {cpu} | "
            f"{fastest} | {_fmt(r['peak_mb'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print the table and write the outputs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few short rounds (under 3 minutes)")
    p.add_argument("--models", nargs="+", choices=list(SPECS), default=DEFAULT_MODELS)
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=DEFAULT_METHODS)
    p.add_argument("--k", type=int, default=4, help="micro-batches per step for accum/microbatch")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (default 21; quick 5)")
    p.add_argument(
        "--block-s", type=float, default=None, help="seconds per timed block (default 0.25; quick 0.1)"
    )
    p.add_argument("--naive-examples", type=int, default=16, help="examples the naive loop runs (scaled)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument(
        "--device", default="cpu", help="torch device, e.g. cuda (peak memory is then not measured)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the records here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 21)
    block_s = args.block_s or (0.1 if args.quick else 0.25)
    torch.set_num_threads(args.threads)
    opts = Options(k=args.k, naive_examples=args.naive_examples, device=args.device)
    no_memory = args.no_memory or torch.device(args.device).type != "cpu"  # peak RSS is host memory
    methods = [m for m in ALL_METHODS if m in args.methods or m in {baseline_of(x) for x in args.methods}]

    t_start = time.perf_counter()
    info = machine()
    preload(methods)
    # Memory first: the children are forked before this process runs any parallel region.
    peaks: dict[str, dict[str, float | str]] = {}
    for name in args.models:
        peaks[name] = {} if no_memory else {m: peak_mb(SPECS[name], m, opts, 2) for m in methods}
    records: list[dict[str, Any]] = []
    for name in args.models:
        spec = SPECS[name]
        run = time_model(spec, methods, opts, repeats=repeats, block_s=block_s)
        records += summarise(spec, run, peaks[name], opts)
        print(f"[{time.perf_counter() - t_start:6.1f}s] {spec.label} done", file=sys.stderr)
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    info["command"] = " ".join(
        ["python", "benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])]
    )
    table = markdown(records)
    print(table)
    print(json.dumps({k: v for k, v in info.items() if k != "platform"}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "records": records}, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
