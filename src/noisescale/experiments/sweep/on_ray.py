"""A sweep's runs as Ray tasks, one CPU each, on a local or remote Ray cluster (``noisescale[ray]``).

The same unit of work as the local process pool: :func:`noisescale.experiments.sweep.run.run_one`
trains one (batch size, learning rate) run with one torch thread and writes its record
atomically to ``<out>/runs/``. Here it is a Ray task asking for one CPU, so Ray runs as many at
once as the cluster has CPUs. The driver (``noisescale sweep``) plans the runs, collects the
records as they finish and fits them, exactly as with local processes: resuming (records
already in ``<out>/runs/`` are kept) and the results are the same, since each run is
deterministic given the sweep's seed.

The sweep directory must be on storage that the driver and every Ray worker see at the same
path (a shared file system, e.g. NFS): the workers write the records there, the driver reads
them back when resuming. Every node needs the same noisescale and torch installed.
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable, Sequence
from typing import Any

from noisescale.errors import SweepConfigError
from noisescale.experiments.sweep.config import RunSpec
from noisescale.experiments.sweep.run import run_one
from noisescale.experiments.sweep.store import RunRecord

__all__ = ["check_reachable", "execute_on_ray"]


def _ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise SweepConfigError(
            "--executor ray needs Ray: pip install 'noisescale[ray]' (or run the sweep with --executor local)"
        ) from None


_CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str | None) -> None:
    """Refuse a cluster address nothing answers at, before Ray retries it for minutes.

    Args:
        address: ``host:port``, ``ray://host:port``, ``"auto"``/``"local"`` or None (not checked).

    Raises:
        SweepConfigError: if no TCP connection to ``host:port`` opens within 10 s; the message
            says how to start or name the cluster.
    """
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            return
    except (OSError, ValueError) as err:
        raise SweepConfigError(
            f"no Ray cluster answers at --address {address} ({err}): start one with `ray start --head` "
            "on that machine and give its address (HOST:6379, or ray://HOST:10001 for Ray Client), or "
            "leave --address out to start a local one"
        ) from None


def execute_on_ray(
    values: dict[str, Any],
    specs: Sequence[RunSpec],
    out: str,
    *,
    address: str | None = None,
    on_record: Callable[[RunSpec, RunRecord], None] | None = None,
) -> dict[RunSpec, RunRecord]:
    """Train ``specs`` as Ray tasks of one CPU each; every task writes its record to ``out``.

    Joins the Ray cluster this process is connected to, else the one at ``address`` (or
    ``RAY_ADDRESS``), else starts a local one on this machine's cores (and stops it after).

    Args:
        values: the sweep's :meth:`~noisescale.experiments.sweep.config.SweepConfig.to_dict`.
        specs: the runs, in the order to submit them.
        out: the sweep directory, at the same path on every node (shared storage).
        address: a Ray cluster's address (``ray://host:10001`` or ``host:6379``), or None.
        on_record: called in this process with every finished run, as it finishes.

    Returns:
        The records of the runs trained.

    Raises:
        SweepConfigError: if Ray is not installed, or nothing answers at ``address``.
    """
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        check_reachable(address)
        ray.init(address=address)
    remote = ray.remote(num_cpus=1)(run_one)
    tasks = {remote.remote(values, (s.batch_size, s.lr_index), out): s for s in specs}
    pending, done = list(tasks), {}
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            spec = tasks[ready[0]]
            done[spec] = ray.get(ready[0])
            if on_record is not None:
                on_record(spec, done[spec])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
    return done
