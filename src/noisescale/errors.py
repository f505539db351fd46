"""Exceptions raised by noisescale.

Every error says what went wrong and what to do about it. A noisy estimate is
never an error: it is reported as ``resolved=False`` (see :mod:`noisescale.meter`).
"""

from __future__ import annotations

__all__ = [
    "BranchConfigError",
    "DatasetNotFoundError",
    "DoubleBackwardError",
    "NoiseScaleError",
    "ParameterGroupError",
    "SingleMicrobatchError",
    "SweepConfigError",
    "SweepDataError",
    "UnsupportedLayerError",
    "UnsupportedTorchError",
]


class NoiseScaleError(Exception):
    """Base class of every error raised by noisescale."""


class SingleMicrobatchError(NoiseScaleError, ValueError):
    """The two-batch estimator needs two different batch sizes (k >= 2 micro-batches)."""


class UnsupportedLayerError(NoiseScaleError, TypeError):
    """A trainable layer has no exact per-example norm kernel."""


class ParameterGroupError(NoiseScaleError, ValueError):
    """The meter's parameter groups are ambiguous (one tensor in two groups) or empty."""


class DatasetNotFoundError(NoiseScaleError, FileNotFoundError):
    """A built-in dataset is not installed; the message says how to get it."""


class SweepConfigError(NoiseScaleError, ValueError):
    """A sweep's settings are invalid, or its directory holds another sweep's configuration."""


class BranchConfigError(NoiseScaleError, ValueError):
    """A branched measurement's settings are invalid, or its directory holds another one's."""


class SweepDataError(NoiseScaleError, ValueError):
    """A sweep or log file cannot give a trustworthy fit (too few points, corrupt rows...)."""


class UnsupportedTorchError(NoiseScaleError, RuntimeError):
    """The installed torch lacks (or changed) a private API the meter's hooks rely on."""


class DoubleBackwardError(NoiseScaleError, RuntimeError):
    """An operation of the model or loss has no double backward, so no Hessian-vector product (B_noise)."""
