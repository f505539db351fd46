"""The sweep directory: ``config.json``, one typed record per finished run, written atomically.

::

    config.json             the SweepConfig (refused if a re-run asks for another one)
    runs/<B>_<lr>.json      one RunRecord per finished run, each written atomically
    results.csv             the table of noisescale.critical.sweepdata (see results.py)
    fit.json                noisescale.critical.report's JSON of results.csv

A run is identified by its batch size and learning rate; re-running the sweep skips every run
that has a record and redoes the others (an interrupted run leaves no record). The records'
JSON is that of the first version of the format; :meth:`RunRecord.from_json` reads it, so an
existing sweep directory resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

from noisescale.errors import SweepConfigError
from noisescale.experiments.sweep.config import SWEEP_FORMAT, RunSpec, SweepConfig
from noisescale.io import package_version, prepare_settings_dir, write_json

__all__ = [
    "CurvePoint",
    "GoalRecord",
    "RunRecord",
    "load_records",
    "prepare_sweep_dir",
    "write_record",
]


class CurvePoint(NamedTuple):
    """One check of a run: the metrics on the fixed evaluation subsets and the meter's estimate."""

    step: int  # optimizer steps done (0: the initial weights)
    train_loss: float | None  # mean loss per example on the training subset; None: not evaluated
    test_error: float | None  # fraction misclassified on the test subset; None: not evaluated
    measured: bool = False  # whether the meter was read at this check (the three fields below)
    b_simple: float | None = None  # the meter's smoothed B_simple, in the task's unit; None: not resolved
    grad_norm_sq: float | None = None  # smoothed |G|^2
    trace_sigma: float | None = None  # smoothed tr(Sigma)
    validation_loss: float | None = None  # mean loss per unit on the held-out subset; None: not evaluated
    b_simple_preconditioned: float | None = None  # under Adam, the meter's preconditioned B_simple
    mean_return: float | None = None  # RL: best mean return so far, median over the seeds; None: none yet
    groups: dict[str, float | None] | None = None  # RL: the smoothed B_simple of each group (policy, value)

    def value(self, metric: str) -> float | None:
        """The value of ``metric`` (one of :data:`~noisescale.experiments.sweep.config.METRICS`) here."""
        values = {"train_loss": self.train_loss, "validation_loss": self.validation_loss}
        return (values | {"mean_return": self.mean_return}).get(metric, self.test_error)

    @property
    def loss(self) -> float | None:
        """The loss a run is watched by (diverged, stalled, best): the held-out one where evaluated."""
        return self.train_loss if self.validation_loss is None else self.validation_loss

    def to_json(self) -> dict[str, Any]:
        """``{"step", "train_loss", "test_error"}`` and what else this check has (held-out, meter, RL)."""
        out: dict[str, Any] = {
            "step": self.step,
            "train_loss": self.train_loss,
            "test_error": self.test_error,
        }
        if self.validation_loss is not None:
            out["validation_loss"] = self.validation_loss
        if self.measured:
            out.update(b_simple=self.b_simple, grad_norm_sq=self.grad_norm_sq, trace_sigma=self.trace_sigma)
            if self.b_simple_preconditioned is not None:
                out["b_simple_preconditioned"] = self.b_simple_preconditioned
        rl = {"mean_return": self.mean_return, "groups": self.groups}
        out.update({k: v for k, v in rl.items() if v is not None})
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CurvePoint:
        """Inverse of :meth:`to_json`."""
        return cls(
            int(d["step"]),
            d.get("train_loss"),
            d.get("test_error"),
            "grad_norm_sq" in d,
            d.get("b_simple"),
            d.get("grad_norm_sq"),
            d.get("trace_sigma"),
            d.get("validation_loss"),
            d.get("b_simple_preconditioned"),
            d.get("mean_return"),
            d.get("groups"),
        )


class GoalRecord(NamedTuple):
    """How a run did on one goal (:func:`noisescale.critical.goals.crossing` of its curve)."""

    metric: str  # "train_loss", "validation_loss" or "test_error"
    goal: float  # the level
    reached: bool
    steps: float | None  # steps to the goal, interpolated between checks; None: censored at steps_run
    examples: float | None  # steps * batch size, in the task's unit
    b_simple: float | None  # run-averaged B_simple to the goal (or to the end), in the task's unit
    b_simple_ratio: float | None  # ratio of the step-averaged tr(Sigma) and |G|^2 over the same steps
    steps_low: float | None = None  # the crossing lies in (steps_low, steps_high]; None: censored
    steps_high: float | None = None
    b_simple_preconditioned: float | None = None  # run-averaged preconditioned B_simple (under Adam)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One finished run of a sweep (``runs/<B>_<lr>.json``)."""

    name: str  # file stem, "<B>_<lr>"
    batch_size: int  # in `unit`
    lr: float
    lr_index: int  # the learning rate is epsilon(B) * lr_step**lr_index
    seed: int
    unit: str  # what a batch size counts: images, examples...
    steps_budget: int
    steps_run: int
    examples_run: int  # in `unit`
    stopped: str  # "goals", "budget", "diverged" or "stalled"
    goals: tuple[GoalRecord, ...]  # in the order of SweepConfig.goals
    b_simple: float | None  # run-averaged B_simple over the whole run
    b_simple_ratio: float | None
    final_train_loss: float | None
    curve: tuple[CurvePoint, ...]  # the checks
    wall_time_s: float
    b_simple_preconditioned: float | None = None  # run-averaged preconditioned B_simple (under Adam)
    noisescale_version: str = dataclasses.field(default_factory=package_version)
    format: int = SWEEP_FORMAT

    @property
    def final_loss(self) -> float | None:
        """The last watched loss (:attr:`CurvePoint.loss`): held-out where evaluated, else training."""
        return next((p.loss for p in reversed(self.curve) if p.loss is not None), None)

    @property
    def spec(self) -> RunSpec:
        """The run's batch size and learning-rate index."""
        return RunSpec(self.batch_size, self.lr_index)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the record file."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["goals"] = [g._asdict() for g in self.goals]
        out["curve"] = [p.to_json() for p in self.curve]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunRecord:
        """Inverse of :meth:`to_json`; reads the records of earlier versions too.

        Raises:
            KeyError, TypeError, ValueError: on a record that is not one.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["goals"] = tuple(
            GoalRecord(**{k: v for k, v in g.items() if k in GoalRecord._fields}) for g in d["goals"]
        )
        values["curve"] = tuple(CurvePoint.from_json(p) for p in d["curve"])
        values["batch_size"], values["lr_index"] = int(d["batch_size"]), int(d["lr_index"])
        return cls(**values)


def write_record(out: str | Path, config: SweepConfig, record: RunRecord) -> Path:
    """Write ``record`` atomically to ``<out>/runs/<B>_<lr>.json``; returns the path."""
    path = Path(out) / "runs" / f"{record.spec.name(config)}.json"
    write_json(path, record.to_json())
    return path


def prepare_sweep_dir(out: str | Path, config: SweepConfig) -> bool:
    """Create the sweep directory with its ``config.json``, or check that it holds this sweep.

    Stale temporary files of writes that were killed are removed.

    Args:
        out: the sweep directory.
        config: the sweep to run there.

    Returns:
        True when resuming a sweep (``config.json`` was already there).

    Raises:
        SweepConfigError: if ``out`` cannot be a directory (e.g. it is a file) or is not
            writable, or ``config.json`` describes another sweep (the message lists the settings
            that differ) or cannot be read.
    """
    # Settings added since a sweep was started hold their defaults there (its runs used them).
    defaults = {
        f.name: f.default for f in dataclasses.fields(SweepConfig) if f.default is not dataclasses.MISSING
    }
    return prepare_settings_dir(
        out, config.to_dict(), what="sweep", error=SweepConfigError, subdir="runs", defaults=defaults
    )


def load_records(out: str | Path, config: SweepConfig) -> dict[RunSpec, RunRecord]:
    """The finished runs of a sweep directory, by run.

    A record that cannot be read (not expected: records are written atomically) or that belongs
    to no run of this configuration is ignored, so its run is redone.
    """
    records: dict[RunSpec, RunRecord] = {}
    for path in sorted(Path(out, "runs").glob("*.json")):
        try:
            record = RunRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
            spec = record.spec
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if spec.batch_size in config.batch_sizes and path.stem == spec.name(config):
            records[spec] = record
    return records
