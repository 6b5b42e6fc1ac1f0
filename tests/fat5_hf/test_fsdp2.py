"""FAT5 under FSDP2 (torch.distributed.fsdp.fully_shard) on 2 CPU processes: same loss, gradients and generation.

Accelerate runs FSDP on GPUs only; these tests shard the model directly, as the recipe's
`accelerate-fsdp2.yaml` does, in a `torch.distributed.run` subprocess (see fsdp2_worker.py).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fat5_hf import kernel_ops

WORKER = Path(__file__).with_name("fsdp2_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("path", ["pytorch", "kernels", "carved"])
def test_fsdp2_matches_unsharded_model(path):
    if path == "kernels" and not kernel_ops.kernel_available("attention"):
        pytest.skip("fat5_kernels' attention kernel needs triton")
    # two CPU processes (gloo) on any machine: with a GPU visible, FSDP2's default mesh would be a CUDA one
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER)]
    command += [path]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert result.stdout.count("FSDP2 matches") == 2
