"""Fused T5 RMSNorm (optionally after the residual add) as Triton kernels, forward and backward.

Semantics are T5's (see :mod:`.rms_norm_reference`): the variance is computed in float32, the normalized
activations are cast to the weight dtype when it is half precision, then scaled by the weight; no mean, no
bias. With a residual the kernel also returns ``x + residual`` (in the promoted dtype of the two, as PyTorch's add),
the next residual stream, so that the add costs no extra pass over memory.

Forward: one program normalizes ``BLOCK_ROWS`` rows; it stores the output, the per-row ``rstd`` (float32, saved
for the backward) and the sum when there is a residual.
Backward: a fixed number of programs (a few per SM) each walk a contiguous range of rows, write the input
gradient and accumulate their share of the weight gradient in float32 registers; the partial sums of all programs
are then added in a fixed order by a second small kernel, which also casts: deterministic, no atomics.

Under ``torch.compile`` the kernels are reached through ``torch.library`` custom ops (``<namespace>::rms_norm_*``),
which the compiler treats as opaque; eager mode launches them directly to skip the dispatcher overhead.
"""

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # triton is optional; fat5_hf falls back to PyTorch without it
    raise ImportError("fat5_kernels.rms_norm needs triton: pip install 'fat5-hf[gpu]'") from err

from .rms_norm_reference import check_rms_norm_inputs, rms_norm_output_dtype
from .triton_utils import (
    cdiv,
    custom_op_namespace,
    launch,
    multiprocessor_count,
    next_power_of_2,
    triton_interpreter_enabled,
)

__all__ = ["RMSNormFunction", "rms_norm"]

# Rows wider than this would not fit one program's registers (Liger uses the same bound).
MAX_FUSED_COLS = 65536
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Columns a program of the weight-gradient reduction sums: d=768 spreads over 24 programs.
_SUM_BLOCK_COLS = 32


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    y_ptr,
    summed_ptr,
    rstd_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    residual_row_stride,
    y_row_stride,
    summed_row_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    CAST_TO_WEIGHT_DTYPE: tl.constexpr,
    INPUT_EVICTION: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]

    # Half-precision inputs are upcast right after the load: all arithmetic is float32.
    x = tl.load(
        x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0, eviction_policy=INPUT_EVICTION
    ).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        # Round the sum to its dtype before normalizing it, as `x + residual` in PyTorch would.
        summed = (x + residual).to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + rows[:, None] * summed_row_stride + cols[None, :], summed, mask=mask)
        x = summed.to(tl.float32)

    variance = tl.sum(x * x, axis=1) / n_cols
    rstd = tl.rsqrt(variance + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)

    normed = x * rstd[:, None]
    if CAST_TO_WEIGHT_DTYPE:  # T5 casts to the (half-precision) weight dtype before the scale
        normed = normed.to(weight_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0, eviction_policy=WEIGHT_EVICTION).to(tl.float32)
    y = normed * weight[None, :]
    tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr,
    summed_ptr,
    weight_ptr,
    rstd_ptr,
    dsummed_ptr,
    dx_ptr,
    dx_cast_ptr,
    dweight_partial_ptr,
    n_rows,
    n_cols,
    dy_row_stride,
    summed_row_stride,
    dsummed_row_stride,
    dx_row_stride,
    dx_cast_row_stride,
    rows_per_program,
    HAS_DSUMMED: tl.constexpr,
    HAS_DX_CAST: tl.constexpr,
    CAST_TO_WEIGHT_DTYPE: tl.constexpr,
    ROW_PIPELINE_STAGES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Per-row products are summed over rows only once, after the loop: fewer cross-thread reductions.
    dweight_acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)

    row_start = program.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # With several stages the loads of the next row blocks are issued while this one computes.
    for block_start in tl.range(row_start, row_end, BLOCK_ROWS, num_stages=ROW_PIPELINE_STAGES):
        rows = block_start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(summed_ptr + rows[:, None] * summed_row_stride + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

        normed = x * rstd[:, None]
        normed_scaled_input = normed
        if CAST_TO_WEIGHT_DTYPE:  # the weight multiplied the rounded activations in the forward
            normed_scaled_input = normed.to(weight_ptr.dtype.element_ty).to(tl.float32)
        dweight_acc += dy * normed_scaled_input

        # y = w * n, n = x * rstd, rstd = (mean(x^2) + eps)^-1/2  =>  dx = rstd * (dn - n * mean(dn * n)).
        # The cast to the weight dtype passes gradients through unchanged, as autograd's `.to()` does.
        dnormed = dy * weight[None, :]
        projection = tl.sum(dnormed * normed, axis=1) / n_cols
        dx = rstd[:, None] * (dnormed - normed * projection[:, None])
        if HAS_DSUMMED:  # gradient reaching the residual-stream output directly
            dx += tl.load(dsummed_ptr + rows[:, None] * dsummed_row_stride + cols[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DX_CAST:  # the same gradient for an input of a narrower dtype than the sum (rounded once)
            dx_cast = dx.to(dx_ptr.dtype.element_ty).to(dx_cast_ptr.dtype.element_ty)
            tl.store(dx_cast_ptr + rows[:, None] * dx_cast_row_stride + cols[None, :], dx_cast, mask=mask)

    tl.store(dweight_partial_ptr + program * n_cols + cols, tl.sum(dweight_acc, axis=0), mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    partial_ptr,
    out_ptr,
    n_partials,
    n_cols,
    BLOCK_PARTIALS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """out[c] = sum over p of partial[p, c] in a fixed order, cast to out's dtype: one launch where
    ``partial.sum(0).to(dtype)`` takes two for half-precision weights (a sum, then a cast)."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    acc = tl.zeros((BLOCK_PARTIALS, BLOCK_COLS), dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_PARTIALS):
        rows = start + tl.arange(0, BLOCK_PARTIALS)
        mask = (rows < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(partial_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_mask)


def _check_launchable(x: torch.Tensor) -> None:
    if not x.is_cuda and not triton_interpreter_enabled():
        raise ValueError(
            f"fat5_kernels.rms_norm runs Triton kernels on CUDA tensors, got a tensor on {x.device}; use "
            "fat5_kernels.rms_norm_reference.rms_norm_reference on CPU (or set TRITON_INTERPRET=1 for tests)"
        )
    if x.shape[-1] > MAX_FUSED_COLS:
        raise ValueError(
            f"fat5_kernels.rms_norm supports rows of at most {MAX_FUSED_COLS} elements, got {x.shape[-1]}"
        )


def _programs_per_launch(device: torch.device) -> int:
    """Number of streaming multiprocessors; a small number under the interpreter (still several programs)."""
    return multiprocessor_count(device) or 3


def _device_context(tensor: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensor's.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (rows, d) with unit stride along d (a view when the layout allows it)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _forward_launch_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps): tiles of ~4K elements. 4 warps up to d=1024 (H100 sweep, see
    `_backward_launch_config`: d=768 bf16 22.0 vs 24.1 us with 8, d=1024 27.4 vs 29.0), 8-16 above."""
    block_cols = next_power_of_2(n_cols)
    block_rows = max(1, min(16, 4096 // block_cols))
    num_warps = 4 if block_cols <= 1024 else min(16, max(4, block_rows * block_cols // 512))
    return block_rows, block_cols, num_warps


def _backward_launch_config(n_cols: int, element_size: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps, programs per SM, row-loop pipeline stages) for rows of ``n_cols``
    elements of ``element_size`` bytes (the wider of dy and the saved input).

    The backward is bound by memory latency: each program walks its rows serially. Swept on an H100
    (`benchmarks/rms_norm_sweep.py`, results in `benchmarks/results/rms_norm_sweep.{md,json}`): at d <= 1024,
    tiles of 4096 elements over 4 warps beat the earlier 2048 over 8 by 8-16% (d=768 bf16 52.4 vs 60.9 us,
    d=1024 58.0 vs 65.4, d=512 fp32 86.6 vs 103.3). More programs per SM hide more latency but multiply the
    float32 partial weight gradients (programs x d x 4 bytes; Liger-Kernel keeps one per SM; eight per SM took
    the in-place fwd+bwd 8 MiB above Liger's peak in `benchmarks/fused.py`, over its memory target).
    Pipelining the row loop instead (3 stages: the next tiles' loads in flight, 64 KiB of shared memory in fp32,
    within the 99 KiB of sm_86) with one program per SM beat two unpipelined programs per SM at every shape
    measured (H100, 2026-11-26, same process, us): d=768 bf16 49.3 vs 51.1, d=1024 bf16 54.9 vs 56.5, d=512 fp32
    82.9 vs 86.8, d=512 bf16 56.7 vs 64.7, with half the partial sums. (Two pipelined programs per SM lost badly
    at d=1024: 87.4.)

    Wider rows take one row a tile. Up to 16 KiB a row (the same shared memory), one pipelined program per SM over
    8 warps against two unpipelined ones over 16 (H100, 2026-11-26, backward kernel, us): bf16 d=2048 97.9 vs 97.7,
    d=4096 152.5 vs 152.7, d=8192 293.2 vs 319.7, fp32 d=4096 288.5 vs 292.6; again half the partial sums, which
    brings the d=4096 fwd+bwd peak to Liger's. Wider rows keep two unpipelined programs per SM.
    """
    block_cols = next_power_of_2(n_cols)
    if block_cols <= 1024:
        return max(1, min(16, 4096 // block_cols)), block_cols, 4, 1, 3
    if block_cols * element_size <= 16384:
        return 1, block_cols, 8, 1, 3
    return 1, block_cols, min(16, block_cols // 256), 2, 1


def _empty_sum(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
    """The buffer of ``x + residual`` (rows, d), in the dtype PyTorch's add would give; None without a residual."""
    if residual is None:
        return None
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))


def _sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Column sums of float32 ``partials`` (programs, d), contiguous, in a fixed order; returns (d,) in ``dtype``."""
    n_partials, n_cols = partials.shape
    out = torch.empty(n_cols, dtype=dtype, device=partials.device)
    with _device_context(partials):
        launch(
            _sum_partials_kernel,
            (cdiv(n_cols, _SUM_BLOCK_COLS),),
            (partials, out, n_partials, n_cols),
            dict(BLOCK_PARTIALS=64, BLOCK_COLS=_SUM_BLOCK_COLS),
            num_warps=4,
        )
    return out


def _rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward on 2-D inputs (rows, d). Returns (y, summed or None, rstd (rows,) float32)."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype or rms_norm_output_dtype(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    summed = _empty_sum(x, residual)
    if n_rows == 0:
        return y, summed, rstd
    block_rows, block_cols, num_warps = _forward_launch_config(n_cols)
    # The input is read once (first out of L2), the weight by every program (kept). H100, bf16: 13% faster without
    # a residual at d=768 (14.9 vs 17.2 us), level at d=1024; 1.5% slower with a residual (d=768, and d=512 bf16 on
    # a float32 stream) and without one at d=4096 (92.3 vs 90.8 us), which therefore get no hints.
    use_eviction_hints = residual is None and block_cols <= 1024
    with _device_context(x):
        launch(
            _rms_norm_forward_kernel,
            (cdiv(n_rows, block_rows),),
            (x, residual if residual is not None else x, weight, y, summed if summed is not None else y, rstd, n_rows,
             n_cols, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
             summed.stride(0) if summed is not None else 0, eps),
            dict(HAS_RESIDUAL=residual is not None, CAST_TO_WEIGHT_DTYPE=weight.dtype in _HALF_DTYPES,
                 INPUT_EVICTION="evict_first" if use_eviction_hints else "",
                 WEIGHT_EVICTION="evict_last" if use_eviction_hints else "", BLOCK_ROWS=block_rows,
                 BLOCK_COLS=block_cols),
            num_warps=num_warps,
        )  # fmt: skip
    return y, summed, rstd


def _rms_norm_backward(
    dy: torch.Tensor,
    summed: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dsummed: torch.Tensor | None,
    in_place: bool,
    cast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward on 2-D inputs. Returns (dx in summed's dtype (rows, d), dweight in weight's dtype, dx
    in ``cast_dtype`` or None).

    ``in_place`` writes dx into dy's buffer when dtypes agree (each program reads a row before writing it).
    ``cast_dtype``: also write dx rounded to this dtype (the gradient of a half-precision input of a float32 sum:
    one pass over memory less than casting it afterwards).
    """
    n_rows, n_cols = dy.shape
    if in_place and dy.dtype == summed.dtype:
        dx = dy
    else:
        dx = torch.empty((n_rows, n_cols), dtype=summed.dtype, device=dy.device)
    dx_cast = None
    if cast_dtype is not None and cast_dtype != summed.dtype:
        dx_cast = torch.empty((n_rows, n_cols), dtype=cast_dtype, device=dy.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight), dx_cast
    element_size = max(dy.element_size(), summed.element_size())
    block_rows, block_cols, num_warps, programs_per_sm, pipeline_stages = _backward_launch_config(n_cols, element_size)
    n_programs = min(_programs_per_launch(dy.device) * programs_per_sm, cdiv(n_rows, block_rows))
    # Whole row blocks per program, so that only the last program has a ragged tail.
    rows_per_program = cdiv(cdiv(n_rows, n_programs), block_rows) * block_rows
    n_programs = cdiv(n_rows, rows_per_program)
    dweight_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=dy.device)
    with _device_context(dy):
        launch(
            _rms_norm_backward_kernel,
            (n_programs,),
            (dy, summed, weight, rstd, dsummed if dsummed is not None else dy, dx, dx_cast if dx_cast is not None else dx,
             dweight_partial, n_rows, n_cols, dy.stride(0), summed.stride(0),
             dsummed.stride(0) if dsummed is not None else 0, dx.stride(0),
             dx_cast.stride(0) if dx_cast is not None else 0, rows_per_program),
            dict(HAS_DSUMMED=dsummed is not None, HAS_DX_CAST=dx_cast is not None,
                 CAST_TO_WEIGHT_DTYPE=weight.dtype in _HALF_DTYPES, ROW_PIPELINE_STAGES=pipeline_stages,
                 BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols),
            num_warps=num_warps,
        )  # fmt: skip
    return dx, _sum_partials(dweight_partial, weight.dtype), dx_cast


# ---- torch.library custom ops: what torch.compile sees (opaque, with fake implementations for tracing) ----
_NAMESPACE = custom_op_namespace(__name__)


@torch.library.custom_op(
    f"{_NAMESPACE}::rms_norm_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? residual, float eps, ScalarType? out_dtype) -> (Tensor, Tensor, Tensor)",
)
def _rms_norm_forward_op(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, summed, rstd = _rms_norm_forward(x, weight, residual, eps, out_dtype)
    # An op output may not alias an input: without residual the "summed" output is an empty placeholder.
    return y, summed if summed is not None else x.new_empty(0), rstd


@_rms_norm_forward_op.register_fake
def _(x, weight, residual, eps, out_dtype):
    y = x.new_empty(x.shape, dtype=out_dtype or rms_norm_output_dtype(x.dtype, weight.dtype))
    summed = _empty_sum(x, residual)
    return y, summed if summed is not None else x.new_empty(0), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op(
    f"{_NAMESPACE}::rms_norm_backward",
    mutates_args=(),
    schema=(
        "(Tensor dy, Tensor summed, Tensor weight, Tensor rstd, Tensor? dsummed, ScalarType? cast_dtype) "
        "-> (Tensor, Tensor, Tensor)"
    ),
)
def _rms_norm_backward_op(
    dy: torch.Tensor,
    summed: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dsummed: torch.Tensor | None,
    cast_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dweight, dx_cast = _rms_norm_backward(dy, summed, weight, rstd, dsummed, False, cast_dtype)
    return dx, dweight, dx_cast if dx_cast is not None else dx.new_empty(0)  # outputs may not alias inputs


@_rms_norm_backward_op.register_fake
def _(dy, summed, weight, rstd, dsummed, cast_dtype):
    needs_cast = cast_dtype is not None and cast_dtype != summed.dtype
    dx_cast = torch.empty_like(summed, dtype=cast_dtype) if needs_cast else summed.new_empty(0)
    return torch.empty_like(summed), torch.empty_like(weight), dx_cast


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; use :func:`rms_norm` rather than calling this directly."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, in_place_backward, out_dtype):
        check_rms_norm_inputs(x, weight, residual)
        _check_launchable(x)
        shape = x.shape
        x_rows = _as_rows(x)
        residual_rows = _as_rows(residual) if residual is not None else None
        if torch.compiler.is_compiling():
            y, summed, rstd = _rms_norm_forward_op(x_rows, weight, residual_rows, eps, out_dtype)
            summed = summed if residual is not None else None
        else:
            y, summed, rstd = _rms_norm_forward(x_rows, weight, residual_rows, eps, out_dtype)
        ctx.save_for_backward(summed if summed is not None else x_rows, weight, rstd)
        ctx.shape = shape
        ctx.has_residual = residual is not None
        ctx.x_dtype = x.dtype
        ctx.in_place_backward = in_place_backward
        ctx.set_materialize_grads(False)  # an unused output gets None, not a tensor of zeros
        y = y.view(shape)
        if summed is None:
            return y
        return y, summed.view(shape)

    @staticmethod
    def backward(ctx, dy, *maybe_dsummed):
        summed, weight, rstd = ctx.saved_tensors
        dsummed = maybe_dsummed[0] if ctx.has_residual else None
        if dy is None:  # only the residual-stream output was used: the norm contributes nothing
            return dsummed, None, dsummed, None, None, None
        dy_rows = _as_rows(dy)
        dsummed_rows = _as_rows(dsummed) if dsummed is not None else None
        # x and residual get the same gradient, in the sum's dtype; one tensor serves both (autograd copies it
        # before accumulating into a shared buffer), which saves a full activation-sized allocation. An x of a
        # narrower dtype than the sum (a half-precision sublayer output on the float32 residual stream) gets it
        # rounded to its dtype by the kernel, which saves autograd's cast (a pass over the fp32 gradient).
        cast_dtype = ctx.x_dtype if ctx.has_residual and ctx.x_dtype != summed.dtype else None
        if torch.compiler.is_compiling():
            dx, dweight, dx_cast = _rms_norm_backward_op(dy_rows, summed, weight, rstd, dsummed_rows, cast_dtype)
        else:
            in_place = ctx.in_place_backward and dy_rows.is_contiguous()
            dx, dweight, dx_cast = _rms_norm_backward(dy_rows, summed, weight, rstd, dsummed_rows, in_place, cast_dtype)
        dx = dx.view(ctx.shape)
        dresidual = dx if ctx.has_residual else None
        if cast_dtype is not None:
            return dx_cast.view(ctx.shape), dweight, dresidual, None, None, None
        return dx, dweight, dresidual, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    in_place_backward: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """T5 RMSNorm with fused Triton kernels, optionally fused with the residual add before it.

    Args:
        x: (..., d) float32, float16 or bfloat16, on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
            Any layout; rows must be addressable with a unit stride along d, else a copy is made.
        weight: (d,) scale; its dtype decides the output dtype as in T5 (see ``rms_norm_output_dtype``).
        eps: added to the float32 variance.
        residual: optional, x's shape. When given, the norm applies to ``x + residual``, computed in float32 and
            stored in the promoted dtype of the two (an fp32 residual stream plus a bf16 sublayer output: fp32).
        in_place_backward: write the input gradient into the incoming gradient's buffer (saves one
            activation-sized allocation, as Liger-Kernel does). Only safe when nothing else reads that
            gradient after this backward; ignored under ``torch.compile``.
        out_dtype: store ``normed`` in this dtype instead of T5's (``rms_norm_output_dtype``): the values are
            those of T5's output cast to ``out_dtype``. Under autocast the next ``nn.Linear`` casts its input to
            the autocast dtype anyway; storing it in that dtype saves a pass over the activations.

    Returns:
        ``normed`` of shape (..., d), or ``(normed, x + residual)`` with a residual.
        Gradients flow to x, weight and residual through both outputs; the weight gradient is reduced
        deterministically.
    """
    return RMSNormFunction.apply(x, weight, residual, float(eps), in_place_backward, out_dtype)
