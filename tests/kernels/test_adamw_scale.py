"""The fused AdamWScale update (`fat5_kernels.adamw_scale`) against the update written out in float64 (Triton
interpreter on CPU, CUDA on the GPU machine)."""

import math

import pytest
import torch

adamw_scale_module = pytest.importorskip("fat5_kernels.adamw_scale", reason="the fused update needs triton")
adamw_scale_update_ = adamw_scale_module.adamw_scale_update_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Sizes around the kernel's 2048-element chunks, an empty tensor and single elements.
SHAPES = [(3, 5), (2048,), (4097,), (1,), (0, 4), (70, 33), (1, 1)]
HYPER = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "min_rms": 1e-3}


def _states(shapes, dtype, device=DEVICE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator) * 0.05 for s in shapes]
    params[-1].zero_()  # below min_rms: the floor applies
    exp_avgs = [torch.randn(s, generator=generator) * 0.01 for s in shapes]
    exp_avg_sqs = [torch.rand(s, generator=generator) * 1e-4 for s in shapes]
    return [[t.to(device=device, dtype=dtype) for t in tensors] for tensors in (params, exp_avgs, exp_avg_sqs)]


def _reference_step(params, grads, exp_avgs, exp_avg_sqs, step_sizes, decay_factor, beta1, beta2, eps, min_rms):
    """One step in float64 on copies; returns (params, exp_avgs, exp_avg_sqs)."""
    out = ([], [], [])
    for p, g, m, v, step_size in zip(params, grads, exp_avgs, exp_avg_sqs, step_sizes):
        p, g, m, v = (t.double() for t in (p, g, m, v))
        rms = max(p.norm().item() / math.sqrt(max(p.numel(), 1)), min_rms)
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        p = p * decay_factor - step_size * rms * m / (v.sqrt() + eps)
        for collected, value in zip(out, (p, m, v)):
            collected.append(value)
    return out


def _tolerance(want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 arithmetic (a few roundings, relative to the tensor's scale, as an update of a weight near zero
    cancels), plus the single rounding to a half-precision storage dtype (absolute near its subnormals)."""
    scale = want.abs().max() if want.numel() else want.new_zeros(())
    tolerance = 8 * torch.finfo(torch.float32).eps * scale + 1e-30
    if dtype != torch.float32:
        tolerance = tolerance + torch.finfo(dtype).eps / 2 * want.abs() + torch.finfo(dtype).smallest_normal * 1e-3
    return tolerance


@pytest.mark.parametrize("decay_factor", [1.0, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_reference_over_steps(dtype, decay_factor):
    """Three steps; each step compared from the kernel's own previous state. float32 to float32 rounding; float16
    within the rounding of its storage (the kernel computes in float32 and rounds once)."""
    params, exp_avgs, exp_avg_sqs = _states(SHAPES, dtype)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        grads = [torch.randn(s, generator=generator).to(DEVICE, dtype) for s in SHAPES]
        step_sizes = [1e-2 * (i + 1) * math.sqrt(1 - 0.999**step) / (1 - 0.9**step) for i in range(len(SHAPES))]
        expected = _reference_step(params, grads, exp_avgs, exp_avg_sqs, step_sizes, decay_factor, **HYPER)
        adamw_scale_update_(params, grads, exp_avgs, exp_avg_sqs, step_sizes, decay_factor=decay_factor, **HYPER)
        for name, got, want in zip(("param", "exp_avg", "exp_avg_sq"), (params, exp_avgs, exp_avg_sqs), expected):
            for shape, g, w in zip(SHAPES, got, want):
                tolerance = _tolerance(w, dtype)
                error = (g.double() - w).abs()
                assert (error <= tolerance).all(), f"step {step} {name} {shape}: max error {error.max().item():.3e}"


def test_tensors_of_one_call_are_independent():
    """Each tensor's update uses its own RMS and step size: updating one list equals updating each tensor alone."""
    together = _states(SHAPES, torch.float32)
    alone = [[t.clone() for t in tensors] for tensors in together]
    grads = [torch.randn(s).to(DEVICE) for s in SHAPES]
    step_sizes = [1e-2 * (i + 1) for i in range(len(SHAPES))]
    adamw_scale_update_(*together[:1], grads, *together[1:], step_sizes, **HYPER)
    for i in range(len(SHAPES)):
        adamw_scale_update_([alone[0][i]], [grads[i]], [alone[1][i]], [alone[2][i]], [step_sizes[i]], **HYPER)
    for tensors_together, tensors_alone in zip(together, alone):
        for a, b in zip(tensors_together, tensors_alone):
            assert torch.equal(a, b)


def _valid_call():
    params, exp_avgs, exp_avg_sqs = _states([(4, 3), (5,)], torch.float32)
    grads = [torch.ones_like(p) for p in params]
    return [params, grads, exp_avgs, exp_avg_sqs, [1e-2, 1e-2]]


@pytest.mark.parametrize(
    "break_call, message",
    [
        (lambda a: a[1].pop(), "2 params but 1 grads"),
        (lambda a: a[4].pop(), "step sizes"),
        (lambda a: a[2].__setitem__(0, a[2][0].double()), "one device and dtype"),
        (lambda a: a[3].__setitem__(1, torch.zeros(6, device=DEVICE)), "shape"),
        (lambda a: a[1].__setitem__(0, torch.ones(3, 4, device=DEVICE).t()), "contiguous"),
        (lambda a: a[3].__setitem__(1, torch.zeros(6, device=DEVICE)[1:]), "16-byte boundary"),
        (lambda a: [tensors.__setitem__(0, tensors[0].to(torch.float64)) for tensors in a[:4]], "supports"),
    ],
)
def test_bad_input_raises_before_launch(break_call, message):
    args = _valid_call()
    before = [t.clone() for t in args[0]]
    break_call(args)
    with pytest.raises(ValueError, match=message):
        adamw_scale_update_(*args, **HYPER)
    for p, q in zip(args[0], before):
        assert torch.equal(p, q)  # nothing written


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU error")
def test_cpu_tensors_without_the_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        adamw_scale_update_(*_valid_call(), **HYPER)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_tensors_match_reference(dtype):
    shapes = [(32768, 512), (2048, 512), (512,), (12345,)]
    params, exp_avgs, exp_avg_sqs = _states(shapes, dtype)
    grads = [torch.randn(s, device=DEVICE).to(dtype) for s in shapes]
    step_sizes = [5e-3] * len(shapes)
    expected = _reference_step(params, grads, exp_avgs, exp_avg_sqs, step_sizes, 0.99, **HYPER)
    adamw_scale_update_(params, grads, exp_avgs, exp_avg_sqs, step_sizes, decay_factor=0.99, **HYPER)
    for got, want in zip((params, exp_avgs, exp_avg_sqs), expected):
        for g, w in zip(got, want):
            assert ((g.double() - w).abs() <= _tolerance(w, dtype)).all()
