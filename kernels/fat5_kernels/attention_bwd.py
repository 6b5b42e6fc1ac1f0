"""Backward Triton kernels of flash attention with an in-kernel T5 relative-position bias.

Two launches, FlashAttention-2 style, both deterministic:

1. ``_bwd_dq_kernel``: one program per (query block, batch, head) computes its rows' ``delta = rowsum(dO * O)``
   (fp32), stores it for the next launch, and walks the keys for dQ. (FlashAttention computes delta in a launch
   of its own; here the dQ programs, which read their dO rows anyway, do it: one launch and one pass over dO less.)
2. ``_bwd_dkdv_kernel``: one program per (key block, batch, head) walks the query blocks and accumulates
   dK and dV in registers, plus this program's share of the bias-table gradient:
   * tiles with every distance ``<= -R`` (or ``>= R``) lie in one bucket: only their sum of dS is kept;
   * band tiles take a reversed cumulative sum of dS along the query axis (a matmul with a triangular matrix
     of ones), then one ``tl.gather`` per (key row, cut) reads "sum of dS over distances <= cut" for every
     bucket boundary ("cut") at once.
   Each program writes these few numbers to its own slot of a small fp32 buffer
   ``(H, num_cuts_padded + 2, key_blocks * B)``; a small kernel (`bias_sums_to_table_grad`) reduces and
   differences them in a fixed order.
   No atomics, no (L, L) tensor: the table gradient costs O(L / BLOCK_N * buckets) memory.
   With FIRE evaluated per element (``BIAS_KIND == 3``), both kernels evaluate it per tile as the forward does, and
   the dK/dV programs sum, per segment of FIRE's piecewise-linear MLP, dS and dS * x, plus the chain-rule sums of its
   ``|distance_scale|`` and ``|threshold|`` (`_fire_tile_sums`), into the same kind of per-program buffer, reduced
   by `fire_sums_to_params_grad`: deterministic too.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # triton is optional; fat5_hf falls back to PyTorch without it
    raise ImportError("fat5_kernels.attention_bwd needs triton: pip install 'fat5-hf[gpu]'") from err

from .attention_fwd import (
    BIAS_ALIBI,
    BIAS_FIRE,
    BIAS_NONE,
    BIAS_T5,
    LN2,
    _band_bias,
    _fire_normalizer,
    _fire_tile_bias,
    _key_ranges,
    _log1p,
    _mask2d,
    _tile_bias,
    by_head_dim,
    dot_precision,
    dummy_tensor,
    gather_distance_pairs,
    launch_tuned,
    prefetch_band_bias,
    seqlen_autotune_key,
    tuning_configs,
)
from .triton_utils import cdiv, launch, next_power_of_2


@triton.jit
def _dkdv_tile(
    dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums,
    k, v, key_pos, key_keep,
    q_ptrs, do_ptrs, lse_ptr, delta_ptr, band_bias, cuts, fire_ptr, fire_lines,
    start_m, seqlen_q, seqlen_k, stride_qm, stride_dom, head_dim,
    qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
    BIAS_KIND: tl.constexpr, REGION: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    EVEN_HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FIRE_WIDTH: tl.constexpr, FIRE_SUMS: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV (and the bias sums, or FIRE's) of one key block with the query tile at ``start_m``.

    Works on transposed tiles: rows are this program's keys, columns the queries.
    """
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    query_shift = seqlen_k - seqlen_q  # query i sits at key position i + N - M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if MASKED:
        q_t = tl.load(
            q_ptrs + start_m * stride_qm,
            mask=_mask2d(offs_m[None, :] < seqlen_q, offs_d[:, None] < head_dim, EVEN_HEAD_DIM),
            other=0.0,
        )
        do = tl.load(
            do_ptrs + start_m * stride_dom,
            mask=_mask2d(offs_m[:, None] < seqlen_q, offs_d[None, :] < head_dim, EVEN_HEAD_DIM),
            other=0.0,
        )
    elif EVEN_HEAD_DIM:
        q_t = tl.load(q_ptrs + start_m * stride_qm)
        do = tl.load(do_ptrs + start_m * stride_dom)
    else:
        q_t = tl.load(q_ptrs + start_m * stride_qm, mask=offs_d[:, None] < head_dim, other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dom, mask=offs_d[None, :] < head_dim, other=0.0)
    # padded query rows get lse = +inf, hence p = 0 and dS = 0
    lse_log2 = tl.load(lse_ptr + offs_m, mask=offs_m < seqlen_q, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + offs_m, mask=offs_m < seqlen_q, other=0.0)
    scores_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale_log2  # (BLOCK_N, BLOCK_M)
    distance = key_pos[:, None] - (offs_m + query_shift)[None, :]
    if BIAS_KIND == 3:
        # FIRE per element, as `attention_fwd._fire_tile_bias` on the transposed tile, keeping x and its segment
        # for the parameters' gradient
        query_pos = (offs_m + query_shift).to(tl.float32)
        fire_c = tl.load(fire_ptr)
        fire_threshold = tl.load(fire_ptr + 1)
        reach = tl.maximum(tl.maximum(query_pos, fire_threshold), 1.0)
        normalizer = _log1p(fire_c * reach)
        abs_distance = tl.abs(distance).to(tl.float32)
        x_sign = tl.where(distance < 0, tl.load(fire_ptr + 2), 1.0)
        fire_x = x_sign * _log1p(fire_c * abs_distance) / normalizer[None, :]
        segment = tl.zeros([key_pos.shape[0], BLOCK_M], dtype=tl.int32)
        for s in tl.static_range(FIRE_WIDTH):
            segment += (tl.load(fire_ptr + 3 + s) < fire_x).to(tl.int32)
        slope_log2 = tl.load(fire_lines + segment)
        band_bias = slope_log2 * fire_x + tl.load(fire_lines + (FIRE_WIDTH + 1) + segment)
    scores_t = _tile_bias(
        scores_t, distance, band_bias, alibi_slope_log2, bias_far_left, bias_far_right, BIAS_KIND, REGION
    )
    p_t = tl.math.exp2(scores_t - lse_log2[None, :])
    if MASKED:
        allowed = key_pos[:, None] < seqlen_k
        if IS_CAUSAL:
            allowed = allowed & (distance <= 0)
        p_t = tl.where(allowed, p_t, 0.0)
    if HAS_KEY_MASK:
        p_t = tl.where(key_keep[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])  # gradient of the natural-log logits
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    if BIAS_KIND == 3:
        fire_sums = _fire_tile_sums(
            fire_sums, ds_t, fire_x, x_sign, segment, slope_log2, abs_distance, query_pos, fire_c, fire_threshold,
            reach, normalizer, FIRE_WIDTH, FIRE_SUMS,
        )  # fmt: skip
    if COMPUTE_DBIAS:
        if REGION == 0:
            far_left_rows += tl.sum(ds_t, axis=1)
        elif REGION == 2:
            far_right_rows += tl.sum(ds_t, axis=1)
        else:
            # sum over {d <= cut} of dS, for every cut at once: along a key row the distance falls as
            # the query index grows, so {d <= cut} is a suffix of the row starting at column
            # key - cut - first_query_position; read it from the reversed cumulative sum. That sum is a product
            # with an upper-triangular matrix of ones, on the tensor cores: on an H100 it cut the table
            # gradient's cost in this kernel by 58% against `tl.cumsum` (bf16, B=64, H=8, L=512, D=64: 447 ->
            # 354 us bidirectional, 325 -> 250 causal). For half inputs dS is rounded to TF32 there (2^-11
            # relative, finer than the bf16 rounding of dS that feeds dK).
            cols = tl.arange(0, BLOCK_M)
            suffix_ones = (cols[:, None] >= cols[None, :]).to(tl.float32)  # [i', i] = 1 where i' >= i
            suffix_sums = tl.dot(ds_t, suffix_ones, input_precision=DOT_PRECISION)
            first_col = key_pos[:, None] - cuts[None, :] - (start_m + query_shift)
            col = tl.minimum(tl.maximum(first_col, 0), BLOCK_M - 1)
            picked = tl.gather(suffix_sums, col, axis=1)
            picked = tl.where(first_col >= BLOCK_M, 0.0, picked)
            band_cut_sums += tl.sum(picked, axis=0)
    return dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums


@triton.jit
def _fire_tile_sums(
    fire_sums, ds, x, x_sign, segment, slope_log2, abs_distance, query_pos, c, threshold, reach, normalizer,
    FIRE_WIDTH: tl.constexpr, FIRE_SUMS: tl.constexpr,
):  # fmt: skip
    """Add a transposed tile's share of FIRE's parameter gradients to ``fire_sums`` (float32 ``(FIRE_SUMS,)``):
    per segment ``s`` the sum of dS at ``[s]`` and of dS * x at ``[W + 1 + s]``, then the sums of dL/dx * dx/dc at
    ``[2W + 2]`` and dL/dx * dx/dL at ``[2W + 3]`` (``c``, ``L``: FIRE's ``|distance_scale|``, ``|threshold|``).

    ``x = sign * log1p(c |d|) / log1p(c R)``, ``R = max(i, L, 1)``: ``dx/dc = (sign |d| / (1 + c |d|) - x R / (1 + c
    R)) / log1p(c R)``, ``dx/dR = -x c / ((1 + c R) log1p(c R))`` and ``dR/dL`` as torch's ``maximum`` then
    ``clamp_min`` give it (1 where ``L > i``, 1/2 where ``L == i``, 0 once ``max(i, L) < 1``), so that the
    gradients equal those of the materialized bias. dS is the gradient of the natural-log bias; slopes are
    log2-scaled, hence ``ln 2``."""
    dx = ds * (slope_log2 * LN2)
    growth = 1.0 + c * reach
    dx_dc = (x_sign * abs_distance / (1.0 + c * abs_distance) - x * (reach / growth)[None, :]) / normalizer[None, :]
    dx_dreach = -x * (c / (growth * normalizer))[None, :]
    dreach_dl = tl.where(threshold > query_pos, 1.0, tl.where(threshold == query_pos, 0.5, 0.0))
    dreach_dl = tl.where(tl.maximum(query_pos, threshold) >= 1.0, dreach_dl, 0.0)
    grad_c = tl.sum(tl.sum(dx * dx_dc, axis=1), axis=0)
    grad_l = tl.sum(tl.sum(dx * dx_dreach, axis=0) * dreach_dl, axis=0)
    slots = tl.arange(0, FIRE_SUMS)
    ds_x = ds * x
    # one masked reduction per segment (W + 1 <= 65): simple, and only FIRE's kernels carry it
    for s in tl.static_range(FIRE_WIDTH + 1):
        in_segment = segment == s
        ds_sum = tl.sum(tl.sum(tl.where(in_segment, ds, 0.0), axis=1), axis=0)
        ds_x_sum = tl.sum(tl.sum(tl.where(in_segment, ds_x, 0.0), axis=1), axis=0)
        fire_sums += tl.where(slots == s, ds_sum, 0.0) + tl.where(slots == FIRE_WIDTH + 1 + s, ds_x_sum, 0.0)
    fire_sums += tl.where(slots == 2 * FIRE_WIDTH + 2, grad_c, 0.0) + tl.where(slots == 2 * FIRE_WIDTH + 3, grad_l, 0.0)
    return fire_sums


@triton.jit
def _band_bias_t(dist_bias_ptr, key_pos, first_query_pos, BLOCK_M: tl.constexpr):
    """T5 bias of a transposed band tile: rows ``key_pos``, columns the queries at positions
    ``[first_query_pos, first_query_pos + BLOCK_M)``."""
    # the distance falls along the queries: the pair before an even query's distance holds the odd query's bias
    even_queries = first_query_pos + 2 * tl.arange(0, BLOCK_M // 2)
    at_odd, at_even = gather_distance_pairs(dist_bias_ptr, key_pos[:, None] - even_queries[None, :] - 1)
    return tl.reshape(tl.join(at_even, at_odd), [key_pos.shape[0], BLOCK_M])


@triton.jit
def _dkdv_tile_loop(
    dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums,
    k, v, key_pos, key_keep,
    q_ptrs, do_ptrs, lse_ptr, delta_ptr, dist_bias_ptr, cuts, fire_ptr, fire_lines,
    lo, hi, seqlen_q, seqlen_k, stride_qm, stride_dom, head_dim,
    qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
    BIAS_KIND: tl.constexpr, REGION: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    EVEN_HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PREFETCH_BIAS: tl.constexpr, FIRE_WIDTH: tl.constexpr, FIRE_SUMS: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV (and the bias sums, or FIRE's) of one key block over query blocks ``[lo, hi)``."""
    if BIAS_KIND == 1 and REGION == 1 and PREFETCH_BIAS:
        # band: the next tile's bias gather is issued before this tile's work (see `_fwd_tile_loop`)
        next_bias = _band_bias_t(dist_bias_ptr, key_pos, lo + seqlen_k - seqlen_q, BLOCK_M)
        for start_m in tl.range(lo, hi, BLOCK_M):
            band_bias = next_bias
            next_bias = _band_bias_t(dist_bias_ptr, key_pos, start_m + BLOCK_M + seqlen_k - seqlen_q, BLOCK_M)
            dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums = _dkdv_tile(
                dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums, k, v, key_pos, key_keep, q_ptrs,
                do_ptrs, lse_ptr, delta_ptr, band_bias, cuts, fire_ptr, fire_lines, start_m, seqlen_q, seqlen_k,
                stride_qm, stride_dom, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
                BIAS_KIND, REGION, MASKED, IS_CAUSAL, HAS_KEY_MASK, COMPUTE_DBIAS, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_M,
                DOT_PRECISION, FIRE_WIDTH, FIRE_SUMS,
            )  # fmt: skip
    else:
        for start_m in tl.range(lo, hi, BLOCK_M):
            band_bias = 0.0
            if BIAS_KIND == 1 and REGION == 1:
                band_bias = _band_bias_t(dist_bias_ptr, key_pos, start_m + seqlen_k - seqlen_q, BLOCK_M)
            dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums = _dkdv_tile(
                dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums, k, v, key_pos, key_keep, q_ptrs,
                do_ptrs, lse_ptr, delta_ptr, band_bias, cuts, fire_ptr, fire_lines, start_m, seqlen_q, seqlen_k,
                stride_qm, stride_dom, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
                BIAS_KIND, REGION, MASKED, IS_CAUSAL, HAS_KEY_MASK, COMPUTE_DBIAS, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_M,
                DOT_PRECISION, FIRE_WIDTH, FIRE_SUMS,
            )  # fmt: skip
    return dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums


def _dkdv_configs() -> list:
    # (BLOCK_N keys per program, BLOCK_M queries per step, warps, stages); the first is the default. H100 (bf16,
    # D=64, B*L = 16k, H=12, same process, in an experimental variant of these kernels): 64x32/4/3 won at L=1024
    # (fwd+bwd 1087 vs 1121 us with 64x64/4/2, causal 775 vs 819), 64x64/4/2 at L=4096 (3204 vs 3254); 128x32/4/3
    # won some earlier autotunes; 128x64 with 8 warps and 16-query steps lost everywhere. With these defaults the
    # benchmark's fwd+bwd at L=1024 went from 160 to 185 TF/s, causal from 81 to 130.
    shapes = [(64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s) for bn, bm, w, s in shapes]


DKDV_MIN_BLOCK_N = 64  # smallest BLOCK_N of _dkdv_configs: sizes the bias partial-sum buffer


def _dkdv_wide_head_configs() -> list:
    # head dims above 128 (see attention_fwd.WIDE_HEAD_DIM): 84 KiB of shared memory at D=256 on sm_86. BLOCK_N
    # stays at DKDV_MIN_BLOCK_N; 64x32/4/2 would need 100 KiB there.
    return [triton.Config({"BLOCK_N": 64, "BLOCK_M": 16}, num_warps=4, num_stages=2)]


def _dkdv_narrow_head_configs() -> list:
    # head dims up to 64 (see attention_fwd.NARROW_HEAD_DIM): uncapped, 64x32/4/3 takes 166 (bidirectional) or 190
    # (causal) registers a thread at D=64 (sm_90): 3 or 2 programs a multiprocessor; capped at 168, 3 without
    # spills. Kernel time, H200, bf16, B=64, H=8, L=512, D=64 (bidirectional / causal): 282 / 237 us uncapped,
    # 283 / 206 capped, 279 / 194 capped with 2 stages; a cap of 128 spills (296 / 224).
    capped = [(64, 32, 4, 2, 168), (64, 32, 4, 3, 168)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s, maxnreg=r) for bn, bm, w, s, r in capped
    ] + _dkdv_configs()


def _prune_bwd_configs(configs, named_args, **kwargs):
    configs = by_head_dim(configs, named_args, **kwargs)
    head_dim_pad = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD", 64))
    if head_dim_pad <= 64:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] <= 128 * 64 and c.num_stages <= 2]
    return kept or configs[:1]


@triton.autotune(
    configs=tuning_configs(_dkdv_configs(), _dkdv_wide_head_configs(), _dkdv_narrow_head_configs()),
    key=["HEAD_DIM_PAD", "BIAS_KIND", "IS_CAUSAL", "IS_VARLEN", "HAS_KEY_MASK", "COMPUTE_DBIAS", "SEQLEN_KEY"],
    prune_configs_by={"early_config_prune": _prune_bwd_configs},
    # configs with a larger BLOCK_N fill fewer slots: stale sums from other configs' trial runs must not remain
    # (BiasPartials is a dedicated dummy, never an input, when there is no table gradient)
    reset_to_zero=["BiasPartials"],
)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta,
    DistBias, AlibiSlopes, FireParams, KeyMask, CuSeqlensQ, CuSeqlensK, Cuts, BiasPartials,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_maskb,
    batch, num_heads, seqlen_q, seqlen_k, head_dim, qk_scale_log2, softmax_scale, radius, dist_center, num_partials,
    SEQLEN_KEY,
    BIAS_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr, NUM_CUTS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    EVEN_HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH_BIAS: tl.constexpr,
    FIRE_WIDTH: tl.constexpr, FIRE_SUMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0)
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
    if start_n * BLOCK_N >= seqlen_k:
        return
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    b64 = off_b.to(tl.int64)
    kv_mask = _mask2d(offs_n[:, None] < seqlen_k, offs_d[None, :] < head_dim, EVEN_HEAD_DIM)
    key_rows = (k_start + offs_n)[:, None].to(tl.int64)
    k = tl.load(K + b64 * stride_kb + off_h * stride_kh + key_rows * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + off_h * stride_vh + key_rows * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    q_rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + off_h * stride_qh + q_rows[None, :] * stride_qm + offs_d[:, None]  # Q^T tile
    do_ptrs = DOut + b64 * stride_dob + off_h * stride_doh + q_rows[:, None] * stride_dom + offs_d[None, :]
    lse_ptr = Lse + b64 * stride_lb + off_h * stride_lh + q_start
    delta_ptr = Delta + b64 * stride_lb + off_h * stride_lh + q_start
    dist_bias_ptr = DistBias + off_h * (4 * dist_center + 2) + 2 * dist_center  # the pair at distance 0
    key_keep = offs_n < seqlen_k
    if HAS_KEY_MASK:
        key_keep = tl.load(KeyMask + b64 * stride_maskb + offs_n, mask=offs_n < seqlen_k, other=0) != 0
    cuts = tl.zeros([NUM_CUTS_PAD], dtype=tl.int32)
    if COMPUTE_DBIAS:
        cuts = tl.load(Cuts + tl.arange(0, NUM_CUTS_PAD))

    alibi_slope_log2 = 0.0
    bias_far_left = 0.0
    bias_far_right = 0.0
    if BIAS_KIND == 2:
        alibi_slope_log2 = tl.load(AlibiSlopes + off_h).to(tl.float32) * 1.4426950408889634
    if BIAS_KIND == 1:
        bias_far_left = tl.load(dist_bias_ptr - 2 * radius)
        bias_far_right = tl.load(dist_bias_ptr + 2 * radius)
        band_radius = radius
    else:
        band_radius = 1

    # query ranges, in query order: far right (every d >= R: queries well before the keys), band, far left
    query_shift = seqlen_k - seqlen_q
    first_key = start_n * BLOCK_N
    last_key = first_key + BLOCK_N - 1
    query_lo = 0
    if IS_CAUSAL:  # queries at positions < first_key see none of these keys
        query_lo = (tl.maximum(first_key - query_shift, 0) // BLOCK_M) * BLOCK_M
    query_lo = tl.minimum(query_lo, seqlen_q)
    far_right_end = (tl.maximum(first_key - band_radius - query_shift + 1, 0) // BLOCK_M) * BLOCK_M
    far_right_end = tl.minimum(tl.maximum(far_right_end, query_lo), seqlen_q)
    far_left_start = tl.cdiv(tl.maximum(last_key + band_radius - query_shift, 0), BLOCK_M) * BLOCK_M
    band_end = tl.minimum(tl.maximum(far_left_start, far_right_end), seqlen_q)
    if last_key >= seqlen_k:  # partial key block: everything through the masked band path
        far_right_end = query_lo
        band_end = seqlen_q
    full_end = tl.maximum((seqlen_q // BLOCK_M) * BLOCK_M, band_end)

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    band_cut_sums = tl.zeros([NUM_CUTS_PAD], dtype=tl.float32)
    far_left_rows = tl.zeros([BLOCK_N], dtype=tl.float32)
    far_right_rows = tl.zeros([BLOCK_N], dtype=tl.float32)
    fire_sums = tl.zeros([FIRE_SUMS], dtype=tl.float32)
    fire_lines = FireParams + 3 + FIRE_WIDTH + off_h * (2 * FIRE_WIDTH + 2)  # the head's slopes, then intercepts
    dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums = _dkdv_tile_loop(
        dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums, k, v, offs_n, key_keep,
        q_ptrs, do_ptrs, lse_ptr, delta_ptr, dist_bias_ptr, cuts, FireParams, fire_lines, query_lo, far_right_end,
        seqlen_q, seqlen_k, stride_qm, stride_dom, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left,
        bias_far_right,
        BIAS_KIND, 2, False, IS_CAUSAL, HAS_KEY_MASK, COMPUTE_DBIAS, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_M,
        DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH, FIRE_SUMS,
    )  # fmt: skip
    dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums = _dkdv_tile_loop(
        dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums, k, v, offs_n, key_keep,
        q_ptrs, do_ptrs, lse_ptr, delta_ptr, dist_bias_ptr, cuts, FireParams, fire_lines, far_right_end, band_end,
        seqlen_q, seqlen_k, stride_qm, stride_dom, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left,
        bias_far_right,
        BIAS_KIND, 1, True, IS_CAUSAL, HAS_KEY_MASK, COMPUTE_DBIAS, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_M,
        DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH, FIRE_SUMS,
    )  # fmt: skip
    dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums = _dkdv_tile_loop(
        dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums, k, v, offs_n, key_keep,
        q_ptrs, do_ptrs, lse_ptr, delta_ptr, dist_bias_ptr, cuts, FireParams, fire_lines, band_end, full_end,
        seqlen_q, seqlen_k, stride_qm, stride_dom, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left,
        bias_far_right,
        BIAS_KIND, 0, False, IS_CAUSAL, HAS_KEY_MASK, COMPUTE_DBIAS, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_M,
        DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH, FIRE_SUMS,
    )  # fmt: skip
    dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums = _dkdv_tile_loop(
        dk, dv, band_cut_sums, far_left_rows, far_right_rows, fire_sums, k, v, offs_n, key_keep,
        q_ptrs, do_ptrs, lse_ptr, delta_ptr, dist_bias_ptr, cuts, FireParams, fire_lines, full_end, seqlen_q,
        seqlen_q, seqlen_k, stride_qm, stride_dom, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left,
        bias_far_right,
        BIAS_KIND, 0, True, IS_CAUSAL, HAS_KEY_MASK, COMPUTE_DBIAS, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_M,
        DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH, FIRE_SUMS,
    )  # fmt: skip

    dk = dk * softmax_scale
    tl.store(
        DK + b64 * stride_dkb + off_h * stride_dkh + key_rows * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b64 * stride_dvb + off_h * stride_dvh + key_rows * stride_dvn + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )
    if COMPUTE_DBIAS:
        # layout (H, NUM_CUTS_PAD + 2, num_partials): each sum's programs are contiguous, so the host's reduction
        # over them is a fast row sum
        slot = BiasPartials + (off_h * (NUM_CUTS_PAD + 2) * num_partials + start_n * batch + off_b).to(tl.int64)
        tl.store(slot + tl.arange(0, NUM_CUTS_PAD).to(tl.int64) * num_partials, band_cut_sums)
        tl.store(slot + NUM_CUTS_PAD * num_partials, tl.sum(far_left_rows, axis=0))
        tl.store(slot + (NUM_CUTS_PAD + 1) * num_partials, tl.sum(far_right_rows, axis=0))
    if BIAS_KIND == 3:
        # FIRE's sums, same layout: (H, FIRE_SUMS, num_partials)
        slot = BiasPartials + (off_h * FIRE_SUMS * num_partials + start_n * batch + off_b).to(tl.int64)
        tl.store(slot + tl.arange(0, FIRE_SUMS).to(tl.int64) * num_partials, fire_sums)


@triton.jit
def _dq_tile(
    dq, q, do, lse_log2, delta,
    k_ptrs, v_ptrs, key_mask_ptr, band_bias,
    start_n, query_pos, seqlen_k, stride_kn, stride_vn, head_dim,
    qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
    BIAS_KIND: tl.constexpr, REGION: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, EVEN_HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block with the key tile at ``start_n``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    key_pos = start_n + offs_n
    if MASKED:
        kv_mask = _mask2d(key_pos[:, None] < seqlen_k, offs_d[None, :] < head_dim, EVEN_HEAD_DIM)
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
    elif EVEN_HEAD_DIM:
        k = tl.load(k_ptrs + start_n * stride_kn)
        v = tl.load(v_ptrs + start_n * stride_vn)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=offs_d[None, :] < head_dim, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=offs_d[None, :] < head_dim, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    distance = key_pos[None, :] - query_pos[:, None]
    scores = _tile_bias(
        scores, distance, band_bias, alibi_slope_log2, bias_far_left, bias_far_right, BIAS_KIND, REGION
    )
    p = tl.math.exp2(scores - lse_log2[:, None])
    if MASKED:
        allowed = key_pos[None, :] < seqlen_k
        if IS_CAUSAL:
            allowed = allowed & (distance <= 0)
        p = tl.where(allowed, p, 0.0)
    if HAS_KEY_MASK:
        keep = tl.load(key_mask_ptr + key_pos, mask=key_pos < seqlen_k, other=0)
        p = tl.where(keep[None, :] != 0, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_tile_loop(
    dq, q, do, lse_log2, delta,
    k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, fire_ptr, fire_lines, fire_normalizer,
    lo, hi, query_pos, seqlen_k, stride_kn, stride_vn, head_dim,
    qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
    BIAS_KIND: tl.constexpr, REGION: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, EVEN_HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PREFETCH_BIAS: tl.constexpr, FIRE_WIDTH: tl.constexpr,
):  # fmt: skip
    if BIAS_KIND == 1 and REGION == 1 and PREFETCH_BIAS:
        # band: the next tile's bias gather is issued before this tile's work (see `_fwd_tile_loop`)
        next_bias = _band_bias(dist_bias_ptr, lo, query_pos, BIAS_KIND, REGION, BLOCK_N)
        for start_n in tl.range(lo, hi, BLOCK_N):
            band_bias = next_bias
            next_bias = _band_bias(dist_bias_ptr, start_n + BLOCK_N, query_pos, BIAS_KIND, REGION, BLOCK_N)
            dq = _dq_tile(
                dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, key_mask_ptr, band_bias, start_n, query_pos, seqlen_k,
                stride_kn, stride_vn, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
                BIAS_KIND, REGION, MASKED, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
    else:
        for start_n in tl.range(lo, hi, BLOCK_N):
            if BIAS_KIND == 3:  # FIRE: every tile, whatever its region, evaluates the bias per element
                band_bias = _fire_tile_bias(
                    fire_ptr, fire_lines, fire_normalizer, start_n, query_pos, FIRE_WIDTH, BLOCK_N
                )
            else:
                band_bias = _band_bias(dist_bias_ptr, start_n, query_pos, BIAS_KIND, REGION, BLOCK_N)
            dq = _dq_tile(
                dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, key_mask_ptr, band_bias, start_n, query_pos, seqlen_k,
                stride_kn, stride_vn, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
                BIAS_KIND, REGION, MASKED, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
    return dq


def _dq_configs() -> list:
    # (BLOCK_M queries per program, BLOCK_N keys per step, warps, stages); the first is the default. Kernel time
    # (torch.profiler, bf16, D=64, H=8, B*L = 32k, T5 bias with its gradient), one H200 process, 2026-11-26:
    # 64x32/4/3 won at L=512 (162 vs 197 us for 64x64/4/2, causal 139 vs 143) and at L=1024 (259 vs 321; causal
    # 201 vs 191 for 64x64/4/3); 128-row tiles, 32-row ones and 64x128 lost everywhere. On H100s at L=512: 164 us
    # autotuned to it, 198 with 64x64/4/2 (another process).
    shapes = [(64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _dq_wide_head_configs() -> list:
    # head dims above 128 (see attention_fwd.WIDE_HEAD_DIM): 68 and 82 KiB of shared memory at D=256 on sm_86
    shapes = [(32, 32, 4, 2), (64, 16, 4, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _dq_narrow_head_configs() -> list:
    # head dims up to 64 (see attention_fwd.NARROW_HEAD_DIM), as the forward's: uncapped, the causal dQ kernel
    # takes 141 registers a thread at D=64 (sm_90), 3 programs a multiprocessor; 4 capped at 128, 5 at 96. Kernel
    # time, H200, bf16, B=64, H=8, L=512, D=64 (bidirectional / causal): 152 / 125 us uncapped, 151 / 117 at 128,
    # 148 / 132 at 96.
    capped = [(64, 32, 4, 3, 128), (64, 32, 4, 3, 96)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=r) for bm, bn, w, s, r in capped
    ] + _dq_configs()


@triton.autotune(
    configs=tuning_configs(_dq_configs(), _dq_wide_head_configs(), _dq_narrow_head_configs()),
    key=["HEAD_DIM_PAD", "BIAS_KIND", "IS_CAUSAL", "IS_VARLEN", "HAS_KEY_MASK", "SEQLEN_KEY"],
    prune_configs_by={"early_config_prune": _prune_bwd_configs},
)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Out, DOut, DQ, Lse, Delta,
    DistBias, AlibiSlopes, FireParams, KeyMask, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_maskb,
    num_heads, seqlen_q, seqlen_k, head_dim, qk_scale_log2, softmax_scale, radius, dist_center,
    SEQLEN_KEY,
    BIAS_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, EVEN_HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH_BIAS: tl.constexpr,
    FIRE_WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
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
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    b64 = off_b.to(tl.int64)
    q_mask = _mask2d(offs_m[:, None] < seqlen_q, offs_d[None, :] < head_dim, EVEN_HEAD_DIM)
    rows = (q_start + offs_m)[:, None].to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + off_h * stride_qh + rows * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(
        DOut + b64 * stride_dob + off_h * stride_doh + rows * stride_dom + offs_d[None, :], mask=q_mask, other=0.0
    )
    lse_log2 = (
        tl.load(Lse + b64 * stride_lb + off_h * stride_lh + q_start + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
        * 1.4426950408889634
    )
    o = tl.load(Out + b64 * stride_ob + off_h * stride_oh + rows * stride_om + offs_d[None, :], mask=q_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + b64 * stride_lb + off_h * stride_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)
    k_rows = (k_start + offs_n).to(tl.int64)
    k_ptrs = K + b64 * stride_kb + off_h * stride_kh + k_rows[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + off_h * stride_vh + k_rows[:, None] * stride_vn + offs_d[None, :]
    key_mask_ptr = KeyMask + b64 * stride_maskb
    dist_bias_ptr = DistBias + off_h * (4 * dist_center + 2) + 2 * dist_center  # the pair at distance 0
    query_pos = offs_m + (seqlen_k - seqlen_q)

    alibi_slope_log2 = 0.0
    bias_far_left = 0.0
    bias_far_right = 0.0
    if BIAS_KIND == 2:
        alibi_slope_log2 = tl.load(AlibiSlopes + off_h).to(tl.float32) * 1.4426950408889634
    fire_lines = FireParams + 3 + FIRE_WIDTH + off_h * (2 * FIRE_WIDTH + 2)  # the head's slopes, then intercepts
    fire_normalizer = 0.0
    if BIAS_KIND == 3:
        fire_normalizer = _fire_normalizer(FireParams, query_pos)
    if BIAS_KIND == 1:
        bias_far_left = tl.load(dist_bias_ptr - 2 * radius)
        bias_far_right = tl.load(dist_bias_ptr + 2 * radius)
        band_radius = radius
    else:
        band_radius = 1
    # One masked band loop here (not the forward's unmasked + masked split): on the H100 the extra loop made the
    # dQ kernel slower, not faster.
    far_left_end, _, band_end, full_end, key_end = _key_ranges(
        start_m * BLOCK_M, seqlen_q, seqlen_k, band_radius, IS_CAUSAL, BLOCK_M, BLOCK_N
    )
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    dq = _dq_tile_loop(
        dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, FireParams, fire_lines,
        fire_normalizer, 0, far_left_end, query_pos,
        seqlen_k, stride_kn, stride_vn, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
         BIAS_KIND, 0, False, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH,
    )  # fmt: skip
    dq = _dq_tile_loop(
        dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, FireParams, fire_lines,
        fire_normalizer, far_left_end, band_end, query_pos,
        seqlen_k, stride_kn, stride_vn, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
         BIAS_KIND, 1, True, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH,
    )  # fmt: skip
    dq = _dq_tile_loop(
        dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, FireParams, fire_lines,
        fire_normalizer, band_end, full_end, query_pos,
        seqlen_k, stride_kn, stride_vn, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
         BIAS_KIND, 2, False, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH,
    )  # fmt: skip
    dq = _dq_tile_loop(
        dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, key_mask_ptr, dist_bias_ptr, FireParams, fire_lines,
        fire_normalizer, full_end, key_end, query_pos,
        seqlen_k, stride_kn, stride_vn, head_dim, qk_scale_log2, alibi_slope_log2, bias_far_left, bias_far_right,
         BIAS_KIND, 2, True, IS_CAUSAL, HAS_KEY_MASK, HEAD_DIM_PAD, EVEN_HEAD_DIM, BLOCK_N, DOT_PRECISION,
        PREFETCH_BIAS, FIRE_WIDTH,
    )  # fmt: skip
    dq = dq * softmax_scale
    tl.store(
        DQ + b64 * stride_dqb + off_h * stride_dqh + rows * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )


def _layout_strides(t: torch.Tensor, is_varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, L, D) tensor or of a packed (total, H, D) one (batch stride 0)."""
    if is_varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def t5_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    dist_bias: torch.Tensor | None,
    radius: int,
    dist_center: int,
    cuts: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    grad_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    fire_params: torch.Tensor | None = None,
    fire_width: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernels on validated inputs (layouts as in `t5_attention_forward`).

    ``grad_buffers``: (dq, dk, dv) tensors shaped like q, k, v (any strides with a contiguous last dimension)
    to write the gradients into, e.g. views of one packed buffer; by default they are allocated.

    Returns ``dq, dk, dv`` (dtypes of q, k, v) and, when ``cuts`` is given (T5 bias that needs a gradient),
    the per-program bias sums: float32 ``(H, len(cuts) + 2, key_blocks * B)`` holding, per program, the sum
    of dS over band elements with distance ``<= cut`` for each cut, then the sums over the far-left
    (``d <= -R``) and far-right (``d >= R``) tiles. `bias_sums_to_table_grad` turns them into the table gradient.

    With ``fire_params`` (FIRE evaluated per element, as in `t5_attention_forward`), the fourth result is FIRE's
    per-program sums instead: float32 ``(H, fire_sums_size(fire_width), key_blocks * B)`` (layout in
    `_fire_tile_sums`); `fire_sums_to_params_grad` turns them into the gradient of ``fire_params``.
    """
    is_varlen = cu_seqlens_q is not None
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    head_dim = q.shape[-1]
    head_dim_pad = max(16, next_power_of_2(head_dim))
    if is_varlen:
        num_heads = q.shape[1]
        batch = cu_seqlens_q.numel() - 1
        lse_strides = (0, lse.stride(0))
    else:
        batch, num_heads = q.shape[:2]
        lse_strides = lse.stride()[:2]
    fire_sums = fire_sums_size(fire_width) if fire_params is not None else 2
    if q.numel() == 0 or k.numel() == 0:  # no rows or no keys: every gradient is zero
        partials = None
        if cuts is not None:
            partials = torch.zeros(q.shape[1], cuts.numel() + 2, 1, device=q.device, dtype=torch.float32)
        elif fire_params is not None:
            partials = torch.zeros(q.shape[1], fire_sums, 1, device=q.device, dtype=torch.float32)
        if grad_buffers is None:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), partials
        return (*(buffer.zero_() for buffer in grad_buffers), partials)
    delta = torch.empty_like(lse)
    if grad_buffers is None:
        grad_buffers = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    dq, dk, dv = grad_buffers
    dummy = dummy_tensor(q.device)
    if dist_bias is not None:
        bias_kind = BIAS_T5
    elif fire_params is not None:
        bias_kind = BIAS_FIRE
    elif alibi_slopes is not None:
        bias_kind = BIAS_ALIBI
    else:
        bias_kind = BIAS_NONE
    compute_dbias = cuts is not None
    num_cuts_pad = cuts.numel() if compute_dbias else 2
    # one slot per program of the smallest key block: programs that exit early leave zeros
    num_partials = cdiv(max_seqlen_k, DKDV_MIN_BLOCK_N) * batch
    bias_partials = None
    if compute_dbias:
        bias_partials = torch.zeros(num_heads, num_cuts_pad + 2, num_partials, device=q.device, dtype=torch.float32)
    elif bias_kind == BIAS_FIRE:
        bias_partials = torch.zeros(num_heads, fire_sums, num_partials, device=q.device, dtype=torch.float32)
    seqlen_key = seqlen_autotune_key(max(max_seqlen_q, max_seqlen_k))
    common = dict(
        PREFETCH_BIAS=prefetch_band_bias(),
        BIAS_KIND=bias_kind, IS_CAUSAL=causal, HAS_KEY_MASK=key_padding_mask is not None, IS_VARLEN=is_varlen,
        HEAD_DIM_PAD=head_dim_pad, EVEN_HEAD_DIM=head_dim == head_dim_pad, DOT_PRECISION=dot_precision(q.dtype),
        FIRE_WIDTH=fire_width if fire_params is not None else 0,
    )  # fmt: skip
    optional = (
        dist_bias if dist_bias is not None else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        fire_params if fire_params is not None else dummy,
        key_padding_mask if key_padding_mask is not None else dummy,
        cu_seqlens_q if is_varlen else dummy,
        cu_seqlens_k if is_varlen else dummy,
    )
    mask_stride = key_padding_mask.stride(0) if key_padding_mask is not None else 0
    scale_log2 = softmax_scale * 1.4426950408889634
    # dQ first: its programs also write delta = rowsum(dO * O), which the dK/dV programs read.
    dq_args = (
        q, k, v, out, dout, dq, lse, delta, *optional,
        *_layout_strides(q, is_varlen), *_layout_strides(k, is_varlen), *_layout_strides(v, is_varlen),
        *_layout_strides(out, is_varlen), *_layout_strides(dout, is_varlen), *_layout_strides(dq, is_varlen),
        *lse_strides, mask_stride,
        num_heads, max_seqlen_q, max_seqlen_k, head_dim, scale_log2, softmax_scale, radius, dist_center, seqlen_key,
    )  # fmt: skip
    launch_tuned(
        _bwd_dq_kernel,
        lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * num_heads),
        dq_args,
        common,
        ("dq", q.device, q.dtype, seqlen_key, *common.values()),
    )
    dkdv_args = (
        q, k, v, dout, dk, dv, lse, delta, *optional,
        cuts if compute_dbias else dummy, bias_partials if bias_partials is not None else dummy,
        *_layout_strides(q, is_varlen), *_layout_strides(k, is_varlen), *_layout_strides(v, is_varlen),
        *_layout_strides(dout, is_varlen), *_layout_strides(dk, is_varlen), *_layout_strides(dv, is_varlen),
        *lse_strides, mask_stride,
        batch, num_heads, max_seqlen_q, max_seqlen_k, head_dim, scale_log2, softmax_scale, radius, dist_center,
        num_partials, seqlen_key,
    )  # fmt: skip
    dkdv_kwargs = dict(COMPUTE_DBIAS=compute_dbias, NUM_CUTS_PAD=num_cuts_pad, FIRE_SUMS=fire_sums, **common)
    launch_tuned(
        _bwd_dkdv_kernel,
        lambda meta: (cdiv(max_seqlen_k, meta["BLOCK_N"]), batch * num_heads),
        dkdv_args,
        dkdv_kwargs,
        ("dkdv", q.device, q.dtype, seqlen_key, *dkdv_kwargs.values()),
    )
    return dq, dk, dv, bias_partials


@triton.jit
def _table_grad_kernel(
    Partials, CutSumsToBucket, Out, num_sums, num_partials, num_buckets,
    SUMS_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """One program per head: sum its ``(num_sums, num_partials)`` partials over the programs in a fixed order,
    then map the sums to buckets (``(num_sums, num_buckets)`` matrix), in fp32; store in Out's dtype."""
    head = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SUMS_PAD)
    offs_p = tl.arange(0, BLOCK_P)
    rows = Partials + head * num_sums * num_partials + offs_s[:, None] * num_partials
    acc = tl.zeros((SUMS_PAD, BLOCK_P), dtype=tl.float32)
    for start in range(0, num_partials, BLOCK_P):
        mask = (offs_s[:, None] < num_sums) & (start + offs_p[None, :] < num_partials)
        acc += tl.load(rows + start + offs_p[None, :], mask=mask, other=0.0)
    sums = tl.sum(acc, axis=1)
    for start in range(0, num_buckets, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        mask = (offs_s[:, None] < num_sums) & (offs_b[None, :] < num_buckets)
        to_bucket = tl.load(CutSumsToBucket + offs_s[:, None] * num_buckets + offs_b[None, :], mask=mask, other=0.0)
        grad = tl.sum(sums[:, None] * to_bucket, axis=0)
        tl.store(Out + head * num_buckets + offs_b, grad.to(Out.dtype.element_ty), mask=offs_b < num_buckets)


def bias_sums_to_table_grad(
    bias_partials: torch.Tensor, cut_sums_to_bucket: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-program bias sums ``(H, C + 2, P)`` -> table gradient ``(H, num_buckets)`` in ``dtype``, deterministic.

    One small kernel (host time matters here: it runs once per attention backward): sums the programs in a fixed
    order, then maps "<= cut" sums and the far sums to buckets with the layout's ``cut_sums_to_bucket`` matrix, in
    fp32 (not a matmul, which may run in TF32). Differencing after the program sum costs at most
    log2(num_segments) bits of the fp32 mantissa.
    """
    num_heads, num_sums, num_partials = bias_partials.shape
    num_buckets = cut_sums_to_bucket.shape[1]
    out = torch.empty((num_heads, num_buckets), dtype=dtype, device=bias_partials.device)
    sums_pad = next_power_of_2(num_sums)
    launch(
        _table_grad_kernel,
        (num_heads,),
        (bias_partials, cut_sums_to_bucket, out, num_sums, num_partials, num_buckets),
        dict(SUMS_PAD=sums_pad, BLOCK_P=max(1, 4096 // sums_pad), BLOCK_B=min(next_power_of_2(num_buckets), 64)),
        num_warps=4,
    )
    return out


def fire_sums_size(fire_width: int) -> int:
    """Length of one program's FIRE sums (`_fire_tile_sums`): ``2 (W + 1) + 2`` padded to a power of two."""
    return next_power_of_2(2 * fire_width + 4)


def fire_sums_to_params_grad(fire_partials: torch.Tensor, fire_width: int, params_size: int) -> torch.Tensor:
    """FIRE's per-program sums ``(H, fire_sums_size(W), P)`` -> the gradient of the packed ``fire_params``
    (float32 ``(params_size,)``, layout in `attention_fwd._fire_tile_bias`): ``[dc, dL, 0, 0 (W breakpoints: piecewise
    constant), then per head d slopes (W + 1,), d intercepts (W + 1,)]`` of the log2-scaled slopes and intercepts
    the kernels read. Deterministic: one reduction over the programs, no atomics."""
    sums = fire_partials.sum(dim=-1)  # (H, FIRE_SUMS)
    segments = fire_width + 1
    ds, ds_x = sums[:, :segments], sums[:, segments : 2 * segments]
    # the kernels' bias is log2-scaled and dS is the gradient of the natural-log bias: d(line_log2) = ln(2) d(line)
    lines = torch.stack((ds_x, ds), dim=1) * LN2  # (H, 2, W + 1): slopes then intercepts
    header = torch.stack((sums[:, 2 * segments].sum(), sums[:, 2 * segments + 1].sum()))
    grad = torch.cat((header, header.new_zeros(1 + fire_width), lines.flatten()))
    if grad.numel() != params_size:
        raise ValueError(f"fire_params holds {params_size} values, expected {grad.numel()} for width {fire_width}.")
    return grad
