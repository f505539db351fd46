"""The decision rule (noisescale.control.policy): exhaustive grids against a brute-force restatement.

The brute force enumerates every candidate batch (every multiple, every divisor) and picks by the
rule as the module states it; the library finds the same batch by arithmetic. Every grid point also
checks the invariants: multiples of the granule, inside [min, max], integer factors, no decrease
unless allowed, and one estimate never moves the batch twice (idempotence).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from noisescale.control.policy import BatchSizePolicy, ControllerState, decide, next_batch_size

LOWS = [-5.0, 0.0, 1.0, 7.0, 31.0, 64.0, 99.5, 150.0, 400.0, 1e3, 5e3, 1e6]
WIDTHS = [1.0, 1.3, 3.0, 20.0]


def _check_against_brute_force(
    policy: BatchSizePolicy, batch: int, ci: tuple[float, float] | None, new: int
) -> None:
    """The rule as the module states it: the largest multiple within the bound, else the smallest divisor."""
    if ci is None:
        assert new == batch
        return
    low, high = ci
    h, top = policy.hysteresis, policy.max_batch_size
    bound = policy.target_batch_size(low) / (1 + h) if low > 0 else 0.0
    bound = bound if top is None else min(bound, top)
    if 2 * batch <= bound:  # a growth is allowed: the largest multiple of `batch` within the bound
        assert new % batch == 0 and new <= bound < new + batch
        return
    downs = []
    if policy.allow_decrease:
        floor = max(policy.lowest, policy.target_batch_size(high) * (1 + h))
        downs = [c for c in range(1, batch) if batch % c == 0 and c % policy.granule == 0 and c >= floor]
    assert new == (min(downs) if downs else batch)


def _policies() -> list[BatchSizePolicy]:
    out = []
    for micro, world, b0_granules, top_granules, h, down, target in itertools.product(
        (1, 3), (1, 2), (1, 6), (None, 64), (0.0, 0.5), (False, True), ("c1", "c2", "r")
    ):
        g = micro * world
        targets = {"c1": {}, "c2": {"critical_factor": 0.5}, "r": {"exchange_rate": 300.0}}[target]
        out.append(
            BatchSizePolicy(
                batch_size=b0_granules * g,
                micro_batch_size=micro,
                world_size=world,
                max_batch_size=None if top_granules is None else top_granules * g,
                hysteresis=h,
                allow_decrease=down,
                **targets,
            )
        )
    return out


def test_next_batch_follows_the_rule_and_keeps_the_invariants_on_a_grid() -> None:
    for policy in _policies():
        g, lowest, top = policy.granule, policy.lowest, policy.max_batch_size
        starts = {policy.batch_size, lowest, g * 12, g * 30} if policy.allow_decrease else {policy.batch_size}
        for batch in sorted(b for b in starts if lowest <= b and (top is None or b <= top)):
            for ci in [None, *((low, max(low, 1.0) * w) for low, w in itertools.product(LOWS, WIDTHS))]:
                new = next_batch_size(policy, batch, ci)
                _check_against_brute_force(policy, batch, ci, new)
                assert new % g == 0 and new >= lowest and (top is None or new <= top), (policy, batch, ci)
                assert new == batch or new % batch == 0 or (policy.allow_decrease and batch % new == 0)
                assert policy.allow_decrease or new >= batch
                assert next_batch_size(policy, new, ci) == new, "one estimate moved the batch twice"


def test_growth_uses_the_lower_bound_and_shrinking_the_upper() -> None:
    policy = BatchSizePolicy(batch_size=64, micro_batch_size=32, allow_decrease=True, hysteresis=0.0)
    assert next_batch_size(policy, 64, (100.0, 1e6)) == 64  # point estimate far above: low says no
    assert next_batch_size(policy, 64, (128.0, 1e6)) == 128
    assert next_batch_size(policy, 256, (10.0, 100.0)) == 128  # smallest divisor above target(high)
    assert next_batch_size(policy, 256, (10.0, 129.0)) == 256  # 128 < 129: stays


def test_targets_are_the_papers_formulas() -> None:
    critical = BatchSizePolicy(batch_size=8, micro_batch_size=8, critical_factor=0.25)
    rate = BatchSizePolicy(batch_size=8, micro_batch_size=8, exchange_rate=250.0)
    default = BatchSizePolicy(batch_size=8, micro_batch_size=8)
    for b in (0.5, 7.408, 900.0, 3.2e7):
        assert critical.target_batch_size(b) == 0.25 * b
        assert default.target_batch_size(b) == b
        assert rate.target_batch_size(b) == pytest.approx(math.sqrt(250.0 * b), rel=1e-15)


def test_decide_waits_the_minimum_examples_and_records_the_change() -> None:
    policy = BatchSizePolicy(batch_size=16, micro_batch_size=16, min_examples_between=1000, hysteresis=0.0)
    state = ControllerState.initial(policy)
    ci = (1000.0, 2000.0)
    for seen in range(16, 1000, 16):
        state = state._replace(steps=seen // 16, examples=seen)
        assert decide(policy, state, ci) is state
    state = decide(policy, state._replace(steps=63, examples=1008), ci)
    assert (state.batch_size, state.last_change) == (992, 1008)
    grown = state._replace(steps=64, examples=1008 + 992)
    assert decide(policy, grown, (1e5, 2e5)) is grown  # 992 examples since the change: too soon
    assert decide(policy, grown._replace(examples=1008 + 1088), (1e5, 2e5)).batch_size == 992 * 100


def test_a_rising_noise_scale_grows_the_batch_monotonically_and_never_past_the_lower_bound() -> None:
    rng = random.Random(0)
    policy = BatchSizePolicy(
        batch_size=32, micro_batch_size=16, max_batch_size=16 * 500, min_examples_between=2000
    )
    state, changes = ControllerState.initial(policy), []
    for step in range(1, 3001):
        b = 20.0 + state.examples / 150.0  # B_simple rises with examples seen
        spread = 1.0 + rng.uniform(0.1, 0.4)
        ci = None if step < 50 else (b / spread, b * spread)
        before = state
        state = decide(policy, state._replace(steps=step, examples=state.examples + state.batch_size), ci)
        if state.batch_size != before.batch_size:
            assert ci is not None and state.batch_size % before.batch_size == 0
            assert state.batch_size <= ci[0] / 1.1  # the lower bound justified it
            assert not changes or state.examples - changes[-1][0] >= 2000
            changes.append((state.examples, state.batch_size))
    assert len(changes) >= 3
    assert 2 * state.batch_size > policy.max_batch_size  # stopped only by the limit (no integer factor fits)


def test_intervals_that_cover_a_constant_truth_never_reverse_the_batch() -> None:
    rng = random.Random(1)
    for start in (16, 32, 64, 512, 4096):
        policy = BatchSizePolicy(
            batch_size=start,
            micro_batch_size=16,
            max_batch_size=16 * 1024,
            allow_decrease=True,
            min_batch_size=16,
        )
        state, sizes = ControllerState.initial(policy), [start]
        for step in range(1, 500):
            truth = 300.0
            ci = (truth / rng.uniform(1.0, 3.0), truth * rng.uniform(1.0, 3.0))  # always covers the truth
            state = decide(policy, state._replace(steps=step, examples=step * 64), ci)
            sizes.append(state.batch_size)
        ups = any(b > a for a, b in itertools.pairwise(sizes))
        downs = any(b < a for a, b in itertools.pairwise(sizes))
        assert not (ups and downs), (start, sorted(set(sizes)))


@pytest.mark.parametrize("ci", [(5.0, 4.0), (-3.0, 0.0), (1.0, math.inf), (math.nan, 2.0)])
def test_an_interval_no_resolved_estimate_has_is_refused(ci: tuple[float, float]) -> None:
    policy = BatchSizePolicy(batch_size=8, micro_batch_size=8)
    with pytest.raises(ValueError, match="not a resolved estimate's"):
        next_batch_size(policy, 8, ci)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 100, "micro_batch_size": 32}, "use 96 or 128"),
        ({"batch_size": 64, "micro_batch_size": 32, "world_size": 4}, "use 128"),
        ({"batch_size": 64, "micro_batch_size": 32, "max_batch_size": 100}, "max_batch_size"),
        ({"batch_size": 64, "micro_batch_size": 32, "min_batch_size": 48}, "min_batch_size"),
        ({"batch_size": 128, "micro_batch_size": 32, "max_batch_size": 64}, "below `min_batch_size`"),
        (
            {"batch_size": 32, "micro_batch_size": 32, "min_batch_size": 64, "max_batch_size": 128},
            "must lie in",
        ),
        (
            {"batch_size": 64, "micro_batch_size": 32, "critical_factor": 1.0, "exchange_rate": 10.0},
            "one target",
        ),
        ({"batch_size": 64, "micro_batch_size": 32, "critical_factor": math.inf}, "critical_factor"),
        ({"batch_size": 64, "micro_batch_size": 32, "critical_factor": 0.0}, "critical_factor"),
        ({"batch_size": 64, "micro_batch_size": 32, "exchange_rate": math.nan}, "exchange_rate"),
        ({"batch_size": 64, "micro_batch_size": 32, "hysteresis": -0.1}, "hysteresis"),
        ({"batch_size": 64, "micro_batch_size": 32, "hysteresis": math.inf}, "hysteresis"),
        ({"batch_size": 64, "micro_batch_size": 32, "min_examples_between": -1}, "min_examples_between"),
        ({"batch_size": 64, "micro_batch_size": 0}, "micro_batch_size"),
        ({"batch_size": 64.0, "micro_batch_size": 32}, "batch_size"),
        ({"batch_size": 64, "micro_batch_size": 32, "allow_decrease": 1}, "allow_decrease"),
    ],
)
def test_bad_settings_are_refused_before_training(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchSizePolicy(**settings)
