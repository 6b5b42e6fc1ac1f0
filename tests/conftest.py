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
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
