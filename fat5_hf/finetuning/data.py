"""Data of a finetuning task: loading with ``datasets``, checks, tokenization per task type, QA post-processing.

The flow, used by `fat5_hf.finetuning.trainer.train_and_evaluate`:

1. `resolve_task` merges ``--task`` (a registry entry) with the command line's column options into a `TaskSpec`;
2. `load_raw_datasets` loads the splits (Hub id, ``--dataset_path`` or files) and checks the columns;
3. `resolve_label_names` and `check_labels` fix the label set and refuse labels outside it;
4. `preprocess` tokenizes each split for the task type (labels aligned to pieces for NER, spans with a stride for
   QA, targets for text-to-text);
5. `postprocess_qa_predictions` turns start / end logits back into answer strings, as ``run_qa.py`` does.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import numpy as np

from .arguments import DataTrainingArguments, FinetuneConfigError, FinetuneDataError, split_names
from .tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)

SPLIT_ROLES = ("train", "validation", "test")
# What generative QA generates for an unanswerable question (mapped back to "" for the metric).
NO_ANSWER_TEXT = "sans réponse"
_FILE_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}


# ------------------------------------------------------------------------------------------------- task


def resolve_task(data_args: DataTrainingArguments) -> TaskSpec:
    """The task to run: the registry entry of ``--task`` (recast by ``--task_type text2text``), or one described by
    ``--task_type`` and the column options; column options given on the command line override the entry's."""
    if data_args.task is not None:
        spec = get_task(data_args.task)
        if data_args.task_type is not None and data_args.task_type != spec.task_type:
            if data_args.task_type != "text2text":
                raise FinetuneConfigError(
                    f"--task {spec.name} is {spec.task_type}; --task_type may only recast it as text2text, not "
                    f"{data_args.task_type}"
                )
            try:
                spec = spec.as_text2text()
            except ValueError as err:
                raise FinetuneConfigError(str(err)) from None
    else:
        spec = TaskSpec(name="custom", task_type=data_args.task_type, dataset_name=data_args.dataset_name,
                        dataset_config=data_args.dataset_config_name, metric=_default_metric(data_args),
                        main_metric=_default_main_metric(data_args))  # fmt: skip
    overrides: dict[str, Any] = {}
    if data_args.text_column_names:
        overrides["text_column_names"] = split_names(data_args.text_column_names)
    for name in ("label_column_name", "question_column", "context_column", "answer_column", "answer_start_column",
                 "target_column"):  # fmt: skip
        if getattr(data_args, name) is not None:
            overrides[name] = getattr(data_args, name)
    if data_args.label_list:
        overrides["label_names"] = split_names(data_args.label_list)
    if data_args.source_template:
        overrides["text2text_template"] = data_args.source_template
    spec = dataclasses.replace(spec, **overrides)
    _check_task_columns(spec)
    return spec


def _default_metric(data_args: DataTrainingArguments) -> str:
    if data_args.task_type == "token-classification":
        return "seqeval"
    if data_args.task_type == "question-answering":
        return "squad_fr"
    if data_args.task_type == "text2text" and data_args.label_column_name is None:
        return "rouge_fr"
    return "accuracy"


def _default_main_metric(data_args: DataTrainingArguments) -> str:
    return {"seqeval": "overall_f1", "squad_fr": "f1", "rouge_fr": "rougeL"}.get(
        _default_metric(data_args), "accuracy"
    )


def _check_task_columns(spec: TaskSpec) -> None:
    """The options each task type needs, named by their flags when missing."""
    missing = []
    if spec.task_type in ("sequence-classification", "token-classification"):
        if not spec.text_column_names:
            missing.append("--text_column_names")
        if not spec.label_column_name:
            missing.append("--label_column_name")
        if spec.task_type == "sequence-classification" and len(spec.text_column_names) > 2:
            raise FinetuneConfigError(
                f"--text_column_names {','.join(spec.text_column_names)}: sequence classification takes one text "
                "column or a pair"
            )
    elif spec.task_type == "text2text" and spec.target_column is None and spec.label_column_name is None:
        if spec.answer_column is None or spec.text2text_template is None:
            missing.append("--target_column (or --label_column_name for classification as text-to-text)")
    if spec.task_type == "text2text" and not spec.text_column_names and spec.text2text_template is None:
        missing.append("--text_column_names or --source_template")
    if missing:
        raise FinetuneConfigError(f"task type {spec.task_type} needs {' and '.join(missing)}")


def required_columns(spec: TaskSpec) -> list[str]:
    """Columns every split must have for ``spec``."""
    if spec.task_type == "question-answering" or (spec.task_type == "text2text" and spec.target_column is None
                                                  and spec.label_column_name is None):  # fmt: skip
        columns = [spec.question_column, spec.context_column, spec.answer_column]
        return columns + ([spec.answer_start_column] if spec.answer_start_column else [])
    columns = list(spec.text_column_names)
    if spec.task_type == "text2text" and spec.text2text_template and not columns:
        columns = _template_fields(spec.text2text_template)
    return columns + [spec.label_column_name or spec.target_column]


def _template_fields(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


# ------------------------------------------------------------------------------------------------- loading


def load_raw_datasets(
    spec: TaskSpec, data_args: DataTrainingArguments, cache_dir: str | None = None, roles=SPLIT_ROLES
):
    """Loads the splits named in ``roles`` with ``datasets.load_dataset`` and checks their columns.

    Source, first found: ``--train_file`` / ``--validation_file`` / ``--test_file``; ``--dataset_path`` (a local copy
    of the task's dataset, same columns); the task's Hub id and config.

    Returns:
        ``datasets.DatasetDict`` keyed by role (``train``, ``validation``, ``test``), with the roles asked for.
    """
    import datasets

    files = {role: getattr(data_args, f"{role}_file") for role in SPLIT_ROLES}
    files = {role: path for role, path in files.items() if path is not None and role in roles}
    if files:
        extensions = {path.rsplit(".", 1)[-1] for path in files.values()}
        if len({_FILE_BUILDERS[e] for e in extensions}) > 1:
            raise FinetuneConfigError(f"the data files mix formats ({', '.join(sorted(extensions))}); use one")
        builder = _FILE_BUILDERS[extensions.pop()]
        loaded = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir)
        split_of = {role: role for role in files}
        source = ", ".join(files.values())
    else:
        if data_args.dataset_path:
            loaded = datasets.load_dataset(data_args.dataset_path, cache_dir=cache_dir)
            source = data_args.dataset_path
        elif spec.dataset_name:
            loaded = datasets.load_dataset(spec.dataset_name, spec.dataset_config, cache_dir=cache_dir)
            source = spec.dataset_name + (f" ({spec.dataset_config})" if spec.dataset_config else "")
        else:
            raise FinetuneConfigError(
                f"task {spec.name} has no data: pass --train_file / --validation_file / --test_file or --dataset_path"
            )
        split_of = {role: spec.splits.get(role, role) for role in roles}
        absent = {role: split for role, split in split_of.items() if split not in loaded}
        if absent:
            raise FinetuneDataError(
                f"{source} has no split {', '.join(repr(s) for s in absent.values())} (needed for "
                f"{', '.join(absent)}); its splits: {', '.join(loaded)}"
            )
    raw = datasets.DatasetDict({role: loaded[split] for role, split in split_of.items()})
    needed = required_columns(spec)
    for role, dataset in raw.items():
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise FinetuneDataError(
                f"the {role} data of {source} lacks the column(s) {', '.join(missing)} that task {spec.name} "
                f"({spec.task_type}) needs; its columns: {', '.join(dataset.column_names)}. Name yours with "
                "--text_column_names / --label_column_name / --question_column / --context_column / --answer_column "
                "/ --target_column"
            )
    return raw


def select_samples(raw, data_args: DataTrainingArguments):
    """``--max_train_samples`` & co.: the first N examples of each split."""
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_predict_samples}  # fmt: skip
    for role, limit in limits.items():
        if role in raw and limit is not None:
            raw[role] = raw[role].select(range(min(limit, len(raw[role]))))
    return raw


# ------------------------------------------------------------------------------------------------- labels


def _label_feature_names(feature) -> list[str] | None:
    import datasets

    sequence_types = tuple(t for t in (datasets.Sequence, getattr(datasets, "List", None), list) if t is not None)
    while isinstance(feature, sequence_types):
        feature = feature.feature if not isinstance(feature, list) else feature[0]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def resolve_label_names(spec: TaskSpec, raw) -> list[str] | None:
    """The label names in id order: the dataset's ``ClassLabel`` names, else the registry's / ``--label_list``, else
    the sorted distinct labels of the data (as ``run_classification.py`` does). None for tasks without labels."""
    if spec.label_column_name is None or spec.task_type == "question-answering":
        return None
    for dataset in raw.values():
        names = _label_feature_names(dataset.features[spec.label_column_name])
        if names:
            return names
    if spec.label_names:
        return list(spec.label_names)
    values = set()
    for dataset in raw.values():
        for value in dataset[spec.label_column_name]:
            values.update(value if isinstance(value, list) else [value])
    return (
        sorted(str(v) for v in values) if any(isinstance(v, str) for v in values) else [str(v) for v in sorted(values)]
    )


def check_labels(spec: TaskSpec, raw, label_names: list[str]) -> None:
    """Refuses labels outside ``label_names``: ids out of range or names not in the list, named with their split."""
    column = spec.label_column_name
    for role, dataset in raw.items():
        bad = collections.Counter()
        for value in dataset[column]:
            for label in value if isinstance(value, list) else [value]:
                if isinstance(label, str):
                    if label not in label_names:
                        bad[label] += 1
                elif label is None or not 0 <= int(label) < len(label_names):
                    bad[label] += 1
        if bad:
            found = ", ".join(f"{label!r} ({count}x)" for label, count in bad.most_common(10))
            raise FinetuneDataError(
                f"the {role} data has labels outside the label set of task {spec.name} in column {column!r}: {found}; "
                f"the label set has {len(label_names)} labels: {', '.join(label_names)} (ids 0 to "
                f"{len(label_names) - 1}). Fix the data or pass --label_list"
            )


def _label_id(label, label_to_id: dict[str, int]) -> int:
    return label_to_id[label] if isinstance(label, str) else int(label)


# ------------------------------------------------------------------------------------------------- QA answers


def squad_answers(spec: TaskSpec, example: dict) -> dict[str, list]:
    """The example's answers as SQuAD's ``{"text": [...], "answer_start": [...]}``; empty lists when unanswerable.

    Accepts SQuAD dicts, or an answer string with its start offset in ``answer_start_column`` (an empty string or a
    negative offset means unanswerable). A start offset that does not point at the answer is looked up in the context.
    """
    value = example[spec.answer_column]
    if isinstance(value, dict):
        texts, starts = list(value.get("text") or []), list(value.get("answer_start") or [])
    else:
        start = example.get(spec.answer_start_column) if spec.answer_start_column else None
        texts = [value] if value else []
        starts = [int(start)] if value and start is not None and int(start) >= 0 else ([-1] if value else [])
    context = example[spec.context_column]
    for i, (text, start) in enumerate(zip(texts, starts)):
        if context[start : start + len(text)] != text:
            found = context.find(text)
            if found < 0:
                raise FinetuneDataError(
                    f"question {example.get('id', '?')!r}: the answer {text!r} is not in its context; fix the row or "
                    "remove it"
                )
            starts[i] = found
    return {"text": texts, "answer_start": starts}


# ------------------------------------------------------------------------------------------------- tokenization


def text2text_source(spec: TaskSpec, example: dict) -> str:
    if spec.text2text_template:
        return spec.text2text_template.format(**example)
    return " ".join(str(example[c]) for c in spec.text_column_names)


def text2text_target(spec: TaskSpec, example: dict, label_names: list[str] | None) -> str:
    """The text the decoder learns to generate: the target column, the label's word, or the first answer."""
    if spec.target_column:
        return example[spec.target_column]
    if spec.label_column_name:
        label = example[spec.label_column_name]
        label_id = _label_id(label, {name: i for i, name in enumerate(label_names)})
        return label_words(spec, label_names)[label_id]
    answers = squad_answers(spec, example)["text"]
    return answers[0] if answers else NO_ANSWER_TEXT


def label_words(spec: TaskSpec, label_names: list[str]) -> list[str]:
    """The words generated for each label id in text-to-text classification (the registry's, else the names)."""
    words = list(spec.label_words or label_names)
    if len(words) != len(label_names):
        raise FinetuneConfigError(f"task {spec.name}: {len(words)} label words for {len(label_names)} labels")
    return words


def preprocess(spec: TaskSpec, raw, tokenizer, data_args: DataTrainingArguments, label_names, training_args):
    """Tokenizes each split for ``spec.task_type``.

    Returns:
        ``(features, examples)``: ``features`` maps each role to the tokenized ``Dataset`` the model consumes (QA
        evaluation features keep ``example_id`` and ``offset_mapping`` for post-processing); ``examples`` the raw
        splits (with SQuAD-form ``answers`` for QA).
    """
    max_length = data_args.max_seq_length
    label_to_id = {name: i for i, name in enumerate(label_names or [])}
    features, examples = {}, dict(raw)
    for role, dataset in raw.items():
        desc = f"tokenizing the {role} split"
        has_labels = _has_labels(spec, dataset)
        with training_args.main_process_first(desc=desc):
            if spec.task_type == "sequence-classification":
                fn = _classification_fn(spec, tokenizer, max_length, label_to_id, has_labels)
            elif spec.task_type == "token-classification":
                fn = _token_classification_fn(spec, tokenizer, max_length, label_to_id, has_labels,
                                              data_args.label_all_tokens)  # fmt: skip
            elif spec.task_type == "question-answering":
                dataset = examples[role] = _with_example_ids(spec, dataset)
                fn = _qa_fn(spec, tokenizer, max_length, data_args.doc_stride, training=role == "train")
            else:
                fn = _text2text_fn(spec, tokenizer, max_length, data_args.max_target_length, label_names, has_labels)
            features[role] = dataset.map(
                fn,
                batched=True,
                remove_columns=dataset.column_names,
                num_proc=data_args.preprocessing_num_workers,
                desc=desc,
            )
    return features, examples


def _has_labels(spec: TaskSpec, dataset) -> bool:
    column = spec.label_column_name or spec.target_column or spec.answer_column
    return column in dataset.column_names


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def _classification_fn(spec, tokenizer, max_length, label_to_id, has_labels):
    first, second = spec.text_column_names[0], (spec.text_column_names[1:] or [None])[0]

    def fn(batch):
        pairs = (batch[first], batch[second]) if second else (batch[first],)
        encoded = tokenizer(*pairs, truncation=True, max_length=max_length)
        if has_labels:
            encoded["labels"] = [_label_id(label, label_to_id) for label in batch[spec.label_column_name]]
        return encoded

    return fn


def _token_classification_fn(spec, tokenizer, max_length, label_to_id, has_labels, label_all_tokens):
    words_column = spec.text_column_names[0]

    def fn(batch):
        encoded = tokenizer(batch[words_column], truncation=True, max_length=max_length, is_split_into_words=True)
        if not has_labels:
            return encoded
        all_labels = []
        for i, tags in enumerate(batch[spec.label_column_name]):
            previous, labels = None, []
            for word_id in encoded.word_ids(batch_index=i):
                if word_id is None:  # special tokens (EOS)
                    labels.append(-100)
                elif word_id != previous or label_all_tokens:
                    labels.append(_label_id(tags[word_id], label_to_id))
                else:  # later pieces of a word: ignored by the loss and the metric
                    labels.append(-100)
                previous = word_id
            all_labels.append(labels)
        encoded["labels"] = all_labels
        return encoded

    return fn


def _with_example_ids(spec: TaskSpec, dataset):
    """Adds SQuAD-form ``answers`` and a string ``id`` (the row index when the data has none)."""

    def fn(example, index):
        out = {"answers": squad_answers(spec, example)}
        out["id"] = str(example["id"]) if "id" in example else str(index)
        return out

    drop = [spec.answer_column] if spec.answer_column not in ("answers",) else []
    drop += [spec.answer_start_column] if spec.answer_start_column else []
    return dataset.map(fn, with_indices=True, remove_columns=drop)


def _qa_fn(spec, tokenizer, max_length, doc_stride, training: bool):
    """``run_qa.py``'s ``prepare_train_features`` / ``prepare_validation_features``: question + a window of the
    context, ``doc_stride`` tokens of overlap between windows; an answer outside a window (or none) points at
    position 0, the null answer."""

    def fn(batch):
        questions = [q.lstrip() for q in batch[spec.question_column]]
        encoded = tokenizer(
            questions,
            batch[spec.context_column],
            truncation="only_second",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        sample_map = encoded.pop("overflow_to_sample_mapping")
        if training:
            starts, ends = [], []
            for i, offsets in enumerate(encoded["offset_mapping"]):
                answers = batch["answers"][sample_map[i]]
                sequence_ids = encoded.sequence_ids(i)
                context_tokens = [k for k, s in enumerate(sequence_ids) if s == 1]
                if not answers["text"] or not context_tokens:
                    starts.append(0)
                    ends.append(0)
                    continue
                start_char = answers["answer_start"][0]
                end_char = start_char + len(answers["text"][0])
                first, last = context_tokens[0], context_tokens[-1]
                if offsets[first][0] > start_char or offsets[last][1] < end_char:
                    starts.append(0)  # the answer is not (wholly) in this window
                    ends.append(0)
                    continue
                start = next(k for k in context_tokens if offsets[k][1] > start_char)
                end = next(k for k in reversed(context_tokens) if offsets[k][0] < end_char)
                starts.append(start)
                ends.append(end)
            encoded["start_positions"] = starts
            encoded["end_positions"] = ends
            encoded.pop("offset_mapping")
        else:
            encoded["example_id"] = [batch["id"][sample_map[i]] for i in range(len(encoded["input_ids"]))]
            encoded["offset_mapping"] = [
                [offset if encoded.sequence_ids(i)[k] == 1 else None for k, offset in enumerate(offsets)]
                for i, offsets in enumerate(encoded["offset_mapping"])
            ]
        return encoded

    return fn


def _text2text_fn(spec, tokenizer, max_length, max_target_length, label_names, has_labels):
    def fn(batch):
        rows = _rows(batch)
        encoded = tokenizer([text2text_source(spec, row) for row in rows], truncation=True, max_length=max_length)
        if has_labels:
            targets = [text2text_target(spec, row, label_names) for row in rows]
            encoded["labels"] = tokenizer(text_target=targets, truncation=True, max_length=max_target_length)[
                "input_ids"
            ]
        return encoded

    return fn


# ------------------------------------------------------------------------------------------------- QA predictions


def postprocess_qa_predictions(
    examples,
    features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
    with_negative: bool = True,
    context_column: str = "context",
) -> dict[str, str]:
    """Answer strings from span logits, as ``run_qa.py``'s ``postprocess_qa_predictions``.

    For each example, over all its windows (features), the ``n_best_size`` best starts and ends form candidate spans
    inside the context, at most ``max_answer_length`` tokens long, scored by start + end logits. With
    ``with_negative``, the null answer (position 0 in each window, the lowest null score over windows) wins when
    ``null score - best span score > null_score_diff_threshold``.

    Args:
        examples: the QA examples (``id`` and ``context_column``).
        features: their tokenized windows, with ``example_id`` and ``offset_mapping`` (None outside the context).
        start_logits, end_logits: ``(num_features, seq_len)`` float arrays; positions beyond a feature's length
            (padding added when batches were gathered) are ignored.

    Returns:
        ``{example id: answer text}``, "" for no answer.
    """
    if len(features) != len(start_logits):
        raise ValueError(f"{len(start_logits)} rows of logits for {len(features)} features")
    features_of = collections.defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        features_of[example_id].append(index)
    offsets_all = features["offset_mapping"]
    predictions = {}
    for example in examples:
        context = example[context_column]
        best_null, candidates = None, []
        for index in features_of[example["id"]]:
            offsets = offsets_all[index]
            starts, ends = start_logits[index][: len(offsets)], end_logits[index][: len(offsets)]
            null_score = float(starts[0] + ends[0])
            best_null = null_score if best_null is None else min(best_null, null_score)
            for s in np.argsort(starts)[-1 : -n_best_size - 1 : -1]:
                for e in np.argsort(ends)[-1 : -n_best_size - 1 : -1]:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    candidates.append((float(starts[s] + ends[e]), offsets[s][0], offsets[e][1]))
        best = max(candidates, default=None)
        if best is None:
            predictions[example["id"]] = ""
        elif with_negative and best_null is not None and best_null - best[0] > null_score_diff_threshold:
            predictions[example["id"]] = ""
        else:
            predictions[example["id"]] = context[best[1] : best[2]]
    return predictions
