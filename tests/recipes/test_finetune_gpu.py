"""The finetuning recipe on a GPU: one task per type, full and LoRA, with the Triton kernels on, bf16 and
``torch_compile=True``. The loss must fall, the metrics be written, and the kernels be called (the attention
kernel's entry points in ``fat5_hf.kernel_ops`` are counted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "recipes"
FIXTURES = RECIPES / "data" / "finetune"
sys.path.insert(0, str(RECIPES))

import finetune  # noqa: E402

pytestmark = pytest.mark.gpu

# Widths the kernels take (d_kv 64), small enough for seconds per run.
GPU_BASE = dict(
    d_model=256, d_kv=64, num_heads=4, d_ff=512, num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, tie_word_embeddings=True,
)  # fmt: skip

TASKS = {
    "allocine": ("eval_accuracy", []),
    "french-ner": ("eval_overall_f1", []),
    "french-qa": ("eval_f1", ["--max_seq_length", "128", "--doc_stride", "32"]),
    "orange-sum": ("eval_rougeL", ["--max_target_length", "32", "--generation_max_length", "32"]),
}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

    path = tmp_path_factory.mktemp("base") / "fat5-gpu"
    tokenizer = AutoTokenizer.from_pretrained(RECIPES / "data" / "tokenizer")
    torch.manual_seed(0)
    config = FAT5Config(vocab_size=2048, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.pad_token_id, **GPU_BASE)  # fmt: skip
    assert config.use_triton_attention and config.use_fused_rms_norm and config.use_fused_glu
    FAT5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def attention_kernel_calls(monkeypatch):
    """Counts the calls into the Triton attention (the model reaches it only on its kernel path)."""
    from fat5_hf import kernel_ops

    calls = {"n": 0}
    for name in ("flash_attention", "flash_self_attention_qkvpacked"):
        original = getattr(kernel_ops, name)

        def counting(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel_ops, name, counting)
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_trains_with_kernels_bf16_and_compile(task, lora, base_model, tmp_path, attention_kernel_calls):
    metric, extra = TASKS[task]
    out = tmp_path / f"{task}-{'lora' if lora else 'full'}"
    argv = [
        "--model_name_or_path", str(base_model), "--task", task, "--dataset_path", str(FIXTURES / task),
        "--output_dir", str(out), "--do_train", "--do_eval", "--max_seq_length", "128",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
        "--learning_rate", "3e-3" if lora else "1e-3", "--max_steps", "40", "--warmup_steps", "4",
        "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--bf16", "--torch_compile",
        *(["--lora", "--merge_lora"] if lora else []),
        *extra,
    ]  # fmt: skip
    assert finetune.main(argv) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [r["loss"] for r in state["log_history"] if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert metric in json.loads((out / "eval_results.json").read_text())
    assert attention_kernel_calls["n"] > 0, "the Triton attention was not used"
