"""Host-side helpers of the kernels: the plain-integer `cdiv` / `next_power_of_2` agree with triton's, and
`CompiledLaunches` relaunches a kernel's binary directly only for arguments it was specialized on."""

import math

import pytest
import torch

from fat5_kernels import triton_utils
from fat5_kernels.triton_utils import CompiledLaunches, cdiv, next_power_of_2


def test_cdiv_is_ceiling_division():
    for a in range(0, 300):
        for b in range(1, 70):
            assert cdiv(a, b) == math.ceil(a / b)


def test_next_power_of_2():
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 768, 1024, 1025, 32128)] == [
        1, 1, 2, 4, 4, 8, 1024, 1024, 2048, 32768
    ]  # fmt: skip


def test_same_values_as_triton():
    triton = pytest.importorskip("triton")
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 200) for b in range(1, 40))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))



class _FakeCompiled:
    """What ``JITFunction.run`` returns: the launcher and the handles it takes."""

    function = "function-handle"
    packed_metadata = "packed-metadata"

    def __init__(self):
        self.launches = []

    def run(self, *launch_args):
        self.launches.append(launch_args)


class _FakeJITFunction:
    """``fn[grid](*args, **kwargs)`` records a slow-path launch (compile or cache lookup) and returns the binary."""

    arg_names = ["X", "n", "scale", "BLOCK"]

    def __init__(self):
        self.compiled = _FakeCompiled()
        self.slow_launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.slow_launches.append((grid(kwargs), args, kwargs))
            return self.compiled

        return run


@pytest.fixture
def direct_launches(monkeypatch):
    """The direct path as on a GPU: no interpreter, a fixed stream handle."""
    monkeypatch.setattr(triton_utils, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(triton_utils, "_current_stream", lambda device: 1234)
    monkeypatch.delenv("FAT5_DIRECT_LAUNCH", raising=False)
    if triton_utils._launch_hooks():
        pytest.skip("this Triton has launch hooks installed or no knobs: the direct path never applies")
    return CompiledLaunches()


def _launch(launches, fn, x, n=64, scale=1.0, block=32):
    grid = lambda meta: (n // meta["BLOCK"], 3)  # noqa: E731
    launches.launch(fn, grid, (x, n, scale), {"BLOCK": block}, {"num_warps": 4}, key=("k", block))


def test_second_identical_launch_goes_to_the_binary(direct_launches):
    fn, x = _FakeJITFunction(), torch.zeros(64)
    _launch(direct_launches, fn, x)
    assert fn.slow_launches == [((2, 3), (x, 64, 1.0), {"BLOCK": 32, "num_warps": 4})]
    assert fn.compiled.launches == []
    _launch(direct_launches, fn, x)
    assert len(fn.slow_launches) == 1
    (launch,) = fn.compiled.launches
    assert launch[:9] == (2, 3, 1, 1234, "function-handle", "packed-metadata", None, None, None)
    assert launch[9:] == (x, 64, 1.0, 32)  # every kernel parameter in order, the constexpr last


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda x: dict(x=x[1:]), id="misaligned-pointer"),
        pytest.param(lambda x: dict(x=x.to(torch.float16)), id="other-dtype"),
        pytest.param(lambda x: dict(x=x, n=65), id="other-int"),
        pytest.param(lambda x: dict(x=x, scale=0.25), id="other-float"),
        pytest.param(lambda x: dict(x=x, scale=True), id="same-value-other-type"),
        pytest.param(lambda x: dict(x=x, block=16), id="other-constexpr"),
    ],
)
def test_a_launch_the_binary_may_not_serve_goes_through_the_jit(direct_launches, change):
    fn, x = _FakeJITFunction(), torch.zeros(64)
    _launch(direct_launches, fn, x)
    _launch(direct_launches, fn, **change(x))
    assert len(fn.slow_launches) == 2 and fn.compiled.launches == []


def test_direct_launch_can_be_turned_off(direct_launches, monkeypatch):
    monkeypatch.setenv("FAT5_DIRECT_LAUNCH", "0")
    fn, x = _FakeJITFunction(), torch.zeros(64)
    for _ in range(3):
        _launch(direct_launches, fn, x)
    assert len(fn.slow_launches) == 3 and fn.compiled.launches == []


def test_launch_hooks_send_every_launch_through_the_jit(direct_launches, monkeypatch):
    """Profilers (proton) install launch hooks, which only ``JITFunction.run`` calls."""
    from triton import knobs

    fn, x = _FakeJITFunction(), torch.zeros(64)
    _launch(direct_launches, fn, x)
    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "calls"):  # a chain of hooks (Triton >= 3.5)
        monkeypatch.setattr(hook, "calls", [lambda metadata: None])
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
    _launch(direct_launches, fn, x)
    assert len(fn.slow_launches) == 2 and fn.compiled.launches == []


def test_interpreter_launches_are_never_cached(monkeypatch):
    monkeypatch.setattr(triton_utils, "triton_interpreter_enabled", lambda: True)
    launches, fn, x = CompiledLaunches(), _FakeJITFunction(), torch.zeros(64)
    for _ in range(2):
        _launch(launches, fn, x)
    assert len(fn.slow_launches) == 2 and fn.compiled.launches == []
