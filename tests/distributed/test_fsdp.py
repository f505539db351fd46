"""fully_shard (FSDP2) on 2 gloo processes equals one process on the same micro-batches (float64).

The tolerance is the DDP tests' (:mod:`tests.distributed.test_ddp`): the same float64 arithmetic
in another order (reduce-scatter sums, squared norms of the shards summed over the ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed import fsdp_scenarios
from tests.distributed.harness import run_spawned
from tests.distributed.scenarios import WORLD
from tests.distributed.test_ddp import check_equals_single

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_spawned(fsdp_scenarios.worker, WORLD, Path(tmp_path_factory.mktemp("fsdp")))


@pytest.mark.parametrize("name", list(fsdp_scenarios.SCENARIOS))
def test_fsdp_equals_single_process_microbatches(ranks: list[dict[str, Any]], name: str) -> None:
    check_equals_single(ranks, name, fsdp_scenarios.run_single(name), "fsdp")
    assert ranks[0][name]["warnings"] == []


def test_last_backward_without_sync_is_an_error(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert "set_requires_gradient_sync(False)" in r["last-backward-unsynced"]
        assert "grad_sync(model, last=True)" in r["last-backward-unsynced"]


def test_fsdp_misuses_are_refused_clearly(ranks: list[dict[str, Any]]) -> None:
    got = ranks[0]
    assert got["root-not-sharded"].startswith("DistributedSetupError")
    assert "apply fully_shard to the root module" in got["root-not-sharded"]
    assert "method='ddp' measures a DistributedDataParallel model" in got["ddp-method"]
    assert "preconditioner under fully_shard" in got["preconditioner"]
    assert "2-D mesh: noisescale measures fully_shard on a 1-D mesh" in got["hsdp"]
    assert "method='fsdp' measures a fully_shard" in got["fsdp-method-one-process"]
