"""What LoRA costs on a GPU: FAT5-small training steps and forwards, full finetuning vs. LoRA on every projection.

A LoRA-wrapped projection is no longer a plain ``nn.Linear``: the model's fused q/k/v and wi_0/wi_1 matmuls fall back
to one matmul per projection, plus the LoRA branch (two thin matmuls and a dropout) on each; the Triton attention,
RMSNorm, gated activation and loss kernels stay in use. Per model (seq2seq FAT5-small, and its encoder with a
classification head) and mode:

- ``full``: every weight trained (AdamW, fused);
- ``lora``: LoRA r=8 on q, k, v, o, wi_0, wi_1, wo (peft), the head trained in full;
- train ms: one optimizer step (forward, backward, AdamW) under bf16 autocast, median of ``--steps`` steps, each
  synchronized; peak GB: ``torch.cuda.max_memory_allocated`` over those steps;
- forward ms: one inference forward (no grad, bf16 autocast) of the model as trained; for ``lora`` also after
  ``merge_and_unload`` (the fused projections come back).

Writes ``finetune_lora.json`` and ``.md``. Usage (GPU machine, repository root)::

    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/finetune_lora.py --output-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import time

import results_io  # benchmarks/ is on the path: the script runs as python benchmarks/finetune_lora.py
import torch

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration, FAT5ForSequenceClassification

# FAT5-small (as benchmarks/optimizer.py), 32k vocabulary.
MODEL_CONFIG = dict(
    vocab_size=32768, d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=12, num_decoder_layers=12,
    feed_forward_proj="gated-gelu", dropout_rate=0.0,
)  # fmt: skip
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"])


def build(model_kind: str, mode: str, device: str = "cuda"):
    """The model to time: ``model_kind`` in (seq2seq, classifier), ``mode`` in (full, lora)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if model_kind == "seq2seq":
        model = FAT5ForConditionalGeneration(FAT5Config(**MODEL_CONFIG))
        task_type, heads = "SEQ_2_SEQ_LM", None
    else:
        model = FAT5ForSequenceClassification(FAT5Config(num_labels=3, **MODEL_CONFIG))
        task_type, heads = "SEQ_CLS", ["classification_head"]
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(task_type=task_type, modules_to_save=heads, **LORA))
    return model.to(device)


def make_batch(model_kind: str, batch_size: int, input_length: int, target_length: int, device: str = "cuda"):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, MODEL_CONFIG["vocab_size"], (batch_size, input_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, input_length * 3 // 4 :] = 0  # half the rows padded by a quarter
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if model_kind == "seq2seq":
        batch["labels"] = torch.randint(
            2, MODEL_CONFIG["vocab_size"], (batch_size, target_length), generator=generator
        )
    else:
        batch["labels"] = torch.randint(0, 3, (batch_size,), generator=generator)
    return {k: v.to(device) for k, v in batch.items()}


def timed(fn, steps: int) -> float:
    """Median milliseconds of ``fn`` over ``steps`` synchronized calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(model_kind: str, mode: str, batch: dict, steps: int) -> dict:
    model = build(model_kind, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    train_ms = timed(train_step, steps)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if model_kind == "seq2seq":
        inputs["decoder_input_ids"] = batch["labels"]

    def forward(module):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            module(**inputs)

    model.eval()
    row = dict(
        model=model_kind, mode=mode, train_ms=train_ms, peak_GB=peak_gb,
        forward_ms=timed(lambda: forward(model), steps),
        trainable_parameters=sum(p.numel() for p in params),
        parameters=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip
    if mode == "lora":
        merged = model.merge_and_unload()
        row["merged_forward_ms"] = timed(lambda: forward(merged), steps)
    optimizer.zero_grad(set_to_none=True)
    return row


TITLE = "LoRA vs. full finetuning: FAT5-small on one GPU (bf16 autocast, Triton kernels on)"


def to_markdown(args: dict, rows: list[dict]) -> str:
    """The set-up in one paragraph and a row per (model, mode), LoRA's train time as a ratio of full finetuning's."""
    lines = [
        f"Batch {args['batch_size']} x {args['input_length']} input tokens "
        f"(seq2seq targets: {args['target_length']}); LoRA r=8 on q, k, v, o, wi_0, wi_1, wo. train ms: forward + "
        "backward + fused AdamW, median of synchronized steps; forward ms: inference forward; merged: after "
        "merge_and_unload.",
        "",
        "| model | mode | trainable params | train ms | vs. full | peak GB | forward ms | merged forward ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    full = {r["model"]: r for r in rows if r["mode"] == "full"}
    for r in rows:
        ratio = f"{r['train_ms'] / full[r['model']]['train_ms']:.2f}x" if r["model"] in full else ""
        merged = f"{r['merged_forward_ms']:.2f}" if "merged_forward_ms" in r else ""
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['trainable_parameters'] / 1e6:.2f}M of {r['parameters'] / 1e6:.1f}M | "
            f"{r['train_ms']:.2f} | {ratio} | {r['peak_GB']:.2f} | {r['forward_ms']:.2f} | {merged} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-length", type=int, default=512)
    parser.add_argument("--target-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    env = results_io.environment()
    rows = []
    for model_kind in ("seq2seq", "classifier"):
        batch = make_batch(model_kind, args.batch_size, args.input_length, args.target_length)
        for mode in ("full", "lora"):
            rows.append(measure(model_kind, mode, batch, args.steps))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    run_args = dict(batch_size=args.batch_size, input_length=args.input_length, target_length=args.target_length,
                    steps=args.steps, lora=LORA)  # fmt: skip
    results_io.write_results("finetune_lora", rows, env=env, args=run_args, title=TITLE,
                             body=to_markdown(run_args, rows), output_dir=args.output_dir)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
