"""``train_and_evaluate``: finetune a FAT5 on one task with ``Seq2SeqTrainer``, evaluate, predict, save.

``recipes/finetune.py`` is a thin command line over this function, and the evaluation recipe calls it per model and
task. One run, as transformers' example scripts do it:

1. resolve the task (registry entry or command line), load and check the data, fix the label set;
2. load the tokenizer and the model of the task type's class (checking the checkpoint can serve it), optionally
   wrap it with LoRA;
3. check the output folder (refused when not empty without ``--overwrite_output_dir``; nothing is written before all
   the checks above have passed);
4. tokenize, train (``--do_train``), evaluate (``--do_eval``) and predict (``--do_predict``) with
   ``Seq2SeqTrainer``; metrics go to ``all_results.json``, ``eval_results.json``, ``test_results.json``
   (``eval_<metric>``, ``test_<metric>``) and the test predictions to ``test_predictions.jsonl``;
5. save the model (with its custom code; LoRA adapters, or the merged model with ``--merge_lora``), the tokenizer,
   the trainer state and a model card.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..output_dir import (
    OutputDirInUseError,
    OutputDirLock,
    OutputDirNotEmptyError,
    hold_output_dir,
    stop_with_launcher,
)
from .arguments import (
    DataTrainingArguments,
    FinetuneConfigError,
    FinetuneDataError,
    LoraArguments,
    ModelArguments,
)
from .data import (
    NO_ANSWER_TEXT,
    check_labels,
    label_words,
    load_raw_datasets,
    postprocess_qa_predictions,
    preprocess,
    resolve_label_names,
    resolve_task,
    select_samples,
    squad_answers,
)
from .lora import apply_lora, merge_lora, trainable_parameters
from .metrics import load_metric
from .tasks import PIPELINE_TAGS, TaskSpec

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTH = 512
DEFAULT_MAX_TARGET_LENGTH = 128
DEFAULT_DOC_STRIDE = 128
PREDICTIONS_FILE = "test_predictions.jsonl"
LORA_ADAPTER_DIR = "lora_adapter"

_AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "text2text": "AutoModelForSeq2SeqLM",
}


# ------------------------------------------------------------------------------------------------- arguments


def apply_task_defaults(spec: TaskSpec, data_args: DataTrainingArguments, training_args) -> None:
    """Fills what the command line left at its default from the task's ``hyperparameters``.

    A ``Seq2SeqTrainingArguments`` field counts as unset when it equals the dataclass default; data options when None.
    """
    defaults = {f.name: f.default for f in fields(type(training_args))}
    stride_given = data_args.doc_stride is not None
    for key, value in spec.hyperparameters.items():
        if hasattr(data_args, key):
            if getattr(data_args, key) is None:
                setattr(data_args, key, value)
        elif key in defaults and getattr(training_args, key) == defaults[key]:
            setattr(training_args, key, value)
    if data_args.max_seq_length is None:
        data_args.max_seq_length = DEFAULT_MAX_SEQ_LENGTH
    if data_args.max_target_length is None:
        data_args.max_target_length = DEFAULT_MAX_TARGET_LENGTH
    if spec.task_type == "question-answering":
        if not stride_given:  # a task default shrinks with a shorter --max_seq_length
            data_args.doc_stride = min(data_args.doc_stride or DEFAULT_DOC_STRIDE, data_args.max_seq_length // 4)
        elif data_args.doc_stride >= data_args.max_seq_length // 2:
            raise FinetuneConfigError(
                f"--doc_stride {data_args.doc_stride} must be less than half of --max_seq_length "
                f"{data_args.max_seq_length} (each window holds the question too)"
            )
    # Generation is how text-to-text tasks are scored; classification heads have nothing to generate.
    training_args.predict_with_generate = spec.task_type == "text2text"
    if spec.task_type == "text2text" and training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.max_target_length


def prepare_output_dir(training_args, overwrite_output_dir: bool) -> OutputDirLock:
    """The one place where the output folder is checked and made ready, after every input check has passed.

    Takes the folder's run lock (`fat5_hf.output_dir.hold_output_dir`), to be held for the whole run: another live
    run on the folder is refused, whatever the flags. A non-empty folder is refused unless ``overwrite_output_dir``
    (then its contents are removed) or ``resume_from_checkpoint`` (a run continues there).

    Returns:
        The held lock (``.output_dir`` is the folder); release it, or use it as a context manager, when the run ends.

    Raises:
        FinetuneConfigError: the folder is a file, is held by another run, or is not empty without either flag.
    """
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FinetuneConfigError(f"--output_dir {output_dir} is a file; choose a folder")
    try:
        return hold_output_dir(
            output_dir,
            overwrite_output_dir=overwrite_output_dir,
            resume=bool(training_args.resume_from_checkpoint),
            is_main_process=training_args.process_index == 0,
            overwrite_hint="--overwrite_output_dir",
            resume_hint="--resume_from_checkpoint",
        )
    except (OutputDirInUseError, OutputDirNotEmptyError) as err:
        raise FinetuneConfigError(f"--output_dir {err}") from err


def check_output_dir_is_not_an_input(output_dir, inputs: list[str | None]) -> None:
    """Refuses an output folder that is, or holds, one of the run's inputs (the checkpoint, the tokenizer, the data):
    ``--overwrite_output_dir`` would delete them."""
    out = Path(output_dir).resolve()
    for path in filter(None, inputs):
        source = Path(path).resolve()
        if source.exists() and (source == out or out in source.parents):
            raise FinetuneConfigError(
                f"--output_dir {output_dir} holds an input of this run ({path}); write the results to another folder"
            )


def _parse_overrides(text: str | None) -> dict[str, Any]:
    import yaml

    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FinetuneConfigError(f"--config_overrides: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


# ------------------------------------------------------------------------------------------------- model


def load_tokenizer(model_args: ModelArguments):
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is None:
        raise FinetuneConfigError("pass --model_name_or_path (a FAT5 checkpoint) or --tokenizer_name")
    return AutoTokenizer.from_pretrained(name, cache_dir=model_args.cache_dir, revision=model_args.model_revision)


def load_model(model_args: ModelArguments, spec: TaskSpec, label_names: list[str] | None, tokenizer):
    """The model of ``spec.task_type``'s class: from ``--model_name_or_path`` (a FAT5 checkpoint; a seq2seq one
    feeds any head), or a randomly initialized FAT5 sized by ``--config_overrides`` for the tokenizer.

    Raises:
        FinetuneConfigError: the checkpoint is not FAT5, or cannot serve the task type (text-to-text from an
            encoder-only checkpoint).
    """
    import transformers

    from fat5_hf import FAT5Config

    overrides = _parse_overrides(model_args.config_overrides)
    if label_names is not None and spec.task_type != "text2text":
        overrides.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    overrides["finetuning_task"] = spec.name
    auto_class = getattr(transformers, _AUTO_CLASSES[spec.task_type])
    path = model_args.model_name_or_path
    if path is None:
        # the constructor, not attributes set afterwards: it derives fields (the gated activation from
        # feed_forward_proj...)
        ids = dict(vocab_size=math.ceil(len(tokenizer) / 128) * 128, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)  # fmt: skip
        config = FAT5Config(**{**ids, **overrides})
        logger.warning(
            "No --model_name_or_path: finetuning a randomly initialized FAT5 (d_model %d, %d + %d layers, vocabulary %d)",
            config.d_model, config.num_layers, config.num_decoder_layers, config.vocab_size,
        )  # fmt: skip
        return auto_class.from_config(config)
    config = transformers.AutoConfig.from_pretrained(
        path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )  # fmt: skip
    if config.model_type != "fat5":
        raise FinetuneConfigError(
            f"{path} is a {config.model_type!r} checkpoint; convert a T5 / mT5 / FLAN-T5 checkpoint first with "
            f"`python -m fat5_hf.convert {path} <fat5-folder>` and finetune <fat5-folder>"
        )
    if spec.task_type == "text2text" and not config.is_encoder_decoder:
        raise FinetuneConfigError(
            f"--task_type text2text needs an encoder-decoder checkpoint, but {path} is encoder-only "
            f"({', '.join(config.architectures or ['no architectures'])}): its decoder was not saved. Finetune the "
            "seq2seq checkpoint it came from, or pick an encoder task type"
        )
    config.update(overrides)  # as from_pretrained(..., **kwargs) does
    return auto_class.from_pretrained(
        path, config=config, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- metrics


@dataclass
class TaskEvaluator:
    """Turns a split's raw model outputs into prediction records and metrics (the Trainer's ``compute_metrics``).

    One evaluator per split: it holds the split's examples (and, for extractive QA, its tokenized windows) to map
    predictions back to examples.
    """

    spec: TaskSpec
    tokenizer: Any
    label_names: list[str] | None
    data_args: DataTrainingArguments
    examples: Any
    features: Any

    def __post_init__(self):
        self.metric = load_metric(self.spec.metric)

    def records(self, predictions, label_ids) -> list[dict]:
        """One record per example: ``{"id" or "index", "prediction", "reference"}``."""
        spec, kind = self.spec, self.spec.task_type
        if kind == "sequence-classification":
            logits = predictions[0] if isinstance(predictions, tuple) else predictions
            ids = np.argmax(logits, axis=-1).tolist()
            refs = label_ids.tolist() if label_ids is not None else [None] * len(ids)
            return [
                {
                    "index": i,
                    "prediction": self.label_names[p],
                    "reference": None if r is None else self.label_names[r],
                }
                for i, (p, r) in enumerate(zip(ids, refs))
            ]
        if kind == "token-classification":
            logits = predictions[0] if isinstance(predictions, tuple) else predictions
            ids = np.argmax(logits, axis=-1)
            records = []
            for i, (pred_row, label_row) in enumerate(zip(ids, label_ids)):
                keep = label_row != -100
                records.append(
                    {
                        "index": i,
                        "prediction": [self.label_names[p] for p in pred_row[keep].tolist()],
                        "reference": [self.label_names[r] for r in label_row[keep].tolist()],
                    }
                )
            return records
        if kind == "question-answering":
            start_logits, end_logits = predictions[:2]
            answers = postprocess_qa_predictions(
                self.examples, self.features, start_logits, end_logits,
                n_best_size=self.data_args.n_best_size, max_answer_length=self.data_args.max_answer_length,
                null_score_diff_threshold=self.data_args.null_score_diff_threshold,
                context_column=spec.context_column,
            )  # fmt: skip
            return [
                {"id": ex["id"], "prediction": answers[ex["id"]], "reference": ex["answers"]["text"]}
                for ex in self.examples
            ]
        # text2text: generated ids (padded with -100 when batches were gathered)
        generated = predictions[0] if isinstance(predictions, tuple) else predictions
        generated = np.where(generated < 0, self.tokenizer.pad_token_id, generated)
        texts = [t.strip() for t in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        records = []
        for i, (text, example) in enumerate(zip(texts, self.examples)):
            if spec.target_column:
                reference = example.get(spec.target_column)
            elif spec.label_column_name:
                label = example.get(spec.label_column_name)
                reference = None if label is None else (label if isinstance(label, str) else self.label_names[label])
            else:
                reference = squad_answers(spec, example)["text"]
            records.append({"index": i, "prediction": text, "reference": reference})
        return records

    def compute(self, records: list[dict]) -> dict[str, float]:
        """The task's metric over ``records`` (flattened: per-type seqeval dicts become ``<TYPE>_f1`` keys)."""
        spec = self.spec
        if spec.metric == "accuracy":
            to_id = {name: i for i, name in enumerate(self.label_names)}
            if spec.task_type == "text2text":
                # a generated word that is no label word counts as wrong (-1 is no class id)
                word_to_id = {w.lower(): i for i, w in enumerate(label_words(spec, self.label_names))}
                predictions = [word_to_id.get(r["prediction"].lower(), -1) for r in records]
            else:
                predictions = [to_id[r["prediction"]] for r in records]
            result = self.metric.compute(predictions=predictions, references=[to_id[r["reference"]] for r in records])
        elif spec.metric == "seqeval":
            result = self.metric.compute(
                predictions=[r["prediction"] for r in records], references=[r["reference"] for r in records]
            )
        elif spec.metric == "squad_fr":
            result = self.metric.compute(
                predictions=[
                    {"id": str(i), "prediction_text": "" if r["prediction"] == NO_ANSWER_TEXT else r["prediction"]}
                    for i, r in enumerate(records)
                ],
                references=[
                    {"id": str(i), "answers": {"text": r["reference"], "answer_start": [0] * len(r["reference"])}}
                    for i, r in enumerate(records)
                ],
            )
        else:
            result = self.metric.compute(
                predictions=[r["prediction"] for r in records], references=[r["reference"] for r in records]
            )
        flat = {}
        for key, value in result.items():
            if isinstance(value, dict):
                flat.update({f"{key}_{k}": v for k, v in value.items() if k == "f1"})
            else:
                flat[key] = value
        return flat

    def has_references(self) -> bool:
        spec = self.spec
        # extractive QA examples carry SQuAD-form "answers" (added in preprocessing); generative QA the raw column
        answers = "answers" if spec.task_type == "question-answering" else spec.answer_column
        column = spec.label_column_name or spec.target_column or answers
        return column in self.examples.column_names

    def __call__(self, eval_prediction) -> dict[str, float]:
        records = self.records(eval_prediction.predictions, eval_prediction.label_ids)
        return self.compute(records) if self.has_references() else {}


# ------------------------------------------------------------------------------------------------- run


def _trainer_class():
    from transformers import EvalPrediction, Seq2SeqTrainer

    class FinetuneTrainer(Seq2SeqTrainer):
        """``Seq2SeqTrainer`` that also scores splits without label tensors: extractive QA's evaluation windows carry
        no span positions (the answers are matched as text after post-processing, as ``run_qa.py``'s trainer does),
        so the stock loop would skip ``compute_metrics``."""

        def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
            output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
            evaluator = self.compute_metrics
            if (
                isinstance(evaluator, TaskEvaluator)
                and output.label_ids is None
                and output.predictions is not None
                and evaluator.has_references()
            ):
                metrics = evaluator(EvalPrediction(predictions=output.predictions, label_ids=None))
                output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in metrics.items()})
            return output

    return FinetuneTrainer


def _collator(spec: TaskSpec, tokenizer, model, training_args):
    from transformers import DataCollatorForSeq2Seq, DataCollatorForTokenClassification, DataCollatorWithPadding

    multiple = 8 if training_args.fp16 or training_args.bf16 else None
    if spec.task_type == "token-classification":
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=multiple)
    if spec.task_type == "text2text":
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=multiple)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)


def _model_inputs(features):
    """QA evaluation windows without the post-processing columns."""
    extra = [c for c in ("example_id", "offset_mapping") if c in features.column_names]
    return features.remove_columns(extra) if extra else features


def train_and_evaluate(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    lora_args: LoraArguments,
    training_args,
    *,
    model_loader=None,
    save_model_and_card: bool = True,
) -> dict[str, Any]:
    """Finetunes, evaluates and predicts as the ``do_*`` flags of ``training_args`` say; saves everything.

    Args:
        model_args, data_args, lora_args: the recipe's argument dataclasses.
        training_args: ``Seq2SeqTrainingArguments`` (``output_dir``, ``do_train``...).
        model_loader: ``(model_args, spec, label_names, tokenizer) -> model`` replacing `load_model` (the evaluation
            recipe loads baselines that are not FAT5 with it).
        save_model_and_card: save the trained model, its tokenizer and a model card (metrics and predictions are
            always written).

    Returns:
        ``{"train": {...}, "eval": {...}, "test": {...}, "task": name, "output_dir": str, "trainable_parameters": n}``
        with the metrics of the phases that ran (keys ``eval_<metric>``, ``test_<metric>``).

    Raises:
        FinetuneConfigError, FinetuneDataError: bad input, before any training and before the output folder is touched.
    """
    from transformers import set_seed

    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise FinetuneConfigError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    push_to_hub = training_args.push_to_hub
    if push_to_hub:
        if not (training_args.do_train and save_model_and_card and training_args.hub_model_id):
            raise FinetuneConfigError("--push_to_hub pushes the trained model: it needs --do_train and --hub_model_id")
        # Pushed once at the end with fat5_hf.hub_push (the Trainer's own push would replace the FAT5 model card).
        training_args.push_to_hub = False
    spec = resolve_task(data_args)
    apply_task_defaults(spec, data_args, training_args)
    set_seed(training_args.seed)

    roles = [role for role, on in (("train", training_args.do_train), ("validation", training_args.do_eval),
                                   ("test", training_args.do_predict)) if on]  # fmt: skip
    raw = select_samples(load_raw_datasets(spec, data_args, model_args.cache_dir, roles=roles), data_args)
    label_names = resolve_label_names(spec, raw)
    if label_names is not None:
        check_labels(spec, raw, label_names)
    tokenizer = load_tokenizer(model_args)
    model = (model_loader or load_model)(model_args, spec, label_names, tokenizer)
    if lora_args.lora:
        model = apply_lora(model, spec.task_type, lora_args, training_args.gradient_checkpointing)
    trainable, total = trainable_parameters(model)
    logger.info(
        "Task %s (%s): %s of %s parameters trainable", spec.name, spec.task_type, f"{trainable:,}", f"{total:,}"
    )
    check_output_dir_is_not_an_input(
        training_args.output_dir,
        [model_args.model_name_or_path, model_args.tokenizer_name, data_args.dataset_path, data_args.train_file,
         data_args.validation_file, data_args.test_file],
    )  # fmt: skip
    with prepare_output_dir(training_args, data_args.overwrite_output_dir) as output_lock:
        return _train_evaluate_predict(
            spec, raw, tokenizer, model, label_names, trainable, total, output_lock.output_dir,
            model_args, data_args, lora_args, training_args, save_model_and_card=save_model_and_card,
            push_to_hub=push_to_hub,
        )  # fmt: skip


def _launcher_watch_callback(watch):
    """A ``TrainerCallback`` that checks between steps that the launcher is alive (where the parent-death signal
    was missed); transformers is imported lazily, as in `_trainer_class`."""
    from transformers import TrainerCallback

    class LauncherWatchCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            watch.check()

    return LauncherWatchCallback()


def _train_evaluate_predict(
    spec: TaskSpec, raw, tokenizer, model, label_names, trainable: int, total: int, output_dir: Path,
    model_args, data_args, lora_args, training_args, *, save_model_and_card: bool, push_to_hub: bool,
) -> dict[str, Any]:
    """`train_and_evaluate`'s phases, run while the output folder's lock is held."""
    features, examples = preprocess(spec, raw, tokenizer, data_args, label_names, training_args)
    evaluators = {
        role: TaskEvaluator(spec, tokenizer, label_names, data_args, examples[role], features[role])
        for role in ("validation", "test")
        if role in features
    }
    trainer = _trainer_class()(
        model=model,
        args=training_args,
        train_dataset=features.get("train"),
        eval_dataset=_model_inputs(features["validation"]) if "validation" in features else None,
        processing_class=tokenizer,
        data_collator=_collator(spec, tokenizer, model, training_args),
        compute_metrics=evaluators.get("validation"),
    )
    launcher = stop_with_launcher()  # killing torchrun / accelerate launch ends this worker
    if launcher is not None:
        trainer.add_callback(_launcher_watch_callback(launcher))
    summary: dict[str, Any] = {"task": spec.name, "task_type": spec.task_type, "output_dir": str(output_dir),
                               "trainable_parameters": trainable, "total_parameters": total}  # fmt: skip
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = {**result.metrics, "train_samples": len(features["train"])}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        summary["train"] = metrics
    if training_args.do_eval:
        trainer.compute_metrics = evaluators["validation"]
        metrics = trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_samples"] = len(examples["validation"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        summary["eval"] = metrics
    if training_args.do_predict:
        evaluator = evaluators["test"]
        trainer.compute_metrics = evaluator
        output = trainer.predict(_model_inputs(features["test"]), metric_key_prefix="test")
        metrics = {**output.metrics, "test_samples": len(examples["test"])}
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        summary["test"] = metrics
        if trainer.is_world_process_zero():
            with open(output_dir / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
                for record in evaluator.records(output.predictions, output.label_ids):
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if training_args.do_train and save_model_and_card:
        save_model(trainer, tokenizer, output_dir, lora_args)
        if trainer.is_world_process_zero():
            write_card(output_dir, trainer, spec, model_args, data_args, lora_args, summary)
    if push_to_hub and trainer.is_world_process_zero():
        from fat5_hf.hub_push import push_folder_to_hub

        push_folder_to_hub(
            output_dir, training_args.hub_model_id, private=training_args.hub_private_repo,
            commit_message=f"FAT5 finetuned on {spec.name} with fat5-hf's recipe",
            ignore_patterns=["checkpoint-*", "checkpoint-*/*", "runs/*"],
        )  # fmt: skip
    return summary


def save_model(trainer, tokenizer, output_dir: Path, lora_args: LoraArguments) -> None:
    """Full finetuning: the model with its custom code. LoRA: the adapters (and trained heads); with
    ``--merge_lora`` the merged model in ``output_dir`` and the adapters in ``output_dir/lora_adapter``."""
    if lora_args.lora and lora_args.merge_lora:
        trainer.save_model(str(output_dir / LORA_ADAPTER_DIR))
        if trainer.is_world_process_zero():
            merged = merge_lora(trainer.accelerator.unwrap_model(trainer.model))
            merged.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    else:
        trainer.save_model(str(output_dir))
    trainer.accelerator.wait_for_everyone()


def write_card(output_dir: Path, trainer, spec: TaskSpec, model_args, data_args, lora_args, summary) -> None:
    from fat5_hf.model_card import TaskResult, write_finetuning_model_card

    # The Hub id goes into the metadata only when the data came from the Hub (not a local copy or files).
    from_hub = spec.dataset_name is not None and not (data_args.dataset_path or data_args.train_file)
    results = []
    for phase, split in (("test", "test"), ("eval", "validation")):
        value = summary.get(phase, {}).get(f"{phase}_{spec.main_metric}")
        if value is not None:
            results.append(
                TaskResult(
                    task_name=spec.name,
                    task_type=spec.task_type,
                    dataset_name=spec.dataset_name if from_hub else spec.name,
                    dataset_config=spec.dataset_config,
                    dataset_split=spec.splits.get(split, split),
                    metric_type=spec.main_metric,
                    metric_value=value,
                )
            )
    args = trainer.args
    training = {
        "task": f"{spec.name} ({spec.task_type}): {spec.description or 'custom data'}",
        "data": data_args.dataset_path
        or spec.dataset_name
        or ", ".join(p for p in (data_args.train_file, data_args.validation_file) if p),
        "training examples": summary.get("train", {}).get("train_samples"),
        "epochs": args.num_train_epochs if args.max_steps <= 0 else f"{args.max_steps} steps",
        "learning rate": args.learning_rate,
        "batch size per device": args.per_device_train_batch_size,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "max input length": data_args.max_seq_length,
        "trainable parameters": f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,}",
    }
    lora = None
    if lora_args.lora:
        lora = {"r": lora_args.lora_r, "alpha": lora_args.lora_alpha, "dropout": lora_args.lora_dropout,
                "target modules": lora_args.lora_target_modules or "every attention and MLP projection",
                "merged": lora_args.merge_lora}  # fmt: skip
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    write_finetuning_model_card(
        output_dir,
        model=model,
        tokenizer=trainer.processing_class,
        model_id=args.hub_model_id or output_dir.name,
        base_model=model_args.model_name_or_path,
        task_type=spec.task_type,
        task_description=spec.description or f"{spec.task_type} on custom data",
        results=results,
        training=training,
        datasets=[spec.dataset_name] if from_hub else None,
        lora=lora,
    )


__all__ = [
    "FinetuneConfigError",
    "FinetuneDataError",
    "PIPELINE_TAGS",
    "TaskEvaluator",
    "apply_task_defaults",
    "load_model",
    "load_tokenizer",
    "prepare_output_dir",
    "save_model",
    "train_and_evaluate",
]
