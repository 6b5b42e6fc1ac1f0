"""The French task registry: one table naming, per task, its Hub dataset, columns, labels, metric and defaults.

``get_task("allocine")`` returns a `TaskSpec`; ``recipes/finetune.py --task allocine`` finetunes on it. Every entry
loads with ``datasets.load_dataset(dataset_name, dataset_config)``; ``--dataset_path`` points the same loading code at a
local copy with the same columns (the tests' fixtures in ``recipes/data/finetune/<task>/``). A task without an entry is
described on the command line (``--task_type`` and the column options), which builds a `TaskSpec` the same way.

Task types, and the head each one trains:

- ``sequence-classification``: ``FAT5ForSequenceClassification`` (encoder only) on one text column or a pair;
- ``token-classification``: ``FAT5ForTokenClassification`` on pre-split words and one tag per word;
- ``question-answering``: ``FAT5ForQuestionAnswering`` (extractive spans, SQuAD v2 style when unanswerable
  questions exist);
- ``text2text``: ``FAT5ForConditionalGeneration`` generating the target (summaries, answers, or for a classification
  task the label's word, the T5 way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TASK_TYPES = ("sequence-classification", "token-classification", "question-answering", "text2text")

# Task type -> the pipeline tag of the model it produces (Hub metadata).
PIPELINE_TAGS = {
    "sequence-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "text2text": "text2text-generation",
}


class UnknownTaskError(KeyError):
    """``--task`` names no registry entry; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


@dataclass(frozen=True)
class TaskSpec:
    """One finetuning task: where its data lives, which columns mean what, how it is scored.

    Attributes:
        name: registry key (``--task``).
        task_type: one of `TASK_TYPES`; the task's own type (``--task_type text2text`` may override a classification
            or QA task, which then uses `text2text_template` and `label_words`).
        dataset_name / dataset_config: arguments of ``datasets.load_dataset``.
        splits: role (``train``, ``validation``, ``test``) -> split name in the dataset.
        text_column_names: the input column (one), a sentence pair (two), or the words column of token classification.
        label_column_name: class id / tag ids column (classification, NER).
        label_names: names of the class ids, in id order (read from the dataset's ``ClassLabel`` when it has one).
        question_column / context_column / answer_column / answer_start_column: QA columns. ``answer_column`` holds
            either SQuAD's ``{"text": [...], "answer_start": [...]}`` dicts or plain answer strings with their
            character offsets in ``answer_start_column`` (an empty answer means unanswerable).
        target_column: the text to generate (text2text tasks).
        metric: name of the metric module in ``fat5_hf/finetuning/metrics/``.
        main_metric: the key of the metric's result reported in model cards and used as ``metric_for_best_model``.
        text2text_template: ``str.format`` template of the encoder input from the columns, for text-to-text.
        label_words: the word generated for each label (text-to-text classification), in id order.
        hyperparameters: defaults for ``Seq2SeqTrainingArguments`` fields and the data options
            (``max_seq_length``, ``max_target_length``, ``generation_max_length``...) that the command line did not
            set.
        description: one line, for listings and model cards.
        dataset_license: licence of the dataset, as its card states it.
    """

    name: str
    task_type: str
    dataset_name: str | None = None
    dataset_config: str | None = None
    splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    text_column_names: tuple[str, ...] = ()
    label_column_name: str | None = None
    label_names: tuple[str, ...] | None = None
    question_column: str = "question"
    context_column: str = "context"
    answer_column: str = "answers"
    answer_start_column: str | None = None
    target_column: str | None = None
    metric: str = "accuracy"
    main_metric: str = "accuracy"
    text2text_template: str | None = None
    label_words: tuple[str, ...] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    dataset_license: str | None = None

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(
                f"task {self.name!r}: task_type={self.task_type!r}; expected one of {', '.join(TASK_TYPES)}"
            )

    @property
    def is_classification(self) -> bool:
        return self.label_column_name is not None and self.task_type in ("sequence-classification", "text2text")

    def as_text2text(self) -> TaskSpec:
        """This task recast as text-to-text: classification generates the label word, QA generates the answer."""
        if self.task_type == "text2text":
            return self
        if self.task_type == "token-classification":
            raise ValueError(
                f"task {self.name!r} is token classification, which has no text-to-text form here; drop "
                "--task_type text2text"
            )
        if self.text2text_template is None:
            raise ValueError(f"task {self.name!r} has no text2text_template; it cannot run as --task_type text2text")
        if self.task_type == "question-answering":
            return dataclasses.replace(self, task_type="text2text", metric="squad_fr", main_metric="f1")
        return dataclasses.replace(self, task_type="text2text")


_CLASSIFICATION_DEFAULTS = {"learning_rate": 1e-4, "num_train_epochs": 3, "max_seq_length": 256}

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="allocine",
            task_type="sequence-classification",
            dataset_name="tblard/allocine",
            text_column_names=("review",),
            label_column_name="label",
            label_names=("neg", "pos"),
            metric="accuracy",
            main_metric="accuracy",
            text2text_template="critique de film: {review}",
            label_words=("négatif", "positif"),
            hyperparameters={**_CLASSIFICATION_DEFAULTS, "max_seq_length": 512, "generation_max_length": 4},
            description="sentiment of French film reviews (Allociné), 2 classes",
            dataset_license="mit",
        ),
        TaskSpec(
            name="xnli-fr",
            task_type="sequence-classification",
            dataset_name="facebook/xnli",
            dataset_config="fr",
            text_column_names=("premise", "hypothesis"),
            label_column_name="label",
            label_names=("entailment", "neutral", "contradiction"),
            text2text_template="inférence: prémisse: {premise} hypothèse: {hypothesis}",
            label_words=("implication", "neutre", "contradiction"),
            hyperparameters={**_CLASSIFICATION_DEFAULTS, "generation_max_length": 6},
            description="natural language inference (XNLI, French), 3 classes",
            dataset_license="cc-by-nc-4.0",
        ),
        TaskSpec(
            name="pawsx-fr",
            task_type="sequence-classification",
            dataset_name="google-research-datasets/paws-x",
            dataset_config="fr",
            text_column_names=("sentence1", "sentence2"),
            label_column_name="label",
            label_names=("not_paraphrase", "paraphrase"),
            text2text_template="paraphrase: phrase 1: {sentence1} phrase 2: {sentence2}",
            label_words=("non", "oui"),
            hyperparameters={**_CLASSIFICATION_DEFAULTS, "generation_max_length": 4},
            description="paraphrase identification (PAWS-X, French), 2 classes",
            dataset_license="other",
        ),
        TaskSpec(
            name="french-ner",
            task_type="token-classification",
            dataset_name="CATIE-AQ/frenchNER_4entities",
            text_column_names=("tokens",),
            label_column_name="ner_tags",
            label_names=("O", "PER", "ORG", "LOC", "MISC"),
            metric="seqeval",
            main_metric="overall_f1",
            hyperparameters={"learning_rate": 1e-4, "num_train_epochs": 3, "max_seq_length": 256},
            description="named entities (PER, ORG, LOC, MISC) in French text",
            dataset_license="cc-by-4.0",
        ),
        TaskSpec(
            name="french-qa",
            task_type="question-answering",
            dataset_name="CATIE-AQ/frenchQA",
            question_column="question",
            context_column="context",
            answer_column="answer",
            answer_start_column="answer_start",
            metric="squad_fr",
            main_metric="f1",
            text2text_template="question: {question} contexte: {context}",
            hyperparameters={
                "learning_rate": 1e-4,
                "num_train_epochs": 2,
                "max_seq_length": 384,
                "doc_stride": 128,
                "max_target_length": 64,
                "generation_max_length": 64,
            },
            description="extractive question answering in French, with unanswerable questions (SQuAD v2 style)",
            dataset_license="cc-by-4.0",
        ),
        TaskSpec(
            name="orange-sum",
            task_type="text2text",
            dataset_name="EdinburghNLP/orange_sum",
            dataset_config="abstract",
            text_column_names=("text",),
            target_column="summary",
            metric="rouge_fr",
            main_metric="rougeL",
            text2text_template="résumé: {text}",
            hyperparameters={
                "learning_rate": 1e-4,
                "num_train_epochs": 3,
                "max_seq_length": 512,
                "max_target_length": 128,
                "generation_max_length": 128,
                "generation_num_beams": 4,
            },
            description="abstractive summarization of French news articles (OrangeSum, abstract)",
            dataset_license="cc-by-sa-4.0",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """The registry entry ``name``; raises `UnknownTaskError` listing the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))} (or describe your own with --task_type "
            "and --train_file / --validation_file / --test_file)"
        ) from None


def registry_table() -> str:
    """The registry as a Markdown table (README, ``finetune.py --list_tasks``)."""
    lines = [
        "| task | type | dataset (config) | columns | labels | metric | defaults |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec in TASKS.values():
        dataset = f"`{spec.dataset_name}`" + (f" ({spec.dataset_config})" if spec.dataset_config else "")
        if spec.task_type == "question-answering":
            columns = [spec.question_column, spec.context_column, spec.answer_column]
        else:
            columns = [*spec.text_column_names, spec.label_column_name or spec.target_column]
        labels = ", ".join(spec.label_names) if spec.label_names else "-"
        defaults = ", ".join(f"{key}={value}" for key, value in spec.hyperparameters.items()) or "-"
        lines.append(
            f"| `{spec.name}` | {spec.task_type} | {dataset} | {', '.join(f'`{c}`' for c in columns)} | {labels} | "
            f"{spec.metric} ({spec.main_metric}) | {defaults} |"
        )
    return "\n".join(lines)
