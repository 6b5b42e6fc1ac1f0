"""Plain PyTorch cross-entropy and linear + cross-entropy, the references of the Triton kernels.

No triton import here: the model's CPU path (and any machine without triton) calls these functions.
They compute in fp32 whatever the input dtype, and they are memory-sane: when autograd is on and the
(tokens x vocab) logits would be large, the rows are processed in chunks under activation
checkpointing, so at most one chunk of fp32 logits is alive at a time, in the forward and in the backward.

Semantics shared with `fat5_kernels.cross_entropy` / `fat5_kernels.fused_linear_cross_entropy`:

* rows whose label is ``ignore_index`` contribute nothing;
* per row: ``loss_i = (1 - eps) * (lse_i - x_i[y_i]) + eps * (lse_i - mean_j x_ij) + z * lse_i**2``, which is
  ``torch.nn.functional.cross_entropy(label_smoothing=eps)`` plus the z-loss of T5X / PaLM (``z * log(Z)**2``);
* ``reduction="mean"`` divides the sum by ``max(count, 1)`` where ``count`` is the number of non-ignored rows
  (so a batch where every label is ignored gives a loss of 0 and zero gradients, not NaN);
* the second output is the z-loss part alone (same reduction), detached, for logging.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["cross_entropy_reference", "linear_cross_entropy_reference", "validate_cross_entropy_inputs"]

_REDUCTIONS = ("mean", "sum", "none")
# Above this many logits (rows x vocab) per call, autograd-enabled references switch to checkpointed row chunks.
_CHUNK_LOGITS = 1 << 24


def validate_cross_entropy_inputs(
    logits_shape: torch.Size,
    vocab_size: int,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    z_loss: float,
    label_smoothing: float,
    reduction: str,
    check_label_values: bool = True,
) -> None:
    """Raise a ValueError/TypeError naming the problem when the inputs of a cross-entropy are invalid.

    Args:
        logits_shape: ``(N, V)``, the shape of the logits (or of the hidden states for the linear variant,
            with ``vocab_size`` given separately).
        vocab_size: ``V``.
        labels: ``(N,)`` integer class indices or ``ignore_index``.
        check_label_values: also check every label is in ``[0, V)`` or ``ignore_index`` (a device sync on GPU).
    """
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor (torch.int64), got {labels.dtype}; use labels.long().")
    if labels.dim() != 1 or labels.shape[0] != logits_shape[0]:
        raise ValueError(
            f"labels must have shape (N,) = ({logits_shape[0]},) to match the {tuple(logits_shape)} inputs, "
            f"got {tuple(labels.shape)}; flatten the batch and sequence dimensions of both."
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0 (it is the coefficient of log(Z)**2), got {z_loss}.")
    if check_label_values and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"labels must be in [0, {vocab_size}) or equal to ignore_index={ignore_index}; found {first}. "
                "Check the tokenizer's vocabulary size against the model's, and the padding label."
            )


def _row_losses(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, z_loss: float, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 (loss including the z term, z term alone); zero on ignored rows. logits (n, V), labels (n,)."""
    x = logits.float()
    valid = labels != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, torch.where(valid, labels, 0).long().unsqueeze(1)).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing > 0.0:
        loss = loss - label_smoothing * x.mean(dim=-1)
    z_term = z_loss * lse.square() if z_loss > 0.0 else torch.zeros_like(lse)
    loss = loss + z_term
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(valid, loss, zero), torch.where(valid, z_term, zero)


def _row_loss_sums(logits_fn, n_rows: int, vocab_size: int, labels: torch.Tensor, reduce_rows: bool, **kw):
    """Sum (or concatenate, when not ``reduce_rows``) the per-row losses of ``logits_fn(start, end)``, by chunks.

    ``logits_fn(start, end, *tensors)`` returns the logits of rows ``[start, end)``; chunks run under
    non-reentrant checkpointing when autograd records, so the backward recomputes one chunk at a time.
    """
    chunk = max(1, n_rows if n_rows * vocab_size <= _CHUNK_LOGITS else _CHUNK_LOGITS // vocab_size)
    use_checkpoint = torch.is_grad_enabled() and chunk < n_rows
    losses, z_terms = [], []
    for start in range(0, n_rows, chunk) or [0]:  # one empty chunk when there are no rows
        end = min(start + chunk, n_rows)

        def chunk_losses(start=start, end=end):
            loss, z = _row_losses(logits_fn(start, end), labels[start:end], **kw)
            return (loss.sum(), z.sum()) if reduce_rows else (loss, z)

        loss, z = checkpoint(chunk_losses, use_reentrant=False) if use_checkpoint else chunk_losses()
        losses.append(loss)
        z_terms.append(z)
    if reduce_rows:
        return torch.stack(losses).sum(), torch.stack(z_terms).sum()
    return torch.cat(losses), torch.cat(z_terms)


def _reduce(loss, z_term, labels, ignore_index, reduction):
    if reduction == "mean":
        count = (labels != ignore_index).sum().clamp(min=1)
        loss, z_term = loss / count, z_term / count
    return loss, z_term.detach()


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy with z-loss and label smoothing, in fp32 (reference of `fat5_kernels.cross_entropy`).

    Args:
        logits: ``(N, V)`` fp32/fp16/bf16 scores (upcast to fp32 inside).
        labels: ``(N,)`` int64 class indices, ``ignore_index`` for rows that do not count.
        ignore_index: label of rows to skip.
        z_loss: coefficient of ``log(Z)**2`` per row (0 disables it).
        label_smoothing: epsilon as in ``torch.nn.functional.cross_entropy``.
        reduction: ``"mean"`` (over non-ignored rows, sum / max(count, 1)), ``"sum"`` or ``"none"``.

    Returns:
        ``(loss, z_loss_term)``: fp32 scalars (``(N,)`` for ``reduction="none"``); ``loss`` includes the z term,
        ``z_loss_term`` is the z part alone, detached.
    """
    if not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a 2D floating-point tensor (N, V), got {logits.dtype} {tuple(logits.shape)}.")
    validate_cross_entropy_inputs(
        logits.shape, logits.shape[1], labels, ignore_index=ignore_index, z_loss=z_loss,
        label_smoothing=label_smoothing, reduction=reduction,
    )  # fmt: skip
    n_rows, vocab_size = logits.shape
    loss, z_term = _row_loss_sums(
        lambda start, end: logits[start:end], n_rows, vocab_size, labels, reduction != "none",
        ignore_index=ignore_index, z_loss=z_loss, label_smoothing=label_smoothing,
    )  # fmt: skip
    return _reduce(loss, z_term, labels, ignore_index, reduction)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """LM head (``hidden @ weight.T``) then `cross_entropy_reference`, never holding all the logits with autograd on.

    The matmul runs in the inputs' dtype (as ``F.linear`` would), the cross-entropy in fp32.

    Args:
        hidden: ``(N, d)`` fp32/fp16/bf16 hidden states.
        weight: ``(V, d)`` LM head weight, same dtype as ``hidden``.
        labels: ``(N,)`` int64; other arguments as `cross_entropy_reference`.

    Returns:
        ``(loss, z_loss_term)`` as `cross_entropy_reference`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, d) and weight (V, d) with the same d; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}."
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype.")
    validate_cross_entropy_inputs(
        hidden.shape, weight.shape[0], labels, ignore_index=ignore_index, z_loss=z_loss,
        label_smoothing=label_smoothing, reduction=reduction,
    )  # fmt: skip
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    loss, z_term = _row_loss_sums(
        lambda start, end: hidden[start:end] @ weight.t(), n_rows, vocab_size, labels, reduction != "none",
        ignore_index=ignore_index, z_loss=z_loss, label_smoothing=label_smoothing,
    )  # fmt: skip
    return _reduce(loss, z_term, labels, ignore_index, reduction)
