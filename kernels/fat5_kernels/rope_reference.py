"""Pure-PyTorch rotary position embedding (RoPE), the reference of `fat5_kernels.rope` (no triton import).

RoPE (Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding") rotates channel pairs of
queries and keys by an angle proportional to the token's position, so that ``q_i . k_j`` depends on ``j - i`` only.
Pairing is GPT-NeoX's "rotate half": with ``half = rotary_dim / 2`` channel ``c < half`` pairs with ``c + half``:

    out[c]        = x[c] * cos[c] - x[c + half] * sin[c]
    out[c + half] = x[c + half] * cos[c] + x[c] * sin[c]

and channels from ``rotary_dim`` on pass unchanged (partial rotary). Values are never rotated.
"""

from __future__ import annotations

import torch

__all__ = ["check_rope_inputs", "rope_reference", "rotate_half_reference"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of ``x`` (last dimension), computed in float32.

    Args:
        x: ``(..., D)`` float tensor.
        cos, sin: float32 ``(..., rotary_dim // 2)``, broadcastable against ``x[..., :rotary_dim // 2]``.

    Returns:
        ``x``'s shape and dtype.
    """
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half].float(), x[..., half : 2 * half].float(), x[..., 2 * half :]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


def check_rope_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Raise a clear error when ``q``, ``k``, ``cos`` and ``sin`` cannot go through `rope` together."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"rope: q and k must be (batch, length, heads, head_dim) with the same batch, length and head_dim, got "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != q.shape[1]:
        raise ValueError(
            f"rope: cos and sin must both be (length, rotary_dim // 2) = ({q.shape[1]}, ...), got "
            f"{tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if 2 * cos.shape[1] > q.shape[-1] or cos.shape[1] == 0:
        raise ValueError(
            f"rope: rotary_dim = 2 x {cos.shape[1]} must be in [2, head_dim={q.shape[-1]}]; rotate fewer channels"
        )
    for name, tensor in (("q", q), ("k", k)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"rope: {name} has dtype {tensor.dtype}; supported dtypes are {SUPPORTED_DTYPES}")
    for name, tensor in (("k", k), ("cos", cos), ("sin", sin)):
        if tensor.device != q.device:
            raise ValueError(f"rope: {name} is on {tensor.device} but q is on {q.device}; move them to one device")


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries and keys, with the same signature as `fat5_kernels.rope.rope`; differentiable.

    Args:
        q: ``(B, L, H, D)``; k: ``(B, L, H_k, D)``; float32, float16 or bfloat16.
        cos, sin: float32 ``(L, rotary_dim // 2)``, the angles of positions ``0..L-1``.

    Returns:
        ``(q_rotated, k_rotated)``, shapes and dtypes of ``q`` and ``k``.
    """
    check_rope_inputs(q, k, cos, sin)
    cos, sin = cos.float()[:, None, :], sin.float()[:, None, :]
    return rotate_half_reference(q, cos, sin), rotate_half_reference(k, cos, sin)
