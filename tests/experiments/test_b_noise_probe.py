"""The B_noise probe of ``measure --b-noise`` on the language-model task: tokens, math attention."""

from __future__ import annotations

import math

import pytest
import torch

from noisescale import DoubleBackwardError, estimate_b_noise
from noisescale.experiments.b_noise_probe import BNoiseProbe
from noisescale.experiments.tasks import get_task


def test_shakespeare_probe_counts_tokens_through_math_attention() -> None:
    """The transformer's fused attention has no double backward: the probe runs the math kernel.

    Batch sizes are in tokens: 2 batches of 128 tokens are 2 x 2 windows of T = 64.
    """
    torch.manual_seed(0)
    task = get_task("shakespeare")
    probe = BNoiseProbe(task, 4 * task.units_per_example, microbatches=4, batches=3, every=1, last_step=1)
    model = task.make_model(0)
    est = probe.probe(model)
    assert est.examples == 3 * 4 * task.units_per_example and est.batches == 3 and est.skipped_batches == 0
    assert math.isfinite(est.g_h_g) and math.isfinite(est.trace_h_sigma)
    batch = task.sample_batch(4, torch.Generator().manual_seed(0))
    with pytest.raises(DoubleBackwardError, match=r"SDPBackend\.MATH"):  # what the probe avoids
        estimate_b_noise(model, task.loss_fn, [batch, batch])
