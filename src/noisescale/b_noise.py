r"""B_noise = tr(H Sigma)/(G^T H G) from Hessian-vector products (McCandlish et al. 2018, eq. 2.8).

Eq. 2.8 weights the gradient noise by the curvature. A gradient ``g_b`` of the mean loss over
``b`` examples has

.. math::

    E[g_b^T H g_b] = G^T H G + tr(H\Sigma)/b,

the identity ``E|G_B|^2 = |G|^2 + tr(Sigma)/B`` with ``H`` as the metric, so the appendix A.1
estimator (:func:`noisescale.estimators.microbatch_stats`) applied to H-weighted squared norms
gives unbiased ``G^T H G`` and ``tr(H Sigma)`` exactly as it gives ``|G|^2`` and ``tr(Sigma)``
from plain ones (SCIENCE.md, "B_noise via Hessian-vector products").

**Which H.** ``H`` is the Hessian of the expected loss; a batch only gives its own Hessian
``H_b`` with ``E H_b = H``, and ``g^T H_b g`` is unbiased for ``g^T H g`` only when ``H_b`` is
independent of ``g``. With ``H_b`` from the gradient's own examples it is not: for linear
regression ``H_b = X_b^T X_b / b`` and ``g_b = X_b^T r_b / b`` share the inputs, and
``E[g_b^T H_b g_b]`` picks up their fourth and sixth moments (on the oracle with 8 examples per
micro-batch, 4 per batch, it gives ``tr(H Sigma)`` = 173 instead of 59.25 and ``G^T H G`` 14% low:
``tests/test_b_noise.py``). So each
batch of ``B`` examples is split into ``k >= 3`` micro-batches with gradients ``g_1..g_k`` and
Hessians ``H_1..H_k`` from disjoint examples, hence independent, and

- micro-batch ``i``'s H-weighted squared norm takes the NEXT micro-batch's Hessian,
  ``q_i = g_i^T H_{i+1} g_i`` (indices mod k): one Hessian-vector product per gradient,
  ``u_i = H_{i+1} g_i``, at the same parameters;
- the big batch ``g = sum_i w_i g_i`` (``w_i = b_i/B``, the gradient of the batch's mean loss)
  has ``g^T H g = sum_ij w_i w_j g_i^T H g_j``. Its diagonal terms are the ``q_i``; every cross term
  has expectation ``G^T H G``, estimated without bias by the mean ``c`` of ``g_j . u_i`` over the
  ``k(k - 2)`` pairs with ``j`` outside ``{i, i+1}`` (three independent micro-batches, no further
  products), so ``q_big = sum_i w_i^2 q_i + (1 - sum_i w_i^2) c`` has
  ``E q_big = G^T H G + tr(H Sigma) sum_i w_i^2/b_i``, the big batch's.

With equal micro-batches of ``b`` examples the estimator then reduces to ``G^T H G = c`` and
``tr(H Sigma) = b (mean_i q_i - c)``. The same batches give ``|G|^2``, ``tr(Sigma)`` and B_simple
(eq. 2.9) from the plain squared norms, and ``eps_max = |G|^2/(G^T H G)`` (eq. 2.6).

**Averages and intervals.** Each batch gives one unbiased estimate of each part; the parts are
averaged over the batches separately and divided at the end, and the 95% interval of every ratio
is Fieller's from the spread over batches (:func:`noisescale.uncertainty.b_simple_interval`; the
batches are independent draws at fixed parameters, as its premise requires).

**Not resolved.** ``G^T H G`` can be negative on a non-convex loss: the loss then curves DOWNWARD
along the gradient, the quadratic model of eqs. 2.4-2.8 has no optimal step, and neither
``eps_max`` nor B_noise exists there (they are not "large"). ``tr(H Sigma) <= 0`` means the
curvature is negative where the noise lies. B_noise is reported only when ``G^T H G`` is
significantly positive and ``tr(H Sigma)`` positive; otherwise it is None with the reason.

Cost of one batch of ``B`` examples in ``k`` micro-batches: ``k`` forward passes, ``k`` backward
passes that keep their graph (``create_graph=True``) and ``k`` Hessian-vector products (a second
backward through each micro-batch's graph), all over ``B`` examples in total; the model's
``.grad`` is not touched. Measured: docs/benchmarks.md.

Batches are assumed drawn with replacement (independent examples); every batch size is in the
unit the loss is averaged over (examples, images, tokens).

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    eqs. (2.6), (2.8), (2.9) and appendix A.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from noisescale._format import describe_b_simple
from noisescale.errors import DoubleBackwardError
from noisescale.estimators import NoiseStats, effective_batch_size, microbatch_stats
from noisescale.smoothing import ema_fold, ema_init
from noisescale.uncertainty import BSimpleInterval, b_simple_interval

__all__ = ["BNoiseEstimate", "estimate_b_noise", "hessian_weighted_stats", "hvp_products", "ratio_rows"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RATIOS = ("b_simple", "b_noise", "eps_max")
"""The three ratios of the averaged parts, in the order of :func:`ratio_rows`' series."""
MIN_MICROBATCHES = 3  # a cross term needs two gradients and a Hessian from a third micro-batch


class BNoiseEstimate(NamedTuple):
    """What :func:`estimate_b_noise` returns.

    Ratios, their intervals and standard errors are None unless resolved (``reason`` says why);
    the averaged parts are always reported (they may be <= 0: noise, or negative curvature).

    Attributes:
        b_noise: tr(H Sigma)/(G^T H G) (eq. 2.8), examples (the unit the loss averages over).
        b_noise_ci: Fieller interval ``(low, high)`` at ``confidence``, examples.
        b_noise_se: delta-method standard error, examples.
        trace_h_sigma: averaged estimate of tr(H Sigma).
        g_h_g: averaged estimate of G^T H G.
        b_simple: tr(Sigma)/|G|^2 (eq. 2.9) of the same batches, examples.
        b_simple_ci: its interval, examples.
        grad_norm_sq: averaged estimate of |G|^2.
        trace_sigma: averaged estimate of tr(Sigma).
        eps_max: |G|^2/(G^T H G), the best plain-SGD learning rate of an infinite batch (eq. 2.6);
            None unless G^T H G and |G|^2 are both significantly positive.
        eps_max_ci: its interval.
        resolved: whether ``b_noise`` is a number.
        reason: why B_noise is not resolved, or None.
        batches: batches averaged (non-finite ones excluded).
        skipped_batches: batches with non-finite gradients or products, never averaged in.
        examples: examples in all the batches (in units: tokens with ``units_per_example``).
        microbatches: k, micro-batches per batch.
        confidence: level of the intervals.
    """

    b_noise: float | None
    b_noise_ci: tuple[float, float] | None
    b_noise_se: float | None
    trace_h_sigma: float
    g_h_g: float
    b_simple: float | None
    b_simple_ci: tuple[float, float] | None
    grad_norm_sq: float
    trace_sigma: float
    eps_max: float | None
    eps_max_ci: tuple[float, float] | None
    resolved: bool
    reason: str | None
    batches: int
    skipped_batches: int
    examples: int
    microbatches: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (None becomes null, intervals lists)."""
        d = self._asdict()
        for key in ("b_noise_ci", "b_simple_ci", "eps_max_ci"):
            d[key] = None if d[key] is None else list(d[key])
        return d

    def describe(self, unit: str = "examples") -> str:
        """``B_noise = 7.14 examples [6.93, 7.37] (95%)``, or ``B_noise not resolved: <reason>``."""
        text = describe_b_simple(self.b_noise, self.b_noise_ci, unit, self.confidence, name="B_noise")
        return text if self.reason is None else f"{text}: {self.reason}"


def hvp_products(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, microbatches: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dot products of one batch's micro-batch gradients and their Hessian-vector products.

    The batch is split into ``k = microbatches`` micro-batches (``tensor_split`` along dim 0);
    ``g_i`` is the gradient of ``loss_fn`` (the MEAN loss) over micro-batch ``i`` with respect to
    every parameter that requires grad, ``H_i`` its Hessian, and ``u_i = H_{i+1} g_i`` (indices
    mod k) one Hessian-vector product per gradient (a second backward through micro-batch
    ``i+1``'s graph). The model's ``.grad`` is not touched.

    Args:
        model: the model, at the parameters to probe.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss over the examples of ``x``.
        inputs: ``[B, *F]``, on the model's device.
        targets: ``[B, *T]``.
        microbatches: k >= 3, at most B.

    Returns:
        ``(gram, cross, sizes)``: ``gram[i, j] = g_i . g_j`` and ``cross[j, i] = g_j . u_i``,
        each ``[k, k]`` float64 on the CPU, and ``sizes`` ``[k]`` examples per micro-batch.

    Raises:
        ValueError: if ``loss_fn`` does not return a scalar, or no parameter requires grad.
        DoubleBackwardError: if an operation of the model or loss has no double backward, or the
            gradient does not depend on the parameters at all (a loss linear in every parameter).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad: nothing to probe")
    parts = list(zip(inputs.tensor_split(microbatches), targets.tensor_split(microbatches), strict=True))
    grads: list[list[torch.Tensor]] = []  # per micro-batch, per parameter; detached
    products: list[list[torch.Tensor]] = [[]] * microbatches
    first: Sequence[torch.Tensor] = ()
    for i, (x, y) in enumerate(parts):
        live = _mean_loss_grad(loss_fn(model(x), y), params)  # keeps micro-batch i's graph
        grads.append([g.detach() for g in live])
        if i == 0:
            _refuse_once_differentiable(live)
            first = live  # its Hessian multiplies the LAST gradient, at the end
        else:
            products[i - 1] = _hvp(live, grads[i - 1], params)  # u_{i-1} = H_i g_{i-1}
    products[-1] = _hvp(first, grads[-1], params)  # u_{k-1} = H_0 g_{k-1}
    gram = torch.zeros(microbatches, microbatches, dtype=torch.float64, device=params[0].device)
    cross = torch.zeros_like(gram)
    for j in range(len(params)):  # in the parameters' dtype, summed in float64 (no [k, P] copy)
        g = torch.stack([gi[j].reshape(-1) for gi in grads])  # [k, n_j]
        gram += (g @ g.T).double()
        cross += torch.stack([g @ ui[j].reshape(-1) for ui in products], 1).double()  # [j, i]: g_j . u_i
    sizes = torch.tensor([len(y) for _, y in parts], dtype=torch.float64)
    return gram.cpu(), cross.cpu(), sizes


def _mean_loss_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gradient of a scalar loss with its graph (zeros for parameters the loss does not use)."""
    if loss.dim() != 0:
        raise ValueError(
            f"loss_fn returned a tensor of shape {list(loss.shape)}: it must return the MEAN loss over "
            "the micro-batch's examples, a scalar (e.g. reduction='mean')"
        )
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    if not any(g is not None and g.requires_grad for g in grads):
        raise DoubleBackwardError(
            "the gradient does not depend on the parameters (it has no graph after create_graph=True): "
            "either the loss is linear in every parameter (H = 0: G^T H G = 0, no B_noise) or the backward "
            "of an operation next to the loss is not differentiable (a custom autograd.Function marked "
            "once_differentiable, a .detach() in a backward): give B_noise a loss torch can differentiate "
            "twice"
        )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _refuse_once_differentiable(grads: Sequence[torch.Tensor]) -> None:
    """Raise if the gradient's graph holds the error node of a ``once_differentiable`` backward.

    torch makes such a node raise when a second backward reaches it, but a second backward with
    respect to the parameters never does (the node leads to no parameter and is pruned): its
    curvature would be silently dropped, so it is looked for once per micro-batch graph here.
    """
    stack, seen = [g.grad_fn for g in grads], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node.name() == "torch::autograd::Error":
            raise DoubleBackwardError(
                "an operation of the model or loss has a backward marked once_differentiable (a custom "
                "autograd.Function): torch cannot differentiate it twice, and its curvature would be "
                "dropped from the Hessian-vector products. B_noise needs a model and loss torch can "
                "differentiate twice"
            )
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)


def _hvp(
    grads: Sequence[torch.Tensor], vector: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``H v`` per parameter, ``H`` the Hessian whose gradient graph is ``grads`` (freed after)."""
    pairs = [(g, v) for g, v in zip(grads, vector, strict=True) if g.requires_grad]
    try:
        hv = torch.autograd.grad(
            [g for g, _ in pairs], params, grad_outputs=[v for _, v in pairs], allow_unused=True
        )
    except RuntimeError as exc:
        raise DoubleBackwardError(
            "B_noise needs Hessian-vector products (a second backward through the model and the loss), "
            f"and torch could not take one: {exc}. Replace the operation without a double backward (a fused "
            "or custom autograd kernel; for attention, run the probe inside torch.nn.attention.sdpa_kernel("
            "SDPBackend.MATH)) or probe a model without it."
        ) from exc
    return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params, strict=True)]


def hessian_weighted_stats(gram: torch.Tensor, cross: torch.Tensor, sizes: torch.Tensor) -> NoiseStats:
    """Unbiased |G|^2, tr(Sigma), G^T H G and tr(H Sigma) of one batch (module docstring).

    Plain and H-weighted squared norms of the micro-batch gradients and of their big batch go
    through :func:`noisescale.estimators.microbatch_stats` as two series.

    Args:
        gram: ``[..., k, k]`` with ``gram[..., i, j] = g_i . g_j`` (any leading batch dims).
        cross: ``[..., k, k]`` with ``cross[..., j, i] = g_j . H_{i+1} g_i`` (:func:`hvp_products`).
        sizes: ``[k]`` examples per micro-batch.

    Returns:
        NoiseStats with fields ``[..., 2]``: series 0 ``(|G|^2, tr Sigma)``, series 1
        ``(G^T H G, tr(H Sigma))``.

    Raises:
        ValueError: if ``k < 3``.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # k = 3, H = I
        >>> s = hessian_weighted_stats(g @ g.T, g @ g.T, torch.ones(3, dtype=torch.float64))
        >>> [torch.allclose(*pair) for pair in (s.grad_norm_sq, s.trace_sigma)]
        [True, True]
    """
    k = gram.shape[-1]
    if k < MIN_MICROBATCHES:
        raise ValueError(f"got {k} micro-batches; B_noise needs k >= {MIN_MICROBATCHES} (module docstring)")
    idx = torch.arange(k)
    pair = (idx[:, None] != idx) & (idx[:, None] != (idx + 1) % k)  # [j, i]: j outside {i, i+1}
    w = sizes.to(gram.dtype) / sizes.sum()
    w2 = w.square().sum()
    diag_h = cross.diagonal(dim1=-2, dim2=-1)  # [..., k]: q_i = g_i . H_{i+1} g_i
    c = cross[..., pair].mean(-1)  # [...]: unbiased G^T H G
    big_h = (w.square() * diag_h).sum(-1) + (1 - w2) * c
    big = torch.einsum("i,...ij,j->...", w, gram, w)  # |sum_i w_i g_i|^2
    small = torch.stack([gram.diagonal(dim1=-2, dim2=-1), diag_h], -1).movedim(-2, 0)  # [k, ..., 2]
    return microbatch_stats(small, sizes, torch.stack([big, big_h], -1), effective_batch_size(w, sizes))


def ratio_rows(stats: NoiseStats) -> torch.Tensor:
    """The (denominator, numerator) rows of B_simple, B_noise and eps_max, for :func:`ema_fold`.

    Args:
        stats: :func:`hessian_weighted_stats` of one or more batches, fields ``[..., 2]``.

    Returns:
        ``[..., 2, 3]``: series :data:`RATIOS` ``(|G|^2, tr Sigma)``, ``(G^T H G, tr(H Sigma))`` and
        ``(G^T H G, |G|^2)``.
    """
    (g2, ghg), (tr_s, tr_hs) = stats.grad_norm_sq.unbind(-1), stats.trace_sigma.unbind(-1)
    return torch.stack([torch.stack([g2, ghg, ghg], -1), torch.stack([tr_s, tr_hs, g2], -1)], -2)


def estimate_b_noise(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    microbatches: int = 4,
    units_per_example: int = 1,
    confidence: float = 0.95,
) -> BNoiseEstimate:
    """B_noise, B_simple and eps_max of a model at its current parameters, from Hessian-vector products.

    Every batch is split into ``microbatches`` micro-batches; each gives one unbiased estimate of
    G^T H G, tr(H Sigma), |G|^2 and tr(Sigma) (module docstring), averaged over the batches. The
    parameters must not change while ``batches`` is consumed; the batches should be independent
    draws (with replacement). Batches move to the device of the model's first parameter.

    Args:
        model: the model (its mode is left as it is: put BatchNorm or dropout models in the mode
            whose loss you want the curvature of).
        loss_fn: ``loss_fn(model(inputs), targets)``, the MEAN loss over the examples (a scalar).
        batches: yields ``(inputs [B, *F], targets [B, *T])``; 30 or more batches for an interval
            worth reading, at least 2 for any.
        microbatches: k >= 3 micro-batches per batch (each batch needs at least k examples).
        units_per_example: units each example (row of dim 0) carries when batch sizes count them,
            e.g. the ``T`` tokens of a language-model window whose loss is the mean over its
            tokens: B_noise and B_simple are then in tokens (``T`` times their value in windows).
        confidence: level of the intervals, in (0, 1).

    Returns:
        :class:`BNoiseEstimate` (batch sizes in the unit the loss averages over).

    Raises:
        ValueError: on ``microbatches < 3``, a batch with fewer than k examples or unequal lengths,
            no batches, a non-scalar loss, or no trainable parameter.
        TypeError: if a batch is not a pair of tensors.
        DoubleBackwardError: if the model or loss has an operation without a double backward.

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> model = nn.Linear(3, 1)
        >>> data = [(torch.randn(32, 3), torch.randn(32, 1)) for _ in range(40)]
        >>> est = estimate_b_noise(model, nn.functional.mse_loss, data, microbatches=4)
        >>> est.batches, est.examples, est.resolved
        (40, 1280, True)

    References:
        McCandlish et al. (2018), arXiv:1812.06162, eqs. (2.6), (2.8), (2.9), appendix A.1.
    """
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < MIN_MICROBATCHES:
        raise ValueError(
            f"Expected `microbatches` to be an integer >= {MIN_MICROBATCHES} but got {microbatches!r}: each "
            "micro-batch's H-weighted norm takes its Hessian from another micro-batch, and the big batch's "
            "cross terms need a third"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"Expected `confidence` in (0, 1) but got {confidence}")
    if isinstance(units_per_example, bool) or not isinstance(units_per_example, int) or units_per_example < 1:
        raise ValueError(f"Expected `units_per_example` to be an integer >= 1 but got {units_per_example!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows, examples = [], 0
    for index, batch in enumerate(batches):
        x, y = _check_batch(batch, index, microbatches)
        gram, cross, sizes = hvp_products(model, loss_fn, x.to(device), y.to(device), microbatches)
        rows.append(ratio_rows(hessian_weighted_stats(gram, cross, sizes * units_per_example)))
        examples += len(y) * units_per_example
    if not rows:
        raise ValueError("`batches` yielded no batch: pass an iterable of (inputs, targets) pairs")
    state, finite = ema_fold(ema_init(len(RATIOS)), torch.stack(rows), [1.0] * len(rows))
    used = int(finite.sum())
    iv = b_simple_interval(state, confidence)
    return _estimate(iv, used, len(rows) - used, examples, microbatches, confidence)


def _check_batch(batch: object, index: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(f"batch {index}: expected a pair (inputs, targets) but got a {type(batch).__name__}")
    x, y = batch
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"batch {index}: expected tensors but got {type(x).__name__}, {type(y).__name__}")
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(
            f"batch {index}: inputs of shape {list(x.shape)}, targets of shape {list(y.shape)}: both need "
            "dim 0 over the examples"
        )
    if len(x) != len(y):
        raise ValueError(f"batch {index}: {len(x)} inputs but {len(y)} targets")
    if len(y) < k:
        raise ValueError(
            f"batch {index} has {len(y)} examples, fewer than the {k} micro-batches: use larger batches "
            "or fewer micro-batches"
        )
    return x, y


def _interval(iv: BSimpleInterval, i: int) -> tuple[float, float] | None:
    return (float(iv.low[i]), float(iv.high[i])) if bool(iv.resolved[i]) else None


def _why_not(iv: BSimpleInterval, confidence: float, used: int) -> str | None:
    """Why B_noise (series 1) is not resolved, or None."""
    if bool(iv.resolved[1]):
        return None
    if used == 0:
        return (
            "every batch gave non-finite gradients or Hessian-vector products (skipped_batches): check the "
            "loss and the data for NaN/inf"
        )
    g_h_g, trace_h_sigma = float(iv.grad_norm_sq[1]), float(iv.trace_sigma[1])
    if not float(iv.n_eff[1]) > 1.5:
        return "one batch gives no spread to judge it by: pass 2 or more batches (30 or more for an interval)"
    if not g_h_g > 0:
        return (
            f"the averaged G^T H G is {g_h_g:.3g} <= 0: the loss curves downward along the gradient "
            "(negative curvature) or the curvature is below the noise; the quadratic model of eqs. 2.4-2.8 "
            "then has no optimal step, so B_noise and eps_max are undefined here, not large"
        )
    if not trace_h_sigma > 0:
        return (
            f"the averaged tr(H Sigma) is {trace_h_sigma:.3g} <= 0: the curvature is negative where the "
            "gradient noise lies (H is not positive semi-definite there), and B_noise is not a batch size"
        )
    return f"G^T H G is not significantly positive at the {confidence:.0%} level: average more batches"


def _estimate(
    iv: BSimpleInterval, used: int, skipped: int, examples: int, k: int, confidence: float
) -> BNoiseEstimate:
    def value(i: int) -> float | None:
        return float(iv.b_simple[i]) if bool(iv.resolved[i]) else None

    eps_ok = bool(iv.resolved[2]) and bool(iv.resolved[0]) and float(iv.low[2]) > 0
    return BNoiseEstimate(
        b_noise=value(1),
        b_noise_ci=_interval(iv, 1),
        b_noise_se=float(iv.se[1]) if bool(iv.resolved[1]) else None,
        trace_h_sigma=float(iv.trace_sigma[1]),
        g_h_g=float(iv.grad_norm_sq[1]),
        b_simple=value(0),
        b_simple_ci=_interval(iv, 0),
        grad_norm_sq=float(iv.grad_norm_sq[0]),
        trace_sigma=float(iv.trace_sigma[0]),
        eps_max=value(2) if eps_ok else None,
        eps_max_ci=_interval(iv, 2) if eps_ok else None,
        resolved=bool(iv.resolved[1]),
        reason=_why_not(iv, confidence, used),
        batches=used,
        skipped_batches=skipped,
        examples=examples,
        microbatches=k,
        confidence=confidence,
    )
