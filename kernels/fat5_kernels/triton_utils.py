"""Small helpers shared by the kernels: availability checks and interpreter-aware autotuning."""

from __future__ import annotations

import functools
import importlib.util
import os


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
