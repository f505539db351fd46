"""`noisescale measure` launched by torchrun: FSDP2 on one node, DDP over two nodes, both = one process.

Each run trains the digits task for a few steps and writes summary.json; every launch splits each
step into the same 4 micro-batches (2 per rank, rank-major), so the estimate must equal the
one-process `microbatch` estimate. Tolerance: float32 gradients reduced in another order differ by
a few float32 roundings (eps 6e-8) per step, compounded over the steps' SGD updates (observed
3e-8 relative); 1e-5 is far above that and far below the estimate's statistical spread (its 95%
interval is about +-20% wide here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.harness import free_port

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
REL = 1e-5
MEASURE = ["-m", "noisescale", "measure", "--task", "digits", "--steps", "20", "--threads", "1",
           "--no-progress"]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
KEYS = ("b_simple", "grad_norm_sq", "trace_sigma", "b_simple_se")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("one")
    cmd = [sys.executable, *MEASURE, "--method", "microbatch", "--microbatches", "4", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return _summary(out)


def _same_estimate(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert ref["resolved"] and got["resolved"]
    for key in KEYS:
        assert got[key] == pytest.approx(ref[key], rel=REL), key
    assert got["b_simple_ci"] == pytest.approx(ref["b_simple_ci"], rel=REL)
    assert (got["steps"], got["examples"], got["microbatches"]) == (ref["steps"], ref["examples"], 4)


def test_torchrun_measure_fsdp_equals_one_process(tmp_path: Path, one_process: dict[str, Any]) -> None:
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", *MEASURE, "--fsdp", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = _summary(tmp_path)
    assert (got["method"], got["world_size"]) == ("fsdp", 2)
    _same_estimate(got, one_process)
    assert got["loss"] == pytest.approx(one_process["loss"], rel=REL)  # rank 0 evaluated the whole model


def test_two_torchrun_nodes_equal_one_process(tmp_path: Path, one_process: dict[str, Any]) -> None:
    """Two launchers, one process each, meeting through a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    launchers, logs = [], [tmp_path / f"node{node}.log" for node in (0, 1)]
    for node, log in zip((0, 1), logs, strict=True):
        cmd = [*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node-rank={node}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=scale-out-{port}", "--local-addr=127.0.0.1",
               *MEASURE, "--out", str(tmp_path)]  # fmt: skip
        # Each launcher writes to its own file: with pipes read one launcher after the other, a launcher
        # whose pipe filled up would block, and the other would wait for it at torchrun's exit barrier.
        with log.open("w") as f:
            launchers.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=_env()))
    try:
        for p in launchers:
            p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pass  # the return codes below are then None, and the message shows both launchers' logs
    finally:
        for p in launchers:
            p.kill()  # no-op for a finished one; a hung launcher must not outlive the test
    both = "\n".join(f"{log.name}:\n{log.read_text()[-3000:]}" for log in logs)
    assert [p.returncode for p in launchers] == [0, 0], both
    got = _summary(tmp_path)
    assert (got["method"], got["world_size"]) == ("ddp", 2)
    _same_estimate(got, one_process)
