"""Compiles the attention kernels' default tiles (and the RMSNorm backward's pipelined row loop) for one NVIDIA target
on a machine without a GPU and prints, a JSON line each, what the compiled code needs and holds: the shared memory
of every kernel and, for the attention kernels, the layout conversions of fp32 tiles into the matmul accumulator's
layout (run by `test_attention.py`, one process per target: Triton caches a kernel's compile target per process).

    TRITON_INTERPRET=0 FAT5_ATTENTION_AUTOTUNE=0 python tests/kernels/compile_without_gpu.py 86

A stub driver names the target; `launch_tuned` is replaced by a compile of the config the launch would get
(`by_head_dim` / `_prune_bwd_configs` over the defaults), so nothing is launched.
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

# Shared memory a block may use (opt-in maximum), bytes: A100, A10G / L4 / RTX 30-40, H100 / H200.
LIMITS = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
# A convert_layout of a 2D fp32 tile (not a column) from a blocked (load) layout into an MMA (accumulator) layout: on
# sm_90 each one goes through shared memory. The band bias used to take one a tile (see
# attention_fwd.GATHER_IN_ACCUMULATOR_LAYOUT).
ACCUMULATOR_CONVERSION = re.compile(
    r"ttg\.convert_layout .*: tensor<\d+x(?!1x)\d+xf32, #blocked\d*> -> tensor<\d+x\d+xf32, #mma\d*>"
)


class StubDriver:
    """What Triton's JIT asks of a driver before it compiles, for a target that is not on this machine."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


def main(arch: int) -> None:
    os.environ["FAT5_DIRECT_LAUNCH"] = "0"  # nothing is launched: no binary to relaunch
    driver.set_active(StubDriver(GPUTarget("cuda", arch, 32)))
    import fat5_kernels.attention as attention
    import fat5_kernels.attention_bwd as attention_bwd
    import fat5_kernels.attention_fwd as attention_fwd

    attention.triton_interpreter_enabled = lambda: True  # let CPU tensors past the device check
    prune = {"fwd": attention_fwd.by_head_dim, "dkdv": attention_bwd._prune_bwd_configs, "dq": attention_bwd._prune_bwd_configs}
    head_dim = causal = None

    def compile_only(kernel, grid, args, kwargs, key):
        (config,) = prune[key[0]](kernel.configs, {}, **kwargs)
        compiled = kernel.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
        row = dict(arch=arch, head_dim=head_dim, causal=causal, kernel=key[0], config=str(config),
                   shared_bytes=compiled.metadata.shared,
                   accumulator_conversions=len(ACCUMULATOR_CONVERSION.findall(compiled.asm["ttgir"])))  # fmt: skip
        print(json.dumps({**row, "limit_bytes": LIMITS[arch]}), flush=True)

    class CompileOnly:  # kernels launched without autotuning
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.fn.warmup(*args, grid=grid, **kwargs)

    attention_fwd.launch_tuned = attention_bwd.launch_tuned = compile_only
    attention_fwd._distance_bias_kernel = CompileOnly(attention_fwd._distance_bias_kernel)
    attention_bwd._table_grad_kernel = CompileOnly(attention_bwd._table_grad_kernel)
    for head_dim in (64, 128, 256):
        for causal in (False, True):
            q, k, v = (torch.randn(1, 2, 100, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            table = torch.randn(2, 32, requires_grad=True)
            out = attention.t5_flash_attention(q, k, v, bias_table=table, bidirectional=not causal, causal=causal)
            out.backward(torch.randn_like(out))

    import fat5_kernels.rms_norm as rms_norm

    class CompileAndReport(CompileOnly):
        def __getitem__(self, grid):
            def compile_kernel(*args, **kwargs):
                compiled = self.fn.warmup(*args, grid=grid, **kwargs)
                row = dict(arch=arch, head_dim=args[1].shape[-1], kernel="rms_norm_backward", shared_bytes=compiled.metadata.shared)
                print(json.dumps({**row, "limit_bytes": LIMITS[arch]}), flush=True)

            return compile_kernel

    rms_norm._rms_norm_backward_kernel = CompileAndReport(rms_norm._rms_norm_backward_kernel)
    rms_norm._sum_partials = lambda partials, dtype: None  # the partials' reduction: nothing to launch here
    # float32 rows with a residual-stream gradient (three row loads) take the most shared memory; the row width is
    # reported as head_dim
    for d in (512, 1024, 4096):
        x, dy, dsummed, rstd = torch.randn(64, d), torch.randn(64, d), torch.randn(64, d), torch.rand(64)
        rms_norm._rms_norm_backward(dy, x, torch.ones(d), rstd, dsummed, in_place=False)


if __name__ == "__main__":
    main(int(sys.argv[1]))
