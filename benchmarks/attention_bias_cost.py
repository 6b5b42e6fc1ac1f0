"""What the T5 bias costs the attention kernel at the pretraining shape, kernel time only (CUDA events).

For q, k, v of shape (64, 8, L, 64) bf16 (FAT5-small, batch 64), times forward and forward+backward of:

- ``t5+grad``: fat5's kernel with a T5 bucket table that needs a gradient (the training case);
- ``t5_nograd``: the same table without gradient (no table-gradient reduction in the backward);
- ``fat5_nobias``: fat5's kernel with no bias (the cost of the kernel itself);
- ``sdpa``: PyTorch SDPA (flash) without bias, the ceiling.

Usage (GPU machine, repository root)::

    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/attention_bias_cost.py --seqs 512,1024

Prints one line per case and writes ``attention_bias_cost.json`` and ``.md`` through ``results_io``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from results_io import RESULTS_DIR, Column, environment, write_results

from fat5_kernels.attention import t5_flash_attention

TITLE = "What the T5 bias costs the attention kernel (FAT5-small pretraining shape)"
COLUMNS = [
    Column("L", "L"), Column("causal", lambda r: int(r["causal"])), Column("case", "case"),
    Column("fwd us", "fwd_us", ".0f"), Column("fwd+bwd us", "fwdbwd_us", ".0f"),
    Column("fwd+bwd vs. sdpa", "fwdbwd_vs_sdpa", ".2f"),
]  # fmt: skip


def cases(q, k, v, table, causal: bool) -> dict:
    """The four attention calls compared, as closures over the inputs."""
    table_no_grad = table.detach()
    return {
        "t5+grad": lambda: t5_flash_attention(q, k, v, bias_table=table, bidirectional=not causal, causal=causal),
        "t5_nograd": lambda: t5_flash_attention(
            q, k, v, bias_table=table_no_grad, bidirectional=not causal, causal=causal
        ),
        "fat5_nobias": lambda: t5_flash_attention(q, k, v, causal=causal),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0),
    }


def time_us(fn, grad_output: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[float, float]:
    """Median forward and forward+backward time of ``fn`` in microseconds."""
    fwd = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fwdbwd = triton.testing.do_bench(
        lambda: fn().backward(grad_output), warmup=10, rep=50, grad_to_none=leaves, return_mode="median"
    )
    return fwd * 1e3, fwdbwd * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", default="512,1024")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    env = environment()
    torch.manual_seed(0)
    B, H, D = args.batch, args.heads, args.head_dim
    rows = []
    for L in [int(s) for s in args.seqs.split(",")]:
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for causal in (False, True):
            table = (torch.randn(H, 32, device="cuda") * 0.5).requires_grad_()
            point = []
            for name, fn in cases(q, k, v, table, causal).items():
                fwd, fwdbwd = time_us(fn, do, [q, k, v, table])
                print(f"L={L} causal={int(causal)} {name:12s} fwd {fwd:7.1f} us  fwd+bwd {fwdbwd:7.1f} us", flush=True)
                point.append(dict(L=L, causal=causal, case=name, B=B, H=H, D=D, fwd_us=fwd, fwdbwd_us=fwdbwd))
            sdpa = next(r for r in point if r["case"] == "sdpa")
            rows += [dict(r, fwdbwd_vs_sdpa=r["fwdbwd_us"] / sdpa["fwdbwd_us"]) for r in point]
    method = (
        f"q, k, v ({B}, {H}, L, {D}) bf16, 32 buckets, max distance 128, scale 1.0; kernel time only "
        "(`triton.testing.do_bench`, median), autotuned; the four cases side by side in one process. t5+grad: the "
        "training case (the bucket table needs a gradient); t5_nograd: the same table without gradient; "
        "fat5_nobias: the kernel without bias; sdpa: PyTorch SDPA flash without bias, the ceiling."
    )
    write_results("attention_bias_cost", rows, env=env, args=args, title=TITLE, method=method, columns=COLUMNS,
                  output_dir=args.output_dir)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
