"""Forward Triton kernel of flash attention with an in-kernel T5 relative-position bias.

FlashAttention-2 forward (online softmax in fp32, exp2 domain) over one block of queries per program.
The key axis of a query block is split into three ranges by the distance ``d = key_pos - query_pos``:

* far left (``d <= -R`` for every element): the T5 bias is one scalar per head, no masking needed;
* band (some ``|d| < R``): per-element bias gathered from a per-distance vector of length ``2R + 1``,
  causal / bounds masking;
* far right (``d >= R``): scalar bias again; only the last, partial key tile is masked.

``R`` is the bucket layout's radius, the distance where T5's buckets saturate (91 for 32 bidirectional buckets
and max_distance 128, 113 for 32 causal ones); without a T5 bias the band is the diagonal tile(s). So the bias
costs O(L + buckets) memory and nothing but a scalar add on most tiles.

FIRE past its threshold (``BIAS_KIND == 3``) depends on the query's position as well as the distance:
every tile is a band tile and evaluates FIRE per element from its compact parameters (`_fire_tile_bias`).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # triton is optional; fat5_hf falls back to PyTorch without it
    raise ImportError("fat5_kernels.attention_fwd needs triton: pip install 'fat5-hf[gpu]'") from err

from .triton_utils import (
    CompiledLaunches,
    autotune_configs,
    cdiv,
    launch,
    next_power_of_2,
    outside_cuda_graph_pools,
    triton_interpreter_enabled,
)

# Head dims above this (padded to 256) get their own, smaller tiles: compiled for sm_86 (A10G, L4: 99 KiB of shared
# memory a block) at D=256, every default tile needs 100-136 KiB (forward 64x32/4/3 100 KiB, dK/dV 64x32/4/3
# 116, dQ 64x64/4/2 136), the wide-head ones 52-84 KiB.
WIDE_HEAD_DIM = 128
# Head dims up to this get their own candidates first: the same tiles with a register cap (`maxnreg`) that fits
# one more program on a multiprocessor, which wider heads would pay for in spills.
NARROW_HEAD_DIM = 64
# every kernel's candidates for those head dims (`by_head_dim` tells them by identity)
_WIDE_HEAD_CONFIGS: list = []
_NARROW_HEAD_CONFIGS: list = []


def tuning_configs(configs: list, wide_head_configs: list, narrow_head_configs: list) -> list:
    """Autotune candidates of a kernel: ``narrow_head_configs`` for head dims up to 64, ``configs`` up to 128 and
    ``wide_head_configs`` (smaller tiles) above; `by_head_dim` keeps the right list at launch. The first of each
    list is its default, the only candidate with ``FAT5_ATTENTION_AUTOTUNE=0`` (skips minutes of compilation, e.g.
    for quick GPU test runs). Under the interpreter, which cannot autotune, the first of ``narrow_head_configs``
    alone."""
    if os.environ.get("FAT5_ATTENTION_AUTOTUNE", "1") == "0":
        configs, wide_head_configs, narrow_head_configs = configs[:1], wide_head_configs[:1], narrow_head_configs[:1]
    _WIDE_HEAD_CONFIGS.extend(wide_head_configs)
    _NARROW_HEAD_CONFIGS.extend(narrow_head_configs)
    return autotune_configs(narrow_head_configs + configs + wide_head_configs)


def by_head_dim(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of the attention kernels: the candidates made for the launch's padded head dim."""
    head_dim_pad = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD", 64))
    if head_dim_pad > WIDE_HEAD_DIM:
        return [config for config in configs if _is_in(config, _WIDE_HEAD_CONFIGS)]
    if head_dim_pad <= NARROW_HEAD_DIM:
        return [config for config in configs if _is_in(config, _NARROW_HEAD_CONFIGS)]
    return [config for config in configs if not _is_in(config, _WIDE_HEAD_CONFIGS + _NARROW_HEAD_CONFIGS)]


def _is_in(config, configs: list) -> bool:
    return any(config is other for other in configs)


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# bias kinds (a constexpr of every kernel)
BIAS_NONE = 0
BIAS_T5 = 1
BIAS_ALIBI = 2
BIAS_FIRE = 3  # FIRE evaluated per element from its piecewise-linear form

# regions of the key/query loops (the REGION constexpr; kernels pass the literal values)
REGION_FAR_LEFT = 0  # every d <= -R
REGION_BAND = 1
REGION_FAR_RIGHT = 2  # every d >= R


@triton.jit
def _distance_bias_kernel(Table, Index, Out, num_entries, stride_th, stride_tb, BLOCK: tl.constexpr):
    """``Out[h, i] = float32(Table[h, Index[i]]) * log2(e)``: grid (heads, entry blocks)."""
    head = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_entries
    bucket = tl.load(Index + offs, mask=mask, other=0)
    bias = tl.load(Table + head * stride_th + bucket * stride_tb, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + head * num_entries + offs, bias * 1.4426950408889634, mask=mask)  # log2(e)


def distance_bias_vector(bias_table: torch.Tensor, bucket_index: torch.Tensor) -> torch.Tensor:
    """The kernels' per-distance bias, float32 ``(H, len(bucket_index))``: ``bias_table[:, bucket_index]`` times
    log2(e) in float32, one launch (host time matters: it runs once per attention forward). ``bias_table``: (H,
    num_buckets), any float dtype and strides; ``bucket_index``: int64 (n,) on the same device."""
    num_heads, num_entries = bias_table.shape[0], bucket_index.numel()
    out = torch.empty((num_heads, num_entries), dtype=torch.float32, device=bias_table.device)
    block = 1024
    launch(
        _distance_bias_kernel,
        (num_heads, cdiv(num_entries, block)),
        (bias_table, bucket_index, out, num_entries, bias_table.stride(0), bias_table.stride(1)),
        dict(BLOCK=block),
        num_warps=4,
    )
    return out


# How band tiles gather their per-element bias. A `tl.load` of a (rows, keys) tile of pointers is placed in a
# coalesced layout, and Triton converts the fp32 tile to the matmul accumulator's layout through shared memory on
# every tile (16 KiB of shared-memory traffic and two barriers on a 64x32 tile; compiled for sm_90, the forward's
# band loop holds one such conversion a tile). The same load written as an elementwise inline-asm op is
# rematerialized in the accumulator's layout, which needs no conversion. The per-distance vector is stored as
# pairs (bias at d, bias at d + 1): the accumulator holds two adjacent columns per thread, so one 8-byte load
# serves both (and loads shared by rows 8 apart fold into one), half the load instructions of a gather per
# element. CUDA only: ROCm and the interpreter take `tl.load`.
GATHER_IN_ACCUMULATOR_LAYOUT = tl.constexpr(not triton_interpreter_enabled() and torch.version.hip is None)


@triton.jit
def gather_distance_pairs(pairs_ptr, distance):
    """``(bias[d], bias[d + 1])`` for every ``d`` of the int tensor ``distance``, read from the pair-packed
    per-distance vector (``pairs_ptr`` at distance 0, float32 pairs: see `t5_attention_forward`). Every distance
    must lie inside the vector: no mask."""
    ptrs = pairs_ptr + 2 * distance
    if GATHER_IN_ACCUMULATOR_LAYOUT:
        # ld.global.nc: read-only data cache; the vector is written by an earlier launch, never by these kernels
        at, after = tl.inline_asm_elementwise(
            "ld.global.nc.v2.f32 {$0, $1}, [$2];", "=r,=r,l", [ptrs], dtype=(tl.float32, tl.float32), is_pure=True,
            pack=1,
        )  # fmt: skip
    else:
        at = tl.load(ptrs)
        after = tl.load(ptrs + 1)
    return at, after


@triton.jit
def _tile_bias(
    scores,
    distance,
    band_bias,
    alibi_slope_log2,
    bias_far_left,
    bias_far_right,
    BIAS_KIND: tl.constexpr,
    REGION: tl.constexpr,
):
    """Add the relative bias to a tile of log2-domain scores; ``distance = key - query``.

    ``band_bias`` is the band tile's T5 bias, gathered by the tile loop (`_band_bias`, possibly one tile ahead)."""
    if BIAS_KIND == 1:
        if REGION == 0:
            scores = scores + bias_far_left
        elif REGION == 2:
            scores = scores + bias_far_right
        else:
            scores = scores + band_bias
    elif BIAS_KIND == 2:
        scores = scores - alibi_slope_log2 * tl.abs(distance).to(tl.float32)
    elif BIAS_KIND == 3:
        scores = scores + band_bias
    return scores


@triton.jit
def _band_bias(dist_bias_ptr, start_n, query_pos, BIAS_KIND: tl.constexpr, REGION: tl.constexpr, BLOCK_N: tl.constexpr):
    """T5 bias of the band tile of keys ``[start_n, start_n + BLOCK_N)`` (rows: ``query_pos``), gathered from the
    head's log2-scaled per-distance vector; 0 (unused) outside the band."""
    if BIAS_KIND == 1 and REGION == 1:
        # the distance grows along the keys: an even key's pair holds its odd neighbour's bias too
        even_keys = start_n + 2 * tl.arange(0, BLOCK_N // 2)
        at_even, at_odd = gather_distance_pairs(dist_bias_ptr, even_keys[None, :] - query_pos[:, None])
        bias = tl.reshape(tl.join(at_even, at_odd), [query_pos.shape[0], BLOCK_N])
    else:
        bias = 0.0
    return bias


@triton.jit
def _log1p(x):
    """``log(1 + x)`` for ``x >= 0``, accurate for small ``x`` (``log(u) * x / (u - 1)``, ``u = 1 + x`` rounded)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _fire_normalizer(fire_ptr, query_pos):
    """``log1p(c * max(L, i, 1))`` of every query row (float32 ``(rows,)``); ``c``, ``L`` non-negative."""
    c = tl.load(fire_ptr)
    reach = tl.maximum(tl.maximum(query_pos.to(tl.float32), tl.load(fire_ptr + 1)), 1.0)
    return _log1p(c * reach)


@triton.jit
def _fire_tile_bias(
    fire_ptr, fire_lines, normalizer, start_n, query_pos, FIRE_WIDTH: tl.constexpr, BLOCK_N: tl.constexpr
):
    """FIRE's log2-scaled bias of the tile of keys ``[start_n, start_n + BLOCK_N)`` (rows: ``query_pos``):
    ``x = sign * log1p(c |d|) / normalizer`` (the sign of ``d`` when FIRE is bidirectional), its segment the number
    of breakpoints ``< x`` (``torch.bucketize``'s ``right=False``; sorted, ``inf`` never counts), then the head's
    line of that segment (``fire_lines``: slopes then intercepts).

    ``fire_ptr``: FIRE's packed float32 parameters (``attention._fire_parameters`` builds them): ``[c, L, the sign of
    x before the query, breakpoints (W,), then per head: slopes (W + 1,), intercepts (W + 1,)]``, slopes and
    intercepts times log2(e) (the scores are in base 2)."""
    distance = (start_n + tl.arange(0, BLOCK_N))[None, :] - query_pos[:, None]
    c = tl.load(fire_ptr)
    sign_before = tl.load(fire_ptr + 2)  # the sign of x for keys before the query: -1 bidirectional, else 1
    x = _log1p(c * tl.abs(distance).to(tl.float32)) / normalizer[:, None]
    x = tl.where(distance < 0, x * sign_before, x)
    segment = tl.zeros([query_pos.shape[0], BLOCK_N], dtype=tl.int32)
    for k in tl.static_range(FIRE_WIDTH):
        segment += (tl.load(fire_ptr + 3 + k) < x).to(tl.int32)
    return tl.load(fire_lines + segment) * x + tl.load(fire_lines + (FIRE_WIDTH + 1) + segment)


def prefetch_band_bias() -> bool:
    """Whether the band loops gather the next tile's bias ahead (the PREFETCH_BIAS constexpr of the kernels).

    On by default: on an H100 (bf16, D=64, 64x64 tiles, same process) it beat the in-loop gather at every length
    measured, L=512 to 4096, forward (-24% at L=512, -6% at 4096) and forward+backward (-13% at 512, -3% at 4096).
    ``FAT5_ATTENTION_PREFETCH=0`` turns it off (for comparisons).
    """
    return os.environ.get("FAT5_ATTENTION_PREFETCH", "1") != "0"


@triton.jit
def _mask2d(rows_ok, cols_ok, EVEN_HEAD_DIM: tl.constexpr):
    """Mask of a (rows, head_dim) tile. Without the head_dim part when it is a power of two: a mask that may
    vary along the contiguous axis forbids vectorized (16-byte) loads."""
    if EVEN_HEAD_DIM:
        return rows_ok
    else:
        return rows_ok & cols_ok


@triton.jit
def _key_ranges(first_row, seqlen_q, seqlen_k, band_radius, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_key_ranges_at` of query rows ``[first_row, first_row + BLOCK_M)`` aligned to the end of the keys (row i
    at key position i + N - M)."""
    return _key_ranges_at(first_row + seqlen_k - seqlen_q, seqlen_k, band_radius, IS_CAUSAL, BLOCK_M, BLOCK_N)


@triton.jit
def _key_ranges_at(
    first_query, seqlen_k, band_radius, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Split the keys seen by the queries at key positions ``[first_query, first_query + BLOCK_M)`` into loop ranges.

    Returns ``far_left_end, band_unmasked_end, band_end, full_end, key_end`` (multiples of BLOCK_N except
    ``key_end``): ``[0, far_left_end)`` has every distance ``<= -band_radius`` (all keys valid, no mask),
    ``[far_left_end, band_end)`` is the band (per-element bias), whose tiles before ``band_unmasked_end`` need no
    mask (whole tiles of valid keys, and with causal every key at or before the block's first query; on short
    sequences most tiles are band tiles), ``[band_end, full_end)`` has every distance ``>= band_radius`` and
    full tiles, ``[full_end, key_end)`` is the partial last tile (masked).
    """
    last_query = first_query + BLOCK_M - 1
    key_end = seqlen_k
    if IS_CAUSAL:
        key_end = tl.maximum(tl.minimum(seqlen_k, last_query + 1), 0)
    far_left_end = tl.minimum((tl.maximum(first_query - band_radius + 1, 0) // BLOCK_N) * BLOCK_N, key_end)
    far_right_start = tl.cdiv(tl.maximum(last_query + band_radius, 0), BLOCK_N) * BLOCK_N
    band_end = tl.maximum(tl.minimum(far_right_start, key_end), far_left_end)
    full_end = tl.maximum(tl.minimum((seqlen_k // BLOCK_N) * BLOCK_N, key_end), band_end)
    unmasked_end = (seqlen_k // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        unmasked_end = tl.minimum(unmasked_end, (tl.maximum(first_query + 1, 0) // BLOCK_N) * BLOCK_N)
    band_unmasked_end = tl.minimum(tl.maximum(unmasked_end, far_left_end), band_end)
    return far_left_end, band_unmasked_end, band_end, full_end, key_end


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    key_mask_ptr,
    band_bias,
    start_n,
    query_pos,
    seqlen_k,
    stride_kn,
    stride_vn,
    qk_scale_log2,
    alibi_slope_log2,
    bias_far_left,
    bias_far_right,
    head_dim,
    BIAS_KIND: tl.constexpr,
    REGION: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    EVEN_HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of one query block with the key tile at ``start_n``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    key_pos = start_n + offs_n
    if MASKED:
        k = tl.load(
            k_ptrs + start_n * stride_kn,
            mask=_mask2d(key_pos[None, :] < seqlen_k, offs_d[:, None] < head_dim, EVEN_HEAD_DIM),
            other=0.0,
        )
        v = tl.load(
            v_ptrs + start_n * stride_vn,
            mask=_mask2d(key_pos[:, None] < seqlen_k, offs_d[None, :] < head_dim, EVEN_HEAD_DIM),
            other=0.0,
        )
    elif EVEN_HEAD_DIM:
        k = tl.load(k_ptrs + start_n * stride_kn)
        v = tl.load(v_ptrs + start_n * stride_vn)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=offs_d[:, None] < head_dim, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=offs_d[None, :] < head_dim, other=0.0)
    scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2
    distance = key_pos[None, :] - query_pos[:, None]
    scores = _tile_bias(
        scores, distance, band_bias, alibi_slope_log2, bias_far_left, bias_far_right, BIAS_KIND, REGION
    )
    if MASKED:
        allowed = key_pos[None, :] < seqlen_k
        if IS_CAUSAL:
            allowed = allowed & (distance <= 0)
        scores = tl.where(allowed, scores, float("-inf"))
    if HAS_KEY_MASK:
        keep = tl.load(key_mask_ptr + key_pos, mask=key_pos < seqlen_k, other=0)
        scores = tl.where(keep[None, :] != 0, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # rows with every key masked so far keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_tile_loop(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    key_mask_ptr,
    dist_bias_ptr,
    fire_ptr,
    fire_lines,
    fire_normalizer,
    lo,
    hi,
    query_pos,
    seqlen_k,
    stride_kn,
    stride_vn,
    qk_scale_log2,
    alibi_slope_log2,
    bias_far_left,
    bias_far_right,
    head_dim,
    BIAS_KIND: tl.constexpr,
    REGION: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    EVEN_HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PREFETCH_BIAS: tl.constexpr,
    FIRE_WIDTH: tl.constexpr,
):
    if BIAS_KIND == 1 and REGION == 1 and PREFETCH_BIAS:
        # Band tiles gather their bias per element: the next tile's gather is issued before this tile's work, so
        # that it is in flight during the matmuls instead of stalling the softmax (only here: a loop-carried tile
        # in the other loops would cost registers for nothing).
        next_bias = _band_bias(dist_bias_ptr, lo, query_pos, BIAS_KIND, REGION, BLOCK_N)
        for start_n in tl.range(lo, hi, BLOCK_N):
            band_bias = next_bias
            next_bias = _band_bias(dist_bias_ptr, start_n + BLOCK_N, query_pos, BIAS_KIND, REGION, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, key_mask_ptr, band_bias, start_n, query_pos, seqlen_k, stride_kn,
                stride_vn, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right, head_dim, BIAS_KIND,
                REGION, MASKED, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
    else:
        for start_n in tl.range(lo, hi, BLOCK_N):
            if BIAS_KIND == 3:
                band_bias = _fire_tile_bias(
                    fire_ptr, fire_lines, fire_normalizer, start_n, query_pos, FIRE_WIDTH, BLOCK_N
                )
            else:
                band_bias = _band_bias(dist_bias_ptr, start_n, query_pos, BIAS_KIND, REGION, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, key_mask_ptr, band_bias, start_n, query_pos, seqlen_k, stride_kn,
                stride_vn, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right, head_dim, BIAS_KIND,
                REGION, MASKED, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
    return acc, l_i, m_i


def _fwd_configs() -> list:
    # (BLOCK_M, BLOCK_N, num_warps, num_stages). The first is the default (interpreter, FAT5_ATTENTION_AUTOTUNE=0) and
    # fits Ampere-class shared memory (A100, A10G). Key tiles of 32 beat 64 on an H100 (bf16, B*L = 16k, H=12, same
    # process): D=64, L=1024: 225 us vs 240 (64x64/4/3), flash without bias 191; and at L=512-1024, D=64 and 128,
    # causal or not, no other shape won (32-row tiles, 64x16, 128x32, 2 or 4 warps, 2 or 4 stages). The
    # benchmark's forward went from 195 to 234 TF/s at L=1024 and from 245 to 306 at L=4096 over the earlier
    # 64x64/4/2 default: finer tiles waste fewer keys at the band's edges.
    shapes = [(64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _fwd_wide_head_configs() -> list:
    # head dims above 128 (see WIDE_HEAD_DIM): 68 and 52 KiB of shared memory at D=256 on sm_86
    shapes = [(64, 32, 4, 2), (32, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _fwd_narrow_head_configs() -> list:
    # head dims up to 64 (see NARROW_HEAD_DIM): the default tile with a register cap first. Uncapped, the causal
    # forward takes 130 registers a thread at D=64 (sm_90), 3 programs of 4 warps a multiprocessor; capped at 128,
    # 4 programs; at 96, 5 (no spills bidirectional, a few in the causal forward). Kernel time, H200, bf16, B=64,
    # H=8, L=512, D=64: bidirectional 147 us uncapped, 147 at 128, 142 at 96; causal 123, 112, 119.
    capped = [(64, 32, 4, 3, 128), (64, 32, 4, 3, 96)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=r) for bm, bn, w, s, r in capped
    ] + _fwd_configs()


@triton.autotune(
    configs=tuning_configs(_fwd_configs(), _fwd_wide_head_configs(), _fwd_narrow_head_configs()),
    key=["HEAD_DIM_PAD", "BIAS_KIND", "IS_CAUSAL", "IS_VARLEN", "HAS_KEY_MASK", "HAS_QUERY_OFFSET", "SEQLEN_KEY"],
    prune_configs_by={"early_config_prune": by_head_dim},
)
@triton.jit
def _t5_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    DistBias,
    AlibiSlopes,
    FireParams,
    KeyMask,
    CuSeqlensQ,
    CuSeqlensK,
    QueryOffset,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_lb,
    stride_lh,
    stride_maskb,
    stride_offsetb,
    num_heads,
    seqlen_q,
    seqlen_k,
    head_dim,
    qk_scale_log2,
    radius,
    dist_center,
    SEQLEN_KEY,
    BIAS_KIND: tl.constexpr,
    FIRE_WIDTH: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_QUERY_OFFSET: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    EVEN_HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PREFETCH_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + off_b)
        seqlen_q = tl.load(CuSeqlensQ + off_b + 1) - q_start
        k_start = tl.load(CuSeqlensK + off_b)
        seqlen_k = tl.load(CuSeqlensK + off_b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
    if start_m * BLOCK_M >= seqlen_q:
        return
    # queries are aligned to the end of the keys (position i + N - M), as with a dynamic KV cache
    query_shift = seqlen_k - seqlen_q
    if HAS_QUERY_OFFSET:
        # A static KV cache: query i sits at position past + i (past read here, so that a compiled decoding step
        # neither recompiles nor syncs as the cache fills), and the slots from past + M on are unfilled: the key
        # length becomes past + M, so they are never read. past is clamped to [0, N - M] (no read out of bounds).
        past = tl.load(QueryOffset + off_b * stride_offsetb).to(tl.int32)
        query_shift = tl.minimum(tl.maximum(past, 0), tl.maximum(seqlen_k - seqlen_q, 0))
        seqlen_k = tl.minimum(seqlen_k, query_shift + seqlen_q)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    query_pos = offs_m + query_shift

    b64 = off_b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + off_h * stride_qh + (q_start + offs_m)[:, None].to(tl.int64) * stride_qm
    q_mask = _mask2d(offs_m[:, None] < seqlen_q, offs_d[None, :] < head_dim, EVEN_HEAD_DIM)
    q = tl.load(q_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    # K^T tile pointers (HEAD_DIM_PAD, BLOCK_N) and V tile pointers (BLOCK_N, HEAD_DIM_PAD)
    k_rows = (k_start + offs_n).to(tl.int64)
    k_ptrs = K + b64 * stride_kb + off_h * stride_kh + k_rows[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + b64 * stride_vb + off_h * stride_vh + k_rows[:, None] * stride_vn + offs_d[None, :]
    key_mask_ptr = KeyMask + b64 * stride_maskb
    dist_bias_ptr = DistBias + off_h * (4 * dist_center + 2) + 2 * dist_center  # the pair at distance 0

    alibi_slope_log2 = 0.0
    bias_far_left = 0.0
    bias_far_right = 0.0
    if BIAS_KIND == 2:
        alibi_slope_log2 = tl.load(AlibiSlopes + off_h).to(tl.float32) * 1.4426950408889634
    fire_lines = FireParams + 3 + FIRE_WIDTH + off_h * (2 * FIRE_WIDTH + 2)  # the head's slopes, then intercepts
    fire_normalizer = 0.0
    if BIAS_KIND == 1:
        bias_far_left = tl.load(dist_bias_ptr - 2 * radius)
        bias_far_right = tl.load(dist_bias_ptr + 2 * radius)
        band_radius = radius
    elif BIAS_KIND == 3:
        fire_normalizer = _fire_normalizer(FireParams, query_pos)
        band_radius = seqlen_k + BLOCK_M  # FIRE depends on the query position too: every tile is a band tile
    else:
        band_radius = 1

    far_left_end, band_unmasked_end, band_end, full_end, key_end = _key_ranges_at(
        start_m * BLOCK_M + query_shift, seqlen_k, band_radius, IS_CAUSAL, BLOCK_M, BLOCK_N
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tile_loop(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, FireParams, fire_lines, fire_normalizer, 0,
        far_left_end, query_pos, seqlen_k,
        stride_kn, stride_vn, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right, head_dim,
        BIAS_KIND, 0, False, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tile_loop(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, FireParams, fire_lines, fire_normalizer,
        far_left_end, band_unmasked_end, query_pos,
        seqlen_k, stride_kn, stride_vn, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
        head_dim, BIAS_KIND, 1, False, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tile_loop(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, FireParams, fire_lines, fire_normalizer,
        band_unmasked_end, band_end, query_pos,
        seqlen_k, stride_kn, stride_vn, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
        head_dim, BIAS_KIND, 1, True, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tile_loop(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, FireParams, fire_lines, fire_normalizer,
        band_end, full_end, query_pos, seqlen_k,
        stride_kn, stride_vn, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right, head_dim,
        BIAS_KIND, 2, False, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tile_loop(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, FireParams, fire_lines, fire_normalizer,
        full_end, key_end, query_pos, seqlen_k,
        stride_kn, stride_vn, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right, head_dim,
        BIAS_KIND, 2, True, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH,
    )  # fmt: skip

    # rows without any allowed key: output 0 and lse = +inf (so the backward's exp(s - lse) is 0)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = Out + b64 * stride_ob + off_h * stride_oh + (q_start + offs_m)[:, None].to(tl.int64) * stride_om
    tl.store(
        o_ptrs + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=q_mask,
    )
    tl.store(Lse + b64 * stride_lb + off_h * stride_lh + q_start + offs_m, lse, mask=offs_m < seqlen_q)


_TUNED_CONFIGS: dict = {}
_DUMMIES: dict = {}
_LAUNCHES = CompiledLaunches()


def launch_tuned(kernel, grid, args: tuple, kwargs: dict, key: tuple) -> None:
    """Run an autotuned kernel; once it has been tuned for ``key``, launch the chosen config's binary directly
    (`CompiledLaunches`), without the autotuner's and ``JITFunction.run``'s per-call Python work.

    ``args``: the kernel's runtime arguments in order; ``kwargs``: its other constexprs; ``key`` must hold
    everything the autotuner's key holds.
    """
    tuned = _TUNED_CONFIGS.get(key)
    if tuned is not None:
        _LAUNCHES.launch(kernel.fn, grid, args, *tuned, key)
        return
    kernel[grid](*args, **kwargs)
    config = getattr(kernel, "best_config", None)
    if config is not None:  # the chosen config as the kernel's constexprs and launch options
        options = {name: value for name, value in config.all_kwargs().items() if name not in config.kwargs}
        _TUNED_CONFIGS[key] = ({**kwargs, **config.kwargs}, options)


def dummy_tensor(device: torch.device) -> torch.Tensor:
    """A small fp32 tensor for pointer arguments that the constexpr flags never read (cached per device)."""
    dummy = _DUMMIES.get(device)
    if dummy is None:
        dummy = _DUMMIES[device] = outside_cuda_graph_pools(
            lambda: torch.zeros(2, device=device), torch.device(device)
        )
    return dummy


def seqlen_autotune_key(max_seqlen: int) -> int:
    """Autotune bucket of a sequence length: the next power of two (re-tune once per bucket, not per length)."""
    return 1 << max(0, int(max_seqlen - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests, debugging) get exact fp32 products; half types use the tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def t5_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dist_bias: torch.Tensor | None,
    radius: int,
    dist_center: int,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    query_offset: torch.Tensor | None = None,
    fire_params: torch.Tensor | None = None,
    fire_width: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on validated inputs.

    Dense layout: q (B, H, M, D), k/v (B, H, N, D) -> out (B, H, M, D), lse float32 (B, H, M).
    Packed layout (``cu_seqlens_q`` given): q (total_q, H, D), k/v (total_k, H, D) -> out (total_q, H, D),
    lse float32 (H, total_q). ``dist_bias`` is float32 (H, 2*dist_center+1, 2): pairs (bias of distance ``d``, bias
    of ``d + 1``) times log2(e) at ``d + dist_center`` (saturated beyond +-radius); it must cover every distance
    the inputs have (``dist_center >= max(M, N) + 256``): the kernels index it without clamping.
    ``query_offset`` (dense layout only): integer (1,) or (B,) tensor ``past`` on q's device, read by the kernel:
    query ``i`` sits at position ``past + i`` and the keys from ``past + M`` on are unfilled static-cache slots,
    never read (``past`` is clamped to ``[0, N - M]``). Without it, queries are aligned to the end of the keys.
    ``fire_params`` (instead of ``dist_bias`` / ``alibi_slopes``): FIRE's packed float32 parameters of width
    ``fire_width`` (layout in `_fire_tile_bias`), evaluated per element (``attention._fire_parameters`` builds them).
    """
    is_varlen = cu_seqlens_q is not None
    head_dim = q.shape[-1]
    head_dim_pad = max(16, next_power_of_2(head_dim))
    out = torch.empty_like(q)
    if is_varlen:
        total_q, num_heads, _ = q.shape
        batch = cu_seqlens_q.numel() - 1
        lse = torch.empty(num_heads, total_q, device=q.device, dtype=torch.float32)
        q_strides = (0, q.stride(1), q.stride(0))
        k_strides = (0, k.stride(1), k.stride(0))
        v_strides = (0, v.stride(1), v.stride(0))
        o_strides = (0, out.stride(1), out.stride(0))
        lse_strides = (0, lse.stride(0))
    else:
        batch, num_heads = q.shape[:2]
        lse = torch.empty(batch, num_heads, q.shape[2], device=q.device, dtype=torch.float32)
        q_strides, k_strides, v_strides, o_strides = (t.stride()[:3] for t in (q, k, v, out))
        lse_strides = lse.stride()[:2]
    if out.numel() == 0:  # no query rows (or no batch): nothing to launch
        return out, lse
    if dist_bias is not None:
        bias_kind = BIAS_T5
    elif fire_params is not None:
        bias_kind = BIAS_FIRE
    elif alibi_slopes is not None:
        bias_kind = BIAS_ALIBI
    else:
        bias_kind = BIAS_NONE
    dummy = dummy_tensor(q.device)  # never read: the constexpr flags disable the loads
    grid = lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * num_heads)
    seqlen_key = seqlen_autotune_key(max(max_seqlen_q, max_seqlen_k))
    has_key_mask = key_padding_mask is not None
    has_query_offset = query_offset is not None
    args = (
        q, k, v, out, lse,
        dist_bias if dist_bias is not None else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        fire_params if fire_params is not None else dummy,
        key_padding_mask if has_key_mask else dummy,
        cu_seqlens_q if is_varlen else dummy,
        cu_seqlens_k if is_varlen else dummy,
        query_offset if has_query_offset else dummy,
        *q_strides, *k_strides, *v_strides, *o_strides, *lse_strides,
        key_padding_mask.stride(0) if has_key_mask else 0,
        query_offset.stride(0) if has_query_offset and query_offset.numel() > 1 else 0,  # one offset for all rows: 0
        num_heads, max_seqlen_q, max_seqlen_k, head_dim, softmax_scale * LOG2E, radius, dist_center, seqlen_key,
    )  # fmt: skip
    kwargs = dict(
        PREFETCH_BIAS=prefetch_band_bias(),
        BIAS_KIND=bias_kind, FIRE_WIDTH=fire_width if fire_params is not None else 0,
        IS_CAUSAL=causal, HAS_KEY_MASK=has_key_mask, IS_VARLEN=is_varlen,
        HAS_QUERY_OFFSET=has_query_offset,
        HEAD_DIM_PAD=head_dim_pad, EVEN_HEAD_DIM=head_dim == head_dim_pad, DOT_PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    key = ("fwd", q.device, q.dtype, seqlen_key, *kwargs.values())
    launch_tuned(_t5_attn_fwd_kernel, grid, args, kwargs, key)
    return out, lse


__all__ = ["LN2", "LOG2E", "t5_attention_forward"]
