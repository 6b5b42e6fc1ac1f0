"""Pretraining throughput of FAT5 against Hugging Face's T5 of the same shape, on one GPU.

FAT5-small shape: d_model 512, 8 heads of 64, gated-GELU d_ff 2048, 12 encoder + 12 decoder layers,
vocab 32,768; 512 input and 512 target tokens per example; bf16 autocast over fp32 weights (what
``accelerate``'s ``mixed_precision="bf16"`` does); fused AdamW (and FAT5 with AdamWScale, the recipe's
default optimizer). Random token batches, random init: only speed is measured. Every variant runs in
the same process, one after the other, with the same batches, so the numbers compare on this machine.

Variants:
- ``t5``: transformers' T5ForConditionalGeneration, eager attention, not compiled;
- ``t5_compiled``: the same under ``torch.compile`` (the strongest baseline a T5 user has);
- ``fat5``: fat5_hf's FAT5ForConditionalGeneration (Triton kernels on CUDA);
- ``fat5_compiled``: FAT5 under ``torch.compile`` (reported as an error row if it does not compile);
- ``fat5_adamw_scale``: FAT5 with ``fat5_hf.optim.AdamWScale`` instead of fused AdamW;
- ``t5_cudagraphs``, ``fat5_cudagraphs`` (not in the default list): ``torch.compile(mode="reduce-overhead")``, the
  compiled forward and backward replayed as CUDA graphs, which removes the host's launch work from the step;
- ``fat5_bf16residual_cudagraphs``, ``fat5_bf16residual_compiled`` (not in the default list): FAT5 with
  ``residual_dtype="bfloat16"``, the pretraining recipe's setting (a bf16 residual stream, as T5X trains T5; T5
  keeps it in fp32 under autocast).

Tokens per second count encoder and decoder tokens: ``GPUs * batch * (input_length + target_length) / step time``.

Usage (GPU machine, repository root)::

    export PYTHONPATH=$PWD/kernels:$PWD
    python benchmarks/pretrain.py --batch-size 32 --output-dir benchmarks/results

writes ``pretrain.json`` and ``pretrain.md`` into ``--output-dir`` (through ``results_io``). Each model at the
largest batch it fits on an 80 GB GPU, in one process::

    python benchmarks/pretrain.py --variants t5_compiled,fat5_bf16residual_cudagraphs --batch-size 64 \
        --variant-batch-size fat5_bf16residual_cudagraphs=256 --steps 5 --warmup-steps 3

Scaling to several GPUs of one host::

    torchrun --nproc_per_node 2 benchmarks/pretrain.py --batch-size 64 --variants t5_compiled,fat5_compiled

measures each variant first on one GPU (rank 0 alone, the others wait), then on every GPU with
``DistributedDataParallel`` (NCCL), the same batch per GPU, and reports the scaling efficiency
``tokens/s on N GPUs / (N * tokens/s on one)`` (the same two files: one current result per script).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback

import torch
import torch.distributed as dist
from results_io import RESULTS_DIR, Column, environment, write_results

DEFAULT_VARIANTS = ("t5", "t5_compiled", "fat5", "fat5_compiled", "fat5_adamw_scale")
VARIANTS = DEFAULT_VARIANTS + (
    "t5_cudagraphs", "fat5_cudagraphs", "fat5_bf16residual_cudagraphs", "fat5_bf16residual_compiled"
)

FAT5_SMALL_SHAPE = dict(
    d_model=512,
    d_kv=64,
    num_heads=8,
    d_ff=2048,
    num_layers=12,
    num_decoder_layers=12,
    feed_forward_proj="gated-gelu",
    vocab_size=32768,
    dropout_rate=0.0,
    tie_word_embeddings=False,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)


def build_model(variant: str) -> torch.nn.Module:
    if variant.startswith("t5"):
        from transformers import T5Config, T5ForConditionalGeneration

        model = T5ForConditionalGeneration(T5Config(**FAT5_SMALL_SHAPE, attn_implementation="eager"))
    else:
        from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

        # As the pretraining recipe trains: its collator emits only tokenizer ids, so the per-step id checks (host
        # syncs) are off.
        residual_dtype = "bfloat16" if "_bf16residual" in variant else None
        model = FAT5ForConditionalGeneration(
            FAT5Config(**FAT5_SMALL_SHAPE, check_token_ids=False, residual_dtype=residual_dtype)
        )
    # transformers 5 ties the LM head whatever tie_word_embeddings says; FAT5-small (147M) has its own head, as the
    # recipe gives it (recipes/pretrain.py: untie_lm_head).
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def build_optimizer(variant: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if variant == "fat5_adamw_scale":
        from fat5_hf.optim import AdamWScale

        return AdamWScale(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)


def measure(
    variant: str, args: argparse.Namespace, batches: list[tuple[torch.Tensor, torch.Tensor]], gpus: int = 1
) -> dict:
    """Time ``args.steps`` training steps of ``variant`` on ``gpus`` GPUs (DDP when more than one)."""
    row = dict(
        variant=variant,
        gpus=gpus,
        batch_size=len(batches[0][0]),
        input_length=args.input_length,
        target_length=args.target_length,
    )
    model = optimizer = forward = train_step = None
    try:
        torch.manual_seed(0)
        model = build_model(variant).cuda().train()
        row["parameters_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        optimizer = build_optimizer(variant, model, args.lr)
        forward = model
        if gpus > 1:
            forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
        cuda_graphs = variant.endswith("_cudagraphs")
        if variant.endswith("_compiled"):
            forward = torch.compile(forward)
        elif cuda_graphs:
            forward = torch.compile(forward, mode="reduce-overhead")

        def train_step(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if cuda_graphs:  # a new iteration: the graphs may overwrite the previous step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach().clone()  # a graph output is overwritten by the next replay

        start = time.perf_counter()
        for i in range(args.warmup_steps):
            loss = train_step(*batches[i % len(batches)])
        torch.cuda.synchronize()
        row["warmup_s"] = round(time.perf_counter() - start, 2)
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for i in range(args.steps):
            loss = train_step(*batches[i % len(batches)])
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - start) / args.steps
        peak_bytes = torch.cuda.max_memory_allocated()
        # A CUDA graph's memory pool is reserved once, at capture; its replays allocate nothing, so only the
        # reserved figure shows what the graph variants hold.
        reserved_bytes = torch.cuda.max_memory_reserved()
        if gpus > 1:  # the slowest rank sets the pace; report the largest footprint
            stats = torch.tensor([step_s, peak_bytes, reserved_bytes], dtype=torch.float64, device="cuda")
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            step_s, peak_bytes, reserved_bytes = stats.tolist()
        if args.profile and gpus == 1:
            row["profile"] = profile_steps(train_step, batches, args, variant)
        row.update(
            step_ms=round(step_s * 1e3, 2),
            tokens_per_s=round(gpus * row["batch_size"] * (args.input_length + args.target_length) / step_s),
            peak_memory_GiB=round(peak_bytes / 2**30, 2),
            reserved_memory_GiB=round(reserved_bytes / 2**30, 2),
            final_loss=round(float(loss), 4),
        )
    except Exception as err:  # one failing variant (e.g. out of memory, no compile) must not hide the others
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        traceback.print_exc(limit=4)
    model = optimizer = forward = train_step = None  # free the GPU memory before the next variant
    torch._dynamo.reset()  # compiled graphs and CUDA-graph pools hold the variant's memory otherwise
    gc.collect()
    torch.cuda.empty_cache()
    return row


def profile_steps(train_step, batches, args: argparse.Namespace, variant: str) -> dict:
    """Per-kernel CUDA time of 3 steps (torch.profiler) and how busy the GPU is: a step whose wall time is
    well above its summed kernel time is bound by the host (Python, launches), not by the GPU."""
    from torch.profiler import ProfilerActivity, profile

    steps = 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            train_step(*batches[i % len(batches)])
        host_ms = (time.perf_counter() - start) * 1e3 / steps
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    table = events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    print(  # the run's log, not a results file: benchmarks/results holds one result per script
        f"{variant}: wall {wall_ms:.1f} ms/step (profiled), host issue {host_ms:.1f} ms/step, "
        f"summed kernel time {kernel_ms:.1f} ms/step\n{table}",
        flush=True,
    )
    return dict(wall_ms=round(wall_ms, 1), host_issue_ms=round(host_ms, 1), kernel_ms=round(kernel_ms, 1))


TITLE = "Pretraining throughput: FAT5 vs. Hugging Face T5 (FAT5-small shape)"


def method(env: dict, args: argparse.Namespace) -> str:
    """How the table's numbers were taken, from the run's arguments."""
    launcher = f"torchrun --nproc_per_node {env['gpus']} " if env["gpus"] > 1 else "python "
    return (
        "d_model 512, 8 heads, gated-GELU d_ff 2048, 12+12 layers, vocab 32,768; per GPU, batch (column) x "
        f"({args.input_length} input + {args.target_length} target) tokens; bf16 autocast, fp32 weights; "
        f"{args.warmup_steps} warm-up steps, {args.steps} timed steps; gradient clipping at 1.0; the variants one "
        f"after the other in one process. Command: `{launcher}benchmarks/pretrain.py {' '.join(args.argv)}`.\n\n"
        "vs. t5_compiled: tokens/s over compiled T5's on as many GPUs, each at its own batch size. Scaling: "
        "tokens/s on N GPUs over N times the same variant's on one. Peak GiB: most memory allocated during the "
        "timed steps; reserved GiB: most held by PyTorch's allocator, including CUDA-graph pools (the "
        "`_cudagraphs` variants' replays allocate nothing, so only reserved counts their memory)."
    )


def columns(rows: list[dict]) -> list[Column]:
    """The table: each variant's step time and tokens/s, against compiled T5 and against itself on one GPU."""
    ok = [r for r in rows if "error" not in r]

    def versus_t5(row: dict) -> str | None:
        reference = next((r for r in ok if r["variant"] == "t5_compiled" and r["gpus"] == row["gpus"]), None)
        return f"{row['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference and "error" not in row else None

    def scaling(row: dict) -> str | None:
        single = next((r for r in ok if r["variant"] == row["variant"] and r["gpus"] == 1), None)
        if row["gpus"] == 1 or single is None or "error" in row:
            return None
        return f"{row['tokens_per_s'] / (row['gpus'] * single['tokens_per_s']):.2f}"

    return [
        Column("variant", "variant"), Column("GPUs", "gpus"), Column("batch", "batch_size"),
        Column("optimizer", lambda r: "AdamWScale" if r["variant"] == "fat5_adamw_scale" else "AdamW (fused)"),
        Column("step ms", lambda r: f"error: {r['error'][:120]}" if "error" in r else f"{r['step_ms']:.1f}"),
        Column("tokens/s", "tokens_per_s", ","), Column("vs. t5_compiled", versus_t5), Column("scaling", scaling),
        Column("peak GiB", "peak_memory_GiB", ".1f"), Column("reserved GiB", "reserved_memory_GiB", ".1f"),
        Column("params (M)", "parameters_M"),
    ]  # fmt: skip


def batch_sizes(args: argparse.Namespace, variants: list[str]) -> dict[str, int]:
    """Each variant's batch per GPU: ``--batch-size``, or its ``--variant-batch-size VARIANT=N``."""
    sizes = dict.fromkeys(variants, args.batch_size)
    for spec in args.variant_batch_size:
        variant, _, size = spec.partition("=")
        if variant not in sizes or not size.isdigit() or int(size) < 1:
            raise SystemExit(
                f"--variant-batch-size {spec!r}: expected VARIANT=N with N >= 1 and VARIANT one of the --variants "
                f"{variants}"
            )
        sizes[variant] = int(size)
    return sizes


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-length", type=int, default=512)
    parser.add_argument("--target-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (compilation happens there)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument(
        "--variant-batch-size",
        action="append",
        default=[],
        metavar="VARIANT=N",
        help="another batch size for one variant (repeatable), to compare each model at the largest batch it fits",
    )
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print per-kernel CUDA time of 3 steps per variant (torch.profiler)",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/pretrain.py measures GPU throughput and needs CUDA")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"Unknown variants {unknown}; choose among {list(VARIANTS)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:  # launched by torchrun / accelerate launch
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    torch.backends.cuda.matmul.allow_tf32 = True
    sizes = batch_sizes(args, variants)
    env = environment(gpus=world)
    if rank == 0:
        print(json.dumps(env), flush=True)

    vocab = FAT5_SMALL_SHAPE["vocab_size"]
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    for variant in variants:
        batch = sizes[variant]
        # the same batches for every variant of one batch size; each rank its own data, as a data-parallel run sees
        generator = torch.Generator().manual_seed(rank)
        batches = [
            (
                torch.randint(2, vocab, (batch, args.input_length), generator=generator).cuda(),
                torch.randint(2, vocab, (batch, args.target_length), generator=generator).cuda(),
            )
            for _ in range(4)
        ]
        # one GPU (rank 0 alone; the others wait), then every GPU with DDP: a side-by-side scaling baseline
        for gpus in (1, world) if world > 1 else (1,):
            if gpus == 1 and rank != 0:
                dist.barrier()
                continue
            row = measure(variant, args, batches, gpus)
            if gpus == 1 and world > 1:
                dist.barrier()
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return rows

    _, markdown_path = write_results("pretrain", rows, env=env, args=args, title=TITLE, method=method(env, args),
                                     columns=columns(rows), output_dir=args.output_dir)  # fmt: skip
    print(markdown_path.read_text())
    return rows


if __name__ == "__main__":
    main()
