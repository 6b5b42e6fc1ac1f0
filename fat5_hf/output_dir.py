"""One output folder, one run: the output-folder safety every recipe shares.

- `hold_output_dir` takes an exclusive lock on the folder (``fcntl.flock`` on a lock file inside it, released by
  the OS when the process dies, so a crashed run never blocks the next one) *before* anything in it is deleted or
  written, then checks it: a second run on a held folder is refused whatever its flags, a non-empty folder needs
  ``overwrite`` or ``resume``. The lock file records host, pid, start time and command line; a record left by a
  dead process of this host is taken over with a warning. Where OS locks do not reach across hosts (some network
  filesystems) the record is the fallback: a live pid of this host, or any pid of another host, holds the folder.
- `stop_with_launcher` makes a worker process stop when its launcher (``torchrun``, ``accelerate launch``) dies:
  a parent-death signal on Linux, and `LauncherWatch.check` between steps elsewhere.
- `fsync_tree`, `file_manifest` and `verify_file_manifest` make checkpoints durable before the rename that
  publishes them, and checkable when resuming.
- `publish_dir_atomically` writes an export (model, tokenizer, code, card) into a staging folder and then
  publishes it, so that a crash leaves the previous export or none, never a mix.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: the recorded host and pid are the only guard
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".fat5_hf_run.lock"
PUBLISH_PREFIX = ".publish-"
PUBLISH_PLAN = "publish_plan.json"
# Files whose presence makes `from_pretrained` load a folder: removed first and published last, so that a folder
# caught between two exports has no weights (it does not load) rather than new files beside old weights.
WEIGHT_ENTRY_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


class OutputDirInUseError(RuntimeError):
    """Another live run holds the output folder; the message names it (host, pid, start, command) and what to do."""


class OutputDirNotEmptyError(ValueError):
    """The output folder holds files and neither overwriting nor resuming was asked; the message names the flags."""


# ------------------------------------------------------------------------------------------------ the lock


def _process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), which tells a pid's reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) is in parentheses and may hold spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _command_line() -> str:
    try:  # the exact command, ``python -c`` code included, where Linux gives it
        argv = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        return shlex.join(arg.decode(errors="replace") for arg in argv)
    except OSError:
        return shlex.join([sys.executable, *sys.argv])


def _this_process_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start_ticks": _process_start_ticks(os.getpid()),
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
    }


def _read_record(fd: int) -> dict[str, Any] | None:
    raw = os.pread(fd, 1 << 16, 0)
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "pid" in record else None


def _record_is_live(record: dict[str, Any]) -> bool | None:
    """Whether the recorded process still runs: True/False on its own host, None (unknown) from another host."""
    if record.get("host") != socket.gethostname():
        return None
    pid = int(record["pid"])
    if pid == os.getpid():  # a record of this process that its own OS lock did not stop: left by a lost handle
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    recorded_start, current_start = record.get("process_start_ticks"), _process_start_ticks(pid)
    return recorded_start is None or current_start is None or recorded_start == current_start


def _describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "a run that is starting (its details are not written yet)"
    return (
        f"pid {record['pid']} on host {record.get('host', '?')}, started {record.get('start_time', '?')} "
        f"(command: {record.get('command', '?')})"
    )


def _in_use_error(output_dir: Path, record: dict[str, Any] | None, note: str = "") -> OutputDirInUseError:
    return OutputDirInUseError(
        f"{output_dir} is in use by another run: {_describe(record)}. Two runs in one folder overwrite each other's "
        f"checkpoints, logs and model. Wait for that run to end or stop it, or choose another output folder.{note}"
    )


def _refuse_live_record(output_dir: Path, lock_path: Path, record: dict[str, Any] | None) -> None:
    """The network-filesystem fallback: the OS lock was granted, yet the record may name a live run."""
    if record is None:
        return
    live = _record_is_live(record)
    if live is None:
        raise _in_use_error(
            output_dir,
            record,
            f" The run was started on another host, where this one cannot check it (OS locks do not reach across "
            f"hosts on some network filesystems). If it has ended, delete {lock_path} and start again.",
        )
    if live:
        raise _in_use_error(
            output_dir, record, " (Its OS lock was not seen: this filesystem may not support file locks.)"
        )


class OutputDirLock:
    """The held lock of an output folder (see `hold_output_dir`); released by `release`, at the end of a ``with``
    block, or by the OS when the process dies. On processes that did not take it (``held`` False) it does nothing."""

    def __init__(self, output_dir: Path, fd: int | None = None):
        self.output_dir = output_dir
        self.lock_path = output_dir / LOCK_FILE
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Removes the lock file, then drops the OS lock (in this order: a run waiting on the old file then sees it
        was unlinked and locks a new one)."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.lock_path).st_ino:
                self.lock_path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"OutputDirLock({str(self.output_dir)!r}, held={self.held})"


def lock_output_dir(output_dir: str | os.PathLike) -> OutputDirLock:
    """Takes the exclusive lock on ``output_dir`` (creating it) without looking at its contents; `hold_output_dir`
    is the whole check a recipe needs. Raises `OutputDirInUseError` if a live run holds it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_path = output_dir / LOCK_FILE
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _in_use_error(output_dir, _read_record(fd)) from None
            try:
                # The holder may have released (and unlinked) the file between our open and our lock.
                current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            previous = _read_record(fd)
            _refuse_live_record(output_dir, lock_path, previous)
            if previous is not None:
                logger.warning(
                    "Taking over %s: it was held by %s, which is no longer running (it ended without releasing the "
                    "folder, e.g. killed). Its files are left as they were.",
                    output_dir,
                    _describe(previous),
                )
            record = json.dumps(_this_process_record(), indent=1).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return OutputDirLock(output_dir, fd)


def ensure_output_dir_free(output_dir: str | os.PathLike, *, is_main_process: bool = True) -> None:
    """Raises `OutputDirInUseError` if a live run holds ``output_dir``; creates and changes nothing.

    For the early, read-only checks of a recipe, so that a second run stops before loading its data and model. In a
    launch of several processes every process calls it: the main one checks (the others could see the lock their
    own main process has just taken), and all raise its error.
    """
    error = None
    if is_main_process:
        try:
            _refuse_if_held(Path(output_dir))
        except OutputDirInUseError as err:
            error = err
    error = _share_outcome(error, is_main_process)
    if error is not None:
        raise error


def _refuse_if_held(output_dir: Path) -> None:
    lock_path = output_dir / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use_error(output_dir, _read_record(fd)) from None
        _refuse_live_record(output_dir, lock_path, _read_record(fd))
    finally:
        os.close(fd)


def output_dir_contents(output_dir: str | os.PathLike) -> list[Path]:
    """The entries of ``output_dir`` besides its lock file (an empty list if it does not exist)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.name != LOCK_FILE)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_SHARED_ERRORS = {cls.__name__: cls for cls in (OutputDirInUseError, OutputDirNotEmptyError, OSError)}


def _share_outcome(error: Exception | None, is_main_process: bool) -> Exception | None:
    """Gives every process the main process's outcome (over torch.distributed when a process group is up)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:  # never imported: no process group can be up
        return error
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return error
    message = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(message, src=0)
    if is_main_process or message[0] is None:
        return error
    name, text = message[0]
    return _SHARED_ERRORS.get(name, RuntimeError)(f"{name}: {text}" if name not in _SHARED_ERRORS else text)


def hold_output_dir(
    output_dir: str | os.PathLike,
    *,
    overwrite_output_dir: bool = False,
    resume: bool = False,
    is_main_process: bool = True,
    wait_for_everyone: Callable[[], None] | None = None,
    overwrite_hint: str = "--overwrite_output_dir",
    resume_hint: str | None = "--resume_from_checkpoint",
) -> OutputDirLock:
    """Takes the exclusive lock on ``output_dir`` (creating it), then checks it; to be held for the whole run.

    Every process calls it: the main process locks and checks, the others wait for its answer and raise the same
    error when it fails, so that every process exits with one clear message.

    Args:
        output_dir: the run's folder (created with its parents).
        overwrite_output_dir: clear a non-empty folder (everything but the lock file); ignored when ``resume``.
        resume: the folder holds the run to continue: keep it as it is.
        is_main_process: this process takes the lock (``accelerator.is_main_process``).
        wait_for_everyone: the launcher's barrier (``accelerator.wait_for_everyone``), called by every process once
            the answer is known. The answer itself travels over ``torch.distributed`` when a process group is up.
        overwrite_hint, resume_hint: how the recipe's user asks to overwrite or resume, for the error message.

    Returns:
        The held `OutputDirLock` on the main process (a context manager, released by ``release()`` or when the
        process dies), an unheld one on the others.

    Raises:
        OutputDirInUseError: another live run holds the folder (its host, pid, start time and command are named).
        OutputDirNotEmptyError: the folder is not empty and neither ``overwrite_output_dir`` nor ``resume`` is set.
        OSError: the folder cannot be created or written.
    """
    output_dir = Path(output_dir)
    lock = OutputDirLock(output_dir)
    error = None
    if is_main_process:
        try:
            lock = lock_output_dir(output_dir)
            try:
                recover_interrupted_publish(output_dir)
                contents = output_dir_contents(output_dir)
                if contents and not (overwrite_output_dir or resume):
                    hints = f"pass {overwrite_hint} to replace the previous run there"
                    hints += f", {resume_hint} to continue it" if resume_hint else ""
                    raise OutputDirNotEmptyError(
                        f"{output_dir} is not empty ({len(contents)} entries, e.g. {contents[0].name}); "
                        f"{hints}, or choose another folder"
                    )
                if overwrite_output_dir and not resume:
                    for path in contents:
                        _remove(path)
            except BaseException:
                lock.release()
                raise
        except Exception as err:  # shared with the other processes, which would otherwise wait forever
            error = err
    error = _share_outcome(error, is_main_process)
    if wait_for_everyone is not None:
        wait_for_everyone()
    if error is not None:
        raise error
    return lock


# ---------------------------------------------------------------------------------------- launcher death


class LauncherWatch:
    """Stops this worker process when its launcher dies: the launcher's pid is checked by `check`, to call
    between steps (the fallback where Linux's parent-death signal is not available, or was missed)."""

    def __init__(self, launcher_pid: int, stop_signal: int):
        self.launcher_pid = launcher_pid
        self.stop_signal = stop_signal
        self._signalled = False

    def launcher_alive(self) -> bool:
        return os.getppid() == self.launcher_pid

    def check(self) -> None:
        """Sends ``stop_signal`` to this process (once) if the launcher has died, as the parent-death signal does."""
        if not self._signalled and not self.launcher_alive():
            self._signalled = True
            logger.warning("The launcher (pid %d) has died: stopping this worker", self.launcher_pid)
            os.kill(os.getpid(), self.stop_signal)


def launched_by_launcher(environ: dict[str, str] | None = None) -> bool:
    """Whether this process was started by ``torchrun`` (or the DeepSpeed launcher, ``accelerate launch`` with
    several processes: ``LOCAL_RANK``) or by ``accelerate launch`` with one process (``ACCELERATE_DYNAMO_BACKEND``)."""
    environ = os.environ if environ is None else environ
    return "LOCAL_RANK" in environ or "TORCHELASTIC_RUN_ID" in environ or "ACCELERATE_DYNAMO_BACKEND" in environ


def stop_with_launcher(stop_signal: int = signal.SIGTERM, *, force: bool = False) -> LauncherWatch | None:
    """Makes this process receive ``stop_signal`` when its launcher dies; call it early in a worker.

    Without it, killing ``torchrun`` or ``accelerate launch`` (SIGKILL, a lost terminal) leaves its workers training
    and writing into the output folder. SIGTERM (the default) lets a recipe that handles it stop cleanly. A process
    that was not started by a launcher (``python recipe.py``, perhaps under ``nohup``) is left alone unless
    ``force``: its parent is a shell, whose end must not stop it.

    Returns:
        A `LauncherWatch` whose ``check()`` the loop calls between steps, or None when not launched by a launcher.
    """
    if not (force or launched_by_launcher()):
        return None
    launcher_pid = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(stop_signal), 0, 0, 0) != 0:
            logger.warning(
                "prctl(PR_SET_PDEATHSIG) failed (errno %d): relying on checks between steps", ctypes.get_errno()
            )
    watch = LauncherWatch(launcher_pid, int(stop_signal))
    watch.check()  # the launcher may have died before the signal was armed
    return watch


# ------------------------------------------------------------------------------------- durable checkpoints


def _fsync_path(path: Path, directory: bool) -> None:
    if directory and not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open a folder to flush it
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a folder's entries (a rename or a new file in it); a no-op where folders cannot be opened (Windows)."""
    _fsync_path(Path(path), directory=True)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flushes every file under ``path``, then every folder (their entries), bottom-up, then ``path`` itself.

    Call it before the rename that publishes a folder: without it, a power loss after the rename can leave the
    published name pointing at files whose data never reached the disk.
    """
    path = Path(path)
    if path.is_file():
        _fsync_path(path, directory=False)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name, directory=False)
        _fsync_path(Path(root), directory=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(path: str | os.PathLike, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Every file under ``path`` (relative POSIX path, sorted) -> ``{"size": bytes, "sha256": hex digest}``.

    ``exclude``: relative paths left out (e.g. the state file the manifest is written into).
    """
    path, excluded = Path(path), set(exclude)
    manifest = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative not in excluded:
            manifest[relative] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    return manifest


def verify_file_manifest(path: str | os.PathLike, manifest: dict[str, dict[str, Any]]) -> list[str]:
    """What differs between the files under ``path`` and ``manifest`` (`file_manifest`'s format): one line per
    missing file, wrong size or wrong checksum; an empty list when every recorded file is intact. Sizes are checked
    before any checksum is computed, so a truncated file is found without reading the others."""
    path = Path(path)
    problems, present = [], {}
    for relative, expected in manifest.items():
        file = path / relative
        if not file.is_file():
            problems.append(f"{relative}: missing")
        elif (size := file.stat().st_size) != expected["size"]:
            problems.append(f"{relative}: {size} bytes, {expected['size']} expected")
        else:
            present[relative] = expected
    if problems:
        return problems
    for relative, expected in present.items():
        if _sha256(path / relative) != expected["sha256"]:
            problems.append(f"{relative}: checksum differs from the one recorded")
    return problems


# ---------------------------------------------------------------------------------------- atomic export


def _publish_order(names: Iterable[str]) -> list[str]:
    """Weight entry files last (see `WEIGHT_ENTRY_FILES`)."""
    return sorted(names, key=lambda name: (name in WEIGHT_ENTRY_FILES, name))


def _finish_publish(final_dir: Path, wrapper: Path) -> None:
    """Moves a complete staged export (``wrapper/<final_dir.name>``, planned in ``wrapper/publish_plan.json``)
    into ``final_dir``. Idempotent: after a crash in the middle, running it again completes the same export."""
    plan = json.loads((wrapper / PUBLISH_PLAN).read_text(encoding="utf-8"))
    staged = wrapper / final_dir.name
    new_names, keep = set(plan["names"]), set(plan["keep"])
    old = [
        p.name
        for p in final_dir.iterdir()
        if p.name not in keep
        and p.name not in new_names
        and p.name != LOCK_FILE
        and not p.name.startswith(PUBLISH_PREFIX)
    ]
    # The previous export's weights go first: from here until the last move the folder does not load.
    replaced_weights = [n for n in new_names if n in WEIGHT_ENTRY_FILES and (staged / n).exists()]
    for name in reversed(_publish_order(old + replaced_weights)):
        _remove(final_dir / name)
    for name in _publish_order(new_names):
        source = staged / name
        if source.exists():  # absent when a previous attempt moved it already
            if (final_dir / name).is_dir():
                shutil.rmtree(final_dir / name)
            os.replace(source, final_dir / name)
    _fsync_path(final_dir, directory=True)
    shutil.rmtree(wrapper)


def recover_interrupted_publish(final_dir: str | os.PathLike) -> None:
    """Completes an export that a crash interrupted while it was being moved into ``final_dir``, and removes the
    staging folders of exports interrupted while they were written (the previous export then stands).

    `hold_output_dir` calls it once the lock is held; call it yourself only while holding ``final_dir``.
    """
    final_dir = Path(final_dir)
    if not final_dir.is_dir():
        return
    for wrapper in sorted(final_dir.glob(f"{PUBLISH_PREFIX}*")):
        if (wrapper / PUBLISH_PLAN).is_file():
            logger.warning("Completing the export into %s that an earlier run left half-published", final_dir)
            _finish_publish(final_dir, wrapper)
        else:
            shutil.rmtree(wrapper, ignore_errors=True)


def publish_dir_atomically(
    final_dir: str | os.PathLike, write_fn: Callable[[Path], Any], *, keep: Iterable[str] = ()
) -> None:
    """Writes an export with ``write_fn(folder)`` into a staging folder, flushes it, then publishes it as
    ``final_dir``'s contents: a crash leaves the previous export or none, never new files beside old weights.

    The staging folder has ``final_dir``'s name (writers that name things after their folder, e.g. a model card's
    model id, see the final name). A new ``final_dir`` is published by one rename. An existing one (say a run's
    folder that also holds its checkpoints, listed in ``keep``) gets the staged entries moved in after the
    previous export's entries are removed, weights removed first and published last, under a plan written
    beforehand; `recover_interrupted_publish` (called by `hold_output_dir`) completes it after a crash. Hold
    ``final_dir`` (`hold_output_dir`) while publishing into it.

    Args:
        final_dir: the folder that receives the export.
        write_fn: writes the export into the folder it is given (e.g. ``model.save_pretrained``).
        keep: names of ``final_dir``'s entries that are not part of the export and stay (checkpoints, logs).
    """
    final_dir = Path(final_dir)
    recover_interrupted_publish(final_dir)  # an earlier export cut short completes first, as its plan says
    existing = final_dir.is_dir()
    parent = final_dir if existing else final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    wrapper = Path(
        tempfile.mkdtemp(prefix=PUBLISH_PREFIX if existing else f".{final_dir.name}{PUBLISH_PREFIX}", dir=parent)
    )
    try:
        staged = wrapper / final_dir.name
        staged.mkdir(mode=0o777)  # permissions from the umask, unlike mkdtemp's 0700
        write_fn(staged)
        fsync_tree(staged)
        if not existing:
            os.rename(staged, final_dir)  # fails, rather than merging, if another writer created it meanwhile
            _fsync_path(parent, directory=True)
            shutil.rmtree(wrapper)
            return
        plan = {"names": sorted(p.name for p in staged.iterdir()), "keep": sorted(set(keep))}
        (wrapper / PUBLISH_PLAN).write_text(json.dumps(plan), encoding="utf-8")
        fsync_tree(wrapper)
    except BaseException:
        shutil.rmtree(wrapper, ignore_errors=True)
        raise
    _finish_publish(final_dir, wrapper)
