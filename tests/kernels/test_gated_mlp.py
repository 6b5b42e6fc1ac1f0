"""Fused gated-activation kernels against the PyTorch reference (Triton interpreter on CPU, bf16 on GPU).

Tolerance rule: on the output and both gradients, the kernel's max abs error against the float32 reference must
be at most twice the error of the same reference computed in half precision (fp16 on CPU, where the
interpreter's bf16 maths is broken; bf16 on GPU), plus a tiny floor for exact cases.
"""

import pytest
import torch

from fat5_kernels.gated_mlp_reference import gated_activation_reference

gated_mlp_module = pytest.importorskip("fat5_kernels.gated_mlp", reason="the fused kernels need triton")
gated_activation = gated_mlp_module.gated_activation
gated_activation_packed = gated_mlp_module.gated_activation_packed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # half precision whose maths can be trusted here
ACTIVATIONS = ["gelu_new", "silu"]


def _max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.double() - truth.double()).abs().max().item()


def assert_within_half_precision_budget(name: str, got: torch.Tensor, truth: torch.Tensor, half: torch.Tensor):
    """|got - truth| <= 2 * |half - truth| (max over elements), with a floor of 1e-6 * max|truth|."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    error, half_error = _max_error(got, truth), _max_error(half, truth)
    floor = 1e-6 * truth.abs().max().item() + 1e-12
    assert error <= 2 * half_error + floor, f"{name}: error {error:.3e} > 2 x half-precision error {half_error:.3e}"


def _run(fn, gate, up, grad_out, activation, **kwargs):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fn(gate, up, activation, **kwargs)
    out.backward(grad_out)
    return out.detach(), gate.grad, up.grad


def _check_against_reference(gate, up, grad_out, activation, **kwargs):
    got = _run(gated_activation, gate, up, grad_out, activation, **kwargs)
    truth = _run(gated_activation_reference, gate.float(), up.float(), grad_out.float(), activation)
    half = _run(gated_activation_reference, gate.to(HALF), up.to(HALF), grad_out.to(HALF), activation)
    for name, g, t, h, like in zip(("out", "d_gate", "d_up"), got, truth, half, (gate, gate, up)):
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert_within_half_precision_budget(name, g, t, h)
    if gate.dtype == torch.float32:  # float32 inputs also get float32 accuracy (relative L2 error)
        for name, g, t in zip(("out", "d_gate", "d_up"), got, truth):
            assert (g - t).norm() <= 1e-5 * t.norm(), name
    return got


def _randn(*shape, dtype, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # scale 3 spans the saturated tails of both activations as well as their curved middle
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 100), (2, 13, 257)], ids=str)
def test_gated_activation_matches_reference(shape, dtype, activation):
    gate, up = _randn(*shape, dtype=dtype, seed=0), _randn(*shape, dtype=dtype, seed=1)
    _check_against_reference(gate, up, _randn(*shape, dtype=dtype, scale=1.0, seed=2), activation)


@pytest.mark.parametrize("layout", ["fused_projection_halves", "transposed", "mixed"])
def test_gated_activation_non_contiguous_inputs(layout):
    """Halves of one fused (..., 2 d_ff) projection are read in place; other layouts work too."""
    d_ff = 96
    if layout == "fused_projection_halves":
        fused = _randn(2, 11, 2 * d_ff, dtype=torch.float16)
        gate, up = fused[..., :d_ff], fused[..., d_ff:]
    elif layout == "transposed":
        gate = _randn(11, 2, d_ff, dtype=torch.float16).transpose(0, 1)
        up = _randn(11, 2, d_ff, dtype=torch.float16, seed=1).transpose(0, 1)
    else:  # one contiguous input, one strided
        gate = _randn(2, 11, d_ff, dtype=torch.float16)
        up = _randn(2, 11, 2 * d_ff, dtype=torch.float16, seed=1)[..., ::2]
    grad_out = _randn(11, 2, d_ff, dtype=torch.float16, scale=1.0, seed=2).transpose(0, 1)
    _check_against_reference(gate, up, grad_out, "gelu_new")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_activation_in_place_backward_writes_gradients_into_the_inputs(activation):
    gate, up = _randn(3, 50, dtype=torch.float16), _randn(3, 50, dtype=torch.float16, seed=1)
    grad_out = _randn(3, 50, dtype=torch.float16, scale=1.0, seed=2)
    _, want_dgate, want_dup = _run(gated_activation, gate, up, grad_out, activation)

    gate_leaf, up_leaf = gate.clone(), up.clone()
    # non-leaf inputs, as the outputs of wi_0 / wi_1 are in a model
    gate_in, up_in = (gate_leaf.requires_grad_() * 1), (up_leaf.requires_grad_() * 1)
    gated_activation(gate_in, up_in, activation, in_place_backward=True).backward(grad_out)
    torch.testing.assert_close(gate_leaf.grad, want_dgate, rtol=0, atol=0)
    torch.testing.assert_close(up_leaf.grad, want_dup, rtol=0, atol=0)
    assert torch.equal(gate_in.detach(), want_dgate) and torch.equal(up_in.detach(), want_dup)


def test_gated_activation_in_place_backward_with_aliased_inputs_stays_correct():
    """gate and up in one buffer: writing both gradients in place would clobber them, so new buffers are used."""
    both = _randn(4, 24, dtype=torch.float32)
    grad_out = _randn(4, 24, dtype=torch.float32, scale=1.0, seed=2)
    leaf = both.clone().requires_grad_()
    shared = leaf * 1
    gated_activation(shared, shared, "silu", in_place_backward=True).backward(grad_out)
    ref_leaf = both.clone().requires_grad_()
    gated_activation_reference(ref_leaf, ref_leaf, "silu").backward(grad_out)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-5)


def test_gated_activation_saves_only_its_inputs():
    """The activation is recomputed in the backward: autograd keeps gate and up, nothing else."""
    gate = _randn(5, 40, dtype=torch.float32).requires_grad_()
    up = _randn(5, 40, dtype=torch.float32, seed=1).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_activation(gate, up, "gelu_new")
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_activation_under_torch_compile(activation):
    """fullgraph compile traces the custom ops (no graph break) and the result is eager's, bit for bit."""
    torch._dynamo.reset()
    gate, up = _randn(2, 9, 64, dtype=torch.float32), _randn(2, 9, 64, dtype=torch.float32, seed=1)
    grad_out = _randn(2, 9, 64, dtype=torch.float32, scale=1.0, seed=2)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module.print_readable(print_output=False))
        return graph_module.forward

    compiled = torch.compile(gated_activation, backend=recording_backend, fullgraph=True)
    got = _run(compiled, gate, up, grad_out, activation)
    want = _run(gated_activation, gate, up, grad_out, activation)
    traced = "\n".join(graphs)
    assert "gated_activation_forward" in traced and "gated_activation_backward" in traced
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _run_packed(gate_up, grad_out, activation, **kwargs):
    gate_up = gate_up.detach().clone().requires_grad_()
    out = gated_activation_packed(gate_up, activation, **kwargs)
    out.backward(grad_out)
    return out.detach(), gate_up.grad


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(37, 200), (2, 13, 514)], ids=str)
def test_gated_activation_packed_equals_the_halves(shape, activation):
    """`gated_activation_packed([gate | up])` is `gated_activation(gate, up)` bit for bit, and its gradient is the
    two halves' gradients, packed the same way, in one contiguous tensor."""
    gate_up = _randn(*shape, dtype=torch.float16)
    grad_out = _randn(*shape[:-1], shape[-1] // 2, dtype=torch.float16, scale=1.0, seed=2)
    out, grad = _run_packed(gate_up, grad_out, activation)
    want_out, want_dgate, want_dup = _run(gated_activation, *gate_up.chunk(2, dim=-1), grad_out, activation)
    assert grad.is_contiguous() and grad.shape == gate_up.shape
    assert torch.equal(out, want_out)
    assert torch.equal(grad, torch.cat([want_dgate, want_dup], dim=-1))


def test_gated_activation_packed_in_place_backward_and_strided_rows():
    gate_up = _randn(6, 2 * 40, dtype=torch.float32)
    grad_out = _randn(6, 40, dtype=torch.float32, scale=1.0, seed=2)
    _, want = _run_packed(gate_up, grad_out, "gelu_new")
    leaf = gate_up.clone().requires_grad_()
    non_leaf = leaf * 1  # the output of the fused projection, as in the model
    gated_activation_packed(non_leaf, "gelu_new", in_place_backward=True).backward(grad_out)
    assert torch.equal(leaf.grad, want) and torch.equal(non_leaf.detach(), want)
    # rows of a wider buffer (a row stride > 2 d_ff): read in place, gradient still packed and correct
    wide = _randn(6, 100, dtype=torch.float32, seed=4)
    wide[:, : 2 * 40] = gate_up
    _, strided_grad = _run_packed(wide[:, : 2 * 40], grad_out, "gelu_new")
    assert torch.equal(strided_grad, want)


def test_gated_activation_packed_under_torch_compile():
    torch._dynamo.reset()
    gate_up = _randn(2, 9, 128, dtype=torch.float32)
    grad_out = _randn(2, 9, 64, dtype=torch.float32, scale=1.0, seed=2)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module.print_readable(print_output=False))
        return graph_module.forward

    leaf = gate_up.clone().requires_grad_()
    compiled = torch.compile(gated_activation_packed, backend=recording_backend, fullgraph=True)
    compiled(leaf, "silu").backward(grad_out)
    assert "gated_activation_packed_backward" in "\n".join(graphs)
    assert torch.equal(leaf.grad, _run_packed(gate_up, grad_out, "silu")[1])


def test_gated_activation_packed_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"2 \* d_ff"):
        gated_activation_packed(_randn(3, 7, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        gated_activation_packed(_randn(8, 3, dtype=torch.float32).t())
    with pytest.raises(TypeError, match="not supported"):
        gated_activation_packed(_randn(3, 8, dtype=torch.float32).to(torch.int32))


def test_activation_aliases_and_transformers_definitions():
    """"gelu_new" / "gelu_pytorch_tanh" are the tanh GELU of transformers; "swish" is SiLU."""
    from transformers.activations import ACT2FN

    gate, up = _randn(4, 33, dtype=torch.float32), _randn(4, 33, dtype=torch.float32, seed=1)
    for name in ("gelu_new", "gelu_pytorch_tanh", "silu", "swish"):
        want = ACT2FN[name](gate.cpu()) * up.cpu()
        torch.testing.assert_close(gated_activation_reference(gate, up, name).cpu(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gated_activation(gate, up, name).cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "gate_shape,up_shape,dtypes,activation,error,match",
    [
        ((4, 8), (4, 9), (torch.float32, torch.float32), "silu", ValueError, "differs from up shape"),
        ((4, 8), (4, 8), (torch.float32, torch.float16), "silu", TypeError, "differs from up dtype"),
        ((4, 8), (4, 8), (torch.int32, torch.int32), "silu", TypeError, "not supported"),
        ((4, 8), (4, 8), (torch.float32, torch.float32), "gelu", ValueError, "unsupported activation"),
    ],
    ids=["shape_mismatch", "dtype_mismatch", "int_inputs", "erf_gelu"],
)
def test_gated_activation_bad_inputs_raise_clear_errors(gate_shape, up_shape, dtypes, activation, error, match):
    gate = torch.ones(gate_shape, dtype=dtypes[0], device=DEVICE)
    up = torch.ones(up_shape, dtype=dtypes[1], device=DEVICE)
    with pytest.raises(error, match=match):
        gated_activation(gate, up, activation)
    with pytest.raises(error, match=match):
        gated_activation_reference(gate, up, activation)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU tensors error")
def test_gated_activation_on_cpu_without_interpreter_points_to_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="gated_activation_reference"):
        gated_activation(torch.randn(2, 8), torch.randn(2, 8), "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("d_ff", [2048, 2816, 1000])
def test_gated_activation_bf16_on_gpu(d_ff, activation):
    """bf16 at T5 v1.1 widths (and one that is not a multiple of the block), many rows, with the bf16 rule."""
    gate, up = _randn(4, 1031, d_ff, dtype=torch.bfloat16), _randn(4, 1031, d_ff, dtype=torch.bfloat16, seed=1)
    grad_out = _randn(4, 1031, d_ff, dtype=torch.bfloat16, scale=1.0, seed=2)
    _check_against_reference(gate, up, grad_out, activation)
    _check_against_reference(gate, up, grad_out, activation, in_place_backward=True)
    fused = _randn(4, 1031, 2 * d_ff, dtype=torch.bfloat16)
    _check_against_reference(fused[..., :d_ff], fused[..., d_ff:], grad_out, activation)
    out, grad = _run_packed(fused, grad_out, activation)
    want_out, want_dgate, want_dup = _run(gated_activation, fused[..., :d_ff], fused[..., d_ff:], grad_out, activation)
    assert torch.equal(out, want_out) and torch.equal(grad, torch.cat([want_dgate, want_dup], dim=-1))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_activation_fp32_on_gpu(activation):
    gate, up = _randn(1031, 2816, dtype=torch.float32), _randn(1031, 2816, dtype=torch.float32, seed=1)
    _check_against_reference(gate, up, _randn(1031, 2816, dtype=torch.float32, scale=1.0, seed=2), activation)
