"""Every private torch API noisescale relies on exists and behaves as its hooks assume.

If this file fails after a torch upgrade, the failure names the API: fix it in
``noisescale/_torch_compat.py`` (the only module allowed to touch them).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from noisescale import _torch_compat as tc
from noisescale.errors import UnsupportedTorchError
from noisescale.meter import GradientNoiseScale

SRC = Path(tc.__file__).parent


@pytest.fixture
def fresh_check() -> Iterator[None]:
    """Run :func:`tc.check` again (it is cached), and leave it cached clean afterwards."""
    tc.check.cache_clear()
    yield
    tc.check.cache_clear()
    tc.check()


def test_check_passes_on_the_installed_torch(fresh_check: None) -> None:
    assert tc._missing() == []
    assert tc._behaviour() == []
    tc.check()


@pytest.mark.parametrize("name", tc.REQUIRED_APIS)
def test_each_required_api_exists(name: str) -> None:
    assert name not in tc._missing(), f"{name} is gone on torch {torch.__version__}"


def test_a_vanished_api_is_named_by_check_and_by_the_meter(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate a torch without ``_will_engine_execute_node``: a clear error at construction."""
    monkeypatch.delattr(torch._C, "_will_engine_execute_node")
    with pytest.raises(UnsupportedTorchError, match=r"torch\._C\._will_engine_execute_node \(missing\)"):
        tc.check()
    tc.check.cache_clear()
    for method in ("microbatch", "per_example"):
        with pytest.raises(UnsupportedTorchError, match="_will_engine_execute_node"):
            GradientNoiseScale(nn.Linear(2, 1), method=method)


def test_a_changed_behaviour_is_named(fresh_check: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An API that still exists but answers differently (here: never True) is refused too."""
    monkeypatch.setattr(torch._C, "_will_engine_execute_node", lambda node: False)
    with pytest.raises(UnsupportedTorchError, match="cannot tell backward"):
        tc.check()


def test_will_execute_tells_backward_from_autograd_grad() -> None:
    leaf = torch.ones(3, requires_grad=True)
    seen: list[bool] = []
    handle = leaf.register_hook(lambda g: seen.append(tc.current_node_adds_into_grad()))
    (leaf * 2).sum().backward()
    torch.autograd.grad((leaf * 3).sum(), [leaf])
    handle.remove()
    assert seen == [True, False]


def test_scaler_helpers() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert tc.scaler_scale(None) is None
    assert tc.scaler_scale(torch.amp.GradScaler("cpu", enabled=False)) is None
    scaler.scale(torch.ones(()))
    scale = tc.scaler_scale(scaler)
    assert scale is not None and scale.item() == 8.0
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    assert not tc.scaler_unscaled(scaler)
    scaler.unscale_(opt)
    assert tc.scaler_unscaled(scaler)


# The private names the issue lists (and the others found), as they would be spelled in code.
_PRIVATE = re.compile(
    r"_current_graph_task_id|_will_engine_execute_node|_current_autograd_node|"
    r"_get_current_graph_task_keep_graph|_execution_engine|\._scale\b|_per_optimizer_states|"
    r"_foreach_\w+|_current_frames|_reversed_padding_repeated_twice|torch\._C\b|_get_fsdp_state|"
    r"_fsdp_param_groups|_unsharded_param|unsharded_accumulated_grad"
)


def test_no_other_module_touches_a_private_torch_api() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "_torch_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _PRIVATE.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "private torch APIs outside _torch_compat.py:\n" + "\n".join(offenders)


def test_the_check_leaves_the_random_stream_alone() -> None:
    """Adding a meter must not change a run: dropout masks and data order come from torch's RNG."""
    tc.check.cache_clear()  # the check runs once per process: run it again here
    before = torch.random.get_rng_state()
    tc.check()
    assert torch.equal(before, torch.random.get_rng_state())


def test_scaler_inverse_scale_is_one_over_the_scale_on_the_device() -> None:
    assert tc.scaler_inverse_scale(None) is None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-70)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as a training step does
    inv = tc.scaler_inverse_scale(scaler)
    assert inv is not None and inv.dtype == torch.float32 and inv.item() == 2.0**70


def test_fsdp_internals_that_moved_are_named() -> None:
    """A module without FSDP2's state stands for a torch whose internals moved: a clear error."""
    with pytest.raises(UnsupportedTorchError, match=r"fully_shard \(FSDP2\) model on torch .*moved"):
        tc.fsdp_parameters(nn.Linear(2, 1))
