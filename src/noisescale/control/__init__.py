"""Act on the measurement: the batch size and the optimizer follow the noise scale.

- :mod:`~noisescale.control.policy`: the one decision rule (targets, integer factors, interval,
  hysteresis), a pure function shared by the controller and the schedule export.
- :mod:`~noisescale.control.controller`: :class:`BatchSizeController`, for any training loop.
- :mod:`~noisescale.control.rules`: the optimizer's hyperparameters at a batch change
  (SGD, eq. 2.6; Adam/AdamW, Malladi et al. 2022).
- :mod:`~noisescale.control.schedules`: learning-rate schedules keyed by examples seen.
- :mod:`~noisescale.control.export`: a measured run as a batch schedule (CSV, Megatron-LM, OLMo-core).
"""

from noisescale.control.controller import BatchChange, BatchSizeController
from noisescale.control.policy import BatchSizePolicy, ControllerState, decide, next_batch_size
from noisescale.control.rules import AdamRule, OptimizerRule, SGDRule, apply_rule, check_rule
from noisescale.control.schedules import WarmupCosine, WarmupStableDecay, key_by_examples

__all__ = [
    "AdamRule",
    "BatchChange",
    "BatchSizeController",
    "BatchSizePolicy",
    "ControllerState",
    "OptimizerRule",
    "SGDRule",
    "WarmupCosine",
    "WarmupStableDecay",
    "apply_rule",
    "check_rule",
    "decide",
    "key_by_examples",
    "next_batch_size",
]
