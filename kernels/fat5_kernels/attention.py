"""Flash attention with T5's learned relative-position bias computed inside the kernel.

Public API (what the model calls):

* `t5_flash_attention(q, k, v, ...)` over (B, H, L, D) tensors;
* `t5_flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)` over
  packed (total, H, D) tensors, as FlashAttention's varlen API: padding and packing cost only real tokens;
* `t5_flash_attention_qkvpacked(qkv, ...)` and `t5_flash_attention_varlen_qkvpacked(qkv, cu_seqlens, ...)`:
  self-attention on one (..., 3, H, D) tensor, whose gradient comes back packed (one projection matmul);
* `t5_flash_attention_with_kvcache(q, k_cache, v_cache, query_offset=...)`: a generation step over a KV cache,
  the queries' position read from a device tensor (forward only; ``fat5::t5_flash_attention_kvcache_fwd``).

Under ``torch.compile`` they run ``torch.library`` custom ops, ``fat5::t5_flash_attention_fwd`` and
``fat5::t5_flash_attention_bwd`` (``..._qkvpacked_fwd`` / ``_bwd`` for the packed ones); each forward op carries
its autograd formula (``torch.library.register_autograd``) and fake implementations, so ``torch.compile`` sees
one opaque op and does not break the graph around it. Calls with ``fire_bias`` run
``fat5::t5_flash_attention_fire_fwd`` / ``_fire_bwd``. Eager calls go through `T5FlashAttentionFunction` (and
`T5FlashAttentionQKVPackedFunction`, `FIREFlashAttentionFunction`), ``autograd.Function`` s over the same
implementations without the custom-op dispatch cost.

Bias modes: a T5 bucket table (H, num_buckets) in the bidirectional (encoder) or causal (decoder) bucket
mode, which gets a gradient; a per-distance table ``distance_bias`` (H, 2R + 1), the bias of every signed
distance in ``[-R, R]`` (FIRE's exact table; each distance is its own bucket), which gets a gradient too; ALiBi
slopes (no gradient); FIRE's compact parameters ``fire_bias`` (`FIREBias`), evaluated per element from each
query's position as well as the distance (FIRE past its threshold), whose tensors get gradients too (the dK/dV
kernel sums dS per segment of FIRE's piecewise-linear MLP, deterministically); or none (cross-attention). A
table is never materialized as an (L, L) bias: the kernels read
a per-distance vector, padded to cover every distance of the call and saturated beyond ``R``, the distance where
the buckets stop changing (at most ``max(max_distance, num_buckets)`` for T5's, the table's radius for a
per-distance one). The table gradient is reduced per (key block, head) from partial sums, then over programs in a
fixed order: it is deterministic with or without ``deterministic=True`` (the partial-sum reduction costs less than
atomics would, so there is no atomic variant).

Conventions: ``d = key_position - query_position``; with ``M != N`` queries are aligned to the end of the
keys (query ``i`` at position ``i + N - M``, as in FlashAttention >= 2.1 and HF T5 with a KV cache); the
softmax scale multiplies ``q @ k^T`` only (T5 uses 1.0); softmax statistics are fp32. A query row whose keys
are all masked (causal with ``M > N``, an all-False padding row, ...) returns zeros, with log-sum-exp
``+inf`` and zero gradients, never NaN.
"""

from __future__ import annotations

import functools
import weakref

import torch

from .attention_bwd import bias_sums_to_table_grad, fire_sums_to_params_grad, t5_attention_backward
from .attention_fwd import LOG2E, distance_bias_vector, t5_attention_forward
from .attention_reference import (
    FIREBias,
    check_bucket_parameters,
    distance_table_layout,
    relative_bias_layout,
    t5_relative_position_bucket,
)
from .triton_utils import outside_cuda_graph_pools, triton_interpreter_enabled

__all__ = [
    "FIREBias",
    "MAX_FIRE_WIDTH",
    "MAX_TABLE_SEGMENTS",
    "T5FlashAttentionFunction",
    "T5FlashAttentionQKVPackedFunction",
    "distance_table_has_gradient",
    "t5_flash_attention",
    "t5_flash_attention_qkvpacked",
    "t5_flash_attention_varlen",
    "t5_flash_attention_varlen_qkvpacked",
    "t5_flash_attention_with_kvcache",
    "t5_relative_position_bucket",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# FIRE's breakpoints are compared one by one in an unrolled loop (`_fire_tile_bias`): its width sets compile time
# and the work per score
MAX_FIRE_WIDTH = 64


_PADDED_DISTANCE_BUCKETS: dict = {}

# `max_distance` of the ops for a per-distance table (`distance_bias`), which travels as the bias table with
# `num_buckets = 2R + 1`: T5's buckets never have it (their max_distance exceeds their exact range, at least 1), and
# the ops' schema stays that of T5's table.
PER_DISTANCE = 0


# The backward holds a (BLOCK_N, segments) tile per band tile for a table that needs a gradient: Triton caps a tile
# at 2**20 elements and BLOCK_N reaches 128, so a per-distance table gets a gradient for at most 8192 segments.
MAX_TABLE_SEGMENTS = 8192


def distance_table_has_gradient(radius: int, bidirectional: bool) -> bool:
    """Whether the backward can return the gradient of a per-distance table of radius ``radius`` (``2R + 1``
    segments bidirectional, ``R + 1`` causal, padded to a power of two, at most `MAX_TABLE_SEGMENTS`). The forward
    serves any radius."""
    segments = 2 * radius + 1 if bidirectional else radius + 1
    return 1 << (segments - 1).bit_length() <= MAX_TABLE_SEGMENTS


def _bias_layout(bidirectional: bool, num_buckets: int, max_distance: int, device: torch.device):
    """The layout of the bias table: T5's buckets, or one bucket per distance when ``max_distance == PER_DISTANCE``."""
    if max_distance == PER_DISTANCE:
        return distance_table_layout((num_buckets - 1) // 2, bidirectional, device)
    return relative_bias_layout(bidirectional, num_buckets, max_distance, device)


def _distance_bias(
    bias_table: torch.Tensor,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    max_seqlen: int,
    gather: bool = True,
) -> tuple[torch.Tensor | None, object, int]:
    """The kernels' per-distance bias: float32 (H, 2C + 1, 2) holding the pair (bias of distance ``d``, bias of
    ``d + 1``) times log2(e) (the kernels' softmax runs in base 2) at ``d + C``, saturated beyond +-R, with ``C``
    covering every distance of sequences up to ``max_seqlen`` plus a tile, so that the kernels index it without
    clamping. Pairs let a kernel read two adjacent columns of a tile with one load. One small gather, O(L + buckets)
    memory. Returns ``(vector, layout, C)``; the vector is None with ``gather=False`` (layout and C only)."""
    layout = _bias_layout(bidirectional, num_buckets, max_distance, bias_table.device)
    pad = 1 << max(8, (max_seqlen + 256 - 1).bit_length())  # >= max_seqlen + largest BLOCK_M + BLOCK_N; few sizes
    key = (id(layout), pad)  # layouts are cached for the process: their ids are stable
    index = _PADDED_DISTANCE_BUCKETS.get(key)
    if index is None:

        def pair_index() -> torch.Tensor:
            buckets = layout.distance_bucket
            padded = torch.cat((buckets[:1].expand(pad), buckets, buckets[-1:].expand(pad + 1)))  # 2C + 2
            return torch.stack((padded[:-1], padded[1:]), dim=1).flatten()

        index = _PADDED_DISTANCE_BUCKETS[key] = outside_cuda_graph_pools(pair_index, bias_table.device)
    center = layout.radius + pad
    if not gather:
        return None, layout, center
    return distance_bias_vector(bias_table, index).view(bias_table.shape[0], -1, 2), layout, center


_VALIDATED_CU_SEQLENS: dict = {}


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int, name: str) -> None:
    """Data-dependent checks of cumulative lengths: one device->host copy, cheaper than a wrong result or an
    illegal memory access. A tensor already validated with the same (total, max_seqlen) and not modified since
    (same ``_version``) is not checked again: a model reuses one cu_seqlens for all its layers."""
    key = id(cu_seqlens)
    seen = _VALIDATED_CU_SEQLENS.get(key)
    if seen is not None and seen[0]() is cu_seqlens and seen[1:] == (cu_seqlens._version, total, max_seqlen):
        return
    lengths = torch.diff(cu_seqlens)
    first, last, shortest, longest = torch.stack((cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max())).tolist()
    if shortest < 0:
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got {cu_seqlens.tolist()}.")
    if first != 0 or last != total:
        raise ValueError(f"{name} must start at 0 and end at the number of packed tokens {total}; got {first}..{last}.")
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen for {name} is {max_seqlen} but a sequence has {longest} tokens; pass the true maximum.")
    if len(_VALIDATED_CU_SEQLENS) > 64:
        _VALIDATED_CU_SEQLENS.clear()
    _VALIDATED_CU_SEQLENS[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, total, max_seqlen)


def _forward_with_distance_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(out, lse, distance bias)``; the eager autograd.Functions keep the distance bias for the backward."""
    if cu_seqlens_q is not None:
        _check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
        _check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    dist_bias, radius, dist_center = None, 0, 0
    if bias_table is not None:
        dist_bias, layout, dist_center = _distance_bias(
            bias_table, bidirectional, num_buckets, max_distance, max(max_seqlen_q, max_seqlen_k)
        )
        radius = layout.radius
    out, lse = t5_attention_forward(
        q, k, v,
        dist_bias=dist_bias, radius=radius, dist_center=dist_center, alibi_slopes=alibi_slopes,
        key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
    )  # fmt: skip
    return out, lse, dist_bias


@torch.library.custom_op("fat5::t5_flash_attention_fwd", mutates_args=())
def _t5_flash_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_with_distance_bias(
        q, k, v, bias_table, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, bidirectional, num_buckets, max_distance, causal, softmax_scale,
    )[:2]  # fmt: skip


@_t5_flash_attention_fwd.register_fake
def _(q, k, v, bias_table, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      bidirectional, num_buckets, max_distance, causal, softmax_scale):  # fmt: skip
    return _fake_forward_outputs(q, cu_seqlens_q is not None)


def _fake_forward_outputs(q: torch.Tensor, is_varlen: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake ``(out, lse)`` of a forward op: lse is (H, total) for packed sequences, (B, H, L) otherwise."""
    if is_varlen:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty_like(q), lse


def _backward_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias_table: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    causal: bool,
    softmax_scale: float,
    bias_table_needs_grad: bool,
    grad_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    dist_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dist_bias``: the forward's distance bias when it was kept (eager calls), else it is computed again."""
    radius, dist_center, cuts, layout = 0, 0, None, None
    if bias_table is not None:
        pairs, layout, dist_center = _distance_bias(
            bias_table, bidirectional, num_buckets, max_distance, max(max_seqlen_q, max_seqlen_k), dist_bias is None
        )
        dist_bias = pairs if dist_bias is None else dist_bias
        radius = layout.radius
        if bias_table_needs_grad:
            cuts = layout.cuts
    dq, dk, dv, bias_partials = t5_attention_backward(
        dout, q, k, v, out, lse,
        dist_bias=dist_bias, radius=radius, dist_center=dist_center, cuts=cuts, alibi_slopes=alibi_slopes,
        key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
        grad_buffers=grad_buffers,
    )  # fmt: skip
    if bias_partials is None:
        dtable = q.new_empty((0,), dtype=torch.float32)
    elif layout.cut_sums_to_bucket is None:
        dtable = _per_distance_table_grad(bias_partials, layout.num_segments, num_buckets, bias_table.dtype)
    else:
        dtable = bias_sums_to_table_grad(bias_partials, layout.cut_sums_to_bucket, bias_table.dtype)
    return dq, dk, dv, dtable


def _per_distance_table_grad(
    bias_partials: torch.Tensor, num_segments: int, num_columns: int, dtype: torch.dtype
) -> torch.Tensor:
    """Gradient ``(H, 2R + 1)`` of a per-distance table from the backward's per-program sums ``(H, C + 2, P)``.

    Deterministic: the programs are summed by one reduction (no atomics), then segment ``s`` is
    ``S[s] - S[s - 1]`` (``S[s]``: dS summed over band elements with ``d <= cuts[s]``; ``S[num_segments - 1]``, a
    padding cut, is the whole band) plus the far-left sum for the first segment and the far-right one for the last.
    Segment ``s`` is column ``s``; the causal layout's columns past its last segment (``d > 0``) get zero. The same
    differencing as `bias_sums_to_table_grad` without its (C + 2, num_buckets) matrix, which is O(R^2) here.
    """
    sums = bias_partials.sum(dim=-1)
    at_most_cut = sums[:, :num_segments]
    grad = torch.diff(at_most_cut, dim=1, prepend=torch.zeros_like(at_most_cut[:, :1]))
    grad[:, 0] += sums[:, -2]
    grad[:, num_segments - 1] += sums[:, -1]
    return torch.nn.functional.pad(grad, (0, num_columns - num_segments)).to(dtype)


def _fake_table_grad(bias_table: torch.Tensor | None, bias_table_needs_grad: bool, like: torch.Tensor) -> torch.Tensor:
    if bias_table is not None and bias_table_needs_grad:
        # Contiguous like the real op's result, whatever the table's layout (the model passes a transposed view);
        # `empty_like` would keep the view's strides and break torch.compile's stride checks.
        return bias_table.new_empty(bias_table.shape)
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("fat5::t5_flash_attention_bwd", mutates_args=())
def _t5_flash_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias_table: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    causal: bool,
    softmax_scale: float,
    bias_table_needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(
        dout, q, k, v, out, lse, bias_table, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, bidirectional, num_buckets, max_distance, causal, softmax_scale,
        bias_table_needs_grad,
    )  # fmt: skip


@_t5_flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias_table, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, bidirectional, num_buckets, max_distance, causal, softmax_scale,
      bias_table_needs_grad):  # fmt: skip
    dtable = _fake_table_grad(bias_table, bias_table_needs_grad, q)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dtable


_FWD_ARG_NAMES = (
    "q", "k", "v", "bias_table", "alibi_slopes", "key_padding_mask", "cu_seqlens_q", "cu_seqlens_k",
    "max_seqlen_q", "max_seqlen_k", "bidirectional", "num_buckets", "max_distance", "causal", "softmax_scale",
)  # fmt: skip


class _AttentionAutograd:
    """How an attention API's custom op and its eager autograd.Function save and run the backward.

    Their inputs are the attention tensors (q, k, v, or the packed qkv), the bias table, the other optional
    tensors, then the static arguments (from ``max_seqlen``). The backward gets the saved tensors (attention
    tensors, out, lse, the other tensors), the static arguments and whether the table needs a gradient; it
    returns the attention tensors' gradients then the table's.
    """

    def __init__(self, arg_names: tuple[str, ...]):
        self.num_inputs = len(arg_names)
        self.table_index = arg_names.index("bias_table")
        self.num_tensors = next(i for i, name in enumerate(arg_names) if name.startswith("max_seqlen"))

    def save(self, ctx, inputs, out, lse, bias_table_needs_grad: bool) -> None:
        ctx.mark_non_differentiable(lse)
        attention_tensors, other_tensors = inputs[: self.table_index], inputs[self.table_index : self.num_tensors]
        ctx.save_for_backward(*attention_tensors, out, lse, *other_tensors)
        ctx.static_args = inputs[self.num_tensors :]
        ctx.bias_table_needs_grad = bias_table_needs_grad

    def run_backward(self, ctx, dout, backward_fn) -> tuple:
        *grads, dtable = backward_fn(dout, *ctx.saved_tensors, *ctx.static_args, ctx.bias_table_needs_grad)
        grad_table = dtable if ctx.bias_table_needs_grad else None
        return (*grads, grad_table) + (None,) * (self.num_inputs - self.table_index - 1)

    def register(self, op_name: str, backward_op) -> None:
        """``register_autograd`` of the forward custom op ``op_name``, whose backward is ``backward_op``."""

        def setup_context(ctx, inputs, output):
            table = inputs[self.table_index]
            self.save(ctx, inputs, *output, table is not None and table.requires_grad)

        def backward(ctx, dout, dlse):
            del dlse  # the log-sum-exp is an auxiliary output without gradient
            return self.run_backward(ctx, dout, backward_op)

        torch.library.register_autograd(op_name, backward, setup_context=setup_context)


_AUTOGRAD = _AttentionAutograd(_FWD_ARG_NAMES)
_AUTOGRAD.register("fat5::t5_flash_attention_fwd", _t5_flash_attention_bwd)


class T5FlashAttentionFunction(torch.autograd.Function):
    """The same forward/backward as the ``fat5::t5_flash_attention_fwd`` custom op, as a plain autograd.Function.

    Eager calls use it: it skips the custom-op dispatch, a noticeable part of the host time per call at short
    sequence lengths, and hands the forward's distance bias to the backward instead of gathering it again. Under
    ``torch.compile`` the public functions call the custom op instead (one opaque node).
    Arguments are those of the custom op (see ``_FWD_ARG_NAMES``); returns ``(out, lse)``.
    """

    @staticmethod
    def forward(ctx, *inputs):
        out, lse, ctx.dist_bias = _forward_with_distance_bias(*inputs)  # made without autograd: no graph kept alive
        _AUTOGRAD.save(ctx, inputs, out, lse, ctx.needs_input_grad[_AUTOGRAD.table_index])
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        del dlse
        return _AUTOGRAD.run_backward(ctx, dout, functools.partial(_backward_impl, dist_bias=ctx.dist_bias))


def _attention(*inputs) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        return _t5_flash_attention_fwd(*inputs)
    return T5FlashAttentionFunction.apply(*inputs)


# ---- packed q/k/v: one (..., 3, H, D) input (the output of one projection by the concatenated q/k/v weights),
# whose gradient the backward writes as one packed tensor, so that the projection's backward is one matmul.
def _qkv_views(qkv: torch.Tensor, is_varlen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3, H, D) -> three (B, H, L, D) views; (total, 3, H, D) -> three (total, H, D) views."""
    q, k, v = qkv.unbind(-3)
    if is_varlen:
        return q, k, v
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


_PACKED_FWD_ARG_NAMES = (
    "qkv", "bias_table", "alibi_slopes", "key_padding_mask", "cu_seqlens", "max_seqlen", "bidirectional",
    "num_buckets", "max_distance", "causal", "softmax_scale",
)  # fmt: skip


def _packed_forward_with_distance_bias(
    qkv, bias_table, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, bidirectional, num_buckets,
    max_distance, causal, softmax_scale,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    q, k, v = _qkv_views(qkv, cu_seqlens is not None)
    return _forward_with_distance_bias(
        q, k, v, bias_table, alibi_slopes, key_padding_mask, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        bidirectional, num_buckets, max_distance, causal, softmax_scale,
    )  # fmt: skip


def _packed_backward_impl(
    dout, qkv, out, lse, bias_table, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, bidirectional,
    num_buckets, max_distance, causal, softmax_scale, bias_table_needs_grad, dist_bias=None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    is_varlen = cu_seqlens is not None
    dqkv = torch.empty_like(qkv)
    _, _, _, dtable = _backward_impl(
        dout, *_qkv_views(qkv, is_varlen), out, lse, bias_table, alibi_slopes, key_padding_mask, cu_seqlens,
        cu_seqlens, max_seqlen, max_seqlen, bidirectional, num_buckets, max_distance, causal, softmax_scale,
        bias_table_needs_grad, grad_buffers=_qkv_views(dqkv, is_varlen), dist_bias=dist_bias,
    )  # fmt: skip
    return dqkv, dtable


@torch.library.custom_op("fat5::t5_flash_attention_qkvpacked_fwd", mutates_args=())
def _t5_flash_attention_qkvpacked_fwd(
    qkv: torch.Tensor,
    bias_table: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _packed_forward_with_distance_bias(
        qkv, bias_table, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, bidirectional, num_buckets,
        max_distance, causal, softmax_scale,
    )[:2]  # fmt: skip


@_t5_flash_attention_qkvpacked_fwd.register_fake
def _(qkv, bias_table, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, bidirectional, num_buckets,
      max_distance, causal, softmax_scale):  # fmt: skip
    is_varlen = cu_seqlens is not None
    return _fake_forward_outputs(_qkv_views(qkv, is_varlen)[0], is_varlen)


@torch.library.custom_op("fat5::t5_flash_attention_qkvpacked_bwd", mutates_args=())
def _t5_flash_attention_qkvpacked_bwd(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias_table: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    causal: bool,
    softmax_scale: float,
    bias_table_needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _packed_backward_impl(
        dout, qkv, out, lse, bias_table, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, bidirectional,
        num_buckets, max_distance, causal, softmax_scale, bias_table_needs_grad,
    )  # fmt: skip


@_t5_flash_attention_qkvpacked_bwd.register_fake
def _(dout, qkv, out, lse, bias_table, alibi_slopes, key_padding_mask, cu_seqlens, max_seqlen, bidirectional,
      num_buckets, max_distance, causal, softmax_scale, bias_table_needs_grad):  # fmt: skip
    return torch.empty_like(qkv), _fake_table_grad(bias_table, bias_table_needs_grad, qkv)


_PACKED_AUTOGRAD = _AttentionAutograd(_PACKED_FWD_ARG_NAMES)
_PACKED_AUTOGRAD.register("fat5::t5_flash_attention_qkvpacked_fwd", _t5_flash_attention_qkvpacked_bwd)


class T5FlashAttentionQKVPackedFunction(torch.autograd.Function):
    """`T5FlashAttentionFunction` over one packed q/k/v tensor (eager calls; the custom op under compile).
    Arguments are those of ``fat5::t5_flash_attention_qkvpacked_fwd``; returns ``(out, lse)``."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse, ctx.dist_bias = _packed_forward_with_distance_bias(*inputs)  # made without autograd
        _PACKED_AUTOGRAD.save(ctx, inputs, out, lse, ctx.needs_input_grad[_PACKED_AUTOGRAD.table_index])
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        del dlse
        backward_fn = functools.partial(_packed_backward_impl, dist_bias=ctx.dist_bias)
        return _PACKED_AUTOGRAD.run_backward(ctx, dout, backward_fn)


def _attention_qkvpacked(*inputs) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        return _t5_flash_attention_qkvpacked_fwd(*inputs)
    return T5FlashAttentionQKVPackedFunction.apply(*inputs)


def _check_qkv_packed(qkv: torch.Tensor, packed_dim: int, layout: str) -> None:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != packed_dim + 3 or qkv.shape[packed_dim] != 3:
        raise ValueError(f"qkv must be a packed {layout} tensor, got {getattr(qkv, 'shape', qkv)}.")


def _check_common(q, k, v, bias_table, num_buckets, max_distance, bidirectional, alibi_slopes, num_heads):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32.")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_dim) dimension; call .contiguous() first.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    if q.device.type == "cpu" and not triton_interpreter_enabled():
        raise RuntimeError(
            "t5_flash_attention runs Triton kernels: move the tensors to a CUDA GPU, set TRITON_INTERPRET=1 "
            "(slow, for tests), or use fat5_kernels.attention_reference.t5_attention_reference on CPU."
        )
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"q, k, v must share head_dim, got {head_dim}, {k.shape[-1]}, {v.shape[-1]}.")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} is not supported (1..{MAX_HEAD_DIM}; it is padded to a power of 2).")
    if bias_table is not None and alibi_slopes is not None:
        raise ValueError("Pass either bias_table (T5 buckets) or alibi_slopes, not both.")
    if bias_table is not None:
        if not bias_table.is_floating_point():
            raise TypeError(f"bias_table must be a floating tensor, got {bias_table.dtype}.")
        if max_distance == PER_DISTANCE:
            if bias_table.shape[0] != num_heads:
                raise ValueError(
                    f"distance_bias has shape {tuple(bias_table.shape)} but q has {num_heads} heads; pass "
                    f"(num_heads, 2R + 1)."
                )
        elif tuple(bias_table.shape) != (num_heads, num_buckets):
            raise ValueError(
                f"bias_table has shape {tuple(bias_table.shape)} but (num_heads, num_buckets) = "
                f"({num_heads}, {num_buckets}); pass the (heads, buckets) weight (nn.Embedding(buckets, heads).weight.T)."
            )
        if bias_table.device != q.device:
            raise ValueError(f"bias_table is on {bias_table.device}, q on {q.device}.")
        if max_distance != PER_DISTANCE:
            check_bucket_parameters(bidirectional, num_buckets, max_distance)
    if alibi_slopes is not None:
        if alibi_slopes.dtype != torch.float32 or tuple(alibi_slopes.shape) != (num_heads,):
            raise ValueError(
                f"alibi_slopes must be float32 of shape ({num_heads},), got {alibi_slopes.dtype} "
                f"{tuple(alibi_slopes.shape)}."
            )
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}.")


def _table_arguments(
    bias_table: torch.Tensor | None,
    distance_bias: torch.Tensor | None,
    num_buckets: int,
    max_distance: int,
    bidirectional: bool,
) -> tuple[torch.Tensor | None, int, int]:
    """``(table, num_buckets, max_distance)`` for the ops: a per-distance table travels as the bias table with
    ``num_buckets = 2R + 1`` and ``max_distance = PER_DISTANCE``."""
    if distance_bias is None:
        return bias_table, num_buckets, max_distance
    if bias_table is not None:
        raise ValueError("Pass either bias_table (T5 buckets) or distance_bias (a column per distance), not both.")
    if not isinstance(distance_bias, torch.Tensor) or distance_bias.dim() != 2 or distance_bias.shape[1] % 2 == 0 or (
        distance_bias.shape[1] < 3
    ):
        raise ValueError(
            "distance_bias must be a (num_heads, 2R + 1) tensor, the bias of distance d in [-R, R] at column d + R "
            f"(R >= 1), got {tuple(getattr(distance_bias, 'shape', ()))}."
        )
    radius = distance_bias.shape[1] // 2
    if torch.is_grad_enabled() and distance_bias.requires_grad and not distance_table_has_gradient(radius, bidirectional):
        raise ValueError(
            f"distance_bias of radius {radius} needs a gradient over more than {MAX_TABLE_SEGMENTS} distances, more "
            "than the backward kernel serves; use a smaller radius, or attention with a materialized bias."
        )
    return distance_bias, distance_bias.shape[1], PER_DISTANCE


def _key_padding_mask_bytes(
    key_padding_mask: torch.Tensor | None, batch: int, num_keys: int, device: torch.device
) -> torch.Tensor | None:
    """Check a (B, N) bool key padding mask and return it as bytes (what the kernels read)."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, num_keys):
        raise ValueError(
            f"key_padding_mask must be bool of shape (batch, N) = ({batch}, {num_keys}), "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}."
        )
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {device}.")
    # Triton takes bytes; a copy rather than `.view(torch.uint8)`, which Inductor cannot lower for bool
    # (torch 2.11: "torch.bool is not supported by torch.iinfo"), and B x N bytes cost nothing.
    return key_padding_mask.to(torch.uint8)


def _check_varlen_args(device: torch.device, *named_seqlens: tuple[str, torch.Tensor, int]) -> None:
    """Check each (name, cu_seqlens, max_seqlen) of a varlen call (the cu_seqlens values are checked at launch)."""
    for name, cu, max_seqlen in named_seqlens:
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of length batch + 1 >= 2, got {getattr(cu, 'dtype', cu)}.")
        if cu.device != device:
            raise ValueError(f"{name} is on {cu.device}, q on {device}.")
        if int(max_seqlen) < 1:
            raise ValueError(f"the max_seqlen that goes with {name} must be positive, got {max_seqlen}.")
    batch_sizes = {cu.numel() - 1 for _, cu, _ in named_seqlens}
    if len(batch_sizes) > 1:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different batch sizes ({sorted(batch_sizes)}).")


def t5_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias_table: torch.Tensor | None = None,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
    distance_bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    fire_bias: FIREBias | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float = 1.0,
    deterministic: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention ``softmax(scale * q @ k^T + bias + mask) @ v`` with the bias computed in the kernel.

    Args:
        q: (B, H, M, D) float16, bfloat16 or float32; k, v: (B, H, N, D), same dtype and device. Any strides
            with a contiguous last dimension (e.g. a transposed (B, L, H, D) projection).
        bias_table: (H, num_buckets) learned T5 bias (gets a gradient), added after the scale.
        bidirectional: T5 bucket mode: True for the encoder, False (decoder self-attention, with ``causal``).
        num_buckets, max_distance: T5's bucket parameters.
        distance_bias: (H, 2R + 1) bias of every distance ``d`` in ``[-R, R]`` at column ``d + R``, any float dtype
            (gets a gradient); distances beyond ``+-R`` read the edge columns, and with ``bidirectional=False``
            distances ``d > 0`` read column ``R`` (``d = 0``), as T5's causal buckets. Exact for any bias that is a
            function of the distance alone when ``R >= max(M, N) - 1`` (FIRE below its threshold). The backward
            sums every band tile over every column, so its cost grows with R (benchmarks/attention.py, fat5_fire).
        alibi_slopes: (H,) float32 ALiBi slopes, bias ``-slope * |d|``; no gradient. Exclusive with the tables.
        fire_bias: FIRE's compact parameters (`FIREBias`), its bias evaluated per element from the query's position
            and the distance (exact past FIRE's threshold; ``bidirectional`` signs the distance). Its
            ``distance_scale``, ``threshold``, ``slopes`` and ``intercepts`` get gradients (the breakpoints, piecewise
            constant, none). Exclusive with the other biases.
        causal: mask keys after the query (bottom-right aligned when M != N).
        key_padding_mask: (B, N) bool, True = attend.
        softmax_scale: multiplies ``q @ k^T``; T5 uses 1.0.
        deterministic: the table gradient is always reduced in a fixed order (kept for API parity).
        return_lse: also return the float32 (B, H, M) log-sum-exp of each row (``+inf`` for empty rows).

    Returns:
        (B, H, M, D) in q's dtype, and the log-sum-exp if ``return_lse``.
    """
    del deterministic
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (batch, heads, length, head_dim) tensor, got {getattr(t, 'shape', t)}.")
    batch, num_heads = q.shape[:2]
    if k.shape[:2] != (batch, num_heads) or v.shape != k.shape:
        raise ValueError(
            f"k and v must be (batch={batch}, heads={num_heads}, N, head_dim) like q, got {tuple(k.shape)}, {tuple(v.shape)}."
        )
    bias_table, num_buckets, max_distance = _table_arguments(
        bias_table, distance_bias, num_buckets, max_distance, bidirectional
    )
    _check_common(q, k, v, bias_table, num_buckets, max_distance, bidirectional, alibi_slopes, num_heads)
    key_padding_mask = _key_padding_mask_bytes(key_padding_mask, batch, k.shape[2], q.device)
    if fire_bias is not None:
        other_bias = bias_table is not None or alibi_slopes is not None
        fire_params, width = _fire_parameters(fire_bias, num_heads, bidirectional, q.device, other_bias)
        out, lse = _fire_attention(
            q, k, v, fire_params, key_padding_mask, None, None, None, q.shape[2], k.shape[2], width, causal,
            float(softmax_scale),
        )  # fmt: skip
        return (out, lse) if return_lse else out
    out, lse = _attention(
        q, k, v, bias_table, alibi_slopes, key_padding_mask, None, None, q.shape[2], k.shape[2],
        bidirectional, num_buckets, max_distance, causal, float(softmax_scale),
    )  # fmt: skip
    return (out, lse) if return_lse else out


def t5_flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    bias_table: torch.Tensor | None = None,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
    distance_bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    fire_bias: FIREBias | None = None,
    causal: bool = False,
    softmax_scale: float = 1.0,
    deterministic: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`t5_flash_attention` over packed sequences (FlashAttention's varlen layout).

    Args:
        q: (total_q, H, D); k, v: (total_k, H, D). Sequence ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b+1]``;
            positions (bias, causal mask) restart at 0 in every sequence and sequences never attend to each other.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths starting at 0, on q's device.
        max_seqlen_q, max_seqlen_k: the longest sequence (sizes the launch grid; checked).
        Other keywords as `t5_flash_attention`.

    Returns:
        (total_q, H, D), and the float32 (H, total_q) log-sum-exp if ``return_lse``.
    """
    del deterministic
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D packed (total_tokens, heads, head_dim) tensor, got {getattr(t, 'shape', t)}.")
    num_heads = q.shape[1]
    if k.shape[1] != num_heads or v.shape != k.shape:
        raise ValueError(f"k and v must be (total_k, heads={num_heads}, head_dim), got {tuple(k.shape)}, {tuple(v.shape)}.")
    bias_table, num_buckets, max_distance = _table_arguments(
        bias_table, distance_bias, num_buckets, max_distance, bidirectional
    )
    _check_common(q, k, v, bias_table, num_buckets, max_distance, bidirectional, alibi_slopes, num_heads)
    _check_varlen_args(q.device, ("cu_seqlens_q", cu_seqlens_q, max_seqlen_q), ("cu_seqlens_k", cu_seqlens_k, max_seqlen_k))
    if fire_bias is not None:
        other_bias = bias_table is not None or alibi_slopes is not None
        fire_params, width = _fire_parameters(fire_bias, num_heads, bidirectional, q.device, other_bias)
        out, lse = _fire_attention(
            q, k, v, fire_params, None, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), None,
            int(max_seqlen_q), int(max_seqlen_k), width, causal, float(softmax_scale),
        )  # fmt: skip
        return (out, lse) if return_lse else out
    out, lse = _attention(
        q, k, v, bias_table, alibi_slopes, None, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
        int(max_seqlen_q), int(max_seqlen_k), bidirectional, num_buckets, max_distance, causal, float(softmax_scale),
    )  # fmt: skip
    return (out, lse) if return_lse else out


def t5_flash_attention_qkvpacked(
    qkv: torch.Tensor,
    *,
    bias_table: torch.Tensor | None = None,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
    distance_bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    fire_bias: FIREBias | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float = 1.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Self-attention `t5_flash_attention` on a packed (B, L, 3, H, D) q/k/v, as FlashAttention's qkvpacked API.

    ``qkv`` is typically ``(x @ cat([Wq, Wk, Wv]).T).view(B, L, 3, H, D)``: one projection instead of three.
    The backward writes the gradient of ``qkv`` as one tensor, so the projection's backward is one matmul of
    width 3 H D too, with no copy to assemble it.

    Args:
        qkv: (B, L, 3, H, D) float16, bfloat16 or float32, contiguous last dimension.
        Other keywords as `t5_flash_attention` (``key_padding_mask`` (B, L)).

    Returns:
        (B, L, H, D) in qkv's dtype, and the float32 (B, H, L) log-sum-exp if ``return_lse``.
    """
    _check_qkv_packed(qkv, 2, "(batch, length, 3, heads, head_dim)")
    q, k, v = _qkv_views(qkv, is_varlen=False)
    batch, num_heads, length = q.shape[:3]
    bias_table, num_buckets, max_distance = _table_arguments(
        bias_table, distance_bias, num_buckets, max_distance, bidirectional
    )
    _check_common(q, k, v, bias_table, num_buckets, max_distance, bidirectional, alibi_slopes, num_heads)
    key_padding_mask = _key_padding_mask_bytes(key_padding_mask, batch, length, q.device)
    if fire_bias is not None:
        fire_params, width = _fire_parameters(
            fire_bias, num_heads, bidirectional, q.device, bias_table is not None or alibi_slopes is not None
        )
        out, lse = _fire_attention(
            q, k, v, fire_params, key_padding_mask, None, None, None, length, length, width, causal,
            float(softmax_scale),
        )  # fmt: skip
        out = out.transpose(1, 2)
        return (out, lse) if return_lse else out
    out, lse = _attention_qkvpacked(
        qkv, bias_table, alibi_slopes, key_padding_mask, None, length, bidirectional, num_buckets, max_distance,
        causal, float(softmax_scale),
    )  # fmt: skip
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def t5_flash_attention_varlen_qkvpacked(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    bias_table: torch.Tensor | None = None,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
    distance_bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    fire_bias: FIREBias | None = None,
    causal: bool = False,
    softmax_scale: float = 1.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Self-attention `t5_flash_attention_varlen` on a packed (total, 3, H, D) q/k/v (see
    `t5_flash_attention_qkvpacked`); ``cu_seqlens`` / ``max_seqlen`` serve queries and keys alike.

    Returns:
        (total, H, D), and the float32 (H, total) log-sum-exp if ``return_lse``.
    """
    _check_qkv_packed(qkv, 1, "(total_tokens, 3, heads, head_dim)")
    q, k, v = _qkv_views(qkv, is_varlen=True)
    bias_table, num_buckets, max_distance = _table_arguments(
        bias_table, distance_bias, num_buckets, max_distance, bidirectional
    )
    _check_common(q, k, v, bias_table, num_buckets, max_distance, bidirectional, alibi_slopes, q.shape[1])
    _check_varlen_args(q.device, ("cu_seqlens", cu_seqlens, max_seqlen))
    if fire_bias is not None:
        fire_params, width = _fire_parameters(
            fire_bias, q.shape[1], bidirectional, q.device, bias_table is not None or alibi_slopes is not None
        )
        cu_seqlens = cu_seqlens.contiguous()
        out, lse = _fire_attention(
            q, k, v, fire_params, None, cu_seqlens, cu_seqlens, None, int(max_seqlen), int(max_seqlen), width, causal,
            float(softmax_scale),
        )  # fmt: skip
        return (out, lse) if return_lse else out
    out, lse = _attention_qkvpacked(
        qkv, bias_table, alibi_slopes, None, cu_seqlens.contiguous(), int(max_seqlen), bidirectional, num_buckets,
        max_distance, causal, float(softmax_scale),
    )  # fmt: skip
    return (out, lse) if return_lse else out


# ---- FIRE past its threshold: the bias evaluated per element from FIRE's compact parameters, with gradients.
def _fire_parameters(
    fire_bias: FIREBias | tuple,
    num_heads: int,
    bidirectional: bool,
    device: torch.device,
    other_bias: bool,
) -> tuple[torch.Tensor, int]:
    """Check ``fire_bias`` and pack it as the kernel reads it (`attention_fwd._fire_tile_bias`): float32
    ``[|c|, |L|, sign of x before the query (-1 bidirectional, else 1), breakpoints (W,), then per head: slopes
    (W + 1,) and intercepts (W + 1,) times log2(e)]``. Returns ``(packed, W)``, differentiable in
    ``distance_scale``, ``threshold``, ``slopes`` and ``intercepts`` (not in the breakpoints, piecewise constant in
    FIRE's MLP)."""
    if other_bias:
        raise ValueError("Pass one bias: fire_bias, or bias_table / distance_bias / alibi_slopes, not several.")
    if not (isinstance(fire_bias, tuple) and len(fire_bias) == 5) or not all(
        isinstance(t, torch.Tensor) for t in fire_bias
    ):
        raise TypeError(
            "fire_bias must be a FIREBias(distance_scale, threshold, breakpoints, slopes, intercepts) of tensors "
            "(FIREPositionBias.kernel_fire_bias() gives it)."
        )
    fire_bias = FIREBias(*fire_bias)
    width = fire_bias.breakpoints.numel()
    if fire_bias.distance_scale.numel() != 1 or fire_bias.threshold.numel() != 1 or fire_bias.breakpoints.dim() != 1:
        raise ValueError(
            "fire_bias: distance_scale and threshold must hold one value and breakpoints be 1-D (width,), got "
            f"{[tuple(t.shape) for t in fire_bias[:3]]}."
        )
    for name in ("slopes", "intercepts"):
        if tuple(getattr(fire_bias, name).shape) != (num_heads, width + 1):
            raise ValueError(
                f"fire_bias.{name} must be (num_heads, width + 1) = ({num_heads}, {width + 1}), got "
                f"{tuple(getattr(fire_bias, name).shape)}."
            )
    if width > MAX_FIRE_WIDTH:
        raise ValueError(
            f"fire_bias has {width} breakpoints (FIRE's MLP width); the kernel serves at most {MAX_FIRE_WIDTH}."
        )
    if any(t.device != device for t in fire_bias):
        devices = [str(t.device) for t in fire_bias]
        raise ValueError(f"fire_bias's tensors must be on q's device {device}, got {devices}.")
    if not all(t.is_floating_point() for t in fire_bias):
        raise TypeError(f"fire_bias's tensors must be floating point, got {[t.dtype for t in fire_bias]}.")
    header = torch.stack(
        (fire_bias.distance_scale.reshape(()).float().abs(), fire_bias.threshold.reshape(()).float().abs(),
         torch.full((), -1.0 if bidirectional else 1.0, device=device))
    )  # fmt: skip
    lines = torch.stack((fire_bias.slopes.float(), fire_bias.intercepts.float()), dim=1) * LOG2E  # (H, 2, W + 1)
    breakpoints = fire_bias.breakpoints.detach().float()
    return torch.cat((header, breakpoints, lines.flatten())).contiguous(), width


def _fire_forward(
    q, k, v, fire_params, key_padding_mask, cu_seqlens_q, cu_seqlens_k, query_offset, max_seqlen_q, max_seqlen_k,
    fire_width, causal, softmax_scale,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if cu_seqlens_q is not None:
        _check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
        _check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    return t5_attention_forward(
        q, k, v,
        dist_bias=None, radius=0, dist_center=0, alibi_slopes=None, key_padding_mask=key_padding_mask,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        causal=causal, softmax_scale=softmax_scale, query_offset=query_offset, fire_params=fire_params,
        fire_width=fire_width,
    )  # fmt: skip


@torch.library.custom_op("fat5::t5_flash_attention_fire_fwd", mutates_args=())
def _t5_flash_attention_fire_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fire_params: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    query_offset: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    fire_width: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fire_forward(
        q, k, v, fire_params, key_padding_mask, cu_seqlens_q, cu_seqlens_k, query_offset, max_seqlen_q,
        max_seqlen_k, fire_width, causal, softmax_scale,
    )  # fmt: skip


@_t5_flash_attention_fire_fwd.register_fake
def _(q, k, v, fire_params, key_padding_mask, cu_seqlens_q, cu_seqlens_k, query_offset, max_seqlen_q, max_seqlen_k,
      fire_width, causal, softmax_scale):  # fmt: skip
    return _fake_forward_outputs(q, cu_seqlens_q is not None)


def _fire_backward(
    dout, q, k, v, out, lse, fire_params, key_padding_mask, cu_seqlens_q, cu_seqlens_k, query_offset, max_seqlen_q,
    max_seqlen_k, fire_width, causal, softmax_scale,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``dq, dk, dv`` and the float32 gradient of the packed ``fire_params`` (`_fire_parameters`), whose sums the
    dK/dV kernel accumulates per program and `fire_sums_to_params_grad` reduces in a fixed order (deterministic)."""
    if query_offset is not None:
        raise NotImplementedError("attention over a KV cache with a query_offset is forward only.")
    dq, dk, dv, fire_partials = t5_attention_backward(
        dout, q, k, v, out, lse,
        dist_bias=None, radius=0, dist_center=0, cuts=None, alibi_slopes=None, key_padding_mask=key_padding_mask,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        causal=causal, softmax_scale=softmax_scale, fire_params=fire_params, fire_width=fire_width,
    )  # fmt: skip
    return dq, dk, dv, fire_sums_to_params_grad(fire_partials, fire_width, fire_params.numel())


@torch.library.custom_op("fat5::t5_flash_attention_fire_bwd", mutates_args=())
def _t5_flash_attention_fire_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    fire_params: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    query_offset: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    fire_width: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fire_backward(
        dout, q, k, v, out, lse, fire_params, key_padding_mask, cu_seqlens_q, cu_seqlens_k, query_offset,
        max_seqlen_q, max_seqlen_k, fire_width, causal, softmax_scale,
    )  # fmt: skip


@_t5_flash_attention_fire_bwd.register_fake
def _(dout, q, k, v, out, lse, fire_params, key_padding_mask, cu_seqlens_q, cu_seqlens_k, query_offset,
      max_seqlen_q, max_seqlen_k, fire_width, causal, softmax_scale):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(fire_params)


_FIRE_NUM_TENSORS = 8  # q, k, v, fire_params, key_padding_mask, cu_seqlens_q, cu_seqlens_k, query_offset


def _fire_save(ctx, inputs: tuple, out: torch.Tensor, lse: torch.Tensor) -> None:
    ctx.mark_non_differentiable(lse)
    q, k, v, *other_tensors = inputs[:_FIRE_NUM_TENSORS]
    ctx.save_for_backward(q, k, v, out, lse, *other_tensors)
    ctx.static_args = inputs[_FIRE_NUM_TENSORS:]


def _fire_run_backward(ctx, dout: torch.Tensor, backward_fn) -> tuple:
    dq, dk, dv, dparams = backward_fn(dout, *ctx.saved_tensors, *ctx.static_args)
    return (dq, dk, dv, dparams) + (None,) * (len(ctx.static_args) + _FIRE_NUM_TENSORS - 4)


def _fire_setup_context(ctx, inputs, output):
    _fire_save(ctx, inputs, *output)


def _fire_op_backward(ctx, dout, dlse):
    del dlse  # the log-sum-exp is an auxiliary output without gradient
    return _fire_run_backward(ctx, dout, _t5_flash_attention_fire_bwd)


torch.library.register_autograd(
    "fat5::t5_flash_attention_fire_fwd", _fire_op_backward, setup_context=_fire_setup_context
)


class FIREFlashAttentionFunction(torch.autograd.Function):
    """The ``fat5::t5_flash_attention_fire_fwd`` custom op's forward and backward as an autograd.Function (eager
    calls, without the custom-op dispatch). Arguments are those of the op; returns ``(out, lse)``; the backward
    returns the gradients of q, k, v and of the packed ``fire_params``."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _fire_forward(*inputs)
        _fire_save(ctx, inputs, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        del dlse
        return _fire_run_backward(ctx, dout, _fire_backward)


def _fire_attention(*inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of `_fire_forward`: the custom op under ``torch.compile``, the autograd.Function when eager."""
    if torch.compiler.is_compiling():
        return _t5_flash_attention_fire_fwd(*inputs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs[:4]):
        return FIREFlashAttentionFunction.apply(*inputs)
    return _fire_forward(*inputs)  # no gradient (evaluation, generation): no autograd bookkeeping


# ---- decoding with a KV cache: forward only, the queries placed by a device-side offset (a static cache's length).
def _kvcache_forward(
    q, k_cache, v_cache, query_offset, bias_table, alibi_slopes, key_padding_mask, bidirectional, num_buckets,
    max_distance, causal, softmax_scale,
) -> torch.Tensor:  # fmt: skip
    dist_bias, radius, dist_center = None, 0, 0
    if bias_table is not None:
        dist_bias, layout, dist_center = _distance_bias(
            bias_table, bidirectional, num_buckets, max_distance, max(q.shape[2], k_cache.shape[2])
        )
        radius = layout.radius
    out, _ = t5_attention_forward(
        q, k_cache, v_cache,
        dist_bias=dist_bias, radius=radius, dist_center=dist_center, alibi_slopes=alibi_slopes,
        key_padding_mask=key_padding_mask, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=q.shape[2],
        max_seqlen_k=k_cache.shape[2], causal=causal, softmax_scale=softmax_scale, query_offset=query_offset,
    )  # fmt: skip
    return out


@torch.library.custom_op("fat5::t5_flash_attention_kvcache_fwd", mutates_args=())
def _t5_flash_attention_kvcache_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_offset: torch.Tensor | None,
    bias_table: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    causal: bool,
    softmax_scale: float,
) -> torch.Tensor:
    return _kvcache_forward(
        q, k_cache, v_cache, query_offset, bias_table, alibi_slopes, key_padding_mask, bidirectional, num_buckets,
        max_distance, causal, softmax_scale,
    )  # fmt: skip


@_t5_flash_attention_kvcache_fwd.register_fake
def _(q, k_cache, v_cache, query_offset, bias_table, alibi_slopes, key_padding_mask, bidirectional, num_buckets,
      max_distance, causal, softmax_scale):  # fmt: skip
    return torch.empty_like(q)


def t5_flash_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    query_offset: torch.Tensor | None = None,
    bias_table: torch.Tensor | None = None,
    distance_bias: torch.Tensor | None = None,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
    alibi_slopes: torch.Tensor | None = None,
    fire_bias: FIREBias | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float = 1.0,
) -> torch.Tensor:
    """`t5_flash_attention` of new queries over a KV cache (a generation step), forward only.

    As FlashAttention's ``flash_attn_with_kvcache``, the position of the queries comes from a device tensor that the
    kernel reads, so that a compiled decoding step neither recompiles nor syncs with the host as the cache fills:
    query ``i`` sits at position ``past + i`` (T5 bias and ALiBi of the distance ``j - (past + i)``, causal mask
    ``j <= past + i``), and the cache slots from ``past + M`` on are unfilled: they are never read, whatever they
    hold. Without ``query_offset`` the queries are aligned to the end of the keys (a cache holding exactly the
    ``N`` keys so far, as transformers' ``DynamicCache``), as in `t5_flash_attention`.

    Args:
        q: (B, H, M, D) float16, bfloat16 or float32: the new tokens' queries (M = 1 in a decoding step).
        k_cache, v_cache: (B, H, N, D), q's dtype and device, contiguous last dimension: keys and values of the
            cached and new tokens (the new ones already written at positions ``past .. past + M - 1``).
        query_offset: integer tensor ``past`` of shape (), (1,) or (B,) on q's device (e.g. transformers'
            ``StaticLayer.cumulative_length`` before the update): the number of tokens cached before these
            queries. Values outside ``[0, N - M]`` are clamped into it (the result is then meaningless, but no
            read goes out of bounds).
        key_padding_mask: (B, N) bool, True = attend (a shorter mask is not padded here: pass all N columns).
        Other keywords as `t5_flash_attention`.

    Returns:
        (B, H, M, D) in q's dtype.

    Raises:
        NotImplementedError: when a gradient would be needed (no backward kernel with an offset): call it under
            ``torch.no_grad()`` / ``torch.inference_mode()``, or use `t5_flash_attention` for training.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = getattr(t, "shape", t)
            raise ValueError(f"{name} must be a 4-D (batch, heads, length, head_dim) tensor, got {shape}.")
    batch, num_heads = q.shape[:2]
    if k_cache.shape[:2] != (batch, num_heads) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must be (batch={batch}, heads={num_heads}, N, head_dim) like q, got "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}."
        )
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (q, k_cache, v_cache, bias_table, distance_bias, alibi_slopes, *(fire_bias or ()))
    ):
        raise NotImplementedError(
            "t5_flash_attention_with_kvcache is forward only (generation): run it under torch.no_grad() or "
            "torch.inference_mode(), or use t5_flash_attention (queries aligned to the end of the keys) for gradients."
        )
    bias_table, num_buckets, max_distance = _table_arguments(
        bias_table, distance_bias, num_buckets, max_distance, bidirectional
    )
    _check_common(q, k_cache, v_cache, bias_table, num_buckets, max_distance, bidirectional, alibi_slopes, num_heads)
    if query_offset is not None:
        if not isinstance(query_offset, torch.Tensor) or query_offset.dtype not in (torch.int32, torch.int64):
            dtype = getattr(query_offset, "dtype", query_offset)
            raise TypeError(f"query_offset must be an int32 or int64 tensor, got {dtype}.")
        if query_offset.numel() not in (1, batch) or query_offset.dim() > 1:
            raise ValueError(
                f"query_offset must hold one offset, or one per batch row (batch={batch}): shape (), (1,) or "
                f"({batch},), got {tuple(query_offset.shape)}."
            )
        if query_offset.device != q.device:
            raise ValueError(f"query_offset is on {query_offset.device}, q on {q.device}.")
        query_offset = query_offset.reshape(-1).contiguous()
    key_padding_mask = _key_padding_mask_bytes(key_padding_mask, batch, k_cache.shape[2], q.device)
    if fire_bias is not None:
        fire_params, width = _fire_parameters(
            fire_bias, num_heads, bidirectional, q.device, bias_table is not None or alibi_slopes is not None
        )
        return _fire_attention(
            q, k_cache, v_cache, fire_params, key_padding_mask, None, None, query_offset, q.shape[2],
            k_cache.shape[2], width, causal, float(softmax_scale),
        )[0]  # fmt: skip
    inputs = (
        q, k_cache, v_cache, query_offset, bias_table, alibi_slopes, key_padding_mask, bidirectional, num_buckets,
        max_distance, causal, float(softmax_scale),
    )  # fmt: skip
    if torch.compiler.is_compiling():
        return _t5_flash_attention_kvcache_fwd(*inputs)
    return _kvcache_forward(*inputs)  # eager: the implementation without the custom-op dispatch
