"""Fused-kernel benchmarks: each fat5 kernel next to PyTorch eager, torch.compile and Liger-Kernel, on one GPU.

For every case the runner measures, in one process and side by side:
  ms        time of one call: the median over ``--rounds`` rounds (3 by default) of the median of
            ``triton.testing.do_bench`` (CUDA events, warm-up first). A round times every case of the run once,
            in order, so that each implementation is timed at several moments of the run (``ms_rounds`` keeps
            them). It includes the host-side (Python, autograd, launch) cost whenever that exceeds the GPU work,
            as it does for these small memory-bound ops,
  gpu_ms    GPU time of one call: the summed durations of its CUDA kernels (torch.profiler, mean of 10 calls),
            i.e. the kernels' own cost, which is what remains when a training step keeps the GPU busy. Measured
            after all timing rounds: the profiler can leave CUPTI attached, which slows every later launch
            (pytorch/pytorch#144455),
  peak_MiB  peak CUDA allocation of one call above what was allocated before it,
  rel_err   relative L2 error against the same kernel's ``torch`` implementation run on float32 copies of the
            inputs: worst over the outputs for ``fwd``, over outputs and input gradients for ``fwdbwd``.
``fwd`` is a training forward (inputs require grad, autograd saves what the backward needs); ``fwdbwd`` adds the
backward. A case that fails (missing package, out of memory) records ``error`` and the run goes on.

Case format, shared by every kernel family. A case is a tuple ``(kernel, impl, shape, mode, fn, setup)``:
  kernel  name of the op family, e.g. "rms_norm" (what ``--kernels`` selects),
  impl    "fat5", "torch" (eager PyTorch with the model's semantics), "compile" (torch.compile of "torch"),
          "liger" (Liger-Kernel), or a named variant such as "fat5_inplace",
  shape   a string such as "N=16384,d=768" (cases of one kernel with the same shape are compared),
  mode    "fwd" or "fwdbwd",
  fn      callable(*args) -> a tensor or a tuple of tensors,
  setup   callable() -> (args, grad_outputs): fresh CUDA inputs for fn, same values on every call (seeded);
          grad_outputs is a tuple matching fn's outputs, or None when fn's first output is a scalar loss.
The tensors of args that require grad are the leaves whose ``.grad`` is reset between timed calls.
A family may instead give self-measuring cases: objects with ``kernel, impl, mode``, ``shape_str`` (or a string
``shape``) and ``run(check=True) -> dict`` (ms, peak_MiB, optionally rel_err; ``check=False`` for the later
timing rounds, which need ms alone), measured the same way.
This file registers the RMSNorm and gated-MLP cases; ``benchmarks/fused_cross_entropy_cases.py``, if present,
defines ``cases() -> list`` or a list ``CASES`` of either kind (optional packages imported inside functions).

Usage (GPU machine, repository root; Liger-Kernel is a benchmark-only dependency)::

    export PYTHONPATH=$PWD/kernels:$PWD
    python benchmarks/fused.py --kernels rms_norm,gated_mlp --output-dir benchmarks/results

writes ``fused.json`` (rows with kernel, impl, shape, mode, ms, peak_MiB, rel_err and the run that measured them)
and ``fused.md`` (tables and the targets section) through ``results_io``; ``fused.notes.md`` beside them says how
to read them. Rows of kernels not run this time are kept from ``--merge`` (by default the existing ``fused.json``
in the output directory), so that each kernel family can be run on its own. ``--markdown-only`` rewrites fused.md
from fused.json.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
from collections.abc import Callable

import torch
from results_io import RESULTS_DIR, environment, read_results, write_results

N_TOKENS = 16384  # tokens per step: batch 32 x 512
EPS = 1e-6
RMS_NORM_WIDTHS = (768, 1024, 4096)  # T5-base / T5-large d_model, and a wide one
GATED_MLP_WIDTHS = (2048, 2816, 10240)  # T5 v1.1 base / large / xxl d_ff

# Targets on an H100: at least as fast as the faster of Liger and torch.compile, and no more peak
# memory than Liger, for each kernel, shape and mode.
TIME_BASELINES = ("liger", "compile")
MEMORY_BASELINE = "liger"
# The fused linear + cross-entropy's fwd+bwd: at most 1.25x the three bare matmuls it contains.
FLCE_MATMUL_TARGET = 1.25


# ---- the "torch" definitions (model semantics), also compiled for "compile" ----
def t5_rms_norm(x, weight):
    """transformers' T5LayerNorm.forward."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + EPS)).to(weight.dtype)


def t5_add_rms_norm(x, residual, weight):
    summed = x + residual
    return t5_rms_norm(summed, weight), summed


def t5_gated_gelu(gate, up):
    """T5 v1.1 DenseGatedActDense between the projections (gelu_new is the tanh approximation)."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _liger():
    import liger_kernel.transformers.functional as liger_functional

    return liger_functional


def _randn(*shape, scale=1.0, requires_grad=True):
    return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale).requires_grad_(requires_grad)


def _weight(d):
    """A norm weight near 1, as a leaf tensor."""
    return (1 + _randn(d, scale=0.1, requires_grad=False)).requires_grad_()


def _seeded(make: Callable) -> Callable:
    def setup():
        torch.manual_seed(0)
        return make()

    return setup


def _rms_norm_cases() -> list[tuple]:
    from fat5_kernels.rms_norm import rms_norm

    compiled = torch.compile(t5_rms_norm, dynamic=False)
    compiled_residual = torch.compile(t5_add_rms_norm, dynamic=False)
    impls = {
        "fat5": lambda x, w: rms_norm(x, w, EPS),
        "fat5_inplace": lambda x, w: rms_norm(x, w, EPS, in_place_backward=True),
        "torch": t5_rms_norm,
        "compile": compiled,
        # casting_mode "llama" is T5's (rstd in fp32, x * rstd cast to the input dtype, then * w); Liger writes dx
        # into dy by default (in_place=True).
        "liger": lambda x, w: _liger().liger_rms_norm(x, w, EPS, offset=0.0, casting_mode="llama"),
    }
    residual_impls = {
        "fat5": lambda x, r, w: rms_norm(x, w, EPS, residual=r),
        "fat5_inplace": lambda x, r, w: rms_norm(x, w, EPS, residual=r, in_place_backward=True),
        "torch": t5_add_rms_norm,
        "compile": compiled_residual,
        "liger": lambda x, r, w: _liger().liger_fused_add_rms_norm(x, r, w, EPS, offset=0.0, casting_mode="llama"),
    }
    cases = []
    for d in RMS_NORM_WIDTHS:
        setup = _seeded(lambda d=d: ((_randn(N_TOKENS, d), _weight(d)), (_randn(N_TOKENS, d),)))
        for impl, fn in impls.items():
            for mode in ("fwd", "fwdbwd"):
                if impl == "fat5_inplace" and mode == "fwd":
                    continue  # same forward as fat5
                cases.append(("rms_norm", impl, f"N={N_TOKENS},d={d}", mode, fn, setup))
    d = 768
    setup = _seeded(
        lambda: (
            (_randn(N_TOKENS, d), _randn(N_TOKENS, d), _weight(d)),
            (_randn(N_TOKENS, d), _randn(N_TOKENS, d)),
        )
    )
    for impl, fn in residual_impls.items():
        for mode in ("fwd", "fwdbwd"):
            if impl == "fat5_inplace" and mode == "fwd":
                continue
            cases.append(("rms_norm_residual", impl, f"N={N_TOKENS},d={d}", mode, fn, setup))
    return cases


def _gated_mlp_cases() -> list[tuple]:
    from fat5_kernels.gated_mlp import gated_activation

    impls = {
        "fat5": lambda gate, up: gated_activation(gate, up, "gelu_tanh"),
        "fat5_inplace": lambda gate, up: gated_activation(gate, up, "gelu_tanh", in_place_backward=True),
        "torch": t5_gated_gelu,
        "compile": torch.compile(t5_gated_gelu, dynamic=False),
        "liger": lambda gate, up: _liger().liger_geglu(gate, up),  # writes d_gate / d_up into gate / up
    }
    cases = []
    for d_ff in GATED_MLP_WIDTHS:
        setup = _seeded(
            lambda d_ff=d_ff: ((_randn(N_TOKENS, d_ff), _randn(N_TOKENS, d_ff)), (_randn(N_TOKENS, d_ff),))
        )
        for impl, fn in impls.items():
            for mode in ("fwd", "fwdbwd"):
                if impl == "fat5_inplace" and mode == "fwd":
                    continue
                cases.append(("gated_mlp", impl, f"N={N_TOKENS},d_ff={d_ff}", mode, fn, setup))
    return cases


def _cross_entropy_cases() -> list[tuple]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        module = importlib.import_module("fused_cross_entropy_cases")
    except ModuleNotFoundError as err:
        if err.name != "fused_cross_entropy_cases":
            raise
        return []
    return list(module.cases()) if hasattr(module, "cases") else list(module.CASES)


def case_key(case) -> tuple[str, str, str, str]:
    """(kernel, impl, shape, mode) of a tuple case or of a self-measuring case object."""
    if isinstance(case, tuple):
        return case[:4]
    shape = case.shape_str if hasattr(case, "shape_str") else case.shape
    return case.kernel, case.impl, shape, case.mode


# Each family's factory with the kernel names its cases use; the cross-entropy family is looked up at run time.
CASE_FAMILIES = [
    (("rms_norm", "rms_norm_residual"), _rms_norm_cases),
    (("gated_mlp",), _gated_mlp_cases),
]


def collect_cases(kernels: list[str] | None = None) -> list[tuple]:
    """All registered cases (the cross-entropy family's too), only those of ``kernels`` when given."""
    cases = []
    for names, factory in CASE_FAMILIES:
        if kernels is None or any(name in kernels for name in names):
            cases += factory()
    cases += _cross_entropy_cases()
    return [case for case in cases if kernels is None or case_key(case)[0] in kernels]


# ---- measuring ----
def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _run_once(fn, args, grad_outputs, backward: bool):
    outputs = _as_tuple(fn(*args))
    if backward:
        if grad_outputs is None:
            outputs[0].backward()
        else:
            torch.autograd.backward(outputs, grad_outputs)
    return outputs


def _results(fn, setup, backward: bool, upcast: bool = False) -> list[torch.Tensor]:
    """Outputs (and input gradients) of one call on fresh inputs, detached; float32 copies of them if upcast."""
    args, grad_outputs = setup()
    if upcast:
        args = tuple(
            a.detach().float().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point() else a
            for a in args
        )
        grad_outputs = None if grad_outputs is None else tuple(g.float() for g in grad_outputs)
    outputs = _run_once(fn, args, grad_outputs, backward)
    results = [o.detach().float() for o in outputs if torch.is_tensor(o) and o.is_floating_point()]
    if backward:
        results += [a.grad.float() for a in args if torch.is_tensor(a) and a.requires_grad]
    return results


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    errors = [((g - w).norm() / w.norm().clamp_min(1e-30)).item() for g, w in zip(got, want, strict=True)]
    return max(errors, key=lambda e: math.inf if math.isnan(e) else e)


def gpu_time_ms(step: Callable, leaves: list, calls: int = 10) -> float:
    """Mean summed duration of the CUDA kernels launched by one call of ``step`` (torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # outside the profile: nothing left to compile or allocate for the first time
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            for leaf in leaves:
                leaf.grad = None
            step()
        torch.cuda.synchronize()
    total_us = 0.0
    for event in prof.key_averages():  # the attribute was renamed across torch versions
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                total_us += getattr(event, name)
                break
    if total_us <= 0:
        raise RuntimeError("the profiler recorded no CUDA kernel time")
    return total_us / calls / 1000.0


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Run matrix products for a while so that clocks are up before the first timed row."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(20):
            a @ a  # noqa: B018
        end.record()
        end.synchronize()
        if start.elapsed_time(end) > seconds * 1000:
            return


def _prepared_step(case) -> tuple[Callable, list]:
    """``(step, leaves)`` of a tuple case on fresh inputs: one call of it, and the inputs whose grads it sets."""
    kernel, impl, shape, mode, fn, setup = case
    args, grad_outputs = setup()
    leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    return (lambda: _run_once(fn, args, grad_outputs, mode == "fwdbwd")), leaves


def _wall_ms(step: Callable, leaves: list) -> float:
    from triton.testing import do_bench

    return do_bench(step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")


def time_again(case) -> float:
    """Another timing round of a case already measured (compiled, checked): its ``ms`` alone."""
    if not isinstance(case, tuple):
        return case.run(check=False)["ms"]
    return _wall_ms(*_prepared_step(case))


def measure(case, reference_fn: Callable | None) -> dict:
    """The first round of a case: its error against ``reference_fn``, ``ms`` and ``peak_MiB``."""
    if not isinstance(case, tuple):  # a self-measuring case
        return case.run()
    kernel, impl, shape, mode, fn, setup = case
    backward = mode == "fwdbwd"
    row = {}
    got = _results(fn, setup, backward)  # first call: JIT / compile, and the values that are checked
    if reference_fn is not None:
        row["rel_err"] = _relative_error(got, _results(reference_fn, setup, backward, upcast=True))
    del got
    gc.collect()
    torch.cuda.empty_cache()

    step, leaves = _prepared_step(case)
    row["ms"] = _wall_ms(step, leaves)
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outputs = step()
    torch.cuda.synchronize()
    row["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    del outputs
    return row


def run_environment() -> dict:
    """The run's environment (results_io's, plus the Liger-Kernel version)."""
    try:
        liger = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        liger = None
    return environment(liger_kernel=liger)


# Each row names the run that measured it: a kernel family can be re-run alone, and its rows replace only its own.
ROW_RUN_KEYS = ("gpu", "torch", "triton", "liger_kernel", "date", "commit")


# ---- reporting ----
def _row_key(row):
    return row["kernel"], row["shape"], row["mode"]


def targets(rows: list[dict]) -> list[dict]:
    """Per (kernel, shape, mode) with a fat5 row: fat5 time vs the faster of the time baselines, fat5 peak vs
    Liger's. Variants (fat5_inplace) are judged too, under their own name."""
    by_key: dict = {}
    for row in rows:
        if "error" not in row:
            by_key.setdefault(_row_key(row), {})[row["impl"]] = row
    verdicts = []
    for key, impls in by_key.items():
        baselines = [impls[b] for b in TIME_BASELINES if b in impls]
        for impl in [i for i in impls if i.startswith("fat5")]:
            verdict = dict(zip(("kernel", "shape", "mode"), key), impl=impl, ms=impls[impl]["ms"])
            if baselines:
                best = min(baselines, key=lambda r: r["ms"])
                verdict.update(baseline=best["impl"], baseline_ms=best["ms"], time_met=impls[impl]["ms"] <= best["ms"])
                if all("gpu_ms" in r for r in baselines + [impls[impl]]):
                    best_gpu = min(baselines, key=lambda r: r["gpu_ms"])
                    verdict.update(
                        gpu_ms=impls[impl]["gpu_ms"],
                        baseline_gpu=best_gpu["impl"],
                        baseline_gpu_ms=best_gpu["gpu_ms"],
                        gpu_time_met=impls[impl]["gpu_ms"] <= best_gpu["gpu_ms"],
                    )
            if MEMORY_BASELINE in impls:
                verdict.update(
                    peak_MiB=impls[impl]["peak_MiB"],
                    baseline_peak_MiB=impls[MEMORY_BASELINE]["peak_MiB"],
                    # within 1 MiB: allocator rounding and small per-program buffers
                    memory_met=impls[impl]["peak_MiB"] <= impls[MEMORY_BASELINE]["peak_MiB"] + 1.0,
                )
            verdicts.append(verdict)
    return verdicts


def matmul_ratios(rows: list[dict]) -> list[dict]:
    """Per flce shape with fat5 and matmuls fwd+bwd rows: fat5's time over the bare matmuls', from the rows' ``ms``
    and, where the matmuls row has it, from the alternating calls (``paired_ratio``), which decides the target."""
    by_shape: dict = {}
    for row in rows:
        if row["kernel"] == "flce" and row["mode"] == "fwdbwd" and "error" not in row:
            by_shape.setdefault(row["shape"], {})[row["impl"]] = row
    verdicts = []
    for shape, impls in by_shape.items():
        if "fat5" not in impls or "matmuls" not in impls:
            continue
        fat5, matmuls = impls["fat5"], impls["matmuls"]
        verdict = dict(shape=shape, fat5_ms=fat5["ms"], matmuls_ms=matmuls["ms"], ratio=fat5["ms"] / matmuls["ms"])
        if "paired_ratio" in matmuls:
            verdict.update({key: matmuls[key] for key in ("paired_fat5_ms", "paired_matmuls_ms", "paired_ratio")})
        verdict["met"] = verdict.get("paired_ratio", verdict["ratio"]) <= FLCE_MATMUL_TARGET
        verdicts.append(verdict)
    return verdicts


TITLE = "Fused kernels: fat5 vs PyTorch eager, torch.compile, Liger-Kernel"


def method(rows: list[dict]) -> str:
    """How the tables' numbers were taken, and the run behind each kernel family's rows."""
    with_gpu = any("gpu_ms" in r for r in rows)
    lines = [
        f"bf16 inputs, N={N_TOKENS} tokens. ms = median of CUDA-event timings (`triton.testing.do_bench`; with "
        "`ms_rounds` in the JSON, the median of one such median per timing round, each round timing every case of "
        "the run in turn, before any profiling): it includes host-side cost (Python, autograd, launches) whenever "
        "that exceeds the GPU work. "
        + ("gpu_ms = summed CUDA kernel time of one call (torch.profiler, mean of 10). " if with_gpu else "")
        + "peak = CUDA memory allocated by one call above what was allocated before it. rel_err = relative L2 error "
        "vs the `torch` definition on float32 copies (outputs, and input gradients for fwdbwd). `fat5_inplace`: fat5 "
        "with `in_place_backward=True` (input gradients written into buffers the op no longer needs, as Liger does "
        "by default). How to read these rows: `fused.notes.md`.",
        "",
        "Runs (a kernel family can be re-run alone; its rows name their run):",
        "",
    ]
    families: dict[tuple, list[str]] = {}
    for r in rows:
        run = tuple(str(r.get(k)) for k in ROW_RUN_KEYS)
        families.setdefault(run, [])
        if r["kernel"] not in families[run]:
            families[run].append(r["kernel"])
    for (gpu, torch_version, triton_version, liger, date, commit), kernels in sorted(families.items(),
                                                                                       key=lambda item: item[0][4]):
        lines.append(
            f"- {', '.join(kernels)}: {gpu}, torch {torch_version}, triton {triton_version}, liger-kernel {liger}, "
            f"{date}, commit {commit}"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """Tables per kernel, the targets section and the fused linear + cross-entropy ratios."""
    with_gpu = any("gpu_ms" in r for r in rows)
    lines = []
    gpu_header, gpu_rule = (" gpu_ms |", "---:|") if with_gpu else ("", "")
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        lines += [
            f"## {kernel}",
            "",
            f"| shape | mode | impl | ms |{gpu_header} peak MiB | rel_err |",
            f"|---|---|---|---:|{gpu_rule}---:|---:|",
        ]
        kernel_rows = [r for r in rows if r["kernel"] == kernel]
        groups = list(dict.fromkeys((r["shape"], r["mode"]) for r in kernel_rows))
        kernel_rows.sort(key=lambda r: groups.index((r["shape"], r["mode"])))  # stable: impl order kept
        for row in kernel_rows:
            if "error" in row:
                error = " ".join(row["error"][:80].split()).replace("|", "/")
                blanks = " |" * (3 if with_gpu else 2)
                lines.append(f"| {row['shape']} | {row['mode']} | {row['impl']} | error: {error} |{blanks}")
                continue
            rel = f"{row['rel_err']:.1e}" if "rel_err" in row else ""
            gpu = (f" {row['gpu_ms']:.3f} |" if "gpu_ms" in row else " |") if with_gpu else ""
            lines.append(
                f"| {row['shape']} | {row['mode']} | {row['impl']} | {row['ms']:.3f} |{gpu} {row['peak_MiB']:.1f} | {rel} |"
            )
        lines.append("")
    lines += [
        "## Targets",
        "",
        "Time: fat5 at most the faster of Liger and torch.compile"
        + (", judged on `ms` (a call's wall time) and separately on `gpu_ms`" if with_gpu else ", judged on `ms`")
        + ". Memory: fat5 peak at most Liger's (+1 MiB). `fused.notes.md` says how much `ms` moves between runs.",
        "",
    ]
    met = lambda flag: "n/a" if flag is None else ("met" if flag else "**not met**")
    if with_gpu:
        lines += [
            "| kernel | shape | mode | impl | ms | best baseline | time (ms) | gpu_ms | best baseline | time (gpu_ms) "
            "| peak MiB | Liger peak MiB | memory |",
            "|---|---|---|---|---:|---|---|---:|---|---|---:|---:|---|",
        ]
    else:
        lines += [
            "| kernel | shape | mode | impl | ms | best baseline | time | peak MiB | Liger peak MiB | memory |",
            "|---|---|---|---|---:|---|---|---:|---:|---|",
        ]
    for v in targets(rows):
        baseline = f"{v['baseline']} {v['baseline_ms']:.3f}" if "baseline" in v else "n/a"
        peak = f"{v['peak_MiB']:.1f}" if "peak_MiB" in v else ""
        liger_peak = f"{v['baseline_peak_MiB']:.1f}" if "baseline_peak_MiB" in v else ""
        gpu_cells = ""
        if with_gpu:
            gpu = f"{v['gpu_ms']:.3f}" if "gpu_ms" in v else ""
            gpu_baseline = f"{v['baseline_gpu']} {v['baseline_gpu_ms']:.3f}" if "baseline_gpu" in v else "n/a"
            gpu_cells = f" {gpu} | {gpu_baseline} | {met(v.get('gpu_time_met'))} |"
        lines.append(
            f"| {v['kernel']} | {v['shape']} | {v['mode']} | {v['impl']} | {v['ms']:.3f} | {baseline} | "
            f"{met(v.get('time_met'))} |{gpu_cells} {peak} | {liger_peak} | {met(v.get('memory_met'))} |"
        )
    lines.append("")
    ratios = matmul_ratios(rows)
    if ratios:
        lines += [
            "## Fused linear + cross-entropy against its three matmuls",
            "",
            f"fat5's fwd+bwd at most {FLCE_MATMUL_TARGET}x the three bare matmuls it contains (logits, and the two "
            "gradient products). `ms`: the two rows above, timed at different moments of the run. Paired: the two "
            "called alternately, each call timed with CUDA events (median over the calls, and median of the "
            "per-pair ratios), which decides the target where it was measured.",
            "",
            "| shape | fat5 ms | matmuls ms | ratio | paired fat5 ms | paired matmuls ms | paired ratio | target |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for v in ratios:
            paired = (
                f"{v['paired_fat5_ms']:.3f} | {v['paired_matmuls_ms']:.3f} | {v['paired_ratio']:.3f}"
                if "paired_ratio" in v
                else " | | "
            )
            lines.append(
                f"| {v['shape']} | {v['fat5_ms']:.3f} | {v['matmuls_ms']:.3f} | {v['ratio']:.3f} | {paired} | "
                f"{met(v['met'])} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---- launch-configuration sweep of the fat5 kernels (the data behind their heuristics) ----
def sweep() -> None:
    """Time fat5 RMSNorm and gated GELU, fwd and fwd+bwd through the public API, over launch configurations
    patched into the kernel modules; prints one JSON line per configuration (a probe, not a result file:
    ``rms_norm_sweep.py`` is the RMSNorm sweep of record). Same timing as the main table."""
    from triton.testing import do_bench

    import fat5_kernels.gated_mlp as gated_mlp_module
    import fat5_kernels.rms_norm as rms_norm_module

    def time_it(fn, args, grad_out):
        leaves = [a for a in args if a.requires_grad]
        forward = do_bench(lambda: fn(*args), warmup=5, rep=25, grad_to_none=leaves, return_mode="median")
        step = lambda: fn(*args).backward(grad_out)
        both = do_bench(step, warmup=5, rep=25, grad_to_none=leaves, return_mode="median")
        return dict(fwd_ms=forward, fwdbwd_ms=both, fwdbwd_gpu_ms=gpu_time_ms(step, leaves))

    warm_up_gpu()
    rows = []
    default_bwd = rms_norm_module._backward_launch_config
    # (rows per tile, warps, programs per SM, row-loop pipeline stages)
    backward_configs = {
        768: [(2, 8, 2, 1), (2, 8, 4, 1), (2, 8, 8, 1), (4, 8, 4, 1), (1, 4, 4, 1), (4, 4, 2, 1), (4, 4, 1, 3)],
        4096: [(1, 16, 2, 1), (1, 8, 2, 1), (1, 8, 4, 1), (2, 16, 2, 1), (1, 16, 1, 3)],
    }
    for d, configs in backward_configs.items():
        torch.manual_seed(0)
        args, grad_out = (_randn(N_TOKENS, d), _weight(d)), _randn(N_TOKENS, d)
        block_cols = 1 << (d - 1).bit_length()
        defaults = [default_bwd(d, 2)]  # rows of bf16 (2-byte) elements
        for config in defaults + [(r, block_cols, w, p, stages) for r, w, p, stages in configs]:
            rms_norm_module._backward_launch_config = lambda n, element_size, c=config: c
            try:
                row = dict(kernel="rms_norm", d=d, bwd_config=config, **time_it(lambda x, w: rms_norm_module.rms_norm(x, w, EPS), args, grad_out))
            except Exception as err:
                row = dict(kernel="rms_norm", d=d, bwd_config=config, error=str(err)[:200])
            rows.append(row)
            print(json.dumps(row), flush=True)
    rms_norm_module._backward_launch_config = default_bwd

    default_gated = gated_mlp_module._launch_config
    for d_ff in GATED_MLP_WIDTHS[:1]:
        torch.manual_seed(0)
        args, grad_out = (_randn(N_TOKENS, d_ff), _randn(N_TOKENS, d_ff)), _randn(N_TOKENS, d_ff)
        for config in [default_gated(N_TOKENS * d_ff), (1024, 4), (4096, 8)]:
            gated_mlp_module._launch_config = lambda n, c=config: c
            timings = time_it(lambda g, u: gated_mlp_module.gated_activation(g, u, "gelu_tanh"), args, grad_out)
            row = dict(kernel="gated_mlp", d_ff=d_ff, config=config, **timings)
            rows.append(row)
            print(json.dumps(row), flush=True)
    gated_mlp_module._launch_config = default_gated


def save(env: dict, args, rows: list[dict], output_dir: str) -> None:
    """Write fused.json and fused.md (``args``: the run's arguments, a Namespace or their recorded dict)."""
    write_results("fused", rows, env=env, args=args, title=TITLE, method=method(rows), body=markdown(rows),
                  output_dir=output_dir)  # fmt: skip


def _guarded(row: dict, error_key: str, measurement: Callable, *args):
    """``measurement(*args)`` for a row, or None: a failure (missing package, out of memory) is recorded in the
    row under ``error_key`` and the run goes on."""
    try:
        return measurement(*args)
    except Exception as err:
        row[error_key] = f"{type(err).__name__}: {err}"[:500]
        return None
    finally:
        gc.collect()
        torch.cuda.empty_cache()


_TABLE_HEADER = f"{'kernel':18s} {'impl':13s} {'shape':22s} {'mode':7s} {'ms':>8s} {'gpu_ms':>8s} {'peak_MiB':>9s} {'rel_err':>8s}"


def _print_row(row: dict) -> None:
    head = f"{row['kernel']:18s} {row['impl']:13s} {row['shape']:22s} {row['mode']:7s}"
    if "error" in row:
        print(f"{head} ERROR {row['error'][:120]}", flush=True)
        return
    print(
        f"{head} {row['ms']:8.3f} {row.get('gpu_ms', float('nan')):8.3f} {row['peak_MiB']:9.1f} "
        f"{row.get('rel_err', float('nan')):8.1e}",
        flush=True,
    )


def run_cases(cases: list, references: dict, run: dict, rounds: int, save: Callable[[list], None]) -> list[dict]:
    """Measure every case: one row each (``run``, the run's identity, merged in), ``save(rows)`` called as rows and
    rounds complete.

    Round 1 checks each case and measures its time and memory (`measure`); rounds 2 to ``rounds`` time each case
    again, in the same order (`time_again`), and ``ms`` becomes the median of the rounds (``ms_rounds``). Kernel
    time (``gpu_ms``, tuple cases) comes last: torch.profiler can leave CUPTI attached, which slows later launches.
    """
    rows = []
    for case in cases:
        kernel, impl, shape, mode = case_key(case)
        row = dict(kernel=kernel, impl=impl, shape=shape, mode=mode, **run)
        measured = _guarded(row, "error", measure, case, references.get((kernel, shape)))
        if measured is not None:
            row.update(measured, ms_rounds=[measured["ms"]])
        rows.append(row)
        _print_row(row)
        save(rows)
    for round_index in range(1, rounds):
        for case, row in zip(cases, rows, strict=True):
            ms = _guarded(row, "round_error", time_again, case) if "error" not in row else None
            if ms is not None:
                row["ms_rounds"].append(ms)
                row["ms"] = statistics.median(row["ms_rounds"])
        save(rows)
        print(f"round {round_index + 1} of {rounds} done", flush=True)
    for case, row in zip(cases, rows, strict=True):
        if isinstance(case, tuple) and "error" not in row:
            gpu_ms = _guarded(row, "gpu_error", lambda c: gpu_time_ms(*_prepared_step(c)), case)
            if gpu_ms is not None:
                row["gpu_ms"] = gpu_ms
    save(rows)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all registered)")
    parser.add_argument("--impls", default=None, help="comma-separated impls (default: all)")
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds over all cases; ms is their median")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument("--merge", default=None, help="earlier fused.json whose rows of other kernels are kept")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit (works without GPU)")
    parser.add_argument("--sweep", action="store_true", help="time fat5 launch configurations instead")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite fused.md from fused.json (no GPU)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.markdown_only:
        result = read_results(os.path.join(args.output_dir, "fused.json"))
        save(result["environment"], result["args"], result["rows"], args.output_dir)
        return
    if not torch.cuda.is_available() and not args.list:  # --markdown-only returned above
        sys.exit("benchmarks/fused.py measures CUDA kernels: run it on a GPU machine")
    if args.sweep:
        return sweep()

    kernels = args.kernels.split(",") if args.kernels else None
    impls = set(args.impls.split(",")) if args.impls else None
    modes = set(args.modes.split(","))
    all_cases = collect_cases(kernels)
    cases = [c for c in all_cases if (impls is None or case_key(c)[1] in impls) and case_key(c)[3] in modes]
    references = {(c[0], c[2]): c[4] for c in all_cases if isinstance(c, tuple) and c[1] == "torch"}
    if args.list:
        for case in cases:
            print(*case_key(case))
        return
    env = run_environment()
    print(json.dumps(env), flush=True)

    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "fused.json")
    merge_path = args.merge or json_path
    kept = []
    if os.path.exists(merge_path):
        kept = [r for r in read_results(merge_path)["rows"] if r["kernel"] not in {case_key(c)[0] for c in cases}]

    warm_up_gpu()

    def save_rows(rows):  # rewritten after every row and round: a cut-off run keeps what it measured
        save(env, args, kept + rows, args.output_dir)

    print(_TABLE_HEADER)  # round 1's rows are printed as they are measured
    run = {key: env[key] for key in ROW_RUN_KEYS}
    rows = run_cases(cases, references, run, args.rounds, save_rows)
    print(f"medians of {args.rounds} rounds, kernel time last:\n{_TABLE_HEADER}")
    for row in rows:
        _print_row(row)
    verdict = lambda flag: "n/a" if flag is None else ("met" if flag else "NOT met")
    for v in targets(rows):
        print(
            f"target {v['kernel']:18s} {v['shape']:22s} {v['mode']:7s} {v['impl']:13s} "
            f"time {verdict(v.get('time_met'))} ({v['ms']:.3f} vs {v.get('baseline')} "
            f"{v.get('baseline_ms', float('nan')):.3f})  gpu {verdict(v.get('gpu_time_met'))} "
            f"({v.get('gpu_ms', float('nan')):.3f} vs {v.get('baseline_gpu')} {v.get('baseline_gpu_ms', float('nan')):.3f})  memory {verdict(v.get('memory_met'))} "
            f"({v.get('peak_MiB', float('nan')):.1f} vs {v.get('baseline_peak_MiB', float('nan')):.1f})"
        )


if __name__ == "__main__":
    main()
