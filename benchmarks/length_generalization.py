"""Length generalization of FAT5's position encodings: train at one length, measure the denoising loss at longer ones.

Tiny FAT5 models that differ only in `position_encoding_type` (T5's buckets as the baseline, ALiBi, RoPE, FIRE, none)
are trained from the same initial seed on the same text, cut into windows of `--train-length` tokens, for the same
number of steps. Each is then evaluated (teacher-forced cross-entropy of the targets, no dropout) on held-out windows
of every `--eval-lengths` length.

Text and objective: the shipped French corpus (`recipes/data/fr_corpus_*.jsonl`, or `--train-file` / `--eval-file`,
JSON lines with a `text` field or plain text), read as UTF-8 bytes (ids = byte + 3, so 0/1/2 stay pad/eos/unk): no
tokenizer, and long windows from little text. The evaluation text is the validation file plus the last `--holdout`
bytes of the training file, which training never sees (29 KB by default: 3 windows of 8192). T5's span corruption (15% noise, mean span
3, `random_spans_noise_mask` as in T5) with `--sentinels` sentinel ids reused cyclically, so that every sentinel
used at long lengths was also trained (otherwise a long input would read untrained embeddings whatever the
encoding). A window of length L gives an encoder input of about 0.9 L and targets of about 0.2 L.

The default (5 encodings x 400 steps of a 4+4-layer d=256 gated-GELU model with tied embeddings, at length 512,
batch 32, AdamW 2e-3, bf16 autocast, eval up to 8192) is sized to finish within about 5 minutes on one H100; `--steps`, `--d-model`, `--num-layers`, `--batch-size` and the lengths
scale it up. FIRE trains on the attention kernel (its per-distance table, exact while every position is below its learned
threshold, which starts at the training length) and is evaluated past it on the kernel too, which evaluates FIRE per
element from its compact piecewise-linear parameters (forward only: no L x L bias at 8192). Each row records
`materialized_biases`, how many times the evaluation materialized a `(1, H, M, N)` position bias (the PyTorch
attention path): 0 on the kernel path, for T5's buckets, ALiBi and FIRE alike.

Writes benchmarks/results/length_generalization.json, .md and .png (or --output-dir).
Usage: python benchmarks/length_generalization.py [--encodings t5,rope] [--steps 400] [--eval-lengths 512,1024]
       python benchmarks/length_generalization.py --plot-only   (the plot of an existing JSON; needs matplotlib)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "kernels")]

import results_io  # noqa: E402  (benchmarks/ is on the path: the script runs as python benchmarks/<name>.py)

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration  # noqa: E402
from fat5_hf.position_encoding import ALiBiPositionBias, FIREPositionBias, T5RelativePositionBias  # noqa: E402

SCRIPT = "length_generalization"
BYTE_OFFSET = 3  # ids 0, 1, 2: pad, eos, unk (T5's)


# ---- data ----------------------------------------------------------------------------------------------------------
def read_bytes(path: Path) -> np.ndarray:
    """The documents of a JSON-lines (`text` field) or plain-text file as one stream of token ids (byte + 3), the
    documents separated by eos."""
    if path.suffix in (".jsonl", ".json"):
        documents = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        documents = [path.read_text(encoding="utf-8")]
    ids = []
    for document in documents:
        ids.extend(b + BYTE_OFFSET for b in document.encode("utf-8"))
        ids.append(1)
    return np.asarray(ids, dtype=np.int64)


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator):
    """T5's `random_spans_noise_mask`: a boolean mask of `length` with about `noise_density * length` noise tokens
    in spans of mean length `mean_span`, starting with a non-noise span."""
    num_noise = max(1, min(length - 1, round(length * noise_density)))
    num_spans = max(1, round(num_noise / mean_span))
    num_nonnoise = length - num_noise

    def segment(total: int, parts: int) -> np.ndarray:
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
        return np.diff(np.concatenate(([0], cuts, [total])).astype(np.int64))

    noise_lengths, nonnoise_lengths = segment(num_noise, num_spans), segment(num_nonnoise, num_spans)
    mask = np.zeros(length, dtype=bool)
    position = 0
    for keep, drop in zip(nonnoise_lengths, noise_lengths):
        position += keep
        mask[position : position + drop] = True
        position += drop
    return mask


def span_corruption(window: np.ndarray, sentinel_base: int, sentinels: int, rng: np.random.Generator):
    """`(input_ids, labels)` of one window: each noise span becomes a sentinel in the input, and the labels are
    `sentinel, span` for each span in order, then eos. Span k's sentinel is id `sentinel_base + k % sentinels`."""
    mask = random_spans_noise_mask(len(window), 0.15, 3.0, rng)
    starts = mask & ~np.concatenate(([False], mask[:-1]))
    sentinel = sentinel_base + (np.cumsum(starts) - 1) % sentinels  # at each position, the id of its span
    inputs = np.where(starts, sentinel, window)[~mask | starts]
    targets = np.insert(window[mask], np.flatnonzero(starts[mask]), sentinel[starts])
    return np.append(inputs, 1), np.append(targets, 1)


def batches(stream: np.ndarray, length: int, batch_size: int, count: int, sentinel_base: int, sentinels: int, seed: int):
    """`count` batches of span-corrupted windows of `length` tokens drawn at random offsets of `stream`, padded."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        offsets = rng.integers(0, len(stream) - length, size=batch_size)
        yield collate([span_corruption(stream[o : o + length], sentinel_base, sentinels, rng) for o in offsets])


def collate(examples) -> dict:
    def pad(arrays, value):
        out = torch.full((len(arrays), max(len(a) for a in arrays)), value, dtype=torch.long)
        for row, array in enumerate(arrays):
            out[row, : len(array)] = torch.from_numpy(array)
        return out

    input_ids = pad([e[0] for e in examples], 0)
    return dict(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=pad([e[1] for e in examples], -100))


# ---- models --------------------------------------------------------------------------------------------------------
def build_model(encoding: str, args, vocab_size: int) -> FAT5ForConditionalGeneration:
    torch.manual_seed(args.seed)
    config = FAT5Config(
        vocab_size=vocab_size, d_model=args.d_model, d_kv=args.d_model // args.num_heads, d_ff=4 * args.d_model,
        num_layers=args.num_layers, num_heads=args.num_heads, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, position_encoding_type=encoding,
        fire_threshold=float(args.train_length),
    )  # fmt: skip
    return FAT5ForConditionalGeneration(config).to(args.device)


def train(model, stream, args, sentinel_base: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (args.steps - step) / (args.steps - warmup + 1)))
    )
    model.train()
    losses = []
    data = batches(stream, args.train_length, args.batch_size, args.steps, sentinel_base, args.sentinels, args.seed)
    for batch in data:
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model, stream, length: int, args, sentinel_base: int) -> tuple[float, int, dict]:
    """Token-weighted mean loss over up to `--eval-windows` non-overlapping windows of `length` tokens; the shapes
    also hold `materialized_biases`, the calls of a position-bias module's materializing forward (PyTorch path)."""
    model.eval()
    materialized = []
    hooks = [
        module.register_forward_hook(lambda *_: materialized.append(1))
        for module in model.modules()
        if isinstance(module, (T5RelativePositionBias, ALiBiPositionBias, FIREPositionBias))
    ]
    rng = np.random.default_rng(args.seed + length)
    windows = min(args.eval_windows, len(stream) // length)
    if windows == 0:
        raise ValueError(f"the evaluation text has {len(stream)} tokens, fewer than one window of {length}")
    total, tokens, shapes = 0.0, 0, {}
    for w in range(windows):
        example = span_corruption(stream[w * length : (w + 1) * length], sentinel_base, args.sentinels, rng)
        batch = {k: v.to(args.device) for k, v in collate([example]).items()}
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = model(**batch).loss
        count = int((batch["labels"] != -100).sum())
        total += loss.float().item() * count
        tokens += count
        shapes = dict(encoder_length=batch["input_ids"].shape[1], decoder_length=batch["labels"].shape[1])
    for hook in hooks:
        hook.remove()
    return total / tokens, windows, {**shapes, "materialized_biases": len(materialized)}


# ---- results -------------------------------------------------------------------------------------------------------
TITLE = "Length generalization of the position encodings"


def write_results(output_dir: Path, args: dict, rows: list[dict]) -> dict:
    """`<output_dir>/length_generalization.json` (`{"environment", "args", "rows"}`) and `.md`, through `results_io`."""
    json_path, _ = results_io.write_results(SCRIPT, rows, env=results_io.environment(), args=args, title=TITLE,
                                            body=render_table(args, rows), output_dir=output_dir)  # fmt: skip
    return json.loads(json_path.read_text())


def render_table(args: dict, rows: list[dict]) -> str:
    """The set-up in one paragraph, then a row per encoding: final train loss and the held-out loss per length."""
    encodings = list(dict.fromkeys(r["position_encoding"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    by_key = {(r["position_encoding"], r["length"]): r for r in rows}
    lines = [
        f"Models of d_model {args['d_model']}, {args['num_layers']}+{args['num_layers']} layers, {args['num_heads']} "
        f"heads, trained {args['steps']} steps at length {args['train_length']} (batch {args['batch_size']}) on "
        "byte-level span corruption; denoising loss (nats per target byte) on held-out windows of each length.",
        "",
        "| encoding | train loss (last 10%) | " + " | ".join(f"L={L}" for L in lengths) + " |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for encoding in encodings:
        cells = []
        for L in lengths:
            r = by_key.get((encoding, L))
            cells.append("–" if r is None else r.get("error", f"{r['eval_loss']:.3f}"))
        final = next(r["final_train_loss"] for r in rows if r["position_encoding"] == encoding)
        lines.append(f"| {encoding} | {final:.3f} | " + " | ".join(cells) + " |")
    windows = {r["length"]: r["windows"] for r in rows if "windows" in r}
    lines += ["", "Held-out windows per length (the evaluation text bounds the longest): "
              + ", ".join(f"{L}: {n}" for L, n in sorted(windows.items())) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(output_dir: Path, rows: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, then rerun with --plot-only)", flush=True)
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for encoding in dict.fromkeys(r["position_encoding"] for r in rows):
        points = sorted((r["length"], r["eval_loss"]) for r in rows if r["position_encoding"] == encoding
                        and "eval_loss" in r)  # fmt: skip
        axes.plot(*zip(*points), marker="o", label=encoding)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("evaluation length (bytes)")
    axes.set_ylabel("denoising loss (nats / target byte)")
    axes.legend()
    axes.grid(alpha=0.3)
    path = output_dir / f"{SCRIPT}.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encodings", default="t5,alibi,rope,fire,none")
    parser.add_argument("--train-length", type=int, default=512)
    parser.add_argument("--eval-lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--sentinels", type=int, default=32, help="sentinel ids, reused cyclically")
    parser.add_argument("--eval-windows", type=int, default=8, help="at most this many windows per length")
    parser.add_argument("--train-file", type=Path, default=REPO_ROOT / "recipes/data/fr_corpus_train.jsonl")
    parser.add_argument("--eval-file", type=Path, default=REPO_ROOT / "recipes/data/fr_corpus_validation.jsonl")
    parser.add_argument("--holdout", type=int, default=16384,
                        help="tokens at the end of the training text moved to the evaluation text (more long windows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks/results")
    parser.add_argument("--plot-only", action="store_true",
                        help="only draw the plot of the JSON already in --output-dir (where matplotlib is installed)")
    args = parser.parse_args(argv)
    if args.plot_only:
        results = json.loads((args.output_dir / f"{SCRIPT}.json").read_text())
        plot(args.output_dir, results["rows"])
        return results

    train_stream, eval_stream = read_bytes(args.train_file), read_bytes(args.eval_file)
    if args.holdout:
        train_stream, eval_stream = train_stream[: -args.holdout], np.concatenate((eval_stream, train_stream[-args.holdout :]))
    sentinel_base = 256 + BYTE_OFFSET
    vocab_size = 128 * math.ceil((sentinel_base + args.sentinels) / 128)
    eval_lengths = [int(L) for L in args.eval_lengths.split(",") if L]
    rows = []
    for encoding in args.encodings.split(","):
        model = build_model(encoding, args, vocab_size)
        start = time.perf_counter()
        losses = train(model, train_stream, args, sentinel_base)
        final = float(np.mean(losses[-max(1, len(losses) // 10) :]))
        print(f"{encoding}: trained in {time.perf_counter() - start:.0f} s, loss {final:.3f}", flush=True)
        for length in eval_lengths:
            row = dict(position_encoding=encoding, length=length, final_train_loss=final)
            try:
                row["eval_loss"], row["windows"], shapes = evaluate(model, eval_stream, length, args, sentinel_base)
                row.update(shapes)
            except torch.cuda.OutOfMemoryError as err:
                row["error"] = f"OutOfMemoryError: {str(err)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    recorded = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    recorded["train_file"] = os.path.relpath(args.train_file, REPO_ROOT)
    recorded["eval_file"] = os.path.relpath(args.eval_file, REPO_ROOT)
    results = write_results(args.output_dir, recorded, rows)
    plot(args.output_dir, rows)
    return results


if __name__ == "__main__":
    main()
