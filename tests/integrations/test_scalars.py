"""The flat scalars every logger gets: the preconditioned estimate next to the raw one."""

from __future__ import annotations

import pytest
import torch

from noisescale import GradientNoiseScale
from noisescale.integrations import estimate_scalars
from tests import oracle
from tests.meter.test_meter import linreg_model, run_steps


def test_preconditioned_scalars_follow_the_raw_ones() -> None:
    model = linreg_model()
    meter = GradientNoiseScale(
        model, method="microbatch", ema_decay=1.0, preconditioner={model.weight: oracle.PRECONDITIONER[None]}
    )
    run_steps(meter, model, torch.Generator().manual_seed(0), steps=40, sizes=[8, 8])
    est = meter.compute()
    scalars = estimate_scalars(est, groups=False)
    assert est.preconditioned is not None and est.preconditioned.b_simple is not None
    assert scalars["noise_scale/preconditioned/b_simple"] == pytest.approx(est.preconditioned.b_simple)
    assert scalars["noise_scale/preconditioned/trace_sigma"] == pytest.approx(est.preconditioned.trace_sigma)
    assert scalars["noise_scale/preconditioned/resolved"] == 1.0
    assert scalars["noise_scale/b_simple"] == pytest.approx(est.b_simple)
    plain = estimate_scalars(est._replace(preconditioned=None), groups=False)
    assert set(scalars) - set(plain) == {
        f"noise_scale/preconditioned/{k}" for k in ("b_simple", "grad_norm_sq", "trace_sigma", "resolved")
    }
