#!/usr/bin/env python
"""Finetune and test models side by side on French tasks: scores, finetuning time, tables, a plot, a model card.

    python recipes/evaluate_models.py                            # the embedded tiny suite: CPU, shipped data, minutes
    python recipes/evaluate_models.py --model_name_or_path my-user/fat5-base-fr \\
        --baselines camembert-base,google/mt5-base,fat5:google/flan-t5-base --suite french --seeds 1,2,3 \\
        --output_dir outputs/eval-fat5-base
    python recipes/evaluate_models.py --model_name_or_path outputs/allocine --tasks allocine --do_train false ...
    python recipes/evaluate_models.py recipes/configs/evaluate.yaml                       # every argument from one file

For each model, task and seed the finetuning recipe's ``train_and_evaluate`` finetunes a copy of the model with the
task's registry hyperparameters (``python recipes/finetune.py --list_tasks``; training flags given here override them)
and scores it on the test split. Models: the FAT5 of ``--model_name_or_path``, then ``--baselines``: encoders
(CamemBERT, FlauBERT) with their task heads, encoder-decoders (mT5, FLAN-T5, BARThez) text-to-text, and
``fat5:<T5 checkpoint>`` for a T5 checkpoint converted to FAT5 (same weights, FAT5's kernels). A model that cannot
serve a task is skipped with a warning. ``--do_train`` and ``--do_predict`` default to true here.

Output folder::

    output_dir/results.json            # one row per model, task and seed (resumed runs skip these)
    output_dir/results.md, results.png # mean ± std per task and the suite average; scores and finetuning time
    output_dir/evaluation_config.json  # the settings; another configuration is refused without --overwrite_output_dir
    output_dir/runs/<model>/<task>/seed-<n>/  # each run's metrics and predictions (and model, with --save_models)
    output_dir/hub/                    # with --push_to_hub: the model, its code, tokenizer, card and results pushed

Multi-GPU: ``accelerate launch recipes/evaluate_models.py ...`` runs each finetuning data-parallel.

(Not ``evaluate.py``: a script of that name in ``recipes/`` would shadow the ``evaluate`` library, which the task
metrics import, for every recipe run from this folder.)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DATA = REPO_ROOT / "recipes" / "data" / "finetune"
SHIPPED_TOKENIZER = REPO_ROOT / "recipes" / "data" / "tokenizer"
# Where `python recipes/pretrain.py` (its embedded default) saves its model.
PRETRAINED_TINY = Path("outputs") / "fat5-tiny-pretrain"
# The embedded default's models when the quickstart's model is absent, and the HF T5 copy of the evaluated model.
EMBEDDED_MODELS = Path("outputs") / "fat5-tiny-evaluate-models"
EMBEDDED_OUTPUT = Path("outputs") / "fat5-tiny-evaluate"
# A FAT5 of the pretraining quickstart's size, when its model is absent (T5 position encoding: converts to HF T5).
TINY_CONFIG = dict(
    d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, tie_word_embeddings=True,
)  # fmt: skip
# Flags the recipe sets unless the command line or the YAML file does.
RECIPE_DEFAULTS = {"do_train": True, "do_predict": True, "report_to": "none", "save_strategy": "no"}

logger = logging.getLogger("fat5_hf.recipes.evaluate")


def embedded_models() -> tuple[Path, Path]:
    """The embedded default's pair: the FAT5 to evaluate and the same weights saved as a Hugging Face T5."""
    from fat5_hf.convert import convert_fat5_to_t5

    if (PRETRAINED_TINY / "config.json").is_file():
        fat5 = PRETRAINED_TINY
        print(f"evaluate_models.py: evaluating the pretraining quickstart's model in {PRETRAINED_TINY}")
    else:
        fat5 = EMBEDDED_MODELS / "fat5-tiny"
        print(
            f"evaluate_models.py: no pretrained model in {PRETRAINED_TINY} (run `python recipes/pretrain.py` first to "
            f"evaluate it); evaluating a randomly initialized tiny FAT5 saved in {fat5}"
        )
        if not (fat5 / "config.json").is_file():
            save_tiny_fat5(fat5)
    t5 = EMBEDDED_MODELS / f"{fat5.name}-as-t5"
    convert_fat5_to_t5(fat5, t5, overwrite=True)
    return fat5, t5


def save_tiny_fat5(path: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialized FAT5 of ``TINY_CONFIG`` with the shipped tokenizer, saved in ``path``."""
    import torch
    from transformers import AutoTokenizer

    from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    torch.manual_seed(seed)
    config = FAT5Config(vocab_size=2048, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.pad_token_id, **{**TINY_CONFIG, **overrides})  # fmt: skip
    FAT5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def embedded_default_args() -> list[str]:
    """The no-argument run: a tiny FAT5 against its own weights as a Hugging Face T5, on the shipped fixtures of a
    classification, a NER, a QA and a summarization task, a few dozen steps each."""
    fat5, t5 = embedded_models()
    return [
        "--model_name_or_path", f"FAT5={fat5}",
        "--baselines", f"T5 (transformers)={t5}",
        "--suite", "embedded",
        "--dataset_dir", str(EMBEDDED_DATA),
        "--output_dir", str(EMBEDDED_OUTPUT),
        "--overwrite_output_dir", "true",
        "--max_seq_length", "128",
        "--max_train_samples", "48", "--max_predict_samples", "16",
        "--max_steps", "32",
        "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16",
        "--generation_max_length", "32",
        "--generation_num_beams", "1",
        "--logging_steps", "8",
        "--seeds", "42",
    ]  # fmt: skip


def parse_args(argv: list[str] | None = None):
    """``(evaluation_args, lora_args, training_args)`` from flags, one ``.yaml`` / ``.json`` file, or the embedded
    default when ``argv`` is empty."""
    import json

    import yaml
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    from fat5_hf.finetuning import LoraArguments
    from fat5_hf.finetuning.evaluation import EvaluationArguments

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((EvaluationArguments, LoraArguments, Seq2SeqTrainingArguments))
    if not argv:
        argv = embedded_default_args()
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        text = Path(argv[0]).read_text(encoding="utf-8")
        values = json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text)
        return parser.parse_dict({**RECIPE_DEFAULTS, **values})
    defaults = [item for key, value in RECIPE_DEFAULTS.items() for item in (f"--{key}", str(value).lower())]
    return parser.parse_args_into_dataclasses(args=[*defaults, *argv])  # later flags win


def main(argv: list[str] | None = None) -> int:
    import transformers

    from fat5_hf.finetuning import FinetuneConfigError, FinetuneDataError, UnknownTaskError
    from fat5_hf.finetuning.evaluation import EvaluationConfigError, export_for_hub, run_suite
    from fat5_hf.hub_push import HubPushError, push_folder_to_hub

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        args, lora_args, training_args = parse_args(argv)
        if training_args.push_to_hub and not training_args.hub_model_id:
            raise HubPushError("--push_to_hub needs --hub_model_id (e.g. my-user/fat5-small-fr)")
        logging.getLogger("fat5_hf").setLevel(training_args.get_process_log_level())
        transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
        result = run_suite(args, lora_args, training_args)
        print("\n" + result["table"])
        for model, task, reason in result["skipped"]:
            print(f"skipped {model} on {task}: {reason}")
        print(f"results: {result['output_dir']}/results.json, results.md, results.png")
        if training_args.push_to_hub and training_args.process_index == 0:
            hub_dir = export_for_hub(args, training_args, result["rows"], result["output_dir"])
            push_folder_to_hub(
                hub_dir, training_args.hub_model_id, private=args.hub_private,
                commit_message=f"FAT5 evaluated on {', '.join(args.task_names)} with fat5-hf's evaluation suite",
            )  # fmt: skip
            print(f"pushed {hub_dir} to https://huggingface.co/{training_args.hub_model_id}")
    except (EvaluationConfigError, FinetuneConfigError, FinetuneDataError, UnknownTaskError, HubPushError) as err:
        print(f"evaluate_models.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
