"""Flash attention with an in-kernel T5 bias: Triton kernels against the materialized fp32 reference.

On CPU the kernels run under the Triton interpreter (set by tests/conftest.py) on small shapes with
float16 inputs (the interpreter's bfloat16 maths is broken); on a GPU the `gpu`-marked tests add large
shapes and bfloat16. Every comparison goes through `assert_within_reference_error`: the kernel's error
against the fp32 reference must be at most twice the error of the same reference computed in low precision.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from fat5_kernels.attention import (  # noqa: E402
    t5_flash_attention,
    t5_flash_attention_qkvpacked,
    t5_flash_attention_varlen,
    t5_flash_attention_varlen_qkvpacked,
)
from fat5_kernels.attention_reference import (  # noqa: E402
    relative_bias_layout,
    t5_attention_reference,
    t5_attention_varlen_reference,
    t5_relative_position_bucket,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# interpreter: float16 only (bf16 arithmetic is wrong there); GPU: both half types
CPU_DTYPE = torch.float16


def assert_within_reference_error(actual, reference, low_precision_reference, name: str, factor: float = 2.0):
    """Kernel error vs fp32 reference <= ``factor`` x (low-precision reference's error) + a tiny floor.

    Errors are max-abs over the tensor; the floor (1e-6 of the reference's scale) only matters where the
    low-precision reference happens to be exact (all-zero rows, say).
    """
    reference = reference.float()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    kernel_error = (actual.float() - reference).abs().max().item()
    reference_error = (low_precision_reference.float() - reference).abs().max().item()
    floor = 1e-6 * max(reference.abs().max().item(), 1.0)
    assert kernel_error <= factor * reference_error + floor, (
        f"{name}: kernel error {kernel_error:.3e} > {factor} x low-precision reference error {reference_error:.3e}"
    )


def _inputs(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, seed=0, num_buckets=8, table_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(batch, heads, n, head_dim, generator=gen).to(DEVICE, dtype)
        for n in (seqlen_q, seqlen_k, seqlen_k)
    )
    table = (torch.randn(heads, num_buckets, generator=gen) * table_scale).to(DEVICE)
    dout = torch.randn(batch, heads, seqlen_q, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k, v, table, dout


def _grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dout.to(out.dtype))
    return out.detach(), grads


def _check_against_reference(kernel_fn, reference_fn, tensors, dout, names, low_dtype):
    """Compare outputs and gradients of kernel_fn(*tensors) with reference_fn in fp32 and in low_dtype."""
    out, grads = _grads(kernel_fn, tensors, dout)
    ref, ref_grads = _grads(lambda *t: reference_fn(*t, compute_dtype=torch.float32), tensors, dout)
    low, low_grads = _grads(lambda *t: reference_fn(*t, compute_dtype=low_dtype), tensors, dout)
    assert_within_reference_error(out, ref, low, "out")
    for name, g, r, lg in zip(names, grads, ref_grads, low_grads):
        assert_within_reference_error(g, r, lg, f"d{name}")


# ----------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    "bidirectional,num_buckets,max_distance", [(True, 32, 128), (False, 32, 128), (True, 8, 12), (False, 6, 20)]
)
def test_relative_position_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    distance = torch.arange(-3 * max_distance - 50, 3 * max_distance + 50)[None, :]
    ours = t5_relative_position_bucket(distance, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(distance, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    # the kernels' per-distance table and segments describe the same function
    layout = relative_bias_layout(bidirectional, num_buckets, max_distance)
    index = distance.clamp(-layout.radius, layout.radius) + layout.radius
    assert torch.equal(layout.distance_bucket[index], theirs)
    cuts = layout.cuts[: layout.num_segments - 1].long()
    segment = torch.searchsorted(cuts, distance.flatten(), right=False)  # distance in (cut[s-1], cut[s]]
    assert torch.equal(layout.segment_bucket_onehot[segment].argmax(-1), theirs.flatten())


# ----------------------------------------------------------------------------------------------- dense


def _dense_fns(bias, causal, bidirectional, num_buckets, max_distance, key_padding_mask=None, scale=1.0):
    def build(impl):
        def fn(q, k, v, table, compute_dtype=None):
            kwargs = dict(causal=causal, softmax_scale=scale, key_padding_mask=key_padding_mask)
            if bias == "t5":
                kwargs.update(bias_table=table, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
            elif bias == "alibi":
                slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(q.shape[1])], device=q.device)
                kwargs.update(alibi_slopes=slopes)
            if compute_dtype is not None:
                kwargs["compute_dtype"] = compute_dtype
            out = impl(q, k, v, **kwargs)
            # tie the table into the graph so every case differentiates the same leaves
            return out if bias == "t5" else out + 0 * table.sum()

        return fn

    return build(t5_flash_attention), build(t5_attention_reference)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_distance_bias_pairs_hold_each_distance_and_its_successor(bidirectional):
    """The kernels' per-distance vector: pair ``d`` holds (bias[d], bias[d + 1]) times log2(e), saturated
    beyond the bucket radius, for every distance a sequence of max_seqlen can have, plus a tile."""
    from fat5_kernels.attention import _distance_bias

    table = torch.randn(3, 32)
    max_seqlen = 300
    pairs, _, center = _distance_bias(table, bidirectional, 32, 128, max_seqlen)
    assert pairs.shape == (3, 2 * center + 1, 2) and pairs.dtype == torch.float32
    assert center >= max_seqlen + 256
    distance = torch.arange(-center, center + 1)
    bucket = t5_relative_position_bucket(distance[None, :], bidirectional, 32, 128)[0]
    expected = table[:, bucket] * math.log2(math.e)
    torch.testing.assert_close(pairs[:, :, 0], expected, rtol=0, atol=0)
    torch.testing.assert_close(pairs[:, :-1, 1], expected[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(pairs[:, -1, 1], expected[:, -1], rtol=0, atol=0)  # saturated past the end


# (bias, causal, bidirectional buckets, M, N): every bias mode, causal and not, odd lengths that are not
# multiples of the block, M != N both ways; L up to 150 with max_distance 12 exercises the far-left, band and
# far-right tile ranges of every loop.
DENSE_CASES = [
    ("t5", False, True, 150, 150),
    ("t5", True, False, 150, 150),
    ("t5", False, True, 77, 133),
    ("t5", True, False, 133, 77),
    ("t5", True, True, 97, 97),
    ("none", False, True, 133, 77),
    ("none", True, True, 77, 133),
    ("alibi", False, True, 101, 101),
    ("alibi", True, True, 120, 90),
]


@pytest.mark.parametrize("bias,causal,bidirectional,seqlen_q,seqlen_k", DENSE_CASES)
def test_dense_matches_reference(bias, causal, bidirectional, seqlen_q, seqlen_k):
    q, k, v, table, dout = _inputs(2, 2, seqlen_q, seqlen_k, 32, CPU_DTYPE if DEVICE == "cpu" else torch.bfloat16)
    kernel_fn, reference_fn = _dense_fns(bias, causal, bidirectional, 8, 12)
    low = CPU_DTYPE if DEVICE == "cpu" else torch.bfloat16
    _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", low)


@pytest.mark.parametrize("prefetch", ["0", "1"])
@pytest.mark.parametrize("causal,seqlen_q,seqlen_k", [(False, 150, 131), (True, 133, 150)])
def test_band_bias_gathered_in_place_or_one_tile_ahead(monkeypatch, prefetch, causal, seqlen_q, seqlen_k):
    # Both band paths: the bias gathered one tile ahead (the default) and in the loop (FAT5_ATTENTION_PREFETCH=0).
    monkeypatch.setenv("FAT5_ATTENTION_PREFETCH", prefetch)
    q, k, v, table, dout = _inputs(1, 2, seqlen_q, seqlen_k, 32, CPU_DTYPE if DEVICE == "cpu" else torch.bfloat16)
    kernel_fn, reference_fn = _dense_fns("t5", causal, not causal, 8, 12)
    low = CPU_DTYPE if DEVICE == "cpu" else torch.bfloat16
    _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", low)


@pytest.mark.parametrize("causal", [False, True])
def test_distances_far_beyond_the_band_with_partial_blocks(causal):
    # Distances up to ~N - M + M = 410 >> R + 256 and partial key blocks: the backward sends a partial key block's
    # every query tile through the band path, which must still read the right (saturated) bias.
    q, k, v, table, dout = _inputs(1, 1, 301, 410, 16, CPU_DTYPE if DEVICE == "cpu" else torch.bfloat16, seed=5)
    kernel_fn, reference_fn = _dense_fns("t5", causal, not causal, 8, 12)
    low = CPU_DTYPE if DEVICE == "cpu" else torch.bfloat16
    _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", low)


def _assert_t5_matches_reference_in_float32(causal, seqlen_q, seqlen_k, seed, head_dim=16):
    """T5 bias (8 buckets, max distance 12; causal buckets when causal), fp32 inputs: exact (ieee) products, so
    output and every gradient must agree with the reference to rounding."""
    q, k, v, table, dout = _inputs(1, 2, seqlen_q, seqlen_k, head_dim, torch.float32, seed=seed)
    kernel_fn, reference_fn = _dense_fns("t5", causal, not causal, 8, 12, scale=0.25)
    out, grads = _grads(kernel_fn, (q, k, v, table), dout)
    ref, ref_grads = _grads(reference_fn, (q, k, v, table), dout)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


# The fp16 reference's table gradient is coarse (it sums in fp16, so the 2x rule lets a wrong bucket sum pass):
# these fp32 runs pin the table gradient down, with tiles at several offsets from the band (N - M = 67, 66, -3, 7).
@pytest.mark.parametrize("causal,seqlen_q,seqlen_k", [(False, 83, 150), (False, 100, 166), (False, 166, 163), (True, 100, 107)])
def test_float32_matches_reference_tightly(causal, seqlen_q, seqlen_k):
    """fp32 inputs take exact (ieee) products: the kernel must agree with the reference to rounding."""
    _assert_t5_matches_reference_in_float32(causal, seqlen_q, seqlen_k, seed=3)


def _autotune_cases():
    from fat5_kernels import attention_bwd, attention_fwd

    lists = {
        # the first config of the narrow-head list runs in every other test; the narrow-head lists end with the
        # usual ones; the wide-head lists never run otherwise
        "fwd": attention_fwd._fwd_narrow_head_configs()[1:] + attention_fwd._fwd_wide_head_configs(),
        "dkdv": attention_bwd._dkdv_narrow_head_configs()[1:] + attention_bwd._dkdv_wide_head_configs(),
        "dq": attention_bwd._dq_narrow_head_configs()[1:] + attention_bwd._dq_wide_head_configs(),
    }
    return [
        pytest.param(
            kernel, config.all_kwargs(),
            id=f"{kernel}-{'x'.join(str(v) for v in config.kwargs.values())}-{config.num_stages}-{config.maxnreg}",
        )  # fmt: skip
        for kernel, configs in lists.items()
        for config in configs
    ]


@pytest.mark.parametrize("kernel,config", _autotune_cases())
@pytest.mark.parametrize("causal", [False, True])
def test_every_autotune_config_matches_reference(monkeypatch, kernel, config, causal):
    """The interpreter runs only the first config of each list, and GPU tests without autotuning too: force each
    other tile shape the autotuner may pick, one kernel at a time, and check it exactly (fp32)."""
    from fat5_kernels import attention_bwd, attention_fwd

    original = attention_fwd.launch_tuned

    def launch(kernel_fn, grid, args, kwargs, key):
        if key[0] == kernel:
            kernel_fn.fn[grid](*args, **kwargs, **config)
        else:
            original(kernel_fn, grid, args, kwargs, key)

    monkeypatch.setattr(attention_fwd, "launch_tuned", launch)
    monkeypatch.setattr(attention_bwd, "launch_tuned", launch)
    # partial blocks on both axes, far tiles on both sides (bidirectional), M != N
    _assert_t5_matches_reference_in_float32(causal, 150, 139, seed=4)


def _force_wide_head_defaults(monkeypatch):
    from fat5_kernels import attention_bwd, attention_fwd

    defaults = {
        "fwd": attention_fwd._fwd_wide_head_configs()[0].all_kwargs(),
        "dkdv": attention_bwd._dkdv_wide_head_configs()[0].all_kwargs(),
        "dq": attention_bwd._dq_wide_head_configs()[0].all_kwargs(),
    }

    def launch(kernel_fn, grid, args, kwargs, key):
        kernel_fn.fn[grid](*args, **kwargs, **defaults[key[0]])

    monkeypatch.setattr(attention_fwd, "launch_tuned", launch)
    monkeypatch.setattr(attention_bwd, "launch_tuned", launch)


def test_wide_head_tiles_match_reference(monkeypatch):
    """A head dim above 128 (160, padded to 256) with the wide-head default tiles, which a GPU picks there."""
    _force_wide_head_defaults(monkeypatch)
    _assert_t5_matches_reference_in_float32(False, 70, 83, seed=5, head_dim=160)


def test_configs_are_chosen_by_head_dim(monkeypatch):
    """On a GPU every kernel gets its register-capped tiles first and its usual ones up to head dim 64, only the
    usual ones up to 128 and only the wide-head ones above; with FAT5_ATTENTION_AUTOTUNE=0 the first of each
    list."""
    from fat5_kernels import attention_bwd, attention_fwd

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the candidates a GPU gets (the interpreter gets one config)
    for configs, wide, narrow, prune in (
        (attention_fwd._fwd_configs(), attention_fwd._fwd_wide_head_configs(),
         attention_fwd._fwd_narrow_head_configs(), attention_fwd.by_head_dim),
        (attention_bwd._dkdv_configs(), attention_bwd._dkdv_wide_head_configs(),
         attention_bwd._dkdv_narrow_head_configs(), attention_bwd._prune_bwd_configs),
        (attention_bwd._dq_configs(), attention_bwd._dq_wide_head_configs(),
         attention_bwd._dq_narrow_head_configs(), attention_bwd._prune_bwd_configs),
    ):  # fmt: skip
        assert narrow[0].maxnreg is not None and all(c.maxnreg is None for c in configs + wide)
        for autotune, keep in (("1", slice(None)), ("0", slice(1))):
            monkeypatch.setenv("FAT5_ATTENTION_AUTOTUNE", autotune)
            candidates = attention_fwd.tuning_configs(configs, wide, narrow)
            assert candidates == narrow[keep] + configs[keep] + wide[keep]
            assert prune(candidates, {}, HEAD_DIM_PAD=256) == wide[keep]
            usual = prune(candidates, {}, HEAD_DIM_PAD=128)
            assert usual and all(c in configs[keep] for c in usual)
            assert prune(candidates, {}, HEAD_DIM_PAD=64) == narrow[keep]


def _compile_without_gpu(arch: int) -> list[dict]:
    """The rows of `compile_without_gpu.py` for one target (a process each: Triton keeps a kernel's compile target
    for the process)."""
    script = os.path.join(os.path.dirname(__file__), "compile_without_gpu.py")
    env = {**os.environ, "TRITON_INTERPRET": "0", "FAT5_ATTENTION_AUTOTUNE": "0"}
    result = subprocess.run([sys.executable, script, str(arch)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_default_tiles_fit_ampere_shared_memory():
    """Compiled for A100 (sm_80) and A10G / L4 (sm_86) on this machine, without a GPU (a stub driver names the
    target, nothing launches): each kernel's default tiles for head dims 64, 128 and 256 fit the shared memory
    a block may use there, so the kernels run on those GPUs without autotuning. So does the RMSNorm backward's
    pipelined row loop (fp32 rows of 512, 1024 and 4096)."""
    rows = _compile_without_gpu(80) + _compile_without_gpu(86)
    kernels = {(r["arch"], r["head_dim"], r["kernel"]) for r in rows}
    # every kernel compiled for every target and head dim (row width for the norm)
    assert len(kernels) == 2 * 3 * 3 + 2 * 3, sorted(kernels)
    too_large = [r for r in rows if r["shared_bytes"] > r["limit_bytes"]]
    assert not too_large, too_large


def test_band_bias_needs_no_layout_conversion_on_hopper():
    """Compiled for sm_90 without a GPU: no attention kernel moves an fp32 tile from a load's layout into the
    matmul accumulator's layout, which goes through shared memory there. The band bias used to, on every tile
    (it cost the forward 22 us of 177 at the pretraining shape on an H200); see
    `attention_fwd.GATHER_IN_ACCUMULATOR_LAYOUT`."""
    rows = [r for r in _compile_without_gpu(90) if r["kernel"] in ("fwd", "dq", "dkdv")]
    assert {(r["head_dim"], r["causal"], r["kernel"]) for r in rows} == {
        (d, c, k) for d in (64, 128, 256) for c in (False, True) for k in ("fwd", "dq", "dkdv")
    }
    converting = [r for r in rows if r["accumulator_conversions"]]
    assert not converting, converting
    assert all(r["shared_bytes"] <= r["limit_bytes"] for r in rows)


def test_key_padding_mask_and_empty_rows():
    """Padded keys are ignored; a batch row with no key at all gives zeros and zero gradients, not NaN."""
    q, k, v, table, dout = _inputs(3, 2, 70, 90, 32, CPU_DTYPE, seed=1)
    mask = torch.ones(3, 90, dtype=torch.bool, device=DEVICE)
    mask[0, 53:] = False
    mask[1, ::3] = False
    mask[2] = False  # every key padded
    kernel_fn, reference_fn = _dense_fns("t5", False, True, 8, 12, key_padding_mask=mask)
    _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", CPU_DTYPE)
    out, (dq, dk, dv, _) = _grads(kernel_fn, (q, k, v, table), dout)
    assert torch.all(out[2] == 0) and torch.all(dq[2] == 0) and torch.all(dk[2] == 0) and torch.all(dv[2] == 0)


def test_causal_with_more_queries_than_keys_zero_rows():
    """Bottom-right causal alignment: with M > N the first M - N queries see no key and return zeros."""
    q, k, v, table, _ = _inputs(1, 2, 40, 25, 16, CPU_DTYPE)
    out, lse = t5_flash_attention(q, k, v, bias_table=table, bidirectional=False, num_buckets=8, max_distance=12,
                                  causal=True, return_lse=True)  # fmt: skip
    assert torch.all(out[:, :, :15] == 0) and torch.all(out[:, :, 15:].abs().sum(-1) > 0)
    assert torch.all(torch.isinf(lse[:, :, :15])) and torch.isfinite(lse[:, :, 15:]).all()


def test_head_dim_padded_and_scale():
    """head_dim 24 (not a power of two) is padded inside the kernel; softmax_scale != 1."""
    q, k, v, table, dout = _inputs(1, 3, 66, 66, 24, CPU_DTYPE, seed=2)
    kernel_fn, reference_fn = _dense_fns("t5", False, True, 8, 12, scale=1 / math.sqrt(24))
    _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", CPU_DTYPE)


def test_lse_matches_reference():
    q, k, v, table, _ = _inputs(1, 2, 50, 70, 16, torch.float32)
    _, lse = t5_flash_attention(q, k, v, bias_table=table, num_buckets=8, max_distance=12, return_lse=True)
    buckets = t5_relative_position_bucket(torch.arange(70)[None, :] - torch.arange(50)[:, None] - 20, True, 8, 12)
    scores = q @ k.transpose(-1, -2) + table[:, buckets.to(DEVICE)]
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Fill every ``torch.empty`` / ``torch.empty_like`` result with NaN (ints with -12345): a kernel that reads
    a buffer element it never wrote (skipped programs, rows past the sequence, padded head_dim, masked blocks)
    then fails deterministically instead of depending on what the allocator happened to return."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-12345)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def _grad_output_layout(dout, layout):
    # the model's grad_output is a transposed view of a (B, M, H, D) gradient; a sum() loss gives an expanded one
    if layout == "transposed":
        return dout.transpose(1, 2).contiguous().transpose(1, 2)
    return dout[:1, :1, :1].expand_as(dout)


@pytest.mark.parametrize("dout_layout", ["transposed", "expanded"])
def test_poisoned_buffers_and_strided_grad_output(poisoned_empty, dout_layout):
    """Regression guard for process-dependent gradients: every buffer the kernels allocate uninitialised is
    NaN-poisoned, grad_output is non-contiguous, and the shapes exercise skipped / partial / masked tiles:
    70 queries (a partial second query block), 9 keys of which batch 1 keeps 4 (key-padding-masked columns),
    batch 2 keeps none (every row empty), head_dim 12 (padded to 16)."""
    q, k, v, table, dout = _inputs(3, 2, 70, 9, 12, CPU_DTYPE, seed=7)
    mask = torch.ones(3, 9, dtype=torch.bool, device=DEVICE)
    mask[1, 4:] = False
    mask[2] = False
    kernel_fn, reference_fn = _dense_fns("t5", False, True, 8, 12, key_padding_mask=mask)
    dout = _grad_output_layout(dout, dout_layout)
    if dout_layout == "transposed":
        _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", CPU_DTYPE)
        return
    # Expanded (stride-0) grad_output: the kernels must read it as its contiguous copy. Its identical values make the
    # half-precision reference's table gradient unusually exact on some CPUs (errors cancel), so the table gradient
    # is held to the fp16 budget of a generic grad_output instead: 1% of its scale, a sum of 70 x 9 fp16 terms.
    out, grads = _grads(kernel_fn, (q, k, v, table), dout)
    same_out, same_grads = _grads(kernel_fn, (q, k, v, table), dout.contiguous())
    assert torch.equal(out, same_out)
    for name, grad, same in zip("qkvt", grads, same_grads):
        assert torch.equal(grad, same), f"d{name} differs between an expanded grad_output and its contiguous copy"
    ref, ref_grads = _grads(lambda *t: reference_fn(*t, compute_dtype=torch.float32), (q, k, v, table), dout)
    low, low_grads = _grads(lambda *t: reference_fn(*t, compute_dtype=CPU_DTYPE), (q, k, v, table), dout)
    assert_within_reference_error(out, ref, low, "out")
    for name, grad, ref_grad, low_grad in zip("qkv", grads, ref_grads, low_grads):
        assert_within_reference_error(grad, ref_grad, low_grad, f"d{name}")
    dtable, ref_dtable = grads[3].float(), ref_grads[3].float()
    assert (dtable - ref_dtable).abs().max() <= 1e-2 * ref_dtable.abs().max()


def test_poisoned_buffers_varlen(poisoned_empty):
    """Packed layout with an empty sequence and a transposed grad_output under NaN-poisoned buffers."""
    q, k, v, table, dout, cu_q, cu_k = _packed([70, 0, 5], [9, 3, 70], 2, 12, CPU_DTYPE, seed=3)
    dout = dout.transpose(0, 1).contiguous().transpose(0, 1)
    bias = dict(bias_table=None, num_buckets=8, max_distance=12, causal=True, bidirectional=False)

    def kernel_fn(q, k, v, table):
        return t5_flash_attention_varlen(q, k, v, cu_q, cu_k, 70, 70, **{**bias, "bias_table": table})

    def reference_fn(q, k, v, table, compute_dtype):
        return t5_attention_varlen_reference(
            q, k, v, cu_q, cu_k, **{**bias, "bias_table": table}, compute_dtype=compute_dtype
        )

    _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", CPU_DTYPE)


# ----------------------------------------------------------------------------------------------- varlen


def _packed(lengths_q, lengths_k, heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q, dout = (torch.randn(total_q, heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    k, v = (torch.randn(total_k, heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    table = torch.randn(heads, 8, generator=gen).to(DEVICE)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, table, dout, cu_q, cu_k


@pytest.mark.parametrize(
    "lengths_q,lengths_k,causal,bidirectional",
    [
        ([37, 1, 150, 0, 64], [37, 1, 150, 0, 64], False, True),  # packed self-attention, an empty sequence
        ([37, 1, 150, 64], [37, 1, 150, 64], True, False),  # packed decoder self-attention
        ([20, 90, 33], [71, 15, 33], False, True),  # M != N per sequence
    ],
)
def test_varlen_matches_reference(lengths_q, lengths_k, causal, bidirectional):
    q, k, v, table, dout, cu_q, cu_k = _packed(lengths_q, lengths_k, 2, 32, CPU_DTYPE)
    kwargs = dict(bias_table=None, bidirectional=bidirectional, num_buckets=8, max_distance=12, causal=causal)

    def kernel_fn(q, k, v, table):
        return t5_flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), **{**kwargs, "bias_table": table})

    def reference_fn(q, k, v, table, compute_dtype):
        kw = {**kwargs, "bias_table": table, "compute_dtype": compute_dtype}
        return t5_attention_varlen_reference(q, k, v, cu_q, cu_k, **kw)

    _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", CPU_DTYPE)


def test_varlen_equals_padded_batch():
    """Packing is exact: the varlen kernel gives what the dense kernel gives on each unpadded sequence."""
    lengths = [45, 80]
    q, k, v, table, _, cu_q, cu_k = _packed(lengths, lengths, 2, 16, torch.float32, seed=4)
    packed = t5_flash_attention_varlen(q, k, v, cu_q, cu_k, 80, 80, bias_table=table, num_buckets=8, max_distance=12)
    for b in range(len(lengths)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        dense = t5_flash_attention(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)), bias_table=table,
                                   num_buckets=8, max_distance=12)  # fmt: skip
        torch.testing.assert_close(packed[rows], dense[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- per-distance table


def _distance_fns(radius, causal, bidirectional):
    """Kernel and reference with a per-distance table (H, 2 radius + 1) as their last argument."""

    def kernel_fn(q, k, v, table):
        return t5_flash_attention(q, k, v, distance_bias=table, bidirectional=bidirectional, causal=causal)

    def reference_fn(q, k, v, table, compute_dtype):
        return t5_attention_reference(
            q, k, v, distance_bias=table, bidirectional=bidirectional, causal=causal, compute_dtype=compute_dtype
        )

    return kernel_fn, reference_fn


@pytest.mark.parametrize(
    "causal,bidirectional,seqlen_q,seqlen_k,radius",
    [
        (False, True, 70, 70, 127),  # every distance its own column (FIRE's table)
        (True, False, 70, 70, 127),
        (False, True, 40, 75, 74),  # M != N, the radius just covering the longest distance
        (False, True, 70, 70, 20),  # distances past the radius read the edge columns
    ],
)
def test_distance_table_matches_reference(causal, bidirectional, seqlen_q, seqlen_k, radius):
    q, k, v, _, dout = _inputs(1, 2, seqlen_q, seqlen_k, 32, CPU_DTYPE if DEVICE == "cpu" else torch.bfloat16)
    table = torch.randn(2, 2 * radius + 1, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    low = CPU_DTYPE if DEVICE == "cpu" else torch.bfloat16
    _check_against_reference(*_distance_fns(radius, causal, bidirectional), (q, k, v, table), dout, "qkvt", low)


@pytest.mark.parametrize("causal,bidirectional", [(False, True), (True, False)])
def test_distance_table_of_t5_buckets_equals_bucket_table(causal, bidirectional):
    """T5's buckets spread over a per-distance table give T5's output, and the per-distance gradient gathered back
    to the buckets gives T5's table gradient (fp32, to rounding): every distance lands in its own column."""
    q, k, v, table, dout = _inputs(1, 2, 70, 70, 16, torch.float32, seed=2)
    radius = 69
    buckets = t5_relative_position_bucket(torch.arange(-radius, radius + 1), bidirectional, 8, 12).to(DEVICE)
    kw = dict(bidirectional=bidirectional, causal=causal)
    out, grads = _grads(
        lambda q, k, v, t: t5_flash_attention(q, k, v, bias_table=t, num_buckets=8, max_distance=12, **kw),
        (q, k, v, table), dout,
    )  # fmt: skip
    spread, spread_grads = _grads(
        lambda q, k, v, t: t5_flash_attention(q, k, v, distance_bias=t[:, buckets], **kw), (q, k, v, table), dout
    )
    torch.testing.assert_close(spread, out, atol=1e-6, rtol=1e-6)
    for name, g, r in zip("qkvt", spread_grads, grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=f"d{name}")


def test_distance_table_varlen_and_packed_match_reference():
    """The varlen and packed q/k/v APIs take the per-distance table too (sequences restart at position 0)."""
    lengths = [37, 1, 70]
    q, k, v, _, dout, cu_q, cu_k = _packed(lengths, lengths, 2, 16, torch.float32, seed=6)
    table = torch.randn(2, 2 * 69 + 1, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kw = dict(distance_bias=table, bidirectional=False, causal=True)
    out = t5_flash_attention_varlen(q, k, v, cu_q, cu_k, 70, 70, **kw)
    ref = t5_attention_varlen_reference(q, k, v, cu_q, cu_k, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    packed = t5_flash_attention_varlen_qkvpacked(torch.stack((q, k, v), dim=1), cu_q, 70, **kw)
    torch.testing.assert_close(packed, out, atol=1e-6, rtol=1e-6)


def test_distance_table_custom_op_and_compile():
    """A per-distance table travels through the same custom op (as the bias table, ``max_distance=0``): opcheck, and
    torch.compile(fullgraph=True) gives the eager values and gradients."""
    q, k, v, _, dout = _inputs(1, 2, 20, 24, 16, torch.float32)
    table = torch.randn(2, 2 * 31 + 1, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), table, None, None, None, None, 20, 24, True,
            63, 0, False, 1.0)  # fmt: skip
    torch.library.opcheck(torch.ops.fat5.t5_flash_attention_fwd.default, args)

    def f(q, k, v, table):
        return (t5_flash_attention(q, k, v, distance_bias=table) * dout).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(f(q, k, v, table), (q, k, v, table))
    got = torch.autograd.grad(compiled(q, k, v, table), (q, k, v, table))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_distance_table_gradient_capacity():
    """The backward differentiates up to MAX_TABLE_SEGMENTS segments (2R + 1 bidirectional, R + 1 causal, padded to a
    power of two); a larger table that needs a gradient is refused before launch, and serves forward-only calls."""
    from fat5_kernels.attention import MAX_TABLE_SEGMENTS, distance_table_has_gradient

    assert MAX_TABLE_SEGMENTS == 8192
    assert distance_table_has_gradient(4095, True) and not distance_table_has_gradient(4096, True)
    assert distance_table_has_gradient(8191, False) and not distance_table_has_gradient(8192, False)
    q, k, v, _, _ = _inputs(1, 2, 16, 16, 16, torch.float32)
    table = torch.zeros(2, 2 * 4096 + 1, device=DEVICE)
    with pytest.raises(ValueError, match="radius 4096 needs a gradient"):
        t5_flash_attention(q, k, v, distance_bias=table.requires_grad_())
    with torch.no_grad():
        out = t5_flash_attention(q, k, v, distance_bias=table)
    torch.testing.assert_close(out, t5_attention_reference(q, k, v), atol=1e-5, rtol=1e-5)  # a zero bias


def test_distance_table_bad_inputs():
    q, k, v, table, _ = _inputs(1, 2, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="2R \\+ 1"):
        t5_flash_attention(q, k, v, distance_bias=torch.zeros(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="either bias_table"):
        t5_flash_attention(q, k, v, bias_table=table, distance_bias=torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="2 heads"):
        t5_flash_attention(q, k, v, distance_bias=torch.zeros(3, 9, device=DEVICE))


# ----------------------------------------------------------------------------------------------- API


def test_bad_inputs_raise_before_launch():
    q, k, v, table, _ = _inputs(2, 2, 16, 16, 16, CPU_DTYPE)
    kw = dict(num_buckets=8, max_distance=12)
    with pytest.raises(ValueError, match="4-D"):
        t5_flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v"):
        t5_flash_attention(q, k[:1], v[:1])
    with pytest.raises(TypeError, match="one dtype"):
        t5_flash_attention(q, k.float(), v)
    with pytest.raises(TypeError, match="dtype"):
        t5_flash_attention(q.to(torch.float64), k.to(torch.float64), v.to(torch.float64))
    with pytest.raises(ValueError, match="head_dim"):
        t5_flash_attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="contiguous last"):
        t5_flash_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    with pytest.raises(ValueError, match="bias_table has shape"):
        t5_flash_attention(q, k, v, bias_table=table[:, :4], **kw)
    with pytest.raises(ValueError, match="either bias_table"):
        t5_flash_attention(q, k, v, bias_table=table, alibi_slopes=torch.ones(2, device=DEVICE), **kw)
    with pytest.raises(ValueError, match="alibi_slopes"):
        t5_flash_attention(q, k, v, alibi_slopes=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="max_distance"):
        t5_flash_attention(q, k, v, bias_table=table, num_buckets=8, max_distance=2)
    with pytest.raises(ValueError, match="key_padding_mask"):
        t5_flash_attention(q, k, v, key_padding_mask=torch.ones(2, 15, dtype=torch.bool, device=DEVICE))
    # varlen
    qp, kp, vp = (t.transpose(1, 2).reshape(32, 2, 16) for t in (q, k, v))
    good = torch.tensor([0, 16, 32], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        t5_flash_attention_varlen(qp, kp, vp, good.long(), good, 16, 16)
    with pytest.raises(ValueError, match="non-decreasing"):
        t5_flash_attention_varlen(qp, kp, vp, torch.tensor([0, 20, 12, 32], dtype=torch.int32, device=DEVICE),
                                  torch.tensor([0, 20, 12, 32], dtype=torch.int32, device=DEVICE), 20, 20)  # fmt: skip
    with pytest.raises(ValueError, match="end at the number"):
        t5_flash_attention_varlen(qp, kp, vp, good - 0, torch.tensor([0, 16, 30], dtype=torch.int32, device=DEVICE), 16, 16)
    with pytest.raises(ValueError, match="max_seqlen"):
        t5_flash_attention_varlen(qp, kp, vp, good, good, 8, 16)
    with pytest.raises(ValueError, match="batch sizes"):
        t5_flash_attention_varlen(qp, kp, vp, good, good[:2], 16, 16)


@pytest.mark.parametrize("batch,seqlen_q,seqlen_k", [(0, 8, 8), (1, 0, 8), (1, 8, 0)])
def test_empty_inputs(batch, seqlen_q, seqlen_k):
    """No batch, no query or no key: zeros out (a query without keys attends to nothing), zero gradients."""
    q, k, v, table, _ = _inputs(batch, 2, seqlen_q, seqlen_k, 16, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v, table)]
    out = t5_flash_attention(*leaves[:3], bias_table=leaves[3], num_buckets=8, max_distance=12)
    assert out.shape == (batch, 2, seqlen_q, 16) and torch.all(out == 0)
    for g in torch.autograd.grad(out.sum(), leaves):
        assert torch.all(g == 0)


def test_cu_seqlens_checked_again_after_in_place_change():
    q, k, v, _, _, cu_q, cu_k = _packed([10, 6], [10, 6], 2, 16, torch.float32)
    t5_flash_attention_varlen(q, k, v, cu_q, cu_k, 10, 10)
    cu_k.copy_(torch.tensor([0, 12, 16], dtype=torch.int32))  # now longer than max_seqlen_k
    with pytest.raises(ValueError, match="max_seqlen"):
        t5_flash_attention_varlen(q, k, v, cu_q, cu_k, 10, 10)


def test_table_gradient_is_deterministic():
    q, k, v, table, dout = _inputs(2, 2, 140, 140, 16, CPU_DTYPE, seed=5)
    table.requires_grad_(True)
    grads = []
    for _ in range(2):
        out = t5_flash_attention(q, k, v, bias_table=table, num_buckets=8, max_distance=12)
        (g,) = torch.autograd.grad(out, table, dout)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])


def test_custom_op_opcheck_and_compile():
    """The custom ops pass torch.library.opcheck, agree with the eager autograd.Function bit for bit, and
    torch.compile(fullgraph=True) traces through them."""
    q, k, v, table, dout = _inputs(1, 2, 20, 24, 16, torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), table.requires_grad_(), None, None, None,
            None, 20, 24, True, 8, 12, False, 1.0)  # fmt: skip
    torch.library.opcheck(torch.ops.fat5.t5_flash_attention_fwd.default, args)
    via_op = torch.ops.fat5.t5_flash_attention_fwd(*args)[0]
    via_function = t5_flash_attention(q, k, v, bias_table=table, num_buckets=8, max_distance=12)
    assert torch.equal(via_op, via_function)
    for g_op, g_fn in zip(torch.autograd.grad(via_op, args[:4], dout), torch.autograd.grad(via_function, args[:4], dout)):
        assert torch.equal(g_op, g_fn)

    def f(q, k, v, table):
        return t5_flash_attention(q, k, v, bias_table=table, num_buckets=8, max_distance=12).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(f(q, k, v, table), (q, k, v, table))
    got = torch.autograd.grad(compiled(q, k, v, table), (q, k, v, table))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_compile_fullgraph_before_any_eager_call():
    """Input validation is plain Python: a first call under torch.compile(fullgraph=True), with bucket parameters
    no eager call has built a layout for, traces without a graph break."""
    q, k, v, table, _ = _inputs(1, 2, 20, 24, 16, torch.float32, num_buckets=10)
    q, k, v, table = (t.requires_grad_() for t in (q, k, v, table))

    def f(q, k, v, table):
        return t5_flash_attention(q, k, v, bias_table=table, num_buckets=10, max_distance=23).sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, table), (q, k, v, table))
    for e, g in zip(torch.autograd.grad(f(q, k, v, table), (q, k, v, table)), got):
        torch.testing.assert_close(g, e)


def test_custom_op_with_transposed_table_view():
    """The model passes its (num_buckets, heads) parameter as a transposed view: the backward's fake must give the
    table gradient the real op's (contiguous) strides, or torch.compile fails its stride check."""
    q, k, v, table, dout = _inputs(1, 2, 20, 24, 16, torch.float32)
    table_param = table.t().contiguous().requires_grad_()  # stored as (num_buckets, heads), like the model's
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), table_param.t(), None, None, None, None,
            20, 24, True, 8, 12, False, 1.0)  # fmt: skip
    out, lse = torch.ops.fat5.t5_flash_attention_fwd(*args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    bwd_args = (dout, *detached[:3], out.detach(), lse.detach(), *detached[3:], True)
    torch.library.opcheck(torch.ops.fat5.t5_flash_attention_bwd.default, bwd_args)

    def f(q, k, v, table_param):
        return (t5_flash_attention(q, k, v, bias_table=table_param.t(), num_buckets=8, max_distance=12) * dout).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(f(q, k, v, table_param), (q, k, v, table_param))
    got = torch.autograd.grad(compiled(q, k, v, table_param), (q, k, v, table_param))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------------------------------------- GPU


def _qkvpacked_and_separate(qkv, table, dout, packed_fn, separate_fn, split):
    """Outputs and gradients of `packed_fn(qkv, table)` and of `separate_fn(*split(qkv), table)` on copies."""
    results = []
    for fn in (lambda x, t: packed_fn(x, t), lambda x, t: separate_fn(*split(x), t)):
        leaves = [qkv.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()]
        out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    return results


@pytest.mark.parametrize("causal,bidirectional", [(False, True), (True, False)])
def test_qkvpacked_equals_separate_q_k_v(poisoned_empty, causal, bidirectional):
    """The packed API runs the same kernels on views of the packed tensor: outputs, the packed gradient and the
    table gradient are bit for bit those of separate q, k, v (with a padding mask, an empty row, a partial
    block, head_dim 12), and the gradient of qkv is one contiguous tensor, every element written."""
    gen = torch.Generator().manual_seed(11)
    batch, length, heads, head_dim = 3, 70, 2, 12
    qkv = torch.randn(batch, length, 3, heads, head_dim, generator=gen).to(DEVICE, CPU_DTYPE)
    table = torch.randn(heads, 8, generator=gen).to(DEVICE)
    dout = torch.randn(batch, length, heads, head_dim, generator=gen).to(DEVICE, CPU_DTYPE)
    mask = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    mask[1, 40:] = False
    mask[2] = False
    kwargs = dict(bidirectional=bidirectional, num_buckets=8, max_distance=12, causal=causal, key_padding_mask=mask)
    packed, separate = _qkvpacked_and_separate(
        qkv, table, dout,
        lambda x, t: t5_flash_attention_qkvpacked(x, bias_table=t, **kwargs),
        lambda q, k, v, t: t5_flash_attention(q, k, v, bias_table=t, **kwargs).transpose(1, 2),
        lambda x: [t.transpose(1, 2) for t in x.unbind(2)],
    )  # fmt: skip
    assert packed[0].shape == (batch, length, heads, head_dim)
    assert packed[1].shape == qkv.shape and packed[1].is_contiguous()
    for got, expected in zip(packed, separate):
        assert torch.equal(got, expected)


def test_varlen_qkvpacked_equals_separate_q_k_v(poisoned_empty):
    q, k, v, table, dout, cu, _ = _packed([37, 0, 90, 5], [37, 0, 90, 5], 2, 16, CPU_DTYPE, seed=4)
    qkv = torch.stack([q, k, v], dim=1)
    kwargs = dict(bidirectional=False, num_buckets=8, max_distance=12, causal=True)
    packed, separate = _qkvpacked_and_separate(
        qkv, table, dout,
        lambda x, t: t5_flash_attention_varlen_qkvpacked(x, cu, 90, bias_table=t, **kwargs),
        lambda q, k, v, t: t5_flash_attention_varlen(q, k, v, cu, cu, 90, 90, bias_table=t, **kwargs),
        lambda x: x.unbind(1),
    )  # fmt: skip
    for got, expected in zip(packed, separate):
        assert torch.equal(got, expected)


def test_qkvpacked_custom_op_and_compile():
    """The packed custom ops pass opcheck and agree with the eager function; torch.compile traces them."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 20, 3, 2, 16, generator=gen).to(DEVICE).requires_grad_()
    table = torch.randn(2, 8, generator=gen).to(DEVICE).requires_grad_()
    args = (qkv, table, None, None, None, 20, True, 8, 12, False, 1.0)
    torch.library.opcheck(torch.ops.fat5.t5_flash_attention_qkvpacked_fwd.default, args)

    def f(qkv, table):
        return (t5_flash_attention_qkvpacked(qkv, bias_table=table, num_buckets=8, max_distance=12) ** 2).sum()

    expected = torch.autograd.grad(f(qkv, table), (qkv, table))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(qkv, table), (qkv, table))
    for e, g in zip(expected, got):
        assert torch.equal(g, e)


def test_qkvpacked_bad_inputs_raise_before_launch():
    qkv = torch.randn(2, 10, 3, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(batch, length, 3, heads, head_dim\)"):
        t5_flash_attention_qkvpacked(qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"\(batch, length, 3, heads, head_dim\)"):
        t5_flash_attention_qkvpacked(qkv[0])
    with pytest.raises(ValueError, match="bias_table has shape"):
        t5_flash_attention_qkvpacked(qkv, bias_table=torch.zeros(3, 32, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask"):
        t5_flash_attention_qkvpacked(qkv, key_padding_mask=torch.ones(2, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(total_tokens, 3, heads, head_dim\)"):
        t5_flash_attention_varlen_qkvpacked(qkv, torch.tensor([0, 20], dtype=torch.int32, device=DEVICE), 10)
    with pytest.raises(ValueError, match="int32"):
        t5_flash_attention_varlen_qkvpacked(qkv.flatten(0, 1), torch.tensor([0, 20], device=DEVICE), 20)
    with pytest.raises(ValueError, match="max_seqlen"):
        t5_flash_attention_varlen_qkvpacked(qkv.flatten(0, 1), torch.tensor([0, 20], dtype=torch.int32, device=DEVICE), 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "bias,causal,bidirectional,seqlen_q,seqlen_k,head_dim",
    [
        ("t5", False, True, 1024, 1024, 64),
        ("t5", True, False, 1000, 1000, 128),
        ("t5", False, True, 777, 2049, 128),
        ("alibi", True, True, 1500, 1500, 64),
        ("none", False, True, 513, 1000, 64),
        ("t5", False, True, 700, 700, 256),  # the wide-head tiles
        ("t5", True, False, 600, 600, 160),
    ],
)
def test_gpu_large_shapes(dtype, bias, causal, bidirectional, seqlen_q, seqlen_k, head_dim):
    q, k, v, table, dout = _inputs(2, 4, seqlen_q, seqlen_k, head_dim, dtype, num_buckets=32, table_scale=0.5)
    kernel_fn, reference_fn = _dense_fns(bias, causal, bidirectional, 32, 128)
    _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", dtype)


@pytest.mark.gpu
def test_gpu_direct_launch_serves_repeat_calls_and_respects_alignment(monkeypatch):
    """Repeat calls launch the cached binaries without ``JITFunction.run`` (`CompiledLaunches`), and a call whose
    tensors sit at another 16-byte alignment (same shapes and strides) goes through it: the cached binary may
    assume aligned addresses. Every call's output and gradients stay within the reference error."""
    from fat5_kernels import attention_bwd, attention_fwd

    q, k, v, table, dout = _inputs(2, 4, 300, 300, 64, torch.bfloat16, num_buckets=32, table_scale=0.5)
    kernel_fn, reference_fn = _dense_fns("t5", False, True, 32, 128)
    ref, ref_grads = _grads(lambda *t: reference_fn(*t, compute_dtype=torch.float32), (q, k, v, table), dout)
    low, low_grads = _grads(lambda *t: reference_fn(*t, compute_dtype=torch.bfloat16), (q, k, v, table), dout)

    def misaligned(t):  # the same values, shape and strides, 2 bytes past a 16-byte boundary
        buffer = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
        view = buffer[1:].view(t.shape)
        view.copy_(t)
        return view

    jit_runs = []
    jit_functions = (
        attention_fwd._t5_attn_fwd_kernel.fn, attention_bwd._bwd_dq_kernel.fn, attention_bwd._bwd_dkdv_kernel.fn,
        attention_fwd._distance_bias_kernel, attention_bwd._table_grad_kernel,
    )  # fmt: skip
    for fn in jit_functions:
        monkeypatch.setattr(fn, "run", lambda *a, _run=fn.run, **kw: jit_runs.append(1) or _run(*a, **kw))
    # the first call may tune, the second fills the direct-launch cache, the third must be served from it
    calls = [((q, k, v), None), ((q, k, v), None), ((q, k, v), False), (tuple(map(misaligned, (q, k, v))), True)]
    for inputs, via_jit in calls:
        leaves = [t.detach().requires_grad_() for t in (*inputs, table)]
        jit_runs.clear()
        out = kernel_fn(*leaves)
        out.backward(dout)
        if via_jit is not None:
            assert bool(jit_runs) == via_jit, f"JITFunction.run calls: {len(jit_runs)}"
        assert_within_reference_error(out, ref, low, "out")
        for name, leaf, r, lg in zip("qkvt", leaves, ref_grads, low_grads):
            assert_within_reference_error(leaf.grad, r, lg, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_varlen_padding_and_determinism(dtype):
    lengths = [1000, 17, 512, 333]
    q, k, v, _, dout, cu_q, cu_k = _packed(lengths, lengths, 4, 64, dtype, seed=7)
    table = torch.randn(4, 32, device=DEVICE) * 0.5

    def kernel_fn(q, k, v, table):
        return t5_flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths), max(lengths), bias_table=table)

    def reference_fn(q, k, v, table, compute_dtype):
        return t5_attention_varlen_reference(q, k, v, cu_q, cu_k, bias_table=table, compute_dtype=compute_dtype)

    _check_against_reference(kernel_fn, reference_fn, (q, k, v, table), dout, "qkvt", dtype)
    grads = [_grads(kernel_fn, (q, k, v, table), dout)[1] for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)  # dq, dk, dv and the table gradient are bitwise reproducible


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    q, k, v, table, dout = _inputs(2, 4, 512, 512, 64, torch.bfloat16, num_buckets=32)
    table.requires_grad_(True)

    def f(q, k, v, table):
        return t5_flash_attention(q, k, v, bias_table=table) * 2

    out = torch.compile(f, fullgraph=True)(q, k, v, table)
    torch.testing.assert_close(out, f(q, k, v, table))


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_key_padding_mask():
    """The model builds the bool key mask inside the compiled graph (`attention_mask.bool()`); Inductor must lower
    what the wrapper does to it (a `.view(torch.uint8)` of a bool tensor it could not, torch 2.11)."""
    q, k, v, table, dout = _inputs(2, 4, 300, 300, 64, torch.bfloat16, num_buckets=32)
    q, k, v, table = (t.requires_grad_() for t in (q, k, v, table))
    attention_mask = torch.ones(2, 300, dtype=torch.long, device=DEVICE)
    attention_mask[1, 200:] = 0

    def f(q, k, v, table, attention_mask):
        out = t5_flash_attention(q, k, v, bias_table=table, key_padding_mask=attention_mask.bool())
        return (out.float() * dout.float()).sum()

    expected = torch.autograd.grad(f(q, k, v, table, attention_mask), (q, k, v, table))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v, table, attention_mask), (q, k, v, table))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


_AUTOTUNED_FIRST_CALL = """
import torch
from fat5_kernels.attention import t5_flash_attention
from fat5_kernels.attention_reference import t5_attention_reference
torch.manual_seed(0)
q, k, v = (torch.randn(4, 4, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
table = (torch.randn(4, 32, device="cuda") * 0.5).requires_grad_()
dout = torch.randn_like(q)
for causal in (False, True):
    kw = dict(bias_table=table, bidirectional=not causal, causal=causal)
    got = torch.autograd.grad(t5_flash_attention(q, k, v, **kw), table, dout)[0]  # first call: autotunes
    ref = torch.autograd.grad(t5_attention_reference(q, k, v, **kw), table, dout)[0]
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 3e-2, (causal, err)
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_autotuned_first_call_table_gradient():
    """With autotuning on, the call that tunes must already return the right table gradient (trial runs of
    other configs must not leave partial sums behind). Runs in a subprocess: the switch is read at import."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FAT5_ATTENTION_AUTOTUNE": "1"}
    result = subprocess.run([sys.executable, "-c", _AUTOTUNED_FIRST_CALL], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
