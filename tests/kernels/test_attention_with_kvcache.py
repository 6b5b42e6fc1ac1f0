"""`t5_flash_attention_with_kvcache`: a generation step over a KV cache, queries placed by a device-side offset.

The kernel runs against `t5_attention_reference(..., query_offset=...)` (materialized, fp32) and against itself
without the offset on the filled part of the cache. fp32 inputs (exact fp32 products) are compared tightly;
float16 ones within twice the error of the same reference computed in float16, as in test_attention.py. Unfilled
static-cache slots hold NaN: the kernel must never read them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fat5_kernels.attention import t5_flash_attention, t5_flash_attention_with_kvcache  # noqa: E402
from fat5_kernels.attention_reference import t5_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# small buckets (radius 11 causal, 7 bidirectional): a 96-slot cache has far-left, band and far-right tiles
BUCKETS = dict(num_buckets=8, max_distance=16)


def _cache(batch, heads, new, slots, head_dim, filled, dtype=torch.float32, seed=0):
    """q (B, H, new, D) and a static cache (B, H, slots, D) whose slots from `filled` on hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, new, head_dim, generator=gen)
    k, v = (torch.randn(batch, heads, slots, head_dim, generator=gen) for _ in range(2))
    for cache in (k, v):
        for row, end in enumerate(filled):
            cache[row, :, end:] = float("nan")
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def _bias(kind, heads, bidirectional):
    if kind == "t5":
        table = torch.randn(heads, BUCKETS["num_buckets"], generator=torch.Generator().manual_seed(1)).to(DEVICE)
        return dict(bias_table=table, bidirectional=bidirectional, **BUCKETS)
    if kind == "alibi":
        return dict(alibi_slopes=torch.tensor([2.0 ** -(h + 1) for h in range(heads)], device=DEVICE))
    return {}


@pytest.mark.parametrize("bias", ["t5", "alibi", "none"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("new,past", [(1, 0), (1, 1), (1, 70), (5, 0), (5, 3), (40, 50)])
def test_offset_matches_reference_and_the_filled_cache(bias, causal, new, past):
    """Queries at ``past + i`` over a 96-slot cache: M = 1 (decoding) and M > 1 (chunked prefill), the offset a
    0-d tensor as transformers' static cache holds it."""
    slots, heads = 96, 2
    q, k, v = _cache(2, heads, new, slots, 8, filled=[past + new] * 2)
    kwargs = dict(causal=causal, **_bias(bias, heads, bidirectional=not causal))
    offset = torch.tensor(past, device=DEVICE)
    out = t5_flash_attention_with_kvcache(q, k, v, query_offset=offset, **kwargs)
    ref = t5_attention_reference(q, k, v, query_offset=offset, **kwargs)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    # the same step on the filled part alone (a dynamic cache: queries aligned to the end of the keys)
    filled = slice(0, past + new)
    aligned = t5_flash_attention(q, k[:, :, filled], v[:, :, filled], **kwargs)
    torch.testing.assert_close(out, aligned, atol=2e-6, rtol=1e-5)
    assert torch.equal(t5_flash_attention_with_kvcache(q, k[:, :, filled], v[:, :, filled], **kwargs), aligned)


def test_one_offset_per_row_with_key_padding():
    """A (B,) int32 offset gives each row its own filled length; a key padding mask (left padding) still applies."""
    pasts = [0, 9, 33]
    q, k, v = _cache(3, 2, 1, 40, 16, filled=[p + 1 for p in pasts])
    mask = torch.ones(3, 40, dtype=torch.bool, device=DEVICE)
    mask[1, :4] = False
    kwargs = dict(causal=True, key_padding_mask=mask, **_bias("t5", 2, bidirectional=False))
    offsets = torch.tensor(pasts, dtype=torch.int32, device=DEVICE)
    out = t5_flash_attention_with_kvcache(q, k, v, query_offset=offsets, **kwargs)
    ref = t5_attention_reference(q, k, v, query_offset=offsets, **kwargs)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for row in range(len(pasts)):
        alone = t5_flash_attention_with_kvcache(
            q[row : row + 1], k[row : row + 1], v[row : row + 1], query_offset=offsets[row],
            **{**kwargs, "key_padding_mask": mask[row : row + 1]},
        )  # fmt: skip
        torch.testing.assert_close(out[row : row + 1], alone, atol=0, rtol=0)


def test_float16_within_reference_error():
    q, k, v = _cache(2, 2, 3, 80, 16, filled=[60, 60], dtype=torch.float16)
    kwargs = dict(causal=True, **_bias("t5", 2, bidirectional=False))
    offset = torch.tensor([57], device=DEVICE)
    out = t5_flash_attention_with_kvcache(q, k, v, query_offset=offset, **kwargs)
    ref = t5_attention_reference(q, k, v, query_offset=offset, **kwargs)
    low = t5_attention_reference(q, k, v, query_offset=offset, compute_dtype=torch.float16, **kwargs)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 2 * (low.float() - ref).abs().max() + 1e-6


def test_offset_out_of_range_is_clamped_without_reading_out_of_bounds():
    """An offset past ``N - M`` (a caller's bug) is clamped to it: the result is the last positions', finite."""
    q, k, v = _cache(1, 2, 2, 24, 8, filled=[24])
    kwargs = dict(causal=True, **_bias("t5", 2, bidirectional=False))
    clamped = t5_flash_attention_with_kvcache(q, k, v, query_offset=torch.tensor(10_000, device=DEVICE), **kwargs)
    last = t5_flash_attention_with_kvcache(q, k, v, query_offset=torch.tensor(22, device=DEVICE), **kwargs)
    assert torch.equal(clamped, last)


def test_bad_inputs_raise():
    q, k, v = _cache(2, 2, 1, 16, 8, filled=[16, 16])
    with pytest.raises(TypeError, match="int32 or int64"):
        t5_flash_attention_with_kvcache(q, k, v, query_offset=torch.tensor(3.0))
    with pytest.raises(ValueError, match="one per batch row"):
        t5_flash_attention_with_kvcache(q, k, v, query_offset=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        t5_flash_attention_with_kvcache(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="key_padding_mask"):
        t5_flash_attention_with_kvcache(q, k, v, key_padding_mask=torch.ones(2, 15, dtype=torch.bool, device=DEVICE))
    with pytest.raises(NotImplementedError, match="forward only"):
        t5_flash_attention_with_kvcache(q.requires_grad_(), k, v, query_offset=torch.tensor(3, device=DEVICE))
    with torch.no_grad():
        t5_flash_attention_with_kvcache(q, k, v, query_offset=torch.tensor(3, device=DEVICE))


def test_custom_op_opcheck_and_one_compiled_graph_as_the_cache_fills():
    """The forward op passes opcheck, and a compiled step (fullgraph) serves every offset with one graph: the
    offset is data, not a constant of the graph."""
    from torch._dynamo.utils import counters

    q, k, v = _cache(1, 2, 1, 32, 8, filled=[32])
    table = _bias("t5", 2, bidirectional=False)["bias_table"]
    args = (q, k, v, torch.tensor([4], dtype=torch.int32, device=DEVICE), table, None, None, False, 8, 16, True, 1.0)
    torch.library.opcheck(torch.ops.fat5.t5_flash_attention_kvcache_fwd.default, args)

    def step(q, k, v, offset):
        return t5_flash_attention_with_kvcache(
            q, k, v, query_offset=offset, bias_table=table, bidirectional=False, causal=True, **BUCKETS
        )

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    offset = torch.zeros((), dtype=torch.long, device=DEVICE)
    for past in (0, 1, 17, 31):
        offset.fill_(past)
        assert torch.equal(compiled(q, k, v, offset), step(q, k, v, offset))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("new,past", [(1, 0), (1, 300), (1, 511), (16, 200)])
def test_gpu_decoding_shapes(dtype, new, past):
    """T5's 32 causal buckets over a 512-slot static cache, D = 64, within twice the low-precision reference's
    error (the rule of test_attention.py)."""
    from test_attention import assert_within_reference_error

    slots = 512
    q, k, v = _cache(4, 8, new, slots, 64, filled=[past + new] * 4, dtype=dtype)
    table = torch.randn(8, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE) * 0.5
    kwargs = dict(causal=True, bias_table=table, bidirectional=False, num_buckets=32, max_distance=128)
    offset = torch.tensor(past, device=DEVICE)
    out = t5_flash_attention_with_kvcache(q, k, v, query_offset=offset, **kwargs)
    ref = t5_attention_reference(q, k, v, query_offset=offset, **kwargs)
    low = t5_attention_reference(q, k, v, query_offset=offset, compute_dtype=dtype, **kwargs)
    assert_within_reference_error(out, ref, low, "out")
