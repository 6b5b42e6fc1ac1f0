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


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 0 for any other device."""
    if device.type != "cuda":
        return 0
    return _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


class CompiledLaunches:
    """Relaunch a ``@triton.jit`` kernel's compiled binary directly, keyed by what of its arguments may select it.

    ``JITFunction.run`` re-derives on every call what the binary was specialized on (each pointer's dtype and
    16-byte alignment, each integer's divisibility by 16 and size), formats a cache-key string and looks the
    binary up. For the attention kernels' ~45 arguments a launch took 75-120 us of host time on an H100 machine's
    CPU (from the autograd engine's thread), more than the kernels take at short lengths. A model calls each
    kernel with the same strides and sizes layer after layer, so here the binary is found by ``(key, device,
    `_specializations` of the arguments)`` (tensors' dtypes and alignments, ints' values, floats' type): at least
    as fine as Triton's specialization, so a call that could need another binary always goes through
    ``JITFunction.run`` (which compiles or finds it) first.

    Falls back to ``JITFunction.run`` whenever the direct path does not apply: under the interpreter, when a
    launch hook is installed (profilers such as proton), for arguments other than tensors, ints, floats, bools
    and None, or on a Triton whose compiled kernels lack the launch interface used here. ``FAT5_DIRECT_LAUNCH=0``
    (read when a binary would be cached) turns it off.
    """

    MAX_ENTRIES = 512

    def __init__(self) -> None:
        self._entries: dict = {}

    def launch(
        self, fn, grid: tuple | Callable[[dict], tuple], args: tuple, constexprs: dict, options: dict, key: tuple
    ) -> None:
        """Launch ``fn[grid](*args, **constexprs, **options)``.

        ``grid``: a tuple, or a function of the constexprs returning one; ``args``: the kernel's leading runtime
        arguments, in order; ``constexprs``: the remaining parameters by name (``tl.constexpr`` values, block sizes
        included); ``options``: launch options (``num_warps``, ``num_stages``, ...); ``key``: hashable, determines
        ``constexprs`` and ``options``.
        """
        device = -1
        for arg in args:
            if isinstance(arg, torch.Tensor):
                device = torch.cuda.current_device() if arg.is_cuda else -1
                break
        entry_key = (key, device, _specializations(args))
        entry = self._entries.get(entry_key)
        if entry is not None and not _launch_hooks():
            compiled, tail = entry
            grid_size = (*(grid(constexprs) if callable(grid) else grid), 1, 1)
            compiled.run(
                grid_size[0], grid_size[1], grid_size[2], _current_stream(device), compiled.function,
                compiled.packed_metadata, None, None, None, *args, *tail,
            )  # fmt: skip
            return
        compiled = fn[grid](*args, **constexprs, **options)
        if _direct_launch_applies(fn, compiled, args, constexprs):
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            tail = tuple(constexprs[name] for name in fn.arg_names[len(args) :])
            self._entries[entry_key] = (compiled, tail)


def _specializations(args: tuple) -> tuple:
    """What of each argument may select another binary: a tensor's dtype and 16-byte alignment, an int's value
    (Triton specializes on ints equal to 1 or divisible by 16, and on their width), a float's type only (Triton
    passes every float as fp32), anything else's type and value (True == 1 == 1.0 as keys, but Triton types them
    apart). One plain loop: it runs on every launch, over ~45 arguments for the attention kernels."""
    specs = []
    for arg in args:
        cls = arg.__class__
        if cls is int:
            specs.append(arg)
        elif cls is float:
            specs.append(float)
        elif isinstance(arg, torch.Tensor):
            specs.append((arg.dtype, arg.data_ptr() & 15))
        else:
            specs.append((cls, arg))
    return tuple(specs)


_JIT_LAUNCHES = CompiledLaunches()


def launch(fn, grid: tuple, args: tuple, constexprs: dict, **options) -> None:
    """``fn[grid](*args, **constexprs, **options)`` for a plain (not autotuned) ``@triton.jit`` kernel, relaunched
    directly from its binary once compiled (`CompiledLaunches`). ``args``: the leading runtime arguments in order;
    ``constexprs``: the other parameters by name; ``options``: ``num_warps``, ``num_stages``..."""
    key = (fn, tuple(constexprs.items()), tuple(options.items()))
    _JIT_LAUNCHES.launch(fn, grid, args, constexprs, options, key)


def _direct_launch_applies(fn, compiled, args: tuple, constexprs: dict) -> bool:
    if os.environ.get("FAT5_DIRECT_LAUNCH", "1") == "0" or triton_interpreter_enabled() or _launch_hooks():
        return False
    # nothing whose == is elementwise or whose specialization the key would not capture
    if not all(isinstance(a, torch.Tensor) or a is None or type(a) in (int, float, bool) for a in args):
        return False
    if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
        return False
    names = getattr(fn, "arg_names", None)
    return names is not None and len(names) == len(args) + len(constexprs) and set(names[len(args) :]) == set(constexprs)


def _current_stream(device: int) -> int:
    """The raw handle of ``device``'s current CUDA stream (what ``JITFunction.run`` launches on)."""
    return torch._C._cuda_getCurrentRawStream(device)


@functools.cache
def _triton_runtime_knobs():
    try:
        from triton import knobs
    except ImportError:  # Triton < 3.4: no knobs, and another launch interface
        return None
    return knobs.runtime


def _launch_hooks() -> bool:
    """Whether launches must go through ``JITFunction.run``: a launch hook is installed, or Triton is too old."""
    runtime = _triton_runtime_knobs()
    if runtime is None:
        return True
    # Recent Tritons hold the hooks in (usually empty) chains of calls; a hook may also be set as a plain callable.
    return any(getattr(hook, "calls", hook) for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


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
