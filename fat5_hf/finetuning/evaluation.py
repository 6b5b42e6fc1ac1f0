"""The evaluation suite: finetune and test several models side by side on the French tasks, then aggregate.

``recipes/evaluate_models.py`` is a command line over `run_suite`. For each model, task and seed it calls the finetuning
recipe's `train_and_evaluate` (same registry, data loading, metrics and training code) with the task's registry
hyperparameters, and records one row: the test score, the training time, training tokens per second, peak GPU memory,
device and versions. Rows go to ``results.json`` as they finish, so a run that stops resumes where it was; the
tables (``results.md``) and the plot (``results.png``) are rebuilt from all the rows.

Models: a FAT5 checkpoint, any Hub checkpoint that transformers loads (encoders through
``AutoModelFor{SequenceClassification,TokenClassification,QuestionAnswering}``, encoder-decoders through
text-to-text), and ``fat5:<T5 checkpoint>``, a T5 / mT5 / FLAN-T5 checkpoint converted to FAT5 first (same weights:
the scores match and the training time shows the speed-up).

Which task type a model runs (`run_task_type`): encoder-decoders run classification and QA as text-to-text (the label
word, the answer) and NER with their token-classification head; encoder-only models run their task's own head and
cannot run generation tasks (summarization). A model that cannot serve a task is skipped with a warning saying why.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..output_dir import OutputDirInUseError, hold_output_dir, output_dir_contents
from .arguments import DataTrainingArguments, FinetuneConfigError, LoraArguments, ModelArguments
from .tasks import TASKS, TaskSpec, get_task

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
CONFIG_JSON = "evaluation_config.json"
RUNS_DIR = "runs"

SUITES: dict[str, tuple[str, ...]] = {
    "french": tuple(TASKS),
    # one task of each kind, on the fixtures shipped in recipes/data/finetune (the embedded default)
    "embedded": ("allocine", "french-ner", "french-qa", "orange-sum"),
}

# Prefix of a T5 checkpoint to convert to FAT5 before finetuning (``--baselines fat5:google/flan-t5-small``).
AS_FAT5_PREFIX = "fat5:"

# Head task type -> (transformers' model_type -> class mapping of its Auto class, the suffix of its class names).
_HEADS = {
    "sequence-classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "ForSequenceClassification"),
    "token-classification": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "ForTokenClassification"),
    "question-answering": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "ForQuestionAnswering"),
}

# Training arguments that change what a row measures: two runs differing here are two configurations.
_CONFIG_TRAINING_FIELDS = (
    "do_train", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "warmup_steps", "weight_decay", "lr_scheduler_type", "optim", "bf16", "fp16",
    "label_smoothing_factor", "generation_num_beams", "generation_max_length",
)  # fmt: skip


class EvaluationConfigError(ValueError):
    """An argument of the evaluation is wrong, or the output folder holds another configuration's results."""


@dataclass
class EvaluationArguments:
    """What to evaluate; the training settings are ``Seq2SeqTrainingArguments`` (``--output_dir``, ``--do_train``,
    ``--learning_rate``...), which override the tasks' registry hyperparameters when given."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "the model to evaluate: a FAT5 checkpoint (folder or Hub id), or NAME=PATH to name it"},
    )
    baselines: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated models to compare with, each a Hub id or folder (optionally NAME=PATH): "
            "encoders (camembert-base, flaubert/flaubert_base_cased), encoder-decoders (google/mt5-small, "
            "moussaKam/barthez); fat5:<T5 checkpoint> converts a T5 / mT5 / FLAN-T5 checkpoint to FAT5 first"
        },
    )
    tasks: str | None = field(
        default=None, metadata={"help": f"comma-separated registry tasks ({', '.join(TASKS)})"}
    )
    suite: str | None = field(default=None, metadata={"help": f"a task suite instead of --tasks: {', '.join(SUITES)}"})
    seeds: str = field(default="42", metadata={"help": "comma-separated integer seeds; one finetuning per seed"})
    dataset_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder with a local copy of each task's dataset in <dataset_dir>/<task>/ (same columns as the "
            "Hub dataset); default: the Hub datasets of the registry"
        },
    )
    seq2seq_task_types: str = field(
        default="text2text",
        metadata={
            "help": "how encoder-decoders run classification and QA: 'text2text' (generate the label word or the "
            "answer) or 'native' (the task's own head, as encoders do)"
        },
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "longest input (default: the task's)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "keep the first N training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "keep the first N validation examples"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "keep the first N test examples"})
    save_models: bool = field(
        default=False,
        metadata={"help": "keep each finetuned model (with its card) in its run folder; default: metrics only"},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "replace an --output_dir that holds another configuration's results (refused otherwise; the same "
            "configuration is resumed: delete the folder to start over)"
        },
    )
    hub_private: bool = field(default=False, metadata={"help": "with --push_to_hub: create a private repository"})

    def __post_init__(self):
        if (self.tasks is None) == (self.suite is None):
            raise EvaluationConfigError(
                f"pass either --tasks (registry tasks: {', '.join(TASKS)}) or --suite ({', '.join(SUITES)})"
            )
        if self.suite is not None and self.suite not in SUITES:
            raise EvaluationConfigError(
                f"unknown suite {self.suite!r}; known suites: "
                + "; ".join(f"{name} ({', '.join(tasks)})" for name, tasks in SUITES.items())
            )
        unknown = [name for name in self.task_names if name not in TASKS]
        if unknown:
            raise EvaluationConfigError(
                f"unknown task {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASKS)} (or --suite: "
                f"{', '.join(SUITES)})"
            )
        self.seed_values  # noqa: B018 (checks them)
        if self.seq2seq_task_types not in ("text2text", "native"):
            raise EvaluationConfigError(
                f"--seq2seq_task_types {self.seq2seq_task_types!r}: expected 'text2text' or 'native'"
            )
        if self.model_name_or_path is None:
            raise EvaluationConfigError("pass --model_name_or_path (the model to evaluate)")
        if self.dataset_dir is not None:
            missing = [t for t in self.task_names if not (Path(self.dataset_dir) / t).is_dir()]
            if missing:
                raise EvaluationConfigError(
                    f"--dataset_dir {self.dataset_dir} has no folder for {', '.join(missing)}; expected "
                    f"<dataset_dir>/<task>/ with its train / validation / test files"
                )

    @property
    def task_names(self) -> tuple[str, ...]:
        if self.suite is not None:
            return SUITES[self.suite]
        return tuple(dict.fromkeys(part.strip() for part in self.tasks.split(",") if part.strip()))

    @property
    def seed_values(self) -> list[int]:
        values = []
        for part in filter(None, (p.strip() for p in self.seeds.split(","))):
            try:
                values.append(int(part))
            except ValueError:
                raise EvaluationConfigError(
                    f"--seeds {self.seeds!r}: {part!r} is not an integer; pass integers such as --seeds 1,2,3"
                ) from None
        if not values:
            raise EvaluationConfigError("--seeds is empty; pass at least one integer seed")
        return list(dict.fromkeys(values))


@dataclass(frozen=True)
class ModelEntry:
    """One model of the comparison: its display ``name`` (a column of the tables), where it loads from, and whether
    it is a T5 checkpoint to convert to FAT5 first."""

    name: str
    path: str
    convert_to_fat5: bool = False

    @classmethod
    def parse(cls, text: str) -> ModelEntry:
        name, sep, path = text.strip().partition("=")
        if not sep:
            name, path = "", text.strip()
        convert = path.startswith(AS_FAT5_PREFIX)
        path = path[len(AS_FAT5_PREFIX):] if convert else path
        if not path:
            raise EvaluationConfigError(f"model {text!r}: no checkpoint; expected PATH, NAME=PATH or fat5:PATH")
        name = name.strip() or Path(path.rstrip("/")).name + (" (as FAT5)" if convert else "")
        return cls(name=name, path=path, convert_to_fat5=convert)


def model_entries(args: EvaluationArguments) -> list[ModelEntry]:
    """The evaluated model then the baselines, in command-line order; raises on a name given twice."""
    entries = [ModelEntry.parse(args.model_name_or_path)]
    entries += [ModelEntry.parse(t) for t in (args.baselines or "").split(",") if t.strip()]
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationConfigError(
            f"two models are named {', '.join(duplicates)}; name them apart with NAME=PATH in --baselines"
        )
    return entries


# ------------------------------------------------------------------------------------------------- models


def run_task_type(config, spec: TaskSpec, seq2seq_task_types: str = "text2text") -> str:
    """The task type that a model of ``config`` runs ``spec`` as.

    Raises:
        FinetuneConfigError: the model cannot serve the task; the message says why.
    """
    from transformers.models.auto import modeling_auto

    model_type = config.model_type
    is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if spec.task_type == "text2text":
        if not is_seq2seq:
            raise FinetuneConfigError(
                f"{spec.name} is a generation task ({spec.description}) and a {model_type!r} model is encoder-only: "
                "it has no decoder to generate text"
            )
        return "text2text"
    mapping, suffix = _HEADS[spec.task_type]
    if any(arch.endswith(suffix) for arch in getattr(config, "architectures", None) or ()):
        return spec.task_type  # finetuned with this task's head already (evaluated with --do_train false)
    if is_seq2seq and seq2seq_task_types == "text2text" and spec.text2text_template is not None:
        return "text2text"
    if model_type != "fat5" and model_type not in getattr(modeling_auto, mapping):
        reason = "" if spec.text2text_template is not None else " and the task has no text-to-text form"
        raise FinetuneConfigError(
            f"transformers has no {spec.task_type} head for {model_type!r} models{reason}"
        )
    return spec.task_type


def load_any_model(model_args: ModelArguments, spec: TaskSpec, label_names: list[str] | None, tokenizer):
    """`train_and_evaluate`'s ``model_loader`` for any checkpoint: FAT5 through the finetuning recipe's
    `load_model`, any other through the transformers Auto class of ``spec.task_type`` (with the task's labels)."""
    import transformers

    from .trainer import _AUTO_CLASSES, load_model

    config = transformers.AutoConfig.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )  # fmt: skip
    if config.model_type == "fat5":
        return load_model(model_args, spec, label_names, tokenizer)
    run_task_type(config, spec, "native")  # raises when the model cannot serve the task type it was given
    kwargs: dict[str, Any] = {"finetuning_task": spec.name}
    if label_names is not None and spec.task_type != "text2text":
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})  # fmt: skip
    config.update(kwargs)
    auto_class = getattr(transformers, _AUTO_CLASSES[spec.task_type])
    return auto_class.from_pretrained(
        model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
        revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code,
    )  # fmt: skip


def resolve_checkpoints(entries: list[ModelEntry], workdir: Path) -> dict[str, str]:
    """Model name -> the folder or Hub id to load; ``fat5:`` entries are converted into ``workdir/<name>`` (once)."""
    from fat5_hf.convert import convert_t5_to_fat5

    paths = {}
    for entry in entries:
        if entry.convert_to_fat5:
            target = workdir / entry.name.replace("/", "--").replace(" ", "_")
            if not (target / "config.json").is_file():
                logger.warning("Converting %s to FAT5 in %s", entry.path, target)
                convert_t5_to_fat5(entry.path, target, overwrite=True)
            paths[entry.name] = str(target)
        else:
            paths[entry.name] = entry.path
    return paths


# ------------------------------------------------------------------------------------------------- output folder


def evaluation_settings(args: EvaluationArguments, lora_args: LoraArguments, training_args) -> dict[str, Any]:
    """What makes two evaluations comparable: everything a row depends on except which models, tasks and seeds
    (adding a baseline, a task or a seed extends the same evaluation)."""
    return {
        "training": {name: _jsonable(getattr(training_args, name)) for name in _CONFIG_TRAINING_FIELDS},
        "data": {name: getattr(args, name) for name in ("dataset_dir", "max_seq_length", "max_train_samples",
                                                         "max_eval_samples", "max_predict_samples")},  # fmt: skip
        "seq2seq_task_types": args.seq2seq_task_types,
        "lora": asdict(lora_args) if lora_args.lora else None,
    }


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def prepare_evaluation_dir(
    output_dir: str | Path, settings: dict[str, Any], overwrite_output_dir: bool, models: dict[str, str] | None = None
) -> list[dict]:
    """The one place where the evaluation's output folder is checked and made ready; returns the rows to keep.

    - empty or absent: created, with ``evaluation_config.json`` holding ``settings``;
    - holding an evaluation with the same settings, where each model name of ``models`` (name -> checkpoint) still
      names the same checkpoint: resumed (its ``results.json`` rows are returned and skipped);
    - holding anything else (another evaluation's results, other files): refused unless ``overwrite_output_dir``,
      which then empties it.

    Raises:
        EvaluationConfigError: the folder is a file, or holds another configuration and no ``overwrite_output_dir``.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise EvaluationConfigError(f"--output_dir {output_dir} is a file; choose a folder")
    rows: list[dict] = []
    contents = output_dir_contents(output_dir)  # the run's lock file is not the evaluation's
    if contents:
        config_file = output_dir / CONFIG_JSON
        previous = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
        results_file = output_dir / RESULTS_JSON
        if previous == settings and results_file.is_file():
            rows = json.loads(results_file.read_text(encoding="utf-8"))["rows"]
        moved = sorted({f"{r['model']} ({r['model_name_or_path']}, now {models[r['model']]})" for r in rows
                        if r["model"] in (models or {}) and r["model_name_or_path"] != models[r["model"]]})  # fmt: skip
        if previous == settings and not moved:
            logger.warning("Resuming the evaluation in %s: %d finished row(s) are kept", output_dir, len(rows))
            return rows
        if not overwrite_output_dir:
            if previous is None:
                what = "files that are not an evaluation's results"
            elif moved:
                what = f"results of models now named for other checkpoints: {', '.join(moved)}"
            else:
                differing = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                what = f"the results of another configuration (different {', '.join(differing)})"
            raise EvaluationConfigError(
                f"--output_dir {output_dir} holds {what}; pass --overwrite_output_dir to replace them, or choose "
                "another folder"
            )
        rows = []
        for child in contents:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / CONFIG_JSON, settings)
    return rows


def _write_json(path: Path, data) -> None:
    """Written beside, then moved into place: a run killed mid-write leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- rows


def environment() -> dict[str, Any]:
    """GPU and versions (the benchmarks' ``environment`` fields), also recorded in each row."""
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cuda = torch.cuda.is_available()
    return dict(
        gpu=torch.cuda.get_device_name() if cuda else None,
        gpus=torch.cuda.device_count(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton_version,
        transformers=transformers.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=commit,
    )


def row_key(row: dict) -> tuple[str, str, int]:
    return row["model"], row["task"], row["seed"]


def _row(entry: ModelEntry, path: str, spec: TaskSpec, task_type: str, seed: int, summary: dict, run_dir: Path,
         peak_memory_mb: float | None, env: dict) -> dict:  # fmt: skip
    run_spec = spec.as_text2text() if task_type == "text2text" and spec.task_type != "text2text" else spec
    phase = "test" if "test" in summary else "eval"
    metrics = {k[len(phase) + 1:]: v for k, v in summary.get(phase, {}).items()
               if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second", "_samples"))}  # fmt: skip
    train = summary.get("train", {})
    tokens = None
    state_file = run_dir / "trainer_state.json"
    if state_file.is_file():
        tokens = json.loads(state_file.read_text(encoding="utf-8")).get("num_input_tokens_seen") or None
    runtime = train.get("train_runtime")
    return {
        "model": entry.name,
        "model_name_or_path": entry.path,
        "converted_to_fat5": entry.convert_to_fat5,
        "loaded_from": path,
        "task": spec.name,
        "task_type": task_type,
        "seed": seed,
        "metric": run_spec.main_metric,  # "score" is its value in [0, 1]; "metrics" holds them all as computed
        "score": _unit_score(run_spec, metrics.get(run_spec.main_metric)),
        "split": phase,
        "metrics": metrics,
        "train_runtime_s": runtime,
        "train_samples": train.get("train_samples"),
        "train_input_tokens": tokens,
        "train_tokens_per_second": tokens / runtime if tokens and runtime else None,
        "peak_memory_mb": peak_memory_mb,
        "trainable_parameters": summary.get("trainable_parameters"),
        "device": env["gpu"] or f"CPU ({platform.machine()})",
        **{k: env[k] for k in ("torch", "cuda", "triton", "transformers", "python", "date", "commit")},
    }


def _unit_score(spec: TaskSpec, value):
    """The main metric in [0, 1] (the SQuAD metric reports percentages; the others fractions)."""
    return None if value is None else value / 100 if spec.metric == "squad_fr" else value


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_suite(args: EvaluationArguments, lora_args: LoraArguments, training_args) -> dict[str, Any]:
    """Runs every (model, task, seed) not yet in ``results.json`` and writes the results, tables and plot.

    Args:
        args: models, tasks, seeds and data options.
        lora_args: LoRA settings (``--lora``) applied to every model.
        training_args: ``Seq2SeqTrainingArguments`` template: its ``output_dir`` is the evaluation's folder; each run
            gets a copy with its own ``output_dir`` (``runs/<model>/<task>/seed-<n>``) and seed, and the task's
            registry hyperparameters where this template keeps transformers' defaults.

    Returns:
        ``{"rows": [...], "skipped": [(model, task, reason)], "table": markdown, "output_dir": str}``.

    Raises:
        EvaluationConfigError: bad arguments or output folder, before any run.
    """
    import torch
    import transformers

    from .trainer import check_output_dir_is_not_an_input, train_and_evaluate

    entries = model_entries(args)
    specs = [get_task(name) for name in args.task_names]
    output_dir = Path(training_args.output_dir)
    check_output_dir_is_not_an_input(output_dir, [e.path for e in entries] + [args.dataset_dir])
    configs = {}
    for entry in entries:
        try:
            configs[entry.name] = transformers.AutoConfig.from_pretrained(entry.path)
        except (OSError, ValueError) as err:
            raise EvaluationConfigError(f"model {entry.name}: cannot load the config of {entry.path}: {err}") from None
        if entry.convert_to_fat5 and configs[entry.name].model_type not in ("t5", "mt5"):
            raise EvaluationConfigError(
                f"{AS_FAT5_PREFIX}{entry.path}: only T5 / mT5 / FLAN-T5 checkpoints convert to FAT5, this one is "
                f"{configs[entry.name].model_type!r}"
            )
    task_types, skipped = {}, []
    for entry in entries:
        for spec in specs:
            try:
                task_types[entry.name, spec.name] = run_task_type(configs[entry.name], spec, args.seq2seq_task_types)
            except FinetuneConfigError as err:
                logger.warning("Skipping %s on %s: %s", entry.name, spec.name, err)
                skipped.append((entry.name, spec.name, str(err)))
    # The models take turns on each task and seed: a machine whose load drifts over the hours of a suite weighs on
    # every model's training time alike.
    plan = [(entry, spec, task_types[entry.name, spec.name], seed)
            for spec in specs for seed in args.seed_values for entry in entries
            if (entry.name, spec.name) in task_types]  # fmt: skip

    settings = evaluation_settings(args, lora_args, training_args)
    # With several processes (accelerate launch) each one runs every finetuning data-parallel; the main process
    # prepares the folder and converts the checkpoints first (the others then find the same settings and resume),
    # and only it writes the results.
    is_main = training_args.process_index == 0
    # The evaluation's own rule decides what an existing folder may hold (prepare_evaluation_dir); the lock only
    # keeps a second run out of it while this one lasts.
    try:
        lock = hold_output_dir(output_dir, resume=True, is_main_process=is_main)
    except OutputDirInUseError as err:
        raise EvaluationConfigError(f"--output_dir {err}") from err
    with lock:
        with training_args.main_process_first(desc="evaluation output folder"):
            rows = prepare_evaluation_dir(output_dir, settings, args.overwrite_output_dir,
                                          models={e.name: e.path for e in entries})  # fmt: skip
            paths = resolve_checkpoints(entries, output_dir / "converted")
        done = {row_key(r) for r in rows}
        todo = [p for p in plan if (p[0].name, p[1].name, p[3]) not in done]
        say = functools.partial(print, flush=True) if is_main else logger.info
        if len(todo) < len(plan):
            say(f"evaluate: {len(plan) - len(todo)} of {len(plan)} runs already in {output_dir / RESULTS_JSON}, skipped")
        env = environment()
        durations: list[float] = []
        for index, (entry, spec, task_type, seed) in enumerate(todo):
            eta = _format_seconds(sum(durations) / len(durations) * (len(todo) - index)) if durations else "?"
            say(f"[{index + 1}/{len(todo)}] model={entry.name} task={spec.name} ({task_type}) seed={seed} ETA {eta}")
            run_dir = output_dir / RUNS_DIR / entry.name.replace("/", "--").replace(" ", "_") / spec.name / f"seed-{seed}"
            run_args = copy.deepcopy(training_args)
            run_args.output_dir, run_args.seed, run_args.push_to_hub = str(run_dir), seed, False
            if run_args.include_num_input_tokens_seen == "no":
                run_args.include_num_input_tokens_seen = "non_padding"
            model_args = ModelArguments(model_name_or_path=paths[entry.name])
            data_args = DataTrainingArguments(
                task=spec.name, task_type=task_type if task_type != spec.task_type else None,
                dataset_path=str(Path(args.dataset_dir) / spec.name) if args.dataset_dir else None,
                max_seq_length=args.max_seq_length, max_train_samples=args.max_train_samples,
                max_eval_samples=args.max_eval_samples, max_predict_samples=args.max_predict_samples,
                overwrite_output_dir=True,  # a run folder left by an interrupted run has no row: it starts again
            )  # fmt: skip
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                summary = train_and_evaluate(model_args, data_args, lora_args, run_args, model_loader=load_any_model,
                                             save_model_and_card=args.save_models)  # fmt: skip
            except FinetuneConfigError as err:
                logger.warning("Skipping %s on %s: %s", entry.name, spec.name, err)
                skipped.append((entry.name, spec.name, str(err)))
                continue
            durations.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
            row = _row(entry, paths[entry.name], spec, task_type, seed, summary, run_dir, peak, env)
            rows.append(row)
            if is_main:
                _write_results(output_dir, env, settings, entries, specs, args, rows)
            took = f" (trained in {row['train_runtime_s']:.1f} s)" if row["train_runtime_s"] else ""
            say(f"    {entry.name} on {spec.name}: {row['metric']} {_score_text(row['score'])}{took}")
        table = results_table(rows)
        if is_main:
            _write_results(output_dir, env, settings, entries, specs, args, rows)
            write_reports(rows, output_dir)
        return {"rows": rows, "skipped": skipped, "table": table, "output_dir": str(output_dir)}


def _write_results(output_dir: Path, env, settings, entries, specs, args, rows) -> None:
    """``results.json`` in the benchmarks' shape: ``{"environment", "args", "rows"}`` (rows keep their own
    environment: a resumed evaluation may have run on another machine)."""
    run_args = {"models": {e.name: e.path for e in entries}, "tasks": [s.name for s in specs],
                "seeds": args.seed_values, **settings}  # fmt: skip
    _write_json(output_dir / RESULTS_JSON, {"environment": env, "args": run_args, "rows": rows})


def _score_text(score) -> str:
    return "-" if score is None else f"{100 * score:.2f}"


# ------------------------------------------------------------------------------------------------- reports


@dataclass
class Aggregate:
    """Per (model, task): the mean and standard deviation over seeds of the score and of the training time."""

    models: list[str]
    tasks: list[str]
    metric: dict[str, str]
    score: dict[tuple[str, str], tuple[float, float, int]]
    train_time: dict[tuple[str, str], float]
    tokens_per_second: dict[tuple[str, str], float]


def aggregate(rows: list[dict]) -> Aggregate:
    """Groups ``rows`` by model and task; models and tasks keep their order of first appearance."""
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    metric, score, train_time, tps = {}, {}, {}, {}
    for model in models:
        for task in tasks:
            group = [r for r in rows if r["model"] == model and r["task"] == task]
            values = [r["score"] for r in group if r["score"] is not None]
            if not group:
                continue
            metric.setdefault(task, group[0]["metric"])
            if values:
                score[model, task] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1
                                      else 0.0, len(values))  # fmt: skip
            times = [r["train_runtime_s"] for r in group if r.get("train_runtime_s") is not None]
            if times:
                train_time[model, task] = float(np.mean(times))
            speeds = [r["train_tokens_per_second"] for r in group if r.get("train_tokens_per_second")]
            if speeds:
                tps[model, task] = float(np.mean(speeds))
    return Aggregate(models, tasks, metric, score, train_time, tps)


def suite_average(agg: Aggregate) -> tuple[dict[str, float], list[str]]:
    """Each model's mean over the tasks that every model has a score for (a fair average); returns those tasks."""
    common = [t for t in agg.tasks if all((m, t) in agg.score for m in agg.models)]
    return {m: sum(agg.score[m, t][0] for t in common) / len(common) for m in agg.models} if common else {}, common


def _is_best(value: float, best: float, agg: Aggregate) -> bool:
    """Bold in a comparison (ties included: equal to the best at the precision shown)."""
    return len(agg.models) > 1 and round(100 * value, 2) == round(100 * best, 2)


def results_table(rows: list[dict]) -> str:
    """Markdown: test scores (x100, mean ± std over seeds) per task and the suite average, models as columns, the
    best of each row in bold; then the finetuning time and training tokens per second."""
    agg = aggregate(rows)
    if not agg.models:
        return "No results yet.\n"
    header = "| task (metric) | " + " | ".join(agg.models) + " |\n|---|" + "---|" * len(agg.models) + "\n"
    lines = ["## Scores (test split, x100, mean ± std over seeds)\n", header.rstrip("\n")]
    for task in agg.tasks:
        best = max((agg.score[m, task][0] for m in agg.models if (m, task) in agg.score), default=None)
        cells = []
        for model in agg.models:
            if (model, task) not in agg.score:
                cells.append("-")
                continue
            mean, std, n = agg.score[model, task]
            text = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if n > 1 else "")
            cells.append(f"**{text}**" if _is_best(mean, best, agg) else text)
        lines.append(f"| {task} ({agg.metric[task]}) | " + " | ".join(cells) + " |")
    averages, common = suite_average(agg)
    if averages:
        best = max(averages.values())
        cells = [f"**{100 * v:.2f}**" if _is_best(v, best, agg) else f"{100 * v:.2f}" for v in averages.values()]
        label = "average" if len(common) == len(agg.tasks) else f"average ({len(common)} tasks all models ran)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Finetuning time (seconds, mean over seeds) and training input tokens per second\n",
              header.rstrip("\n")]  # fmt: skip
    for task in agg.tasks:
        cells = []
        for model in agg.models:
            seconds, tps = agg.train_time.get((model, task)), agg.tokens_per_second.get((model, task))
            cells.append("-" if seconds is None else f"{seconds:.1f} s" + (f" ({tps:,.0f} tok/s)" if tps else ""))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    devices = sorted({r["device"] for r in rows if r.get("device")})
    commits = sorted({(r.get("commit") or "?")[:10] for r in rows})
    lines += ["", f"Device: {', '.join(devices)}. Commit: {', '.join(commits)}. "
              f"transformers {rows[-1].get('transformers')}, torch {rows[-1].get('torch')}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], path: str | Path) -> Path:
    """``path`` (PNG): grouped bars of each model's score per task (error bars: std over seeds), and a second panel
    with each model's finetuning time per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    agg = aggregate(rows)
    x = np.arange(len(agg.tasks))
    width = 0.8 / max(len(agg.models), 1)
    fig, (ax_score, ax_time) = plt.subplots(1, 2, figsize=(6 + 2.2 * len(agg.tasks), 4.5))
    for i, model in enumerate(agg.models):
        offset = x - 0.4 + width * (i + 0.5)
        means = [100 * agg.score.get((model, t), (np.nan, 0, 0))[0] for t in agg.tasks]
        stds = [100 * agg.score.get((model, t), (0, 0, 0))[1] for t in agg.tasks]
        ax_score.bar(offset, means, width, yerr=stds, capsize=3, label=model)
        ax_time.bar(offset, [agg.train_time.get((model, t), np.nan) for t in agg.tasks], width, label=model)
    labels = [f"{t}\n({agg.metric[t]})" for t in agg.tasks]
    ax_score.set(xticks=x, ylabel="test score (x100)", title="Scores per task")
    ax_score.set_xticklabels(labels, fontsize=8)
    ax_time.set(xticks=x, ylabel="seconds", title="Finetuning time per task")
    ax_time.set_xticklabels(labels, fontsize=8)
    ax_score.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(rows: list[dict], output_dir: str | Path) -> str:
    """Writes ``results.md`` and ``results.png`` from ``rows`` into ``output_dir``; returns the Markdown table."""
    output_dir = Path(output_dir)
    table = results_table(rows)
    (output_dir / RESULTS_MD).write_text("# Evaluation results\n\n" + table, encoding="utf-8")
    if rows:
        plot_results(rows, output_dir / RESULTS_PNG)
    return table


# ------------------------------------------------------------------------------------------------- hub


HUB_DIR = "hub"


def export_for_hub(args: EvaluationArguments, training_args, rows: list[dict], output_dir: str | Path) -> Path:
    """Writes ``output_dir/hub``: the evaluated model as loaded (weights, custom code), its tokenizer, the evaluation
    model card (a ``model-index`` with its mean score per task) and ``results.json`` / ``.md`` / ``.png``.

    Raises:
        EvaluationConfigError: the evaluated model is not FAT5 (the card and the custom code are FAT5's), or it has no
            row yet.
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    from fat5_hf.model_card import TaskResult, write_evaluation_model_card

    output_dir = Path(output_dir)
    entry = model_entries(args)[0]
    path = next((r["loaded_from"] for r in rows if r["model"] == entry.name), None)
    if path is None:
        raise EvaluationConfigError(f"{entry.name} has no result in {output_dir / RESULTS_JSON}; nothing to push")
    if AutoConfig.from_pretrained(path).model_type != "fat5":
        raise EvaluationConfigError(
            f"--push_to_hub pushes the evaluated FAT5 model, but {entry.path} is not FAT5; evaluate it as "
            f"{AS_FAT5_PREFIX}{entry.path} to push its FAT5 conversion"
        )
    hub_dir = output_dir / HUB_DIR
    if hub_dir.exists():
        shutil.rmtree(hub_dir)  # rebuilt from the results each time: it holds nothing else
    hub_dir.mkdir()
    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.save_pretrained(hub_dir)
    tokenizer.save_pretrained(hub_dir)
    agg = aggregate(rows)
    own_rows = {r["task"]: r for r in rows if r["model"] == entry.name}
    results = []
    for task, task_row in own_rows.items():
        spec = get_task(task)
        from_hub = args.dataset_dir is None and spec.dataset_name is not None
        results.append(TaskResult(
            task_name=task, task_type=task_row["task_type"], dataset_name=spec.dataset_name if from_hub else task,
            dataset_config=spec.dataset_config, dataset_split=spec.splits.get(task_row["split"], task_row["split"]),
            metric_type=task_row["metric"], metric_value=agg.score[entry.name, task][0],
        ))  # fmt: skip
    training = {"tasks": ", ".join(own_rows), "seeds": ", ".join(str(s) for s in args.seed_values),
                "finetuning": "full"}  # fmt: skip
    lora = json.loads((output_dir / CONFIG_JSON).read_text(encoding="utf-8")).get("lora")
    if lora:
        training["finetuning"] = f"LoRA (r {lora['lora_r']}, alpha {lora['lora_alpha']})"
    for name in _CONFIG_TRAINING_FIELDS:
        value = getattr(training_args, name)
        if value != getattr(type(training_args), name, None):  # given on the command line
            training[name.replace("_", " ")] = value
    training["device"] = ", ".join(sorted({r["device"] for r in rows if r["model"] == entry.name}))
    write_evaluation_model_card(
        hub_dir, model=model, tokenizer=tokenizer, model_id=training_args.hub_model_id or entry.name,
        base_model=entry.path, results=results, comparison=results_table(rows), training=training,
        datasets=sorted({r.dataset_name for r in results if r.dataset_name not in own_rows}) or None,
    )  # fmt: skip
    for name in (RESULTS_JSON, RESULTS_MD, RESULTS_PNG):
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, hub_dir / name)
    return hub_dir
