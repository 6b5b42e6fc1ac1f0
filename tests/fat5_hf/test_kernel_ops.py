"""Dispatch of `fat5_hf.kernel_ops.flash_attention`: unpadded cross-attention goes to SDPA, the rest to the kernel."""

import pytest
import torch

from fat5_hf import kernel_ops
from fat5_hf.kernel_ops import FlashAttentionMask


def _inputs(dtype):
    torch.manual_seed(0)
    query = torch.randn(2, 3, 5, 16, dtype=dtype)
    key, value = torch.randn(2, 3, 7, 16, dtype=dtype), torch.randn(2, 3, 7, 16, dtype=dtype)
    return query, key, value


@pytest.fixture
def kernel_calls(monkeypatch):
    """Replace the Triton kernel with a recorder (its output: zeros in the kernel's (B, H, M, D) layout)."""
    calls = []

    def fake_kernel(query, key, value, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(query)

    monkeypatch.setattr(kernel_ops, "_triton_t5_flash_attention", fake_kernel)
    return calls


def _call(query, key, value, mask, bias_table=None):
    return kernel_ops.flash_attention(
        query, key, value, mask, bias_table, bidirectional=True, num_buckets=32, max_distance=128
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpadded_cross_attention_uses_sdpa(kernel_calls, dtype):
    query, key, value = _inputs(dtype)
    out = _call(query, key, value, FlashAttentionMask(key_padding_mask=None, causal=False))
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=1.0).transpose(1, 2)
    assert kernel_calls == []
    assert out.shape == (2, 5, 3, 16)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "case",
    ["padding_mask", "causal", "bias", "float32"],
)
def test_other_attention_uses_the_kernel(kernel_calls, case):
    query, key, value = _inputs(torch.float32 if case == "float32" else torch.bfloat16)
    padding = torch.ones(2, 7, dtype=torch.bool) if case == "padding_mask" else None
    mask = FlashAttentionMask(key_padding_mask=padding, causal=case == "causal")
    table = torch.zeros(3, 32) if case == "bias" else None
    out = _call(query, key, value, mask, table)
    assert len(kernel_calls) == 1
    assert out.shape == (2, 5, 3, 16)
