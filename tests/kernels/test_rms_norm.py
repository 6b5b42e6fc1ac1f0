"""Fused T5 RMSNorm kernels against the PyTorch reference (Triton interpreter on CPU, bf16 on GPU).

Tolerance rule: on every output and gradient, the kernel's max abs error against the float32 reference must be
at most twice the error of the same reference computed in half precision (fp16 on CPU, where the interpreter's
bf16 maths is broken; bf16 on GPU), plus a tiny floor for exact cases.
"""

import pytest
import torch

from fat5_kernels.rms_norm_reference import rms_norm_output_dtype, rms_norm_reference

rms_norm_module = pytest.importorskip("fat5_kernels.rms_norm", reason="the fused kernels need triton")
rms_norm = rms_norm_module.rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # half precision whose maths can be trusted here


def _max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.double() - truth.double()).abs().max().item()


def assert_within_half_precision_budget(name: str, got: torch.Tensor, truth: torch.Tensor, half: torch.Tensor):
    """|got - truth| <= 2 * |half - truth| (max over elements), with a floor of 1e-6 * max|truth|."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    error, half_error = _max_error(got, truth), _max_error(half, truth)
    floor = 1e-6 * truth.abs().max().item() + 1e-12
    assert error <= 2 * half_error + floor, f"{name}: error {error:.3e} > 2 x half-precision error {half_error:.3e}"


def _run(fn, inputs: dict, grad_outputs, residual: bool):
    """Forward and backward of fn on fresh leaf copies of inputs; returns outputs then input gradients."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(leaves["x"], leaves["weight"], 1e-6, leaves["residual"] if residual else None)
    outputs = out if residual else (out,)
    torch.autograd.backward(outputs, grad_outputs)
    grads = {k: v.grad for k, v in leaves.items()}
    return [o.detach() for o in outputs], grads


def _check_against_reference(inputs: dict, grad_outputs, residual: bool, **fused_kwargs):
    """Run the fused op, the float32 reference and the half-precision reference; apply the tolerance rule."""
    fused = lambda x, w, eps, r: rms_norm(x, w, eps, residual=r, **fused_kwargs)
    # clones: with in_place_backward the kernel writes the input gradient into the incoming gradient
    got_out, got_grads = _run(fused, inputs, [g.clone() for g in grad_outputs], residual)
    truth_out, truth_grads = _run(
        rms_norm_reference, {k: v.float() for k, v in inputs.items()}, [g.float() for g in grad_outputs], residual
    )
    half_out, half_grads = _run(
        rms_norm_reference, {k: v.to(HALF) for k, v in inputs.items()}, [g.to(HALF) for g in grad_outputs], residual
    )
    want_dtype = rms_norm_output_dtype(inputs["x"].dtype, inputs["weight"].dtype)
    assert got_out[0].dtype == want_dtype and got_out[0].shape == inputs["x"].shape
    if residual:
        assert got_out[1].dtype == torch.promote_types(inputs["x"].dtype, inputs["residual"].dtype)
    for i, (got, truth, half) in enumerate(zip(got_out, truth_out, half_out)):
        assert_within_half_precision_budget(f"output {i}", got, truth, half)
    for name in inputs:
        assert got_grads[name].dtype == inputs[name].dtype and got_grads[name].shape == inputs[name].shape
        assert_within_half_precision_budget(f"d_{name}", got_grads[name], truth_grads[name], half_grads[name])
    if all(v.dtype == torch.float32 for v in inputs.values()):  # float32 inputs also get float32 accuracy
        pairs = list(zip(got_out, truth_out)) + [(got_grads[k], truth_grads[k]) for k in inputs]
        for i, (got, truth) in enumerate(pairs):
            assert (got - truth).norm() <= 1e-5 * truth.norm(), f"float32 relative error, tensor {i}"
    return got_out, got_grads


def _make_inputs(shape, dtype, residual, weight_dtype=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *s, scale=1.0: (torch.randn(*s, generator=generator) * scale).to(DEVICE)
    inputs = {"x": randn(*shape, scale=2.0).to(dtype), "weight": (1 + randn(shape[-1], scale=0.1)).to(weight_dtype or dtype)}
    if residual:
        inputs["residual"] = randn(*shape).to(dtype)
    return inputs


def _grad_outputs(inputs, residual, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = inputs["x"].shape
    out_dtype = rms_norm_output_dtype(inputs["x"].dtype, inputs["weight"].dtype)
    grads = [torch.randn(*shape, generator=generator).to(DEVICE, out_dtype)]
    if residual:
        summed_dtype = torch.promote_types(inputs["x"].dtype, inputs["residual"].dtype)
        grads.append(torch.randn(*shape, generator=generator).to(DEVICE, summed_dtype))
    return grads


CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 96), (2, 19, 100), (3, 257)], ids=str)
def test_rms_norm_matches_reference(shape, dtype, residual):
    """Values and every gradient, odd row counts, d not a power of two, 2-D and 3-D inputs."""
    inputs = _make_inputs(shape, dtype, residual)
    _check_against_reference(inputs, _grad_outputs(inputs, residual), residual)


@pytest.mark.parametrize("x_dtype,weight_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_rms_norm_mixed_dtypes_follow_t5(x_dtype, weight_dtype):
    """T5 returns the weight dtype for a half weight, and float32 for a float32 weight (variance is fp32)."""
    inputs = _make_inputs((23, 80), x_dtype, residual=True, weight_dtype=weight_dtype)
    _check_against_reference(inputs, _grad_outputs(inputs, residual=True), residual=True)


@pytest.mark.parametrize("in_place_backward", [False, True], ids=["out_of_place", "in_place"])
def test_rms_norm_half_input_on_float32_residual_stream(in_place_backward):
    """The model's fused residual add under autocast: a half-precision sublayer output added to the float32
    residual stream. The sum is float32 and exact (as `residual + x` in PyTorch), the norm matches the float32
    reference on the same inputs, and each input gets its gradient in its own dtype."""
    inputs = _make_inputs((3, 21, 80), torch.float32, residual=True)
    inputs["x"] = inputs["x"].to(HALF)
    grads = _grad_outputs(inputs, residual=True)
    assert grads[1].dtype == torch.float32
    run = lambda x, w, e, r: rms_norm(x, w, e, residual=r, in_place_backward=in_place_backward)
    (normed, summed), got_grads = _run(run, inputs, [g.clone() for g in grads], True)
    (want_normed, want_summed), want_grads = _run(rms_norm_reference, inputs, grads, True)
    assert summed.dtype == torch.float32 and torch.equal(summed, inputs["residual"] + inputs["x"])
    assert (normed - want_normed).norm() <= 1e-5 * want_normed.norm()
    assert got_grads["x"].dtype == HALF and got_grads["residual"].dtype == torch.float32
    # the kernel writes x's gradient in x's dtype: the float32 gradient rounded, bit for bit autograd's cast
    assert torch.equal(got_grads["x"], got_grads["residual"].to(HALF))
    for name in inputs:
        got, want = got_grads[name].double(), want_grads[name].double()
        # d_x is the float32 gradient rounded to half precision, in both
        assert (got - want).norm() <= 1e-5 * want.norm() + 1e-3 * (name == "x") * want.norm(), name


@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_rms_norm_non_contiguous_inputs(layout):
    """Strided rows are read in place; other layouts are copied. Gradients keep the inputs' shapes."""
    d = 72
    if layout == "row_strided":  # the first half of each row of a wider buffer
        base = _make_inputs((2, 9, 2 * d), torch.float32, residual=True)
        inputs = {"x": base["x"][..., :d], "residual": base["residual"][..., d:], "weight": base["weight"][:d]}
    else:
        base = _make_inputs((9, 2, d), torch.float32, residual=True)
        inputs = {"x": base["x"].transpose(0, 1), "residual": base["residual"].transpose(0, 1), "weight": base["weight"]}
    assert not inputs["x"].is_contiguous()
    grads = [g.transpose(0, 1).contiguous().transpose(0, 1) for g in _grad_outputs(inputs, residual=True)]
    _check_against_reference(inputs, grads, residual=True)


def test_rms_norm_with_residual_one_output_used():
    """Only one of the two outputs takes part in the loss: the other gets no gradient (None), still correct."""
    inputs = _make_inputs((13, 48), torch.float32, residual=True)
    for used in (0, 1):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        ref_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        rms_norm(leaves["x"], leaves["weight"], residual=leaves["residual"])[used].sum().backward()
        rms_norm_reference(ref_leaves["x"], ref_leaves["weight"], residual=ref_leaves["residual"])[used].sum().backward()
        for name in inputs:
            got, want = leaves[name].grad, ref_leaves[name].grad
            if want is None:  # the weight plays no part in `summed`
                assert got is None or not got.any()
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rms_norm_in_place_backward_gives_the_same_gradients():
    inputs = _make_inputs((2, 17, 40), torch.float16, residual=True)
    grads = _grad_outputs(inputs, residual=True)
    _, reference_grads = _run(lambda x, w, e, r: rms_norm(x, w, e, residual=r), inputs, [g.clone() for g in grads], True)
    _, in_place_grads = _run(
        lambda x, w, e, r: rms_norm(x, w, e, residual=r, in_place_backward=True), inputs, [g.clone() for g in grads], True
    )
    for name in inputs:
        torch.testing.assert_close(in_place_grads[name], reference_grads[name], rtol=0, atol=0)


def test_rms_norm_weight_gradient_is_deterministic():
    """The weight gradient is a fixed-order sum of per-program partials: bitwise identical across runs."""
    inputs = _make_inputs((61, 33), torch.float32, residual=False)
    grads = _grad_outputs(inputs, residual=False)
    first = _run(rms_norm, inputs, grads, False)[1]["weight"]
    second = _run(rms_norm, inputs, grads, False)[1]["weight"]
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_weight_gradient_partials_sum_in_one_fixed_order_pass(dtype):
    """The partial-sum reduction of the backward: several blocks of partials (more than one loop step) and a
    ragged column block, summed in float32 and cast once, as `partials.sum(0).to(dtype)` would."""
    partials = torch.randn(150, 70, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    summed = rms_norm_module._sum_partials(partials, dtype)
    assert summed.dtype == dtype and summed.shape == (70,)
    # one rounding step of `dtype` apart at most: float32 sums, then one cast
    torch.testing.assert_close(summed, partials.double().sum(0).to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-5)
    assert torch.equal(summed, rms_norm_module._sum_partials(partials, dtype))


@pytest.mark.parametrize("x_dtype", [torch.float32, HALF], ids=["float32", "half_on_float32_stream"])
def test_rms_norm_under_torch_compile(x_dtype):
    """fullgraph compile traces the custom ops (no graph break) and the result is eager's, bit for bit (also the
    half-precision input's gradient, which the backward op writes in that dtype)."""
    torch._dynamo.reset()
    inputs = _make_inputs((2, 11, 64), torch.float32, residual=True)
    inputs["x"] = inputs["x"].to(x_dtype)
    grads = _grad_outputs(inputs, residual=True)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module.print_readable(print_output=False))
        return graph_module.forward

    compiled = torch.compile(lambda x, w, e, r: rms_norm(x, w, e, residual=r), backend=recording_backend, fullgraph=True)
    got_out, got_grads = _run(compiled, inputs, grads, True)
    want_out, want_grads = _run(lambda x, w, e, r: rms_norm(x, w, e, residual=r), inputs, grads, True)
    traced = "\n".join(graphs)
    assert "rms_norm_forward" in traced and "rms_norm_backward" in traced
    for got, want in zip(got_out, want_out):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name in inputs:
        assert got_grads[name].dtype == inputs[name].dtype
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0, atol=0)


def test_rms_norm_backward_writes_the_gradient_of_a_narrower_input():
    """With ``cast_dtype`` the backward kernel also stores dx rounded to that dtype (the gradient of a half sublayer
    output on the float32 stream), equal to casting the float32 dx; without it, nothing more."""
    torch.manual_seed(0)
    dy, summed = torch.randn(19, 80, device=DEVICE).to(HALF), torch.randn(19, 80, device=DEVICE) * 3
    dsummed, weight = torch.randn(19, 80, device=DEVICE), torch.rand(80, device=DEVICE) + 0.5
    rstd = torch.rsqrt(summed.pow(2).mean(-1) + 1e-6)
    dx, dweight, dx_half = rms_norm_module._rms_norm_backward(dy, summed, weight, rstd, dsummed, False, HALF)
    assert dx.dtype == torch.float32 and dx_half.dtype == HALF
    assert torch.equal(dx_half, dx.to(HALF))
    plain = rms_norm_module._rms_norm_backward(dy, summed, weight, rstd, dsummed, False)
    assert plain[2] is None
    # The two kernels are separate specializations: on a GPU the compiler may contract their float32 maths into
    # fused multiply-adds differently (an H100 gave dx a few ulps apart); the interpreter computes both alike.
    exact = DEVICE == "cpu"
    torch.testing.assert_close(plain[0], dx, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
    torch.testing.assert_close(plain[1], dweight, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-5)


def test_t5_reference_matches_transformers_t5_layer_norm():
    """The reference is T5LayerNorm exactly, output dtype included (fp32, fp16 and bf16 weights)."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    x = torch.randn(3, 5, 64)
    for x_dtype, weight_dtype in [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16, torch.float32)]:
        layer = T5LayerNorm(64, eps=1e-6)
        with torch.no_grad():
            layer.weight.copy_(1 + 0.1 * torch.randn(64))
        layer = layer.to(weight_dtype)
        want = layer(x.to(x_dtype))
        got = rms_norm_reference(x.to(x_dtype), layer.weight, eps=1e-6)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda: (torch.randn(4, 8), torch.ones(7)), ValueError, "last dimension of x"),
        (lambda: (torch.randn(4, 8), torch.ones(1, 8)), ValueError, "weight must be 1-D"),
        (lambda: (torch.randn(4, 8), torch.ones(8), torch.randn(4, 9)), ValueError, "residual shape"),
        (lambda: (torch.randn(4, 8), torch.ones(8), torch.randn(4, 8).to(torch.int32)), TypeError, "residual has dtype"),
        (lambda: (torch.ones(4, 8, dtype=torch.int32), torch.ones(8)), TypeError, "x has dtype"),
    ],
    ids=["d_mismatch", "weight_2d", "residual_shape", "residual_dtype", "int_input"],
)
def test_rms_norm_bad_inputs_raise_clear_errors(make_args, error, match):
    args = make_args()
    x, weight = args[0].to(DEVICE), args[1].to(DEVICE)
    residual = args[2].to(DEVICE) if len(args) > 2 else None
    with pytest.raises(error, match=match):
        rms_norm(x, weight, residual=residual)
    with pytest.raises(error, match=match):
        rms_norm_reference(x, weight, residual=residual)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU tensors error")
def test_rms_norm_on_cpu_without_interpreter_points_to_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="rms_norm_reference"):
        rms_norm(torch.randn(2, 8), torch.ones(8))


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("d", [768, 1000, 4096])
def test_rms_norm_bf16_on_gpu(d, residual):
    """bf16 at T5 widths (and one that is not a power of two), many rows: the tolerance rule with bf16."""
    inputs = _make_inputs((4, 1031, d), torch.bfloat16, residual)
    _check_against_reference(inputs, _grad_outputs(inputs, residual), residual)
    _check_against_reference(inputs, _grad_outputs(inputs, residual), residual, in_place_backward=True)


@pytest.mark.gpu
def test_rms_norm_fp32_on_gpu_is_fp32_accurate():
    inputs = _make_inputs((1031, 768), torch.float32, residual=True)
    grads = _grad_outputs(inputs, residual=True)
    got_out, got_grads = _run(lambda x, w, e, r: rms_norm(x, w, e, residual=r), inputs, grads, True)
    want_out, want_grads = _run(rms_norm_reference, {k: v.double() for k, v in inputs.items()}, [g.double() for g in grads], True)
    for got, want in zip(got_out + list(got_grads.values()), want_out + list(want_grads.values())):
        assert (got.double() - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_out_dtype_stores_the_t5_output_cast(residual):
    # fp32 input and weight (autocast's layout): out_dtype=HALF must equal T5's fp32 output cast to HALF, and the
    # gradients must equal those of that cast (autograd through `.to(HALF)`).
    torch.manual_seed(0)
    inputs = {
        "x": torch.randn(37, 96, device=DEVICE) * 3,
        "weight": torch.rand(96, device=DEVICE) + 0.5,
        "residual": torch.randn(37, 96, device=DEVICE),
    }
    grad = torch.randn(37, 96, device=DEVICE).to(HALF)
    grads_out = [grad, torch.randn(37, 96, device=DEVICE)] if residual else [grad]
    got_out, got_grads = _run(
        lambda x, w, e, r: rms_norm(x, w, e, residual=r, out_dtype=HALF), inputs, grads_out, residual
    )

    def cast_fused(x, w, e, r):
        out = rms_norm(x, w, e, residual=r)
        return (out[0].to(HALF), out[1]) if residual else out.to(HALF)

    want_out, want_grads = _run(cast_fused, inputs, grads_out, residual)
    assert got_out[0].dtype == HALF
    for got, want in zip(got_out, want_out):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for name in ("x", "weight") + (("residual",) if residual else ()):
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-6, rtol=1e-6)
