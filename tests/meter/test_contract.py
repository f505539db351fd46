"""The shared contract: every method through the same checks (torchmetrics' MetricTester, optax's
common tests). Variants: ``microbatch`` and ``per_example`` in one process, ``ddp`` and
``per_example`` on 2 gloo processes (127.0.0.1), each with and without ``dataset_size``.

- ``compute()`` before any update returns an unresolved estimate with ``steps == 0`` and NaN
  parts (no error, no warning);
- a ``state_dict`` saved mid-run (through ``torch.save``) and loaded into a new meter ends with
  exactly the estimate of the meter that never stopped;
- ``reset()`` gives the estimate before any update, then exactly a fresh meter's;
- the meter is not picklable and not deep-copyable: a ``TypeError`` says to save its
  ``state_dict`` (decided: it holds hooks on a model);
- DDP equals one process on the same micro-batches (float64; the same arithmetic in another
  order: 1e-10 relative, see tests/distributed/test_ddp.py), and every rank holds the same numbers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest

from tests.meter import contract

pytestmark = pytest.mark.distributed
REL = 1e-10
CASES = [(v, n) for v in contract.VARIANTS for n in (None, contract.DATASET_SIZE)]
IDS = [f"{v}-{'N' if n else 'inf'}" for v, n in CASES]


def _same(got: Any, ref: Any, rel: float = 0.0) -> bool:
    """Equal to ``rel`` (0: exactly), NaN equal to NaN, through nested dicts and lists."""
    if isinstance(ref, dict):
        return (
            isinstance(got, dict)
            and got.keys() == ref.keys()
            and all(_same(got[k], ref[k], rel) for k in ref)
        )
    if isinstance(ref, list | tuple):
        return len(got) == len(ref) and all(_same(a, b, rel) for a, b in zip(got, ref, strict=True))
    if isinstance(ref, float) and isinstance(got, float):
        return (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref, rel=rel, abs=0.0)
    return bool(got == ref)


@functools.cache
def _single(variant: str, dataset_size: int | None) -> dict[str, Any]:
    return contract.run(variant, dataset_size)


def _result(variant: str, dataset_size: int | None, ddp_ranks: list[dict[str, Any]]) -> dict[str, Any]:
    if contract.VARIANTS[variant][1]:
        return ddp_ranks[0][f"{variant}/{dataset_size}"]
    return _single(variant, dataset_size)


@pytest.mark.parametrize(("variant", "dataset_size"), CASES, ids=IDS)
def test_compute_before_any_update(
    variant: str, dataset_size: int | None, ddp_ranks: list[dict[str, Any]]
) -> None:
    before = _result(variant, dataset_size, ddp_ranks)["before"]
    assert before["steps"] == 0 and before["examples"] == 0 and before["n_eff"] == 0.0
    assert before["resolved"] is False
    assert before["b_simple"] is None and before["b_simple_ci"] is None and before["b_simple_se"] is None
    assert math.isnan(before["grad_norm_sq"]) and math.isnan(before["trace_sigma"])
    assert before["contradiction"] is None


@pytest.mark.parametrize(("variant", "dataset_size"), CASES, ids=IDS)
def test_state_dict_round_trip_resumes_identically(
    variant: str, dataset_size: int | None, ddp_ranks: list[dict[str, Any]]
) -> None:
    got = _result(variant, dataset_size, ddp_ranks)
    assert got["full"]["steps"] == contract.STEPS and got["full"]["resolved"]
    assert got["resumed"] == got["full"]  # exact: the same sums folded in the same order


@pytest.mark.parametrize(("variant", "dataset_size"), CASES, ids=IDS)
def test_reset_forgets_everything(
    variant: str, dataset_size: int | None, ddp_ranks: list[dict[str, Any]]
) -> None:
    got = _result(variant, dataset_size, ddp_ranks)
    assert _same(got["after_reset"], got["before"])
    # Under DDP the reset meter's exchanges (so its folds) fall at other steps than the fresh
    # one's: the same sums in another grouping, equal to float64 rounding.
    assert _same(got["reset"], got["fresh"], rel=1e-12)
    assert got["reset"]["steps"] == contract.STEPS - contract.SAVE_AT


@pytest.mark.parametrize(("variant", "dataset_size"), CASES, ids=IDS)
def test_pickle_and_deepcopy_are_refused_with_the_fix(
    variant: str, dataset_size: int | None, ddp_ranks: list[dict[str, Any]]
) -> None:
    got = _result(variant, dataset_size, ddp_ranks)
    for key in ("pickle", "deepcopy"):
        assert "cannot be pickled or copied" in got[key] and "state_dict()" in got[key]


@pytest.mark.parametrize(
    ("variant", "dataset_size"),
    [c for c in CASES if contract.VARIANTS[c[0]][1]],
    ids=[i for c, i in zip(CASES, IDS, strict=True) if contract.VARIANTS[c[0]][1]],
)
def test_ddp_equals_one_process_on_the_same_microbatches(
    variant: str, dataset_size: int | None, ddp_ranks: list[dict[str, Any]]
) -> None:
    reference = _single("per_example" if variant.startswith("per_example") else "microbatch", dataset_size)
    got = ddp_ranks[0][f"{variant}/{dataset_size}"]
    assert _same(ddp_ranks[1][f"{variant}/{dataset_size}"], got)  # every rank holds the same numbers
    assert got["method"] == contract.VARIANTS[variant][0]
    for name in ("full", "resumed", "reset"):
        ref, est = reference[name], got[name]
        assert est["steps"] == ref["steps"] and est["examples"] == ref["examples"]
        assert est["resolved"] == ref["resolved"]
        for key in ("grad_norm_sq", "trace_sigma", "b_simple", "b_simple_se", "b_simple_ci"):
            assert _same(est[key], ref[key], REL), (name, key, est[key], ref[key])
        for group in ref["groups"]:
            assert est["groups"][group]["trace_sigma"] == pytest.approx(
                ref["groups"][group]["trace_sigma"], rel=REL
            )
