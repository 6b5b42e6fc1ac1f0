"""Launch-configuration sweep of the RMSNorm kernels (GPU time), the evidence behind
``fat5_kernels.rms_norm._forward_launch_config`` and ``_backward_launch_config``.

For each shape it times the forward (one kernel) and the backward (kernel plus the sum of the partial weight
gradients); CUDA events, ``triton.testing.do_bench`` median; at the default configuration and at every (rows per
tile, warps[, programs per SM, row-loop pipeline stages]) of the grid, in one process. Writes ``rms_norm_sweep.json`` and
``.md`` through ``results_io`` (default first, then the fastest eight). Usage (GPU machine, repository root)::

    PYTHONPATH=$PWD/kernels python benchmarks/rms_norm_sweep.py --output-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from results_io import RESULTS_DIR, Column, environment, write_results
from triton.testing import do_bench

import fat5_kernels.rms_norm as rms_norm_module
from fat5_kernels.triton_utils import next_power_of_2

# (rows, d, activation dtype, weight dtype): T5-base / large bf16, the FAT5-small pretraining norm (fp32 residual
# stream and weight under autocast, 64 x 512 tokens) and a wide row.
SHAPES = [
    (16384, 768, torch.bfloat16, torch.bfloat16),
    (16384, 1024, torch.bfloat16, torch.bfloat16),
    (32768, 512, torch.float32, torch.float32),
    (32768, 512, torch.bfloat16, torch.bfloat16),
    (16384, 4096, torch.bfloat16, torch.bfloat16),
]
ROWS_PER_TILE = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4, 8, 16)
PROGRAMS_PER_SM = (1, 2, 4, 8, 16)  # backward only
PIPELINE_STAGES = (1, 3)  # backward only: row loop plain, or with the next tiles' loads in flight


def _candidates(pass_name: str, block_cols: int) -> list[tuple]:
    """Launch configs of the grid, in the order of the module's config tuples (backward: programs per SM, then
    pipeline stages, last)."""
    configs = []
    for rows, warps in itertools.product(ROWS_PER_TILE, WARPS):
        elements = rows * block_cols
        if not 512 <= elements <= 16384 or not 4 <= elements // (warps * 32) <= 64:  # 4-64 elements per thread
            continue
        if pass_name == "forward":
            configs.append((rows, block_cols, warps))
        else:
            configs += [
                (rows, block_cols, warps, per_sm, stages)
                for per_sm, stages in itertools.product(PROGRAMS_PER_SM, PIPELINE_STAGES)
            ]
    return configs


def _time_pass(pass_name: str, step, d: int, element_size: int) -> tuple[list, list[float], list[dict]]:
    """(default config, its times before and after the grid, every grid config's time) of one pass; the module's
    config function is patched for the duration and restored. The default is timed twice because these
    machines have slow phases that can catch one measurement."""
    attribute = f"_{pass_name}_launch_config"
    default_config = getattr(rms_norm_module, attribute)
    config_args = (d,) if pass_name == "forward" else (d, element_size)  # the backward's depends on the dtype
    chosen: list = []
    setattr(rms_norm_module, attribute, lambda *args: chosen[0] if chosen else default_config(*args))
    time_us = lambda: do_bench(step, warmup=20, rep=100, return_mode="median") * 1e3
    try:
        default_runs = [time_us()]
        configs = []
        for config in _candidates(pass_name, next_power_of_2(d)):
            chosen[:] = [config]
            configs.append(dict(config=list(config), us=time_us()))
        chosen.clear()
        default_runs.append(time_us())
    finally:
        setattr(rms_norm_module, attribute, default_config)
    return list(default_config(*config_args)), default_runs, sorted(configs, key=lambda c: c["us"])


def sweep_shape(n_rows: int, d: int, x_dtype: torch.dtype, weight_dtype: torch.dtype) -> list[dict]:
    """Forward and backward: times of the default and of every grid configuration for one shape (us)."""
    torch.manual_seed(0)
    x = torch.randn(n_rows, d, device="cuda", dtype=x_dtype)
    weight = torch.randn(d, device="cuda", dtype=weight_dtype)
    dy = torch.randn(n_rows, d, device="cuda", dtype=x_dtype)
    _, _, rstd = rms_norm_module._rms_norm_forward(x, weight, None, 1e-6)
    steps = {
        "forward": lambda: rms_norm_module._rms_norm_forward(x, weight, None, 1e-6),
        "backward": lambda: rms_norm_module._rms_norm_backward(dy, x, weight, rstd, None, False),
    }
    # bytes each pass must move: forward reads x, writes y; backward reads x and dy, writes dx
    bytes_moved = {"forward": 2 * x.numel() * x.element_size(), "backward": 3 * x.numel() * x.element_size()}
    results = []
    for pass_name, step in steps.items():
        default_config, default_runs, configs = _time_pass(pass_name, step, d, x.element_size())
        default_us = min(default_runs)
        results.append(
            dict(
                rows=n_rows,
                d=d,
                x_dtype=str(x_dtype).removeprefix("torch."),
                weight_dtype=str(weight_dtype).removeprefix("torch."),
                pass_name=pass_name,
                default=dict(
                    config=default_config,
                    us=default_us,
                    us_runs=default_runs,
                    GB_per_s=round(bytes_moved[pass_name] / default_us / 1e3),
                ),
                configs=configs,
            )
        )
    return results


def _config_str(config: list) -> str:
    rows, _, warps, *backward = config
    return "/".join(str(v) for v in (rows, warps, *backward))


TITLE = "RMSNorm kernels: launch-configuration sweep"
METHOD = (
    "GPU time of one call (the backward includes the partial weight-gradient sum), median of "
    "`triton.testing.do_bench`; the default configuration first (the better of two timings, before and after the "
    "grid), then the fastest eight. Configs: rows per tile / warps (/ programs per SM / row-loop pipeline stages)."
)
COLUMNS = [
    Column("pass", "pass_name"),
    Column("rows x d", lambda r: f"{r['rows']} x {r['d']}"),
    Column("x / weight", lambda r: f"{r['x_dtype']} / {r['weight_dtype']}"),
    Column(
        "default: us (GB/s)",
        lambda r: f"{_config_str(r['default']['config'])}: {r['default']['us']:.1f} ({r['default']['GB_per_s']})",
    ),
    Column("fastest", lambda r: ", ".join(f"{_config_str(c['config'])}: {c['us']:.1f}" for c in r["configs"][:8])),
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    env = environment()
    results = []
    for shape in SHAPES:
        for result in sweep_shape(*shape):
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "configs"}), flush=True)
    write_results("rms_norm_sweep", results, env=env, args=args, title=TITLE, method=METHOD, columns=COLUMNS,
                  output_dir=args.output_dir)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
