"""Pure-PyTorch pieces of attention with a T5 relative-position bias (no triton import).

* `t5_relative_position_bucket`: T5's bucket function, bit-identical to transformers'
  ``T5Attention._relative_position_bucket``.
* `relative_bias_layout`: the small per-call tables the Triton kernels use instead of an (L, L) bias:
  the bucket of every clamped distance, and the distance segments over which the bucket is constant.
  `distance_table_layout` is the same description for a table with one column per signed distance (FIRE's).
* `t5_attention_reference` / `t5_attention_varlen_reference`: materialized references with the same
  keywords as the kernels (used by the model's CPU path and by the tests).
* `FIREBias` / `fire_bias_reference`: FIRE's compact piecewise-linear parameters and the bias they give at any
  (query, key) positions, what the forward kernel evaluates per element past FIRE's threshold.

Conventions shared with the kernels:
* distance ``d = key_position - query_position``; when ``M != N`` the queries are aligned to the END of
  the keys (query ``i`` sits at key position ``i + N - M``), as in FlashAttention >= 2.1 and as HF T5's
  position bias is sliced when decoding with a KV cache. This applies to the bias, ALiBi and the causal mask.
  With a ``query_offset`` ``past`` (a static KV cache), query ``i`` sits at position ``past + i`` instead and
  the keys from ``past + M`` on are unfilled cache slots, never read.
* masked logits are ``-inf``; a query row whose keys are all masked gets an all-zero output (and zero
  gradients), never NaN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .triton_utils import outside_cuda_graph_pools

__all__ = [
    "FIREBias",
    "RelativeBiasLayout",
    "fire_bias_reference",
    "distance_table_layout",
    "relative_bias_layout",
    "t5_attention_reference",
    "t5_attention_varlen_reference",
    "t5_relative_position_bucket",
]


def t5_relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket of ``relative_position = key_position - query_position`` (any integer shape).

    Same maths, operation for operation, as transformers' ``T5Attention._relative_position_bucket``, so
    the result is bit-identical. Returns int64 buckets in ``[0, num_buckets)``.
    """
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    # now relative_position is in the range [0, inf)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


# A distance bound that no real distance reaches; also small enough that index arithmetic stays in int32.
SEGMENT_BOUND = 1 << 29


@dataclass(frozen=True)
class RelativeBiasLayout:
    """How T5 buckets tile the distance axis, for one (bidirectional, num_buckets, max_distance), or the columns of a
    per-distance table (`distance_table_layout`).

    Attributes:
        radius: ``R``, the smallest radius such that every distance ``|d| >= R`` has the bucket of ``sign(d) * R``.
        distance_bucket: int64 (2R+1,), the bucket of distance ``d`` at index ``d + R``.
        cuts: int32 (num_cuts_padded,), sorted distances ``c`` where ``bucket(c) != bucket(c + 1)``,
            padded with ``SEGMENT_BOUND``. Segment ``s`` is the distance range ``(cuts[s-1], cuts[s]]``
            (``cuts[-1] = -inf``, padding = +inf), on which the bucket is constant.
        num_segments: number of real segments (``num_cuts + 1``).
        segment_bucket_onehot: float32 (num_cuts_padded, num_buckets), one-hot bucket of each segment
            (rows past ``num_segments`` are zero); None for a per-distance table, whose segment ``s`` is bucket
            ``s`` (an O(R^2) matrix would be the identity).
        cut_sums_to_bucket: float32 (num_cuts_padded + 2, num_buckets). The backward kernel returns, per
            head, ``S[c] = sum of dS over band elements with d <= cuts[c]`` followed by the far-left and
            far-right sums; ``S @ cut_sums_to_bucket`` is the table gradient (segment ``s`` is
            ``S[s] - S[s-1]``; the far-left sum belongs to segment 0, the far-right one to the last). None for
            a per-distance table (the attention wrapper differences the sums itself).
    """

    radius: int
    distance_bucket: torch.Tensor
    cuts: torch.Tensor
    num_segments: int
    segment_bucket_onehot: torch.Tensor | None
    cut_sums_to_bucket: torch.Tensor | None


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def check_bucket_parameters(bidirectional: bool, num_buckets: int, max_distance: int) -> None:
    """Raise a ValueError for T5 bucket parameters the kernels cannot serve. Plain Python (no tensor op), so that
    ``torch.compile`` folds it instead of breaking the graph."""
    if num_buckets < (4 if bidirectional else 2):
        raise ValueError(
            f"num_buckets={num_buckets} is too small for T5 buckets (need >= {4 if bidirectional else 2} "
            f"when bidirectional={bidirectional})."
        )
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance={max_distance} must be larger than the exact-bucket range {max_exact} "
            f"(num_buckets={num_buckets}, bidirectional={bidirectional}); T5's log buckets are undefined otherwise."
        )


@functools.lru_cache(maxsize=64)
def _relative_bias_layout_cpu(bidirectional: bool, num_buckets: int, max_distance: int) -> RelativeBiasLayout:
    check_bucket_parameters(bidirectional, num_buckets, max_distance)
    bound = max(max_distance, num_buckets)
    # Check, rather than assume, that buckets saturate beyond +-bound.
    wide = torch.arange(-4 * bound, 4 * bound + 1)
    wide_bucket = t5_relative_position_bucket(wide, bidirectional, num_buckets, max_distance)
    center = 4 * bound
    if not (
        torch.all(wide_bucket[: center - bound + 1] == wide_bucket[center - bound])
        and torch.all(wide_bucket[center + bound :] == wide_bucket[center + bound])
    ):
        raise ValueError(f"T5 buckets do not saturate beyond max_distance={max_distance}; unsupported parameters.")
    # The smallest radius that saturates on both sides (T5's log buckets reach their last value before
    # max_distance: 91 for 32 bidirectional buckets and max_distance 128): fewer band tiles in the kernels.
    left_changes = torch.nonzero(wide_bucket[: center + 1] != wide_bucket[0]).flatten()
    right_changes = torch.nonzero(wide_bucket[center:] != wide_bucket[-1]).flatten()
    left = center - int(left_changes[0]) + 1 if left_changes.numel() else 0  # every d <= -left is saturated
    right = int(right_changes[-1]) + 1 if right_changes.numel() else 0  # every d >= right is saturated
    radius = max(left, right, 1)
    inner = wide_bucket[center - radius : center + radius + 1]
    cuts_padded, num_segments = _segment_cuts(inner, radius)
    padded = cuts_padded.numel()
    cuts = cuts_padded[: num_segments - 1].tolist()
    # bucket of each segment: read at its last distance (cut), the last segment at +radius
    seg_last = [c + radius for c in cuts] + [2 * radius]
    onehot = torch.zeros(padded, num_buckets, dtype=torch.float32)
    onehot[torch.arange(num_segments), inner[seg_last]] = 1.0
    to_bucket = torch.zeros(padded + 2, num_buckets, dtype=torch.float32)
    to_bucket[:padded] = onehot
    to_bucket[: padded - 1] -= onehot[1:]  # S[c] counts in segment c and (negated) in segment c + 1
    to_bucket[padded] = onehot[0]
    to_bucket[padded + 1] = onehot[num_segments - 1]
    return RelativeBiasLayout(radius, inner.clone(), cuts_padded, num_segments, onehot, to_bucket)


def _segment_cuts(distance_bucket: torch.Tensor, radius: int) -> tuple[torch.Tensor, int]:
    """``(cuts, num_segments)`` of a layout whose distance ``d`` in ``[-R, R]`` has bucket ``distance_bucket[d + R]``:
    the distances ``c`` where ``bucket(c) != bucket(c + 1)``, int32, padded to a power of two (at least one pad)
    with ``SEGMENT_BOUND``."""
    cut_positions = torch.nonzero(distance_bucket[1:] != distance_bucket[:-1]).flatten()  # index of c in [0, 2R)
    num_segments = cut_positions.numel() + 1
    cuts_padded = torch.full((_next_power_of_2(num_segments),), SEGMENT_BOUND, dtype=torch.int32)
    cuts_padded[: num_segments - 1] = (cut_positions - radius).to(torch.int32)
    return cuts_padded, num_segments


@functools.lru_cache(maxsize=64)
def _distance_table_layout_cpu(radius: int, bidirectional: bool) -> RelativeBiasLayout:
    distance = torch.arange(-radius, radius + 1)
    # causal: positive distances (masked) read the column of d = 0, as T5's causal buckets do
    distance_bucket = (distance if bidirectional else distance.clamp(max=0)) + radius
    cuts, num_segments = _segment_cuts(distance_bucket, radius)
    return RelativeBiasLayout(radius, distance_bucket, cuts, num_segments, None, None)


def distance_table_layout(radius: int, bidirectional: bool, device: torch.device | str = "cpu") -> RelativeBiasLayout:
    """`RelativeBiasLayout` of a per-distance table ``(H, 2R + 1)``: distance ``d`` in ``[-R, R]`` is its own bucket
    ``d + R`` (distances beyond ``+-R`` read the edge columns), so the kernels' bucket gradient is the gradient of
    every distance's bias. With ``bidirectional=False`` (causal attention), distances ``d > 0`` read column ``R``
    (``d = 0``) and their columns get no gradient, which halves the segments the backward tracks. Cached."""
    if radius < 1:
        raise ValueError(f"A per-distance table needs a radius >= 1 (a (H, 2R + 1) table, R >= 1), got R={radius}.")
    device = torch.device(device)
    key = ("distance", int(radius), bool(bidirectional), device)
    layout = _LAYOUT_CACHE.get(key)
    if layout is None:
        cpu = _distance_table_layout_cpu(int(radius), bool(bidirectional))
        layout = outside_cuda_graph_pools(
            lambda: RelativeBiasLayout(
                cpu.radius, cpu.distance_bucket.to(device), cpu.cuts.to(device), cpu.num_segments, None, None
            ),
            device,
        )
        _LAYOUT_CACHE[key] = layout
    return layout


_LAYOUT_CACHE: dict = {}


def relative_bias_layout(
    bidirectional: bool, num_buckets: int, max_distance: int, device: torch.device | str = "cpu"
) -> RelativeBiasLayout:
    """`RelativeBiasLayout` for these bucket parameters, with its tensors on ``device`` (cached)."""
    device = torch.device(device)
    key = (bool(bidirectional), int(num_buckets), int(max_distance), device)
    layout = _LAYOUT_CACHE.get(key)
    if layout is None:
        cpu = _relative_bias_layout_cpu(*key[:3])
        layout = outside_cuda_graph_pools(
            lambda: RelativeBiasLayout(
                cpu.radius,
                cpu.distance_bucket.to(device),
                cpu.cuts.to(device),
                cpu.num_segments,
                cpu.segment_bucket_onehot.to(device),
                cpu.cut_sums_to_bucket.to(device),
            ),
            device,
        )
        _LAYOUT_CACHE[key] = layout
    return layout


class FIREBias(NamedTuple):
    """FIRE's bias (Li et al., 2024) in the compact form the kernels evaluate (`FIREPositionBias.kernel_fire_bias`):

        b_h(i, j) = slopes[h, s] * x + intercepts[h, s],   x = sign * log1p(c |j - i|) / log1p(c * max(L, i, 1))

    with ``s`` the number of ``breakpoints`` below ``x`` (``torch.bucketize``, ``right=False``), ``c`` and ``L`` the
    absolute values of ``distance_scale`` and ``threshold``, and ``sign`` that of ``j - i`` when bidirectional (else
    1). float32 tensors: ``distance_scale`` and ``threshold`` one element, ``breakpoints`` ``(W,)`` sorted (``inf``
    for units that never switch), ``slopes`` and ``intercepts`` ``(H, W + 1)``.
    """

    distance_scale: torch.Tensor
    threshold: torch.Tensor
    breakpoints: torch.Tensor
    slopes: torch.Tensor
    intercepts: torch.Tensor


def fire_bias_reference(
    fire_bias: FIREBias, query_position: torch.Tensor, key_position: torch.Tensor, bidirectional: bool
) -> torch.Tensor:
    """FIRE's bias at integer positions broadcast together (``query_position`` ``(..., M, 1)``, ``key_position``
    ``(N,)``), float32 ``(H, ..., M, N)``: the formula of `FIREBias`, materialized."""
    c = fire_bias.distance_scale.float().abs().reshape(())
    distance = (key_position - query_position).float()
    reach = torch.maximum(query_position.float(), fire_bias.threshold.float().abs().reshape(())).clamp_min(1.0)
    normalized = torch.log1p(c * distance.abs()) / torch.log1p(c * reach)
    if bidirectional:
        normalized = torch.where(distance < 0, -normalized, normalized)
    segment = torch.bucketize(normalized, fire_bias.breakpoints.float())
    return fire_bias.slopes.float()[:, segment] * normalized + fire_bias.intercepts.float()[:, segment]


def t5_attention_reference(
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
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float = 1.0,
    deterministic: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    query_offset: torch.Tensor | None = None,
    fire_bias: FIREBias | None = None,
) -> torch.Tensor:
    """Materialized attention with the same keywords as `t5_flash_attention` (and `t5_flash_attention_with_kvcache`'s
    ``query_offset``); differentiable.

    Args:
        q: (B, H, M, D); k, v: (B, H, N, D).
        bias_table: (H, num_buckets) learned T5 bias, added to the raw scores (after ``softmax_scale``).
        distance_bias: (H, 2R + 1) bias of distance ``d`` at column ``d + R`` (clamped to ``[-R, R]``, and to
            ``d <= 0`` with ``bidirectional=False``), as `distance_table_layout` reads it.
        alibi_slopes: (H,) ALiBi slopes: bias ``-slope * |d|``.
        key_padding_mask: (B, N) bool, True = attend.
        compute_dtype: dtype of every operation (float32 by default; float16/bfloat16 give the
            "same reference in low precision" the tests compare against).
        deterministic: accepted for signature parity, unused.
        query_offset: integer (1,) or (B,) ``past``: query ``i`` at position ``past + i``; keys at positions
            ``>= past + M`` are unfilled cache slots, never read (whatever they hold, NaN included).
        fire_bias: FIRE's parameters (`FIREBias`): the bias of every (query, key) from their positions
            (`fire_bias_reference`, signed by ``bidirectional``).

    Returns:
        (B, H, M, D) in ``compute_dtype``.
    """
    del deterministic
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    M, N = q.shape[-2], k.shape[-2]
    key_pos = torch.arange(N, device=q.device)
    if query_offset is None:
        past = torch.full((1, 1, 1), N - M, device=q.device)
    else:
        past = query_offset.reshape(-1, 1, 1).to(device=q.device, dtype=torch.long)
        filled = (key_pos < past[:, 0] + M)[:, None, :, None]  # (B or 1, 1, N, 1)
        kc, vc = kc.masked_fill(~filled, 0.0), vc.masked_fill(~filled, 0.0)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * softmax_scale
    query_pos = torch.arange(M, device=q.device)[None, :, None] + past  # (B or 1, M, 1)
    distance = key_pos - query_pos  # (B or 1, M, N)
    if bias_table is not None:
        buckets = t5_relative_position_bucket(distance, bidirectional, num_buckets, max_distance)
        scores = scores + bias_table.to(compute_dtype)[:, buckets].transpose(0, 1)
    if distance_bias is not None:
        radius = (distance_bias.shape[1] - 1) // 2
        columns = distance.clamp(-radius, radius if bidirectional else 0) + radius
        scores = scores + distance_bias.to(compute_dtype)[:, columns].transpose(0, 1)
    if fire_bias is not None:
        fire = fire_bias_reference(fire_bias, query_pos, key_pos, bidirectional)  # (H, B or 1, M, N)
        scores = scores + fire.to(compute_dtype).transpose(0, 1)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute_dtype)[None, :, None, None]
        scores = scores - slopes * distance.abs().to(compute_dtype)[:, None]
    allowed = torch.ones(q.shape[0], 1, M, N, dtype=torch.bool, device=q.device)
    allowed = allowed & (key_pos < past + M)[:, None]  # every key when there is no offset
    if causal:
        allowed = allowed & (distance <= 0)[:, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(torch.bool)
    row_empty = ~allowed.any(-1, keepdim=True)  # rows with no key at all -> output 0
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(row_empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(row_empty, 0.0)
    return torch.matmul(probs, vc)


def t5_attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Reference for packed sequences: q (total_q, H, D), k/v (total_k, H, D) -> (total_q, H, D).

    Runs `t5_attention_reference` on each sequence ``cu_seqlens[b]:cu_seqlens[b+1]``; keywords as there
    (no ``key_padding_mask``).
    """
    del max_seqlen_q, max_seqlen_k
    outs = []
    for b in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        seq = [t.transpose(0, 1).unsqueeze(0) for t in (q[qs:qe], k[ks:ke], v[ks:ke])]
        outs.append(t5_attention_reference(*seq, **kwargs)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)
