"""Fused LM head + cross-entropy for training: the (tokens x vocab) logits are never materialized whole.

The tokens are processed in chunks of ``chunk_size`` rows. For each chunk, during the forward:

1. ``logits = hidden_chunk @ weight.T`` with cuBLAS (``torch.mm`` into one reused ``(chunk, V)`` buffer);
2. the fused cross-entropy kernel (`fat5_kernels.cross_entropy`) computes the rows' losses and overwrites the
   buffer with d(loss)/d(logits) (already divided by the batch's count of non-ignored tokens for ``"mean"``);
3. ``grad_hidden[chunk] = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden_chunk`` (cuBLAS, the weight
   gradient accumulated in the weight's dtype with ``addmm_``, fp32 inside each product).

With ``vocab_chunk_size`` each chunk's vocabulary is also sliced (`_sliced_chunk`): two passes over the slices,
the first for the rows' log-sum-exp, the second for the gradients, so that the buffer is ``(chunk, slice)``.

The backward only multiplies both gradients by ``grad_output`` (skipped on the device when it is 1). Memory: the
two gradients (which autograd keeps anyway), one ``(chunk, V)`` buffer of the hidden states' dtype and a few
``(N,)`` fp32 vectors. The chunk trades memory for speed (see `default_chunk_size`): by default the buffer takes
at most 1 GiB (V=32,128: 8192 rows, 502 MiB; V=250,112: 2048 rows, 977 MiB), far below the (N, V) logits of an
unfused loss (1 GiB and 7.8 GiB in bf16 at N=16384, plus their fp32 copies), above Liger-Kernel's (N, d)-sized
chunks, which make the matmuls inefficient.

Precision: the weight gradient is rounded to the weight dtype once per chunk (as Liger-Kernel does by default);
with bf16 weights and many chunks this adds a little error to ``dW`` compared with one big product (fewer chunks,
less error: at most N / 64 roundings, 8 at N=16384 and V=250,112 with the default chunk).

Under ``torch.compile`` the loop is one ``torch.library`` custom op (``<namespace>::fused_linear_cross_entropy_forward``,
returning the loss, the z term and both gradients), so a compiled model keeps its graph across the loss.

The pure-PyTorch reference (used on CPU by the model) is
`fat5_kernels.cross_entropy_reference.linear_cross_entropy_reference`.
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401  (the kernels of .cross_entropy need it; fail here with the install hint)
except ImportError as err:  # triton is optional; fat5_hf falls back to PyTorch without it
    raise ImportError("fat5_kernels.fused_linear_cross_entropy needs triton: pip install 'fat5-hf[gpu]'") from err

from .cross_entropy import _cross_entropy_backward, cross_entropy_forward, logit_stats, scale_
from .cross_entropy_reference import validate_cross_entropy_inputs
from .triton_utils import custom_op_namespace

__all__ = ["FusedLinearCrossEntropyFunction", "default_chunk_size", "fused_linear_cross_entropy"]

MIN_CHUNK_SIZE = 64
MAX_CHUNK_SIZE = 8192
# Default memory budget of the (chunk, V) logits buffer.
DEFAULT_CHUNK_BYTES = 1 << 30
# With vocabulary slices, the (chunk, vocab_chunk_size) buffer's default budget: 2048 rows of 4096 bf16 columns.
SLICED_CHUNK_BYTES = 16 << 20


def default_chunk_size(
    n_tokens: int, vocab_size: int, element_size: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Rows per chunk: the largest power of two whose ``(chunk, V)`` logits fit in ``max_chunk_bytes`` (1 GiB by
    default), clamped to ``[64, 8192]`` and to ``n_tokens``.

    Measured on an H100 (bf16, fwd+bwd; benchmarks/results/fused.md and fused.notes.md): the matmuls lose
    efficiency and the weight is re-read and its gradient re-written once per chunk, so small chunks are slow.
    N=16384, d=768, V=250,112 (2026-11-27): 189 ms with 64-row chunks (Liger-Kernel's choice, 421 MiB peak), 36.7
    ms with 1024 rows (879 MiB), 34.2 ms with 2048 rows (1369 MiB), against 26.7 ms for the three bare matmuls.
    V=32,128 (2026-11-27): 7.7 ms with 512 rows (103 MiB); 4.61, 4.37, 4.31 and 4.24 ms with 2048, 4096, 8192 and
    16384 rows (197, 322, 573 and 1075 MiB); matmuls 3.48 ms. Beyond 8192 rows the gain is small for the memory.
    For the least memory, pass ``vocab_chunk_size``.
    """
    rows = max(1, max_chunk_bytes // max(1, vocab_size * element_size))
    chunk = min(MAX_CHUNK_SIZE, max(MIN_CHUNK_SIZE, 1 << (rows.bit_length() - 1)))
    return max(1, min(chunk, n_tokens))


def _fused_linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    label_smoothing: float,
    reduction: str,
    chunk_size: int,
    vocab_chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunked loop: ``(loss, z_term, grad_hidden, grad_weight)``, the gradients for ``grad_output = 1`` (None
    when not asked for). ``vocab_chunk_size`` in ``(0, V)`` slices each chunk's vocabulary too (`_sliced_chunk`)."""
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    compute_grad = need_grad_hidden or need_grad_weight
    device = hidden.device

    count = (labels != ignore_index).sum()  # on the device; the kernel divides the gradient by it
    row_loss = torch.empty(n_tokens, dtype=torch.float32, device=device)
    row_z = torch.empty(n_tokens, dtype=torch.float32, device=device) if z_loss > 0.0 else None
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.empty_like(weight) if need_grad_weight else None
    chunk_size = max(1, min(chunk_size, n_tokens))
    if grad_weight is not None and n_tokens == 0:
        grad_weight.zero_()
    sliced = 0 < vocab_chunk_size < vocab_size
    buffer_columns = vocab_chunk_size if sliced else vocab_size
    logits_buffer = torch.empty(chunk_size * buffer_columns, dtype=hidden.dtype, device=device)

    for chunk_index, start in enumerate(range(0, n_tokens, chunk_size)):
        end = min(start + chunk_size, n_tokens)
        hidden_chunk = hidden[start:end]
        if sliced:
            _sliced_chunk(
                hidden_chunk, weight, labels[start:end], count, row_loss[start:end],
                row_z[start:end] if row_z is not None else None,
                grad_hidden[start:end] if need_grad_hidden else None, grad_weight if need_grad_weight else None,
                chunk_index > 0, logits_buffer, vocab_chunk_size, ignore_index, z_loss, label_smoothing, reduction,
            )  # fmt: skip
            continue
        logits = logits_buffer[: (end - start) * vocab_size].view(end - start, vocab_size)
        torch.mm(hidden_chunk, weight.t(), out=logits)
        cross_entropy_forward(
            logits, labels[start:end], count, row_loss[start:end],
            row_z[start:end] if row_z is not None else None,
            grad=logits if compute_grad else None, ignore_index=ignore_index, z_loss=z_loss,
            label_smoothing=label_smoothing, divide_by_count=reduction == "mean",
        )  # fmt: skip
        # `logits` now holds d(loss)/d(logits) of the chunk.
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_grad_weight:
            if chunk_index == 0:
                torch.mm(logits.t(), hidden_chunk, out=grad_weight)
            else:
                grad_weight.addmm_(logits.t(), hidden_chunk)
    del logits_buffer

    loss = row_loss.sum()
    z_term = row_z.sum() if row_z is not None else torch.zeros((), dtype=torch.float32, device=device)
    if reduction == "mean":
        denominator = count.clamp(min=1).float()
        loss, z_term = loss / denominator, z_term / denominator
    return loss, z_term, grad_hidden, grad_weight


def _sliced_chunk(
    hidden_chunk: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    count: torch.Tensor,
    row_loss: torch.Tensor,
    row_z: torch.Tensor | None,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    accumulate_weight_grad: bool,
    buffer: torch.Tensor,
    vocab_chunk_size: int,
    ignore_index: int,
    z_loss: float,
    label_smoothing: float,
    reduction: str,
) -> None:
    """One chunk of rows with the vocabulary in slices of ``vocab_chunk_size``, so that the logits buffer is
    ``(rows, vocab_chunk_size)``: a small buffer with large matmuls, for one more logits matmul.

    Pass 1 computes each slice's logits and per-row statistics (max, sum of exp, target logit, sum of logits) and
    combines them into the log-sum-exp and the loss. Pass 2 computes each slice's logits again, turns them into
    d(loss)/d(logits) in place (`_cross_entropy_backward` with the whole vocabulary's log-sum-exp), and adds the
    slice's products to the gradients: ``grad_hidden`` accumulates over slices in fp32 (each slice's product is
    rounded to the hidden dtype once), ``grad_weight``'s slice is written (first chunk) or accumulated.
    """
    rows, vocab_size = hidden_chunk.shape[0], weight.shape[0]
    slices = [(v0, min(v0 + vocab_chunk_size, vocab_size)) for v0 in range(0, vocab_size, vocab_chunk_size)]

    def slice_logits(v0: int, v1: int) -> torch.Tensor:
        logits = buffer[: rows * (v1 - v0)].view(rows, v1 - v0)
        return torch.mm(hidden_chunk, weight[v0:v1].t(), out=logits)

    stats = torch.empty(len(slices), 4, rows, dtype=torch.float32, device=hidden_chunk.device)
    for i, (v0, v1) in enumerate(slices):
        logit_stats(slice_logits(v0, v1), labels, v0, stats[i])
    maxes, sums, targets, logit_sums = stats.unbind(1)  # each (slices, rows), combined in a fixed order
    row_max = maxes.max(dim=0).values
    lse = row_max + torch.log((sums * torch.exp(maxes - row_max)).sum(dim=0))
    valid = labels != ignore_index
    loss = lse - (1.0 - label_smoothing) * targets.sum(dim=0)
    if label_smoothing > 0.0:
        loss -= label_smoothing * logit_sums.sum(dim=0) / vocab_size
    if row_z is not None:
        z_term = z_loss * lse * lse
        loss += z_term
        row_z.copy_(torch.where(valid, z_term, 0.0))
    row_loss.copy_(torch.where(valid, loss, 0.0))
    if grad_hidden is None and grad_weight is None:
        return

    unit = torch.ones((), dtype=torch.float32, device=hidden_chunk.device)
    hidden_grad_sum = None
    if grad_hidden is not None:
        hidden_grad_sum = torch.zeros(grad_hidden.shape, dtype=torch.float32, device=grad_hidden.device)
    for v0, v1 in slices:
        logits = slice_logits(v0, v1)
        _cross_entropy_backward(
            logits, labels, lse, count, unit, logits, ignore_index, z_loss, label_smoothing, reduction, vocab_size, v0
        )
        if hidden_grad_sum is not None:
            hidden_grad_sum += torch.mm(logits, weight[v0:v1])
        if grad_weight is not None:
            if accumulate_weight_grad:
                grad_weight[v0:v1].addmm_(logits.t(), hidden_chunk)
            else:
                torch.mm(logits.t(), hidden_chunk, out=grad_weight[v0:v1])
    if grad_hidden is not None:
        grad_hidden.copy_(hidden_grad_sum)


# ---- torch.library custom op: what torch.compile sees (opaque, with a fake implementation for tracing) ----
_NAMESPACE = custom_op_namespace(__name__)


@torch.library.custom_op(
    f"{_NAMESPACE}::fused_linear_cross_entropy_forward",
    mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, float z_loss, float label_smoothing, "
    "str reduction, int chunk_size, int vocab_chunk_size, bool need_grad_hidden, bool need_grad_weight) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _fused_linear_cross_entropy_forward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    label_smoothing: float,
    reduction: str,
    chunk_size: int,
    vocab_chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, z_term, grad_hidden, grad_weight = _fused_linear_cross_entropy_forward(
        hidden, weight, labels, ignore_index, z_loss, label_smoothing, reduction, chunk_size, vocab_chunk_size,
        need_grad_hidden, need_grad_weight,
    )  # fmt: skip
    # An op returns tensors only: an empty placeholder stands for a gradient not asked for.
    return loss, z_term, _or_empty(grad_hidden, hidden), _or_empty(grad_weight, weight)


@_fused_linear_cross_entropy_forward_op.register_fake
def _(hidden, weight, labels, ignore_index, z_loss, label_smoothing, reduction, chunk_size, vocab_chunk_size,
      need_grad_hidden, need_grad_weight):  # fmt: skip
    scalar = hidden.new_empty((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if need_grad_weight else weight.new_empty(0)
    return scalar, torch.empty_like(scalar), grad_hidden, grad_weight


def _or_empty(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return tensor if tensor is not None else like.new_empty(0)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked LM head + cross-entropy; see `fused_linear_cross_entropy`."""

    @staticmethod
    def forward(
        ctx, hidden, weight, labels, ignore_index, z_loss, label_smoothing, reduction, chunk_size, vocab_chunk_size
    ):
        need_grad_hidden, need_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        args = (hidden, weight, labels, ignore_index, z_loss, label_smoothing, reduction, chunk_size, vocab_chunk_size)
        if torch.compiler.is_compiling():
            loss, z_term, grad_hidden, grad_weight = _fused_linear_cross_entropy_forward_op(
                *args, need_grad_hidden, need_grad_weight
            )
            grad_hidden = grad_hidden if need_grad_hidden else None
            grad_weight = grad_weight if need_grad_weight else None
        else:
            loss, z_term, grad_hidden, grad_weight = _fused_linear_cross_entropy_forward(
                *args, need_grad_hidden, need_grad_weight
            )
        ctx.mark_non_differentiable(z_term)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss, z_term

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_z_term):
        grad_hidden, grad_weight = ctx.saved_tensors
        if torch.compiler.is_compiling():
            # Out of place for Inductor, which fuses the product into one pass.
            scale = grad_loss.to(torch.float32)
            grad_hidden = (grad_hidden * scale).to(grad_hidden.dtype) if grad_hidden is not None else None
            grad_weight = (grad_weight * scale).to(grad_weight.dtype) if grad_weight is not None else None
        else:
            # Gradients were computed for grad_output = 1; scale in place (no-op on the device when it is 1).
            if grad_hidden is not None:
                scale_(grad_hidden, grad_loss)
            if grad_weight is not None:
                scale_(grad_weight, grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    check_label_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` without materializing the ``(N, V)`` logits (training loss only).

    Same value as `fat5_kernels.cross_entropy_reference.linear_cross_entropy_reference`; gradients flow to
    ``hidden`` and ``weight``. Under ``torch.autocast``, both are cast to the autocast dtype first (as
    ``F.linear`` would be).

    Args:
        hidden: ``(N, d)`` (or ``(..., d)`` with ``labels`` of shape ``(...)``) fp32/fp16/bf16 hidden states.
        weight: ``(V, d)`` LM head weight, same dtype as ``hidden`` (outside autocast).
        labels: ``(N,)`` int64 in ``[0, V)`` or ``ignore_index``.
        ignore_index: label of tokens that do not count.
        z_loss: coefficient of ``log(Z)**2`` (T5X uses 1e-4); 0 disables it.
        label_smoothing: epsilon in ``[0, 1]`` as in ``torch.nn.functional.cross_entropy``.
        reduction: ``"mean"`` (sum / max(count of non-ignored, 1)) or ``"sum"``. Per-token losses need the logits:
            use ``cross_entropy(hidden @ weight.T, labels, reduction="none")``.
        chunk_size: token rows per chunk: memory (a ``(chunk_size, V)`` buffer) against speed; default
            `default_chunk_size` (a buffer of at most 1 GiB; 16 MiB with ``vocab_chunk_size``).
        vocab_chunk_size: also slice the vocabulary, so that the buffer is ``(chunk_size, vocab_chunk_size)``
            (with 4096 and bf16: 2048 rows by default, 16 MiB, against Liger-Kernel's (N * d / V)-row chunks of
            the whole vocabulary), plus an fp32 ``(chunk_size, d)`` sum of the hidden states' gradient. The matmuls
            stay large, but the logits are computed twice (once for the log-sum-exp, once for the gradients): one
            matmul more. Measured on an H100 (N=16384, slices of 4096; benchmarks/results/fused.notes.md): peak
            memory under Liger-Kernel's at V=32,128 and 250,112; faster than Liger at V=250,112, slower at
            V=32,128, where its many small products leave an eager call bound by the host. None (default) keeps
            whole rows.
        check_label_values: raise a ValueError naming the first label outside ``[0, V)`` (and not
            ``ignore_index``). On a GPU this waits for the labels (one host sync per call, which stalls the
            launch queue); pass ``False`` when the data pipeline already guarantees the range.

    Returns:
        ``(loss, z_loss_term)``: fp32 scalars; ``loss`` includes the z term, ``z_loss_term`` is it alone
        (non-differentiable, for logging). The backward can run only once per forward.
    """
    if hidden.dim() >= 2 and labels.shape == hidden.shape[:-1] and hidden.dim() > 2:
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, d) and weight (V, d) with the same d; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}."
        )
    if torch.is_autocast_enabled(hidden.device.type):
        autocast_dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(autocast_dtype), weight.to(autocast_dtype)
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}.")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype; cast one of them "
            "or run under torch.autocast."
        )
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and labels ({labels.device}) must share a device."
        )
    if reduction == "none":
        raise ValueError(
            "fused_linear_cross_entropy supports reduction='mean' or 'sum'; per-token losses need the logits: "
            "use fat5_kernels.cross_entropy.cross_entropy(hidden @ weight.T, labels, reduction='none')."
        )
    validate_cross_entropy_inputs(
        hidden.shape, weight.shape[0], labels, ignore_index=ignore_index, z_loss=z_loss,
        label_smoothing=label_smoothing, reduction=reduction, check_label_values=check_label_values,
    )  # fmt: skip
    if vocab_chunk_size is not None and vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size must be a positive number of vocabulary columns, got {vocab_chunk_size}.")
    if chunk_size is None:
        if vocab_chunk_size is None:
            chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.element_size())
        else:
            chunk_size = default_chunk_size(
                hidden.shape[0], min(vocab_chunk_size, weight.shape[0]), hidden.element_size(), SLICED_CHUNK_BYTES
            )
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of token rows, got {chunk_size}.")
    # The matmuls take any strides, but the chunk's rows must be contiguous slices for torch.mm(out=...).
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, ignore_index, z_loss, label_smoothing, reduction, chunk_size, vocab_chunk_size or 0
    )

