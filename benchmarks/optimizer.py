"""Optimizer step of FAT5-small (147M parameters in 282 tensors, float32): AdamWScale's three implementations next
to torch's AdamW, in one process on one GPU.

Per variant: wall time of a step (20 steps back to back, synchronized at the end: host issue and GPU work
together, as in training), the host time to issue one step, and the summed GPU kernel time of one step
(torch.profiler). The fused AdamWScale moves ``7 x 4 bytes`` per parameter (reads p, g, m, v; writes p, m, v) plus
the norm's read of p: its bandwidth is reported against that. Writes ``optimizer.json`` and ``.md``. Usage (GPU
machine, repository root)::

    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/optimizer.py --output-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Callable

import torch

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


def to_markdown(env: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "torch_adamw_fused"), None)
    lines = [
        "# Optimizer step: AdamWScale vs. torch AdamW (FAT5-small, float32)",
        "",
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. {rows[0]['tensors']} tensors, "
        f"{rows[0]['parameters'] / 1e6:.1f}M parameters. step ms: 20 steps back to back (host and GPU); host ms: "
        "issuing one step on an idle GPU (median of 5); GPU ms: summed kernel time of one step (torch.profiler); "
        "GB/s: 32 bytes per parameter (the fused update's reads and writes and the norm's read) over the GPU time.",
        "",
        "| variant | step ms | vs. torch fused AdamW | host ms | GPU ms | kernels a step | GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['step_ms'] / base['step_ms']:.2f}x" if base else ""
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.2f} | {ratio} | {r['host_ms']:.2f} | {r['gpu_ms']:.2f} | "
            f"{r['kernels_per_step']:.0f} | {r['GB_per_s']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    env = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    rows = []
    for name in names:
        rows.append(measure(name, model_parameters()))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "optimizer.json"), "w") as f:
        json.dump(dict(environment=env, rows=rows), f, indent=1)
    with open(os.path.join(args.output_dir, "optimizer.md"), "w") as f:
        f.write(to_markdown(env, rows))
    return rows


if __name__ == "__main__":
    main()
