"""Benchmark cases of the fused cross-entropy (``ce``) and fused linear + cross-entropy (``flce``) kernels.

Each case runs one implementation of one kernel at one shape, side by side with the others in the same process:

  fat5     fat5_kernels.cross_entropy / fat5_kernels.fused_linear_cross_entropy
  torch    the eager PyTorch definition (fp32 cross-entropy of bf16 logits, T5X z-loss)
  compile  torch.compile of that definition (default mode, dynamic=False)
  liger    Liger-Kernel's functional API (liger_cross_entropy / liger_fused_linear_cross_entropy, defaults)
  matmuls  (flce only, fwdbwd) the three bf16 matmuls that a fused linear + CE must contain: logits = h @ W.T,
           dh = dlogits @ W, dW = dlogits.T @ h, at full size (the floor of any LM-head loss). Its first round
           also times them against fat5's fwd+bwd called alternately (paired_* fields, `measure_matmuls`)

Tokens N=16384, bf16 inputs, 10% of labels ignored. ``fwd`` is a training forward (inputs require grad; the
fused kernels compute their gradients there), ``fwdbwd`` adds ``loss.backward()``. Reported per row: median ms
(triton.testing.do_bench, warmup 10 ms, rep 50 ms, as benchmarks/fused.py), peak_MiB (peak allocation of one call above what was allocated
before it; includes the returned gradients) and rel_err (relative L2 error vs an fp32 reference computed over
chunks of 1024 rows: the loss for fwd, the max over loss and input gradients for fwdbwd).

Run through the shared runner (benchmarks/fused.py --kernels ce,flce, which calls ``cases()``: the comparison
rows, then fat5 launch variants, torch.compile rows last), or alone:
``python benchmarks/fused_cross_entropy_cases.py [--only ce,flce] [--impls ...] [--variants]``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

N_TOKENS = 16384
IGNORE = -100
REF_ROWS = 1024
# Alternate calls of fat5's fused linear + CE and of its three matmuls behind the matmuls row's paired_ratio.
PAIRED_CALLS = 20
VOCABS = (32128, 250112)
HIDDEN_SIZES = (768, 1024)
CE_LOSS_CONFIGS = ((0.0, 0.0), (1e-4, 0.1))  # (z-loss, label smoothing)


# ---- the eager definitions (torch / compile impls, and the fp32 reference) ----
def torch_cross_entropy(logits, labels, z_loss=0.0, label_smoothing=0.0):
    """Mean CE in fp32 over labels != IGNORE, plus z_loss * mean(logsumexp**2) (T5X)."""
    x = logits.float()
    loss = F.cross_entropy(x, labels, ignore_index=IGNORE, label_smoothing=label_smoothing)
    if z_loss:
        valid = labels != IGNORE
        loss = loss + z_loss * torch.where(valid, torch.logsumexp(x, -1).square(), 0.0).sum() / valid.sum()
    return loss


def torch_linear_cross_entropy(hidden, weight, labels, z_loss=0.0, label_smoothing=0.0):
    """LM head in the inputs' dtype, then `torch_cross_entropy`."""
    return torch_cross_entropy(hidden @ weight.t(), labels, z_loss, label_smoothing)


# The fat5 rows skip the label-range check (one host sync per call), as Liger-Kernel and torch do and as the model
# does while it trains; the fat5_checked variant rows measure the default, checked call.
def fat5_cross_entropy(logits, labels, z_loss=0.0, label_smoothing=0.0, check_label_values=False):
    from fat5_kernels.cross_entropy import cross_entropy

    return cross_entropy(logits, labels, ignore_index=IGNORE, z_loss=z_loss, label_smoothing=label_smoothing,
                         check_label_values=check_label_values)[0]  # fmt: skip


def fat5_linear_cross_entropy(hidden, weight, labels, z_loss=0.0, label_smoothing=0.0, chunk_size=None,
                              vocab_chunk_size=None, check_label_values=False):  # fmt: skip
    from fat5_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    return fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, z_loss=z_loss,
                                      label_smoothing=label_smoothing, chunk_size=chunk_size,
                                      vocab_chunk_size=vocab_chunk_size,
                                      check_label_values=check_label_values)[0]  # fmt: skip


def liger_cross_entropy(logits, labels, z_loss=0.0, label_smoothing=0.0):
    from liger_kernel.transformers.functional import liger_cross_entropy as liger_ce

    return liger_ce(logits, labels, ignore_index=IGNORE, lse_square_scale=z_loss, label_smoothing=label_smoothing)


def liger_linear_cross_entropy(hidden, weight, labels, z_loss=0.0, label_smoothing=0.0):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger_flce

    return liger_flce(hidden, weight, labels, ignore_index=IGNORE, lse_square_scale=z_loss,
                      label_smoothing=label_smoothing)  # fmt: skip


_COMPILED: dict[str, Callable] = {}


def compiled(fn):
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


IMPLS = {
    "ce": {
        "fat5": lambda: fat5_cross_entropy,
        "torch": lambda: torch_cross_entropy,
        "compile": lambda: compiled(torch_cross_entropy),
        "liger": lambda: liger_cross_entropy,
    },
    "flce": {
        "fat5": lambda: fat5_linear_cross_entropy,
        "torch": lambda: torch_linear_cross_entropy,
        "compile": lambda: compiled(torch_linear_cross_entropy),
        "liger": lambda: liger_linear_cross_entropy,
        "matmuls": None,  # special-cased: three bare matmuls
    },
}


# ---- inputs ----
def make_labels(n_tokens, vocab, device):
    labels = torch.randint(0, vocab, (n_tokens,), device=device)
    return labels.masked_fill(torch.rand(n_tokens, device=device) < 0.1, IGNORE)


def make_inputs(kernel, shape, device, requires_grad=True):
    """Fresh, seeded inputs: the fused kernels and Liger write their gradients over their inputs."""
    torch.manual_seed(0)
    n = shape["N"]
    if kernel == "ce":
        args = [torch.randn(n, shape["V"], device=device, dtype=torch.bfloat16), make_labels(n, shape["V"], device)]
    else:
        d = shape["d"]
        hidden = torch.randn(n, d, device=device, dtype=torch.bfloat16)
        weight = torch.randn(shape["V"], d, device=device, dtype=torch.bfloat16).mul_(d**-0.5)
        args = [hidden, weight, make_labels(n, shape["V"], device)]
    for a in args:
        a.requires_grad_(requires_grad and a.is_floating_point())
    return args


def loss_kwargs(shape):
    return dict(z_loss=shape.get("z", 0.0), label_smoothing=shape.get("ls", 0.0))


def shape_name(shape):
    return ",".join(f"{k}={v}" for k, v in shape.items())


# ---- the fp32 reference, over chunks of rows ----
def rel_errors(kernel, shape, loss, grads, device):
    """Relative L2 errors of the loss (and of the input gradients, unless None) vs the fp32 definition.

    The reference runs over chunks of REF_ROWS token rows (so that V=250k fits); each chunk's mean is weighted by
    its share of non-ignored tokens, which gives the loss and gradients of the whole batch.
    """
    args = make_inputs(kernel, shape, device, requires_grad=False)
    labels = args[-1]
    valid = labels != IGNORE
    ref_fn = torch_cross_entropy if kernel == "ce" else torch_linear_cross_entropy
    row_args = (0, 1) if kernel == "ce" else (0, 2)
    names = ("logits", "labels") if kernel == "ce" else ("hidden", "weight", "labels")
    want_grads = grads is not None
    sums, shared, ref_loss = {}, {}, 0.0

    def add(name, got, ref):
        s = sums.setdefault(name, [0.0, 0.0])
        s[0] += (got.float() - ref).square().sum().item()
        s[1] += ref.square().sum().item()

    for start in range(0, shape["N"], REF_ROWS):
        rows = slice(start, start + REF_ROWS)
        part = [a[rows] if i in row_args else a for i, a in enumerate(args)]
        part = [a.float().requires_grad_(want_grads) if a.is_floating_point() else a for a in part]
        with torch.set_grad_enabled(want_grads):
            ref = ref_fn(*part, **loss_kwargs(shape)) * valid[rows].sum() / valid.sum()
        ref_loss += ref.item()
        if want_grads:
            idx = [i for i, a in enumerate(part) if a.requires_grad]
            for i, g in zip(idx, torch.autograd.grad(ref, [part[i] for i in idx])):
                if i in row_args:
                    add("d_" + names[i], grads[i][rows], g)
                else:
                    shared[i] = shared.get(i, 0) + g
    for i, g in shared.items():
        add("d_" + names[i], grads[i], g)
    sums["loss"] = [(loss.item() - ref_loss) ** 2, ref_loss**2]
    return {name: (d / max(n, 1e-30)) ** 0.5 for name, (d, n) in sums.items()}


# ---- measurement ----
def _bench(step, leaves):
    from triton.testing import do_bench

    return do_bench(step, warmup=10, rep=50, grad_to_none=leaves, return_mode="median")


def _peak(step, leaves):
    for a in leaves:
        a.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _matmuls_step(shape, device) -> Callable[[], None]:
    """The three bf16 matmuls of an LM-head loss at full size; dlogits is a given (N, V) bf16 tensor."""
    hidden, weight, _ = make_inputs("flce", shape, device, requires_grad=False)
    dlogits = torch.randn(shape["N"], shape["V"], device=device, dtype=torch.bfloat16)

    def step():
        logits = hidden @ weight.t()
        del logits
        dlogits @ weight  # noqa: B018
        dlogits.t() @ hidden  # noqa: B018

    return step


def paired_times(steps: list[Callable[[], None]], calls: int) -> list[list[float]]:
    """``calls`` rounds of every step in turn, each call timed alone with CUDA events: ``[round][step]`` ms.

    The steps run alternately, so each sees the clocks and power state the others see. Sequential rows do not:
    each implementation's rows run at another moment of the run, and a 35 ms call fits once or twice in
    do_bench's 50 ms window.
    """
    for step in steps:  # warm-up (compilation, allocator)
        step()
        step()
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in steps]
              for _ in range(calls)]  # fmt: skip
    for round_events in events:
        for step, (start, end) in zip(steps, round_events):
            start.record()
            step()
            end.record()
    torch.cuda.synchronize()
    return [[start.elapsed_time(end) for start, end in round_events] for round_events in events]


def measure_matmuls(shape, device, paired_calls: int = PAIRED_CALLS):
    """The matmuls row: their time and peak, and (``paired_calls`` > 0) the ratio of fat5's fused linear + CE
    fwd+bwd to them, timed alternately (`paired_times`): ``paired_ratio`` is the median of the per-round ratios."""
    matmuls = _matmuls_step(shape, device)
    matmuls()
    row = dict(ms=_bench(matmuls, []), peak_MiB=_peak(matmuls, []))
    if paired_calls:
        fused_fn, kw = IMPLS["flce"]["fat5"](), loss_kwargs(shape)
        args = make_inputs("flce", shape, device)

        def fused():
            for a in args:
                a.grad = None
            fused_fn(*args, **kw).backward()

        times = paired_times([fused, matmuls], paired_calls)
        row.update(
            paired_calls=paired_calls,
            paired_fat5_ms=statistics.median(t[0] for t in times),
            paired_matmuls_ms=statistics.median(t[1] for t in times),
            paired_ratio=statistics.median(t[0] / t[1] for t in times),
        )
    return row


def measure(kernel, impl, shape, mode, device="cuda", check=True, **impl_kwargs):
    """One row: time, peak memory and error of ``impl`` of ``kernel`` at ``shape`` in ``mode`` (fwd / fwdbwd);
    ``check=False`` skips the error against the fp32 reference."""
    if impl == "matmuls":
        return measure_matmuls(shape, device, paired_calls=PAIRED_CALLS if check else 0)
    fn = IMPLS[kernel][impl]()
    kw = {**loss_kwargs(shape), **impl_kwargs}
    backward = mode == "fwdbwd"
    args = make_inputs(kernel, shape, device)
    loss = fn(*args, **kw)  # first call: JIT / compile, and the result that is checked
    if backward:
        loss.backward()
    loss, grads = loss.detach(), ([a.grad for a in args] if backward else None)
    del args
    errors = rel_errors(kernel, shape, loss, grads, device) if check else {}
    del loss, grads

    args = make_inputs(kernel, shape, device)
    leaves = [a for a in args if a.requires_grad]

    def step():
        out = fn(*args, **kw)
        if backward:
            out.backward()

    ms = _bench(step, leaves)
    peak = _peak(step, leaves)
    if not errors:
        return dict(ms=ms, peak_MiB=peak)
    worst = max(errors.values(), key=lambda e: math.inf if math.isnan(e) else e)
    return dict(ms=ms, peak_MiB=peak, rel_err=worst, rel_err_detail=errors)


@dataclass
class Case:
    """One benchmark row for benchmarks/fused.py (a self-measuring case): `run()` returns ms, peak_MiB, rel_err.

    ``impl_kwargs`` go to the implementation (e.g. ``chunk_size``; ``check=False`` skips the error);
    ``kernel_overrides`` set attributes of ``fat5_kernels.cross_entropy`` during the run (launch-config variants).
    """

    kernel: str
    impl: str
    shape: dict
    mode: str
    impl_kwargs: dict = field(default_factory=dict)
    kernel_overrides: dict = field(default_factory=dict)
    base_impl: str | None = None  # the implementation a named variant runs ("fat5" for "fat5_c1024")

    @property
    def shape_str(self) -> str:
        return shape_name(self.shape)

    def run(self, check: bool = True) -> dict:
        """Measure the row; ``check=False`` skips the error against the fp32 reference (a later timing round)."""
        import fat5_kernels.cross_entropy as ce_module

        saved = {name: getattr(ce_module, name) for name in self.kernel_overrides}
        try:
            for name, value in self.kernel_overrides.items():
                setattr(ce_module, name, value)
            kwargs = self.impl_kwargs if check else {**self.impl_kwargs, "check": False}
            return measure(self.kernel, self.base_impl or self.impl, self.shape, self.mode, **kwargs)
        finally:
            for name, value in saved.items():
                setattr(ce_module, name, value)

    def row(self) -> dict:
        return dict(kernel=self.kernel, impl=self.impl, shape=self.shape_str, mode=self.mode)


def ce_shapes():
    return [dict(N=N_TOKENS, V=v, z=z, ls=ls) for v in VOCABS for z, ls in CE_LOSS_CONFIGS]


def flce_shapes():
    shapes = [dict(N=N_TOKENS, V=v, d=d) for v in VOCABS for d in HIDDEN_SIZES]
    return shapes + [dict(N=N_TOKENS, V=VOCABS[0], d=HIDDEN_SIZES[0], z=1e-4, ls=0.1)]


def build_cases(kernels=("ce", "flce"), impls=("fat5", "torch", "compile", "liger", "matmuls"),
                modes=("fwd", "fwdbwd")) -> list[Case]:  # fmt: skip
    """The comparison rows; torch.compile rows last (their compilation is the slow part of a run)."""
    cases = []
    for kernel in kernels:
        for shape in ce_shapes() if kernel == "ce" else flce_shapes():
            for impl in [i for i in IMPLS[kernel] if i in impls]:
                for mode in modes:
                    if impl == "matmuls" and mode == "fwd":
                        continue  # the matmuls row is the floor of fwd+bwd
                    cases.append(Case(kernel, impl, shape, mode))
    return sorted(cases, key=lambda case: case.impl == "compile")


def liger_chunk_size(shape) -> int:
    """Liger-Kernel's chunk: (chunk, V) logits about the size of the (N, d) hidden states."""
    import triton

    return min(shape["N"], triton.next_power_of_2(triton.cdiv(shape["N"], triton.cdiv(shape["V"], shape["d"]))))


def variant_cases() -> list[Case]:
    """fat5 launch variants, time and memory only: the data behind the defaults.

    flce (fwd+bwd): ``fat5_sliced``, vocabulary slices of 4096 columns (`vocab_chunk_size`, the low-memory mode,
    every shape); d=768: ``fat5_ligermem``, chunk_size from Liger-Kernel's memory rule;
    ``fat5_c1024``, half the default chunk at V=250,112; ``fat5_c4096``, half the default chunk at V=32,128.
    ce (no z-loss / smoothing): ``fat5_fwdblock16384`` (fwd), ``fat5_bwdblock8192`` (fwd+bwd), other block widths
    of the loss-only forward and of the backward. Both, V=32,128: ``fat5_checked``, the default call
    that checks the labels' range (a host sync).
    """
    cases = []
    for kernel, shape in (("ce", ce_shapes()[0]), ("flce", flce_shapes()[0])):
        for mode in ("fwd", "fwdbwd"):
            cases.append(Case(kernel, "fat5_checked", shape, mode, {"check_label_values": True, "check": False},
                              base_impl="fat5"))  # fmt: skip
    for shape in flce_shapes():
        cases.append(Case("flce", "fat5_sliced", shape, "fwdbwd", {"vocab_chunk_size": 4096, "check": False},
                          base_impl="fat5"))  # fmt: skip
    for shape in [s for s in flce_shapes() if s["d"] == 768 and "z" not in s]:
        cases.append(Case("flce", "fat5_ligermem", shape, "fwdbwd",
                          {"chunk_size": liger_chunk_size(shape), "check": False}, base_impl="fat5"))  # fmt: skip
        if shape["V"] > 32768:
            cases.append(Case("flce", "fat5_c1024", shape, "fwdbwd", {"chunk_size": 1024, "check": False},
                              base_impl="fat5"))  # fmt: skip
        else:
            cases.append(Case("flce", "fat5_c4096", shape, "fwdbwd", {"chunk_size": 4096, "check": False},
                              base_impl="fat5"))  # fmt: skip
    for shape in [s for s in ce_shapes() if not s["z"]]:
        cases.append(Case("ce", "fat5_fwdblock16384", shape, "fwd", {"check": False}, {"LOSS_ONLY_BLOCK": 16384},
                          base_impl="fat5"))  # fmt: skip
        cases.append(Case("ce", "fat5_bwdblock8192", shape, "fwdbwd", {"check": False}, {"BACKWARD_BLOCK": 8192},
                          base_impl="fat5"))  # fmt: skip
    return cases


def cases() -> list[Case]:
    """Every row benchmarks/fused.py runs for this family: the comparisons, then the fat5 variants."""
    official = build_cases()
    return [c for c in official if c.impl != "compile"] + variant_cases() + [c for c in official if c.impl == "compile"]


def _run_case(case):
    """Measure one case, recording an error (OOM, missing package) in the row instead of stopping."""
    row = case.row()
    try:
        row.update(case.run())
    except Exception as err:  # noqa: BLE001 - one failing row must not stop the run
        row["error"] = f"{type(err).__name__}: {err}"[:500]
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="ce,flce")
    parser.add_argument("--impls", default="fat5,torch,compile,liger,matmuls")
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--variants", action="store_true", help="time the fat5 launch variants instead")
    parser.add_argument("--out", default=os.environ.get("OUT", "."),
                        help="where a standalone run writes (not benchmarks/results: fused.py's rows are the record)")  # fmt: skip
    args = parser.parse_args()
    torch.set_float32_matmul_precision("highest")
    from results_io import environment, write_results

    env = environment()
    print(env, flush=True)
    if args.variants:
        cases = variant_cases()
    else:
        cases = build_cases(args.only.split(","), args.impls.split(","), args.modes.split(","))
    rows = []
    title = "Cross-entropy and fused linear + cross-entropy cases" + (": fat5 launch variants" if args.variants else "")
    for case in cases:
        row = _run_case(case)
        rows.append(row)
        if "error" in row:
            print(f"{row['kernel']:5s} {row['impl']:10s} {row['shape']:38s} {row['mode']:7s} ERROR {row['error'][:90]}")
        else:
            print(f"{row['kernel']:5s} {row['impl']:10s} {row['shape']:38s} {row['mode']:7s} {row['ms']:9.3f} ms "
                  f"{row['peak_MiB']:9.1f} MiB {row.get('rel_err', float('nan')):9.2e}", flush=True)  # fmt: skip
        write_results("fused_cross_entropy_cases", rows, env=env, args=args, title=title, output_dir=args.out)


if __name__ == "__main__":
    main()
