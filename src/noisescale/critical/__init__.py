"""The critical batch size: fit a sweep, predict from the fit, read sweep files, report and plot.

- :mod:`~noisescale.critical.fit`: the steps-examples hyperbola ``S(B) = S_min (1 + B_crit/B)``
  fitted in log space with bootstrap intervals (McCandlish et al. 2018, eqs. 2.11-2.12).
- :mod:`~noisescale.critical.goals`: steps to a goal from a logged curve, censoring, the fastest
  run per batch size, run averages: the one rule of ``noisescale sweep`` and ``noisescale fit``.
- :mod:`~noisescale.critical.sweepdata`: users' sweep files (CSV, JSON Lines) into a table
  (:mod:`~noisescale.critical.sweepfile` reads the raw cells).
- :mod:`~noisescale.critical.report`: the fit of every goal, B_simple next to it, B_crit(L), and
  the one ``fit.json`` schema.
- :mod:`~noisescale.critical.predict`: steps, examples, speed-up and the best batch from a fit.
- :mod:`~noisescale.critical.plotting`: the Pareto front and B_crit per goal (matplotlib).
- :mod:`~noisescale.critical.branched`: the branched-training test (Merrill et al. 2025): B_crit at
  a checkpoint from short branches at larger batches, on their logged curves.
"""

from noisescale.critical.fit import MIN_BOOTSTRAP, CriticalBatchFit, check_fit_settings, fit_critical_batch

__all__ = ["MIN_BOOTSTRAP", "CriticalBatchFit", "check_fit_settings", "fit_critical_batch"]
