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
            self.slow_launches.append((grid(kwargs) if callable(grid) else grid, args, kwargs))
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
        pytest.param(lambda x: dict(x=x, scale=True), id="same-value-other-type"),
        pytest.param(lambda x: dict(x=x, block=16), id="other-constexpr"),
    ],
)
def test_a_launch_the_binary_may_not_serve_goes_through_the_jit(direct_launches, change):
    fn, x = _FakeJITFunction(), torch.zeros(64)
    _launch(direct_launches, fn, x)
    _launch(direct_launches, fn, **change(x))
    assert len(fn.slow_launches) == 2 and fn.compiled.launches == []


def test_another_float_value_reaches_the_same_binary(direct_launches):
    """Triton passes every float as fp32 without specializing on its value (a learning rate changes each step)."""
    fn, x = _FakeJITFunction(), torch.zeros(64)
    _launch(direct_launches, fn, x, scale=1.0)
    _launch(direct_launches, fn, x, scale=0.25)
    assert len(fn.slow_launches) == 1
    (launch,) = fn.compiled.launches
    assert launch[9:] == (x, 64, 0.25, 32)


class _FakePlainKernel(_FakeJITFunction):
    """A kernel whose tensors and integers interleave, launched on a fixed grid."""

    arg_names = ["X", "stride", "Y", "BLOCK"]


def test_plain_kernel_launch_with_a_fixed_grid_and_interleaved_arguments(direct_launches, monkeypatch):
    monkeypatch.setattr(triton_utils, "_JIT_LAUNCHES", direct_launches)
    fn, x, y = _FakePlainKernel(), torch.zeros(64), torch.zeros(64)
    for _ in range(2):
        triton_utils.launch(fn, (5,), (x, 8, y), dict(BLOCK=16), num_warps=2)
    assert fn.slow_launches == [((5,), (x, 8, y), {"BLOCK": 16, "num_warps": 2})]
    (launch,) = fn.compiled.launches
    assert launch[:4] == (5, 1, 1, 1234) and launch[9:] == (x, 8, y, 16)
    triton_utils.launch(fn, (5,), (x, 8, y[1:]), dict(BLOCK=16), num_warps=2)  # a misaligned tensor after an int
    triton_utils.launch(fn, (5,), (x, 8, y), dict(BLOCK=16), num_warps=8)  # another launch option
    assert len(fn.slow_launches) == 3 and len(fn.compiled.launches) == 1


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


@pytest.mark.gpu
def test_gpu_plain_kernels_relaunch_their_binaries(monkeypatch):
    """RMSNorm, the gated activation and cross-entropy, called twice with the same shapes: the second call launches
    no kernel through ``JITFunction.run`` and gives bit-identical outputs and gradients (deterministic kernels)."""
    from fat5_kernels import cross_entropy, gated_mlp, rms_norm

    jit_functions = (
        rms_norm._rms_norm_forward_kernel, rms_norm._rms_norm_backward_kernel, rms_norm._sum_partials_kernel,
        gated_mlp._gated_activation_forward_kernel, gated_mlp._gated_activation_backward_kernel,
        cross_entropy._cross_entropy_fwd_kernel, cross_entropy._cross_entropy_bwd_kernel,
    )  # fmt: skip
    jit_runs = []
    for fn in jit_functions:
        monkeypatch.setattr(fn, "run", lambda *a, _run=fn.run, **kw: jit_runs.append(1) or _run(*a, **kw))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 768, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.rand(768, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5
    gate, up = (torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    logits = torch.randn(300, 5000, device="cuda", generator=gen)
    labels = torch.randint(0, 5000, (300,), device="cuda", generator=gen)
    labels[::7] = -100

    def step() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (x, weight, gate, up, logits)]
        y = rms_norm.rms_norm(leaves[0], leaves[1])
        h = gated_mlp.gated_activation(leaves[2], leaves[3])
        loss, _ = cross_entropy.cross_entropy(leaves[4], labels, z_loss=1e-4, inplace=False)
        (y.float().square().mean() + h.float().square().mean() + loss).backward()
        return [y, h, loss] + [leaf.grad for leaf in leaves]

    first = step()
    assert jit_runs
    jit_runs.clear()
    second = step()
    assert not jit_runs, f"JITFunction.run calls on a repeat: {len(jit_runs)}"
    for a, b in zip(first, second):
        assert torch.equal(a, b)
