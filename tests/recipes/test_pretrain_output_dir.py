"""The pretraining recipe holds its output folder for the whole run (real processes, no mock of the lock): a second
run is refused in every mode and leaves the first run's files intact, killing the launcher (torchrun, 2 gloo
processes) ends its workers, and ``--resume latest`` falls back from a truncated newest checkpoint."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "recipes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrain  # noqa: E402
from test_pretrain import PRETRAIN, TINY, _free_port, read_log, subprocess_env, tiny_config  # noqa: E402

from fat5_hf.output_dir import LOCK_FILE, hold_output_dir  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux process semantics")

ENDLESS = [*TINY, "training.cpu=true", "training.max_steps=100000", "training.save_total_limit=null"]


def _wait_for(condition, process: subprocess.Popen, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{process.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _logged_steps(output_dir: Path) -> int:
    path = output_dir / pretrain.TRAIN_LOG_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _snapshot(folder: Path) -> dict[str, bytes]:
    """The run's finished files: a checkpoint still being written (its ``.tmp`` folder) is renamed once complete."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.endswith(".tmp") for part in p.relative_to(folder).parts)
    }


def _appended_to(name: str) -> bool:
    """Files the running run keeps appending to: its log and TensorBoard's event files."""
    return name == pretrain.TRAIN_LOG_FILE or name.startswith(f"{pretrain.LOGS_DIR}/")


@pytest.mark.slow
def test_second_run_on_a_held_folder_is_refused_in_every_mode(tmp_path, capsys):
    output_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *ENDLESS, "training.save_steps=2", f"training.output_dir={output_dir}"],
        env=subprocess_env(cpu_only=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: len(pretrain.checkpoint_dirs(output_dir)) >= 1, first, what="the first checkpoint")
        before = _snapshot(output_dir)
        second = [*TINY, "training.cpu=true", "training.max_steps=100000", f"training.output_dir={output_dir}"]
        for mode in ([], ["--resume", "latest"], ["training.overwrite_output_dir=true"]):
            assert pretrain.main([*second, *mode]) == 2, mode
            error = capsys.readouterr().err
            assert f"is in use by another run: pid {first.pid} on host" in error, error
            assert "Wait for that run to end or stop it, or choose another output folder" in error
        assert first.poll() is None, "the first run must go on"
        after = _snapshot(output_dir)
        for name, content in before.items():  # every file of the first run is intact (its logs only grew)
            assert after[name].startswith(content) if _appended_to(name) else after[name] == content, name
        assert json.loads((output_dir / LOCK_FILE).read_text())["pid"] == first.pid
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        output, _ = first.communicate(timeout=180)
    assert first.returncode == 0 and "Stopped by SIGTERM" in output, output[-3000:]
    steps = [record["step"] for record in read_log(output_dir) if "loss" in record]
    assert steps == list(range(1, len(steps) + 1)), "one run wrote the log"
    assert not (output_dir / LOCK_FILE).exists(), "the lock file goes with the run"


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_killing_the_launcher_ends_its_workers(tmp_path):
    """SIGKILL to `torchrun --nproc_per_node 2` (gloo on CPU): both workers get SIGTERM from Linux (parent-death
    signal), write their checkpoint and exit; the folder is free again."""
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(PRETRAIN), *ENDLESS, "training.save_steps=100000",
               f"training.output_dir={output_dir}"]  # fmt: skip
    launcher = subprocess.Popen(
        command,
        env=subprocess_env(cpu_only=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: _logged_steps(output_dir) >= 2, launcher, what="two logged steps")
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        assert json.loads((output_dir / LOCK_FILE).read_text())["pid"] in workers
        launcher.kill()
        # The pipe closes once every process that holds it (the workers) has ended.
        output, _ = launcher.communicate(timeout=180)
        deadline = time.monotonic() + 30
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_running, workers)), f"workers still running:\n{output[-3000:]}"
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    assert output.count("Stopped by SIGTERM") == 1, output[-3000:]  # printed by the main process
    assert len(pretrain.checkpoint_dirs(output_dir)) == 1
    with hold_output_dir(output_dir, resume=True) as lock:
        assert lock.held


@pytest.mark.slow
def test_resume_latest_falls_back_from_a_truncated_checkpoint(tmp_path, caplog):
    output_dir = tmp_path / "run"
    common = ["training.save_steps=2", "training.eval_steps=100", "training.save_total_limit=null"]
    pretrain.train(tiny_config(output_dir, *common, "training.max_steps=4"))
    previous, newest = pretrain.checkpoint_dirs(output_dir)
    recorded = json.loads((newest / pretrain.RECIPE_STATE_FILE).read_text())["files"]
    weights = newest / "model.safetensors"
    assert recorded["model.safetensors"]["size"] == weights.stat().st_size and len(recorded) >= 4
    with open(weights, "r+b") as f:  # as a crash or a full disk leaves it
        f.truncate(weights.stat().st_size // 2)

    with pytest.raises(pretrain.RecipeError, match="step_00000004 is incomplete or corrupt.*model.safetensors: "):
        pretrain.train(tiny_config(output_dir, *common, "training.max_steps=6", f"training.resume={newest}"))
    with caplog.at_level(logging.WARNING, logger="fat5_hf.recipes.pretrain"):
        summary = pretrain.train(tiny_config(output_dir, *common, "training.max_steps=6", "training.resume=latest"))
    assert f"Checkpoint {newest} is incomplete or corrupt (model.safetensors: " in caplog.text
    assert "falling back to the previous one" in caplog.text and previous.name == "step_00000002"
    assert summary["step"] == 6
    steps = [record["step"] for record in read_log(output_dir) if "loss" in record]
    assert steps == [1, 2, 3, 4, 5, 6], "resumed from step 2: the log's steps 3 and 4 are the new run's"
    assert [p.name for p in pretrain.checkpoint_dirs(output_dir)] == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]
    assert pretrain.checkpoint_problems(newest) == []  # step 4 written again, intact
    # The resumed run's export replaced the first one in place (no staging folder left, the model loads).
    from transformers import AutoModelForSeq2SeqLM

    import fat5_hf  # noqa: F401

    AutoModelForSeq2SeqLM.from_pretrained(output_dir)
    assert not [p.name for p in output_dir.iterdir() if p.name.startswith(".")]
