"""Tests of fat5_hf.output_dir with real processes: the lock is held by another Python process (no mock of the lock),
stale locks of killed processes, manifests of truncated files, and an export killed (SIGKILL) while it is written or
while it is moved into place."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fat5_hf.output_dir import (
    LOCK_FILE,
    LauncherWatch,
    OutputDirInUseError,
    OutputDirLock,
    OutputDirNotEmptyError,
    file_manifest,
    fsync_tree,
    hold_output_dir,
    launched_by_launcher,
    publish_dir_atomically,
    verify_file_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux process semantics")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "kernels"), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


# Loads fat5_hf/output_dir.py alone (no torch, no transformers: a subprocess that starts in a fraction of a second).
LOAD_MODULE = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("output_dir", {str(REPO_ROOT / "fat5_hf" / "output_dir.py")!r})
od = importlib.util.module_from_spec(spec)
spec.loader.exec_module(od)
"""

# Holds the folder given as argv[1], prints "held", then sleeps until killed.
HOLDER = (
    LOAD_MODULE
    + """
import sys, time
lock = od.hold_output_dir(sys.argv[1], resume=True)
print("held", flush=True)
time.sleep(600)
"""
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path / "run"`` (a previous run's files inside); killed at the end."""
    output_dir = tmp_path / "run"
    (output_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (output_dir / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"weights of the first run")
    (output_dir / "train_log.jsonl").write_text('{"step": 2, "loss": 3.0}\n')
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output_dir)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
        yield output_dir, process
    finally:
        process.kill()
        process.wait()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "mode", [{}, {"resume": True}, {"overwrite_output_dir": True}], ids=["fresh", "resume", "overwrite"]
)
def test_second_run_on_a_held_folder_is_refused_and_touches_nothing(holder, mode):
    output_dir, process = holder
    before = _snapshot(output_dir)
    with pytest.raises(OutputDirInUseError) as error:
        hold_output_dir(output_dir, **mode)
    message = str(error.value)
    # The run holding the folder is named: pid, host, start time, command; and what to do.
    assert f"pid {process.pid} on host {socket.gethostname()}, started 20" in message
    assert "time.sleep(600)" in message and "choose another output folder" in message
    assert _snapshot(output_dir) == before
    record = json.loads((output_dir / LOCK_FILE).read_text())
    assert record["pid"] == process.pid and record["host"] == socket.gethostname()


def test_lock_is_released_when_its_process_dies_and_the_stale_record_is_taken_over(holder, caplog):
    output_dir, process = holder
    process.kill()  # SIGKILL: no cleanup runs, the lock file and its record stay
    process.wait()
    assert json.loads((output_dir / LOCK_FILE).read_text())["pid"] == process.pid
    with caplog.at_level(logging.WARNING, logger="fat5_hf.output_dir"):
        lock = hold_output_dir(output_dir, resume=True)
    assert lock.held and f"held by pid {process.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((output_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (output_dir / "checkpoints" / "step_00000002" / "model.safetensors").is_file()  # the files are kept
    lock.release()
    assert not (output_dir / LOCK_FILE).exists()


def test_not_empty_overwrite_and_resume(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "old.txt").write_text("previous run")
    with pytest.raises(OutputDirNotEmptyError, match="not empty.*--overwrite_output_dir.*--resume_from_checkpoint"):
        hold_output_dir(output_dir)
    assert not (output_dir / LOCK_FILE).exists() and (output_dir / "old.txt").read_text() == "previous run"
    with hold_output_dir(output_dir, resume=True) as lock:
        assert lock.held and (output_dir / "old.txt").exists()
    with hold_output_dir(output_dir, overwrite_output_dir=True):
        assert [p.name for p in output_dir.iterdir()] == [LOCK_FILE]  # cleared, the lock file excepted
    # The same process cannot hold one folder twice either (two runs in one notebook).
    new_dir = tmp_path / "new" / "run"
    with hold_output_dir(new_dir) as lock:
        with pytest.raises(OutputDirInUseError, match=f"pid {os.getpid()}"):
            hold_output_dir(new_dir)
    assert list(new_dir.iterdir()) == [] and not lock.held
    assert not OutputDirLock(new_dir).held  # what the other processes of a launch get


def test_manifest_finds_truncated_missing_and_changed_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a" * 1000)
    (tmp_path / "sub" / "b.json").write_text('{"x": 1}')
    manifest = file_manifest(tmp_path)
    assert sorted(manifest) == ["a.bin", "sub/b.json"] and manifest["a.bin"]["size"] == 1000
    fsync_tree(tmp_path)
    assert verify_file_manifest(tmp_path, manifest) == []
    (tmp_path / "sub" / "b.json").write_text('{"x": 2}')
    assert verify_file_manifest(tmp_path, manifest) == ["sub/b.json: checksum differs from the one recorded"]
    with open(tmp_path / "a.bin", "r+b") as f:
        f.truncate(10)
    (tmp_path / "sub" / "b.json").unlink()
    assert verify_file_manifest(tmp_path, manifest) == ["a.bin: 10 bytes, 1000 expected", "sub/b.json: missing"]
    assert list(file_manifest(tmp_path, exclude=["a.bin"])) == []


def _readline_within(process: subprocess.Popen, timeout: float = 60) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().strip() if ready else "<nothing within the timeout>"


def test_worker_gets_sigterm_when_its_launcher_is_killed(tmp_path):
    """The launcher (a shell here, SIGKILLed) dies: Linux sends its worker the parent-death signal."""
    assert launched_by_launcher({"LOCAL_RANK": "0"}) and launched_by_launcher({"ACCELERATE_DYNAMO_BACKEND": "NO"})
    assert not launched_by_launcher({})
    worker = tmp_path / "worker.py"
    worker.write_text(
        LOAD_MODULE
        + textwrap.dedent(
            """
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: (print("stopped by SIGTERM", flush=True), sys.exit(0)))
            watch = od.stop_with_launcher(force=True)
            print("watching", flush=True)
            time.sleep(60)
            print("never stopped", flush=True)
            """
        )
    )
    # `; sleep` keeps the shell alive as the worker's parent (it would exec a last command in its place).
    launcher = subprocess.Popen(
        ["/bin/sh", "-c", f'"{sys.executable}" "{worker}"; sleep 60'],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert _readline_within(launcher) == "watching"
        launcher.kill()
        launcher.wait()
        assert _readline_within(launcher) == "stopped by SIGTERM"
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)  # the orphaned sleep


def test_watch_between_steps_signals_when_the_launcher_is_gone():
    """The fallback where no parent-death signal came: `check` sees another parent pid and signals this process."""
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        alive = LauncherWatch(os.getppid(), signal.SIGUSR1)
        alive.check()
        assert alive.launcher_alive() and received == []
        gone = LauncherWatch(os.getppid() + 1_000_000, signal.SIGUSR1)  # not our parent: it has died
        gone.check()
        gone.check()
        assert received == [signal.SIGUSR1]  # once
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ------------------------------------------------------------------------------------------ atomic export

# Publishes tiny FAT5 model number argv[2] into argv[1] (beside a kept checkpoints/ folder); with argv[3], SIGKILLs
# itself at that point: "writing" (staged, not yet published) or "moving" (after the first entry was moved in).
EXPORTER = """
import os, signal, sys
from fat5_hf import output_dir as od
from tests.fat5_hf.test_output_dir import tiny_model

final, seed, kill_at = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else None)
model = tiny_model(seed)

def write(folder):
    model.save_pretrained(folder)
    (folder / f"only_in_export_{seed}.txt").write_text(str(seed))
    if kill_at == "writing":
        os.kill(os.getpid(), signal.SIGKILL)

if kill_at == "moving":
    replace = os.replace
    def replace_then_die(src, dst):
        replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)
    od.os.replace = replace_then_die
od.publish_dir_atomically(final, write, keep=["checkpoints"])
"""


def tiny_model(seed: int):
    from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

    torch.manual_seed(seed)
    return FAT5ForConditionalGeneration(
        FAT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    )


def _export(final_dir: Path, seed: int, kill_at: str | None = None) -> int:
    args = [sys.executable, "-c", EXPORTER, str(final_dir), str(seed)] + ([kill_at] if kill_at else [])
    return subprocess.run(args, env=_env(), cwd=REPO_ROOT, timeout=300).returncode


def _loaded_weights(folder: Path) -> dict[str, torch.Tensor]:
    from fat5_hf import FAT5ForConditionalGeneration

    return FAT5ForConditionalGeneration.from_pretrained(folder).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_export_killed_while_written_or_moved_leaves_a_folder_that_loads(tmp_path):
    first, second = tiny_model(1).state_dict(), tiny_model(2).state_dict()
    assert not _same(first, second)

    final_dir = tmp_path / "run"
    (final_dir / "checkpoints").mkdir(parents=True)
    (final_dir / "checkpoints" / "state.json").write_text("{}")

    def write_first(folder: Path) -> None:
        tiny_model(1).save_pretrained(folder)
        (folder / "only_in_export_1.txt").write_text("1")

    publish_dir_atomically(final_dir, write_first, keep=["checkpoints"])
    assert _same(_loaded_weights(final_dir), first) and (final_dir / "only_in_export_1.txt").is_file()

    # Killed while the new export is written: the previous export is untouched and loads.
    assert _export(final_dir, 2, kill_at="writing") == -signal.SIGKILL
    assert _same(_loaded_weights(final_dir), first) and not (final_dir / "only_in_export_2.txt").exists()
    # Killed after moving the first new entry in: the old weights are gone (the folder does not load a mix) ...
    assert _export(final_dir, 2, kill_at="moving") == -signal.SIGKILL
    assert not (final_dir / "model.safetensors").exists() and not (final_dir / "only_in_export_1.txt").exists()
    # ... and the next holder of the folder completes the export, which then loads whole.
    with hold_output_dir(final_dir, resume=True):
        pass
    assert _same(_loaded_weights(final_dir), second)
    names = {p.name for p in final_dir.iterdir()}
    assert {"checkpoints", "config.json", "model.safetensors", "only_in_export_2.txt"} <= names
    assert "only_in_export_1.txt" not in names and not [n for n in names if n.startswith(".")]
    assert (final_dir / "checkpoints" / "state.json").read_text() == "{}"

    # An export over a folder that holds only the kept entries, and a new folder: published whole.
    publish_dir_atomically(tmp_path / "fresh", lambda folder: (folder / "a.txt").write_text("a"))
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_publish_failure_leaves_the_previous_export(tmp_path):
    final_dir = tmp_path / "run"
    publish_dir_atomically(final_dir, lambda folder: (folder / "model.safetensors").write_bytes(b"old"))

    def failing(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_dir_atomically(final_dir, failing)
    assert [p.name for p in final_dir.iterdir()] == ["model.safetensors"]
    assert (final_dir / "model.safetensors").read_bytes() == b"old"
    # The staging folder carries the final name (a model card's model id is the folder's name).
    seen = []
    publish_dir_atomically(final_dir, lambda folder: seen.append(folder.name))
    assert seen == ["run"] and list(final_dir.iterdir()) == []


@pytest.mark.slow
def test_every_process_gets_the_main_process_answer(tmp_path):
    """Two gloo processes: rank 0 finds the folder held by a third process; rank 1 raises the same error."""
    output_dir = tmp_path / "run"
    blocker = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output_dir)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert blocker.stdout.readline().strip() == "held"
        script = textwrap.dedent(
            f"""
            import torch.distributed as dist
            from fat5_hf.output_dir import OutputDirInUseError, hold_output_dir
            dist.init_process_group("gloo")
            try:
                hold_output_dir({str(output_dir)!r}, is_main_process=dist.get_rank() == 0, wait_for_everyone=dist.barrier)
            except OutputDirInUseError as err:
                print(f"rank {{dist.get_rank()}}: {{err}}", flush=True)
            dist.destroy_process_group()
            """
        )
        port = _free_port()
        outputs = []
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", script],
                env={
                    **_env(),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "RANK": str(rank),
                    "WORLD_SIZE": "2",
                },
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for rank in range(2)
        ]
        for process in processes:
            outputs.append(process.communicate(timeout=120)[0])
        for rank, output in enumerate(outputs):
            assert f"rank {rank}: {output_dir} is in use by another run: pid {blocker.pid}" in output, output
    finally:
        blocker.kill()
        blocker.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
