"""Pure-PyTorch gated activation of T5 v1.1 / mT5 / FLAN-T5 MLPs (no triton import: used by the CPU path).

T5's ``DenseGatedActDense`` computes ``act(wi_0(h)) * wi_1(h)`` then ``wo``. The projections stay
``nn.Linear`` (so that PEFT/LoRA can wrap them); only the activation and the product are fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATION_ALIASES", "check_gated_activation_inputs", "gated_activation_reference", "resolve_activation"]

# The kernels take these; the reference also takes float64 (for high-precision checks).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = SUPPORTED_DTYPES + (torch.float64,)

# Canonical name -> the names that mean it. "gelu_new" (transformers' NewGELUActivation, T5 v1.1's
# `dense_act_fn`) and "gelu_pytorch_tanh" are the tanh approximation of GELU; "swish" is SiLU.
ACTIVATION_ALIASES = {
    "gelu_tanh": ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh"),
    "silu": ("silu", "swish"),
}


def resolve_activation(activation: str) -> str:
    """Map an activation name (transformers' spelling accepted) to "gelu_tanh" or "silu"."""
    for canonical, aliases in ACTIVATION_ALIASES.items():
        if activation in aliases:
            return canonical
    known = sorted(name for aliases in ACTIVATION_ALIASES.values() for name in aliases)
    raise ValueError(
        f"gated_activation: unsupported activation {activation!r}; choose one of {known} "
        "(exact erf GELU, 'gelu', is not fused: T5 v1.1 checkpoints use 'gelu_new')"
    )


def check_gated_activation_inputs(
    gate: torch.Tensor, up: torch.Tensor, supported_dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES
) -> None:
    """Raise a clear error when ``gate`` and ``up`` cannot be combined elementwise."""
    if gate.shape != up.shape:
        raise ValueError(
            f"gated_activation: gate shape {tuple(gate.shape)} differs from up shape {tuple(up.shape)}; "
            "both are the (..., d_ff) outputs of wi_0 and wi_1 on the same hidden states"
        )
    if gate.dtype != up.dtype:
        raise TypeError(
            f"gated_activation: gate dtype {gate.dtype} differs from up dtype {up.dtype}; "
            "run wi_0 and wi_1 in one dtype (or cast one of the outputs)"
        )
    if gate.dtype not in supported_dtypes:
        raise TypeError(f"gated_activation: dtype {gate.dtype} is not supported; use one of {supported_dtypes}")
    if gate.device != up.device:
        raise ValueError(f"gated_activation: gate is on {gate.device} but up is on {up.device}; use one device")


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "gelu_tanh") -> torch.Tensor:
    """``act(gate) * up`` in plain PyTorch.

    Args:
        gate: (..., d_ff) output of ``wi_0``.
        up: (..., d_ff) output of ``wi_1``, same shape and dtype as gate.
        activation: "gelu_tanh" (aliases "gelu_new", "gelu_pytorch_tanh") or "silu" (alias "swish").

    Returns:
        (..., d_ff) in gate's dtype.
    """
    check_gated_activation_inputs(gate, up, REFERENCE_DTYPES)
    if resolve_activation(activation) == "gelu_tanh":
        activated = F.gelu(gate, approximate="tanh")
    else:
        activated = F.silu(gate)
    return activated * up
