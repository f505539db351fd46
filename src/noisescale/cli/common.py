"""What the subcommands share: the choices of their options, option checks and the error line.

The choices are spelled out as enums (typer needs a class, mypy a static one); a test checks that
they list :data:`~noisescale.experiments.tasks.TASK_NAMES` then
:data:`~noisescale.experiments.rl.RL_TASK_NAMES`, :data:`~noisescale.options.METHODS` and
:data:`~noisescale.options.SINGLE_PROCESS_METHODS` in order, with ``-`` for ``_``.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from noisescale.critical.fit import MIN_BOOTSTRAP

__all__ = [
    "DEFAULT_TASK",
    "BootstrapOption",
    "ConfidenceOption",
    "ExecutorName",
    "MethodName",
    "OnlyName",
    "OptimizerName",
    "SweepMethodName",
    "TaskName",
    "check_writable",
    "confidence_level",
    "fail",
]


class TaskName(str, enum.Enum):
    """``--task``: every built-in task, :data:`~noisescale.experiments.tasks.TASK_NAMES`, then the RL ones."""

    mnist = "mnist"
    fashion_mnist = "fashion-mnist"
    digits = "digits"
    linreg = "linreg"
    shakespeare = "shakespeare"
    cartpole = "cartpole"


class OptimizerName(str, enum.Enum):
    """``--optimizer``: :data:`~noisescale.experiments.optim.OPTIMIZERS`."""

    sgd = "sgd"
    adamw = "adamw"


class OnlyName(str, enum.Enum):
    """``--only`` of ``measure``: every parameter, or the LayerNorms only (``training.ONLY``)."""

    all = "all"
    layernorm = "layernorm"


class MethodName(str, enum.Enum):
    """``--method`` of ``measure``: :data:`~noisescale.options.METHODS` (ddp under torchrun)."""

    per_example = "per-example"
    microbatch = "microbatch"
    ddp = "ddp"
    fsdp = "fsdp"


class ExecutorName(str, enum.Enum):
    """``--executor`` of ``sweep``: :data:`~noisescale.experiments.sweep.run.EXECUTORS`."""

    local = "local"
    ray = "ray"


class SweepMethodName(str, enum.Enum):
    """``--method`` of ``sweep``: :data:`~noisescale.options.SINGLE_PROCESS_METHODS` (one process per run)."""

    per_example = "per-example"
    microbatch = "microbatch"


DEFAULT_TASK = TaskName.mnist


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line on stderr and return the exit to raise (no traceback).

    The message is plain text: brackets in it (file names, lists) are not rich markup.
    """
    line = Text.assemble(("error: ", "bold red"), message)
    Console(stderr=True, highlight=False).print(line, soft_wrap=True)
    return typer.Exit(code)


def check_writable(folder: Path) -> None:
    """Create ``folder`` or raise ValueError saying why it cannot hold the results."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder: choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {folder}: cannot create the folder ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {folder}: the folder is not writable")


def confidence_level(value: float) -> float:
    """Typer callback of ``--confidence``: a level strictly between 0 and 1 (a usage error otherwise)."""
    if not 0.0 < value < 1.0:
        raise typer.BadParameter(f"expected a level in (0, 1), e.g. 0.95, but got {value:g}")
    return value


BootstrapOption = Annotated[
    int, typer.Option(help=f"Bootstrap resamples (>= {MIN_BOOTSTRAP}).", min=MIN_BOOTSTRAP)
]
ConfidenceOption = Annotated[
    float, typer.Option(help="Level of the intervals and bounds, in (0, 1).", callback=confidence_level)
]
