"""The optimizer benchmark's model, variants and report (CPU; the timings themselves need a GPU)."""

import importlib.util
import os

import results_io
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "optimizer.py")
_spec = importlib.util.spec_from_file_location("optimizer_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def test_model_is_fat5_small_with_its_own_lm_head(monkeypatch):
    monkeypatch.setitem(benchmark.MODEL_CONFIG, "vocab_size", 256)  # the shapes of FAT5-small, a small vocabulary
    params = benchmark.model_parameters("cpu")
    assert len(params) == 282 and all(p.grad is not None and p.grad.shape == p.shape for p in params)
    assert sum(p.numel() for p in params) == 146_832_896 - 2 * (32768 - 256) * 512  # 146.83M with the 32k vocabulary


def test_loop_variant_steps_on_cpu():
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    benchmark.VARIANTS["adamw_scale_loop"]([param]).step()
    assert (param < 1).all()


def test_markdown_row_and_ratio():
    common = dict(tensors=282, parameters=146_833_408, kernels_per_step=15, GB_per_s=2500)
    rows = [
        dict(variant="adamw_scale_fused", step_ms=3.0, host_ms=2.0, gpu_ms=1.5, **common),
        dict(variant="torch_adamw_fused", step_ms=1.5, host_ms=0.8, gpu_ms=1.0, **common),
    ]
    lines = results_io.markdown_table(rows, benchmark.columns(rows)).splitlines()
    assert benchmark.method(rows).startswith("282 tensors, 146.8M parameters.")
    assert lines[-2] == "| adamw_scale_fused | 3.00 | 2.00x | 2.00 | 1.50 | 15 | 2500 |"
