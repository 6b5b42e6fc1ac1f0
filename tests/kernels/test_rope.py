"""RoPE pre-pass kernel against the PyTorch reference: values and gradients.

Under the Triton interpreter (CPU) in float32 and float16 on tiny shapes; on a GPU (`gpu` marker) bfloat16 at a real
width. The kernel rotates in float32 and rounds once, as the reference does: float32 must agree to rounding (1e-6),
half precision to one unit in the last place of the output.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fat5_hf.position_encoding import RotaryPositionEmbedding  # noqa: E402
from fat5_kernels.rope import rope  # noqa: E402
from fat5_kernels.rope_reference import rope_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _case(batch, length, heads, head_dim, fraction, dtype, seed=0, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    if layout == "projection":  # q and k as views of one (B, L, 2 H D) projection output: strided heads
        qk = torch.randn(batch, length, 2 * heads * head_dim, generator=gen).to(DEVICE, dtype)
        q, k = (part.view(batch, length, heads, head_dim) for part in qk.split(heads * head_dim, dim=-1))
    else:
        q, k = (torch.randn(batch, length, heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    cos, sin = RotaryPositionEmbedding(head_dim, fraction, base=500.0).cos_sin(length, device=DEVICE)
    return q, k, cos, sin


def _check(q, k, cos, sin):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_out, k_out = rope(q, k, cos, sin)
    grads = [torch.randn_like(q_out), torch.randn_like(k_out)]
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), grads)
    q_ref, k_ref = rope_reference(q, k, cos, sin)
    dq_ref, dk_ref = torch.autograd.grad((q_ref, k_ref), (q, k), grads)
    tolerance = TOLERANCES[q.dtype]
    for name, actual, expected in (("q", q_out, q_ref), ("k", k_out, k_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref)):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance, msg=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, length, heads, head_dim, fraction, layout",
    [
        (2, 5, 3, 8, 1.0, "contiguous"),
        (1, 4, 2, 12, 0.5, "projection"),  # partial rotary (6 of 12 channels, odd half), strided q and k
        (1, 3, 5, 6, 1 / 3, "contiguous"),  # one channel pair, 5 heads
    ],
)  # fmt: skip
def test_rope_kernel_matches_reference(batch, length, heads, head_dim, fraction, layout, dtype):
    _check(*_case(batch, length, heads, head_dim, fraction, dtype, layout=layout))


@pytest.mark.interpreter
def test_rope_kernel_bad_inputs_are_named():
    q, k, cos, sin = _case(1, 4, 2, 8, 1.0, torch.float32)
    with pytest.raises(ValueError, match=r"cos and sin must both be \(length, rotary_dim // 2\) = \(4, \.\.\.\)"):
        rope(q, k, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="same batch, length and head_dim"):
        rope(q, k[:, :3], cos, sin)
    with pytest.raises(TypeError, match="supported dtypes"):
        rope(q.double(), k.double(), cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_kernel_matches_reference_on_gpu(dtype):
    _check(*_case(4, 1024, 12, 64, 1.0, dtype, layout="projection"))
    _check(*_case(2, 512, 16, 128, 0.25, dtype))


@pytest.mark.interpreter
def test_rope_custom_op_registration():
    # the fake (torch.compile's tracing), the schema and the autograd formula of the op that torch.compile sees
    from fat5_kernels.rope import _rope_op

    q, k, cos, sin = _case(1, 3, 2, 8, 0.5, torch.float32)
    torch.library.opcheck(_rope_op, (q.requires_grad_(), k.requires_grad_(), cos, sin, False))
