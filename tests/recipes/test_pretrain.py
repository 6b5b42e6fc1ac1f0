"""Tests of the pretraining recipe (recipes/pretrain.py) on CPU with a tiny FAT5 and the shipped French corpus.

Covered: configuration (YAML + overrides, errors listing valid keys, shipped configs), the loss going down
with a saved model that loads and generates, exact resume (N steps straight == N/2 + resume, bit for bit,
with dropout on), SIGTERM (checkpoint then clean exit, in a subprocess), bad inputs (clear errors, nothing
overwritten), and two-process DDP (gloo) with an exact resume. FSDP2 needs GPUs (see the gpu test).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "recipes"
PRETRAIN = RECIPES / "pretrain.py"
sys.path.insert(0, str(RECIPES))

import pretrain  # noqa: E402
from pretrain_config import ConfigError, PretrainConfig, load_config, parse_override  # noqa: E402
from pretrain_data import DataError  # noqa: E402

# A few-second model: 2+2 layers of width 64 on rows of at most 64 encoder tokens.
TINY = [
    "model.config={d_model: 64, d_kv: 16, num_heads: 4, d_ff: 128, num_layers: 2, num_decoder_layers: 2, "
    "feed_forward_proj: gated-gelu, dropout_rate: 0.0}",
    "data.max_input_length=64",
    "training.per_device_batch_size=4",
    "training.eval_batches=2",
    "logging.log_with=[]",
    "logging.progress_bar=false",
    "logging.logging_steps=1",
    "optim.warmup_steps=2",
]


def tiny_config(output_dir: Path, *overrides: str) -> PretrainConfig:
    """The tiny run in this process, on the CPU on any machine (the exact-resume guarantees are the CPU's)."""
    return load_config(None, [*TINY, "training.cpu=true", f"training.output_dir={output_dir}", *overrides])


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / pretrain.TRAIN_LOG_FILE).read_text().splitlines()]


def train_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(output_dir) if "loss" in r}


def subprocess_env(cpu_only: bool = False) -> dict[str, str]:
    """The recipe's environment; ``cpu_only`` hides the GPUs (the CPU tests' launches, e.g. two gloo processes,
    which `accelerate launch --multi_gpu` would otherwise place on a visible GPU)."""
    env = dict(os.environ)
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "kernels"), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------------------------- configuration


def test_defaults_are_the_embedded_tiny_cpu_run():
    config = load_config()
    assert config.model.config["d_model"] == 128 and config.training.max_steps == 300
    for path in [config.data.tokenizer, *config.data.train_files, *config.data.eval_files]:
        assert Path(path).exists(), f"the embedded default run needs {path}, shipped in the repository"
    assert config.training.mixed_precision is None  # from accelerate's config / CLI; "no" on a bare CPU run


def test_overrides_parse_yaml_values_and_nested_keys():
    config = load_config(
        None,
        [
            "training.max_steps=12",
            "lr=0.002",  # unambiguous without its section
            "data.train_files=[a.jsonl, b.jsonl]",
            "model.config.dropout_rate=0.1",
            "training.mixed_precision=bf16",
            "training.max_grad_norm=null",
        ],
    )
    assert config.training.max_steps == 12 and config.optim.lr == 0.002
    assert config.data.train_files == ["a.jsonl", "b.jsonl"]
    assert config.model.config["dropout_rate"] == 0.1 and config.model.config["d_model"] == 128
    assert config.training.mixed_precision == "bf16" and config.training.max_grad_norm is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_stepz=3", r"did you mean training\.max_steps\?\); valid keys of 'training'"),
        ("max_stepz=3", r"did you mean training\.max_steps\?\); valid keys"),
        ("model.config.num_headz=2", r"model\.config\.num_headz is not a FAT5Config field \(did you mean model"),
        ("model.config={d_modle: 64}", r"model\.config\.d_modle .*did you mean model\.config\.d_model\?"),
        ("optimizer.lr=1", "valid sections"),
        ("training.max_steps=ten", "expected an integer"),
        ("training.max_steps=0", "must be > 0"),
        ("training.mixed_precision=fp64", "mixed_precision"),
        ("training.push_to_hub=true", "hub_model_id"),
        ("max_steps", "section.key=value"),
        ("model.torch_compile_mode=fast", "torch_compile_mode must be one of"),
        ("model.torch_compile_mode=reduce-overhead", "also set model.torch_compile=true"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"training": {"max_steps": 3, "batch_size": 8}}))
    with pytest.raises(ConfigError, match="training.batch_size.*per_device_batch_size"):
        load_config(path)


def test_misspelt_model_config_key_in_yaml_is_refused_before_writing(tmp_path, capsys):
    """`PreTrainedConfig` keeps any keyword: a typo would train with the default and land in config.json."""
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"model": {"config": {"d_model": 64, "num_headz": 2}}}))
    output_dir = tmp_path / "run"
    assert pretrain.main(["--config", str(path), f"training.output_dir={output_dir}"]) == 2
    assert "did you mean model.config.num_heads?" in capsys.readouterr().err
    assert not output_dir.exists()
    # Aliases (T5's attribute_map) and tie_word_embeddings are accepted.
    config = load_config(None, ["model.config.hidden_size=64", "model.config.tie_word_embeddings=false"])
    assert config.model.config["hidden_size"] == 64


class _VocabOnly:
    """Stands for a 32,768-token tokenizer where only its size and special ids matter (T5 layout)."""

    pad_token_id, eos_token_id = 0, 1

    def __len__(self):
        return 32768


def test_shipped_configs_load():
    for name, millions in (("pretrain-fat5-small.yaml", 147), ("pretrain-fat5-base.yaml", 249)):
        config = load_config(RECIPES / "configs" / name)
        assert config.data.dataset_name and not config.data.train_files and not config.data.eval_files
        assert config.training.mixed_precision == "bf16"
        # The model the recipe builds (every model field is a real FAT5Config field), on the meta device: FAT5-small
        # is CATIE's 147M-parameter shape, with its own LM head (tie_word_embeddings: false).
        with torch.device("meta"):
            model = pretrain.build_model(config, _VocabOnly())
        assert model.config.z_loss > 0 and model.config.vocab_size == 32768
        assert model.config.residual_dtype == "bfloat16"  # T5X's bf16 residual stream under bf16 autocast
        assert model.lm_head.weight is not model.shared.weight and not model.config.scale_decoder_outputs
        assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions, name
    fsdp = yaml.safe_load((RECIPES / "configs" / "accelerate-fsdp2.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    # Wrapping each block (and only blocks) keeps the shared embedding / LM head in the root unit.
    from fat5_hf import modeling_fat5

    assert hasattr(modeling_fat5, fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"])
    # Accelerate's own loader accepts every shipped accelerate config (unknown keys or values would fail here).
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"accelerate-ddp.yaml": "MULTI_GPU", "accelerate-fsdp2.yaml": "FSDP", "accelerate-deepspeed-zero2.yaml":
                "DEEPSPEED"}  # fmt: skip
    for name, distributed_type in expected.items():
        loaded = load_config_from_file(str(RECIPES / "configs" / name))
        assert loaded.distributed_type.value == distributed_type and loaded.mixed_precision == "bf16"


def _deepspeed_launch_env(config_file: Path) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch --config_file <config_file>` gives each DeepSpeed process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), str(PRETRAIN)])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    return {key: value for key, value in env.items() if key.startswith("ACCELERATE_")}


def _deepspeed_accelerator(monkeypatch, config_file: Path, config: PretrainConfig):
    """What Accelerator(...) would hold in a process launched with a DeepSpeed config (DeepSpeed itself is not
    needed to build its plugin, but is to build the Accelerator, so this stands in for it)."""
    import types

    from accelerate.utils import DeepSpeedPlugin, DistributedType
    from accelerate.utils.environment import parse_choice_from_env

    for key, value in _deepspeed_launch_env(config_file).items():
        monkeypatch.setenv(key, value)
    steps = int(parse_choice_from_env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", config.training.gradient_accumulation_steps))
    return types.SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, gradient_accumulation_steps=steps, num_processes=8,
        state=types.SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin()),
    )  # fmt: skip


def test_deepspeed_config_is_completed_from_the_recipe(monkeypatch, tmp_path):
    """accelerate-deepspeed-zero2.yaml: the recipe sets the per-GPU batch (Accelerate would read it from a
    DataLoader, and fails at prepare without one), accumulation and clipping; refuses adamw_scale and a DeepSpeed
    accumulation that differs from the recipe's."""
    shipped = RECIPES / "configs" / "accelerate-deepspeed-zero2.yaml"
    overrides = ["training.per_device_batch_size=32", "training.gradient_accumulation_steps=2",
                 "training.max_grad_norm=0.5"]  # fmt: skip
    config = load_config(None, ["optim.name=adamw", *overrides])
    accelerator = _deepspeed_accelerator(monkeypatch, shipped, config)
    assert accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
    pretrain.check_accelerate_setup(accelerator, config)
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert ds_config["zero_optimization"]["stage"] == 2
    assert ds_config["train_micro_batch_size_per_gpu"] == 32 and ds_config["train_batch_size"] == 32 * 2 * 8
    assert ds_config["gradient_accumulation_steps"] == 2 and ds_config["gradient_clipping"] == 0.5

    with pytest.raises(pretrain.RecipeError, match="optim.name=adamw with DeepSpeed"):
        pretrain.check_accelerate_setup(accelerator, load_config(None, ["optim.name=adamw_scale", *overrides]))
    # A DeepSpeed config that fixes the accumulation (as this file did) would make the loop step on every batch.
    pinned = tmp_path / "pinned.yaml"
    data = yaml.safe_load(shipped.read_text())
    data["deepspeed_config"]["gradient_accumulation_steps"] = 1
    pinned.write_text(yaml.safe_dump(data))
    accelerator = _deepspeed_accelerator(monkeypatch, pinned, config)
    with pytest.raises(pretrain.RecipeError, match="gradient_accumulation_steps=1.*training.gradient_accumulation"):
        pretrain.check_accelerate_setup(accelerator, config)


def test_denoiser_mixture_is_configurable():
    """data.denoisers: "ul2", "t5" or a list of DenoiserSpec fields (span length, rate, weight, mode token)."""
    tokenizer = pretrain.load_tokenizer(load_config())
    custom = load_config(
        None,
        ['data.denoisers=[{name: R5, mode_token: "[R]", mean_span_length: 5, corruption_rate: 0.2, weight: 3}, '
         '{name: S, mode_token: "[S]", mean_span_length: 1, corruption_rate: 0.5, weight: 1, prefix_lm: true}]'],
    )  # fmt: skip
    collator = pretrain.build_collator(custom, tokenizer, seed=0)
    assert [(d.name, d.mean_span_length, d.corruption_rate, d.prefix_lm) for d in collator.denoisers] == [
        ("R5", 5.0, 0.2, False), ("S", 1.0, 0.5, True)
    ]  # fmt: skip
    assert collator.denoiser_probabilities.tolist() == [0.75, 0.25]
    assert [ids[0] for ids in collator.mode_token_ids] == tokenizer.convert_tokens_to_ids(["[R]", "[S]"])
    assert [d.name for d in pretrain.build_denoisers(load_config(None, ["data.denoisers=t5"]))] == ["T5"]
    assert len(pretrain.build_denoisers(load_config())) == 7  # R, R, X, X, X, X, S
    for bad, message in [
        ('data.denoisers=[{name: R, mode_token: "[R]", span: 3, corruption_rate: 0.15, weight: 1}]', "fields: name"),
        ('data.denoisers=[{name: R, mode_token: "[R]", mean_span_length: 3, corruption_rate: 1.5, weight: 1}]',
         "corruption_rate"),
        ('data.denoisers=[{name: Z, mode_token: "[Z]", mean_span_length: 3, corruption_rate: 0.15, weight: 1}]',
         r"Mode token '\[Z\]' is not a special token"),
        ("data.denoisers=ul3", "must be"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            pretrain.build_collator(load_config(None, [bad]), tokenizer, seed=0)


def test_evaluation_batches_mix_the_denoisers():
    """With `group_denoisers_by_length` a training batch draws its denoisers from one length group, the evaluation
    batches still mix them all (an evaluation loss over the whole mixture, comparable across runs)."""
    config = load_config(None, ["data.collator_kwargs={group_denoisers_by_length: true}"])
    tokenizer = pretrain.load_tokenizer(config)
    assert pretrain.build_collator(config, tokenizer, seed=0).group_denoisers_by_length
    assert not pretrain.build_collator(config, tokenizer, seed=0, evaluation=True).group_denoisers_by_length
    assert config.data.collator_kwargs == {"group_denoisers_by_length": True}  # the config is left as it was
    accelerator = SimpleNamespace(
        process_index=0, num_processes=1, is_main_process=True, main_process_first=contextlib.nullcontext
    )
    _, eval_batches = pretrain.build_data(config, tokenizer, accelerator)
    _, mixed_eval_batches = pretrain.build_data(load_config(), tokenizer, accelerator)
    assert len(eval_batches) == len(mixed_eval_batches) > 0
    for batch, mixed in zip(eval_batches, mixed_eval_batches):
        assert batch.keys() == mixed.keys() and all(torch.equal(batch[key], mixed[key]) for key in batch)


def test_resume_mismatches_ignore_only_mutable_fields():
    from pretrain_config import resume_mismatches

    saved = load_config(None, ["training.max_steps=10"]).to_dict()
    assert (
        resume_mismatches(saved, load_config(None, ["training.max_steps=20", "logging.logging_steps=5"]).to_dict())
        == []
    )
    changed = load_config(None, ["optim.lr=0.5"]).to_dict()
    assert [m.split(":")[0] for m in resume_mismatches(saved, changed)] == ["optim.lr"]


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """40 steps of the tiny model (z-loss on, progress bar captured): the loss must fall clearly; shared by the
    checks on its outputs."""
    import contextlib
    import io

    output_dir = tmp_path_factory.mktemp("pretrain") / "run"
    config = tiny_config(
        output_dir,
        "training.max_steps=40",
        "training.eval_steps=20",
        "training.save_steps=20",
        "optim.lr=0.01",
        "model.config.z_loss=1.0e-4",
        "logging.log_with=[tensorboard]",
        "logging.progress_bar=true",
    )
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # tqdm writes to sys.stderr as it is when the bar is created
        summary = pretrain.train(config)
    return output_dir, summary, stderr.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_trains_to_the_eager_losses(tmp_path, mode):
    """`model.torch_compile=true` (Inductor, here on the CPU) over packed UL2 batches: the same losses as eager, step
    for step (it once failed at the first backward: the compiled loss had no graph). With two micro-batches a step,
    the CUDA-graph mode's handling (step marks, gradients kept allocated and zeroed) must accumulate exactly as
    eager; Inductor captures no graphs on a CPU, see the GPU test for the replays."""
    import contextlib
    import io

    common = ("training.max_steps=3", "training.eval_steps=3", "training.save_steps=100",
              "training.gradient_accumulation_steps=2")  # fmt: skip
    pretrain.train(tiny_config(tmp_path / "eager", *common))
    compile_options = ("model.torch_compile=true", f"model.torch_compile_mode={mode}")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        pretrain.train(tiny_config(tmp_path / "compiled", *common, *compile_options))
    label = "torch.compile" if mode == "default" else f"torch.compile {mode}"
    assert f"mixed precision no, {label})" in stdout.getvalue()
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-5), step


def test_loss_decreases_and_eval_runs(short_run):
    output_dir, summary, _ = short_run
    losses = train_losses(output_dir)
    assert sorted(losses) == list(range(1, 41))
    assert all(map(lambda v: v == v and v < 1e4, losses.values())), "non-finite training loss"
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, f"loss went from {first:.3f} to {last:.3f}"
    evals = [r for r in read_log(output_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] and "->" in evals[1]["sample"]
    assert summary["step"] == 40 and not summary["stopped_early"]
    assert list((output_dir / "logs").rglob("events.out.tfevents*")), "no TensorBoard event file"


def test_saved_model_loads_for_finetuning(short_run):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import fat5_hf  # noqa: F401  (registers FAT5 with the Auto classes)

    output_dir, _, _ = short_run
    model = AutoModelForSeq2SeqLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert type(model).__name__ == "FAT5ForConditionalGeneration"
    assert model.config.vocab_size >= len(tokenizer)
    # off while the recipe trains (its collator emits only tokenizer ids), on again for users of the saved model
    assert model.config.check_token_ids and model.get_encoder().config.check_token_ids
    # the model card: Hub metadata and what this run did
    from huggingface_hub import ModelCard

    card = ModelCard.load(output_dir / "README.md")
    assert (
        card.data.language == "fr" and card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    )
    assert "custom_code" in card.data.tags
    assert "40 optimizer steps" in card.text and "UL2 mixture of denoisers" in card.text
    final_eval = [r for r in read_log(output_dir) if "eval_loss" in r][-1]["eval_loss"]
    assert f"Final evaluation loss (held-out text, same denoisers): {final_eval:.4f}" in card.text
    inputs = tokenizer(["Le marché du samedi <extra_id_0> de l'église."], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == 1 and generated.shape[1] <= 6
    # Checkpoints: the last two (save_total_limit=2) with the recipe state, written atomically.
    checkpoints = pretrain.checkpoint_dirs(output_dir)
    assert [p.name for p in checkpoints] == ["step_00000020", "step_00000040"]
    assert not list((output_dir / pretrain.CHECKPOINTS_DIR).glob("*.tmp"))
    # accelerator.save_state: model, optimizer, RNG states, then the registered objects in order (the schedule,
    # then the recipe's TrainState with each process's data-stream position)
    names = {p.name for p in checkpoints[-1].iterdir()}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", pretrain.RECIPE_STATE_FILE} <= names
    schedule = torch.load(checkpoints[-1] / "custom_checkpoint_0.pkl", weights_only=False)
    assert schedule["last_epoch"] == 40 and schedule["_step_count"] == 41
    train_state = torch.load(checkpoints[-1] / "custom_checkpoint_1.pkl", weights_only=False)
    assert train_state["step"] == 40 and train_state["samples_seen"] == 160
    (stream,) = train_state["data_streams"]
    assert stream["documents"]["epoch"] >= 0 and "cursor" in stream["documents"] and "seed" in stream["collator"]
    assert "pending" in stream["packer"] and stream["batches_drawn"] > 0
    # The export carries the model code and an auto_map: loadable with trust_remote_code where fat5-hf is absent.
    exported = json.loads((output_dir / "config.json").read_text())
    assert exported["auto_map"]["AutoModelForSeq2SeqLM"].startswith("modeling_fat5.")
    assert (output_dir / "modeling_fat5.py").is_file() and (output_dir / "configuration_fat5.py").is_file()


def test_progress_bar_shows_loss_throughput_and_eta(short_run):
    _, _, stderr = short_run
    final = stderr.replace("\r", "\n").splitlines()
    bar = [line for line in final if line.startswith("pretrain:") and "40/40" in line][-1]
    # tqdm: "pretrain: 100%|...| 40/40 [00:03<00:00, 11.2step/s, loss=..., lr=..., tok_s=...]": elapsed<ETA
    assert re.search(r"40/40 \[\d\d:\d\d<\d\d:\d\d", bar), bar
    assert re.search(r"loss=\d+\.\d{4}", bar) and re.search(r"tok_s=[\d,]+", bar), bar


def test_tensorboard_and_log_get_losses_z_loss_and_eval(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, _, _ = short_run
    # accelerate's tracker writes the hyperparameters to an event file of their own: take the one with the scalars
    accumulators = [EventAccumulator(str(f)).Reload() for f in (output_dir / "logs").rglob("events.out.tfevents*")]
    (events,) = [a for a in accumulators if a.Tags()["scalars"]]
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/z_loss", "train/grad_norm", "eval/loss"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 41))
    assert [e.step for e in events.Scalars("eval/loss")] == [20, 40]
    records = [r for r in read_log(output_dir) if "loss" in r]
    # z-loss (model.config.z_loss=1e-4) is logged on its own; it is a small positive part of the loss
    assert all(0 < r["z_loss"] < 0.01 * r["loss"] for r in records)
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in records)
    assert events.Scalars("train/loss")[-1].value == pytest.approx(records[-1]["loss"], rel=1e-6)


def test_default_config_trains_on_the_shipped_corpus(tmp_path):
    """The embedded default (model, tokenizer, corpus, lengths, batch) as `python recipes/pretrain.py` runs it,
    shortened to 6 steps: trains, evaluates on the shipped validation file and exports."""
    output_dir = tmp_path / "run"
    config = load_config(
        None,
        [f"training.output_dir={output_dir}", "training.max_steps=6", "training.eval_steps=6", "optim.warmup_steps=2",
         "training.save_steps=100", "logging.log_with=[]", "logging.progress_bar=false"],
    )  # fmt: skip
    assert config.model == PretrainConfig().model and config.data == PretrainConfig().data
    summary = pretrain.train(config)
    assert summary["step"] == 6 and summary["eval_loss"] == summary["eval_loss"]
    assert sorted(train_losses(output_dir)) == [5, 6] or sorted(train_losses(output_dir)) == [6]
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "tokenizer.json").is_file()


def test_untied_lm_head_trains_and_exports_untied(tmp_path):
    """tie_word_embeddings: false gives a separate LM head (transformers 5's config alone would tie it), trained,
    saved beside the embedding and loaded untied."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    import fat5_hf  # noqa: F401

    output_dir = tmp_path / "run"
    pretrain.train(
        tiny_config(output_dir, "model.config.tie_word_embeddings=false", "training.max_steps=2",
                    "optim.warmup_steps=1", "training.save_steps=100", "training.eval_steps=100")
    )  # fmt: skip
    weights = load_file(output_dir / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], weights["shared.weight"])
    model = AutoModelForSeq2SeqLM.from_pretrained(output_dir)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"]) and not model.config.scale_decoder_outputs


def test_position_encoding_is_a_model_config_field(tmp_path):
    """`model.config.position_encoding_type=rope` (with its options) trains and exports a RoPE model."""
    from transformers import AutoModelForSeq2SeqLM

    import fat5_hf  # noqa: F401

    output_dir = tmp_path / "run"
    pretrain.train(
        tiny_config(output_dir, "model.config.position_encoding_type=rope", "model.config.rope_fraction=0.5",
                    "training.max_steps=2", "optim.warmup_steps=1", "training.save_steps=100",
                    "training.eval_steps=100")
    )  # fmt: skip
    model = AutoModelForSeq2SeqLM.from_pretrained(output_dir)
    assert model.config.position_encoding_type == "rope" and model.config.rope_fraction == 0.5
    assert model.encoder.block[0].layer[0].SelfAttention.rotary_emb.rotary_dim == 8
    with pytest.raises(ConfigError, match=r"must be one of \['t5', 'alibi', 'rope', 'fire', 'none'\]"):
        pretrain.train(tiny_config(tmp_path / "bad", "model.config.position_encoding_type=rotary"))


def test_gradient_accumulation_clipping_and_optimizer_steps(tmp_path, monkeypatch):
    """4 micro-batches per step: one optimizer step, one schedule step and one clipping per update, and the
    clipped gradient norm is at most training.max_grad_norm."""
    import accelerate

    import fat5_hf.optim

    clip_calls, optimizers = [], []
    original_clip = accelerate.Accelerator.clip_grad_norm_

    def recording_clip(self, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        norm = original_clip(self, parameters, max_norm, norm_type)
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        clip_calls.append((float(norm), float(clipped), max_norm))
        return norm

    original_build = fat5_hf.optim.build_optimizer

    def recording_build(*args, **kwargs):
        optimizers.append(original_build(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(fat5_hf.optim, "build_optimizer", recording_build)
    output_dir = tmp_path / "run"
    pretrain.train(
        tiny_config(
            output_dir, "training.max_steps=3", "training.gradient_accumulation_steps=4", "training.max_grad_norm=0.05",
            "training.save_steps=100", "training.eval_steps=100", "optim.scheduler=linear", "optim.warmup_steps=1",
        )
    )  # fmt: skip
    assert len(clip_calls) == 3, "clipping must run once per optimizer step, after the last micro-batch"
    for norm, clipped, max_norm in clip_calls:
        assert max_norm == 0.05 and norm > max_norm  # the bound is active ...
        assert clipped == pytest.approx(max_norm, rel=1e-3)  # ... and the gradient stepped with is clipped to it
    (optimizer,) = optimizers
    assert {state["step"] for state in optimizer.state.values()} == {3}
    records = [r for r in read_log(output_dir) if "loss" in r]
    assert [r["samples_seen"] for r in records] == [16, 32, 48]  # 4 rows x 4 micro-batches per step
    assert [r["grad_norm"] for r in records] == pytest.approx([c[0] for c in clip_calls])
    # linear schedule, 1 warm-up step, 3 steps: the lr after steps 1, 2, 3
    assert [r["lr"] for r in records] == pytest.approx([0.01, 0.005, 0.0])


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state: a run with another mixed precision needs it reset (before and after)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_on_cpu(tmp_path, monkeypatch, capsys, fresh_accelerator_state):
    """training.mixed_precision=bf16 runs the forward under bf16 autocast and keeps fp32 master weights."""
    seen = []
    original_build = pretrain.build_model

    def build_and_watch(config, tokenizer):
        model = original_build(config, tokenizer)
        model.lm_head.register_forward_hook(
            lambda module, args, output: seen.append((torch.is_autocast_enabled("cpu"), output.dtype))
        )
        return model

    monkeypatch.setattr(pretrain, "build_model", build_and_watch)
    output_dir = tmp_path / "run"
    pretrain.train(
        tiny_config(output_dir, "training.mixed_precision=bf16", "training.max_steps=3", "training.eval_steps=3",
                    "training.save_steps=100")
    )  # fmt: skip
    assert "mixed precision bf16" in capsys.readouterr().out
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen), seen[:3]
    losses = train_losses(output_dir)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(output_dir / "model.safetensors").values()} == {torch.float32}


def test_push_to_hub_uploads_the_export_only(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeHfApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), commit_message=None, **kwargs):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            calls.append(("upload_folder", repo_id, files, list(ignore_patterns)))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    output_dir = tmp_path / "run"
    pretrain.train(
        tiny_config(output_dir, "training.max_steps=2", "optim.warmup_steps=1", "training.save_steps=1",
                    "training.eval_steps=100", "training.push_to_hub=true", "training.hub_model_id=me/fat5-tiny")
    )  # fmt: skip
    assert calls[0] == ("create_repo", "me/fat5-tiny", True, True)
    _, repo_id, files, ignore = calls[1]
    assert repo_id == "me/fat5-tiny" and len(calls) == 2
    # everything the upload sends at the time of the call, minus what the ignore patterns drop
    import fnmatch

    sent = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in ignore)]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "modeling_fat5.py"} <= set(sent)
    assert not [f for f in sent if f.startswith(("checkpoints/", "logs/")) or f == pretrain.TRAIN_LOG_FILE]


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    """8 steps straight == 4 steps, stop, resume 4 (dropout on, gradient accumulation): same losses, same weights."""
    common = [
        "training.max_steps=8",
        "training.save_steps=100",
        "training.eval_steps=100",
        "training.gradient_accumulation_steps=2",
        "model.config.dropout_rate=0.1",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain.train(tiny_config(straight, *common))
    summary = pretrain.train(tiny_config(resumed, *common, "training.stop_at_step=4"))
    assert summary["stopped_early"] and summary["step"] == 4
    assert not (resumed / "model.safetensors").exists(), "an interrupted run must not export a final model"
    # Resumed without the prefetching worker: the batches must not depend on it.
    pretrain.train(tiny_config(resumed, *common, "training.resume=latest", "data.prefetch_batches=0"))

    assert train_losses(straight) == train_losses(resumed)  # exact float equality, every step
    from safetensors.torch import load_file

    final_straight, final_resumed = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert final_straight.keys() == final_resumed.keys()
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_resumed[name]), name


def test_streamed_dataset_resumes_exactly(tmp_path, monkeypatch):
    """The Hub-streaming path (here a local file opened with streaming=True): unshuffled, resume is exact."""
    import datasets

    files = {
        "train": RECIPES / "data" / "fr_corpus_train.jsonl",
        "test": RECIPES / "data" / "fr_corpus_validation.jsonl",
    }

    def load_streamed(name, config_name, split, text_column="text"):
        assert name == "local/fr-corpus"
        stream = datasets.load_dataset("json", data_files=str(files[split]), split="train", streaming=True)
        return stream.select_columns([text_column])

    monkeypatch.setattr(pretrain, "load_streamed_documents", load_streamed)
    common = [
        "data.dataset_name=local/fr-corpus",
        "data.eval_split=test",
        "data.shuffle=false",
        "training.max_steps=6",
        "training.save_steps=100",
        "training.eval_steps=6",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain.train(tiny_config(straight, *common))
    pretrain.train(tiny_config(resumed, *common, "training.stop_at_step=3"))
    state = torch.load(pretrain.checkpoint_dirs(resumed)[-1] / "custom_checkpoint_1.pkl", weights_only=False)
    assert "stream" in state["data_streams"][0]["documents"]  # the datasets stream position is what was saved
    pretrain.train(tiny_config(resumed, *common, "training.resume=latest"))
    assert train_losses(straight) == train_losses(resumed)
    assert any("eval_loss" in r for r in read_log(straight))


def test_sigterm_writes_checkpoint_and_resumes_exactly(tmp_path):
    """SIGTERM mid-run to every process of the run, as a scheduler's preemption sends it (a subprocess in its own
    process group, with its data worker): checkpoint, exit 0, no export; resumed, the next steps have bit for bit
    the losses of an uninterrupted run (dropout on, so the RNG states matter too)."""
    output_dir = tmp_path / "run"
    common = [*TINY, "training.cpu=true", "training.max_steps=100000", "training.save_steps=100000",
              "model.config.dropout_rate=0.1"]  # fmt: skip
    args = [*common, f"training.output_dir={output_dir}"]
    process = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *args],
        env=subprocess_env(cpu_only=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log = output_dir / pretrain.TRAIN_LOG_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, f"the run ended before SIGTERM:\n{process.communicate()[0][-3000:]}"
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "Stopped by SIGTERM" in output
    checkpoints = pretrain.checkpoint_dirs(output_dir)
    assert len(checkpoints) == 1
    step = json.loads((checkpoints[0] / pretrain.RECIPE_STATE_FILE).read_text())["step"]
    assert step == max(train_losses(output_dir)) >= 2
    assert not (output_dir / "model.safetensors").exists()

    # Resume 3 more steps here, and run the same 3 + step steps uninterrupted, single-threaded like the subprocess.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pause = f"training.stop_at_step={step + 3}"
        pretrain.train(load_config(None, [*args, "training.resume=latest", pause]))
        straight = tmp_path / "straight"
        pretrain.train(load_config(None, [*common, f"training.output_dir={straight}", pause]))
    finally:
        torch.set_num_threads(threads)
    assert sorted(train_losses(output_dir)) == list(range(1, step + 4))
    assert train_losses(output_dir) == train_losses(straight)

    # The checkpoint resumes with another training.max_steps too (the schedule then spans the new length).
    summary = pretrain.train(load_config(None, [*args, f"training.max_steps={step + 5}", "training.resume=latest"]))
    assert summary["step"] == step + 5 and (output_dir / "model.safetensors").is_file()


def test_prefetching_stream_hands_out_states_in_order_and_raises_producer_errors():
    from pretrain_data import PrefetchingBatchStream

    class Counter:
        def __init__(self, fail_at=None):
            self.position, self.fail_at = 0, fail_at

        def __next__(self):
            if self.position == self.fail_at:
                raise DataError("bad row")
            self.position += 1
            return {"x": torch.tensor([self.position])}

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, state):
            self.position = state["position"]

    stream = PrefetchingBatchStream(Counter(), depth=3)
    assert [int(next(stream)["x"]) for _ in range(2)] == [1, 2]
    assert stream.state_dict() == {"position": 2}  # the producer is ahead; the state is the consumer's
    stream.load_state_dict({"position": 10})
    assert int(next(stream)["x"]) == 11
    stream.close()
    failing = PrefetchingBatchStream(Counter(fail_at=1), depth=2)
    next(failing)
    with pytest.raises(DataError, match="bad row"):
        next(failing)


# ---------------------------------------------------------------------------------------------- bad inputs


def test_bad_data_files(tmp_path):
    with pytest.raises(DataError, match="not found.*missing.jsonl"):
        pretrain.train(tiny_config(tmp_path / "a", f"data.train_files=[{tmp_path / 'missing.jsonl'}]"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        pretrain.train(tiny_config(tmp_path / "b", f"data.train_files=[{empty}]"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(DataError, match="no non-empty document"):
        pretrain.train(tiny_config(tmp_path / "c", f"data.train_files=[{blank}]"))
    wrong_column = tmp_path / "other.jsonl"
    wrong_column.write_text('{"content": "Bonjour"}\n')
    with pytest.raises(DataError, match="no column 'text'.*data.text_column"):
        pretrain.train(tiny_config(tmp_path / "d", f"data.train_files=[{wrong_column}]"))


def test_tokenizer_that_does_not_match_the_model(tmp_path):
    with pytest.raises(pretrain.RecipeError, match="has .* tokens but the model's vocabulary holds 100"):
        pretrain.train(tiny_config(tmp_path / "run", "model.config.vocab_size=100"))


def test_lengths_the_denoisers_cannot_fill(tmp_path):
    with pytest.raises(ConfigError, match="max_input_length=3"):
        pretrain.train(tiny_config(tmp_path / "run", "data.max_input_length=3"))


def test_output_dir_is_never_overwritten_silently(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "precious.txt").write_text("keep me")
    with pytest.raises(pretrain.OutputDirNotEmptyError, match="not empty.*overwrite_output_dir"):
        pretrain.train(tiny_config(output_dir))
    assert sorted(p.name for p in output_dir.iterdir()) == ["precious.txt"]


def test_unwritable_output_dir(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(pretrain.RecipeError, match="Cannot write to training.output_dir"):
        pretrain.train(tiny_config(a_file / "run"))


def test_resume_refuses_another_config_and_missing_checkpoints(short_run, tmp_path):
    output_dir, _, _ = short_run
    before = sorted(str(p) for p in output_dir.rglob("*"))
    other = tiny_config(
        output_dir, "training.max_steps=60", "optim.lr=0.02", "training.resume=latest", "training.eval_steps=20"
    )
    with pytest.raises(pretrain.RecipeError, match=r"another configuration(.|\n)*optim.lr"):
        pretrain.train(other)
    assert sorted(str(p) for p in output_dir.rglob("*")) == before
    with pytest.raises(pretrain.RecipeError, match="no checkpoint"):
        pretrain.train(tiny_config(tmp_path / "empty", "training.resume=latest"))
    with pytest.raises(pretrain.RecipeError, match="not a checkpoint of this recipe"):
        pretrain.train(tiny_config(tmp_path / "x", f"training.resume={tmp_path}"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "bad_input, error, message",
    [
        ("data.train_files=[{tmp}/missing.jsonl]", DataError, "not found"),
        ("data.train_files=[{tmp}/empty.jsonl]", DataError, "empty"),
        ("model.config.vocab_size=100", pretrain.RecipeError, "vocabulary holds 100"),
        ("data.max_input_length=3", ConfigError, "cannot fill"),
        ("data.max_target_length=2", ConfigError, "cannot fill"),
        ("data.tokenizer={tmp}/no-tokenizer", pretrain.RecipeError, "Cannot load the tokenizer"),
    ],
    ids=["missing-file", "empty-file", "vocab-mismatch", "input-too-short", "target-too-short", "no-tokenizer"],
)
def test_bad_input_leaves_the_output_dir_as_it_was(tmp_path, bad_input, error, message):
    """Inputs are checked before the output folder is created or emptied: a new folder is not created (so the
    corrected rerun is not refused as "not empty"), and a previous run is kept even with overwrite_output_dir."""
    (tmp_path / "empty.jsonl").write_text("")
    bad = bad_input.format(tmp=tmp_path)
    new_dir = tmp_path / "new" / "run"
    with pytest.raises(error, match=message):
        pretrain.train(tiny_config(new_dir, bad))
    assert not new_dir.parent.exists()

    previous = tmp_path / "previous"
    checkpoint = previous / pretrain.CHECKPOINTS_DIR / "step_00000005"
    checkpoint.mkdir(parents=True)
    (checkpoint / pretrain.RECIPE_STATE_FILE).write_text('{"step": 5}')
    (previous / pretrain.TRAIN_LOG_FILE).write_text('{"step": 5, "loss": 3.0}\n')
    (previous / "model.safetensors").write_bytes(b"weights")
    before = _snapshot(previous)
    with pytest.raises(error, match=message):
        pretrain.train(tiny_config(previous, bad, "training.overwrite_output_dir=true"))
    assert _snapshot(previous) == before


def test_resume_with_another_number_of_processes_is_refused_before_writing(short_run, tmp_path):
    import shutil

    output_dir = tmp_path / "copy"
    shutil.copytree(short_run[0], output_dir)
    state_file = pretrain.checkpoint_dirs(output_dir)[-1] / pretrain.RECIPE_STATE_FILE
    state = json.loads(state_file.read_text())
    state["num_processes"] = 2
    state_file.write_text(json.dumps(state))
    before = _snapshot(output_dir)
    config = tiny_config(
        output_dir, "training.max_steps=60", "training.eval_steps=20", "training.save_steps=20", "optim.lr=0.01",
        "model.config.z_loss=1.0e-4", "logging.log_with=[tensorboard]", "logging.progress_bar=true",
        "training.resume=latest",
    )  # fmt: skip
    with pytest.raises(pretrain.RecipeError, match="written by 2 processes.*Resume with 2 processes"):
        pretrain.train(config)
    assert _snapshot(output_dir) == before


def test_main_reports_errors_without_traceback(tmp_path, capsys):
    assert pretrain.main([*TINY, "training.max_stepz=1"]) == 2
    assert "error: " in capsys.readouterr().err
    assert pretrain.main(["--print-config", "training.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- multi-process


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(nprocs: int, output_dir: Path, *overrides: str, config_file: Path | None = None) -> str:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        command += ["--config_file", str(config_file)]
    else:
        command += ["--multi_gpu"] if nprocs > 1 else []
        command += ["--num_processes", str(nprocs), "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(PRETRAIN), *TINY]
    command += [f"training.output_dir={output_dir}", *overrides]
    env = subprocess_env(cpu_only="training.cpu=true" in overrides)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_resumes_exactly(tmp_path):
    common = ["training.cpu=true", "training.max_steps=4", "training.save_steps=100", "training.eval_steps=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    output = _launch(2, straight, *common)
    assert "on 2 process(es) (MULTI_CPU" in output
    _launch(2, resumed, *common, "training.stop_at_step=2")
    checkpoint = pretrain.checkpoint_dirs(resumed)[-1]
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    _launch(2, resumed, *common, "training.resume=latest")
    assert train_losses(straight) == train_losses(resumed)
    records = read_log(straight)
    # Each step reads 4 rows per process from disjoint shares of the data.
    assert [r["samples_seen"] for r in records if "loss" in r] == [8, 16, 24, 32]
    assert any("eval_loss" in r for r in records) and (straight / "model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_two_processes_stop_together_on_bad_data(tmp_path):
    """A data error met by the process that loads first releases the others, which meet it too: every process
    reports the clear message (before, the others were blocked in a barrier and killed by the launcher) and no
    output folder is created."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), str(PRETRAIN), *TINY, "training.cpu=true", f"training.output_dir={tmp_path / 'run'}",
               f"data.train_files=[{tmp_path / 'missing.jsonl'}]"]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env(cpu_only=True), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("pretrain.py: error: Data files not found") == 2, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.slow
def test_ddp_two_gpus_bf16(tmp_path):
    """DDP over 2 GPUs with bf16 autocast and the Triton kernels: trains, resumes exactly, exports."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    config_file = RECIPES / "configs" / "accelerate-ddp.yaml"
    common = ["training.max_steps=6", "training.save_steps=100", "training.eval_steps=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    output = _launch(2, straight, *common, config_file=config_file)
    assert "on 2 process(es) (MULTI_GPU, cuda, mixed precision bf16)" in output
    _launch(2, resumed, *common, "training.stop_at_step=3", config_file=config_file)
    _launch(2, resumed, *common, "training.resume=latest", config_file=config_file)
    losses = train_losses(straight)
    assert sorted(losses) == list(range(1, 7)) and all(v == v for v in losses.values())
    # Same batches and states after the resume; GPU reductions may differ in the last bits between launches.
    resumed_losses = train_losses(resumed)
    for step, loss in losses.items():
        assert resumed_losses[step] == pytest.approx(loss, rel=1e-3), step


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_one_gpu_bf16_matches_eager(tmp_path, mode):
    """`model.torch_compile=true` (Inductor) over the Triton kernels on packed UL2 rows in bf16, two micro-batches a
    step: trains to the eager run's losses. In `reduce-overhead` mode with one padded batch shape the steps replay
    as CUDA graphs (it once failed at the second backward: `.grad` held a graph output that the next replay
    overwrote)."""
    common = ["training.max_steps=6", "training.save_steps=100", "training.eval_steps=6",
              "training.mixed_precision=bf16", "training.gradient_accumulation_steps=2",
              "data.collator_kwargs={pad_to_multiple_of: 64}"]  # fmt: skip
    _launch(1, tmp_path / "eager", *common)
    output = _launch(1, tmp_path / "compiled", *common, "model.torch_compile=true", f"model.torch_compile_mode={mode}")
    label = "torch.compile" if mode == "default" else f"torch.compile {mode}"
    assert "on 1 process(es)" in output and f"mixed precision bf16, {label})" in output
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, 7))
    for step, loss in eager.items():  # inductor fuses the elementwise work differently: last bits differ
        assert compiled[step] == pytest.approx(loss, rel=2e-2), step


@pytest.mark.gpu
@pytest.mark.slow
def test_fsdp2_two_gpus(tmp_path):
    """FSDP2 (blocks sharded, shared embedding in the root unit) trains, evaluates with generate, exports."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    output = _launch(
        2,
        tmp_path / "run",
        "training.max_steps=6",
        "training.save_steps=3",
        "training.eval_steps=3",
        config_file=RECIPES / "configs" / "accelerate-fsdp2.yaml",
    )
    assert "on 2 process(es) (FSDP" in output
    from transformers import AutoModelForSeq2SeqLM

    import fat5_hf  # noqa: F401

    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run")
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 7)) and all(v == v for v in losses.values())


def test_parse_override_rejects_non_mapping_nested_key():
    config = PretrainConfig()
    with pytest.raises(ConfigError, match="not a mapping"):
        parse_override(config, "training.max_steps.x=1")


def test_segment_ids_keep_attention_within_documents():
    """data.collator_kwargs={return_segment_ids: true}: packed rows carry their documents' segment ids, which the
    model uses to keep attention (and each target's cross-attention) within its document."""
    from pretrain_data import DocumentStream, UL2BatchStream, load_local_documents, tokenize_documents

    config = load_config(None, ["data.collator_kwargs={return_segment_ids: true}"])
    tokenizer = pretrain.load_tokenizer(config)
    collator = pretrain.build_collator(config, tokenizer, seed=0)
    documents = tokenize_documents(load_local_documents(config.data.train_files), tokenizer)
    batch = next(UL2BatchStream(DocumentStream(documents, seed=0), collator, batch_size=8))
    assert batch["encoder_segment_ids"].amax() > 1  # several documents in a row: the case that matters
    model = pretrain.build_model(config, tokenizer).eval()
    with torch.no_grad():
        within = model(**batch).loss
        across = model(**{k: v for k, v in batch.items() if not k.endswith("_segment_ids")}).loss
    assert torch.isfinite(within) and not torch.isclose(within, across)
