"""Small helpers shared by the kernels: availability checks and interpreter-aware autotuning."""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import os
import re
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


@functools.cache
def is_triton_available() -> bool:
    """True when triton can be imported (it is optional on CPU-only installs)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """True when kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def autotune_configs(configs: list, default_index: int = 0) -> list:
    """Keep every autotune config on a GPU, only one under the interpreter.

    ``@triton.autotune`` with several configs fails under ``TRITON_INTERPRET=1`` (it tries to
    benchmark on a device the interpreter does not have), so tests get the default config alone.
    """
    if triton_interpreter_enabled():
        return [configs[default_index]]
    return configs


def custom_op_namespace(module_name: str) -> str:
    """The ``torch.library`` namespace of the ops defined in module ``module_name`` (its ``__name__``).

    It follows the package path, so that a copy of the kernels flattened into a Hub repo (imported as
    ``transformers_modules.<repo>...``) registers its own ops instead of colliding with an installed
    ``fat5_kernels``.
    """
    return re.sub(r"\W", "_", module_name.rpartition(".")[0] or "fat5_kernels")


# Host-side integer helpers. `triton.cdiv` / `triton.next_power_of_2` also work on the host, but recent tritons wrap
# them as constexpr functions whose host call unwraps every argument: several microseconds a call, on every launch.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def outside_cuda_graph_pools(make: Callable[[], T], device: torch.device) -> T:
    """``make()``, with the process-lifetime tensors of a kernel cache allocated outside CUDA-graph memory pools.

    ``torch.compile(mode="reduce-overhead")`` runs a model's first step eagerly with the allocations of the
    calling thread routed into its graph pool, and refuses pool memory that outlives the step without being an
    output ("tensors in the cudagraph pool not tracked as outputs"). A cache filled during that step would be
    such memory, so the cache's tensors are made in a helper thread (the default pool, its own stream) and
    synchronized before use. While a graph is being captured they are made in place (the pool of a captured
    graph lives as long as the graph).
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return make()

    def run() -> T:
        with torch.cuda.device(device):
            made = make()
            torch.cuda.current_stream(device).synchronize()
        return made

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as helper:
        return helper.submit(run).result()
