# Copyright 2026 The fat5-hf contributors. Licensed under the Apache License, Version 2.0.
"""The seam between the FAT5 model and the Triton kernels of `fat5_kernels`.

Every op here has two paths:

* the Triton kernel, used when its config switch is on, triton and the kernel module import, the tensors are on CUDA
  (or `kernels_on_cpu()` is active, for tests under `TRITON_INTERPRET=1`) and the call needs nothing the kernel lacks;
* plain PyTorch otherwise, written to be exactly transformers' T5 maths (the CPU path and the reference).

The kernel imports are absolute (`from fat5_kernels.x import f`) and guarded: the model works without triton or
without `fat5_kernels` (the Hub exporter rewrites them to same-folder relative imports).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache, StaticLayer

from fat5_kernels.rms_norm_reference import rms_norm_reference
from fat5_kernels.rope_reference import rope_reference

from .position_encoding import DistanceBias, FIREKernelBias

try:
    from fat5_kernels.rms_norm import rms_norm as _triton_rms_norm
except ImportError:  # triton or the kernel module is missing: PyTorch path
    _triton_rms_norm = None

try:
    from fat5_kernels.gated_mlp import gated_activation as _triton_gated_activation
    from fat5_kernels.gated_mlp import gated_activation_packed as _triton_gated_activation_packed
except ImportError:
    _triton_gated_activation = _triton_gated_activation_packed = None

try:
    from fat5_kernels.cross_entropy import cross_entropy as _triton_cross_entropy
except ImportError:
    _triton_cross_entropy = None

try:
    from fat5_kernels.fused_linear_cross_entropy import (
        fused_linear_cross_entropy as _triton_fused_linear_cross_entropy,
    )
except ImportError:
    _triton_fused_linear_cross_entropy = None

try:
    from fat5_kernels.rope import rope as _triton_rope
except ImportError:
    _triton_rope = None

try:
    from fat5_kernels.attention import t5_flash_attention as _triton_t5_flash_attention
    from fat5_kernels.attention import t5_flash_attention_qkvpacked as _triton_t5_flash_attention_qkvpacked
    from fat5_kernels.attention import t5_flash_attention_varlen as _triton_t5_flash_attention_varlen
    from fat5_kernels.attention import (
        t5_flash_attention_varlen_qkvpacked as _triton_t5_flash_attention_varlen_qkvpacked,
    )
    from fat5_kernels.attention import t5_flash_attention_with_kvcache as _triton_t5_flash_attention_with_kvcache
except ImportError:
    _triton_t5_flash_attention = _triton_t5_flash_attention_varlen = None
    _triton_t5_flash_attention_qkvpacked = _triton_t5_flash_attention_varlen_qkvpacked = None
    _triton_t5_flash_attention_with_kvcache = None

try:
    from fat5_kernels.attention import MAX_FIRE_WIDTH as _MAX_FIRE_WIDTH
    from fat5_kernels.attention import distance_table_has_gradient as _distance_table_has_gradient
except ImportError:
    _distance_table_has_gradient = _MAX_FIRE_WIDTH = None


# transformers' activation names of the gated MLPs the fused kernel implements, and the kernel's names for them.
FUSED_GLU_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}

_state = threading.local()


@contextlib.contextmanager
def kernels_on_cpu() -> Iterator[None]:
    """Let the Triton kernels run on CPU tensors (under `TRITON_INTERPRET=1`), for tests of the kernel paths.

    Without it, kernels are only used on CUDA tensors.
    """
    previous = getattr(_state, "kernels_on_cpu", False)
    _state.kernels_on_cpu = True
    try:
        yield
    finally:
        _state.kernels_on_cpu = previous


def _device_ok(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or getattr(_state, "kernels_on_cpu", False)


def kernel_available(name: str) -> bool:
    """Whether the kernel `name` ("rms_norm", "gated_activation", "cross_entropy", "fused_linear_cross_entropy",
    "attention", "rope") could be imported."""
    return {
        "rms_norm": _triton_rms_norm,
        "gated_activation": _triton_gated_activation,
        "cross_entropy": _triton_cross_entropy,
        "fused_linear_cross_entropy": _triton_fused_linear_cross_entropy,
        "attention": _triton_t5_flash_attention,
        "rope": _triton_rope,
    }[name] is not None


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------------------
def rms_norm(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    use_kernel: bool,
    feeds_linear: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """T5 RMSNorm, fused Triton kernel when `use_kernel` and possible, else `rms_norm_reference` (T5LayerNorm's
    maths: variance in fp32, output in the weight's dtype when it is half precision).

    `feeds_linear`: the output only feeds `nn.Linear` layers. Under autocast, where T5 would return fp32 that each
    of those layers casts to the autocast dtype again, the kernel then stores the autocast dtype directly (the
    same values, one pass over the activations instead of one per consuming layer).

    `residual`: normalize `hidden_states + residual` and return `(normed, hidden_states + residual)`; the kernel
    does the add in the same pass (the sum in the promoted dtype, bit for bit PyTorch's add).
    """
    if use_kernel and _triton_rms_norm is not None and _device_ok(hidden_states):
        out_dtype = None
        device_type = hidden_states.device.type
        if feeds_linear and torch.is_autocast_enabled(device_type) and weight.dtype == torch.float32:
            out_dtype = torch.get_autocast_dtype(device_type)
        return _triton_rms_norm(hidden_states, weight, eps, residual=residual, out_dtype=out_dtype)
    return rms_norm_reference(hidden_states, weight, eps, residual)


# ----------------------------------------------------------------------------------------------------------------
# Gated MLP activation
# ----------------------------------------------------------------------------------------------------------------
def gated_activation(
    gate: torch.Tensor, up: torch.Tensor, act_fn: nn.Module, act_name: str, use_kernel: bool
) -> torch.Tensor:
    """`act(gate) * up` of T5's gated feed-forward.

    Args:
        gate (`torch.Tensor` of shape `(..., d_ff)`): output of `wi_0`.
        up (`torch.Tensor` of shape `(..., d_ff)`): output of `wi_1`.
        act_fn (`nn.Module`): the transformers activation (`ACT2FN[act_name]`), used on the PyTorch path.
        act_name (`str`): its transformers name; the kernel serves "gelu_new"/"gelu_pytorch_tanh" and "silu".
        use_kernel (`bool`): the config switch.

    Returns:
        `torch.Tensor` of shape `(..., d_ff)`, dtype of the inputs.
    """
    kernel_activation = FUSED_GLU_ACTIVATIONS.get(act_name)
    if (
        use_kernel
        and kernel_activation is not None
        and _triton_gated_activation is not None
        and _device_ok(gate)
        and gate.dtype == up.dtype
        and gate.shape == up.shape
    ):
        return _triton_gated_activation(gate, up, kernel_activation)
    return act_fn(gate) * up


def can_use_packed_gated_activation(hidden_states: torch.Tensor, act_name: str, use_kernel: bool) -> bool:
    """Whether `gated_activation_packed` can run the kernel on the projection of `hidden_states` (the model then
    projects with the concatenated `[wi_0; wi_1]` weight)."""
    return (
        use_kernel
        and act_name in FUSED_GLU_ACTIVATIONS
        and _triton_gated_activation_packed is not None
        and _device_ok(hidden_states)
    )


def gated_activation_packed(gate_up: torch.Tensor, act_name: str) -> torch.Tensor:
    """`act(gate) * up` from the packed `(..., 2 d_ff)` output `[gate | up]` of one projection by `[wi_0; wi_1]`,
    with the kernel (check `can_use_packed_gated_activation` first); its gradient comes back packed, so the
    projection's backward is one matmul as well. Returns `(..., d_ff)`, dtype of the input."""
    return _triton_gated_activation_packed(gate_up, FUSED_GLU_ACTIVATIONS[act_name])


# ----------------------------------------------------------------------------------------------------------------
# Cross-entropy (+ z-loss, label smoothing)
# ----------------------------------------------------------------------------------------------------------------
def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token cross-entropy in fp32, mean over non-ignored tokens (`sum / max(count, 1)`: 0 when all are ignored).

    Args:
        logits (`torch.Tensor` of shape `(N, V)`): any float dtype; upcast to fp32.
        labels (`torch.LongTensor` of shape `(N,)`): targets in `[0, V)` or `ignore_index`.
        ignore_index (`int`): label of tokens that do not count.
        z_loss (`float`): coefficient of `mean(logsumexp(logits)**2)` over non-ignored tokens.
        label_smoothing (`float`): as in `torch.nn.functional.cross_entropy`.

    Returns:
        `(loss, z_loss_term)`: fp32 scalars; `loss` includes `z_loss_term` (which is 0 when `z_loss == 0`).
    """
    logits = logits.float()
    keep = labels != ignore_index
    count = keep.sum().clamp(min=1)
    ce_sum = nn.functional.cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    loss = ce_sum / count
    z_loss_term = torch.zeros((), dtype=torch.float32, device=logits.device)
    if z_loss > 0:
        log_z = torch.logsumexp(logits, dim=-1)
        z_loss_term = z_loss * (log_z.pow(2) * keep).sum() / count
        loss = loss + z_loss_term
    return loss, z_loss_term.detach()


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    use_kernel: bool = False,
    check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LM loss over `(N, V)` logits: the Triton kernel when `use_kernel` and possible, else `cross_entropy_reference`.

    The kernel is called with `inplace=False`: the model returns the logits to the caller, so they must stay intact.
    """
    if use_kernel and _triton_cross_entropy is not None and _device_ok(logits):
        return _triton_cross_entropy(
            logits,
            labels,
            ignore_index=-100,
            z_loss=z_loss,
            label_smoothing=label_smoothing,
            inplace=False,
            check_label_values=check_labels,
        )
    return cross_entropy_reference(logits, labels, z_loss=z_loss, label_smoothing=label_smoothing)


def can_fuse_linear_cross_entropy(hidden_states: torch.Tensor, lm_head: nn.Module, use_kernel: bool) -> bool:
    """Whether the `lm_head` projection and the loss can run as one fused kernel (logits never materialized).

    Needs the switch, the kernel, CUDA, and a plain bias-free `nn.Linear` head (not e.g. a PEFT-wrapped one).
    """
    return (
        use_kernel
        and _triton_fused_linear_cross_entropy is not None
        and _device_ok(hidden_states)
        and type(lm_head) is nn.Linear
        and lm_head.bias is None
    )


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of `hidden_states @ weight.T` without the `(N, V)` logits (call only if `can_fuse_linear_cross_entropy`).

    Args:
        hidden_states (`torch.Tensor` of shape `(N, d)`), weight (`(V, d)`), labels (`(N,)`).
        chunk_size, vocab_chunk_size: the kernel's memory / speed trade-off (`None`: its defaults).

    Returns:
        `(loss, z_loss_term)`, fp32 scalars.
    """
    return _triton_fused_linear_cross_entropy(
        hidden_states,
        weight,
        labels,
        ignore_index=-100,
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        check_label_values=check_labels,
    )


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------
def segment_ids_to_cu_seqlens(segment_ids):
    """Variable-length attention metadata for packed rows, one sequence per (row, document).

    Args:
        segment_ids: int tensor of shape (batch, length): 1..k for the documents of a row, 0 on padding (as emitted
            by `DataCollatorForUL2(return_segment_ids=True)`). Tokens of one document must be contiguous.

    Returns:
        ``(indices, cu_seqlens, max_seqlen)`` as FlashAttention's ``unpad_input``: ``indices`` (int64, (total,)) of
        the non-padding tokens in the flattened (batch * length) tensor, ``cu_seqlens`` (int32, (num_sequences + 1,))
        the cumulative sequence lengths over those tokens, starting at 0, and ``max_seqlen`` (int) the longest one.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must have shape (batch, length), got {tuple(segment_ids.shape)}.")
    flat = segment_ids.reshape(-1)
    indices = torch.nonzero(flat > 0, as_tuple=False).flatten()
    ids = flat[indices]
    rows = torch.div(indices, segment_ids.shape[1], rounding_mode="floor")
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = (ids[1:] != ids[:-1]) | (rows[1:] != rows[:-1])
    boundaries = torch.cat([torch.nonzero(starts, as_tuple=False).flatten(), indices.new_tensor([len(ids)])])
    cu_seqlens = boundaries.to(torch.int32)
    max_seqlen = int((boundaries[1:] - boundaries[:-1]).max()) if len(ids) else 0
    return indices, cu_seqlens, max_seqlen


@dataclass(frozen=True)
class PackedSequences:
    """Where the documents of packed rows are, in FlashAttention's varlen layout (`segment_ids_to_cu_seqlens`).

    Attributes:
        indices (`torch.LongTensor` of shape `(total,)`): the non-padding tokens in the flattened `(batch * length)`.
        cu_seqlens (`torch.IntTensor` of shape `(num_documents + 1,)`): cumulative document lengths.
        max_seqlen (`int`): the longest document.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


@dataclass(frozen=True)
class FlashAttentionMask:
    """How a stack asks its attention layers to use the Triton kernel instead of a materialized 4D mask.

    Attributes:
        key_padding_mask (`torch.BoolTensor` of shape `(batch_size, key_length)`, *optional*): True = attend.
        causal (`bool`): Decoder self-attention.
        queries, keys (`PackedSequences`, *optional*): packed rows of several documents; each query attends only to
            the keys of its own document (the i-th query document to the i-th key document), through the kernel's
            varlen API. Both or neither.
        unpadded (`bool`): the states are already in the varlen layout of `queries` / `keys`, viewed
            `(1, total, ...)` (the stack runs its layers on the real tokens only, `fat5_hf.unpadding`): no gather
            before the kernel and no scatter after it.
    """

    key_padding_mask: torch.Tensor | None
    causal: bool
    queries: PackedSequences | None = None
    keys: PackedSequences | None = None
    unpadded: bool = False


def can_use_flash_attention(
    use_kernel: bool,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: object | None,
    output_attentions: bool,
    attention_dropout: float,
    training: bool,
    cache_on_kernel: bool = False,
) -> bool:
    """Whether a whole stack can run its attention with the Triton kernel.

    The kernel has no attention-probability dropout, returns no attention weights and takes only a 2D key-padding
    mask; it reads a KV cache only with `cache_on_kernel` (the config's `use_triton_attention_with_cache`) and only
    the caches `kernel_can_read_cache` accepts. Anything else needs the PyTorch path.
    """
    return (
        use_kernel
        and _triton_t5_flash_attention is not None
        and _device_ok(hidden_states)
        and (cache is None or (cache_on_kernel and kernel_can_read_cache(cache)))
        and not output_attentions
        and not (training and attention_dropout > 0)
        and (attention_mask is None or attention_mask.dim() == 2)
    )


def kernel_can_read_cache(cache: object) -> bool:
    """Whether the attention kernel can serve the cached steps of `cache` (alone or inside an `EncoderDecoderCache`):
    transformers' full-attention `DynamicCache` and `StaticCache` layers, whose keys and values are plain
    `(batch, heads, slots, head_dim)` tensors. A static layer's queries sit at a device-side offset, which only the
    forward kernel reads: with gradients enabled, static layers take the PyTorch path. Sliding-window, quantized
    and other layers always do."""
    caches = (cache,)
    if isinstance(cache, EncoderDecoderCache):
        caches = (cache.self_attention_cache, cache.cross_attention_cache)
    if _triton_t5_flash_attention_with_kvcache is None or not all(isinstance(c, Cache) for c in caches):
        return False
    layer_types = {type(layer) for c in caches for layer in c.layers}
    layer_types.update(c.layer_class_to_replicate for c in caches if c.layer_class_to_replicate is not None)
    if StaticLayer in layer_types and torch.is_grad_enabled():
        return False
    return layer_types <= {DynamicLayer, StaticLayer}


_SDPA_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: FlashAttentionMask,
    bias_table: torch.Tensor | DistanceBias | FIREKernelBias | None,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    alibi_slopes: torch.Tensor | None = None,
    query_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """T5 attention (scale 1.0, relative bias from `bias_table` computed in-kernel) with the Triton kernel;
    unpadded fp16/bf16 cross-attention (no bias, no mask) goes to PyTorch's SDPA, whose flash kernel is faster there.

    Args:
        query (`(B, H, M, D)`), key, value (`(B, H, N, D)`): projected heads.
        mask (`FlashAttentionMask`): padding mask and causality.
        bias_table (`(H, num_buckets)`, `DistanceBias` or `FIREKernelBias`, *optional*): the learned T5 table,
            FIRE's table of every distance (`(H, 2R + 1)`, read as the kernel's `distance_bias`), or FIRE's compact
            parameters past its threshold (the kernel's `fire_bias`); None for cross-attention.
        alibi_slopes (float32 `(H,)`, *optional*): ALiBi's slopes instead of a table (bias `-slope * |d|`).
        query_offset (integer tensor of shape `()` or `(1,)`, *optional*): a static KV cache's length before this
            step: the queries sit at positions `query_offset + i` and the keys (all its slots) from
            `query_offset + M` on are unfilled (forward only; `t5_flash_attention_with_kvcache`). A padding mask
            shorter than the slots covers the filled ones. Without it, the queries are aligned to the end of the
            keys (the whole sequence, or a dynamic cache's new tokens).

    Returns:
        `torch.Tensor` of shape `(B, M, H, D)` (the layout transformers' attention functions return).
    """
    if query_offset is not None:
        t5 = _t5_kernel_kwargs(mask, bias_table, bidirectional, num_buckets, max_distance, alibi_slopes)
        key_padding_mask = _key_padding_mask(mask, query)
        if key_padding_mask is not None and key_padding_mask.shape[1] < key.shape[2]:
            # transformers' 2D masks cover the tokens so far; the other slots are unfilled (never read)
            key_padding_mask = nn.functional.pad(key_padding_mask, (0, key.shape[2] - key_padding_mask.shape[1]))
        out = _triton_t5_flash_attention_with_kvcache(
            query, key, value, query_offset=query_offset, key_padding_mask=key_padding_mask, **t5
        )
        return out.transpose(1, 2)
    if mask.queries is not None:
        return _packed_flash_attention(
            query, key, value, mask, bias_table, bidirectional=bidirectional, num_buckets=num_buckets,
            max_distance=max_distance, alibi_slopes=alibi_slopes,
        )  # fmt: skip
    no_mask = mask.key_padding_mask is None and not mask.causal
    if bias_table is None and alibi_slopes is None and no_mask and query.dtype in _SDPA_FLASH_DTYPES:
        # Cross-attention without padding: nothing for our kernel to do that SDPA's flash kernel does not do faster
        # (H100, B=64, H=8, L=512, D=64, bf16: 0.44 ms against 0.56 ms per forward+backward).
        return nn.functional.scaled_dot_product_attention(query, key, value, scale=1.0).transpose(1, 2)
    t5 = _t5_kernel_kwargs(mask, bias_table, bidirectional, num_buckets, max_distance, alibi_slopes)
    out = _triton_t5_flash_attention(query, key, value, key_padding_mask=_key_padding_mask(mask, query), **t5)
    return out.transpose(1, 2)


def can_differentiate_distance_table(radius: int, bidirectional: bool) -> bool:
    """Whether the attention kernel's backward returns the gradient of a per-distance table (FIRE's) of this radius
    (`fat5_kernels.attention.distance_table_has_gradient`)."""
    return _distance_table_has_gradient is not None and _distance_table_has_gradient(radius, bidirectional)


def can_evaluate_fire(width: int) -> bool:
    """Whether the attention kernel evaluates FIRE of this MLP width per element (`fire_bias`: FIRE past its
    threshold, with the gradients of its parameters)."""
    return _MAX_FIRE_WIDTH is not None and width <= _MAX_FIRE_WIDTH


def _t5_kernel_kwargs(
    mask: FlashAttentionMask,
    bias_table: torch.Tensor | DistanceBias | FIREKernelBias | None,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    alibi_slopes: torch.Tensor | None = None,
) -> dict:
    """The keywords every kernel call of the model shares: the bias (T5's table, FIRE's per-distance table or compact
    parameters, or ALiBi's slopes), causality, and T5's unscaled scores."""
    if isinstance(bias_table, FIREKernelBias):
        return dict(fire_bias=tuple(bias_table), bidirectional=bidirectional, causal=mask.causal, softmax_scale=1.0)
    if isinstance(bias_table, DistanceBias):
        return dict(
            distance_bias=bias_table.table, bidirectional=bidirectional, causal=mask.causal, softmax_scale=1.0
        )
    return dict(
        bias_table=bias_table, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance,
        alibi_slopes=alibi_slopes, causal=mask.causal, softmax_scale=1.0,
    )  # fmt: skip


def _key_padding_mask(mask: FlashAttentionMask, like: torch.Tensor) -> torch.Tensor | None:
    if mask.key_padding_mask is None:
        return None
    return mask.key_padding_mask.to(device=like.device, dtype=torch.bool)


def _scatter_documents(out: torch.Tensor, queries: PackedSequences, batch: int, length: int) -> torch.Tensor:
    """Varlen rows `(total, H, D)` back to `(batch, length, H, D)`, zeros at padding."""
    full = out.new_zeros(batch * length, *out.shape[1:]).index_copy(0, queries.indices, out)
    return full.view(batch, length, *out.shape[1:])


def can_use_qkv_packed_attention(mask: FlashAttentionMask) -> bool:
    """Whether self-attention under `mask` can take one packed `(B, L, 3, H, D)` q/k/v
    (`flash_self_attention_qkvpacked`): the kernel imports and queries and keys are the same tokens."""
    return _triton_t5_flash_attention_qkvpacked is not None and mask.queries is mask.keys


def flash_self_attention_qkvpacked(
    qkv: torch.Tensor,
    mask: FlashAttentionMask,
    bias_table: torch.Tensor | DistanceBias | FIREKernelBias | None,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """`flash_attention` for self-attention on the packed output of one projection by the concatenated
    `[q; k; v]` weights, viewed `(B, L, 3, H, D)`. The kernel writes the gradient of `qkv` as one tensor, so the
    projection's backward is one matmul (three, and two adds, with separate q, k, v). Returns `(B, L, H, D)`."""
    t5 = _t5_kernel_kwargs(mask, bias_table, bidirectional, num_buckets, max_distance, alibi_slopes)
    if mask.queries is not None:
        packed = mask.queries
        if mask.unpadded:
            out = _triton_t5_flash_attention_varlen_qkvpacked(
                qkv.flatten(0, 1), packed.cu_seqlens, packed.max_seqlen, **t5
            )
            return out.view(qkv.shape[0], qkv.shape[1], *out.shape[1:])
        rows = qkv.flatten(0, 1).index_select(0, packed.indices)
        out = _triton_t5_flash_attention_varlen_qkvpacked(rows, packed.cu_seqlens, packed.max_seqlen, **t5)
        return _scatter_documents(out, packed, *qkv.shape[:2])
    return _triton_t5_flash_attention_qkvpacked(qkv, key_padding_mask=_key_padding_mask(mask, qkv), **t5)


def _packed_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: FlashAttentionMask,
    bias_table: torch.Tensor | DistanceBias | FIREKernelBias | None,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """`flash_attention` over packed documents: gathers the real tokens into the varlen layout, runs the kernel
    (each document a sequence: its own positions, so T5's relative bias is the same as for the document alone),
    and scatters the result back; padding rows are zeros. Returns `(B, M, H, D)`."""
    batch, heads, query_length, head_dim = query.shape

    def pack(states: torch.Tensor, packed: PackedSequences) -> torch.Tensor:
        rows = states.transpose(1, 2).reshape(-1, heads, head_dim)
        return rows if mask.unpadded else rows.index_select(0, packed.indices)

    out = _triton_t5_flash_attention_varlen(
        pack(query, mask.queries),
        pack(key, mask.keys),
        pack(value, mask.keys),
        mask.queries.cu_seqlens,
        mask.keys.cu_seqlens,
        mask.queries.max_seqlen,
        mask.keys.max_seqlen,
        **_t5_kernel_kwargs(mask, bias_table, bidirectional, num_buckets, max_distance, alibi_slopes),
    )
    if mask.unpadded:
        return out.view(batch, query_length, heads, head_dim)
    return _scatter_documents(out, mask.queries, batch, query_length)


def rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_kernel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of queries and keys (values are never rotated): the Triton pre-pass kernel when it can run, else the
    PyTorch reference.

    Args:
        query (`(B, L, H, D)`), key (`(B, L, H, D)`): projected heads (views of the projections are fine).
        cos, sin (float32 `(L, rotary_dim // 2)`): angles of positions `0..L-1`.
        use_kernel (`bool`): the config switch (`use_triton_attention`).

    Returns:
        `(query, key)` rotated, `(B, L, H, D)` each, in their dtypes.
    """
    if use_kernel and _triton_rope is not None and _device_ok(query):
        return _triton_rope(query, key, cos, sin)
    return rope_reference(query, key, cos, sin)


__all__ = [
    "FlashAttentionMask",
    "PackedSequences",
    "segment_ids_to_cu_seqlens",
    "can_differentiate_distance_table",
    "can_evaluate_fire",
    "can_fuse_linear_cross_entropy",
    "can_use_flash_attention",
    "can_use_packed_gated_activation",
    "can_use_qkv_packed_attention",
    "cross_entropy",
    "cross_entropy_reference",
    "flash_attention",
    "flash_self_attention_qkvpacked",
    "fused_linear_cross_entropy",
    "gated_activation",
    "gated_activation_packed",
    "kernel_available",
    "kernel_can_read_cache",
    "kernels_on_cpu",
    "rms_norm",
    "rotary_embedding",
]
