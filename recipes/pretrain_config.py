"""Configuration of the pretraining recipe: nested dataclasses filled from YAML and ``key=value`` overrides.

The defaults *are* the embedded tiny CPU run (a small FAT5 on the French corpus shipped in
``recipes/data/``), so ``python recipes/pretrain.py`` needs no file and no network. A YAML file has one
mapping per section::

    model: {config: {d_model: 512, ...}}
    data: {dataset_name: allenai/c4, dataset_config: fr, ...}
    training: {max_steps: 65536, ...}
    optim: {name: adamw_scale, lr: 5.0e-3, ...}
    logging: {log_with: [tensorboard]}

and the command line overrides any field with ``section.key=value`` (``key=value`` when the key
belongs to one section only); values are parsed as YAML (``training.max_steps=10``,
``data.train_files=[a.txt,b.txt]``, ``training.resume=null``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "recipes" / "data"
# torch.compile's modes; the two that capture CUDA graphs need a step boundary marked before each forward.
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def _tiny_model_config() -> dict:
    # ~1.5M parameters besides the embeddings: a few hundred steps fit in ~2 minutes on 2 CPU cores.
    return dict(
        d_model=128,
        d_kv=32,
        num_heads=4,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=True,
    )


@dataclass
class ModelConfig:
    """The model to pretrain.

    ``config`` holds keyword arguments of ``FAT5Config`` for a randomly initialized model;
    ``name_or_path`` instead continues training from saved weights (``config`` then overrides fields of
    the saved config). ``vocab_size`` defaults to the tokenizer's length rounded up to a multiple of
    ``pad_vocab_to_multiple_of`` (128 keeps the LM head GEMM on tensor-core-friendly shapes). The z-loss
    coefficient is the model's own ``z_loss`` field (``model.config.z_loss``, e.g. 1e-4). ``torch_compile``
    trains the prepared model through ``torch.compile`` (Inductor; the kernels stay opaque custom ops) in
    ``torch_compile_mode`` (one of torch.compile's modes: ``"reduce-overhead"`` replays each step as CUDA
    graphs, which removes the host's launch cost; each batch shape compiles and records its own graphs, so pad
    to one shape, e.g. ``data.collator_kwargs: {pad_to_multiple_of: 512}``).
    """

    config: dict = field(default_factory=_tiny_model_config)
    name_or_path: str | None = None
    pad_vocab_to_multiple_of: int = 128
    torch_compile: bool = False
    torch_compile_mode: str = "default"


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes UL2 batches.

    Either local files (``train_files`` / ``eval_files``: ``.txt`` with one document per line, or
    ``.json``/``.jsonl``/``.parquet``/``.csv`` with a ``text_column``), or a Hub dataset streamed with
    ``datasets`` (``dataset_name``, ``dataset_config``, ``train_split``, ``eval_split``). Without eval
    files/split, the first ``eval_holdout_documents`` documents of the training data are held out.
    ``denoisers`` is ``"ul2"`` (the UL2 mixture of R, S and X denoisers), ``"t5"`` (span corruption
    only) or a list of ``DenoiserSpec`` keyword dicts.
    """

    tokenizer: str = str(DEFAULT_DATA_DIR / "tokenizer")
    train_files: list[str] = field(default_factory=lambda: [str(DEFAULT_DATA_DIR / "fr_corpus_train.jsonl")])
    eval_files: list[str] = field(default_factory=lambda: [str(DEFAULT_DATA_DIR / "fr_corpus_validation.jsonl")])
    dataset_name: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    text_column: str = "text"
    eval_holdout_documents: int = 0
    max_input_length: int = 128
    max_target_length: int | None = None
    denoisers: Any = "ul2"
    collator_kwargs: dict = field(default_factory=dict)
    shuffle: bool = True
    shuffle_buffer_size: int = 10_000
    # Batches built ahead in a worker process (overlaps collation with the step); 0: build them in the loop.
    prefetch_batches: int = 2


@dataclass
class TrainingConfig:
    """The loop: steps, batch, precision, evaluation and checkpoints. A step is one optimizer update."""

    output_dir: str = "outputs/fat5-tiny-pretrain"
    overwrite_output_dir: bool = False
    resume: str | None = None
    seed: int = 42
    max_steps: int = 300
    # Stop after this step with a checkpoint, as on SIGTERM, without finishing the run: for jobs in fixed
    # time slots that continue with --resume (the schedule still spans max_steps).
    stop_at_step: int | None = None
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None
    max_grad_norm: float | None = 1.0
    eval_steps: int = 100
    eval_batches: int = 4
    save_steps: int = 150
    save_total_limit: int | None = 2
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True
    hub_license: str = "apache-2.0"  # licence of the exported weights, in the model card's metadata
    cpu: bool = False


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (see ``fat5_hf.optim``)."""

    name: str = "adamw_scale"
    lr: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool | None = None
    scheduler: str = "cosine"
    warmup_steps: int = 30
    scheduler_kwargs: dict = field(default_factory=dict)


@dataclass
class LoggingConfig:
    """Trackers (any that Accelerate supports: tensorboard, wandb, mlflow, ...), progress bar, intervals."""

    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    project_name: str = "fat5-pretrain"
    logging_steps: int = 10
    progress_bar: bool = True


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that may change between a run and its resumption (they do not change what the run computes
# up to the resumed step). Anything else differing makes --resume refuse the checkpoint.
RESUME_MUTABLE_FIELDS = frozenset(
    {
        "training.output_dir",
        "training.overwrite_output_dir",
        "training.resume",
        "training.max_steps",
        "training.stop_at_step",
        "training.eval_steps",
        "training.eval_batches",
        "training.save_steps",
        "training.save_total_limit",
        "training.push_to_hub",
        "training.hub_model_id",
        "training.hub_private",
        "training.hub_license",
        "training.mixed_precision",
        "model.torch_compile",
        "model.torch_compile_mode",
        "data.eval_files",
        "data.eval_split",
        "data.prefetch_batches",
        "logging.log_with",
        "logging.project_name",
        "logging.logging_steps",
        "logging.progress_bar",
    }
)


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


def _section_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _did_you_mean(name: str, candidates, prefix: str = "") -> str:
    """``" (did you mean <prefix><closest>?)"`` for the candidate closest to a misspelt ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def model_config_fields() -> frozenset[str]:
    """The keys ``model.config`` may hold: ``FAT5Config``'s fields, their aliases and ``tie_word_embeddings``.

    ``PreTrainedConfig`` stores any keyword it is given, so a misspelt field would otherwise train silently with the
    default value and be written into ``config.json`` under the misspelt name.
    """
    from fat5_hf import FAT5Config

    fields = {f.name for f in dataclasses.fields(FAT5Config)}
    # tie_word_embeddings is read by __post_init__ (T5 v1.1's untied head), the aliases are T5's attribute_map.
    return frozenset(fields | {"tie_word_embeddings"} | set(FAT5Config.attribute_map))


def check_model_config_keys(model_config: dict) -> None:
    """Raises ConfigError naming the first key of ``model.config`` that is not a ``FAT5Config`` field."""
    valid = model_config_fields()
    for key in model_config:
        if key not in valid:
            raise ConfigError(
                f"model.config.{key} is not a FAT5Config field{_did_you_mean(str(key), valid, 'model.config.')}; "
                f"it would be stored in config.json and ignored. Valid fields: {sorted(valid)}"
            )


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Validates (and lightly coerces) ``value`` against a field annotation; raises ConfigError."""
    if isinstance(annotation, str):  # `from __future__ import annotations`: resolve the string
        annotation = eval(annotation, vars(typing) | {"Any": Any}, {})  # noqa: S307 - our own annotations
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str):  # a single path where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _apply(config: PretrainConfig, section: str, key: str, value: Any, source: str) -> None:
    sections = _section_fields(PretrainConfig)
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r}; valid sections: {sorted(sections)}")
    section_obj = getattr(config, section)
    fields = _section_fields(type(section_obj))
    if key not in fields:
        raise ConfigError(
            f"{source}: unknown key {section}.{key}{_did_you_mean(key, fields, f'{section}.')}; "
            f"valid keys of {section!r}: {sorted(fields)}"
        )
    setattr(section_obj, key, _check_type(value, fields[key].type, f"{source}: {section}.{key}"))


def _apply_mapping(config: PretrainConfig, mapping: dict, source: str) -> None:
    sections = _section_fields(PretrainConfig)
    for section, values in mapping.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r}; valid sections: {sorted(sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values, got {values!r}")
        for key, value in values.items():
            _apply(config, section, key, value, source)


def parse_override(config: PretrainConfig, override: str) -> None:
    """Applies one ``section.key=value`` (or unambiguous ``key=value``) override in place."""
    if "=" not in override:
        raise ConfigError(f"Override {override!r} is not of the form section.key=value (e.g. training.max_steps=10)")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"Override {override!r}: the value is not valid YAML ({err})") from err
    if dotted.count(".") >= 2:
        # section.field.key...: one entry of a mapping field, e.g. model.config.dropout_rate=0.1
        section, key, *path = dotted.split(".")
        _apply(config, section, key, getattr(getattr(config, section), key), f"override {override!r}")
        mapping = getattr(getattr(config, section), key)
        if not isinstance(mapping, dict):
            raise ConfigError(f"Override {override!r}: {section}.{key} is not a mapping, set it as a whole")
        for part in path[:-1]:
            mapping = mapping.setdefault(part, {})
            if not isinstance(mapping, dict):
                raise ConfigError(f"Override {override!r}: {part!r} is not a mapping")
        mapping[path[-1]] = value
        return
    if "." in dotted:
        section, key = dotted.split(".", 1)
    else:
        owners = [
            name for name in _section_fields(PretrainConfig) if dotted in _section_fields(type(getattr(config, name)))
        ]
        if len(owners) != 1:
            valid = sorted(
                f"{name}.{key}"
                for name in _section_fields(PretrainConfig)
                for key in _section_fields(type(getattr(config, name)))
            )
            # Matched on the bare keys: "max_stepz" is far from "training.max_steps" as a whole string.
            by_key = {name.split(".", 1)[1]: name for name in valid}
            close = difflib.get_close_matches(dotted, list(by_key), n=1)
            suggestion = f" (did you mean {by_key[close[0]]}?)" if close else ""
            why = "is ambiguous, it exists in " + ", ".join(owners) if owners else "is not a known key" + suggestion
            raise ConfigError(f"Override {override!r}: {dotted!r} {why}; valid keys: {valid}")
        section, key = owners[0], dotted
    _apply(config, section, key, value, f"override {override!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Builds the configuration: defaults (the tiny CPU run), then the YAML file, then the overrides."""
    config = PretrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; see recipes/configs/ for the shipped ones")
        try:
            mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(mapping, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model, data, training, optim, logging)")
        _apply_mapping(config, mapping, str(path))
    for override in overrides:
        parse_override(config, override)
    validate_config(config)
    return config


def config_from_dict(mapping: dict) -> PretrainConfig:
    """Rebuilds a configuration saved with ``PretrainConfig.to_dict`` (e.g. in a checkpoint)."""
    config = PretrainConfig()
    _apply_mapping(config, mapping, "saved config")
    return config


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (one level per section; the values themselves stay whole)."""
    return {f"{prefix}{section}.{key}": value for section, values in mapping.items() for key, value in values.items()}


def resume_mismatches(saved: dict, current: dict) -> list[str]:
    """The fields whose change would make a resumed run differ from the one that wrote the checkpoint."""
    saved_flat, current_flat = flatten(saved), flatten(current)
    return sorted(
        f"{key}: checkpoint has {saved_flat.get(key)!r}, this run has {current_flat.get(key)!r}"
        for key in saved_flat.keys() | current_flat.keys()
        if key not in RESUME_MUTABLE_FIELDS and saved_flat.get(key) != current_flat.get(key)
    )


def validate_config(config: PretrainConfig) -> None:
    """Checks the values that do not depend on data or model files; raises ConfigError naming the fix."""
    t, o, d, lg = config.training, config.optim, config.data, config.logging
    positive = {
        "training.max_steps": t.max_steps,
        "training.per_device_batch_size": t.per_device_batch_size,
        "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "training.eval_steps": t.eval_steps,
        "training.save_steps": t.save_steps,
        "logging.logging_steps": lg.logging_steps,
        "data.max_input_length": d.max_input_length,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    check_model_config_keys(config.model.config)
    if d.prefetch_batches < 0:
        raise ConfigError(f"data.prefetch_batches must be >= 0, got {d.prefetch_batches}")
    if t.eval_batches < 0:
        raise ConfigError(f"training.eval_batches must be >= 0, got {t.eval_batches}")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        raise ConfigError(f"training.save_total_limit must be >= 1 or null, got {t.save_total_limit}")
    if t.mixed_precision not in (None, "no", "fp16", "bf16", "fp8"):
        raise ConfigError(f"training.mixed_precision must be null, no, bf16, fp16 or fp8, got {t.mixed_precision!r}")
    if config.model.torch_compile_mode not in TORCH_COMPILE_MODES:
        raise ConfigError(
            f"model.torch_compile_mode must be one of {list(TORCH_COMPILE_MODES)}, got {config.model.torch_compile_mode!r}"
        )
    if config.model.torch_compile_mode != "default" and not config.model.torch_compile:
        raise ConfigError(
            f"model.torch_compile_mode={config.model.torch_compile_mode!r} has no effect without compiling: "
            "also set model.torch_compile=true"
        )
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must be two numbers, got {o.betas}")
    if t.push_to_hub and not t.hub_model_id:
        raise ConfigError(
            "training.push_to_hub is true but training.hub_model_id is not set (e.g. my-org/fat5-small-fr)"
        )
    if d.dataset_name is not None:
        # A Hub dataset replaces the shipped corpus of the defaults (but not files the user named).
        defaults = DataConfig()
        if d.train_files == defaults.train_files:
            d.train_files = []
        if d.eval_files == defaults.eval_files:
            d.eval_files = []
        if d.train_files:
            raise ConfigError(
                "Set either data.dataset_name (a Hub dataset) or data.train_files (local files), not both"
            )
    elif not d.train_files:
        raise ConfigError("No training data: set data.train_files (local files) or data.dataset_name (a Hub dataset)")
