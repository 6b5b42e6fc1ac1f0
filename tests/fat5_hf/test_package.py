"""The package as built and installed: the wheel holds fat5_hf and fat5_kernels (never a top-level `kernels`), triton
is optional (extras), the installed package imports and trains without it; the CI entry point runs the README's
test command; GPU-only tests are skipped (not passed) on CPU."""

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

@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """fat5-hf built as a wheel (from a copy of the sources, so nothing is written into the checkout) and installed
    without dependencies into a folder of its own: `(wheel_path, site_dir)`."""
    import shutil

    pytest.importorskip("setuptools", reason="building the wheel offline (--no-build-isolation) needs setuptools")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "fat5_hf", source / "fat5_hf", ignore=ignore)
    shutil.copytree(REPO / "kernels", source / "kernels", ignore=ignore)
    shutil.copytree(REPO / "model_cards", source / "model_cards", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(work / "dist")],
                   check=True, cwd=work, timeout=300, capture_output=True)
    (wheel,) = (work / "dist").glob("fat5_hf-*.whl")
    site = work / "site"
    subprocess.run([*pip, "install", str(wheel), "--no-deps", "--no-index", "--target", str(site)],
                   check=True, cwd=work, timeout=300, capture_output=True)
    return wheel, site


def test_wheel_ships_fat5_hf_and_fat5_kernels_only(installed_wheel):
    import zipfile

    wheel, _ = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    # `kernels` is Hugging Face's kernels library, which transformers probes for: fat5-hf must not provide it
    assert top_level == {"fat5_hf", "fat5_kernels"}
    assert "fat5_kernels/attention.py" in names and "fat5_hf/modeling_fat5.py" in names
    assert "fat5_hf/finetuning/trainer.py" in names and "fat5_hf/finetuning/metrics/rouge_fr/rouge_fr.py" in names
    assert {f"fat5_hf/model_cards/fat5_{kind}.md" for kind in ("pretrained", "finetuned", "evaluated")} <= set(names)
    (metadata_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata_name).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    triton = [line for line in requires if line.split()[1].startswith("triton")]
    assert triton and all("extra ==" in line for line in triton), triton  # triton only through extras


# Runs in a fresh interpreter on the installed wheel (not the checkout), with triton made unimportable, as on a
# CPU-only install without the `gpu` extra.
WITHOUT_TRITON = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "triton":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTriton())
    import torch
    import fat5_hf
    import fat5_kernels
    from fat5_hf import FAT5Config, FAT5ForConditionalGeneration, kernel_ops

    site = sys.argv[1]
    assert fat5_hf.__file__.startswith(site) and fat5_kernels.__file__.startswith(site), (fat5_hf.__file__, site)
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not any(str(p).startswith(site) for p in spec.submodule_search_locations or [])
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


def test_installed_package_imports_and_trains_without_triton(installed_wheel, tmp_path):
    _, site = installed_wheel
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(  # from an empty folder, so the working directory puts nothing on the path
        [sys.executable, "-c", WITHOUT_TRITON, str(site)], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "NO_TRITON_OK" in result.stdout


def test_source_tree_maps_kernels_to_fat5_kernels():
    assert Path(fat5_kernels.__file__).resolve().parent == REPO / "kernels" / "fat5_kernels"
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


def test_interpreter_tests_are_skipped_not_failed_without_the_interpreter():
    """With TRITON_INTERPRET off (a GPU machine's default), the tests that run the kernels on CPU tensors are
    skipped with the fix in the reason, instead of failing in the kernels' device check."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-m", "interpreter", "-rs",
         "tests/fat5_hf/test_packed_documents.py"],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False, env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b\d+ skipped\b", summary) and "passed" not in summary, summary
    assert "run with TRITON_INTERPRET=1" in result.stdout


@pytest.mark.parametrize("installed, ok", [("5.17.0", False), ("5.24.0.dev0", True)])
def test_too_old_transformers_is_refused_on_import_with_the_fix(installed, ok):
    """Importing FAT5 (also its exported remote code, which starts with the configuration file) under an older
    transformers raises an ImportError naming the installed version and the pip command, instead of an unrelated
    error later (transformers 5.17 failed in the first forward pass)."""
    code = f"import transformers; transformers.__version__ = {installed!r}; import fat5_hf; print('IMPORTED')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    if ok:
        assert result.returncode == 0 and "IMPORTED" in result.stdout, result.stderr[-2000:]
    else:
        assert result.returncode != 0
        assert f"FAT5 needs transformers>=5.24, but transformers {installed} is installed" in result.stderr
        assert "pip install -U 'transformers>=5.24,<6'" in result.stderr


def test_minimum_transformers_version_matches_the_package_requirement():
    from fat5_hf.configuration_fat5 import MIN_TRANSFORMERS_VERSION

    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (transformers_requirement,) = [r for r in requirements if re.match(r"transformers\b", r)]
    assert f">={MIN_TRANSFORMERS_VERSION}," in transformers_requirement, transformers_requirement
