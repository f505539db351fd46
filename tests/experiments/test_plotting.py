"""Plots build matplotlib Figures directly: importing and plotting change no global state."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_and_plotting_leaves_the_backend_alone(tmp_path: object) -> None:
    # A fresh interpreter with a non-Agg default backend: today's plotting.py switched it to Agg.
    code = (
        "import matplotlib; matplotlib.use('svg'); before = matplotlib.get_backend()\n"
        "import noisescale, noisescale.cli.app, noisescale.experiments.plotting as p\n"
        "import noisescale.critical.plotting\n"
        f"p.plot_run([{{'examples': 1, 'loss': 1.0, 'b_simple': 2.0}}], r'{tmp_path}/run.png')\n"
        "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())\n"
        "import matplotlib.pyplot as plt; assert not plt.get_fignums()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
