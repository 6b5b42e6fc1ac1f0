"""Speed and memory of attention with a learned T5 relative-position bias, on one GPU, in one process.

Implementations, measured side by side for every (causal, L, D):
  fat5       - fat5_kernels.t5_flash_attention: bias computed in the kernel, deterministic table gradient
  eager      - HF T5 style: materialized (1, H, L, L) bias, matmul + softmax in fp32
  sdpa_bias  - torch SDPA with the materialized bias as attn_mask
  flex       - torch FlexAttention (compiled), T5 bucket in score_mod
  nobias     - torch SDPA flash without any bias: the ceiling
  fat5_alibi - the same kernel with ALiBi slopes instead of a table (position_encoding_type="alibi")
  fat5_rope  - the RoPE pre-pass kernel on q and k, then the kernel without bias (position_encoding_type="rope")
  fat5_fire  - FIRE's per-distance table (H, 2R + 1) built from its MLP, read by the kernel, its gradient back to
               FIRE's parameters (position_encoding_type="fire", threshold = L); up to --fire-max-l
  fat5_fire_past - FIRE past its threshold (L / 8): evaluated per element in the kernel from its compact
               parameters, the gradients of its parameters summed per segment in the backward (no table)

16,384 tokens per batch (B = 16384 / L), H = 12, bf16, T5 buckets (32, max distance 128; the causal rows use
the decoder's unidirectional buckets), softmax scale 1.0. Forward+backward includes the table gradient
(except nobias). TFLOP/s count 4*B*H*L^2*D per forward (halved when causal), 3.5x that for forward+backward.
fat5 and nobias, whose ratios are the targets, are timed --repeats times, alternating; a row reports its best run
(the median of one `triton.testing.do_bench`) and keeps every run in ``fwd_ms_runs`` / ``fwdbwd_ms_runs``. They
are also timed replayed from CUDA graphs (``fwd_ms_graph`` / ``fwdbwd_ms_graph``, `do_bench_cudagraph`): GPU
time without the host's, which bounds eager calls at short lengths.
Peak extra memory: max allocated during one forward+backward minus what was allocated before it.

Writes benchmarks/results/attention.json and attention.md (or --out) through ``results_io``.
Usage: python benchmarks/attention.py [--impls fat5,nobias,...] [--seqs 512,1024] [--dims 64,128] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # fat5_hf (FIRE's module)

import triton  # noqa: E402
from results_io import environment, read_results, write_results  # noqa: E402

from fat5_kernels.attention import t5_flash_attention  # noqa: E402
from fat5_kernels.attention_reference import t5_relative_position_bucket  # noqa: E402
from fat5_kernels.rope import rope  # noqa: E402

NUM_BUCKETS, MAX_DISTANCE = 32, 128
DEVICE = "cuda"
# materialized (L, L) baselines above this length take minutes per point or run out of memory
MATERIALIZED_MAX_L = 4096
FLEX_MAX_L = 16384
REFERENCE_MAX_L = 2048  # fp32 reference (for the error columns) only up to here


def materialized_bias(table, M, N, causal):
    rel = torch.arange(N, device=DEVICE)[None, :] - torch.arange(M, device=DEVICE)[:, None]
    bias = table[:, t5_relative_position_bucket(rel, not causal, NUM_BUCKETS, MAX_DISTANCE)]  # (H, M, N)
    if causal:
        bias = bias.masked_fill(rel[None] > 0, float("-inf"))
    return bias.unsqueeze(0)


def impl_eager(q, k, v, table, causal):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() + materialized_bias(table, q.shape[2], k.shape[2], causal)
    return torch.matmul(torch.softmax(scores, -1).to(q.dtype), v)


def impl_sdpa_bias(q, k, v, table, causal):
    bias = materialized_bias(table, q.shape[2], k.shape[2], causal).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[0], -1, -1, -1), scale=1.0)


def impl_nobias(q, k, v, table, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)


def impl_fat5(q, k, v, table, causal):
    return t5_flash_attention(
        q, k, v, bias_table=table, bidirectional=not causal, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE,
        causal=causal,
    )  # fmt: skip


def impl_fat5_alibi(q, k, v, table, causal):
    slopes = torch.exp2(-8.0 / q.shape[1] * torch.arange(1, q.shape[1] + 1, device=DEVICE, dtype=torch.float32))
    return t5_flash_attention(q, k, v, alibi_slopes=slopes, causal=causal)


@functools.lru_cache(maxsize=8)
def _rope_angles(L: int, D: int):
    angles = torch.arange(L, device=DEVICE, dtype=torch.float32)[:, None] * 10000.0 ** (
        -torch.arange(D // 2, device=DEVICE, dtype=torch.float32) * 2 / D
    )
    return angles.cos(), angles.sin()


def impl_fat5_rope(q, k, v, table, causal):
    # the model's layout: q and k rotated as (B, L, H, D), attended as (B, H, L, D) views
    q_rot, k_rot = rope(q.transpose(1, 2), k.transpose(1, 2), *_rope_angles(q.shape[2], q.shape[3]))
    return t5_flash_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2), v, causal=causal)


@functools.lru_cache(maxsize=8)
def _fire(H: int, L: int, causal: bool, threshold: float | None = None):
    """FIRE as the model builds it (MLP width 32, c = 1), its threshold at L by default: every query is below it."""
    threshold = float(L) if threshold is None else threshold
    from fat5_hf.position_encoding import FIREPositionBias

    fire = FIREPositionBias(num_heads=H, width=32, threshold=threshold, bidirectional=not causal).to(DEVICE)
    with torch.no_grad():
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        for parameter in fire.mlp.parameters():
            parameter.copy_(torch.randn(parameter.shape, device=DEVICE, generator=gen) * 0.5)
        fire.distance_scale.fill_(1.0)
        fire.threshold.fill_(threshold)
    return fire


def impl_fat5_fire(q, k, v, table, causal):
    # the model's kernel path: the table is built once per stack forward, from FIRE's parameters (with autograd)
    fire = _fire(q.shape[1], q.shape[2], causal)
    distance_bias = fire.kernel_table(max(q.shape[2], k.shape[2]))
    return t5_flash_attention(q, k, v, distance_bias=distance_bias, bidirectional=not causal, causal=causal)


def impl_fat5_fire_past(q, k, v, table, causal):
    # past the threshold the model hands the kernel FIRE's compact parameters (with autograd), evaluated per element
    fire = _fire(q.shape[1], q.shape[2], causal, q.shape[2] / 8)
    return t5_flash_attention(q, k, v, fire_bias=fire.kernel_fire_bias(), bidirectional=not causal, causal=causal)


def _flex_bucket(rel, bidirectional):
    # T5 buckets with ops FlexAttention's score_mod can trace (same maths as t5_relative_position_bucket)
    nb = NUM_BUCKETS
    out = torch.zeros_like(rel)
    if bidirectional:
        nb //= 2
        out = out + (rel > 0).to(rel.dtype) * nb
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = nb // 2
    large = max_exact + (
        torch.log(rel.float().clamp(min=1) / max_exact) / math.log(MAX_DISTANCE / max_exact) * (nb - max_exact)
    ).to(rel.dtype)
    return out + torch.where(rel < max_exact, rel, torch.clamp(large, max=nb - 1))


_flex_cache: dict = {}


def impl_flex(q, k, v, table, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex_cache:
        _flex_cache["fn"] = torch.compile(flex_attention, dynamic=False)
    M, N = q.shape[2], k.shape[2]
    key = (M, N, causal)
    if key not in _flex_cache:
        _flex_cache[key] = (
            create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, M, N, device=DEVICE) if causal else None
        )

    def score_mod(score, b, h, qi, ki):
        return score + table[h, _flex_bucket(ki - qi, not causal)]

    return _flex_cache["fn"](q, k, v, score_mod=score_mod, block_mask=_flex_cache[key], scale=1.0)


IMPLS = dict(
    fat5=impl_fat5, eager=impl_eager, sdpa_bias=impl_sdpa_bias, flex=impl_flex, nobias=impl_nobias,
    fat5_alibi=impl_fat5_alibi, fat5_rope=impl_fat5_rope, fat5_fire=impl_fat5_fire,
    fat5_fire_past=impl_fat5_fire_past,
)  # fmt: skip
# The kernels measured against the no-bias ceiling (the targets table); fat5 computes T5's bias, the others another
# function than the fp32 T5 reference (no error columns).
TARGET_IMPLS = ("fat5", "fat5_alibi", "fat5_rope", "fat5_fire", "fat5_fire_past")


def flops(B, H, L, D, causal, mode):
    f = 4 * B * H * L * L * D / (2 if causal else 1)
    return f * (1.0 if mode == "fwd" else 3.5)


def skip_reason(name, L, D, args):
    if name in ("eager", "sdpa_bias") and L > MATERIALIZED_MAX_L:
        return f"materialized (L, L) bias: skipped above L={MATERIALIZED_MAX_L} (seconds per step, tens of GB)"
    if name == "flex" and (L > FLEX_MAX_L or (args.flex_dims and D not in args.flex_dims)):
        return f"FlexAttention compiles per shape: measured only for D in --flex-dims and L <= {FLEX_MAX_L}"
    if name == "fat5_fire" and L > args.fire_max_l:
        return (
            f"FIRE's table has a segment per distance, and the backward sums each band tile over every segment: "
            f"measured up to L={args.fire_max_l} (--fire-max-l)"
        )
    return None


def measure(name, fn, q, k, v, table, do, causal, reference):
    row = {}
    out = fn(q, k, v, table, causal).detach()
    if reference is not None:
        ref_out, ref_grads = reference
        row["rel_err"] = float((out.float() - ref_out).norm() / ref_out.norm())

    def step():
        fn(q, k, v, table, causal).backward(do)

    step()
    if reference is not None and table.grad is not None:
        row["dtable_rel_err"] = float((table.grad - ref_grads[3]).norm() / ref_grads[3].norm())
        row["dq_rel_err"] = float((q.grad.float() - ref_grads[0]).norm() / ref_grads[0].norm())
    row["table_grad"] = table.grad is not None and bool(table.grad.abs().sum() > 0)
    q.grad = k.grad = v.grad = table.grad = None
    fwd_ms, fwdbwd_ms = timings(fn, q, k, v, table, do, causal)
    row["fwd_ms_runs"], row["fwdbwd_ms_runs"] = [fwd_ms], [fwdbwd_ms]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    row["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def _fwd_and_fwdbwd_ms(bench, fn, q, k, v, table, do, causal) -> tuple[float, float]:
    """Median ms of the forward and of forward+backward, each timed by ``bench`` (a `triton.testing` timer)."""
    fwd = bench(lambda: fn(q, k, v, table, causal), return_mode="median")

    def step():
        fn(q, k, v, table, causal).backward(do)

    fwdbwd = bench(step, grad_to_none=[q, k, v, table], return_mode="median")
    q.grad = k.grad = v.grad = table.grad = None
    return fwd, fwdbwd


def timings(fn, q, k, v, table, do, causal) -> tuple[float, float]:
    """Median ms of the forward and of forward+backward (`triton.testing.do_bench`)."""
    bench = functools.partial(triton.testing.do_bench, warmup=25, rep=100)
    return _fwd_and_fwdbwd_ms(bench, fn, q, k, v, table, do, causal)


def graph_timings(fn, q, k, v, table, do, causal) -> tuple[float, float]:
    """Median ms of the forward and of forward+backward replayed from CUDA graphs
    (`triton.testing.do_bench_cudagraph`): the GPU's time without the host's, as a training step captured in a
    graph (the pretraining recipe's default) sees it. At short lengths the eager timings above are bound by the
    host: one fat5 fwd+bwd at L=512 costs about 1 ms of Python and launches for 0.5 ms of kernels."""
    bench = functools.partial(triton.testing.do_bench_cudagraph, rep=100)
    return _fwd_and_fwdbwd_ms(bench, fn, q, k, v, table, do, causal)


def set_best_times(row: dict, B: int, H: int, L: int, D: int, causal: bool) -> None:
    """``fwd_ms`` / ``fwdbwd_ms`` (and TFLOP/s) from the best of the row's timed runs (``*_ms_runs``, kept): the
    GPUs we measure on have phases in which a whole measurement runs 1.5-3x slower. The same for the CUDA-graph
    timings (``*_ms_graph``) where the row has them."""
    for suffix in ("", "_graph"):
        if f"fwd_ms{suffix}_runs" not in row:
            continue
        for mode in ("fwd", "fwdbwd"):
            row[f"{mode}_ms{suffix}"] = best = min(row[f"{mode}_ms{suffix}_runs"])
            row[f"{mode}_tflops{suffix}"] = flops(B, H, L, D, causal, mode) / best / 1e9


def fp32_reference(q, k, v, table, do, causal):
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    tf = table.detach().clone().requires_grad_()
    scores = qf @ kf.transpose(-1, -2) + materialized_bias(tf, q.shape[2], k.shape[2], causal)
    out = torch.softmax(scores, -1) @ vf
    grads = torch.autograd.grad(out, (qf, kf, vf, tf), do.float())
    return out.detach(), grads


def profile(args):
    """Where fat5's time goes: CUDA time per kernel (torch.profiler) and host time per call."""
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for D in [int(d) for d in args.dims.split(",")]:
        for causal in [bool(int(c)) for c in args.causal.split(",")]:
            for L in [int(s) for s in args.seqs.split(",") if s]:
                B, H = max(1, args.tokens // L), args.heads
                q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
                table = (torch.randn(H, NUM_BUCKETS, device=DEVICE) * 0.5).requires_grad_()
                do = torch.randn_like(q)
                for name in args.impls.split(","):
                    fn = IMPLS[name]
                    for _ in range(3):
                        fn(q, k, v, table, causal).backward(do)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(20):
                        fn(q, k, v, table, causal).backward(do)
                    host = (time.perf_counter() - start) / 20
                    torch.cuda.synchronize()
                    total = (time.perf_counter() - start) / 20
                    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            fn(q, k, v, table, causal).backward(do)
                        torch.cuda.synchronize()
                    print(f"== {name} D={D} causal={causal} L={L}: host {host * 1e3:.3f} ms/step, wall {total * 1e3:.3f} ms/step")
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
                    q.grad = k.grad = v.grad = table.grad = None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="fat5,nobias,sdpa_bias,eager,flex")
    parser.add_argument("--seqs", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--long-seqs", default="32768", help="extra lengths run for the fat5 kernels and nobias only")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--flex-dims", default="64")
    parser.add_argument("--fire-max-l", type=int, default=2048, help="longest L of the fat5_fire case")
    parser.add_argument("--causal", default="0,1")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--profile", action="store_true", help="print per-kernel CUDA time and host time instead")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed runs of the fat5 kernels and nobias per point, alternating; each row reports its best run and keeps all",
    )
    parser.add_argument(
        "--keep-existing",
        action="store_true",
        help="keep the rows of the results file already in --out for points this run does not measure (one "
        "head_dim per GPU call, say); every row carries its run's date and device",
    )
    args = parser.parse_args()
    if args.profile:
        return profile(args)
    args.flex_dims = [int(d) for d in args.flex_dims.split(",") if d]
    names = args.impls.split(",")
    dtype = torch.bfloat16
    env = environment()
    print(json.dumps(env), flush=True)
    rows = []
    json_path = os.path.join(args.out, "attention.json")
    earlier = read_results(json_path)["rows"] if args.keep_existing and os.path.exists(json_path) else []
    seqs = [int(s) for s in args.seqs.split(",") if s]
    long_seqs = [int(s) for s in args.long_seqs.split(",") if s]
    for D in [int(d) for d in args.dims.split(",")]:
        for causal in [bool(int(c)) for c in args.causal.split(",")]:
            for L in seqs + long_seqs:
                B = max(1, args.tokens // L)
                H = args.heads
                gen = torch.Generator(device=DEVICE).manual_seed(L + D)
                q, k, v = (
                    torch.randn(B, H, L, D, device=DEVICE, dtype=dtype, generator=gen).requires_grad_()
                    for _ in range(3)
                )
                table = (torch.randn(H, NUM_BUCKETS, device=DEVICE, generator=gen) * 0.5).requires_grad_()
                do = torch.randn(B, H, L, D, device=DEVICE, dtype=dtype, generator=gen)
                reference = fp32_reference(q, k, v, table, do, causal) if L <= REFERENCE_MAX_L else None
                point_rows = []
                for name in names:
                    if L in long_seqs and name not in (*TARGET_IMPLS, "nobias"):
                        continue
                    row = dict(impl=name, causal=causal, L=L, B=B, H=H, D=D, dtype="bf16")
                    row.update(gpu=env["gpu"], date=env["date"], commit=env["commit"])  # rows of runs merged
                    reason = skip_reason(name, L, D, args)
                    if reason:
                        row["skipped"] = reason
                    else:
                        try:
                            # nobias, ALiBi, RoPE and FIRE compute other functions than the T5 reference
                            ref = reference if name not in ("nobias", *TARGET_IMPLS[1:]) else None
                            row.update(measure(name, IMPLS[name], q, k, v, table, do, causal, ref))
                            set_best_times(row, B, H, L, D, causal)
                        except Exception as err:  # OOM or unsupported: record it and go on
                            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                            traceback.print_exc(limit=3)
                        q.grad = k.grad = v.grad = table.grad = None
                        torch.cuda.empty_cache()
                    point_rows.append(row)
                # The target ratios: time fat5 and the ceiling again, alternating, and keep each one's best run;
                # from CUDA graphs too (GPU time without the host's).
                timed = [r for r in point_rows if r["impl"] in (*TARGET_IMPLS, "nobias") and "fwd_ms" in r]
                for repeat in range(args.repeats):
                    for row in timed:
                        for suffix, timer in (("", timings), ("_graph", graph_timings)):
                            if suffix == "" and repeat == 0:
                                continue  # measure() took the first eager run
                            try:
                                fwd_ms, fwdbwd_ms = timer(IMPLS[row["impl"]], q, k, v, table, do, causal)
                            except Exception as err:  # keep the runs already timed
                                row[f"repeat_error{suffix}"] = f"{type(err).__name__}: {str(err)[:300]}"
                                continue
                            row.setdefault(f"fwd_ms{suffix}_runs", []).append(fwd_ms)
                            row.setdefault(f"fwdbwd_ms{suffix}_runs", []).append(fwdbwd_ms)
                        set_best_times(row, B, H, L, D, causal)
                for row in point_rows:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                save(env, args, merge_rows(earlier, rows))  # partial results survive a timeout
                del q, k, v, table, do, reference
                torch.cuda.empty_cache()
    _, markdown_path = save(env, args, merge_rows(earlier, rows))
    print(markdown_path.read_text())


def point(row) -> tuple:
    return row["impl"], row["causal"], row["L"], row["D"]


def merge_rows(earlier: list, rows: list) -> list:
    """This run's rows, after the earlier rows of points it did not measure (each row names its run)."""
    measured = {point(r) for r in rows}
    return [r for r in earlier if point(r) not in measured] + rows


def runs(rows: list) -> list[tuple[str, str, str | None]]:
    """The (date, GPU, commit) of every run whose rows are kept."""
    return sorted({(r["date"], r["gpu"], r.get("commit")) for r in rows}, key=str)


TITLE = "Attention with a learned T5 bias: fat5 kernel vs. the alternatives"


def method(args: argparse.Namespace, rows: list) -> str:
    """How the tables' numbers were taken; names every run when rows of earlier runs are kept."""
    kept = runs(rows)
    merged = (
        f"Rows of {len(kept)} runs: " + "; ".join(f"{date} ({gpu}, commit {commit})" for date, gpu, commit in kept)
        + ". "
        if len(kept) > 1
        else ""
    )
    return merged + (
        f"bf16, {args.tokens} tokens per batch (B = tokens / L), H = {args.heads}, {NUM_BUCKETS} buckets, max "
        f"distance {MAX_DISTANCE}, scale 1.0. fwd / fwd+bwd TFLOP/s (fwd+bwd includes the bias-table gradient; "
        "nobias has no bias at all) and peak extra MiB of one fwd+bwd; fat5 and nobias rows report the best of "
        "their alternating timed runs where the JSON lists several (`fwd_ms_runs`)."
    )


def save(env: dict, args: argparse.Namespace, rows: list):
    """Write attention.json and attention.md; returns their paths."""
    return write_results("attention", rows, env=env, args=args, title=TITLE, method=method(args, rows),
                         body=render_markdown(rows), output_dir=args.out)  # fmt: skip


def render_markdown(rows: list) -> str:
    """Per (D, causal), every implementation's TFLOP/s and memory; the targets (each fat5 kernel over nobias of the same run),
    skipped and failed points, and the errors against the fp32 reference."""
    lines = []
    impls = [i for i in [*TARGET_IMPLS, "nobias", "sdpa_bias", "eager", "flex"] if any(r["impl"] == i for r in rows)]
    by_key = {(r["impl"], r["causal"], r["L"], r["D"]): r for r in rows}
    for D in sorted({r["D"] for r in rows}):
        for causal in sorted({r["causal"] for r in rows}):
            lines += [f"## D = {D}, {'causal (decoder buckets)' if causal else 'bidirectional (encoder buckets)'}", ""]
            lines.append("| L | " + " | ".join(f"{i} TF/s fwd / fwd+bwd, MiB" for i in impls) + " |")
            lines.append("|---" * (len(impls) + 1) + "|")
            for L in sorted({r["L"] for r in rows if r["D"] == D and r["causal"] == causal}):
                cells = []
                for i in impls:
                    r = by_key.get((i, causal, L, D))
                    if r is None:
                        cells.append("–")
                    elif "skipped" in r:
                        cells.append("skipped")
                    elif "error" in r:
                        cells.append(r["error"].split(":")[0])
                    else:
                        cells.append(f"{r['fwd_tflops']:.0f} / {r['fwdbwd_tflops']:.0f}, {r['peak_extra_MiB']:.0f}")
                lines.append(f"| {L} | " + " | ".join(cells) + " |")
            lines.append("")
    graphs = any("fwd_tflops_graph" in r for r in rows)
    lines += ["## Targets (each fat5 kernel against nobias of the same run)", ""]
    if graphs:
        lines += [
            "Eager: wall clock of eager calls (`triton.testing.do_bench`), host time included. Graphs: the same "
            "calls replayed from CUDA graphs (`do_bench_cudagraph`), GPU time only, as a step captured in a graph "
            "runs them. Where the two differ, the eager fat5 call is bound by the host (Python and launches).",
            "",
        ]
    header = "| impl | D | causal | L | fwd ratio (>= 0.85) | fwd+bwd ratio (>= 0.80 at L >= 1024) |"
    if graphs:
        header += " fwd ratio, graphs | fwd+bwd ratio, graphs |"
    lines += [header + " memory ratio (<= 1.1) |", "|---" * header.count("|") + "|"]
    mark = lambda ok: "met" if ok else "MISSED"
    for r in rows:
        if r["impl"] not in TARGET_IMPLS or "fwd_ms" not in r:
            continue
        base = by_key.get(("nobias", r["causal"], r["L"], r["D"]))
        if not base or "fwd_ms" not in base or base.get("date") != r.get("date"):
            continue
        cells = [r["impl"], str(r["D"]), str(int(r["causal"])), str(r["L"])]
        for suffix in ("", "_graph") if graphs else ("",):
            if f"fwd_tflops{suffix}" not in r or f"fwd_tflops{suffix}" not in base:
                cells += ["–", "–"]
                continue
            fwd = r[f"fwd_tflops{suffix}"] / base[f"fwd_tflops{suffix}"]
            fb = r[f"fwdbwd_tflops{suffix}"] / base[f"fwdbwd_tflops{suffix}"]
            cells += [f"{fwd:.2f} {mark(fwd >= 0.85)}", f"{fb:.2f} {mark(fb >= 0.80) if r['L'] >= 1024 else '(n/a)'}"]
        mem = r["peak_extra_MiB"] / base["peak_extra_MiB"]
        lines.append("| " + " | ".join(cells + [f"{mem:.2f} {mark(mem <= 1.1)}"]) + " |")
    skipped = sorted({(r["impl"], r["skipped"]) for r in rows if "skipped" in r})
    errors = [(r["impl"], r["causal"], r["L"], r["D"], r["error"]) for r in rows if "error" in r]
    if skipped or errors:
        lines += ["", "## Skipped and failed points", ""]
        lines += [f"- {i}: {why}" for i, why in skipped]
        lines += [f"- {i} causal={int(c)} L={L} D={D}: {e[:200]}" for i, c, L, D, e in errors]
    errs = [r for r in rows if "rel_err" in r]
    if errs:
        lines += ["", f"## Errors against the fp32 reference (L <= {REFERENCE_MAX_L})", "",
                  "| impl | D | causal | L | out rel err | dq rel err | table grad rel err |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in errs:
            dt = r.get("dtable_rel_err")
            dq = r.get("dq_rel_err")
            lines.append(
                f"| {r['impl']} | {r['D']} | {int(r['causal'])} | {r['L']} | {r['rel_err']:.1e} | "
                f"{'–' if dq is None else f'{dq:.1e}'} | {'–' if dt is None else f'{dt:.1e}'} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
