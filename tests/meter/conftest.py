"""One 2-process gloo spawn shared by the meter tests that need DDP (process start-up dominates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed.harness import run_spawned
from tests.meter import contract


@pytest.fixture(scope="session")
def ddp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What :func:`tests.meter.contract.worker` returned on each of the 2 ranks."""
    return run_spawned(contract.worker, 2, Path(tmp_path_factory.mktemp("meter-ddp")))
