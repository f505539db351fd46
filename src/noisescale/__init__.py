"""noisescale: the gradient noise scale and critical batch size of PyTorch training.

References:
    McCandlish, Kaplan, Amodei & OpenAI Dota Team (2018), An Empirical Model of
    Large-Batch Training, arXiv:1812.06162.
"""

from noisescale.b_noise import BNoiseEstimate, estimate_b_noise
from noisescale.control import AdamRule, BatchSizeController, SGDRule
from noisescale.errors import (
    DatasetNotFoundError,
    DoubleBackwardError,
    NoiseScaleError,
    ParameterGroupError,
    SingleMicrobatchError,
    SweepConfigError,
    SweepDataError,
    UnsupportedLayerError,
    UnsupportedTorchError,
)
from noisescale.estimators import (
    NoiseStats,
    effective_batch_size,
    microbatch_stats,
    per_example_stats,
    two_batch_stats,
)
from noisescale.flops import flops_per_example
from noisescale.io import package_version
from noisescale.meter import GradientNoiseScale, GroupEstimate, NoiseScaleEstimate, layernorm_groups

__all__ = [
    "AdamRule",
    "BNoiseEstimate",
    "BatchSizeController",
    "DatasetNotFoundError",
    "DoubleBackwardError",
    "GradientNoiseScale",
    "GroupEstimate",
    "NoiseScaleError",
    "NoiseScaleEstimate",
    "NoiseStats",
    "ParameterGroupError",
    "SGDRule",
    "SingleMicrobatchError",
    "SweepConfigError",
    "SweepDataError",
    "UnsupportedLayerError",
    "UnsupportedTorchError",
    "effective_batch_size",
    "estimate_b_noise",
    "flops_per_example",
    "layernorm_groups",
    "microbatch_stats",
    "per_example_stats",
    "two_batch_stats",
]

__version__ = package_version()  # one source: the package metadata (pyproject.toml)
