"""Test-wide setup: Triton interpreter on CPU, an isolated offline Hugging Face cache, GPU markers."""

import os
import tempfile

import torch

# Kernels run under the Triton interpreter on CPU-only machines; the variable must be set before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never touch the Hub: a private cache (custom code is copied under it) and offline mode.
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="fat5_hf_home_"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need compiled kernels on a CUDA GPU; `interpreter` tests run the kernels on CPU tensors, which
    only the Triton interpreter can. On a GPU machine run both kinds in two runs: `pytest tests` (the
    interpreter ones are skipped) and `TRITON_INTERPRET=1 pytest -m interpreter tests`."""
    from fat5_kernels import triton_interpreter_enabled  # imports no triton; the variable is set above

    interpreter = triton_interpreter_enabled()
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine")
    elif interpreter:
        skips["gpu"] = pytest.mark.skip(reason="needs the compiled kernels: run without TRITON_INTERPRET")
    if not interpreter:
        skips["interpreter"] = pytest.mark.skip(
            reason="runs the Triton kernels on CPU tensors: run with TRITON_INTERPRET=1 (set by default on CPU-only machines)"
        )
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def hold_folder_in_another_process():
    """``hold(folder)`` starts a separate process that holds ``folder`` as a recipe's run does
    (`fat5_hf.output_dir.hold_output_dir`, resume mode: nothing is cleared) and returns it once the lock is taken;
    the process is killed at the end of the test. Only fat5_hf/output_dir.py is loaded there, so it starts fast."""
    import subprocess
    import sys
    from pathlib import Path

    module = Path(__file__).resolve().parents[1] / "fat5_hf" / "output_dir.py"
    code = (
        "import importlib.util, sys, time; "
        f"spec = importlib.util.spec_from_file_location('output_dir', {str(module)!r}); "
        "od = importlib.util.module_from_spec(spec); spec.loader.exec_module(od); "
        "lock = od.hold_output_dir(sys.argv[1], resume=True); print('held', flush=True); time.sleep(600)"
    )
    holders = []

    def hold(folder) -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        if holder.stdout.readline().strip() != "held":
            raise RuntimeError(f"the holder process could not take the lock of {folder}")
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()
