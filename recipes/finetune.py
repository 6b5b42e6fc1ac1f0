#!/usr/bin/env python
"""Finetune a FAT5 on a French task (classification, NER, extractive QA, text-to-text), full or LoRA.

    python recipes/finetune.py                                   # the embedded tiny run: CPU, shipped data, minutes
    python recipes/finetune.py --task allocine --model_name_or_path outputs/fat5-tiny-pretrain \\
        --do_train --do_eval --do_predict --output_dir outputs/allocine
    python recipes/finetune.py --task allocine --task_type text2text ...          # labels as generated words
    python recipes/finetune.py --task french-ner --lora --merge_lora ...          # LoRA, merged at the end
    python recipes/finetune.py --task_type sequence-classification --train_file train.csv \\
        --validation_file dev.csv --text_column_names sentence --label_column_name label ...
    python recipes/finetune.py recipes/configs/finetune-allocine.yaml            # every argument from one file
    python recipes/finetune.py --list_tasks                                       # the task registry

Arguments are transformers' example-script names (``--model_name_or_path``, ``--train_file``, ``--do_train``,
``--max_train_samples``...), parsed by ``HfArgumentParser`` from ``ModelArguments``, ``DataTrainingArguments``,
``LoraArguments`` (``fat5_hf.finetuning.arguments``) and ``Seq2SeqTrainingArguments``; one ``.yaml`` / ``.json`` file
may hold them all. Kernel switches live in the model config: ``--config_overrides use_triton_attention=false``.

Output folder (refused when not empty, unless ``--overwrite_output_dir``)::

    output_dir/config.json, model.safetensors, *.py, tokenizer files   # the model with its custom code
    output_dir/adapter_config.json, adapter_model.safetensors          # instead, with --lora (no --merge_lora)
    output_dir/lora_adapter/                                            # the adapters, with --lora --merge_lora
    output_dir/all_results.json, train_results.json, eval_results.json, test_results.json
    output_dir/test_predictions.jsonl                                   # one record per test example
    output_dir/trainer_state.json, README.md (model card)

Multi-GPU: ``accelerate launch recipes/finetune.py ...`` (or ``torchrun``) with the same arguments.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DATA = REPO_ROOT / "recipes" / "data" / "finetune" / "allocine"
SHIPPED_TOKENIZER = REPO_ROOT / "recipes" / "data" / "tokenizer"
# Where `python recipes/pretrain.py` (its embedded default) saves its model.
PRETRAINED_TINY = Path("outputs") / "fat5-tiny-pretrain"
# A FAT5 of the pretraining quickstart's size, when its model is absent.
TINY_CONFIG = (
    "d_model=128,d_kv=32,num_heads=4,d_ff=256,num_layers=2,num_decoder_layers=2,feed_forward_proj=gated-gelu,"
    "dropout_rate=0.0,tie_word_embeddings=true"
)

logger = logging.getLogger("fat5_hf.recipes.finetune")


def embedded_default_args() -> list[str]:
    """The no-argument run: allocine sentiment on the shipped sample, from the pretraining quickstart's model."""
    if (PRETRAINED_TINY / "config.json").is_file():
        model = ["--model_name_or_path", str(PRETRAINED_TINY)]
        print(f"finetune.py: finetuning the pretraining quickstart's model in {PRETRAINED_TINY}")
    else:
        model = ["--tokenizer_name", str(SHIPPED_TOKENIZER), "--config_overrides", TINY_CONFIG]
        print(
            f"finetune.py: no pretrained model in {PRETRAINED_TINY} (run `python recipes/pretrain.py` first to "
            f"finetune it); finetuning a randomly initialized tiny FAT5 with the tokenizer in {SHIPPED_TOKENIZER}"
        )
    return [
        *model,
        "--task", "allocine",
        "--dataset_path", str(EMBEDDED_DATA),
        "--max_seq_length", "128",
        "--do_train", "--do_eval", "--do_predict",
        "--output_dir", "outputs/fat5-tiny-finetune-allocine",
        "--num_train_epochs", "6",
        "--learning_rate", "1e-3",
        "--warmup_steps", "10",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "32",
        "--eval_strategy", "epoch",
        "--save_strategy", "no",
        "--logging_steps", "10",
        "--report_to", "none",
        "--seed", "42",
    ]  # fmt: skip


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, lora_args, training_args)`` from flags, one ``.yaml`` / ``.json`` file, or the
    embedded default when ``argv`` is empty."""
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    from fat5_hf.finetuning import DataTrainingArguments, LoraArguments, ModelArguments

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, LoraArguments, Seq2SeqTrainingArguments))
    if not argv:
        argv = embedded_default_args()
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(str(Path(argv[0]).resolve()))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(str(Path(argv[0]).resolve()))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> int:
    import transformers

    from fat5_hf.finetuning import (
        FinetuneConfigError,
        FinetuneDataError,
        UnknownTaskError,
        registry_table,
        train_and_evaluate,
    )

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--list_tasks" in argv:
        print(registry_table())
        return 0
    try:
        model_args, data_args, lora_args, training_args = parse_args(argv)
        logging.getLogger("fat5_hf").setLevel(training_args.get_process_log_level())
        transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
        summary = train_and_evaluate(model_args, data_args, lora_args, training_args)
    except (FinetuneConfigError, FinetuneDataError, UnknownTaskError) as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return 2
    for phase in ("eval", "test"):
        metrics = summary.get(phase, {})
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and not k.endswith(
            ("_runtime", "_per_second", "_loss"))}  # fmt: skip
        if shown:
            print(f"{summary['task']} {phase}: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
