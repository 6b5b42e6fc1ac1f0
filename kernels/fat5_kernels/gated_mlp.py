"""Fused gated activation of T5 v1.1 MLPs, ``act(gate) * up``, as Triton kernels, forward and backward.

The projections ``wi_0``/``wi_1`` (gate/up) and ``wo`` stay ``nn.Linear`` so that PEFT/LoRA still wraps them; the
kernels fuse what lies between them: the activation (tanh-approximated GELU, i.e. transformers' "gelu_new", or
SiLU) and the product. The forward reads gate and up once and writes the product; the backward saves only the
inputs and recomputes the activation, reading gate, up and the incoming gradient once and writing both input
gradients, which is the memory footprint of Liger-Kernel's GEGLU/SwiGLU.

All arithmetic is float32 (half-precision inputs are upcast after the load); results are stored in the inputs'
dtype. Under ``torch.compile`` the kernels are reached through ``torch.library`` custom ops.
"""

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # triton is optional; fat5_hf falls back to PyTorch without it
    raise ImportError("fat5_kernels.gated_mlp needs triton: pip install 'fat5-hf[gpu]'") from err

from .gated_mlp_reference import check_gated_activation_inputs, resolve_activation
from .triton_utils import cdiv, custom_op_namespace, launch, next_power_of_2, triton_interpreter_enabled

__all__ = ["GatedActivationFunction", "PackedGatedActivationFunction", "gated_activation", "gated_activation_packed"]

# Kernel-side ids of the activations (a constexpr int specializes the kernel).
_ACTIVATION_IDS = {"gelu_tanh": 0, "silu": 1}


@triton.jit
def _sigmoid(x):
    # exp of a non-positive number never overflows: no inf even for large |x|.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _activation_and_derivative(gate, ACTIVATION: tl.constexpr):
    """act(gate) and act'(gate) on float32 values. ACTIVATION: 0 = gelu_tanh, 1 = silu."""
    if ACTIVATION == 0:
        # gelu_tanh(g) = 0.5 g (1 + tanh(z)), z = sqrt(2/pi) (g + 0.044715 g^3); 0.5 (1 + tanh(z)) = sigmoid(2z),
        # which needs only exp (libdevice tanh does not run under the Triton interpreter).
        gate_sq = gate * gate
        two_z = 1.5957691216057308 * gate * (1.0 + 0.044715 * gate_sq)
        s = _sigmoid(two_z)
        activated = gate * s
        derivative = s + activated * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * gate_sq)
    else:
        s = _sigmoid(gate)
        activated = gate * s
        derivative = s * (1.0 + gate * (1.0 - s))
    return activated, derivative


@triton.jit
def _block_offsets(n_cols, BLOCK: tl.constexpr):
    """Each program takes BLOCK columns of one row: returns (row, columns, mask), in int64."""
    program = tl.program_id(0).to(tl.int64)
    n_col_blocks = tl.cdiv(n_cols, BLOCK)
    row = program // n_col_blocks
    cols = (program % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    return row, cols, cols < n_cols


@triton.jit
def _gated_activation_forward_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_cols,
    gate_row_stride,
    up_row_stride,
    out_row_stride,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols, mask = _block_offsets(n_cols, BLOCK)
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    activated, _ = _activation_and_derivative(gate, ACTIVATION)
    out = activated * up
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_activation_backward_kernel(
    dout_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    n_cols,
    dout_row_stride,
    gate_row_stride,
    up_row_stride,
    dgate_row_stride,
    dup_row_stride,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols, mask = _block_offsets(n_cols, BLOCK)
    dout = tl.load(dout_ptr + row * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    activated, derivative = _activation_and_derivative(gate, ACTIVATION)  # recomputed: only inputs are saved
    dgate = dout * up * derivative
    dup = dout * activated
    tl.store(dgate_ptr + row * dgate_row_stride + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * dup_row_stride + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def _check_launchable(gate: torch.Tensor) -> None:
    if not gate.is_cuda and not triton_interpreter_enabled():
        raise ValueError(
            f"fat5_kernels.gated_activation runs Triton kernels on CUDA tensors, got a tensor on {gate.device}; use "
            "fat5_kernels.gated_mlp_reference.gated_activation_reference on CPU (or set TRITON_INTERPRET=1 for tests)"
        )


def _device_context(tensor: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensor's.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _as_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """2-D (rows, cols) views with unit column stride, addressed alike: one flat row each when all are
    contiguous (the common case: outputs of nn.Linear), else rows of d_ff (copied only if a row is strided)."""
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, -1) for t in tensors]
    rows = [t.reshape(-1, t.shape[-1]) for t in tensors]
    return [r if r.stride(-1) == 1 else r.contiguous() for r in rows]


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 8 elements per thread, i.e. 16-byte accesses in half precision."""
    block = min(2048, next_power_of_2(max(n_cols, 1)))
    return block, max(1, min(8, block // 256))


def _gated_activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Launch the forward on 2-D views (see ``_as_rows``); returns a contiguous tensor of gate's shape."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return out
    gate_rows, up_rows, out_rows = _as_rows(gate, up, out)
    n_rows, n_cols = gate_rows.shape
    block, num_warps = _launch_config(n_cols)
    with _device_context(gate):
        launch(
            _gated_activation_forward_kernel,
            (n_rows * cdiv(n_cols, block),),
            (gate_rows, up_rows, out_rows, n_cols, gate_rows.stride(0), up_rows.stride(0), out_rows.stride(0)),
            dict(ACTIVATION=_ACTIVATION_IDS[activation], BLOCK=block),
            num_warps=num_warps,
        )
    return out


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a_end = a.data_ptr() + a.element_size() * (1 + sum((s - 1) * st for s, st in zip(a.shape, a.stride())))
    b_end = b.data_ptr() + b.element_size() * (1 + sum((s - 1) * st for s, st in zip(b.shape, b.stride())))
    return a.data_ptr() < b_end and b.data_ptr() < a_end


def _gated_activation_backward(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    in_place: bool,
    grad_buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns (d_gate, d_up) of gate's shape and dtype.

    ``in_place`` writes d_gate into gate and d_up into up (each element is read before it is overwritten by
    the same program); it falls back to new buffers when gate and up overlap in memory. ``grad_buffers``:
    (d_gate, d_up) tensors of gate's shape, laid out like gate and up, to write into instead (the two halves
    of the packed gradient of `gated_activation_packed`); ``in_place`` must then be False.
    """
    if gate.numel() == 0:
        if grad_buffers is not None:
            return grad_buffers
        return torch.zeros_like(gate), torch.zeros_like(up)
    dout = dout.to(gate.dtype)
    if grad_buffers is not None:
        dout_rows, gate_rows, up_rows, dgate_rows, dup_rows = _as_rows(dout, gate, up, *grad_buffers)
        in_place = False
    else:
        dout_rows, gate_rows, up_rows = _as_rows(dout, gate, up)
    # Writing into gate/up must reach their own storage (not a copy) and must not let one clobber the other.
    in_place = in_place and not _may_overlap(gate, up)
    in_place = in_place and gate_rows.data_ptr() == gate.data_ptr() and up_rows.data_ptr() == up.data_ptr()
    if in_place:
        dgate_rows, dup_rows = gate_rows, up_rows
    elif grad_buffers is None:
        dgate_rows = torch.empty(gate_rows.shape, dtype=gate.dtype, device=gate.device)
        dup_rows = torch.empty(up_rows.shape, dtype=up.dtype, device=up.device)
    n_rows, n_cols = gate_rows.shape
    block, num_warps = _launch_config(n_cols)
    with _device_context(gate):
        launch(
            _gated_activation_backward_kernel,
            (n_rows * cdiv(n_cols, block),),
            (dout_rows, gate_rows, up_rows, dgate_rows, dup_rows, n_cols, dout_rows.stride(0), gate_rows.stride(0),
             up_rows.stride(0), dgate_rows.stride(0), dup_rows.stride(0)),
            dict(ACTIVATION=_ACTIVATION_IDS[activation], BLOCK=block),
            num_warps=num_warps,
        )  # fmt: skip
    if in_place:
        return gate.detach(), up.detach()
    if grad_buffers is not None:
        return grad_buffers
    return dgate_rows.view(gate.shape), dup_rows.view(up.shape)


# ---- torch.library custom ops: what torch.compile sees (opaque, with fake implementations for tracing) ----
_NAMESPACE = custom_op_namespace(__name__)


@torch.library.custom_op(
    f"{_NAMESPACE}::gated_activation_forward",
    mutates_args=(),
    schema="(Tensor gate, Tensor up, str activation) -> Tensor",
)
def _gated_activation_forward_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return _gated_activation_forward(gate, up, activation)


@_gated_activation_forward_op.register_fake
def _(gate, up, activation):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op(
    f"{_NAMESPACE}::gated_activation_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor gate, Tensor up, str activation) -> (Tensor, Tensor)",
)
def _gated_activation_backward_op(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _gated_activation_backward(dout, gate, up, activation, in_place=False)


@_gated_activation_backward_op.register_fake
def _(dout, gate, up, activation):
    return (
        torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
        torch.empty(up.shape, dtype=up.dtype, device=up.device),
    )


def _split_packed(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, 2 d_ff) view of a (..., 2 d_ff) tensor -> its (rows, d_ff) halves (gate first), as views."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    return rows.chunk(2, dim=-1)


def _gated_activation_packed_backward(
    dout: torch.Tensor, gate_up: torch.Tensor, activation: str, in_place: bool
) -> torch.Tensor:
    """Gradient of `gated_activation_packed`, (..., 2 d_ff) like gate_up: both halves written by one launch."""
    gate, up = _split_packed(gate_up)
    dout = dout.reshape(gate.shape)
    if in_place and gate_up.is_contiguous():
        _gated_activation_backward(dout, gate, up, activation, in_place=False, grad_buffers=(gate, up))
        return gate_up.detach()
    grad = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    _gated_activation_backward(dout, gate, up, activation, in_place=False, grad_buffers=_split_packed(grad))
    return grad


@torch.library.custom_op(
    f"{_NAMESPACE}::gated_activation_packed_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor gate_up, str activation) -> Tensor",
)
def _gated_activation_packed_backward_op(dout: torch.Tensor, gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    return _gated_activation_packed_backward(dout, gate_up, activation, in_place=False)


@_gated_activation_packed_backward_op.register_fake
def _(dout, gate_up, activation):
    return torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)


class GatedActivationFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; use :func:`gated_activation` rather than calling this directly."""

    @staticmethod
    def forward(ctx, gate, up, activation, in_place_backward):
        if torch.compiler.is_compiling():
            out = _gated_activation_forward_op(gate, up, activation)
        else:
            out = _gated_activation_forward(gate, up, activation)
        ctx.save_for_backward(gate, up)  # only the inputs: the activation is recomputed in the backward
        ctx.activation = activation
        ctx.in_place_backward = in_place_backward
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        if torch.compiler.is_compiling():
            dgate, dup = _gated_activation_backward_op(dout, gate, up, ctx.activation)
        else:
            dgate, dup = _gated_activation_backward(dout, gate, up, ctx.activation, ctx.in_place_backward)
        return dgate, dup, None, None


class PackedGatedActivationFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels on a packed ``[gate | up]`` input; use :func:`gated_activation_packed`."""

    @staticmethod
    def forward(ctx, gate_up, activation, in_place_backward):
        gate, up = _split_packed(gate_up)
        if torch.compiler.is_compiling():
            out = _gated_activation_forward_op(gate, up, activation)
        else:
            out = _gated_activation_forward(gate, up, activation)
        ctx.save_for_backward(gate_up)
        ctx.activation = activation
        ctx.in_place_backward = in_place_backward
        return out.view(*gate_up.shape[:-1], gate.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            return _gated_activation_packed_backward_op(dout, gate_up, ctx.activation), None, None
        return _gated_activation_packed_backward(dout, gate_up, ctx.activation, ctx.in_place_backward), None, None


def gated_activation(
    gate: torch.Tensor, up: torch.Tensor, activation: str = "gelu_tanh", in_place_backward: bool = False
) -> torch.Tensor:
    """``act(gate) * up`` with fused Triton kernels (T5 v1.1 / mT5 / FLAN-T5 gated MLP).

    Args:
        gate: (..., d_ff) output of ``wi_0``, float32, float16 or bfloat16, on a CUDA device (or CPU under
            ``TRITON_INTERPRET=1``). Any layout with a unit stride along d_ff is read in place (e.g. halves of
            a fused projection); others are copied.
        up: (..., d_ff) output of ``wi_1``, same shape, dtype and device as gate.
        activation: "gelu_tanh" (aliases "gelu_new", "gelu_pytorch_tanh") or "silu" (alias "swish").
        in_place_backward: write d_gate into gate's buffer and d_up into up's, as Liger-Kernel does, saving two
            activation-sized allocations in the backward. Only safe when nothing reads gate or up after this
            backward (true for the outputs of ``wi_0``/``wi_1`` in a T5 MLP); ignored under ``torch.compile``.

    Returns:
        (..., d_ff) contiguous, in gate's dtype. The backward returns (d_gate, d_up), recomputing the activation
        from the saved inputs.
    """
    check_gated_activation_inputs(gate, up)
    canonical = resolve_activation(activation)
    _check_launchable(gate)
    return GatedActivationFunction.apply(gate, up, canonical, in_place_backward)


def gated_activation_packed(
    gate_up: torch.Tensor, activation: str = "gelu_tanh", in_place_backward: bool = False
) -> torch.Tensor:
    """``act(gate) * up`` where ``gate_up = [gate | up]`` is the output of one projection by the concatenated
    ``[wi_0; wi_1]`` weight.

    One matmul of width 2 d_ff runs faster than two of width d_ff, and its backward (input gradient) is one
    matmul too when the gradient of ``gate_up`` comes back packed. `gated_activation` on the two halves would
    return two gradients that autograd concatenates with a copy; this function writes both halves directly.

    Args:
        gate_up: (..., 2 d_ff) float32, float16 or bfloat16 on a CUDA device (or CPU under ``TRITON_INTERPRET=1``),
            contiguous last dimension; ``gate_up[..., :d_ff]`` is the gate (``wi_0``), the rest the up projection.
        activation: as in `gated_activation`.
        in_place_backward: write the gradient into ``gate_up``'s buffer (contiguous input only), as Liger-Kernel
            does; only safe when nothing reads ``gate_up`` after this backward. Ignored under ``torch.compile``.

    Returns:
        (..., d_ff) contiguous, in gate_up's dtype. The backward returns the (..., 2 d_ff) packed gradient.
    """
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            "gated_activation_packed: gate_up must be a (..., 2 * d_ff) tensor holding [gate | up], got shape "
            f"{tuple(getattr(gate_up, 'shape', ()))}"
        )
    if gate_up.stride(-1) != 1:
        raise ValueError("gated_activation_packed: gate_up needs a contiguous last dimension; call .contiguous()")
    gate, up = gate_up.chunk(2, dim=-1)
    check_gated_activation_inputs(gate, up)
    canonical = resolve_activation(activation)
    _check_launchable(gate_up)
    return PackedGatedActivationFunction.apply(gate_up, canonical, in_place_backward)
