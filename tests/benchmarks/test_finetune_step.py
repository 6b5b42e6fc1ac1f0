"""benchmarks/finetune_step.py's case logic on a tiny model on the CPU (the timings themselves need a GPU)."""

import argparse
import importlib.util
import json
import os
import sys

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "finetune_step.py")
_spec = importlib.util.spec_from_file_location("finetune_step_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = benchmark  # its dataclasses look their module up
_spec.loader.exec_module(benchmark)

TINY_SHAPE = dict(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2)
ROW_FIELDS = {"model", "attn_impl", "compile", "enc_len", "dec_len", "batch", "padding", "tokens_per_s", "mfu",
              "peak_GiB"}  # fmt: skip


def _args(**overrides):
    args = benchmark.parse_args(["--device", "cpu", "--steps", "2", "--warmup-steps", "1", "--generate-repeats", "1"])
    args.shape = TINY_SHAPE
    return argparse.Namespace(**{**vars(args), **overrides})


@pytest.mark.slow
def test_training_rows_count_real_tokens_and_share_weights():
    case = benchmark.Case("tiny_train", "train", "base", 24, 10, 3, "mixed")
    providers = ("hf_t5:eager", "hf_t5:sdpa", "hf_t5_patched:sdpa", "fat5")
    rows = benchmark.run_case(case, providers, _args())
    for row in rows:
        assert "error" not in row, row
        assert ROW_FIELDS <= row.keys()
        assert row["tokens_per_s"] > 0 and row["mfu"] is None  # no GPU peak on the CPU
    # same weights, batches and optimizer: the same losses up to bf16 autocast rounding (eager and sdpa differ there)
    losses = [row["final_loss"] for row in rows]
    assert max(losses) - min(losses) < 2e-3 * max(losses), losses
    assert [row["vs_best_hf"] is not None for row in rows] == [True] * 4
    assert {row["lm_loss"] for row in rows} == {"logits"}  # CPU tensors: no loss kernel
    # padded batches: fewer real tokens than rows x lengths, labels -100 on padding
    batch = benchmark.make_batch(benchmark.Case("padded", "train", "base", 64, 40, 8, "mixed"), 96, "cpu", seed=0)
    real = batch["attention_mask"].sum(1)
    assert real.max() == batch["input_ids"].shape[1] and real.min() < real.max()
    assert (batch["labels"] == -100).any()


@pytest.mark.slow
@pytest.mark.interpreter
def test_patched_rows_say_which_loss_ran(monkeypatch):
    """On the kernel path, the patched stock model (by default) and FAT5 train on the fused LM head + loss, the
    `hf_t5_patched_ce` provider on the cross-entropy kernel over logits; all three reach the same loss."""
    import contextlib

    from fat5_hf import kernel_ops

    # fp32: the Triton interpreter computes bf16 arithmetic wrongly; only the loss kernels: interpreted, the others
    # would make the test slow
    monkeypatch.setattr(benchmark, "_autocast", lambda device: contextlib.nullcontext())
    for kernel in ("_triton_t5_flash_attention", "_triton_rms_norm", "_triton_gated_activation",
                   "_triton_gated_activation_packed"):  # fmt: skip
        monkeypatch.setattr(kernel_ops, kernel, None)
    case = benchmark.Case("tiny_train", "train", "base", 12, 6, 2, "mixed")
    with kernel_ops.kernels_on_cpu():
        rows = benchmark.run_case(
            case, ("hf_t5_patched:sdpa", "hf_t5_patched_ce:sdpa", "fat5"), _args(steps=1, batches=1)
        )
    assert [row.get("error") for row in rows] == [None] * 3
    assert [row["lm_loss"] for row in rows] == ["fused", "logits", "fused"]
    losses = [row["final_loss"] for row in rows]
    assert max(losses) - min(losses) < 1e-4 * max(losses), losses


@pytest.mark.slow
def test_trainer_rows_say_which_loss_ran():
    case = benchmark.Case("tiny_trainer", "trainer", "base", 16, 6, 2, "mixed", options={"lora": False})
    rows = benchmark.run_case(case, ("hf_t5:sdpa",), _args())
    assert "error" not in rows[0], rows
    assert rows[0]["lm_loss"] == "logits" and rows[0]["tokens_per_s"] > 0


@pytest.mark.slow
def test_generation_and_encoder_rows():
    generate = benchmark.Case("tiny_generate", "generate", "base", 12, 4, 2, "full", options={"num_beams": 2})
    rows = benchmark.run_case(generate, ("hf_t5:sdpa", "hf_t5_patched:sdpa", "fat5+static_compile"), _args())
    assert all("error" not in row for row in rows), rows
    assert {row["num_beams"] for row in rows} == {2}
    assert {row["decode_attention"] for row in rows} == {"sdpa"}  # the kernels run on CUDA tensors only
    from fat5_hf import kernel_ops

    if kernel_ops.kernel_available("attention"):
        with kernel_ops.kernels_on_cpu():
            providers = ("hf_t5_patched:sdpa", "hf_t5_patched:sdpa_decode", "fat5", "fat5:sdpa_decode")
            rows = benchmark.run_case(generate, providers, _args())
        assert [row["decode_attention"] for row in rows] == ["triton", "sdpa", "triton", "sdpa"], rows
        assert [row.get("vs_fat5") is not None for row in rows] == [True, True, False, False], rows
    encoder = benchmark.Case("tiny_encoder", "encoder", "xxl", 16, 0, 2)
    rows = benchmark.run_case(encoder, ("hf_t5:sdpa", "fat5"), _args())
    assert all("error" not in row and row["tokens_per_s"] > 0 for row in rows), rows


def test_a_failing_configuration_is_an_error_row(monkeypatch, tmp_path):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setitem(benchmark.RUNNERS, "train", out_of_memory)
    case = benchmark.Case("tiny_train", "train", "base", 8, 4, 2)
    rows = benchmark.run_case(case, ("hf_t5:sdpa",), _args())
    assert rows[0]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "tokens_per_s" not in rows[0] and rows[0]["vs_best_hf"] is None
    path = benchmark.write_results(str(tmp_path), {"cases": "tiny_train"}, rows)
    result = json.loads(open(path).read())
    assert set(result) == {"environment", "args", "rows"}
    assert set(result["environment"]) == {"gpu", "gpus", "torch", "cuda", "triton", "transformers", "python", "date",
                                          "commit"}  # fmt: skip
    assert "OutOfMemoryError" in (tmp_path / "finetune_step.md").read_text()


def test_case_selection_and_flops():
    plan = benchmark.selected(_args(cases=None, providers=None))
    assert [case.name for case, _ in plan] == list(benchmark.DEFAULT_PLAN)
    plan = benchmark.selected(_args(cases="train_base_512_114_64_full", providers="fat5,hf_t5:sdpa"))
    assert plan[0][1] == ("hf_t5:sdpa", "fat5")  # the case's order
    assert len(benchmark.selected(_args(cases="all", providers="all"))) == len(benchmark.CASES)
    with pytest.raises(SystemExit, match="unknown case"):
        benchmark.selected(_args(cases="train_base_9_9_9", providers=None))
    with pytest.raises(ValueError, match="unknown provider"):
        benchmark.selected(_args(cases=None, providers="t5x"))
    # 6 x parameters x tokens for the linear layers: one encoder token through the T5 v1.1-base encoder
    shape = benchmark.T5_V1_1_BASE
    flops = benchmark.training_flops({**shape, "num_decoder_layers": 0}, 0, torch.tensor([1]), torch.tensor([0]))
    per_layer = 4 * 768 * 768 + 3 * 768 * 2048
    assert flops == 6 * 12 * per_layer + 3 * 4 * 768 * 12


def test_providers_past_the_deadline_are_skipped_rows():
    case = benchmark.Case("tiny_train", "train", "base", 8, 4, 2)
    rows = benchmark.run_case(case, ("hf_t5:sdpa", "fat5"), _args(deadline=0.0))
    assert [row["error"] for row in rows] == ["skipped: --max-minutes reached"] * 2
    assert [row["model"] for row in rows] == ["hf_t5", "fat5"]
