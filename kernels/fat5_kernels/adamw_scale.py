"""AdamW with an RMS-scaled step (Adafactor's relative step, nanoT5's and FAT5's optimizer) as one Triton launch for
a whole list of parameters.

For each tensor ``p`` with gradient ``g``, moments ``m`` and ``v`` and step size ``s`` (the learning rate times
Adam's bias correction)::

    m <- m + (1 - beta1) (g - m)                  (lerp, as torch.optim.AdamW)
    v <- beta2 v + (1 - beta2) g^2
    p <- p * decay_factor - s * max(rms(p), min_rms) * m / (sqrt(v) + eps)

with ``rms(p)`` measured (in float32) on the weights before the update. Why a kernel: ``torch._foreach_*`` has no
fast path for a per-tensor scale that lives on the GPU (the RMS), so a foreach version falls back to one kernel a
tensor for that product and issues a dozen passes over the optimizer state; torch's fused AdamW takes one learning
rate for all tensors. Here every parameter of a list is updated by one launch that reads ``p, g, m, v`` once and
writes ``p, m, v`` once, after one ``torch._foreach_norm`` for the RMS.

The launch addresses every tensor by its element offset from the first parameter (a table built on the host each
step, as Triton's grouped-GEMM tutorial passes a table of addresses): program ``c`` updates ``BLOCK`` elements of
one tensor. Arithmetic is float32 whatever the storage dtype
(float32, bfloat16 or float16; the four lists share it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # triton is optional; AdamWScale falls back to PyTorch ops without it
    raise ImportError("fat5_kernels.adamw_scale needs triton: pip install 'fat5-hf[gpu]'") from err

from .triton_utils import cdiv, launch, triton_interpreter_enabled

__all__ = ["adamw_scale_update_"]

_BLOCK = 2048
_NUM_WARPS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs")


@triton.jit
def _adamw_scale_kernel(
    base_ptr,  # the first param: every tensor is addressed from it
    offset_ptr,  # int64 (4, n): element offsets from base_ptr of the params, grads, exp_avgs and exp_avg_sqs
    step_size_ptr,  # float32 (n,)
    norm_ptr,  # float32 (n,): L2 norms of the params
    numel_ptr,  # int64 (n,)
    chunk_tensor_ptr,  # int32 (chunks,): the tensor each program updates
    chunk_start_ptr,  # int64 (chunks,): its first element
    n_tensors,
    one_minus_beta1,  # computed on the host in float64: 1 - float32(0.999) is 1.3e-5 off 0.001
    beta2,
    one_minus_beta2,
    eps,
    min_rms,
    decay_factor,
    APPLY_DECAY: tl.constexpr,
    VEC: tl.constexpr,  # elements in 16 bytes
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor_ptr + chunk)
    start = tl.load(chunk_start_ptr + chunk)
    numel = tl.load(numel_ptr + tensor)
    rms = tl.load(norm_ptr + tensor) / tl.sqrt(numel.to(tl.float32))
    scaled_step = tl.maximum(rms, min_rms) * tl.load(step_size_ptr + tensor)

    elements = start + tl.arange(0, BLOCK)
    mask = elements < numel
    # Every tensor starts 16 bytes apart from the base (checked on the host) and the base is 16-byte aligned (a
    # launch argument Triton specializes on): runs of VEC elements on 16-byte boundaries, so vectorized accesses.
    p_at = tl.max_contiguous(tl.multiple_of(tl.load(offset_ptr + tensor) + elements, VEC), VEC)
    g_at = tl.max_contiguous(tl.multiple_of(tl.load(offset_ptr + n_tensors + tensor) + elements, VEC), VEC)
    m_at = tl.max_contiguous(tl.multiple_of(tl.load(offset_ptr + 2 * n_tensors + tensor) + elements, VEC), VEC)
    v_at = tl.max_contiguous(tl.multiple_of(tl.load(offset_ptr + 3 * n_tensors + tensor) + elements, VEC), VEC)
    p = tl.load(base_ptr + p_at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(base_ptr + g_at, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(base_ptr + m_at, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(base_ptr + v_at, mask=mask, other=0.0).to(tl.float32)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    if APPLY_DECAY:
        p = p * decay_factor
    p = p - (m / (tl.sqrt(v) + eps)) * scaled_step
    dtype = base_ptr.dtype.element_ty
    tl.store(base_ptr + p_at, p.to(dtype), mask=mask)
    tl.store(base_ptr + m_at, m.to(dtype), mask=mask)
    tl.store(base_ptr + v_at, v.to(dtype), mask=mask)


@functools.lru_cache(maxsize=16)
def _chunks(device: torch.device, numels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tensor index, first element) of every BLOCK-sized chunk, and the numels, on ``device``; cached because a
    model's shapes do not change from step to step."""
    counts = torch.tensor([cdiv(n, _BLOCK) for n in numels], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(int(counts.sum()), dtype=torch.int64) - first_chunk[chunk_tensor.long()]) * _BLOCK
    numel = torch.tensor(numels, dtype=torch.int64)
    return chunk_tensor.to(device), chunk_start.to(device), numel.to(device)


def _check_inputs(lists: Sequence[Sequence[torch.Tensor]], step_sizes: Sequence[float]) -> None:
    params = lists[0]
    for name, tensors in zip(_NAMES, lists):
        if len(tensors) != len(params):
            raise ValueError(f"adamw_scale_update_: {len(params)} params but {len(tensors)} {name}")
    if len(step_sizes) != len(params):
        raise ValueError(f"adamw_scale_update_: {len(params)} params but {len(step_sizes)} step sizes")
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _DTYPES:
        raise ValueError(f"adamw_scale_update_ supports {[str(d) for d in _DTYPES]}, got {dtype}")
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"adamw_scale_update_ runs a Triton kernel on CUDA tensors, got {device}; use AdamWScale(fused=False) "
            "on other devices (or set TRITON_INTERPRET=1 for tests)"
        )
    for name, tensors in zip(_NAMES, lists):
        for i, (tensor, param) in enumerate(zip(tensors, params)):
            if tensor.dtype != dtype or tensor.device != device:
                raise ValueError(
                    f"adamw_scale_update_: {name}[{i}] is {tensor.dtype} on {tensor.device}, the params are {dtype} "
                    f"on {device}: one call takes tensors of one device and dtype (group them first)"
                )
            if tensor.shape != param.shape:
                raise ValueError(f"adamw_scale_update_: {name}[{i}] has shape {tuple(tensor.shape)}, its param "
                                 f"{tuple(param.shape)}")  # fmt: skip
            if not tensor.is_contiguous():
                raise ValueError(
                    f"adamw_scale_update_: {name}[{i}] is not contiguous; use AdamWScale(fused=False) for such tensors"
                )


def adamw_scale_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step_sizes: Sequence[float],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    min_rms: float,
    decay_factor: float = 1.0,
    check_inputs: bool = True,
) -> None:
    """One AdamWScale step for a list of tensors, in place (``params``, ``exp_avgs``, ``exp_avg_sqs``).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of contiguous tensors of one device and dtype (float32,
            bfloat16 or float16), the i-th of each of the same shape.
        step_sizes: per tensor, the learning rate times Adam's bias correction ``sqrt(1 - beta2^t) / (1 - beta1^t)``.
        beta1, beta2, eps: Adam's coefficients (``eps`` is added to ``sqrt(v)``).
        min_rms: lower bound of the RMS scale.
        decay_factor: the weights are multiplied by it before the update (decoupled weight decay,
            ``1 - lr * weight_decay``).
        check_inputs: check the lists' lengths, devices, dtypes, shapes and contiguity first (about a
            microsecond a tensor on the host); `AdamWScale`, whose states and gradients match their parameters
            by construction, checks only what it cannot know. The 16-byte alignment is always checked.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    if check_inputs:
        _check_inputs(lists, step_sizes)
    kept = [i for i, p in enumerate(params) if p.numel() > 0]
    if len(kept) < len(params):
        lists = tuple([tensors[i] for i in kept] for tensors in lists)
        step_sizes = [step_sizes[i] for i in kept]
    params = lists[0]
    if not params:
        return
    device, n = params[0].device, len(params)
    addresses = torch.tensor([t.data_ptr() for tensors in lists for t in tensors], dtype=torch.int64)
    misaligned = (addresses % 16).nonzero()
    if len(misaligned):
        row, i = divmod(int(misaligned[0]), n)
        raise ValueError(
            f"adamw_scale_update_: {_NAMES[row]}[{kept[i]}] does not start on a 16-byte boundary (a view into a "
            "larger buffer?); use AdamWScale(fused=False) for such tensors"
        )
    element_size = params[0].element_size()
    offsets = (addresses - addresses[0]) // element_size
    chunk_tensor, chunk_start, numels = _chunks(device, tuple(p.numel() for p in params))
    norms = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32))
    step_size = torch.tensor(step_sizes, dtype=torch.float32)
    if device.type == "cuda":
        # Pinned, so that the copies neither wait for the GPU nor expose the host buffers to reuse too early.
        offsets = offsets.pin_memory().to(device, non_blocking=True)
        step_size = step_size.pin_memory().to(device, non_blocking=True)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        launch(
            _adamw_scale_kernel,
            (chunk_tensor.numel(),),
            (params[0], offsets, step_size, norms, numels, chunk_tensor, chunk_start, n, 1.0 - beta1, beta2,
             1.0 - beta2, eps, min_rms, decay_factor),
            dict(APPLY_DECAY=decay_factor != 1.0, VEC=16 // element_size, BLOCK=_BLOCK),
            num_warps=_NUM_WARPS,
        )  # fmt: skip
