"""benchmarks/adaptive.py: the adaptive run is judged by the sweep's own rules (smallest configuration)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_benchmarks_smoke import load_benchmark


def test_quick_adaptive_benchmark_compares_with_the_sweep_fit(tmp_path: Path) -> None:
    bench = load_benchmark("adaptive")
    result = bench.main(["--quick", "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")])
    assert json.loads((tmp_path / "a.json").read_text())["goals"] == json.loads(json.dumps(result["goals"]))
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    schedule = result["batch_schedule"]
    assert schedule[0]["batch_size"] == 8 and len(schedule) >= 2  # digits, from the sweep's smallest batch
    for row in result["goals"]:
        if row["steps"] is None:
            continue
        # The product and the saving are the same statement about the hyperbola: inside it iff saving > 0.
        assert (row["product"] < 1) == (row["step_saving"] > 0)
        fixed = row["s_min"] * (1 + row["b_crit_fit"] / row["fixed_batch"])
        assert abs(fixed - row["fixed_steps"]) <= 1e-9 * fixed  # on the fitted front at the same examples
        assert abs(row["fixed_batch"] * row["fixed_steps"] - row["examples"]) <= 1e-9 * row["examples"]
    assert any(row["steps"] is not None for row in result["goals"])
