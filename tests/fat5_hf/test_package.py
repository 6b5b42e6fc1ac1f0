"""The package as installed: triton optional, kernels importable only as `fat5_kernels`, extras, the CI entry point
running the README's test command, GPU-only tests skipped (not passed) on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fat5_kernels

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter with triton made unimportable, as on a CPU-only install without the `gpu` extra.
WITHOUT_TRITON = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "triton":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTriton())
    import torch
    import fat5_hf
    from fat5_hf import FAT5Config, FAT5ForConditionalGeneration, kernel_ops

    assert "triton" not in sys.modules
    assert not any(kernel_ops.kernel_available(k) for k in ("rms_norm", "gated_activation", "cross_entropy", "attention"))
    torch.manual_seed(0)
    config = FAT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = FAT5ForConditionalGeneration(config)
    out = model(input_ids=torch.tensor([[5, 6, 7, 1]]), labels=torch.tensor([[8, 9, 1]]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    print("NO_TRITON_OK", fat5_hf.__version__)
    """
)


def test_fat5_hf_imports_and_trains_without_triton(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "NO_TRITON_OK" in result.stdout


def test_kernels_import_as_fat5_kernels_never_as_kernels(tmp_path):
    # `kernels` is Hugging Face's kernels library, which transformers probes for: fat5-hf must not provide it.
    assert Path(fat5_kernels.__file__).resolve().parent == REPO / "kernels" / "fat5_kernels"
    probe = "import importlib.util; s = importlib.util.find_spec('kernels'); print(list(s.submodule_search_locations or []) if s else None)"
    result = subprocess.run(  # from an empty folder, so the working directory puts nothing on the path
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120, check=True
    )
    assert str(REPO / "kernels") not in result.stdout, result.stdout
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "kernels" not in setuptools["packages"] and setuptools["package-dir"]["fat5_kernels"] == "kernels/fat5_kernels"


def test_extras_and_optional_triton():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "fat5-hf"
    assert not any(dep.startswith("triton") for dep in project["dependencies"])  # optional on CPU-only installs
    extras = project["optional-dependencies"]
    assert {"recipes", "dev", "gpu"} <= set(extras)
    assert any(dep.startswith("triton") for dep in extras["gpu"])


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci_run = (REPO / ".ci" / "run").read_text()
    pytest_lines = [line.strip() for line in ci_run.splitlines() if re.search(r"-m pytest\b", line)]
    assert len(pytest_lines) == 1, pytest_lines
    assert f"`{pytest_lines[0]}`" in readme  # the README quotes the exact command .ci/run runs
    assert "bash .ci/run" in readme  # and its quickstart runs .ci/run itself
    assert os.access(REPO / ".ci" / "run", os.X_OK)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens to GPU-only tests on a CPU machine")
def test_gpu_tests_are_skipped_not_passed_on_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
         "tests/fat5_hf/test_model_gpu.py"],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b\d+ skipped\b", summary) and "passed" not in summary, summary
    assert "needs a CUDA GPU" in result.stdout
