"""Fused cross-entropy over the vocabulary (ignore_index, z-loss, label smoothing) in Triton.

Row kernels over the (N, V) logits:

* `_cross_entropy_fwd_kernel` computes each row's log-sum-exp and loss (one read). With ``COMPUTE_GRAD`` it also
  writes the gradient of the reduced loss (for ``grad_output = 1``), possibly over the logits themselves: this is the
  mode `fat5_kernels.fused_linear_cross_entropy` uses on each chunk of logits, which it discards right after. A row
  of at most ``MAX_SINGLE_PASS_BLOCK`` logits is then read once; wider rows (32k vocabularies) are read twice, the
  second time backwards, mostly from L2.
* `_cross_entropy_fwd_split_row_kernel` is that gradient mode for rows wider than ``WIDE_ROW_COLS`` (mT5's
  250,112): one program a part of a row, the parts exchanging their statistics (see `SPLIT_ROW_PART_COLS`).
* `_cross_entropy_bwd_kernel` recomputes the softmax from the saved log-sum-exp and writes the gradient, already
  multiplied by ``grad_output`` (one read, one write).

`cross_entropy` (a `torch.autograd.Function`) uses the loss-only forward and the backward kernel: a training forward
costs one read of the logits (the least any loss can), the backward one read and one write, and by default the
gradient is written over the logits (no (N, V) buffer is allocated, as in Liger-Kernel, whose forward writes the
gradient instead). This makes the forward as cheap as a plain loss and handles any ``grad_output`` (gradient
accumulation, loss scaling, ``reduction="none"``) without an extra pass.

Under ``torch.compile`` the forward and backward are two ``torch.library`` custom ops
(``<namespace>::cross_entropy_forward`` / ``cross_entropy_backward``), so a compiled model keeps its graph across
the loss; there the backward writes the gradient to a new buffer (Inductor plans the memory), not over the logits.

Gradient of row ``i`` (``p = softmax(x_i)``, ``lse = log(sum(exp(x_i)))``, ``eps`` the smoothing, ``z`` the z-loss
coefficient, ``n`` the count of non-ignored rows for ``reduction="mean"``, else 1)::

    d loss / d x_ij = ((1 + 2 z lse) p_j - (1 - eps) [j == y_i] - eps / V) / n

The pure-PyTorch reference (used on CPU by the model) is `fat5_kernels.cross_entropy_reference`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # triton is optional; fat5_hf falls back to PyTorch without it
    raise ImportError("fat5_kernels.cross_entropy needs triton: pip install 'fat5-hf[gpu]'") from err

from .cross_entropy_reference import validate_cross_entropy_inputs
from .triton_utils import cdiv, custom_op_namespace, launch, multiprocessor_count, next_power_of_2

__all__ = ["CrossEntropyFunction", "cross_entropy", "cross_entropy_forward", "scale_"]

# Forward with gradient: a row of at most this many logits is held in registers and read once (16 warps x 32 fp32
# per thread); wider rows are read twice, in blocks of MULTI_PASS_BLOCK, the second time backwards (it starts with
# the blocks the first pass read last, most likely still in L2). For 4096 rows of 32,768 bf16 logits in place
# (H100) two reads by a 16-warp program took 0.202 ms, one read by a 32-warp program holding the whole row 0.229
# (one program per SM), and one read with the row spread over programs whose last to finish writes its gradient
# 0.240 (2026-11-27; benchmarks/results/fused.notes.md).
MAX_SINGLE_PASS_BLOCK = 16384
MULTI_PASS_BLOCK = 16384
# Loss-only forward (one read whatever V): block of the online log-sum-exp loop. Backward: block of its 2D grid.
LOSS_ONLY_BLOCK = 8192
BACKWARD_BLOCK = 4096
# Forward with gradient on rows wider than WIDE_ROW_COLS: with one program a row, the rows in flight (two
# per SM, 500 KB each at V=250,112) do not fit in L2, and the second read comes from memory. Each row is split into
# parts of SPLIT_ROW_PART_COLS columns, one program a part; the parts in flight fit in L2, so each part's second
# read hits it. A row's parts exchange (max, sum of exp, sum of logits) through memory: each publishes its own and
# waits for the others (`_cross_entropy_fwd_split_row_kernel`). H100, bf16 in place, same process: 2048 x 250,112
# 0.784 ms against 0.909 with one program a row (4096 x 131,072: 0.815 vs 0.850); parts of 8192 to 49,152
# columns, blocks of 4096 to 16,384 and 4 to 16 warps were slower (0.79-1.55 ms). At 8192 x 32,128, where the
# rows in flight fit in L2, parts of 16,384 lose (0.409 vs 0.373 ms), hence the threshold (2026-11-27;
# benchmarks/results/fused.notes.md).
WIDE_ROW_COLS = 65536
SPLIT_ROW_PART_COLS = 16384
SPLIT_ROW_BLOCK = 8192
SPLIT_ROW_WARPS = 8
# Registers a thread may use with 16-bit logits: 48 lets five 8-warp programs share an SM (80, the compiler's choice
# with runtime part sizes, allows three). 2048 x 250,112 bf16, same process: 0.783 ms at 48, 0.805 at 64 or uncapped
# (60), 0.832 at 40 (spills).
SPLIT_ROW_MAX_REGISTERS = 48


@triton.jit
def _online_row_stats(logits_row, n_cols, SUM_LOGITS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """``(max, sum of exp(x - max), sum of x or 0)`` of a row of ``n_cols`` logits, float32, in one read of the
    row (online max / sum-exp over blocks)."""
    cols = tl.arange(0, BLOCK_SIZE)
    row_max = float("-inf")
    sum_exp = 0.0
    sum_x = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(logits_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max
        if SUM_LOGITS:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
    return row_max, sum_exp, sum_x


@triton.jit
def _store_row_loss(
    row_loss_ptr, row_z_ptr, lse_ptr, row, lse, target_logit, sum_x, n_cols, z_loss, label_smoothing,
    STORE_LSE: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):  # fmt: skip
    """Store a non-ignored row's loss (and z term, log-sum-exp)."""
    if STORE_LSE:
        tl.store(lse_ptr + row, lse)
    loss = lse - (1.0 - label_smoothing) * target_logit
    if HAS_SMOOTHING:
        loss -= label_smoothing * sum_x / n_cols
    if HAS_Z_LOSS:
        z_term = z_loss * lse * lse
        loss += z_term
        tl.store(row_z_ptr + row, z_term)
    tl.store(row_loss_ptr + row, loss)


@triton.jit
def _store_ignored_row_loss(row_loss_ptr, row_z_ptr, lse_ptr, row, STORE_LSE: tl.constexpr, HAS_Z_LOSS: tl.constexpr):
    tl.store(row_loss_ptr + row, 0.0)
    if HAS_Z_LOSS:
        tl.store(row_z_ptr + row, 0.0)
    if STORE_LSE:
        tl.store(lse_ptr + row, 0.0)


@triton.jit
def _gradient_terms(
    count_ptr, lse, sum_exp, n_cols, z_loss, label_smoothing, DIVIDE_BY_COUNT: tl.constexpr, HAS_Z_LOSS: tl.constexpr
):
    """``(p_scale, smooth_term, target_term)``: the row's gradient is ``exp(x - max) * p_scale - smooth_term``,
    minus ``target_term`` at the label (``grad_output = 1``)."""
    if DIVIDE_BY_COUNT:
        scale = 1.0 / tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0)
    else:
        scale = 1.0
    # softmax * (1 + 2 z lse), with the 1 / sum_exp folded in.
    p_scale = scale / sum_exp
    if HAS_Z_LOSS:
        p_scale *= 1.0 + 2.0 * z_loss * lse
    return p_scale, scale * label_smoothing / n_cols, scale * (1.0 - label_smoothing)


@triton.jit
def _store_gradient_backwards(
    logits_row, grad_row, start, end, label, row_max, p_scale, smooth_term, target_term, BLOCK_SIZE: tl.constexpr
):
    """Gradient of columns ``[start, end)`` of a row, read again and written block by block from the last: the
    first blocks re-read are those the statistics pass read last, most likely still in L2. Each element is read
    before it is written, by the same thread (grad may alias the logits)."""
    cols = tl.arange(0, BLOCK_SIZE)
    last_start = start + (end - start - 1) // BLOCK_SIZE * BLOCK_SIZE
    for block_start in range(start, end, BLOCK_SIZE):
        offs = last_start - (block_start - start) + cols
        mask = offs < end
        x = tl.load(logits_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        grad = tl.exp(x - row_max) * p_scale - smooth_term - tl.where(offs == label, target_term, 0.0)
        tl.store(grad_row + offs, grad.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _store_zeros(row, start, end, BLOCK_SIZE: tl.constexpr):
    cols = tl.arange(0, BLOCK_SIZE)
    for block_start in range(start, end, BLOCK_SIZE):
        offs = block_start + cols
        tl.store(row + offs, tl.zeros([BLOCK_SIZE], dtype=tl.float32).to(row.dtype.element_ty), mask=offs < end)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    row_loss_ptr,
    row_z_ptr,
    lse_ptr,
    count_ptr,
    n_cols,
    ignore_index,
    z_loss,
    label_smoothing,
    COMPUTE_GRAD: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DIVIDE_BY_COUNT: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Loss, log-sum-exp (STORE_LSE) and gradient (COMPUTE_GRAD) of one row.

    grad may alias logits (in place): each element is read before it is written, by the same thread.
    """
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    label = tl.load(labels_ptr + row).to(tl.int32)
    cols = tl.arange(0, BLOCK_SIZE)

    if label == ignore_index:
        _store_ignored_row_loss(row_loss_ptr, row_z_ptr, lse_ptr, row, STORE_LSE, HAS_Z_LOSS)
        if COMPUTE_GRAD:
            _store_zeros(grad_row, 0, n_cols, BLOCK_SIZE)
        return

    # Read the target logit before any store: the gradient may overwrite the logits.
    target_logit = tl.load(logits_row + label).to(tl.float32)
    if SINGLE_PASS:
        mask = cols < n_cols
        # fp32 right after the load (also required by the Triton interpreter's broken bf16 maths).
        x = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        row_max = tl.max(x, axis=0)
        exp_x = tl.exp(x - row_max)
        sum_exp = tl.sum(exp_x, axis=0)
        sum_x = 0.0
        if HAS_SMOOTHING:
            sum_x = tl.sum(tl.where(mask, x, 0.0), axis=0)
    else:
        row_max, sum_exp, sum_x = _online_row_stats(logits_row, n_cols, HAS_SMOOTHING, BLOCK_SIZE)

    lse = row_max + tl.log(sum_exp)
    _store_row_loss(row_loss_ptr, row_z_ptr, lse_ptr, row, lse, target_logit, sum_x, n_cols, z_loss, label_smoothing,
                    STORE_LSE, HAS_Z_LOSS, HAS_SMOOTHING)  # fmt: skip

    if COMPUTE_GRAD:
        p_scale, smooth_term, target_term = _gradient_terms(
            count_ptr, lse, sum_exp, n_cols, z_loss, label_smoothing, DIVIDE_BY_COUNT, HAS_Z_LOSS
        )
        if SINGLE_PASS:
            grad = exp_x * p_scale - smooth_term - tl.where(cols == label, target_term, 0.0)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # Backwards, as `_store_gradient_backwards` does; written out, because the call cost 1% here (8192 x
            # 32,128 with z-loss and smoothing, H100: 0.431 against 0.426 ms).
            last_start = (n_cols - 1) // BLOCK_SIZE * BLOCK_SIZE
            for start in range(0, n_cols, BLOCK_SIZE):
                offs = last_start - start + cols
                mask = offs < n_cols
                x = tl.load(logits_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                grad = tl.exp(x - row_max) * p_scale - smooth_term - tl.where(offs == label, target_term, 0.0)
                tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_fwd_split_row_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    row_loss_ptr,
    row_z_ptr,
    lse_ptr,
    count_ptr,
    sync_ptr,
    part_stats_ptr,
    n_cols,
    ignore_index,
    z_loss,
    label_smoothing,
    STORE_LSE: tl.constexpr,
    DIVIDE_BY_COUNT: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    PHASE: tl.constexpr,
    N_PARTS: tl.constexpr,
    PARTS_POW2: tl.constexpr,
    PART_COLS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Loss and gradient of one part (``PART_COLS`` columns) of a row; the forward-with-gradient of
    `_cross_entropy_fwd_kernel` for rows wider than ``WIDE_ROW_COLS``.

    ``sync_ptr``: int32 ``(1 + n_rows)``, zeros: a ticket counter, then each row's count of published parts.
    ``part_stats_ptr``: float32 ``(n_rows, N_PARTS, 4)``: each part's (max, sum of exp(x - max), sum of x), and
    the row's target logit in part 0's fourth slot.

    PHASE 0 does everything in one launch: a part publishes its statistics, then waits until the row's other parts
    have published theirs. All of a row's parts must then be able to run at once: the caller launches this only
    when ``N_PARTS`` is at most the device's number of SMs. That is conservative: five of these programs share an
    H100 SM, so the 16 parts of an mT5 row need 4 SMs (also under MPS, for a process given at least that share).
    Programs take their (row, part) from the ticket counter, in the order they start, so no program waits for a
    part that has not started while it holds an SM that part needs.
    PHASE 1 (publish) then PHASE 2 (combine and write the gradient) are the same work in two launches, for the
    Triton interpreter (which runs programs one after the other) and for GPUs with fewer SMs than parts; the
    ticket counter is zeroed between them.
    """
    ticket = tl.atomic_add(sync_ptr, 1)
    row = (ticket // N_PARTS).to(tl.int64)
    part = ticket % N_PARTS
    logits_row = logits_ptr + row * logits_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    start = part * PART_COLS
    end = tl.minimum(start + PART_COLS, n_cols)
    label = tl.load(labels_ptr + row).to(tl.int32)
    if label == ignore_index:
        if PHASE != 1:
            _store_zeros(grad_row, start, end, BLOCK_SIZE)
            if part == 0:
                _store_ignored_row_loss(row_loss_ptr, row_z_ptr, lse_ptr, row, STORE_LSE, HAS_Z_LOSS)
        return

    row_stats = part_stats_ptr + row * N_PARTS * 4
    if PHASE != 2:
        # Every part reads the target logit before it publishes: no part of the row has written its gradient yet.
        target_logit = tl.load(logits_row + label).to(tl.float32)
        part_max, part_sum_exp, part_sum_x = _online_row_stats(logits_row + start, end - start, HAS_SMOOTHING,
                                                               BLOCK_SIZE)  # fmt: skip
        tl.store(row_stats + part * 4, part_max)
        tl.store(row_stats + part * 4 + 1, part_sum_exp)
        tl.store(row_stats + part * 4 + 2, part_sum_x)
        if part == 0:
            tl.store(row_stats + 3, target_logit)
    if PHASE == 1:
        return
    if PHASE == 0:
        published = sync_ptr + 1 + row
        tl.debug_barrier()  # every thread's stores above come before the release below
        tl.atomic_add(published, 1, sem="release")
        count = tl.atomic_add(published, 0, sem="acquire")
        while count < N_PARTS:
            count = tl.atomic_add(published, 0, sem="acquire")
        tl.debug_barrier()
    else:
        target_logit = tl.load(row_stats + 3)

    # The row's statistics from its parts', in part order (the same result whatever order they arrived in); read
    # through L2 (".cg"): other SMs wrote them.
    parts = tl.arange(0, PARTS_POW2)
    part_mask = parts < N_PARTS
    parts_max = tl.load(row_stats + parts * 4, mask=part_mask, other=float("-inf"), cache_modifier=".cg")
    parts_sum_exp = tl.load(row_stats + parts * 4 + 1, mask=part_mask, other=0.0, cache_modifier=".cg")
    row_max = tl.max(parts_max, axis=0)
    sum_exp = tl.sum(parts_sum_exp * tl.exp(parts_max - row_max), axis=0)
    lse = row_max + tl.log(sum_exp)
    if part == 0:
        sum_x = 0.0
        if HAS_SMOOTHING:
            sum_x = tl.sum(tl.load(row_stats + parts * 4 + 2, mask=part_mask, other=0.0, cache_modifier=".cg"), axis=0)
        _store_row_loss(row_loss_ptr, row_z_ptr, lse_ptr, row, lse, target_logit, sum_x, n_cols, z_loss,
                        label_smoothing, STORE_LSE, HAS_Z_LOSS, HAS_SMOOTHING)  # fmt: skip
    p_scale, smooth_term, target_term = _gradient_terms(
        count_ptr, lse, sum_exp, n_cols, z_loss, label_smoothing, DIVIDE_BY_COUNT, HAS_Z_LOSS
    )
    _store_gradient_backwards(logits_row, grad_row, start, end, label, row_max, p_scale, smooth_term, target_term,
                              BLOCK_SIZE)  # fmt: skip


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    lse_ptr,
    grad_output_ptr,
    count_ptr,
    n_cols,
    vocab_size,
    label_offset,
    ignore_index,
    z_loss,
    label_smoothing,
    GRAD_OUTPUT_PER_ROW: tl.constexpr,
    DIVIDE_BY_COUNT: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """grad[row, block] = grad_output * d(loss)/d(logits[row, block]), from the saved log-sum-exp.

    Grid (rows, column blocks). grad may alias logits (in place). The ``n_cols`` logits may be the columns
    ``label_offset + [0, n_cols)`` of a ``vocab_size`` vocabulary (smoothing spreads over the whole vocabulary).
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_cols
    grad_row = grad_ptr + row * grad_row_stride
    label = tl.load(labels_ptr + row).to(tl.int32)
    if label == ignore_index:
        tl.store(grad_row + offs, tl.zeros([BLOCK_SIZE], dtype=tl.float32), mask=mask)
        return
    label -= label_offset  # after the ignore check: a shifted vocabulary id may equal ignore_index
    if GRAD_OUTPUT_PER_ROW:
        scale = tl.load(grad_output_ptr + row).to(tl.float32)
    else:
        scale = tl.load(grad_output_ptr).to(tl.float32)
    if DIVIDE_BY_COUNT:
        scale = scale / tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0)
    lse = tl.load(lse_ptr + row)
    p_scale = scale
    if HAS_Z_LOSS:
        p_scale *= 1.0 + 2.0 * z_loss * lse
    x = tl.load(logits_ptr + row * logits_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    grad = tl.exp(x - lse) * p_scale - scale * label_smoothing / vocab_size
    grad -= tl.where(offs == label, scale * (1.0 - label_smoothing), 0.0)
    tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logit_stats_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    stats_ptr,
    n_rows,
    n_cols,
    label_offset,
    BLOCK_SIZE: tl.constexpr,
):
    """Per row of a column slice of the logits (columns ``label_offset + [0, n_cols)`` of the vocabulary): its
    max, its sum of exp(x - max), its target logit (0 when the row's label is elsewhere) and its sum of logits,
    at ``stats_ptr + k * n_rows + row`` for k = 0..3 (float32)."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    row_max, sum_exp, sum_x = _online_row_stats(logits_row, n_cols, True, BLOCK_SIZE)
    label = tl.load(labels_ptr + row) - label_offset
    in_slice = (label >= 0) & (label < n_cols)
    target = tl.load(logits_row + tl.where(in_slice, label, 0)).to(tl.float32)
    tl.store(stats_ptr + row, row_max)
    tl.store(stats_ptr + n_rows + row, sum_exp)
    tl.store(stats_ptr + 2 * n_rows + row, tl.where(in_slice, target, 0.0))
    tl.store(stats_ptr + 3 * n_rows + row, sum_x)


def logit_stats(logits: torch.Tensor, labels: torch.Tensor, label_offset: int, stats: torch.Tensor) -> None:
    """Write the per-row statistics of a column slice of the logits (see `_logit_stats_kernel`) into ``stats``
    (float32, ``(4, n)``, contiguous): max, sum of exp(x - max), target logit or 0, sum of logits.

    ``logits``: ``(n, V_slice)`` with unit column stride, columns ``label_offset + [0, V_slice)`` of the
    vocabulary; ``labels``: ``(n,)`` vocabulary ids (any other value, ``ignore_index`` included, counts as
    elsewhere).
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block = min(MULTI_PASS_BLOCK, next_power_of_2(n_cols))
    launch(
        _logit_stats_kernel,
        (n_rows,),
        (logits, logits.stride(0), labels, stats, n_rows, n_cols, label_offset),
        dict(BLOCK_SIZE=block),
        num_warps=_num_warps(block),
    )


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    """x *= scale (a device scalar); returns at once when the scale is exactly 1."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale == 1.0:
        return
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


def scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Multiply a contiguous tensor in place by a device scalar ``scale`` (a 0-dim or 1-element float tensor).

    No pass over ``x`` (and no host sync) when the scale is exactly 1, which is what ``loss.backward()`` passes.
    """
    if not x.is_contiguous():
        raise ValueError("scale_ needs a contiguous tensor.")
    if x.numel() == 0:
        return x
    scale = scale.detach().float().reshape(1).contiguous()
    block = 4096
    launch(_scale_kernel, (cdiv(x.numel(), block),), (x, scale, x.numel()), dict(BLOCK_SIZE=block), num_warps=4)
    return x


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _launch_config(n_cols: int, compute_grad: bool) -> tuple[bool, int, int]:
    """(single_pass, BLOCK_SIZE, num_warps) of the forward kernel for a row of n_cols logits."""
    block = next_power_of_2(n_cols)
    if not compute_grad:  # one read whatever the width: loop over blocks, several programs per SM
        block = min(block, LOSS_ONLY_BLOCK)
        return block >= n_cols, block, _num_warps(block)
    if block <= MAX_SINGLE_PASS_BLOCK:
        return True, block, _num_warps(block)
    return False, MULTI_PASS_BLOCK, _num_warps(MULTI_PASS_BLOCK)


def cross_entropy_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    count: torch.Tensor,
    row_loss: torch.Tensor,
    row_z: torch.Tensor | None,
    *,
    grad: torch.Tensor | None,
    lse: torch.Tensor | None = None,
    ignore_index: int,
    z_loss: float,
    label_smoothing: float,
    divide_by_count: bool,
) -> None:
    """Launch the row kernel: per-row losses into ``row_loss`` (and z terms into ``row_z``), gradient into ``grad``.

    Args:
        logits: ``(n, V)`` fp32/fp16/bf16, unit column stride.
        labels: ``(n,)`` int64/int32, already validated.
        count: ``()`` device tensor, the number of non-ignored rows of the whole batch (gradient divisor).
        row_loss / row_z: ``(n,)`` fp32 outputs (``row_z`` only when ``z_loss > 0``).
        grad: ``(n, V)`` output for d(loss)/d(logits) at ``grad_output = 1``, may be ``logits`` itself; None
            computes the loss only.
        lse: optional ``(n,)`` fp32 output for the rows' log-sum-exp (0 on ignored rows).
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    compute_grad = grad is not None
    scalars = (ignore_index, float(z_loss), float(label_smoothing))
    options = dict(STORE_LSE=lse is not None, DIVIDE_BY_COUNT=divide_by_count, HAS_Z_LOSS=z_loss > 0.0,
                   HAS_SMOOTHING=label_smoothing > 0.0)  # fmt: skip
    outputs = (row_loss, row_z if row_z is not None else row_loss, lse if lse is not None else row_loss, count)
    if compute_grad and n_cols > WIDE_ROW_COLS:
        _split_row_forward(logits, grad, labels, outputs, scalars, options)
        return
    single_pass, block, num_warps = _launch_config(n_cols, compute_grad)
    grad_arg = grad if compute_grad else logits  # never written when COMPUTE_GRAD is False
    launch(
        _cross_entropy_fwd_kernel,
        (n_rows,),
        (logits, logits.stride(0), grad_arg, grad_arg.stride(0), labels, *outputs, n_cols, *scalars),
        dict(COMPUTE_GRAD=compute_grad, SINGLE_PASS=single_pass, BLOCK_SIZE=block, **options),
        num_warps=num_warps,
    )


def _split_row_forward(
    logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, outputs: tuple, scalars: tuple, options: dict
) -> None:
    """`_cross_entropy_fwd_split_row_kernel` over every part of every row: one launch where all of a row's parts
    can run at once (a CUDA device with at least as many SMs as parts), else two (publish, then finish)."""
    n_rows, n_cols = logits.shape
    n_parts = cdiv(n_cols, SPLIT_ROW_PART_COLS)
    sync = torch.zeros(1 + n_rows, dtype=torch.int32, device=logits.device)
    part_stats = torch.empty((n_rows, n_parts, 4), dtype=torch.float32, device=logits.device)
    phases = (0,) if n_parts <= multiprocessor_count(logits.device) else (1, 2)
    # The register cap was measured on 16-bit logits; float32 ones spill under it (6-12 bytes), so they get the
    # compiler's choice.
    launch_options = {"maxnreg": SPLIT_ROW_MAX_REGISTERS} if logits.element_size() == 2 else {}
    for phase in phases:
        if phase == 2:
            sync.zero_()
        launch(
            _cross_entropy_fwd_split_row_kernel,
            (n_rows * n_parts,),
            (logits, logits.stride(0), grad, grad.stride(0), labels, *outputs, sync, part_stats, n_cols, *scalars),
            dict(PHASE=phase, N_PARTS=n_parts, PARTS_POW2=next_power_of_2(n_parts), PART_COLS=SPLIT_ROW_PART_COLS,
                 BLOCK_SIZE=min(SPLIT_ROW_BLOCK, SPLIT_ROW_PART_COLS), **options),
            num_warps=SPLIT_ROW_WARPS,
            **launch_options,
        )  # fmt: skip


def _cross_entropy_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, z_loss: float, label_smoothing: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Loss-only forward: ``(row_loss (n,), row_z (n,) or None, lse (n,) or None, count ())``, fp32 / int64."""
    n_rows = logits.shape[0]
    count = (labels != ignore_index).sum()  # stays on the device: the kernels read it, no host sync
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    row_z = torch.empty(n_rows, dtype=torch.float32, device=logits.device) if z_loss > 0.0 else None
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device) if need_lse else None
    cross_entropy_forward(
        logits, labels, count, row_loss, row_z, grad=None, lse=lse, ignore_index=ignore_index, z_loss=z_loss,
        label_smoothing=label_smoothing, divide_by_count=False,
    )  # fmt: skip
    return row_loss, row_z, lse, count


def _cross_entropy_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    count: torch.Tensor,
    grad_loss: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    label_smoothing: float,
    reduction: str,
    vocab_size: int | None = None,
    label_offset: int = 0,
) -> torch.Tensor:
    """Writes d(loss)/d(logits) times ``grad_loss`` (a scalar, or ``(n,)`` for ``reduction="none"``) into ``grad``
    (``(n, V)``, may be ``logits`` itself: each program reads its block before writing it). When the logits are
    the columns ``label_offset + [0, V)`` of a larger vocabulary, ``vocab_size`` is its size."""
    n_rows, n_cols = logits.shape
    if n_rows > 0:
        grad_loss = grad_loss.detach().float().contiguous()
        block = min(BACKWARD_BLOCK, next_power_of_2(n_cols))
        launch(
            _cross_entropy_bwd_kernel,
            (n_rows, cdiv(n_cols, block)),
            (logits, logits.stride(0), grad, grad.stride(0), labels, lse, grad_loss, count, n_cols,
             vocab_size or n_cols, label_offset, ignore_index, float(z_loss), float(label_smoothing)),
            dict(GRAD_OUTPUT_PER_ROW=reduction == "none", DIVIDE_BY_COUNT=reduction == "mean",
                 HAS_Z_LOSS=z_loss > 0.0, BLOCK_SIZE=block),
            num_warps=_num_warps(block),
        )  # fmt: skip
    return grad


# ---- torch.library custom ops: what torch.compile sees (opaque, with fake implementations for tracing) ----
# Out of place: under torch.compile the backward allocates the gradient (Inductor plans the memory) instead of
# writing it over the logits, which a graph may still read.
_NAMESPACE = custom_op_namespace(__name__)


@torch.library.custom_op(
    f"{_NAMESPACE}::cross_entropy_forward",
    mutates_args=(),
    schema="(Tensor logits, Tensor labels, int ignore_index, float z_loss, float label_smoothing) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _cross_entropy_forward_op(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, z_loss: float, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    row_loss, row_z, lse, count = _cross_entropy_forward(logits, labels, ignore_index, z_loss, label_smoothing, True)
    return row_loss, row_z if row_z is not None else torch.zeros_like(row_loss), lse, count


@_cross_entropy_forward_op.register_fake
def _(logits, labels, ignore_index, z_loss, label_smoothing):
    row = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return row, torch.empty_like(row), torch.empty_like(row), labels.new_empty((), dtype=torch.int64)


@torch.library.custom_op(
    f"{_NAMESPACE}::cross_entropy_backward",
    mutates_args=(),
    schema="(Tensor logits, Tensor labels, Tensor lse, Tensor count, Tensor grad_loss, int ignore_index, "
    "float z_loss, float label_smoothing, str reduction) -> Tensor",
)
def _cross_entropy_backward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    count: torch.Tensor,
    grad_loss: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    label_smoothing: float,
    reduction: str,
) -> torch.Tensor:
    grad = torch.empty_like(logits)
    return _cross_entropy_backward(
        logits, labels, lse, count, grad_loss, grad, ignore_index, z_loss, label_smoothing, reduction
    )


@_cross_entropy_backward_op.register_fake
def _(logits, labels, lse, count, grad_loss, ignore_index, z_loss, label_smoothing, reduction):
    return torch.empty_like(logits)


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of the fused cross-entropy; see `cross_entropy` for the arguments."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, z_loss, label_smoothing, reduction, inplace):
        if torch.compiler.is_compiling():
            row_loss, row_z, lse, count = _cross_entropy_forward_op(
                logits, labels, ignore_index, z_loss, label_smoothing
            )
        else:
            row_loss, row_z, lse, count = _cross_entropy_forward(
                logits, labels, ignore_index, z_loss, label_smoothing, need_lse=ctx.needs_input_grad[0]
            )
        if row_z is None:
            row_z = torch.zeros_like(row_loss)
        if reduction == "none":
            loss, z_term = row_loss, row_z
        else:
            loss, z_term = row_loss.sum(), row_z.sum()
            if reduction == "mean":
                denominator = count.clamp(min=1).float()
                loss, z_term = loss / denominator, z_term / denominator
        ctx.mark_non_differentiable(z_term)
        if lse is not None:
            ctx.save_for_backward(logits, labels, lse, count)
            ctx.options = (ignore_index, z_loss, label_smoothing, reduction, inplace)
        return loss, z_term

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_z_term):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        logits, labels, lse, count = ctx.saved_tensors
        ignore_index, z_loss, label_smoothing, reduction, inplace = ctx.options
        options = (ignore_index, z_loss, label_smoothing, reduction)
        if torch.compiler.is_compiling():
            grad = _cross_entropy_backward_op(logits, labels, lse, count, grad_loss, *options)
            return grad, None, None, None, None, None, None
        # In place: a new tensor object over the logits' storage, so that autograd takes it as the gradient as is.
        grad = logits.detach() if inplace else torch.empty_like(logits)
        _cross_entropy_backward(logits, labels, lse, count, grad_loss, grad, *options)
        if inplace:
            # The logits now hold their gradient: any other saved use of them fails loudly instead of reading it.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    inplace: bool = True,
    check_label_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused cross-entropy over the vocabulary with z-loss and label smoothing (Triton).

    Matches `fat5_kernels.cross_entropy_reference.cross_entropy_reference` (see that module for the exact
    definition): ``F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, label_smoothing=eps)``
    plus ``z_loss * mean(logsumexp(logits)**2)`` over non-ignored rows; the mean is ``sum / max(count, 1)``.

    Args:
        logits: ``(N, V)`` fp32/fp16/bf16 on a CUDA device (or CPU under ``TRITON_INTERPRET=1``); the maths is fp32.
        labels: ``(N,)`` int64 in ``[0, V)`` or ``ignore_index``.
        ignore_index: label of rows that do not count (padding).
        z_loss: coefficient of ``log(Z)**2`` (T5X uses 1e-4); 0 disables it.
        label_smoothing: epsilon in ``[0, 1]`` as in ``torch.nn.functional.cross_entropy``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row losses, ``(N,)``).
        inplace: write the gradient over ``logits`` during the backward (no extra (N, V) memory; ``logits`` holds
            its gradient afterwards, and another backward that saved it raises). ``False`` allocates a new buffer,
            as the backward always does under ``torch.compile``.
        check_label_values: raise a ValueError naming the first label outside ``[0, V)`` (and not
            ``ignore_index``). On a GPU this waits for the labels (one host sync per call, which stalls the
            launch queue); pass ``False`` when the data pipeline already guarantees the range.

    Returns:
        ``(loss, z_loss_term)``: fp32, scalars unless ``reduction="none"``. ``loss`` includes the z term;
        ``z_loss_term`` is the z part alone (non-differentiable, for logging).

    The backward can run only once per forward (with ``inplace=True`` it overwrites the logits).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2D tensor (N, V), got shape {tuple(getattr(logits, 'shape', ()))}.")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}.")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}; move them to one device.")
    validate_cross_entropy_inputs(
        logits.shape, logits.shape[1], labels, ignore_index=ignore_index, z_loss=z_loss,
        label_smoothing=label_smoothing, reduction=reduction, check_label_values=check_label_values,
    )  # fmt: skip
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    return CrossEntropyFunction.apply(logits, labels, ignore_index, z_loss, label_smoothing, reduction, inplace)
