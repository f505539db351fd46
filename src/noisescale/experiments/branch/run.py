"""Training a branched measurement: the base run with its checkpoints, then the branches, each saved at once.

The directory (every file written atomically)::

    config.json                  the BranchConfig (a re-run with other settings is refused)
    base/point_<i>.pt            the base run's state at branch point i (weights, optimizer, data
                                 stream, meter, its curve so far)
    base.json                    the finished base run: its checks and its branch points
    branches/p<i>_k<kappa>_r<r>.json   one record per finished branch: losses at the checks

A killed run resumes: the base continues from its last checkpoint (the same steps as an
uninterrupted run: every run is deterministic given the seed and the torch threads), and
finished branches are kept, unfinished ones redone.

The base run trains the task's model with the :class:`~noisescale.experiments.training.Trainer`
at ``B`` and measures B_simple with the meter (per-example norms by default); it evaluates the
training loss on a fixed subset (:class:`~noisescale.experiments.evaluation.Probe`) on a geometric
schedule of steps and at every examples point. A branch copies the checkpoint's weights and
optimizer state into a trainer at ``kappa B`` and learning rate ``eta kappa^p``, draws its own
data (the same stream for every ``kappa`` of a replica: the branches differ by their batch
size only) and evaluates the same subset at the same examples.

References:
    Merrill et al. (2025), Critical Batch Size Revisited, arXiv:2505.23971, section 3.1.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from noisescale.errors import BranchConfigError
from noisescale.experiments.branch.config import BranchConfig
from noisescale.experiments.evaluation import Probe
from noisescale.experiments.tasks import Task
from noisescale.experiments.training import Trainer
from noisescale.io import VERSION_KEY, atomic_open, package_version, prepare_settings_dir, write_json

__all__ = [
    "BranchRecord",
    "branch_seed",
    "load_branches",
    "load_state",
    "prepare_branch_dir",
    "restore_state",
    "run_base",
    "run_branches",
]

State = dict[str, Any]


def prepare_branch_dir(out: str | Path, config: BranchConfig) -> bool:
    """Create the directory with its ``config.json``, or check that it holds this measurement.

    Returns:
        True when resuming.

    Raises:
        BranchConfigError: if ``out`` cannot hold it or holds another measurement (naming the
            settings that differ).
    """
    resumed = prepare_settings_dir(
        out, config.to_dict(), what="branched measurement", error=BranchConfigError, subdir="branches"
    )
    for stale in Path(out, "base").glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return resumed


def branch_seed(seed: int, point: int, replica: int) -> int:
    """The data stream of replica ``replica`` at point ``point``: the same for every ``kappa``."""
    return int(np.random.SeedSequence([seed, point, replica]).generate_state(1, np.uint64)[0] >> 1)


def _trainer_state(trainer: Trainer, cpu: float, base: dict[str, Any]) -> State:
    """Everything the base run needs to continue, and the branches to start."""
    return {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "generator": trainer.generator.get_state(),
        "meter": None if trainer.meter is None else trainer.meter.state_dict(),
        "steps": trainer.steps_done,
        "examples": trainer.examples,
        "cpu_time_s": cpu,
        "base": json.dumps(base),  # the curve and the points so far
    }


def restore_state(trainer: Trainer, state: State, *, lr: float | None = None) -> None:
    """Load a checkpoint's weights and optimizer state (and, for the base, its data stream and meter).

    With ``lr`` (a branch) the optimizer takes that learning rate and the trainer keeps its own
    data stream; the step and example counts continue from the checkpoint's.
    """
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if lr is None:
        trainer.generator.set_state(state["generator"])
        if trainer.meter is not None and state["meter"] is not None:
            trainer.meter.load_state_dict(state["meter"])
    else:
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
    trainer.steps_done, trainer.examples = int(state["steps"]), int(state["examples"])


def _save_state(path: Path, state: State) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_state(out: str | Path, point: int) -> State:
    """The base run's checkpoint at branch point ``point``."""
    return torch.load(Path(out, "base", f"point_{point}.pt"), map_location="cpu", weights_only=True)


def run_base(task: Task, config: BranchConfig, out: str | Path) -> dict[str, Any]:
    """Train the base run to its last branch point (or its budget), saving a checkpoint at each.

    Returns:
        The base record (``base.json``): ``curve`` (per check: step, examples, loss, b_simple,
        b_simple_ci), ``points`` (per branch point: index, kind, target, step, examples, loss,
        b_simple, b_simple_ci, truth), ``readings`` (per reading loss reached: target and the
        check), ``unreached`` loss points and readings, ``examples`` and ``cpu_time_s``.
    """
    path = Path(out, "base.json")
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    probe = Probe(task, config.eval_examples, 0)
    saved = sorted(Path(out, "base").glob("point_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    with Trainer(task, config.train_config(task)) as trainer:
        base: dict[str, Any] = {"curve": [], "points": [], "readings": []}
        cpu = 0.0
        if saved:
            state = torch.load(saved[-1], map_location="cpu", weights_only=True)
            restore_state(trainer, state)
            base, cpu = json.loads(state["base"]), float(state["cpu_time_s"])
        else:
            base["curve"].append(_check(trainer, probe, measured=False))
            if 0 in config.points:  # at initialisation
                _add_point(task, trainer, out, base, ("examples", 0.0), base["curve"][0], cpu)
        reached = {p["target"] for p in base["points"] if p["kind"] == "loss"}
        read = {r["target"] for r in base["readings"]}
        pending_e = [p for p in config.points if p > trainer.examples]
        pending_l = [v for v in config.loss_points if v not in reached]
        pending_r = [v for v in config.readings if v not in read]
        next_check = max(trainer.steps_done + 1, math.ceil(trainer.steps_done * config.eval_growth))
        start = time.process_time()
        while (pending_e or pending_l or pending_r) and trainer.examples < config.max_examples:
            trainer.step()
            at_point = bool(pending_e) and trainer.examples == pending_e[0]
            if not at_point and trainer.steps_done < next_check:
                continue
            next_check = max(trainer.steps_done + 1, math.ceil(trainer.steps_done * config.eval_growth))
            check = _check(trainer, probe, measured=True)
            base["curve"].append(check)
            new = []
            if at_point:
                new.append(("examples", float(pending_e.pop(0))))
            while pending_l and check["loss"] is not None and check["loss"] <= pending_l[0]:
                new.append(("loss", pending_l.pop(0)))
            while pending_r and check["loss"] is not None and check["loss"] <= pending_r[0]:
                base["readings"].append({"target": pending_r.pop(0), **check})
            for point in new:
                _add_point(task, trainer, out, base, point, check, cpu + time.process_time() - start)
        base.update(
            unreached=sorted(pending_l + pending_r, reverse=True),
            examples=trainer.examples,
            cpu_time_s=cpu + time.process_time() - start,
        )
    write_json(path, base)
    return base


def _add_point(
    task: Task,
    trainer: Trainer,
    out: str | Path,
    base: dict[str, Any],
    point: tuple[str, float],
    check: Any,
    cpu: float,
) -> None:
    """Record a branch point (kind, target) at the trainer's state and save its checkpoint."""
    truth = None if task.truth is None else task.truth(trainer.model)
    kind, target = point
    base["points"].append(
        {"index": len(base["points"]), "kind": kind, "target": target, **check, "truth": truth}
    )
    _save_state(Path(out, "base", f"point_{len(base['points']) - 1}.pt"), _trainer_state(trainer, cpu, base))


def _check(trainer: Trainer, probe: Probe, *, measured: bool) -> dict[str, Any]:
    """The training loss on the probe's subset and the meter's B_simple, at the trainer's step."""
    loss = probe.train_loss(trainer.model)
    est = trainer.estimate() if measured else None
    return {
        "step": trainer.steps_done,
        "examples": trainer.examples,
        "loss": loss if math.isfinite(loss) else None,
        "b_simple": None if est is None else est.b_simple,
        "b_simple_ci": None if est is None or est.b_simple_ci is None else list(est.b_simple_ci),
    }


class BranchRecord(NamedTuple):
    """One finished branch (``branches/p<i>_k<kappa>_r<r>.json``)."""

    point: int
    kappa: int
    replica: int
    batch_size: int  # kappa B, in the task's unit
    lr: float
    seed: int  # its data stream
    examples: tuple[int, ...]  # [T] examples since the branch point at each check (0 first)
    loss: tuple[float | None, ...]  # [T] training loss on the fixed subset; None after a divergence
    cpu_time_s: float
    wall_time_s: float

    @property
    def name(self) -> str:
        """File stem."""
        return f"p{self.point}_k{self.kappa}_r{self.replica}"

    def to_json(self) -> dict[str, Any]:
        """The record file's object."""
        return {**self._asdict(), VERSION_KEY: package_version()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BranchRecord:
        """Inverse of :meth:`to_json`.

        Raises:
            KeyError, TypeError, ValueError: on a record that is not one.
        """
        values = {k: d[k] for k in cls._fields}
        values.update(examples=tuple(int(e) for e in d["examples"]), loss=tuple(d["loss"]))
        return cls(**values)


def train_branch(
    task: Task,
    config: BranchConfig,
    point: int,
    state: State,
    kappa: int,
    replica: int,
    probe: Probe,
    start_loss: float,
) -> BranchRecord:
    """Train one branch from a checkpoint for its point's window of examples, evaluating at the checks."""
    wall, cpu = time.perf_counter(), time.process_time()
    window = config.window_at(int(state["examples"]))
    size, lr, seed = (
        kappa * config.batch_size,
        config.branch_lr(kappa),
        branch_seed(config.seed, point, replica),
    )
    train_config = config.train_config(
        task, batch_size=size, lr=lr, method=None, microbatches=1, seed=seed, steps=window // size
    )
    marks = config.check_examples(window)
    losses: list[float | None] = [start_loss]
    with Trainer(task, train_config) as trainer:
        restore_state(trainer, state, lr=lr)
        begin = trainer.examples
        for mark in marks[1:]:
            while trainer.examples - begin < mark:
                trainer.step()
            loss = probe.train_loss(trainer.model)
            if not math.isfinite(loss):  # diverged: nothing later can keep up
                losses += [None] * (len(marks) - len(losses))
                break
            losses.append(loss)
    return BranchRecord(
        point,
        kappa,
        replica,
        size,
        lr,
        seed,
        marks,
        tuple(losses),
        time.process_time() - cpu,
        time.perf_counter() - wall,
    )


def load_branches(
    out: str | Path, config: BranchConfig, base: dict[str, Any]
) -> dict[tuple[int, int, int], BranchRecord]:
    """The finished branches of a directory, by ``(point, kappa, replica)``, for the points of ``base``.

    A record that cannot be read, or was made with other settings, is ignored (its branch redone).
    """
    records = {}
    windows = [config.check_examples(config.window_at(p["examples"])) for p in base["points"]]
    for path in Path(out, "branches").glob("*.json"):
        try:
            r = BranchRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        ok = r.kappa in config.kappas and r.replica < config.replicas and 0 <= r.point < len(windows)
        ok = ok and r.examples == windows[r.point] and len(r.loss) == len(r.examples)
        if ok and r.lr == config.branch_lr(r.kappa) and path.stem == r.name:
            records[(r.point, r.kappa, r.replica)] = r
    return records


def run_branches(
    task: Task,
    config: BranchConfig,
    out: str | Path,
    base: dict[str, Any],
    *,
    on_plan: Callable[[int], None] | None = None,
    on_record: Callable[[BranchRecord], None] | None = None,
) -> dict[tuple[int, int, int], BranchRecord]:
    """Train every branch that has no record yet, point by point; each record is written at once.

    Args:
        task: the task.
        config: the measurement.
        out: its directory.
        base: :func:`run_base`'s record.
        on_plan: called with the number of branches still to train.
        on_record: called with every branch trained now.

    Returns:
        Every branch record, by ``(point, kappa, replica)``.
    """
    done = load_branches(out, config, base)
    keys = [(p["index"], k, r) for p in base["points"] for r in range(config.replicas) for k in config.kappas]
    todo = [key for key in keys if key not in done]
    if on_plan is not None:
        on_plan(len(todo))
    probe = Probe(task, config.eval_examples, 0)
    state: State | None = None
    for point, kappa, replica in todo:
        if state is None or state["index"] != point:
            state = {**load_state(out, point), "index": point}
        start_loss = base["points"][point]["loss"]
        record = train_branch(task, config, point, state, kappa, replica, probe, start_loss)
        write_json(Path(out, "branches", f"{record.name}.json"), record.to_json())
        done[(point, kappa, replica)] = record
        if on_record is not None:
            on_record(record)
    return done
