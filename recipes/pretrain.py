#!/usr/bin/env python
"""Pretrain a FAT5 encoder-decoder with the UL2 mixture of denoisers, on Accelerate.

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain-fat5-small.yaml [section.key=value ...]
    python recipes/pretrain.py                      # the embedded tiny run: CPU, shipped French corpus, minutes
    python recipes/pretrain.py --resume latest training.output_dir=outputs/fat5-tiny-pretrain

One step is one optimizer update (``per_device_batch_size x gradient_accumulation_steps x processes``
rows). The loop: bf16/fp16 autocast from Accelerate (``mixed_precision``), gradient accumulation,
gradient clipping, AdamW (fused on CUDA) or AdamWScale, a warm-up schedule, periodic evaluation on
held-out text, logs to Accelerate's trackers and to ``train_log.jsonl``, checkpoints with
``accelerator.save_state`` (model, optimizer, schedule, RNG states and the data stream's position), so
that ``--resume`` continues exactly where the run stopped. SIGTERM (a scheduler's preemption) makes the
run finish its step, write a checkpoint and exit with status 0. At the end the model and tokenizer are
saved with ``save_pretrained`` into ``training.output_dir`` (and pushed to the Hub if asked).

Output folder::

    output_dir/config.json, model.safetensors, tokenizer files   # the final model (AutoModelForSeq2SeqLM)
    output_dir/checkpoints/step_00000150/                         # accelerator.save_state + recipe_state.json
    output_dir/logs/                                              # tracker logs (TensorBoard, ...)
    output_dir/train_log.jsonl                                    # one JSON record per logged step / eval
    output_dir/recipe_config.yaml                                 # the resolved configuration
    output_dir/.fat5_hf_run.lock                                  # while a run holds the folder: its host, pid, command

Multi-GPU / multi-node: ``accelerate launch --config_file recipes/configs/accelerate-ddp.yaml`` (or
``accelerate-fsdp2.yaml``, ``accelerate-deepspeed-zero2.yaml``) with the same arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

# Sibling modules of this script (``recipes/`` is not a package: it is run as a script).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from pretrain_config import (  # noqa: E402
    CUDA_GRAPH_COMPILE_MODES,
    ConfigError,
    PretrainConfig,
    load_config,
    resume_mismatches,
)
from pretrain_data import (  # noqa: E402
    DataError,
    DocumentStream,
    PrefetchingBatchStream,
    UL2BatchStream,
    count_tokens,
    load_local_documents,
    load_streamed_documents,
    log_denoiser_statistics,
    resolve_path,
    tokenize_documents,
)

from fat5_hf.hub_push import push_folder_to_hub  # noqa: E402
from fat5_hf.model_card import write_pretraining_model_card  # noqa: E402
from fat5_hf.output_dir import (  # noqa: E402
    OutputDirInUseError,
    OutputDirNotEmptyError,
    ensure_output_dir_free,
    file_manifest,
    fsync_dir,
    fsync_tree,
    hold_output_dir,
    output_dir_contents,
    publish_dir_atomically,
    stop_with_launcher,
    verify_file_manifest,
)

logger = logging.getLogger("fat5_hf.recipes.pretrain")

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
RECIPE_STATE_FILE = "recipe_state.json"
TRAIN_LOG_FILE = "train_log.jsonl"
RECIPE_CONFIG_FILE = "recipe_config.yaml"
LOGS_DIR = "logs"
# Entries of the output folder that belong to the run, not to the exported model (kept when the export is replaced).
RUN_ENTRIES = (CHECKPOINTS_DIR, LOGS_DIR, TRAIN_LOG_FILE, RECIPE_CONFIG_FILE)


class RecipeError(RuntimeError):
    """A problem with the run's inputs or outputs that the user must fix; the message says how."""


# ------------------------------------------------------------------------------------------------ console


class _TiedWeightsStoredOnce(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" warning from every checkpoint.

    The shared tensors are the embedding that the encoder, the decoder and a tied LM head use: safetensors stores it
    once, and loading the checkpoint into the model ties them again (the exact-resume tests check it bit for bit).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Removed shared tensor" in message and "while saving" in message)


TIED_WEIGHTS_FILTER = _TiedWeightsStoredOnce()


@contextlib.contextmanager
def library_progress_bars_off():
    """Hides the progress bars of ``datasets`` (generating, filtering, mapping the corpus) and ``transformers``
    (writing the weights) inside the block, then restores them: brief steps whose bars would bury the recipe's own."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets_bars = not datasets.are_progress_bars_disabled()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if transformers_bars:
            transformers_logging.enable_progress_bar()


def shorten_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by removing its middle (both the start and the end of a UL2 input say
    something: the mode token and the first spans, the prefix that an S-denoiser prediction continues)."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    head = (width - 3) // 2  # 3: the " … " between the two ends
    tail = width - 3 - head
    return f"{text[:head]} … {text[-tail:]}"


# ------------------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> tuple[PretrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Pretrain a FAT5 model with UL2 denoising on Accelerate.",
        epilog="Overrides: section.key=value (sections: model, data, training, optim, logging); "
        "values are YAML, e.g. training.max_steps=1000 data.train_files=[a.txt,b.txt].",
    )
    parser.add_argument("--config", help="YAML configuration (default: the embedded tiny CPU run)")
    parser.add_argument("--resume", help='checkpoint folder to continue from, or "latest" (in training.output_dir)')
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if args.resume is not None:
        config.training.resume = args.resume
    return config, args


# ----------------------------------------------------------------------------------------------- folders


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Completed checkpoints of a run, oldest first (in-progress ``.tmp`` folders are ignored)."""
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def checkpoint_problems(path: Path) -> list[str]:
    """Why the checkpoint at ``path`` cannot be resumed from (unreadable state file, files missing, truncated or
    changed since they were recorded); an empty list when it is intact."""
    try:
        saved = json.loads((path / RECIPE_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"{RECIPE_STATE_FILE}: unreadable ({err})"]
    # Checkpoints written before sizes and checksums were recorded cannot be checked further.
    return verify_file_manifest(path, saved.get("files", {}))


def resolve_resume(config: PretrainConfig) -> Path | None:
    """The checkpoint folder to resume from, checked against this run's configuration.

    ``--resume latest`` takes the newest intact checkpoint: one that is incomplete or corrupt (its files differ
    from the sizes and checksums recorded in its state file) is skipped with a warning. A checkpoint named
    explicitly must be intact.
    """
    resume = config.training.resume
    if not resume:
        return None
    output_dir = Path(config.training.output_dir)
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise RecipeError(
                f"--resume latest: no checkpoint in {output_dir / CHECKPOINTS_DIR}; start without --resume "
                "or point training.output_dir at the run to continue"
            )
        for path in reversed(found):
            problems = checkpoint_problems(path)
            if not problems:
                break
            logger.warning(
                "Checkpoint %s is incomplete or corrupt (%s): falling back to the previous one",
                path,
                "; ".join(problems[:3]),
            )
        else:
            raise RecipeError(
                f"--resume latest: every checkpoint in {output_dir / CHECKPOINTS_DIR} is incomplete or corrupt "
                "(see the warnings above); start a new run with training.overwrite_output_dir=true"
            )
    else:
        path = Path(resume)
    state_file = path / RECIPE_STATE_FILE
    if not state_file.is_file():
        raise RecipeError(
            f"--resume {resume}: {path} is not a checkpoint of this recipe (no {RECIPE_STATE_FILE}); "
            f"checkpoints live in <output_dir>/{CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}<step>"
        )
    problems = checkpoint_problems(path)
    if problems:
        raise RecipeError(
            f"--resume {resume}: the checkpoint {path} is incomplete or corrupt (" + "; ".join(problems[:5]) + "); "
            "resume from an earlier checkpoint, or with --resume latest (the newest intact one)"
        )
    saved = json.loads(state_file.read_text(encoding="utf-8"))
    mismatches = resume_mismatches(saved["config"], config.to_dict())
    if mismatches:
        raise RecipeError(
            f"--resume {path}: the checkpoint was written by a run with another configuration, so resuming "
            "would not continue it. Use the same config (only output, logging, evaluation and max_steps may "
            "change) or start a new run. Differences:\n  " + "\n  ".join(mismatches)
        )
    if saved["step"] >= config.training.max_steps:
        raise RecipeError(
            f"--resume {path}: the checkpoint is at step {saved['step']}, not before training.max_steps="
            f"{config.training.max_steps}; raise training.max_steps to train further"
        )
    return path


def check_output_dir(config: PretrainConfig, resuming: bool, is_main_process: bool = True) -> Path:
    """Read-only checks of the output folder, made before anything is loaded or written.

    A run that fails later on its inputs (data, tokenizer, model, lengths) must leave the folder as it was: a
    folder created or emptied by a failed run would make the corrected rerun refuse it as "not empty", or would
    have deleted the previous run for nothing.
    """
    output_dir = Path(config.training.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RecipeError(f"training.output_dir={output_dir} exists and is not a folder; choose another path")
    ensure_output_dir_free(output_dir, is_main_process=is_main_process)
    if not resuming and output_dir_contents(output_dir) and not config.training.overwrite_output_dir:
        raise OutputDirNotEmptyError(
            f"training.output_dir={output_dir} is not empty; pass training.overwrite_output_dir=true to "
            "replace the previous run there, --resume latest to continue it, or choose another folder"
        )
    # The folder will be created under its nearest existing ancestor, which must be a writable folder.
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a folder" if not existing.is_dir() else "is not writable"
        raise RecipeError(
            f"Cannot write to training.output_dir={output_dir}: {existing} {why}; choose a writable folder"
        )
    return output_dir


def hold_run_output_dir(config: PretrainConfig, resuming: bool, accelerator):
    """Takes the output folder for this run (`fat5_hf.output_dir.hold_output_dir`), once `check_output_dir` and the
    inputs have passed: locked until the run ends, created, and with ``training.overwrite_output_dir`` emptied of
    the earlier run (so that ``--resume latest`` and ``train_log.jsonl`` belong to this run)."""
    output_dir = Path(config.training.output_dir)
    try:
        return hold_output_dir(
            output_dir,
            overwrite_output_dir=config.training.overwrite_output_dir,
            resume=resuming,
            is_main_process=accelerator.is_main_process,
            wait_for_everyone=accelerator.wait_for_everyone,
            overwrite_hint="training.overwrite_output_dir=true",
            resume_hint="--resume latest",
        )
    except OSError as err:
        raise RecipeError(
            f"Cannot write to training.output_dir={output_dir}: {err}; choose a writable folder"
        ) from err


def check_accelerate_setup(accelerator, config: PretrainConfig) -> None:
    """Checks (and for DeepSpeed completes) what the accelerate config decides besides this recipe's config.

    ``accelerate launch`` may set the gradient accumulation from its config file (DeepSpeed configs do), which the
    Accelerator then uses instead of ``training.gradient_accumulation_steps``: the loop would step the optimizer
    on every micro-batch. DeepSpeed also needs the per-GPU batch, which Accelerate reads from a DataLoader this
    recipe does not use, and clips gradients itself: both are set here from the recipe's config.
    """
    from accelerate.utils import DistributedType

    training = config.training
    if accelerator.gradient_accumulation_steps != training.gradient_accumulation_steps:
        raise RecipeError(
            f"Accelerate was set up with gradient_accumulation_steps={accelerator.gradient_accumulation_steps} "
            f"(accelerate config or ACCELERATE_GRADIENT_ACCUMULATION_STEPS) but training.gradient_accumulation_steps="
            f"{training.gradient_accumulation_steps}; remove it from the accelerate config (the recipe's value is used)"
        )
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if config.optim.name == "adamw_scale":
        raise RecipeError(
            "optim.name=adamw_scale scales each parameter's step by that parameter's RMS, but DeepSpeed ZeRO gives "
            "the optimizer flat partitions of many parameters; use optim.name=adamw with DeepSpeed, or DDP / FSDP2 "
            "(accelerate-ddp.yaml, accelerate-fsdp2.yaml) with adamw_scale"
        )
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    recipe_values = {
        "gradient_accumulation_steps": ("training.gradient_accumulation_steps", training.gradient_accumulation_steps),
        "gradient_clipping": ("training.max_grad_norm", float(training.max_grad_norm or 0.0)),
    }
    for key, (name, value) in recipe_values.items():
        current = ds_config.get(key, "auto")
        if current not in ("auto", None) and float(current) != value:
            raise RecipeError(
                f"The DeepSpeed config sets {key}={current} but the recipe has {name}={value}; remove {key} from "
                "the accelerate config (the recipe sets it) or make the two equal"
            )
        ds_config[key] = value
    ds_config["train_micro_batch_size_per_gpu"] = training.per_device_batch_size
    ds_config["train_batch_size"] = (
        training.per_device_batch_size * training.gradient_accumulation_steps * accelerator.num_processes
    )


# -------------------------------------------------------------------------------------- tokenizer, model


def load_tokenizer(config: PretrainConfig):
    from transformers import AutoTokenizer

    name = config.data.tokenizer
    local = resolve_path(name)
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else name)
    except (OSError, ValueError) as err:
        raise RecipeError(f"Cannot load the tokenizer data.tokenizer={name!r}: {err}") from err


def build_model(config: PretrainConfig, tokenizer):
    """A randomly initialized FAT5 (``model.config``) or saved weights (``model.name_or_path``)."""
    from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

    model_args = dict(config.model.config)
    vocab_needed = len(tokenizer)
    special = dict(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    if config.model.name_or_path:
        model = FAT5ForConditionalGeneration.from_pretrained(config.model.name_or_path, **model_args)
    else:
        multiple = config.model.pad_vocab_to_multiple_of
        model_args.setdefault("vocab_size", -(-vocab_needed // multiple) * multiple)
        try:
            model_config = FAT5Config(**{**special, **model_args})
        except Exception as err:  # TypeError, ValueError or huggingface_hub's strict-dataclass validation error
            raise ConfigError(f"model.config is not a valid FAT5Config: {err}") from err
        model = FAT5ForConditionalGeneration(model_config)
        if model_args.get("tie_word_embeddings") is False:
            untie_lm_head(model)
    if model.config.vocab_size < vocab_needed:
        raise RecipeError(
            f"The tokenizer {config.data.tokenizer!r} has {vocab_needed} tokens but the model's vocabulary holds "
            f"{model.config.vocab_size}: token ids would index past the embeddings. Use the tokenizer the model "
            "was built for, or raise model.config.vocab_size (a new model) / resize the embeddings."
        )
    for key, value in special.items():
        if getattr(model.config, key, None) != value:
            raise RecipeError(
                f"The model's {key}={getattr(model.config, key, None)} differs from the tokenizer's ({value}); "
                "the tokenizer does not match the model"
            )
    # The collator emits only the tokenizer's ids, checked against the vocabulary above: the model's per-step id
    # checks (three host syncs a step on a GPU) are off while training and back on in the exported config.
    set_token_id_checks(model, False)
    return model


def untie_lm_head(model) -> None:
    """Gives a new model its own LM head, as ``tie_word_embeddings: false`` (T5 v1.1, FAT5) means.

    transformers 5's ``T5Config`` (and ``FAT5Config``, which follows it) stores ``tie_word_embeddings=True`` whatever
    it is given and reads ``false`` only as "do not rescale the decoder output", so a model built from such a config
    shares its input embedding with the LM head (FAT5-small would have 130M parameters instead of 147M). A separate
    head, initialized as T5 initializes an untied one (normal, std ``initializer_factor``), is saved by
    ``save_pretrained`` and loaded untied by ``from_pretrained`` (both weights present), like T5 v1.1 checkpoints.
    """
    head = torch.empty_like(model.lm_head.weight)
    torch.nn.init.normal_(head, mean=0.0, std=model.config.initializer_factor * 1.0)
    model.lm_head.weight = torch.nn.Parameter(head)


def set_token_id_checks(model, enabled: bool) -> None:
    """``check_token_ids`` on the model's config and the copies its encoder and decoder stacks hold."""
    for module in (model, model.get_encoder(), model.get_decoder()):
        module.config.check_token_ids = enabled


# ------------------------------------------------------------------------------------------------- data


def build_denoisers(config: PretrainConfig):
    from fat5_hf.ul2 import DenoiserSpec, default_ul2_denoisers, t5_span_corruption_denoisers

    denoisers = config.data.denoisers
    if denoisers == "ul2":
        return default_ul2_denoisers()
    if denoisers == "t5":
        return t5_span_corruption_denoisers()
    if isinstance(denoisers, list) and denoisers and all(isinstance(d, dict) for d in denoisers):
        try:
            return [DenoiserSpec(**d) for d in denoisers]
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"data.denoisers: {err} (fields: name, mode_token, mean_span_length, "
                "corruption_rate, weight, prefix_lm)"
            ) from err
    raise ConfigError(f'data.denoisers must be "ul2", "t5" or a list of DenoiserSpec mappings, got {denoisers!r}')


def build_collator(config: PretrainConfig, tokenizer, seed: int, evaluation: bool = False):
    """The UL2 collator of ``data``; for ``evaluation`` every batch mixes all the denoisers (whatever
    ``data.collator_kwargs.group_denoisers_by_length`` says), so that the evaluation loss covers the whole mixture
    and compares across runs."""
    from fat5_hf.ul2 import DataCollatorForUL2

    data = config.data
    collator_kwargs = dict(data.collator_kwargs)
    if evaluation:
        collator_kwargs["group_denoisers_by_length"] = False
    try:
        return DataCollatorForUL2(
            tokenizer,
            build_denoisers(config),
            max_input_length=data.max_input_length,
            max_target_length=data.max_target_length,
            seed=seed,
            **collator_kwargs,
        )
    except ValueError as err:
        raise ConfigError(
            f"data.denoisers with data.max_input_length={data.max_input_length}, "
            f"data.max_target_length={data.max_target_length} and data.tokenizer: {err}"
        ) from err
    except TypeError as err:
        raise ConfigError(f"data.collator_kwargs: {err}") from err


def build_data(config: PretrainConfig, tokenizer, accelerator) -> tuple[UL2BatchStream, list[dict]]:
    """The training batch stream of this process and its fixed evaluation batches."""
    data, training = config.data, config.training
    collator = build_collator(config, tokenizer, seed=training.seed + accelerator.process_index)
    holdout = 0 if (data.eval_files or data.eval_split) else data.eval_holdout_documents
    with accelerator.main_process_first():  # the first process fills the datasets cache, the others reuse it
        try:
            if data.dataset_name:
                documents = load_streamed_documents(
                    data.dataset_name, data.dataset_config, data.train_split, data.text_column
                )
                eval_documents = None
                if data.eval_split:
                    eval_documents = load_streamed_documents(
                        data.dataset_name, data.dataset_config, data.eval_split, data.text_column
                    )
                elif holdout:
                    eval_documents, documents = documents.take(holdout), documents.skip(holdout)
                train_documents = tokenize_documents(documents, tokenizer)
            else:
                documents = load_local_documents(data.train_files, data.text_column)
                eval_documents = load_local_documents(data.eval_files, data.text_column) if data.eval_files else None
                if eval_documents is None and holdout:
                    if holdout >= len(documents):
                        raise DataError(
                            f"data.eval_holdout_documents={holdout} would hold out all {len(documents)} training "
                            "documents; lower it or give data.eval_files"
                        )
                    eval_documents = documents.select(range(holdout))
                    documents = documents.select(range(holdout, len(documents)))
                train_documents = tokenize_documents(documents, tokenizer)
            eval_documents = tokenize_documents(eval_documents, tokenizer) if eval_documents is not None else None
        except DataError:
            if accelerator.is_main_process and accelerator.num_processes > 1:
                # The other processes wait for this one to go first: release them, so that each meets the same
                # error and reports it (rather than being killed by torchrun's agent, or blocked until the
                # collective times out where no agent watches).
                accelerator.wait_for_everyone()
            raise
    if accelerator.is_main_process:
        log_denoiser_statistics(collator, train_documents, logger.info)
    train_stream = UL2BatchStream(
        DocumentStream(
            train_documents,
            seed=training.seed,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            shuffle=data.shuffle,
            shuffle_buffer_size=data.shuffle_buffer_size,
        ),
        collator,
        training.per_device_batch_size,
    )
    eval_batches = []
    if eval_documents is not None and training.eval_batches:
        # Fixed batches, the same at every evaluation: unshuffled documents, a collator with its own seed.
        eval_stream = UL2BatchStream(
            DocumentStream(
                eval_documents,
                seed=0,
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                shuffle=False,
            ),
            build_collator(config, tokenizer, seed=10_000 + training.seed + accelerator.process_index, evaluation=True),
            training.per_device_batch_size,
        )
        eval_batches = [next(eval_stream) for _ in range(training.eval_batches)]
    return train_stream, eval_batches


# ------------------------------------------------------------------------------------------- train state


class TrainState:
    """The loop's own state, saved by ``accelerator.save_state`` through ``register_for_checkpointing``.

    Holds the step, the samples and tokens seen, and every process's data stream position (document
    cursor and UL2 collator counter): ``state_dict`` gathers them from all processes (it is called on each
    one, the main process writes the file) and ``load_state_dict`` gives each process its own.
    """

    def __init__(self, data_stream: UL2BatchStream, process_index: int, num_processes: int):
        self.data_stream = data_stream
        self.process_index, self.num_processes = process_index, num_processes
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        from accelerate.utils import gather_object

        streams = (
            gather_object([self.data_stream.state_dict()])
            if self.num_processes > 1
            else [self.data_stream.state_dict()]
        )
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "num_processes": self.num_processes,
            "data_streams": streams,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_processes"] != self.num_processes:
            raise RecipeError(
                f"The checkpoint was written by {state['num_processes']} processes and this run has "
                f"{self.num_processes}: each process's data position cannot be restored. Resume with "
                f"{state['num_processes']} processes."
            )
        self.step, self.samples_seen, self.tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
        self.data_stream.load_state_dict(state["data_streams"][self.process_index])


# --------------------------------------------------------------------------------------------- helpers


class StopOnSignal:
    """Turns SIGTERM into a flag checked between steps (then: checkpoint and clean exit).

    Every process must stop at the same step, so in a distributed run the flag is all-reduced each step, on
    the CPU through a gloo group: a GPU collective read back with ``.item()`` would make the host wait for the
    GPU at every step.
    """

    def __init__(self, num_processes: int, signals=(signal.SIGTERM,)):
        self.requested = False
        self._group = None
        if num_processes > 1:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # collective: every process builds it here
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self) -> bool:
        if self._group is None:
            return self.requested
        import torch.distributed as dist

        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, group=self._group)
        return bool(flag.item() > 0)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def append_log(output_dir: Path, record: dict) -> None:
    with open(output_dir / TRAIN_LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(output_dir: Path, step: int) -> None:
    """On resume, drop the records a previous run logged after the checkpoint it is resumed from."""
    path = output_dir / TRAIN_LOG_FILE
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


@contextlib.contextmanager
def full_parameters(model):
    """Gathers FSDP2-sharded root parameters (shared embedding, LM head) for ``generate``.

    Under FSDP2 only the ``forward`` of a sharded module gathers its parameters; ``generate`` calls the
    encoder and the embedding outside the root's forward, so the root unit is unsharded explicitly.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()
    if isinstance(model, FSDPModule):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


@torch.no_grad()
def evaluate(model, eval_batches: list[dict], accelerator, uses_cuda_graphs: bool = False) -> float:
    """Mean loss over the fixed evaluation batches of every process."""
    model.eval()
    losses = []
    for batch in eval_batches:
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        if uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with accelerator.autocast():
            # cloned: a CUDA-graph replay's outputs are overwritten by the next replay
            losses.append(model(**batch).loss.float().clone())
    model.train()
    mean = torch.stack(losses).mean().reshape(1)
    return float(accelerator.reduce(mean, reduction="mean").item())


@torch.no_grad()
def generate_sample(
    model, tokenizer, eval_batches: list[dict], accelerator, max_new_tokens: int = 32
) -> tuple[str, str]:
    """Greedy generation from the first evaluation input (runs on every process, as FSDP needs).

    Returns:
        The decoded input and the decoded prediction (special tokens kept: the sentinels show which span is which).
    """
    unwrapped = accelerator.unwrap_model(model)
    input_ids = eval_batches[0]["input_ids"][:1].to(accelerator.device)
    attention_mask = eval_batches[0]["attention_mask"][:1].to(accelerator.device)
    unwrapped.eval()
    with full_parameters(unwrapped), accelerator.autocast():
        generated = unwrapped.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False
        )
    unwrapped.train()
    source = tokenizer.decode(input_ids[0][attention_mask[0].bool()])
    return source, tokenizer.decode(generated[0], skip_special_tokens=False)


def save_checkpoint(accelerator, config: PretrainConfig, state: TrainState, output_dir: Path) -> Path:
    """Writes ``checkpoints/step_<N>`` atomically (a ``.tmp`` folder, flushed to disk, renamed once complete),
    prunes old ones. The recipe state records each file's size and SHA-256 (checked by `checkpoint_problems`)."""
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    tmp = root / f"{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's files are written
    if accelerator.is_main_process:
        recipe_state = {
            "step": state.step,
            "num_processes": accelerator.num_processes,
            "config": config.to_dict(),
            "files": file_manifest(tmp),
        }
        (tmp / RECIPE_STATE_FILE).write_text(json.dumps(recipe_state, indent=1), encoding="utf-8")
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(root)  # the rename itself
        limit = config.training.save_total_limit
        if limit is not None:
            for old in checkpoint_dirs(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def export_model(
    accelerator, model, tokenizer, config: PretrainConfig, output_dir: Path, state, eval_loss: float | None
) -> None:
    """The one place where the final model leaves the run: ``save_pretrained``, tokenizer, model card, optional push.

    ``from_pretrained(output_dir)`` then loads it (``AutoModelForSeq2SeqLM`` once ``fat5_hf`` is imported). The export
    is published atomically beside the run's own files (`publish_dir_atomically`): a crash while exporting leaves
    the previous export (a resumed run's) or none, never new files beside old weights.
    """
    unwrapped = accelerator.unwrap_model(model)
    set_token_id_checks(unwrapped, True)  # users of the saved model get the clear errors by default
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards on the main process
    if accelerator.is_main_process:

        def write_export(folder: Path) -> None:
            with library_progress_bars_off():
                unwrapped.save_pretrained(folder, state_dict=state_dict, save_function=accelerator.save)
            # The length the model was trained on: the tokenizer then warns about (and truncation cuts) longer inputs.
            tokenizer.model_max_length = config.data.max_input_length
            tokenizer.save_pretrained(folder)
            write_pretraining_model_card(
                unwrapped, tokenizer, config, folder, state.step, state.tokens_seen, eval_loss,
                accelerator.num_processes,
            )  # fmt: skip

        publish_dir_atomically(output_dir, write_export, keep=RUN_ENTRIES)
        if config.training.push_to_hub:
            push_folder_to_hub(
                output_dir, config.training.hub_model_id, private=config.training.hub_private,
                commit_message=f"FAT5 pretrained {config.training.max_steps} steps with fat5-hf's recipe",
                ignore_patterns=[f"{CHECKPOINTS_DIR}/*", f"{LOGS_DIR}/*", TRAIN_LOG_FILE],
            )  # fmt: skip
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------- loop


def train(config: PretrainConfig) -> dict[str, Any]:
    """Runs (or resumes) the pretraining described by ``config``; returns a summary of the run.

    The output folder is held (locked) from the moment the inputs have passed their checks until the run ends.
    """
    with contextlib.ExitStack() as run_resources:
        return _train(config, run_resources)


def _train(config: PretrainConfig, run_resources: contextlib.ExitStack) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from fat5_hf.optim import build_optimizer, build_scheduler

    training, optim, log_cfg = config.training, config.optim, config.logging
    # Killing the launcher (torchrun, accelerate launch) stops this process: SIGTERM, a checkpoint, exit.
    launcher = stop_with_launcher(signal.SIGTERM)
    resume_dir = resolve_resume(config)
    output_dir = Path(training.output_dir)
    accelerator = Accelerator(
        mixed_precision=training.mixed_precision,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        log_with=log_cfg.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_DIR)),
        cpu=training.cpu,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # E.g. an FSDP or multi-GPU accelerate config on a machine without GPUs: every process would run
        # alone and they would overwrite each other's checkpoints.
        raise RecipeError(
            f"Launched as {launched} processes but Accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); check the accelerate config (on CPU: --multi_gpu with "
            "training.cpu=true gives gloo data parallelism)"
        )
    check_accelerate_setup(accelerator, config)
    if resume_dir is not None:
        saved_processes = json.loads((resume_dir / RECIPE_STATE_FILE).read_text(encoding="utf-8"))["num_processes"]
        if saved_processes != accelerator.num_processes:
            raise RecipeError(
                f"--resume {resume_dir}: the checkpoint was written by {saved_processes} processes and this run has "
                f"{accelerator.num_processes}: each process's data position cannot be restored. Resume with "
                f"{saved_processes} processes."
            )
    # Every input is checked before the output folder is touched (see check_output_dir).
    check_output_dir(config, resuming=resume_dir is not None, is_main_process=accelerator.is_main_process)

    if not accelerator.is_main_process:
        import datasets

        datasets.disable_progress_bars()
    set_seed(training.seed)
    tokenizer = load_tokenizer(config)
    model = build_model(config, tokenizer)
    if accelerator.distributed_type == DistributedType.FSDP:
        # Accelerate's FSDP2 gives the input embedding a unit of its own (shared with the LM head when tied): the
        # encoder and decoder must call that very module, not their own Embedding over the same weight, which
        # torch >= 2.13 refuses (a parameter in two units) and 2.11 leaves sharded in their forward.
        model.set_input_embeddings(model.get_input_embeddings())
    with library_progress_bars_off():
        train_stream, eval_batches = build_data(config, tokenizer, accelerator)
    if config.data.prefetch_batches:
        train_stream = PrefetchingBatchStream(
            train_stream, config.data.prefetch_batches, pin_memory=accelerator.device.type == "cuda"
        )
    try:
        optimizer = build_optimizer(
            model,
            optim.name,
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            fused=optim.fused if accelerator.device.type == "cuda" else False,
        )
        # Not passed to accelerator.prepare: its wrapper steps the schedule once per process per update.
        scheduler = build_scheduler(
            optimizer, optim.scheduler, optim.warmup_steps, training.max_steps, optim.scheduler_kwargs
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optim: {err}") from err
    run_resources.enter_context(hold_run_output_dir(config, resume_dir is not None, accelerator))
    if accelerator.is_main_process:
        (output_dir / RECIPE_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.model.torch_compile:
        # Compiled here rather than through Accelerator(dynamo_backend=...): Accelerate keeps the state of its
        # first Accelerator for the whole process, so a second run in one process (tests, notebooks) would
        # silently train uncompiled. Checkpoints and exports unwrap it (`accelerator.unwrap_model`).
        model = torch.compile(model, mode=config.model.torch_compile_mode)
    # Each forward replays new CUDA graphs: marking the step tells cudagraph trees the last step's outputs are
    # no longer needed (the loss is read before the next forward).
    uses_cuda_graphs = config.model.torch_compile and config.model.torch_compile_mode in CUDA_GRAPH_COMPILE_MODES
    if uses_cuda_graphs:
        # Gradients allocated (and zeroed, not freed) outside the graph pool: a first backward would otherwise hand
        # its pool output to .grad, which the next replay (the next micro-batch or step) overwrites.
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
    state = TrainState(train_stream, accelerator.process_index, accelerator.num_processes)
    accelerator.register_for_checkpointing(scheduler, state)
    logging.getLogger("accelerate.utils.other").addFilter(TIED_WEIGHTS_FILTER)

    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        if accelerator.is_main_process:
            truncate_log(output_dir, state.step)
        logger.info("Resumed from %s at step %d", resume_dir, state.step)
    if log_cfg.log_with:
        accelerator.init_trackers(log_cfg.project_name, config=_flat_hparams(config))

    compiled = ""
    if config.model.torch_compile:
        mode = config.model.torch_compile_mode
        compiled = ", torch.compile" + ("" if mode == "default" else f" {mode}")
    accelerator.print(
        f"Pretraining {type(accelerator.unwrap_model(model)).__name__} on {accelerator.num_processes} process(es) "
        f"({accelerator.distributed_type.value}, {accelerator.device.type}, mixed precision "
        f"{accelerator.mixed_precision}{compiled}); "
        f"steps {state.step} -> {training.max_steps}"
    )
    stopper = StopOnSignal(accelerator.num_processes)
    model.train()
    progress = tqdm(
        total=training.max_steps,
        initial=state.step,
        desc="pretrain",
        unit="step",
        disable=not (accelerator.is_main_process and log_cfg.progress_bar),
        dynamic_ncols=True,
    )
    window_loss = torch.zeros((), device=accelerator.device)
    # The z-loss term (PaLM's log(Z)^2 penalty, model.config.z_loss) is part of the loss; logged on its own too.
    log_z_loss = getattr(accelerator.unwrap_model(model).config, "z_loss", 0) > 0
    window_z_loss = torch.zeros((), device=accelerator.device)
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    grad_norm = None
    last_metrics: dict[str, float] = {}
    stopped_by_signal = stopped_early = False
    rows_per_step = training.per_device_batch_size * training.gradient_accumulation_steps * accelerator.num_processes
    try:
        while state.step < training.max_steps:
            for _ in range(training.gradient_accumulation_steps):
                batch = next(train_stream)
                window_tokens += count_tokens(batch)
                batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
                with accelerator.accumulate(model):
                    if uses_cuda_graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    outputs = model(**batch)
                    loss = outputs.loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and training.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=not uses_cuda_graphs)
                window_loss += loss.detach().float() / training.gradient_accumulation_steps
                if log_z_loss:
                    window_z_loss += outputs.z_loss.detach().float() / training.gradient_accumulation_steps
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.step += 1
            state.samples_seen += rows_per_step
            window_steps += 1
            progress.update(1)

            # Agreed by all processes before logging: a checkpoint flushes the logging window first, so that
            # the counters it saves (tokens seen) are complete.
            if launcher is not None:
                launcher.check()  # a dead launcher sends SIGTERM, as its parent-death signal would have
            stop = stopper.should_stop()
            paused = training.stop_at_step is not None and state.step >= training.stop_at_step
            save_now = state.step % training.save_steps == 0 or stop or paused
            if state.step % log_cfg.logging_steps == 0 or state.step == training.max_steps or save_now:
                totals = accelerator.reduce(
                    torch.stack(
                        [window_loss, torch.tensor(float(window_tokens), device=accelerator.device), window_z_loss]
                    ),
                    reduction="sum",
                )
                elapsed = time.perf_counter() - window_start
                tokens = int(totals[1].item())
                state.tokens_seen += tokens
                last_metrics = {
                    "loss": totals[0].item() / (window_steps * accelerator.num_processes),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens / elapsed,
                    "samples_seen": state.samples_seen,
                    "tokens_seen": state.tokens_seen,
                }
                if log_z_loss:
                    last_metrics["z_loss"] = totals[2].item() / (window_steps * accelerator.num_processes)
                if grad_norm is not None:
                    last_metrics["grad_norm"] = float(grad_norm)
                accelerator.log({f"train/{k}": v for k, v in last_metrics.items()}, step=state.step)
                if accelerator.is_main_process:
                    append_log(output_dir, {"step": state.step, **last_metrics})
                progress.set_postfix(
                    loss=f"{last_metrics['loss']:.4f}",
                    lr=f"{last_metrics['lr']:.2e}",
                    tok_s=f"{last_metrics['tokens_per_s']:,.0f}",
                )
                window_loss.zero_()
                window_z_loss.zero_()
                window_steps, window_tokens, window_start = 0, 0, time.perf_counter()

            if eval_batches and (state.step % training.eval_steps == 0 or state.step == training.max_steps):
                eval_loss = evaluate(model, eval_batches, accelerator, uses_cuda_graphs)
                source, prediction = generate_sample(model, tokenizer, eval_batches, accelerator)
                sample = f"{source} -> {prediction}"
                last_metrics["eval_loss"] = eval_loss
                accelerator.log({"eval/loss": eval_loss, "eval/sample": sample}, step=state.step)
                if accelerator.is_main_process:
                    append_log(output_dir, {"step": state.step, "eval_loss": eval_loss, "sample": sample})
                    # The input is shortened, never the prediction: what the model generates is the point.
                    progress.write(
                        f"step {state.step}: eval loss {eval_loss:.4f} | {shorten_middle(source, 100)} -> {prediction}"
                    )
                window_start = time.perf_counter()  # evaluation time is not training throughput

            if save_now:
                path = save_checkpoint(accelerator, config, state, output_dir)
                if accelerator.is_main_process:
                    progress.write(f"step {state.step}: checkpoint saved to {path}")
                window_start = time.perf_counter()
            if stop or paused:
                stopped_by_signal = stop
                stopped_early = True
                break
    finally:
        progress.close()
        stopper.restore()
        if isinstance(train_stream, PrefetchingBatchStream):
            train_stream.close()

    if stopped_early:
        accelerator.print(
            f"Stopped {'by SIGTERM' if stopped_by_signal else 'as asked (training.stop_at_step)'} at step "
            f"{state.step} of {training.max_steps}: checkpoint saved in {output_dir / CHECKPOINTS_DIR}. "
            f"Continue with --resume latest training.output_dir={output_dir}"
        )
    else:
        export_model(accelerator, model, tokenizer, config, output_dir, state, last_metrics.get("eval_loss"))
        accelerator.print(
            f"Saved the pretrained model and tokenizer to {output_dir} (checkpoints in {output_dir / CHECKPOINTS_DIR}, "
            f"metrics in {output_dir / TRAIN_LOG_FILE} and {output_dir / 'logs'})"
        )
    accelerator.end_training()
    return {
        "step": state.step,
        "stopped_early": stopped_early,
        "stopped_by_signal": stopped_by_signal,
        "output_dir": str(output_dir),
        **last_metrics,
    }


def _flat_hparams(config: PretrainConfig) -> dict[str, Any]:
    """Tracker hyperparameters: scalars as they are, anything else as its string."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    try:
        config, args = parse_args(argv)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False))
            return 0
        train(config)
    except (ConfigError, DataError, RecipeError, OutputDirInUseError, OutputDirNotEmptyError) as err:
        print(f"pretrain.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
