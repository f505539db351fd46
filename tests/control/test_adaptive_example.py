"""examples/adaptive_loop.py: a plain loop whose batch grows by integer factors, its lr with it."""

from __future__ import annotations

import itertools
import re

import pytest

from tests.integrations.examples import B_SIMPLE, run


def test_the_plain_loop_example_grows_its_batch(capsys: pytest.CaptureFixture[str]) -> None:
    controller = run("adaptive_loop")["result"]
    sizes = [c.batch_size for c in controller.schedule]
    assert sizes[0] == 8 and len(sizes) >= 3
    assert all(b % a == 0 and b > a for a, b in itertools.pairwise(sizes))
    lrs = [c.lr for c in controller.schedule[1:]]
    assert lrs == sorted(lrs)  # SGD rule: the rate rises with the batch (the cosine has barely started)
    out = capsys.readouterr().out
    assert len(
        re.findall(r"^step +\d+  examples +[\d,]+  batch +\d+  lr \d\.\d{4}$", out, re.MULTILINE)
    ) == len(sizes)
    assert re.search(rf"^{B_SIMPLE} after 650 steps", out, re.MULTILINE)
