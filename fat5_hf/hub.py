"""Hub export with custom code: the modeling files and the kernels, flattened into one folder.

transformers' remote-code loader copies only the modeling file and its *same-folder* relative
imports (``from .x import y``) into its module cache, so a saved FAT5 folder carries:

- ``configuration_fat5.py``, ``modeling_fat5.py`` and their helpers from ``fat5_hf``;
- the modules of ``fat5_kernels`` that the model uses (the Triton kernels and their PyTorch references), copied next
  to them with ``from fat5_kernels.x import`` rewritten to ``from .x import``;
- an ``auto_map`` in ``config.json`` naming the classes for each Auto class.

``AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)`` then works where fat5-hf
is not installed: with triton on a GPU it runs the kernels, otherwise the PyTorch path.

This module is itself part of the exported code (the models' ``save_pretrained`` calls it), so it
imports nothing from fat5_hf or fat5_kernels and finds its sources from its own location: the
package layout in a source or pip install, or the flat layout of an exported folder.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

# The files of fat5_hf that the exported model needs (the rest of fat5_hf, conversion and the data
# pipeline, are not part of the model).
MODEL_CODE_FILES = (
    "configuration_fat5.py",
    "modeling_fat5.py",
    "position_encoding.py",
    "kernel_ops.py",
    "unpadding.py",
    "hub.py",
)

# Modules of fat5_kernels that no model code imports (the optimizer's kernel): not exported, since the remote-code
# loader would not copy them into its module cache either.
NON_MODEL_KERNEL_FILES = frozenset({"__init__.py", "adamw_scale.py"})

# Auto class -> "module.Class" as transformers expects in config.json's auto_map.
AUTO_MAP = {
    "AutoConfig": "configuration_fat5.FAT5Config",
    "AutoModel": "modeling_fat5.FAT5Model",
    "AutoModelForSeq2SeqLM": "modeling_fat5.FAT5ForConditionalGeneration",
    "AutoModelForTextEncoding": "modeling_fat5.FAT5EncoderModel",
    "AutoModelForSequenceClassification": "modeling_fat5.FAT5ForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_fat5.FAT5ForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_fat5.FAT5ForQuestionAnswering",
}

_PACKAGE_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from (?:fat5_kernels|fat5_hf)\.(?P<module>\w+) import ", re.MULTILINE)
_UNFLATTENABLE_IMPORT = re.compile(r"^[ \t]*(?:import (?:fat5_kernels|fat5_hf)\b|from (?:fat5_kernels|fat5_hf) import)", re.MULTILINE)


def flatten_imports(source: str, filename: str = "<source>") -> str:
    """Rewrites ``from fat5_kernels.x import y`` / ``from fat5_hf.x import y`` to ``from .x import y``.

    Any other form of import of the two packages cannot be flattened and raises a ``ValueError``
    naming the file, so a new import style fails the export tests instead of a user's load.
    """
    bad = _UNFLATTENABLE_IMPORT.search(source)
    if bad:
        raise ValueError(
            f"{filename}: `{bad.group(0).strip()}` cannot be flattened into a Hub folder; import modules as "
            "`from fat5_kernels.<module> import <name>` (or a same-folder relative import) instead."
        )
    return _PACKAGE_IMPORT.sub(r"\g<indent>from .\g<module> import ", source)


def _code_sources() -> dict[str, Path]:
    """Maps each file name of the exported code to the file it comes from on this machine."""
    here = Path(__file__).resolve().parent
    if (here / "triton_utils.py").exists():
        # Already flat: an exported folder loaded with trust_remote_code (or its module cache).
        kernel_dir = here
    else:
        # Package layout: fat5_hf and fat5_kernels installed side by side. Imported by name so that
        # transformers' import check of this file (once exported) does not ask for fat5_kernels.
        kernel_dir = Path(importlib.import_module("fat5_kernels").__file__).resolve().parent
    sources = {name: here / name for name in MODEL_CODE_FILES}
    for path in sorted(kernel_dir.glob("*.py")):
        if path.name not in NON_MODEL_KERNEL_FILES and path.name not in sources:
            sources[path.name] = path
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"fat5-hf's model code is incomplete, cannot export it; missing: {missing}")
    return sources


def write_remote_code(save_directory: str | os.PathLike) -> list[str]:
    """Writes the flattened model and kernel code into ``save_directory``.

    Args:
        save_directory: an existing folder, usually the one ``save_pretrained`` just wrote.

    Returns:
        The names of the files written, sorted.
    """
    save_directory = Path(save_directory)
    if not save_directory.is_dir():
        raise NotADirectoryError(f"{save_directory} is not a folder; call save_pretrained(...) first")
    written = []
    for name, path in _code_sources().items():
        text = flatten_imports(path.read_text(encoding="utf-8"), filename=str(path))
        target = save_directory / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
        written.append(name)
    return sorted(written)


def add_auto_map(config) -> None:
    """Sets ``config.auto_map`` so that every FAT5 Auto class resolves to the exported code."""
    auto_map = dict(getattr(config, "auto_map", None) or {})
    auto_map.update(AUTO_MAP)
    config.auto_map = auto_map
