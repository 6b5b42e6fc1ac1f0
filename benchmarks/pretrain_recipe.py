"""Throughput of the pretraining recipe itself (`accelerate launch recipes/pretrain.py`), eager, compiled and replayed
as CUDA graphs, one after the other on one GPU: real (unpadded) tokens/s of UL2 batches from the recipe's own data
pipeline, where `benchmarks/pretrain.py` times dense random batches.

Each mode is a separate `accelerate launch` of the FAT5-small config (one process, bf16) on the shipped French corpus
and tokenizer (no network), with every batch padded to one shape (``--pad-to-multiple-of``, 512 by default: the
compiled modes then compile once), or with each batch's UL2 denoisers drawn from one group of equal padded lengths
(``--group-denoisers-by-length``: less padding, a few batch shapes). The recipe logs tokens/s over windows of ``--logging-steps`` steps; the first ``--skip-windows``
(compilation, autotuning) are left out and the median of the others is reported, with the range.
Writes ``pretrain_recipe.json`` and ``.md`` through ``results_io``. Usage (GPU machine, repository root)::

    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/pretrain_recipe.py --output-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from results_io import RESULTS_DIR, Column, environment, write_results

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO_ROOT, "recipes", "data")

# The recipe's options for each mode (on top of the config and the shared overrides).
MODES = {
    "eager": [],
    "compiled": ["model.torch_compile=true"],
    "cudagraphs": ["model.torch_compile=true", "model.torch_compile_mode=reduce-overhead"],
}


def recipe_command(args: argparse.Namespace, mode: str, output_dir: str) -> list[str]:
    """The `accelerate launch` command line of one mode."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", args.mixed_precision, "--dynamo_backend", "no"]
    command += [os.path.join(REPO_ROOT, "recipes", "pretrain.py")]
    if args.config:
        command += ["--config", args.config]
    if not args.config_data:  # the shipped corpus and tokenizer instead of the config's Hub dataset
        command += [
            f"data.tokenizer={os.path.join(DATA_DIR, 'tokenizer')}",
            f"data.train_files=[{os.path.join(DATA_DIR, 'fr_corpus_train.jsonl')}]",
            f"data.eval_files=[{os.path.join(DATA_DIR, 'fr_corpus_validation.jsonl')}]",
            "data.dataset_name=null",
        ]
    command += [
        f"training.max_steps={args.steps}",
        f"logging.logging_steps={args.logging_steps}",
        f"training.eval_steps={args.steps}",
        "training.eval_batches=2",
        f"training.save_steps={args.steps + 1}",  # no checkpoint, only the final export
        f"optim.warmup_steps={min(5, args.steps)}",
        "logging.log_with=[]",
        "logging.progress_bar=false",
        f"training.output_dir={output_dir}",
    ]
    if args.pad_to_multiple_of:
        command.append(f"data.collator_kwargs.pad_to_multiple_of={args.pad_to_multiple_of}")
    if args.group_denoisers_by_length:
        command.append("data.collator_kwargs.group_denoisers_by_length=true")
    return command + MODES[mode] + list(args.override)


def summarize(mode: str, log_path: str, skip_windows: int) -> dict:
    """One result row from the recipe's ``train_log.jsonl``: median tokens/s of the windows after ``skip_windows``."""
    with open(log_path, encoding="utf-8") as log:
        records = [json.loads(line) for line in log]
    windows = [r for r in records if "tokens_per_s" in r]
    timed = windows[skip_windows:]
    if not timed:
        raise SystemExit(
            f"{mode}: {len(windows)} logging windows, none left after --skip-windows {skip_windows}; "
            "run more --steps or log more often (--logging-steps)"
        )
    rates = [r["tokens_per_s"] for r in timed]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return dict(
        mode=mode,
        steps=windows[-1]["step"],
        timed_windows=len(timed),
        tokens_per_s=round(statistics.median(rates)),
        tokens_per_s_min=round(min(rates)),
        tokens_per_s_max=round(max(rates)),
        tokens_per_s_windows=[round(r) for r in rates],
        final_loss=round(windows[-1]["loss"], 4),
        loss_windows=[round(r["loss"], 4) for r in windows],  # every window's mean loss, warm-up included
        eval_loss=round(evals[-1], 4) if evals else None,
    )


TITLE = "The pretraining recipe's throughput: eager, compiled, CUDA graphs"


def method(args: argparse.Namespace) -> str:
    """How the table's numbers were taken, from the run's arguments."""
    padding = f"padded to a multiple of {args.pad_to_multiple_of}" if args.pad_to_multiple_of else "default padding"
    if args.group_denoisers_by_length:
        padding += ", denoisers grouped by length"
    config = os.path.relpath(args.config, REPO_ROOT) if args.config else "(embedded default)"
    return (
        f"`accelerate launch recipes/pretrain.py --config {config}`, one process, {args.mixed_precision}; batches "
        f"{padding}; {args.steps} steps a mode. Tokens/s: real (unpadded) tokens over windows of "
        f"{args.logging_steps} steps, median (range) of the windows after the first {args.skip_windows}."
    )


def columns(rows: list[dict]) -> list[Column]:
    """The table: each mode's tokens/s, its ratio to eager, and its losses."""
    base = next((r for r in rows if r["mode"] == "eager"), None)
    ratio = (lambda r: f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x") if base else (lambda r: None)
    return [
        Column("mode", "mode"), Column("tokens/s", "tokens_per_s", ","),
        Column("range", lambda r: f"{r['tokens_per_s_min']:,}-{r['tokens_per_s_max']:,}"),
        Column("vs. eager", ratio), Column("loss at the end", "final_loss", ".3f"),
        Column("eval loss", "eval_loss", ".3f"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO_ROOT, "recipes", "configs", "pretrain-fat5-small.yaml"),
                        help="recipe config ('' for the embedded default)")  # fmt: skip
    parser.add_argument("--config-data", action="store_true", help="keep the config's data instead of the shipped")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--skip-windows", type=int, default=1, help="first logging windows left out (warm-up)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=512, help="0: the config's own padding")
    parser.add_argument("--group-denoisers-by-length", action="store_true",
                        help="each batch's UL2 denoisers from one group of equal lengths (less padding, a few shapes)")  # fmt: skip
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--override", action="append", default=[], help="extra recipe key=value (repeatable)")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    on_cpu = not torch.cuda.is_available() or "training.cpu=true" in [o.replace(" ", "").lower() for o in args.override]
    env = environment(gpu="CPU", gpus=0) if on_cpu else environment(gpus=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pretrain_recipe_") as scratch:
        for mode in modes:
            run_dir = os.path.join(scratch, mode)
            result = subprocess.run(recipe_command(args, mode, run_dir), capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{mode}: the recipe failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
            rows.append(summarize(mode, os.path.join(run_dir, "train_log.jsonl"), args.skip_windows))
            print(json.dumps(rows[-1]), flush=True)
    write_results("pretrain_recipe", rows, env=env, args=args, title=TITLE, method=method(args),
                  columns=columns(rows), output_dir=args.output_dir)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
