"""fat5_kernels: Triton kernels for T5-family models, independent of transformers.

Each op lives in its own module with a plain PyTorch reference beside it. Importing this package
never requires triton: `is_triton_available()` says whether the Triton paths can run.
"""

from .triton_utils import is_triton_available, triton_interpreter_enabled

__all__ = ["is_triton_available", "triton_interpreter_enabled"]
