"""`.ci/setup`'s choice of PyTorch build: PyTorch's CPU wheel index on a Linux machine without an NVIDIA GPU.

`.ci/torch-index-url` runs with a PATH that holds only the tools it needs and, where the case calls for one, a fake
`nvidia-smi`: the real machine's GPUs (or their absence) do not leak into the result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TORCH_INDEX_URL = REPO_ROOT / ".ci" / "torch-index-url"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _run_with_tools(tmp_path: Path, nvidia_smi: str | None, system: str = "Linux", **env: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grep").symlink_to(shutil.which("grep"))
    fakes = {"uname": f"echo {system}"} | ({"nvidia-smi": nvidia_smi} if nvidia_smi is not None else {})
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp"), **env}
    result = subprocess.run(
        [shutil.which("bash"), str(TORCH_INDEX_URL)], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


@pytest.mark.parametrize(
    "nvidia_smi, system, expected",
    [
        (None, "Linux", CPU_INDEX),  # no driver tools at all
        # the tools without a working driver, as on a CPU cloud image
        ("echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver\"; exit 9", "Linux",
         CPU_INDEX),
        ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"', "Linux", ""),  # PyPI's CUDA build
        (None, "Darwin", ""),  # PyPI's macOS wheels carry no CUDA
    ],
)  # fmt: skip
def test_torch_index_follows_the_machine(tmp_path, nvidia_smi, system, expected):
    assert _run_with_tools(tmp_path, nvidia_smi, system) == expected


@pytest.mark.parametrize("users_index", ["https://download.pytorch.org/whl/cu128", ""])
def test_users_torch_index_wins(tmp_path, users_index):
    """TORCH_INDEX_URL set, even to nothing (PyPI's default index), is kept whatever the machine has."""
    assert _run_with_tools(tmp_path, None, TORCH_INDEX_URL=users_index) == users_index
