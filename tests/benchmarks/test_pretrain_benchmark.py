"""The pretraining benchmark's per-variant batch sizes and report (CPU; the timings themselves need a GPU)."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import results_io

# Loaded under its own name: `pretrain` is also the pretraining recipe, which other tests import by that name.
_spec = importlib.util.spec_from_file_location(
    "pretrain_benchmark", Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain.py"
)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = benchmark
_spec.loader.exec_module(benchmark)


def _args(**overrides):
    fields = dict(batch_size=64, variant_batch_size=[], input_length=512, target_length=512, steps=5, warmup_steps=3,
                  argv=["--batch-size", "64"])  # fmt: skip
    return argparse.Namespace(**{**fields, **overrides})


def test_each_variant_gets_its_own_batch_size_when_given():
    args = _args(variant_batch_size=["fat5_bf16residual_cudagraphs=256"])
    sizes = benchmark.batch_sizes(args, ["t5_compiled", "fat5_bf16residual_cudagraphs"])
    assert sizes == {"t5_compiled": 64, "fat5_bf16residual_cudagraphs": 256}


@pytest.mark.parametrize("spec", ["fat5=256", "t5_compiled=0", "t5_compiled", "t5_compiled=big"])
def test_a_bad_variant_batch_size_names_the_fix(spec):
    with pytest.raises(SystemExit, match="expected VARIANT=N with N >= 1 and VARIANT one of the --variants"):
        benchmark.batch_sizes(_args(variant_batch_size=[spec]), ["t5_compiled"])


def _row(variant, gpus, tokens_per_s, batch_size):
    return dict(variant=variant, gpus=gpus, batch_size=batch_size, step_ms=100.0, tokens_per_s=tokens_per_s,
                peak_memory_GiB=2.0, reserved_memory_GiB=70.0, parameters_M=146.83)  # fmt: skip


def test_table_compares_with_compiled_t5_on_as_many_gpus_and_reports_scaling():
    rows = [_row("t5_compiled", 1, 440_000, 64), _row("fat5_bf16residual_cudagraphs", 1, 880_000, 256),
            _row("t5_compiled", 2, 760_000, 64), _row("fat5_bf16residual_cudagraphs", 2, 1_742_400, 256),
            dict(variant="fat5", gpus=1, batch_size=64, error="OutOfMemoryError: CUDA out of memory")]  # fmt: skip
    lines = results_io.markdown_table(rows, benchmark.columns(rows)).splitlines()
    assert lines[3] == "| fat5_bf16residual_cudagraphs | 1 | 256 | AdamW (fused) | 100.0 | 880,000 | 2.00x |  | 2.0 | 70.0 | 146.83 |"
    assert lines[5] == "| fat5_bf16residual_cudagraphs | 2 | 256 | AdamW (fused) | 100.0 | 1,742,400 | 2.29x | 0.99 | 2.0 | 70.0 | 146.83 |"
    assert lines[6].startswith("| fat5 | 1 | 64 | AdamW (fused) | error: OutOfMemoryError: CUDA out of memory |  |")
    method = benchmark.method(dict(gpus=1), _args())
    assert "Command: `python benchmarks/pretrain.py --batch-size 64`" in method
