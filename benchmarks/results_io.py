"""The one results format of the benchmark scripts: ``results/<script>.json`` and ``results/<script>.md``.

Every script writes through :func:`write_results`, so that each benchmark has exactly one current result, in one
shape::

    {"environment": {"gpu", "gpus", "torch", "cuda", "triton", "transformers", "python", "date", "commit", ...},
     "args": {...the script's arguments...},
     "rows": [{...one measured case...}, ...]}

and a markdown file with a title, the environment line, how the numbers were taken, and the rows' table (or the
script's own tables of the same rows). Scripts import this module by name: they run as ``python benchmarks/<script>.py``,
which puts ``benchmarks/`` first on the path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
ENVIRONMENT_KEYS = ("gpu", "gpus", "torch", "cuda", "triton", "transformers", "python", "date", "commit")
RESULT_KEYS = ("environment", "args", "rows")


def git_commit(repo: str | os.PathLike = REPO_ROOT) -> str | None:
    """Short hash of the checked-out commit, with ``-dirty`` when tracked files differ from it. Outside a git
    checkout (a copy of the files on a GPU machine), the ``FAT5_COMMIT`` environment variable, else None."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=repo, capture_output=True, text=True,
            timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FAT5_COMMIT") or None
    return described.stdout.strip() or os.environ.get("FAT5_COMMIT") or None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(**extra: Any) -> dict:
    """The environment block of a result: GPU name and count ("CPU", 0 without CUDA), versions of torch, CUDA,
    triton, transformers and Python (None where absent), the UTC date and the git commit; ``extra`` keys (a
    benchmark's own, such as ``liger_kernel``) follow, and may override ``gpus`` (the GPUs a run used)."""
    import torch

    cuda = torch.cuda.is_available()
    env = dict(
        gpu=torch.cuda.get_device_name() if cuda else "CPU",
        gpus=torch.cuda.device_count() if cuda else 0,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=_version("triton"),
        transformers=_version("transformers"),
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(),
    )
    env.update(extra)
    return env


def environment_line(env: dict) -> str:
    """One line naming the run: GPU (count), versions, date and commit."""
    gpus = f" x{env['gpus']}" if env.get("gpus", 1) not in (0, 1) else ""
    parts = [f"{env['gpu']}{gpus}", f"torch {env['torch']}"]
    parts += [f"{name} {env[key]}" for key, name in (("cuda", "CUDA"), ("triton", "triton"),
                                                    ("transformers", "transformers"), ("python", "Python"))
              if env.get(key)]  # fmt: skip
    parts += [f"{key.replace('_', '-')} {value}" for key, value in env.items()
              if key not in ENVIRONMENT_KEYS and value is not None]  # fmt: skip
    parts.append(f"{env['date']}, commit {env['commit'] or 'unknown'}")
    return ", ".join(parts) + "."


@dataclass(frozen=True)
class Column:
    """One column of a markdown table: its header, the row field (or a function of the row) and a format spec.

    A missing field gives an empty cell; ``fmt`` applies to numbers only (``",.0f"``, ``".3f"``...)."""

    header: str
    value: str | Callable[[dict], Any]
    fmt: str = ""

    def cell(self, row: dict) -> str:
        value = self.value(row) if callable(self.value) else row.get(self.value)
        if value is None:
            return ""
        if self.fmt and isinstance(value, int | float) and not isinstance(value, bool):
            value = format(value, self.fmt)
        return " ".join(str(value).split()).replace("|", "/")


def scalar_columns(rows: Sequence[dict]) -> list[Column]:
    """A column per field holding a number, string or bool in some row, in first-seen order (lists and dicts,
    such as every timing run, stay in the JSON)."""
    names = dict.fromkeys(key for row in rows for key, value in row.items() if isinstance(value, str | int | float | bool))
    return [Column(name, name) for name in names]


def markdown_table(rows: Sequence[dict], columns: Sequence[Column] | None = None) -> str:
    """The rows as a markdown table (``columns`` default: :func:`scalar_columns`)."""
    columns = list(columns) if columns is not None else scalar_columns(rows)
    if not columns:
        raise ValueError("markdown_table needs at least one column (the rows hold no scalar field)")
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _plain_args(args: argparse.Namespace | dict | None) -> dict:
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return json.loads(json.dumps(args, default=str))  # paths and other objects as strings


def write_results(
    script: str,
    rows: Sequence[dict],
    *,
    env: dict,
    args: argparse.Namespace | dict | None = None,
    title: str,
    method: str = "",
    columns: Sequence[Column] | None = None,
    body: str | None = None,
    output_dir: str | os.PathLike = RESULTS_DIR,
) -> tuple[Path, Path]:
    """Write ``<output_dir>/<script>.json`` and ``<script>.md``; returns their paths.

    Args:
        script: the benchmark script's name without ``.py`` (``"attention"``): the files' stem.
        rows: one dict per measured case (JSON-serializable values).
        env: the run's :func:`environment` (every key of ``ENVIRONMENT_KEYS`` required).
        args: the script's parsed arguments, recorded as given.
        title: the markdown's heading.
        method: a paragraph on how the numbers were taken and how to read them.
        columns: the table's columns (default: every scalar field), unless ``body`` is given.
        body: markdown of the script's own tables of these rows, in place of the one table.
        output_dir: where to write (created if missing).

    Both files are written to a temporary name first and then moved into place, so an interrupted write never
    leaves a half-written result over the previous one.
    """
    if not script or Path(script).name != script or script.endswith((".json", ".md", ".py")):
        raise ValueError(f"script must be a benchmark script's bare name such as 'attention', got {script!r}")
    missing = [key for key in ENVIRONMENT_KEYS if key not in env]
    if missing:
        raise ValueError(f"the environment of {script} lacks {missing}: build it with results_io.environment()")
    if not all(isinstance(row, dict) for row in rows):
        raise TypeError(f"rows of {script} must be dicts, one per measured case")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = {"environment": env, "args": _plain_args(args), "rows": list(rows)}
    parts = [f"# {title}", environment_line(env) + f" Written by `benchmarks/{script}.py`."]
    if method:
        parts.append(method.strip())
    if rows:
        parts.append((body if body is not None else markdown_table(rows, columns)).strip())
    json_path, md_path = output_dir / f"{script}.json", output_dir / f"{script}.md"
    _replace(json_path, json.dumps(result, indent=1) + "\n")
    _replace(md_path, "\n\n".join(parts) + "\n")
    return json_path, md_path


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def read_results(path: str | os.PathLike) -> dict:
    """A results file, checked to have the one shape (raises ValueError naming the file and what it lacks)."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    missing = [key for key in RESULT_KEYS if key not in result]
    missing += [f"environment.{key}" for key in ENVIRONMENT_KEYS if key not in result.get("environment", {})]
    if missing:
        raise ValueError(f"{path} is not a benchmark result of the current shape: it lacks {missing}")
    return result
