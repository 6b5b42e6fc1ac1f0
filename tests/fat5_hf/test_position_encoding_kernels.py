"""The model's kernel path for each position encoding (Triton interpreter, fp32) against its PyTorch path: ALiBi
through the attention kernel's slopes, RoPE through the pre-pass kernel, FIRE through its per-distance table (within
its threshold, values and gradients of every parameter) or evaluated per element in the kernel (past it, forward)."""

from __future__ import annotations

import functools

import pytest
import torch

from fat5_hf import FAT5ForConditionalGeneration, kernel_ops


def _labels(lengths, vocab_size=96, seed=3):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.full((len(lengths), max(lengths)), -100)
    for row, length in enumerate(lengths):
        labels[row, :length] = torch.randint(2, vocab_size, (length,), generator=gen)
    return labels


_KERNELS = (
    "_triton_t5_flash_attention", "_triton_t5_flash_attention_qkvpacked", "_triton_t5_flash_attention_varlen",
    "_triton_t5_flash_attention_varlen_qkvpacked", "_triton_rope",
)  # fmt: skip


def _record(monkeypatch, name, calls):
    """Record `(kernel, bias)` of each call of `kernel_ops.<name>`; bias is "alibi", "t5", "distance", "fire" or
    None."""
    kernel = getattr(kernel_ops, name)
    kinds = {"alibi_slopes": "alibi", "bias_table": "t5", "distance_bias": "distance", "fire_bias": "fire"}

    def recording(*args, **kwargs):
        bias = next((kind for kind in kinds if kwargs.get(kind) is not None), None)
        calls.append((name, kinds.get(bias)))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kernel_ops, name, recording)


def _kernels_importable():
    if not (kernel_ops.kernel_available("attention") and kernel_ops.kernel_available("rope")):
        pytest.skip("fat5_kernels has no attention or rope kernel here")


def _assert_same_logits_and_grads(actual, expected):
    (logits, grads), (expected_logits, expected_grads) = actual, expected
    scale = expected_logits.abs().max().item()
    torch.testing.assert_close(logits, expected_logits, atol=1e-5 * scale, rtol=1e-4)
    for name, grad in grads.items():
        # a floor for gradients that are zero up to rounding (FIRE's output bias adds a constant to each head's row)
        scale = max(expected_grads[name].abs().max().item(), 1e-2)
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-4 * scale, rtol=1e-3, msg=name)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("encoding", ["alibi", "rope", "fire", "none"])
def test_kernel_path_matches_pytorch(tiny_fat5_config, make_batch, monkeypatch, encoding):
    _kernels_importable()
    calls = []
    for name in _KERNELS:
        _record(monkeypatch, name, calls)
    torch.manual_seed(0)
    config = tiny_fat5_config(
        position_encoding_type=encoding, use_fused_rms_norm=False, use_fused_glu=False, use_fused_cross_entropy=False,
        rope_fraction=0.5, fire_threshold=5.0,
    )  # fmt: skip
    model = FAT5ForConditionalGeneration(config).train()  # no KV cache: both stacks can take the kernel path
    input_ids, attention_mask = make_batch(96, [9, 6])
    labels = _labels([5, 3])

    def loss_and_grads():
        model.zero_grad()
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        outputs.loss.backward()
        return outputs.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected_logits, expected_grads = loss_and_grads()
    assert calls == []
    with kernel_ops.kernels_on_cpu():
        logits, grads = loss_and_grads()
    self_attention = [call for call in calls if call[0] != "_triton_rope" and call[1] is not None]
    # The encoder's batch is padded: every attention of both stacks runs unpadded (the varlen kernels).
    if encoding == "alibi":  # 2 + 2 self-attentions with the slopes (packed q/k/v), never T5's table
        assert sorted(set(calls)) == [("_triton_t5_flash_attention_varlen", None),
                                      ("_triton_t5_flash_attention_varlen_qkvpacked", "alibi")]  # fmt: skip
        assert len(self_attention) == 4
    elif encoding == "rope":  # one rotation per self-attention, then the kernel without bias
        assert [call[0] for call in calls].count("_triton_rope") == 4 and self_attention == []
    elif encoding == "fire":
        # The encoder's 9 positions pass FIRE's threshold of 5: the kernel evaluates FIRE per element there. The
        # decoder's 5 (positions 0..4) are below it: its self-attentions read FIRE's per-distance table.
        assert (
            self_attention
            == [("_triton_t5_flash_attention_varlen_qkvpacked", "fire")] * 2
            + [("_triton_t5_flash_attention_varlen_qkvpacked", "distance")] * 2
        )
        assert len(calls) == 6
    else:
        assert self_attention == [] and len(calls) == 6
    _assert_same_logits_and_grads((logits, grads), (expected_logits, expected_grads))


# ---- FIRE ------------------------------------------------------------------------------------------------------
_FIRE_PARAMETERS = ("distance_scale", "threshold", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")


def _materialized_attention(q, k, v, bias, lengths, causal):
    """softmax(q k^T + bias) v over (B, H, L, D), keys past each row's length masked (and later ones if causal)."""
    length = q.shape[2]
    allowed = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) + bias).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _outputs_and_grads(attention, q, k, v, fire, real, dout):
    """`attention(q, k, v)` at the real tokens, and the gradients of q, k, v and FIRE's parameters for `dout`."""
    out = attention(q, k, v)
    tensors = [q, k, v, *(fire.get_parameter(name) for name in _FIRE_PARAMETERS)]
    return out.detach() * real[:, None, :, None], torch.autograd.grad(out, tensors, dout)


@pytest.mark.interpreter
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_fire_table_in_the_kernel_equals_the_materialized_bias(bidirectional, padded):
    """Encoder (bidirectional) and decoder (causal) attention with FIRE's per-distance table in the kernel (padded rows
    through the varlen kernel) against the materialized FIRE bias: values and gradients of q, k, v and of every FIRE
    parameter, fp32."""
    from test_position_encoding import _random_fire

    from fat5_kernels.attention import t5_flash_attention, t5_flash_attention_varlen

    fire = _random_fire(bidirectional, threshold=13.0)
    lengths = [13, 8] if padded else [13, 13]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 13, 8, generator=gen).requires_grad_() for _ in range(3))
    real = torch.arange(13)[None, :] < torch.tensor(lengths)[:, None]  # (B, L) real tokens
    dout = torch.randn(2, 3, 13, 8, generator=gen) * real[:, None, :, None]  # no gradient from padding rows

    def kernel(q, k, v):
        table, causal = fire.kernel_table(13), not bidirectional
        if not padded:
            return t5_flash_attention(q, k, v, distance_bias=table, bidirectional=bidirectional, causal=causal)
        rows = [t.transpose(1, 2)[real] for t in (q, k, v)]  # (total, H, D)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        out = t5_flash_attention_varlen(
            *rows, cu_seqlens, cu_seqlens, 13, 13, distance_bias=table, bidirectional=bidirectional, causal=causal
        )
        return out.new_zeros(2, 13, 3, 8).index_put((real,), out).transpose(1, 2)

    def reference(q, k, v):
        return _materialized_attention(q, k, v, fire(13, 13), lengths, causal=not bidirectional)

    (out, grads), (expected, expected_grads) = (
        _outputs_and_grads(attention, q, k, v, fire, real, dout) for attention in (kernel, reference)
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, grad, expected_grad in zip(("q", "k", "v", *_FIRE_PARAMETERS), grads, expected_grads):
        assert name == "mlp.2.bias" or expected_grad.abs().sum() > 0, name  # a head-wide constant: no gradient
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4, msg=name)


def _fire_with_awkward_breakpoints(bidirectional: bool, threshold: float):
    """A FIRE (3 heads, width 16) whose breakpoints include +inf (units with input weight 0), ties (units that switch
    at the same input) and the inputs -1, 0 and 1, which queries past the threshold reach exactly (`x = -1` at key 0,
    `x = 0` at `d = 0`)."""
    from test_position_encoding import _random_fire

    fire = _random_fire(bidirectional, threshold=threshold)
    with torch.no_grad():
        weight, bias = fire.mlp[0].weight[:, 0], fire.mlp[0].bias
        weight[:2] = 0.0  # never switch: +inf breakpoints
        weight[2:4], bias[2:4] = torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.0])  # both at -1: a tie
        weight[4], bias[4] = 0.5, 0.0  # at 0
        weight[5], bias[5] = -3.0, 3.0  # at 1
    breakpoints = fire.piecewise_linear_table()[0]
    assert breakpoints.isinf().sum() == 2 and (breakpoints == -1).sum() == 2
    assert (breakpoints == 0).any() and (breakpoints == 1).any()
    return fire


@pytest.mark.interpreter
@pytest.mark.parametrize("threshold", [5.5, 4.0, 0.0, -3.0])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_fire_past_the_threshold_in_the_kernel_equals_the_materialized_bias(bidirectional, padded, threshold):
    """Encoder (bidirectional) and decoder (causal) attention with FIRE evaluated per element in the kernel
    (`fire_bias`; padded rows through the varlen kernel), queries below and past the threshold in one call, against
    `FIREPositionBias.forward` added to materialized attention, fp32: values and gradients of q, k, v and of every
    FIRE parameter; a threshold trained to a fraction, an integer (a query at the threshold: `maximum` splits the
    gradient), 0 or a negative value, breakpoints with +inf entries and ties."""
    from fat5_kernels.attention import t5_flash_attention, t5_flash_attention_varlen
    from fat5_kernels.attention_reference import t5_attention_reference

    fire = _fire_with_awkward_breakpoints(bidirectional, threshold)
    length, causal = 13, not bidirectional
    assert not fire.is_distance_only(length)
    lengths = [13, 8] if padded else [13, 13]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, length, 8, generator=gen).requires_grad_() for _ in range(3))
    real = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (B, L) real tokens
    dout = torch.randn(2, 3, length, 8, generator=gen) * real[:, None, :, None]  # no gradient from padding rows

    def kernel(q, k, v):
        fire_bias = fire.kernel_fire_bias()
        if not padded:
            return t5_flash_attention(q, k, v, fire_bias=fire_bias, bidirectional=bidirectional, causal=causal)
        rows = [t.transpose(1, 2)[real] for t in (q, k, v)]  # (total, H, D)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        out = t5_flash_attention_varlen(
            *rows, cu_seqlens, cu_seqlens, length, length, fire_bias=fire_bias, bidirectional=bidirectional,
            causal=causal,
        )  # fmt: skip
        return out.new_zeros(2, length, 3, 8).index_put((real,), out).transpose(1, 2)

    def materialized(q, k, v):
        return _materialized_attention(q, k, v, fire(length, length), lengths, causal)

    (out, grads), (expected, expected_grads) = (
        _outputs_and_grads(attention, q, k, v, fire, real, dout) for attention in (kernel, materialized)
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, grad, expected_grad in zip(("q", "k", "v", *_FIRE_PARAMETERS), grads, expected_grads):
        # a head-wide constant (mlp.2.bias) has no gradient, nor has a threshold below every query (0 or -3)
        assert name == "mlp.2.bias" or (name == "threshold" and threshold <= 0) or expected_grad.abs().sum() > 0, name
        # sums of up to 2 * 13 * 13 terms per head in another order: an absolute tolerance relative to the largest
        scale = max(expected_grad.abs().max().item(), 1.0)
        torch.testing.assert_close(grad, expected_grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
    with torch.no_grad():
        reference = t5_attention_reference(
            q, k, v, fire_bias=fire.kernel_fire_bias(), bidirectional=bidirectional, causal=causal,
            key_padding_mask=real,
        )  # fmt: skip
    torch.testing.assert_close(reference * real[:, None, :, None], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
def test_fire_past_the_threshold_over_a_kv_cache_equals_the_materialized_bias():
    """Decoding steps past FIRE's threshold through `t5_flash_attention_with_kvcache`: a dynamic cache (queries at
    the end of the keys) and a static one (a per-row offset, NaN in the unfilled slots), against FIRE's bias of the
    same positions added to materialized attention."""
    from fat5_kernels.attention import t5_flash_attention_with_kvcache

    fire = _fire_with_awkward_breakpoints(bidirectional=False, threshold=4.5)
    fire_bias = fire.kernel_fire_bias()
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 2, 8, generator=gen)  # two new tokens
    k_cache, v_cache = (torch.randn(2, 3, 16, 8, generator=gen) for _ in range(2))
    with torch.no_grad():
        for filled in ((11, 11), (9, 14)):  # tokens cached after this step: per row
            expected = torch.cat([
                _cached_reference(q[row : row + 1], k_cache[row : row + 1, :, :n], v_cache[row : row + 1, :, :n],
                                  fire(2, n, past_seen_tokens=n - 2))
                for row, n in enumerate(filled)
            ])  # fmt: skip
            if filled[0] == filled[1]:  # a dynamic cache: exactly the keys so far
                out = t5_flash_attention_with_kvcache(
                    q, k_cache[:, :, :11], v_cache[:, :, :11], fire_bias=fire_bias, bidirectional=False, causal=True
                )
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            slots_k, slots_v = k_cache.clone(), v_cache.clone()
            for row, n in enumerate(filled):
                slots_k[row, :, n:], slots_v[row, :, n:] = float("nan"), float("nan")
            offset = torch.tensor(filled) - 2
            out = t5_flash_attention_with_kvcache(
                q, slots_k, slots_v, query_offset=offset, fire_bias=fire_bias, bidirectional=False, causal=True
            )
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _cached_reference(q, k, v, bias):
    """softmax(q k^T + bias) v of new queries at the end of the keys, causal."""
    allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    scores = (q @ k.transpose(-1, -2) + bias).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.interpreter
def test_fire_custom_op_opcheck_and_one_compiled_graph_as_the_cache_fills():
    """The FIRE forward op passes opcheck, and a compiled decoding step (fullgraph) over a static cache serves every
    offset, below and past the threshold, with one graph."""
    from torch._dynamo.utils import counters

    from fat5_kernels.attention import _fire_parameters, t5_flash_attention_with_kvcache

    fire = _fire_with_awkward_breakpoints(bidirectional=False, threshold=4.5)
    fire_bias = fire.kernel_fire_bias()
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 3, 1, 8, generator=gen)
    k, v = (torch.randn(1, 3, 12, 8, generator=gen) for _ in range(2))
    packed, width = _fire_parameters(fire_bias, 3, False, q.device, False)
    args = (q, k, v, packed.detach(), None, None, None, torch.tensor([6]), 1, 12, width, True, 1.0)
    torch.library.opcheck(torch.ops.fat5.t5_flash_attention_fire_fwd.default, args)

    def step(q, k, v, offset):
        return t5_flash_attention_with_kvcache(
            q, k, v, query_offset=offset, fire_bias=fire_bias, bidirectional=False, causal=True
        )

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    offset = torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for past in (0, 3, 7, 11):
            offset.fill_(past)
            assert torch.equal(compiled(q, k, v, offset), step(q, k, v, offset))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.interpreter
@pytest.mark.parametrize("varlen", [False, True])
def test_fire_training_ops_opcheck_and_compiled_gradients(varlen):
    """The FIRE forward op with inputs that need gradients (its autograd formula) and its backward op pass opcheck,
    and a compiled training step (fullgraph) gives the eager gradients of q, k, v and FIRE's packed parameters."""
    from fat5_kernels.attention import _fire_parameters, t5_flash_attention

    fire = _fire_with_awkward_breakpoints(bidirectional=True, threshold=2.5)
    gen = torch.Generator().manual_seed(4)
    packed, width = _fire_parameters(fire.kernel_fire_bias(), 3, True, torch.device("cpu"), False)
    packed = packed.detach().requires_grad_()
    if varlen:
        q, k, v = (torch.randn(9, 3, 8, generator=gen).requires_grad_() for _ in range(3))
        cu_seqlens = torch.tensor([0, 6, 9], dtype=torch.int32)
        args = (q, k, v, packed, None, cu_seqlens, cu_seqlens, None, 6, 6, width, False, 1.0)
    else:
        q, k, v = (torch.randn(1, 3, 6, 8, generator=gen).requires_grad_() for _ in range(3))
        args = (q, k, v, packed, None, None, None, None, 6, 6, width, True, 1.0)
    torch.library.opcheck(torch.ops.fat5.t5_flash_attention_fire_fwd.default, args)
    out, lse = torch.ops.fat5.t5_flash_attention_fire_fwd(*args)
    dout = torch.randn(out.shape, generator=gen)
    backward_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, packed.detach(), *args[4:])
    torch.library.opcheck(torch.ops.fat5.t5_flash_attention_fire_bwd.default, backward_args)

    if varlen:
        return
    fire_bias = fire.kernel_fire_bias()

    def step(q, k, v):
        return t5_flash_attention(q, k, v, fire_bias=fire_bias, causal=True)

    tensors = (q, k, v, fire.distance_scale, fire.threshold)
    expected = torch.autograd.grad(step(q, k, v), tensors, dout, retain_graph=True)
    torch._dynamo.reset()
    actual = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v), tensors, dout)
    for grad, expected_grad in zip(actual, expected):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_gpu_fire_past_the_threshold_in_the_kernel(bidirectional, dtype):
    """FIRE (width 32) trained to a threshold of 300 at length 2048, padded rows: the compiled kernel against the
    float32 reference with the materialized bias, within twice the error of the same reference run in `dtype`
    (plus a floor), and a static cache's decoding step past the threshold."""
    from test_position_encoding import _random_fire

    from fat5_kernels.attention import t5_flash_attention, t5_flash_attention_with_kvcache
    from fat5_kernels.attention_reference import t5_attention_reference

    fire = _random_fire(bidirectional, threshold=300.0).cuda()
    with torch.no_grad():
        fire.mlp[0].weight.mul_(4.0)  # breakpoints spread over the inputs' range [-1, 1]
    fire_bias = fire.kernel_fire_bias()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2048, 64, generator=gen, device="cuda") * 0.3 for _ in range(3))
    keep = torch.ones(2, 2048, dtype=torch.bool, device="cuda")
    keep[1, 1500:] = False
    common = dict(fire_bias=fire_bias, bidirectional=bidirectional, causal=not bidirectional, key_padding_mask=keep)
    with torch.no_grad():
        expected = t5_attention_reference(q, k, v, **common)
        low = t5_attention_reference(q, k, v, compute_dtype=dtype, **common).float()
        out = t5_flash_attention(q.to(dtype), k.to(dtype), v.to(dtype), **common).float()
        error, reference_error = (out - expected).abs().max().item(), (low - expected).abs().max().item()
        assert error <= 2 * reference_error + 1e-4, (error, reference_error)
        if not bidirectional:
            offset = torch.tensor([1700], device="cuda")
            step = dict(fire_bias=fire_bias, bidirectional=False, causal=True, query_offset=offset)
            new_q = q[:, :, 1700:1701].to(dtype)
            out = t5_flash_attention_with_kvcache(new_q, k.to(dtype), v.to(dtype), **step).float()
            expected = t5_attention_reference(q[:, :, 1700:1701], k, v, **step)
            torch.testing.assert_close(out, expected, atol=2e-2 if dtype != torch.float32 else 1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_gpu_fire_gradients_past_the_threshold_in_the_kernel(bidirectional, dtype):
    """FIRE (width 32) trained to a threshold of 300 at length 1024, padded rows: the gradients of q, k, v and of
    every FIRE parameter through the kernel against the float32 reference with the materialized bias,
    each within twice the error of the same reference run in `dtype` (plus a floor)."""
    from test_position_encoding import _random_fire

    from fat5_kernels.attention import t5_flash_attention
    from fat5_kernels.attention_reference import t5_attention_reference

    fire = _random_fire(bidirectional, threshold=300.0).cuda()
    with torch.no_grad():
        fire.mlp[0].weight.mul_(4.0)  # breakpoints spread over the inputs' range [-1, 1]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        (torch.randn(2, 3, 1024, 64, generator=gen, device="cuda") * 0.3).requires_grad_() for _ in range(3)
    )  # fmt: skip
    dout = torch.randn(2, 3, 1024, 64, generator=gen, device="cuda")
    keep = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
    keep[1, 700:] = False
    common = dict(bidirectional=bidirectional, causal=not bidirectional, key_padding_mask=keep)
    tensors = [q, k, v, *(fire.get_parameter(name) for name in _FIRE_PARAMETERS)]

    def grads(attention, cast):
        out = attention(*(t.to(cast) for t in (q, k, v)), fire_bias=fire.kernel_fire_bias(), **common)
        return torch.autograd.grad(out.float(), tensors, dout)

    expected = grads(t5_attention_reference, torch.float32)
    low = grads(functools.partial(t5_attention_reference, compute_dtype=dtype), dtype)
    actual = grads(t5_flash_attention, dtype)
    for name, grad, low_grad, expected_grad in zip(("q", "k", "v", *_FIRE_PARAMETERS), actual, low, expected):
        error, reference_error = (
            (grad - expected_grad).abs().max().item(),
            (low_grad - expected_grad).abs().max().item(),
        )
        floor = 1e-3 * max(expected_grad.abs().max().item(), 1.0)
        assert error <= 2 * reference_error + floor, (name, error, reference_error)


@pytest.mark.interpreter
def test_fire_in_the_kernel_rejects_bad_input():
    """A second bias or misshapen FIRE parameters raise, naming the problem; a KV-cache step with FIRE is forward
    only and says so when a gradient would be needed."""
    from fat5_kernels.attention import t5_flash_attention, t5_flash_attention_with_kvcache

    fire = _fire_with_awkward_breakpoints(bidirectional=True, threshold=2.0)
    q, k, v = (torch.randn(1, 3, 4, 8, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError, match="one bias"):
        t5_flash_attention(q, k, v, fire_bias=fire.kernel_fire_bias(), alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="slopes"):
        t5_flash_attention(q[:, :2], k[:, :2], v[:, :2], fire_bias=fire.kernel_fire_bias())
    with pytest.raises(NotImplementedError, match="forward only"):
        t5_flash_attention_with_kvcache(q.detach(), k.detach(), v.detach(), fire_bias=fire.kernel_fire_bias())


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("threshold", "bias"), [(16.0, "distance"), (2.5, "fire")], ids=["below", "past"])
def test_fire_model_training_on_the_kernel_matches_pytorch(
    tiny_fat5_config, make_batch, monkeypatch, padded, threshold, bias
):
    """Both stacks in training below FIRE's threshold (every self-attention reads FIRE's table in the kernel) or past
    it (every self-attention evaluates FIRE per element in the kernel), the padded encoder batch through the varlen
    kernels: the logits and the gradients of every parameter, FIRE's of both stacks included, are the PyTorch path's
    (which materializes the bias)."""
    _kernels_importable()
    calls = []
    for name in _KERNELS:
        _record(monkeypatch, name, calls)
    config = tiny_fat5_config(
        position_encoding_type="fire", fire_threshold=threshold, use_fused_rms_norm=False, use_fused_glu=False,
        use_fused_cross_entropy=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(config).train()
    input_ids, attention_mask = make_batch(96, [9, 6] if padded else [9, 9])
    labels = _labels([5, 3])

    def loss_and_grads():
        model.zero_grad()
        outputs = model(input_ids=input_ids, attention_mask=attention_mask if padded else None, labels=labels)
        outputs.loss.backward()
        return outputs.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = loss_and_grads()
    assert calls == []
    with kernel_ops.kernels_on_cpu():
        actual = loss_and_grads()
    # 2 + 2 self-attentions on packed q/k/v; with a padded encoder batch both stacks run unpadded (varlen)
    kernel = "_triton_t5_flash_attention_varlen_qkvpacked" if padded else "_triton_t5_flash_attention_qkvpacked"
    assert [call for call in calls if call[1] is not None] == [(kernel, bias)] * 4
    for stack in ("encoder", "decoder"):
        for name in _FIRE_PARAMETERS:
            key = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.{name}"
            assert name == "mlp.2.bias" or expected[1][key].abs().sum() > 0, key
    _assert_same_logits_and_grads(actual, expected)


@pytest.mark.interpreter
def test_fire_takes_the_per_element_kernel_past_the_kernels_table_gradient(tiny_fat5_config, make_batch, monkeypatch):
    """A FIRE table too wide for the kernel's table gradient (here: more than 16 segments) sends a training stack to
    the kernel's per-element FIRE; forward-only calls keep the table; FIRE wider than the per-element kernel serves
    takes the PyTorch path."""
    _kernels_importable()
    import fat5_kernels.attention

    monkeypatch.setattr(fat5_kernels.attention, "MAX_TABLE_SEGMENTS", 16)
    calls = []
    for name in _KERNELS:
        _record(monkeypatch, name, calls)
    config = tiny_fat5_config(position_encoding_type="fire", fire_threshold=16.0, use_fused_rms_norm=False,
                              use_fused_glu=False, use_fused_cross_entropy=False)  # fmt: skip
    model = FAT5ForConditionalGeneration(config).train()
    input_ids, attention_mask = make_batch(96, [9, 6])
    labels = _labels([5, 3])
    with kernel_ops.kernels_on_cpu():
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        # encoder: 9 positions, R = 15, 31 segments: per element; decoder: 5 positions, R = 7, causal: 8 segments
        assert [bias for _, bias in calls if bias is not None] == ["fire"] * 2 + ["distance"] * 2
        calls.clear()
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        assert [bias for _, bias in calls].count("distance") == 4
        calls.clear()
        monkeypatch.setattr(kernel_ops, "_MAX_FIRE_WIDTH", config.fire_mlp_width - 1)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        assert [bias for _, bias in calls if bias is not None] == ["distance"] * 2


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("threshold", [16.0, 3.0])
def test_fire_reaches_fire_through_reentrant_checkpointed_layers(tiny_fat5_config, make_batch, threshold):
    """Reentrant gradient checkpointing sees only tensor arguments as a block's inputs: FIRE's table (below the
    threshold) or its flattened compact parameters (past it), shared by the layers as T5's table is, must get their
    gradient from every checkpointed layer."""
    _kernels_importable()
    config = tiny_fat5_config(
        position_encoding_type="fire", fire_threshold=threshold, use_fused_rms_norm=False, use_fused_glu=False,
        use_fused_cross_entropy=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(config).train()
    input_ids, attention_mask = make_batch(96, [9, 6])
    labels = _labels([5, 3])

    def grads():
        model.zero_grad()
        with kernel_ops.kernels_on_cpu():
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert model.encoder.block[1].gradient_checkpointing
    for name, grad in grads().items():
        # FIRE's output bias adds a constant to each head's row: its gradient is zero up to the rounding of sums as
        # large as its weight's gradient
        scale = max(expected[name.replace("mlp.2.bias", "mlp.2.weight")].abs().max().item(), 1e-2)
        torch.testing.assert_close(grad, expected[name], atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("padded", [False, True])
def test_fire_model_in_eval_past_the_threshold_on_the_kernel_equals_pytorch(
    tiny_fat5_config, make_batch, monkeypatch, padded
):
    """Both stacks past FIRE's threshold (trained to a fraction) without a gradient: every self-attention evaluates
    FIRE in the kernel (no table, no L x L bias), and the logits are the PyTorch path's; with a FIRE wider than the
    kernel serves, the stacks take the PyTorch path (training past the threshold on the kernel:
    `test_fire_model_training_on_the_kernel_matches_pytorch`)."""
    _kernels_importable()
    calls = []
    for name in _KERNELS:
        _record(monkeypatch, name, calls)
    config = tiny_fat5_config(position_encoding_type="fire", fire_threshold=3.5, use_fused_rms_norm=False,
                              use_fused_glu=False, use_fused_cross_entropy=False)  # fmt: skip
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(config).eval()
    input_ids, attention_mask = make_batch(96, [9, 6] if padded else [9, 9])
    labels = _labels([5, 3])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask if padded else None, labels=labels)
    with torch.no_grad():
        expected = model(**inputs)
        with kernel_ops.kernels_on_cpu():
            actual = model(**inputs)
    assert [bias for _, bias in calls if bias is not None] == ["fire"] * 4  # 2 + 2 self-attentions
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
    calls.clear()
    with kernel_ops.kernels_on_cpu():
        # a FIRE wider than the kernel serves: the PyTorch path, with or without a gradient
        monkeypatch.setattr(kernel_ops, "_MAX_FIRE_WIDTH", config.fire_mlp_width - 1)
        model(**inputs).loss.backward()
        with torch.no_grad():
            model(**inputs)
    assert [bias for _, bias in calls if bias is not None] == []


@pytest.mark.slow
@pytest.mark.interpreter
def test_fire_generation_with_the_kernels_equals_uncached_and_pytorch(tiny_fat5_config, make_batch, monkeypatch):
    """Greedy decoding past FIRE's threshold, with a dynamic or a static KV cache or without a cache: the encoder
    reads FIRE's table in the kernel; so do the decoder's steps below the threshold, and those past it evaluate FIRE
    per element in the kernel; the same tokens and scores as with the kernels off."""
    _kernels_importable()
    calls = []
    for name in (*_KERNELS, "_triton_t5_flash_attention_with_kvcache"):
        _record(monkeypatch, name, calls)
    config = tiny_fat5_config(position_encoding_type="fire", fire_threshold=6.0, use_fused_rms_norm=False,
                              use_fused_glu=False, use_fused_cross_entropy=False, eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(config).eval()
    input_ids, attention_mask = make_batch(96, [6, 4])

    def generate(**kwargs):
        return model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, output_scores=True,
            return_dict_in_generate=True, **kwargs,
        )  # fmt: skip

    expected = generate(use_cache=True)
    assert calls == []
    # the encoder (2 layers) reads the table once; steps 1..6 run decoder positions 0..5, below the threshold of 6,
    # on the table (2 layers each), and steps 7 and 8 evaluate FIRE in the kernel
    for kwargs in (dict(use_cache=True), dict(use_cache=False), dict(use_cache=True, cache_implementation="static")):
        calls.clear()
        with kernel_ops.kernels_on_cpu():
            result = generate(**kwargs)
        biases = [bias for _, bias in calls]
        assert (biases.count("distance"), biases.count("fire")) == (2 + 2 * 6, 2 * 2), kwargs
        if "cache_implementation" in kwargs:  # the static cache's steps through the kvcache entry point
            assert {name for name, bias in calls if bias == "fire"} == {"_triton_t5_flash_attention_with_kvcache"}
        assert torch.equal(result.sequences, expected.sequences), kwargs
        for scores, expected_scores in zip(result.scores, expected.scores):
            torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=1e-4)
    assert expected.sequences.shape == (2, 9)


@pytest.mark.gpu
@pytest.mark.parametrize("encoding", ["t5", "alibi", "rope", "fire", "none"])
def test_bf16_kernel_path_is_as_accurate_as_bf16_pytorch(monkeypatch, encoding):
    """Under bf16 autocast at a real length, the kernel path's loss and gradients are within twice the error of the
    PyTorch path's (both against the fp32 PyTorch path), those of the position encoding's parameters too. FIRE's
    threshold covers the 1024 positions: both stacks read its per-distance table in the kernel."""
    from fat5_hf import FAT5Config

    config = FAT5Config(
        vocab_size=512, d_model=256, d_kv=64, num_heads=4, d_ff=512, num_layers=2, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, position_encoding_type=encoding, fire_threshold=1024.0,
    )  # fmt: skip
    torch.manual_seed(0)
    models = {}
    for use_kernels in (False, True):
        torch.manual_seed(0)
        models[use_kernels] = FAT5ForConditionalGeneration(
            FAT5Config(**{**config.to_dict(), "use_triton_attention": use_kernels})
        ).cuda().train()  # fmt: skip
    models[True].load_state_dict(models[False].state_dict())
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 512, (4, 1024), generator=gen).cuda()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 700:] = 0
    labels = torch.randint(2, 512, (4, 256), generator=gen).cuda()

    def loss_and_grads(model, autocast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        grads = {name: p.grad.float().flatten() for name, p in model.named_parameters() if p.grad is not None}
        encoding_grads = [grad for name, grad in grads.items() if "relative_attention_bias" in name]
        return loss.float(), torch.cat(list(grads.values())), torch.cat(encoding_grads) if encoding_grads else None

    calls = []
    for name in _KERNELS:
        _record(monkeypatch, name, calls)
    loss32, grads32, encoding32 = loss_and_grads(models[False], autocast=False)
    loss_ref, grads_ref, encoding_ref = loss_and_grads(models[False], autocast=True)
    assert calls == []
    loss_kernel, grads_kernel, encoding_kernel = loss_and_grads(models[True], autocast=True)
    if encoding == "fire":
        assert [bias for _, bias in calls].count("distance") == 4  # 2 + 2 self-attentions
    assert (loss_kernel - loss32).abs() <= 2 * (loss_ref - loss32).abs() + 1e-3
    for name, exact, reference, kernel in (
        ("all", grads32, grads_ref, grads_kernel),
        ("encoding", encoding32, encoding_ref, encoding_kernel),
    ):
        if exact is None:  # no learned encoding
            continue
        reference_error = (reference - exact).norm() / exact.norm()
        kernel_error = (kernel - exact).norm() / exact.norm()
        assert kernel_error <= 2 * reference_error + 1e-3, (name, kernel_error, reference_error)
