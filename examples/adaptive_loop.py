"""A plain loop whose batch grows with the measured noise scale (linear regression, CPU, about a second).

Run: ``python examples/adaptive_loop.py``. The micro-batch stays at 4 examples; the controller
decides how many of them make a step, from B_simple's 95% interval, by integer factors; the SGD
rule of eq. 2.6 raises the learning rate with the batch, and the warmup-cosine schedule follows
examples seen, not steps. Under torchrun the same loop runs on every rank (``method="ddp"``, the
rank's share of the micro-batches): every rank decides the same.
"""

from __future__ import annotations

import torch

from noisescale import BatchSizeController, GradientNoiseScale, SGDRule
from noisescale.control import WarmupCosine, key_by_examples

MICRO, STEPS = 4, 650


def main() -> BatchSizeController:
    """Train 650 steps of noisy linear regression (5 inputs) with an adaptive batch."""
    torch.manual_seed(0)
    w_star = torch.ones(5, dtype=torch.float64)
    model = torch.nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star + torch.tensor([1.0, -1.0, 0.5, 0.8, -0.6], dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.005)
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=0.98)
    # Warmup over 80 examples, cosine to 10% at 40,000: keyed by examples, so batch changes keep its shape.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup=80, total=40_000, final=0.1))
    controller = BatchSizeController(
        meter, batch_size=8, micro_batch_size=MICRO, max_batch_size=256, optimizer=opt, rule=SGDRule(),
        schedulers=[schedule],  # the rule rescales its base rate at each change
    )  # fmt: skip
    key_by_examples(schedule, lambda: controller.examples)
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        k = controller.micro_batches  # micro-batches of MICRO examples in this step
        for _ in range(k):
            x = torch.randn(MICRO, 5, generator=data, dtype=torch.float64)
            y = x @ w_star + 0.7 * torch.randn(MICRO, generator=data, dtype=torch.float64)
            (0.5 * (model(x).squeeze(1) - y).square().mean() / k).backward()
        meter.update(batch_size=controller.per_rank_batch_size)
        opt.step()
        opt.zero_grad()
        controller.step()  # counts the step's examples; every 10 steps looks at B_simple
        schedule.step()
    return controller


if __name__ == "__main__":
    result = main()
    for change in result.schedule:
        where = f"step {change.step:4d}  examples {change.examples:6,d}"
        print(f"{where}  batch {change.batch_size:4d}  lr {change.lr:.4f}")
    estimate = result.last_estimate
    assert estimate is not None
    print(f"{estimate.describe('examples')} after {result.steps} steps ({result.examples:,} examples)")
