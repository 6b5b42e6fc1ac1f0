"""Pure-PyTorch RMSNorm as T5 defines it (no triton import: the model's CPU path uses this module).

T5's layer norm (transformers' ``T5LayerNorm``) is a root-mean-square norm with no mean subtraction and
no bias. The variance is computed in float32 whatever the input dtype; the normalized activations are
cast to the weight dtype when the weight is half precision, then scaled by the weight.
"""

from __future__ import annotations

import torch

__all__ = ["check_rms_norm_inputs", "rms_norm_output_dtype", "rms_norm_reference"]

# The kernels take these; the reference also takes float64 (for high-precision checks).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = SUPPORTED_DTYPES + (torch.float64,)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def rms_norm_output_dtype(input_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype T5LayerNorm returns: the weight dtype when it is half precision, else float32 promotion.

    ``x * rsqrt(variance)`` is float32 (the variance is), so with a float32 weight the output is float32
    even for half-precision inputs.
    """
    if weight_dtype in _HALF_DTYPES:
        return weight_dtype
    return torch.promote_types(torch.promote_types(input_dtype, torch.float32), weight_dtype)


def check_rms_norm_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    supported_dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
) -> None:
    """Raise a clear error when ``x``, ``weight`` and ``residual`` cannot go through an RMSNorm together."""
    if weight.dim() != 1:
        raise ValueError(f"rms_norm: weight must be 1-D of size d, got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: the last dimension of x {tuple(x.shape)} must equal the size of weight {weight.shape[0]}; "
            "pass x of shape (..., d) with a weight of shape (d,)"
        )
    for name, tensor in (("x", x), ("weight", weight)) + ((("residual", residual),) if residual is not None else ()):
        if tensor.dtype not in supported_dtypes:
            raise TypeError(f"rms_norm: {name} has dtype {tensor.dtype}; supported dtypes are {supported_dtypes}")
        if tensor.device != x.device:
            raise ValueError(f"rms_norm: {name} is on {tensor.device} but x is on {x.device}; move both to one device")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"rms_norm: residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}; "
                "the residual add is elementwise, pass tensors of the same shape"
            )


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """T5 RMSNorm in plain PyTorch, optionally after a residual add.

    Args:
        x: (..., d) float32, float16 or bfloat16 (float64 too, for checks).
        weight: (d,) scale, in the model dtype.
        eps: added to the variance before the reciprocal square root.
        residual: optional tensor of x's shape, added to x before the norm (the sum in the promoted dtype of the
            two, as ``x + residual``: an fp32 residual stream plus a half-precision sublayer output stays fp32).

    Returns:
        ``weight * (x * rsqrt(mean(x**2) + eps))`` of shape (..., d), in
        :func:`rms_norm_output_dtype` of (x.dtype, weight.dtype). With ``residual``, the pair
        ``(normed, summed)`` where ``summed = x + residual`` (the new residual stream).
    """
    check_rms_norm_inputs(x, weight, residual, REFERENCE_DTYPES)
    summed = x if residual is None else x + residual
    variance = summed.to(torch.float32).pow(2).mean(-1, keepdim=True)
    normed = summed * torch.rsqrt(variance + eps)
    if weight.dtype in _HALF_DTYPES:
        normed = normed.to(weight.dtype)
    normed = weight * normed
    return normed if residual is None else (normed, summed)
