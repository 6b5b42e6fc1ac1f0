"""Finetuning FAT5 on French tasks with ``Seq2SeqTrainer``: the task registry, data, metrics, LoRA and the run.

``recipes/finetune.py`` is a command line over `train_and_evaluate`; other recipes import the same pieces.
"""

from .arguments import DataTrainingArguments, FinetuneConfigError, FinetuneDataError, LoraArguments, ModelArguments
from .tasks import TASK_TYPES, TASKS, TaskSpec, UnknownTaskError, get_task, registry_table
from .trainer import prepare_output_dir, train_and_evaluate

__all__ = [
    "TASKS",
    "TASK_TYPES",
    "DataTrainingArguments",
    "FinetuneConfigError",
    "FinetuneDataError",
    "LoraArguments",
    "ModelArguments",
    "TaskSpec",
    "UnknownTaskError",
    "get_task",
    "prepare_output_dir",
    "registry_table",
    "train_and_evaluate",
]
