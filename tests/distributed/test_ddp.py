"""DDP on 2 gloo processes equals one process on the same micro-batches (float64).

Tolerance: the DDP and single-process runs do the same float64 arithmetic in a
different order (all-reduce sums, per-rank accumulation), so they agree to about
1e-15 relative per step; over a few SGD steps 1e-10 is ample and still far below any
statistical difference (a different split changes the estimate at the 1e-1 level).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed import scenarios
from tests.distributed.harness import run_spawned

pytestmark = pytest.mark.distributed
REL = 1e-10


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One spawn of 2 processes runs every scenario (process start-up dominates the cost)."""
    return run_spawned(scenarios.worker, scenarios.WORLD, Path(tmp_path_factory.mktemp("ddp")))


def _same(got: Any, ref: Any) -> bool:
    """Equal to REL, or both None (not resolved)."""
    return got is None if ref is None else got == pytest.approx(ref, rel=REL)


def _close(got: dict[str, Any], ref: dict[str, Any]) -> None:
    for key in ("grad_norm_sq", "trace_sigma", "b_simple", "b_simple_se", "b_simple_ci"):
        assert _same(got[key], ref[key]), (key, got[key], ref[key])
    assert got["examples"] == ref["examples"]
    assert got["steps"] == ref["steps"]
    assert (got["preconditioned"] is None) == (ref["preconditioned"] is None)
    if ref["preconditioned"] is not None:  # the weighted rows travel and fold as the raw ones do
        _close(got["preconditioned"], ref["preconditioned"])
        assert got["preconditioned"]["skipped_steps"] == ref["preconditioned"]["skipped_steps"]
    for part in ("groups", "param_groups"):
        assert got[part].keys() == ref[part].keys()
        for name in ref[part]:
            assert got[part][name]["trace_sigma"] == pytest.approx(ref[part][name]["trace_sigma"], rel=REL)
            assert got[part][name]["grad_norm_sq"] == pytest.approx(ref[part][name]["grad_norm_sq"], rel=REL)


def check_equals_single(ranks: list[dict[str, Any]], name: str, ref: dict[str, Any], method: str) -> None:
    """Rank 0's estimate is the one-process ``ref``; rank 1 holds the same; the method as expected."""
    got = ranks[0][name]
    _close(got["estimate"], ref["estimate"])
    assert ranks[1][name]["estimate"] == got["estimate"]  # every rank holds the same numbers
    assert got["method"] == ("per_example" if name.startswith("per-example") else method)


@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_ddp_equals_single_process_microbatches(ranks: list[dict[str, Any]], name: str) -> None:
    check_equals_single(ranks, name, scenarios.run_single(name), "ddp")
    if name != "forward-outside-no-sync":
        assert ranks[0][name]["warnings"] == []


def test_forward_outside_no_sync_warns(ranks: list[dict[str, Any]]) -> None:
    caught = ranks[0]["forward-outside-no-sync"]["warnings"]
    assert len(caught) == scenarios.STEPS
    assert "all-reduced the gradients in 2 of the 2 backward passes" in caught[0]
    assert "no_sync" in caught[0]


def test_every_microstep_under_no_sync_is_an_error(ranks: list[dict[str, Any]]) -> None:
    assert "no DDP gradient all-reduce ran" in ranks[0]["all-no-sync"]
    assert "outside no_sync()" in ranks[1]["all-no-sync"]


def test_rank_zero_and_env(ranks: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["rank_zero"] for r in ranks] == [True, False]


def test_modules_and_param_groups_are_both_mediants(ranks: list[dict[str, Any]]) -> None:
    est = ranks[0]["param-groups"]["estimate"]
    assert set(est["param_groups"]) == {"weights", "biases"}
    for part in ("groups", "param_groups"):
        g = sum(v["grad_norm_sq"] for v in est[part].values())
        s = sum(v["trace_sigma"] for v in est[part].values())
        assert est["grad_norm_sq"] == pytest.approx(g, rel=1e-12)
        assert est["trace_sigma"] == pytest.approx(s, rel=1e-12)


def test_rank_zero_computes_alone_without_a_collective(ranks: list[dict[str, Any]]) -> None:
    """compute() and reset() on rank 0 alone: the steps exchanged so far, no hang, no lost step."""
    r0, r1 = ranks[0]["rank-zero-alone"], ranks[1]["rank-zero-alone"]
    assert r0["alone"] == 4  # steps 0-3 exchanged at step 3; steps 4 and 5 not yet
    assert r0["before_sync"] == 2  # rank 0 reset after step 5: the exchange at step 7 brings 6 and 7
    assert r1["before_sync"] == 8
    assert r1["after_sync"]["steps"] == 10
    assert r0["after_sync"]["steps"] == 4
    assert r0["fresh"] == r1["fresh"]
    _close(r0["after_sync"], r0["fresh"])  # the reset meter kept exactly steps 6-9


def test_remove_warns_about_steps_never_exchanged(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        (message,) = r["rank-zero-alone"]["remove_warnings"]
        assert "dropped the last 1 DDP step" in message and "meter.sync()" in message


def test_remove_on_one_rank_keeps_the_collectives_matched(ranks: list[dict[str, Any]]) -> None:
    assert [r["remove-alone"] for r in ranks] == [0, 3]  # rank 0 dropped its 3 unsent steps; no hang


def test_ranks_with_different_backward_passes_are_an_error(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert "different numbers of backward passes" in r["different-backward-passes"]
