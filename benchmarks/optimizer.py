"""Optimizer step of FAT5-small (147M parameters in 282 tensors, float32): AdamWScale's three implementations next
to torch's AdamW, in one process on one GPU.

Per variant: wall time of a step (20 steps back to back, synchronized at the end: host issue and GPU work
together, as in training), the host time to issue one step, and the summed GPU kernel time of one step
(torch.profiler). The fused AdamWScale moves ``7 x 4 bytes`` per parameter (reads p, g, m, v; writes p, m, v) plus
the norm's read of p: its bandwidth is reported against that. Writes ``optimizer.json`` and ``.md`` through
``results_io``. Usage (GPU machine, repository root)::

    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/optimizer.py --output-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from results_io import RESULTS_DIR, Column, environment, write_results

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration
from fat5_hf.optim import AdamWScale

# FAT5-small as the pretraining benchmark builds it (untied LM head, 32k vocabulary).
MODEL_CONFIG = dict(
    vocab_size=32768, d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=12, num_decoder_layers=12,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)  # fmt: skip

VARIANTS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "adamw_scale_fused": lambda params: AdamWScale(params, lr=1e-4, fused=True),
    "adamw_scale_foreach": lambda params: AdamWScale(params, lr=1e-4, foreach=True),
    "adamw_scale_loop": lambda params: AdamWScale(params, lr=1e-4, foreach=False, fused=False),
    "torch_adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
    "torch_adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=True),
}


def model_parameters(device: str = "cuda") -> list[torch.Tensor]:
    """FAT5-small's parameters (float32) with random gradients."""
    model = FAT5ForConditionalGeneration(FAT5Config(**MODEL_CONFIG))
    # transformers 5 ties the LM head whatever tie_word_embeddings says; FAT5-small has its own (as the recipe's
    # untie_lm_head and benchmarks/pretrain.py give it): 147M parameters in 282 tensors.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    params = [p.detach().to(device).requires_grad_() for p in model.parameters()]
    generator = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=generator) * 1e-3
    return params


def measure(name: str, params: list[torch.Tensor], steps: int = 20) -> dict:
    optimizer = VARIANTS[name](params)
    for _ in range(3):
        optimizer.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    host = []
    for _ in range(5):  # the queue drained before each: the host's issue time alone
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        host.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            optimizer.step()
        torch.cuda.synchronize()
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 3
    kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA") / 3
    numel = sum(p.numel() for p in params)
    return dict(
        variant=name,
        step_ms=wall_ms,
        host_ms=sorted(host)[len(host) // 2],
        gpu_ms=kernel_us / 1e3,
        kernels_per_step=kernels,
        tensors=len(params),
        parameters=numel,
        # the fused update's minimum traffic (plus the norm's read of the weights), at the step's GPU time
        GB_per_s=round(8 * 4 * numel / (kernel_us * 1e3)) if kernel_us else None,
    )


TITLE = "Optimizer step: AdamWScale vs. torch AdamW (FAT5-small, float32)"


def method(rows: list[dict]) -> str:
    """How the table's numbers were taken."""
    return (
        f"{rows[0]['tensors']} tensors, {rows[0]['parameters'] / 1e6:.1f}M parameters. step ms: 20 steps back to "
        "back (host and GPU); host ms: issuing one step on an idle GPU (median of 5); GPU ms: summed kernel time of "
        "one step (torch.profiler); GB/s: 32 bytes per parameter (the fused update's reads and writes and the "
        "norm's read) over the GPU time."
    )


def columns(rows: list[dict]) -> list[Column]:
    """The table: each variant's times and its step time over torch's fused AdamW's."""
    base = next((r for r in rows if r["variant"] == "torch_adamw_fused"), None)
    ratio = (lambda r: f"{r['step_ms'] / base['step_ms']:.2f}x") if base else (lambda r: None)
    return [
        Column("variant", "variant"), Column("step ms", "step_ms", ".2f"), Column("vs. torch fused AdamW", ratio),
        Column("host ms", "host_ms", ".2f"), Column("GPU ms", "gpu_ms", ".2f"),
        Column("kernels a step", "kernels_per_step", ".0f"), Column("GB/s", "GB_per_s"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    env = environment()
    rows = []
    for name in names:
        rows.append(measure(name, model_parameters()))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    write_results("optimizer", rows, env=env, args=args, title=TITLE, method=method(rows), columns=columns(rows),
                  output_dir=args.output_dir)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
