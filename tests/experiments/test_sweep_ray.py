"""A tiny digits sweep on a real local Ray cluster equals the same sweep in local processes.

Every run is deterministic given the sweep's seed (one torch thread per run), so the records
must be equal but for their wall times, and so must results.csv and fit.json; resuming on Ray
trains only what is missing, as it does locally.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from typer.testing import CliRunner

import noisescale
from noisescale.cli.app import app
from noisescale.errors import SweepConfigError
from noisescale.experiments.sweep import RunRecord, RunSpec, SweepConfig, run_sweep
from noisescale.experiments.sweep.on_ray import execute_on_ray

pytestmark = pytest.mark.slow

# Three batch sizes, one learning rate each, one loss goal, at most 60 steps: three short runs.
TINY = {
    "batch_sizes": [8, 16, 32],
    "loss_goals": [1.2],
    "error_goals": [],
    "lr_points": 1,
    "max_widenings": 0,
    "max_steps": 60,
    "min_steps": 20,
}


def tiny() -> SweepConfig:
    return SweepConfig.for_task("digits", **TINY)


def without_wall_time(records: dict[RunSpec, RunRecord]) -> dict[RunSpec, RunRecord]:
    return {k: dataclasses.replace(r, wall_time_s=0.0) for k, r in records.items()}


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray cluster of 2 CPUs; its workers import the noisescale under test."""
    source = str(Path(noisescale.__file__).parents[1])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": source}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("local") / "sweep"
    return out, run_sweep(tiny(), out, jobs=1, n_bootstrap=100)


def test_ray_sweep_equals_local_and_resumes_the_same(
    cluster: None, local: tuple[Path, Any], tmp_path: Path
) -> None:
    local_out, reference = local
    out = tmp_path / "ray"
    result = run_sweep(tiny(), out, executor="ray", n_bootstrap=100)
    assert result.trained == 3
    assert without_wall_time(result.records) == without_wall_time(reference.records)
    for name in ("results.csv", "fit.json", "config.json"):
        assert (out / name).read_text() == (local_out / name).read_text()
    assert not list((out / "runs").glob(".*.tmp"))  # each record was written atomically
    # Resume: a run whose record is gone (a killed worker) is trained again, and only it.
    lost = out / "runs" / f"{RunSpec(8, 0).name(tiny())}.json"
    lost.unlink()
    trained: list[RunSpec] = []
    again = run_sweep(tiny(), out, executor="ray", on_record=lambda s, r: trained.append(s), n_bootstrap=100)
    assert trained == [RunSpec(8, 0)]
    assert without_wall_time(again.records) == without_wall_time(reference.records)
    assert (out / "results.csv").read_text() == (local_out / "results.csv").read_text()


def test_sweep_command_runs_on_ray(cluster: None, local: tuple[Path, Any], tmp_path: Path) -> None:
    """The command line's --executor ray on a finished local sweep directory: nothing left to train."""
    local_out, _ = local
    args = ["sweep", "--task", "digits", "--no-error-goal", "--bootstrap", "100", "--no-progress"]
    for key in ("batch_sizes", "loss_goals", "lr_points", "max_widenings", "max_steps", "min_steps"):
        values = TINY[key] if isinstance(TINY[key], list) else [TINY[key]]
        flag = {"batch_sizes": "--batch-size", "loss_goals": "--loss-goal"}.get(
            key, "--" + key.replace("_", "-")
        )
        args += [x for v in values for x in (flag, str(v))]
    result = CliRunner().invoke(app, [*args, "--out", str(local_out), "--executor", "ray"])
    assert result.exit_code == 0, result.stderr
    assert "3 runs (0 trained now)" in result.stderr


def test_address_without_ray_executor_is_refused(tmp_path: Path) -> None:
    args = ["sweep", "--task", "digits", "--address", "h:6379", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--address is the Ray cluster's: add --executor ray" in result.stderr


def test_missing_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    with pytest.raises(SweepConfigError, match=r"pip install 'noisescale\[ray\]'"):
        execute_on_ray(tiny().to_dict(), [RunSpec(8, 0)], str(tmp_path))


@pytest.mark.parametrize(
    "address", ["127.0.0.1:1", "ray://127.0.0.1:1", "no-such-host.invalid:6379", "nonsense"]
)
def test_an_address_nothing_answers_at_is_refused_at_once(address: str) -> None:
    """Ray itself retries an unreachable address for minutes without an error of its own."""
    from noisescale.errors import SweepConfigError
    from noisescale.experiments.sweep.on_ray import check_reachable

    with pytest.raises(SweepConfigError, match="no Ray cluster answers at --address"):
        check_reachable(address)
    check_reachable(None)  # a local cluster: nothing to check
