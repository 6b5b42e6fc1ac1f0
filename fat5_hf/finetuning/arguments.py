"""Command-line arguments of the finetuning recipe, as ``HfArgumentParser`` dataclasses with the names of
transformers' example scripts (``run_classification.py``, ``run_ner.py``, ``run_qa.py``, ``run_summarization.py``).

``recipes/finetune.py`` parses ``(ModelArguments, DataTrainingArguments, LoraArguments, Seq2SeqTrainingArguments)``
from flags or from one YAML / JSON file; the evaluation recipe builds the same dataclasses in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tasks import TASK_TYPES


class FinetuneConfigError(ValueError):
    """An argument is wrong or missing; the message names it and the fix."""


class FinetuneDataError(ValueError):
    """The data does not fit the task (columns, labels, splits); the message names what is wrong and what is there."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "FAT5 checkpoint (local folder or Hub id) to finetune: a pretrained or converted seq2seq model, "
            "or an encoder-head checkpoint of the same task type. Without it, a randomly initialized FAT5 is built "
            "from --tokenizer_name and --config_overrides."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "tokenizer folder or Hub id, if not the one of --model_name_or_path"}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated FAT5Config fields set on the loaded config, e.g. "
            "'use_triton_attention=false,dropout_rate=0.0' (kernel switches live in the model config)"
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "where datasets and models from the Hub are cached"})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow a Hub checkpoint's own code (not needed for FAT5 with fat5-hf)"}
    )


@dataclass
class DataTrainingArguments:
    task: str | None = field(
        default=None, metadata={"help": "a task of the registry (fat5_hf.finetuning.tasks.TASKS), e.g. allocine"}
    )
    task_type: str | None = field(
        default=None,
        metadata={
            "help": f"one of {', '.join(TASK_TYPES)}; with --task, 'text2text' recasts a classification or QA task "
            "as text-to-text; without --task, describes your own data (with the files and column options)"
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id for your own task"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "its configuration"})
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "local copy of the task's dataset (a folder of train/validation/test files with the same "
            "columns), loaded by datasets.load_dataset instead of the Hub id"
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "training data (csv, json, jsonl or parquet)"})
    validation_file: str | None = field(default=None, metadata={"help": "validation data, same format"})
    test_file: str | None = field(default=None, metadata={"help": "test data, same format"})
    text_column_names: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated input columns: one text, a sentence pair, or the words column of token "
            "classification"
        },
    )
    label_column_name: str | None = field(default=None, metadata={"help": "label / tags column"})
    label_list: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated label names in id order (default: read from the data; --label_names is the "
            "Trainer's own option)"
        },
    )
    question_column: str | None = field(default=None, metadata={"help": "QA: question column"})
    context_column: str | None = field(default=None, metadata={"help": "QA: context column"})
    answer_column: str | None = field(
        default=None,
        metadata={"help": "QA: answers column (SQuAD dicts, or strings with --answer_start_column)"},
    )
    answer_start_column: str | None = field(default=None, metadata={"help": "QA: answer start offsets column"})
    target_column: str | None = field(default=None, metadata={"help": "text2text: the text to generate"})
    source_template: str | None = field(
        default=None, metadata={"help": "text2text: str.format template of the input, e.g. 'résumé: {text}'"}
    )
    max_seq_length: int | None = field(
        default=None, metadata={"help": "longest tokenized input; longer ones are truncated (task default, else 512)"}
    )
    max_target_length: int | None = field(
        default=None, metadata={"help": "text2text: longest tokenized target (task default, else 128)"}
    )
    doc_stride: int | None = field(
        default=None, metadata={"help": "QA: overlap in tokens between the chunks of a long context (default 128)"}
    )
    n_best_size: int = field(default=20, metadata={"help": "QA: start and end candidates kept per chunk"})
    max_answer_length: int = field(default=30, metadata={"help": "QA: longest answer in tokens"})
    null_score_diff_threshold: float = field(
        default=0.0, metadata={"help": "QA: predict no answer when null score - best span score exceeds this"}
    )
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "NER: label every piece of a word (default: the first piece; the others are ignored)"},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "keep the first N training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "keep the first N validation examples"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "keep the first N test examples"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for datasets.map"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "replace the contents of a non-empty --output_dir (refused otherwise)"},
    )

    def __post_init__(self):
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise FinetuneConfigError(f"--task_type {self.task_type!r}: expected one of {', '.join(TASK_TYPES)}")
        if self.task is None and self.task_type is None:
            raise FinetuneConfigError(
                "pass --task NAME (a registry task) or --task_type TYPE with --train_file / --validation_file / "
                "--test_file or --dataset_name"
            )
        if self.task is None and not (
            self.dataset_name or self.dataset_path or self.train_file or self.validation_file or self.test_file
        ):
            raise FinetuneConfigError(
                f"--task_type {self.task_type} without --task needs data: --train_file / --validation_file / "
                "--test_file, --dataset_path or --dataset_name"
            )
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("csv", "json", "jsonl", "parquet"):
                raise FinetuneConfigError(f"--{name} {path}: expected a .csv, .json, .jsonl or .parquet file")


@dataclass
class LoraArguments:
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of every weight"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input"})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated projection names to adapt (default: every attention and MLP projection: "
            "q,k,v,o,wi_0,wi_1,wo, or wi for non-gated models)"
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "save the model with the adapters merged into its weights (loads without peft); the adapters "
            "are saved too, in <output_dir>/lora_adapter"
        },
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise FinetuneConfigError(f"--lora_r {self.lora_r}: the rank must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise FinetuneConfigError(f"--lora_dropout {self.lora_dropout}: expected a probability in [0, 1)")
        if self.merge_lora and not self.lora:
            raise FinetuneConfigError("--merge_lora needs --lora")


def split_names(value: str | None) -> tuple[str, ...] | None:
    """``"a, b"`` -> ``("a", "b")``; None stays None."""
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())
