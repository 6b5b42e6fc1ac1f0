"""The RMSNorm sweep's grid and report (CPU; the timings themselves need a GPU)."""

import importlib.util
import os

import pytest
import results_io

pytest.importorskip("triton")

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "rms_norm_sweep.py")
_spec = importlib.util.spec_from_file_location("rms_norm_sweep", _PATH)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


@pytest.mark.parametrize("block_cols", [128, 512, 1024, 4096, 8192])
def test_grid_holds_launchable_configs_and_the_defaults(block_cols):
    from fat5_kernels import rms_norm

    forward = sweep._candidates("forward", block_cols)
    backward = sweep._candidates("backward", block_cols)
    assert forward and len(backward) == len(forward) * len(sweep.PROGRAMS_PER_SM) * len(sweep.PIPELINE_STAGES)
    for rows, cols, warps, *_ in forward + backward:
        assert cols == block_cols and 4 <= rows * cols // (warps * 32) <= 64 and rows * cols <= 16384
    # the modules' defaults are points of the grid, so the sweep ranks them against the same alternatives
    assert rms_norm._forward_launch_config(block_cols) in forward
    assert all(rms_norm._backward_launch_config(block_cols, size) in backward for size in (2, 4))


def test_markdown_lists_default_then_fastest():
    result = dict(
        rows=16, d=768, x_dtype="bfloat16", weight_dtype="bfloat16", pass_name="backward",
        default=dict(config=[4, 1024, 4, 1, 3], us=50.0, us_runs=[50.0, 52.0], GB_per_s=1500),
        configs=[dict(config=[4, 1024, 2, 8, 1], us=47.5), dict(config=[1, 1024, 4, 8, 3], us=48.0)],
    )  # fmt: skip
    line = results_io.markdown_table([result], sweep.COLUMNS).splitlines()[-1]
    assert line == "| backward | 16 x 768 | bfloat16 / bfloat16 | 4/4/1/3: 50.0 (1500) | 4/2/8/1: 47.5, 1/4/8/3: 48.0 |"
