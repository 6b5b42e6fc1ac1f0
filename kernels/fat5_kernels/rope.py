"""Rotary position embedding (RoPE) of queries and keys as one Triton pre-pass kernel, forward and backward.

Maths as `fat5_kernels.rope_reference` (GPT-NeoX "rotate half" pairing, partial rotary, values untouched). One
program serves one token: it loads the token's ``cos``/``sin`` once and rotates all the heads of its query and its
key, computing in float32 and storing in the input dtype. The backward is the inverse rotation of the output
gradient (the rotation is orthogonal): the same kernel with ``sin`` negated. The angles get no gradient.

Run before the attention kernel, whose bias is then "none": the rotation makes ``q_i . k_j`` a function of
``j - i``, with no (L, L) tensor. The op is a ``torch.library`` custom op with its autograd formula and a fake
implementation, so ``torch.compile`` sees one opaque op.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # triton is optional; fat5_hf falls back to PyTorch without it
    raise ImportError("fat5_kernels.rope needs triton: pip install 'fat5-hf[gpu]'") from err

from .rope_reference import check_rope_inputs
from .triton_utils import custom_op_namespace, next_power_of_2, triton_interpreter_enabled

__all__ = ["rope"]


@triton.jit
def _rotate_token_heads(
    x_ptr,
    out_ptr,
    x_head_stride,
    out_head_stride,
    num_heads,
    cos,
    sin,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):
    """Rotate the (num_heads, HEAD_DIM) rows of one token at ``x_ptr`` into ``out_ptr`` (unit channel stride)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (cols < HALF)
    x_rows = x_ptr + heads * x_head_stride
    out_rows = out_ptr + heads * out_head_stride
    # float32 right after the load (also what the interpreter needs: it does not compute bf16 arithmetic)
    x1 = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_rows + cols, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_rows + HALF + cols, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    if BLOCK_REST > 0:  # channels past rotary_dim: copied
        rest = 2 * HALF + tl.arange(0, BLOCK_REST)[None, :]
        rest_mask = (heads < num_heads) & (rest < HEAD_DIM)
        tl.store(out_rows + rest, tl.load(x_rows + rest, mask=rest_mask, other=0.0), mask=rest_mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    q_batch_stride,
    q_token_stride,
    q_head_stride,
    k_batch_stride,
    k_token_stride,
    k_head_stride,
    q_heads,
    k_heads,
    SIN_SIGN: tl.constexpr,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):
    """One program per token ``(b, l)``: ``q[b, l]`` and ``k[b, l]`` rotated by angle ``SIN_SIGN * theta_l``
    (``SIN_SIGN = -1``: the backward's inverse rotation). The outputs are contiguous (B, L, H, D)."""
    token = tl.program_id(0).to(tl.int64)  # offsets of large batches pass 2**31 elements
    b = token // seq_len
    position = token % seq_len
    half_cols = tl.arange(0, BLOCK_HALF)[None, :]
    angle_mask = half_cols < HALF
    cos = tl.load(cos_ptr + position * HALF + half_cols, mask=angle_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position * HALF + half_cols, mask=angle_mask, other=0.0).to(tl.float32) * SIN_SIGN
    _rotate_token_heads(
        q_ptr + b * q_batch_stride + position * q_token_stride,
        q_out_ptr + token * q_heads * HEAD_DIM,
        q_head_stride,
        HEAD_DIM,
        q_heads,
        cos,
        sin,
        HALF=HALF, HEAD_DIM=HEAD_DIM, BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF, BLOCK_REST=BLOCK_REST,
    )  # fmt: skip
    _rotate_token_heads(
        k_ptr + b * k_batch_stride + position * k_token_stride,
        k_out_ptr + token * k_heads * HEAD_DIM,
        k_head_stride,
        HEAD_DIM,
        k_heads,
        cos,
        sin,
        HALF=HALF, HEAD_DIM=HEAD_DIM, BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF, BLOCK_REST=BLOCK_REST,
    )  # fmt: skip


def _check_launchable(q: torch.Tensor) -> None:
    if not q.is_cuda and not triton_interpreter_enabled():
        raise ValueError(
            f"fat5_kernels.rope runs a Triton kernel on CUDA tensors, got a tensor on {q.device}; use "
            "fat5_kernels.rope_reference.rope_reference on CPU (or set TRITON_INTERPRET=1 for tests)"
        )


def _with_unit_channel_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _with_unit_channel_stride(q), _with_unit_channel_stride(k)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    batch, seq_len, q_heads, head_dim = q.shape
    k_heads = k.shape[2]
    half = cos.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    block_h = next_power_of_2(max(q_heads, k_heads))
    block_half = next_power_of_2(half)
    # a (heads, half) tile per load: 4 warps up to 4K elements, 8 above (H=16 x D/2=128)
    num_warps = 4 if block_h * block_half <= 4096 else 8
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _rope_kernel[(batch * seq_len,)](
            q_ptr=q,
            k_ptr=k,
            q_out_ptr=q_out,
            k_out_ptr=k_out,
            cos_ptr=cos,
            sin_ptr=sin,
            seq_len=seq_len,
            q_batch_stride=q.stride(0),
            q_token_stride=q.stride(1),
            q_head_stride=q.stride(2),
            k_batch_stride=k.stride(0),
            k_token_stride=k.stride(1),
            k_head_stride=k.stride(2),
            q_heads=q_heads,
            k_heads=k_heads,
            SIN_SIGN=-1.0 if inverse else 1.0,
            HALF=half,
            HEAD_DIM=head_dim,
            BLOCK_H=block_h,
            BLOCK_HALF=block_half,
            BLOCK_REST=next_power_of_2(head_dim - 2 * half) if head_dim > 2 * half else 0,
            num_warps=num_warps,
        )
    return q_out, k_out


# ---- torch.library custom op: what torch.compile sees (opaque, with a fake implementation and autograd) ----
_NAMESPACE = custom_op_namespace(__name__)


@torch.library.custom_op(f"{_NAMESPACE}::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_launch(q, k, cos, sin, inverse)


@_rope_op.register_fake
def _(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup_context(ctx, inputs, output) -> None:
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope_backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_op(dq_out, dk_out, cos, sin, not ctx.inverse)  # the inverse rotation
    return dq, dk, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries and keys with one Triton kernel (values are not touched).

    Args:
        q: ``(B, L, H, D)`` float32, float16 or bfloat16 on CUDA (or CPU under ``TRITON_INTERPRET=1``); any
            strides with a unit channel stride (e.g. a view of a projection's ``(B, L, H * D)`` output).
        k: ``(B, L, H_k, D)``, same dtype family and device.
        cos, sin: float32 ``(L, rotary_dim // 2)``: the angles of positions ``0..L-1``
            (`fat5_hf.position_encoding.RotaryPositionEmbedding`). Channels from ``rotary_dim`` on are copied.

    Returns:
        ``(q_rotated, k_rotated)``: contiguous, dtypes of ``q`` and ``k``. Gradients flow to ``q`` and ``k``.
    """
    check_rope_inputs(q, k, cos, sin)
    _check_launchable(q)
    return _rope_op(q, k, cos, sin, False)
