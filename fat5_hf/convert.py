"""Convert Hugging Face T5 checkpoints to FAT5 and back.

FAT5 keeps T5's module layout and parameter names, so a conversion rewrites ``config.json``,
checks every weight against the target architecture (names and shapes; a missing or unexpected
key is an error, never a silent random init) and copies the tensors unchanged, in their dtype.

Command line::

    python -m fat5_hf.convert google/t5-v1_1-base ./t5-v1_1-base-fat5        # T5 -> FAT5
    python -m fat5_hf.convert ./my-fat5 ./my-fat5-as-t5 --to-t5                # FAT5 -> T5

SRC is a local folder or, when online, a Hub id. DST must not exist unless ``--overwrite``; the
result is written to a temporary folder beside DST and moved into place only once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .configuration_fat5 import FAT5Config

# T5 families whose checkpoints map one to one onto FAT5 (umT5 has a bias table per layer: not supported).
T5_MODEL_TYPES = ("t5", "mt5")
# Saved by some original T5 checkpoints although no layer uses it (transformers ignores it too).
IGNORED_T5_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# Keys that alias `shared.weight` when the embeddings are tied; checkpoints may or may not store them.
TIED_EMBEDDING_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Files copied along with the weights when present.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "README.md",
)
# Config keys that describe the saved file rather than the architecture.
_CONFIG_BOOKKEEPING_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")


# A Hub model id: "name" or "namespace/name" (a path that does not exist locally and has this shape is looked up on the
# Hub; anything else, e.g. "./x", "/abs/x" or "a/b/c", is a missing local folder).
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message says why and what to do."""


def _resolve_source(src: str | os.PathLike) -> Path:
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"SRC {path} is a file; pass the checkpoint folder that holds config.json")
        return path
    if not _HUB_REPO_ID.fullmatch(str(src)):
        raise ConversionError(f"SRC {src} does not exist (and is not a Hub model id such as 'google/flan-t5-base')")
    # Not a local path: treat it as a Hub id (needs the network unless cached).
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(src),
                allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                                "pytorch_model.bin.index.json", *SIDE_FILES],
            )
        )
    except Exception as err:  # offline, unknown repo, gated repo...
        raise ConversionError(f"SRC {src!r} is neither a local folder nor a downloadable Hub model: {err}") from err


def _read_config(src: Path) -> dict:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{src} has no config.json: it is not a Hugging Face model checkpoint")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_file} is not valid JSON: {err}") from err


def load_state_dict_files(src: Path) -> dict[str, torch.Tensor]:
    """Reads every weight of a checkpoint folder (safetensors or PyTorch .bin, sharded or not) on CPU."""
    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", lambda f: torch.load(f, map_location="cpu", weights_only=True)),
    ):
        index_file = src / index_name
        if index_file.is_file():
            shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(loader(src / shard))
            return state_dict
    if (src / "model.safetensors").is_file():
        return load_file(src / "model.safetensors")
    if (src / "pytorch_model.bin").is_file():
        return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ConversionError(f"{src} holds no weights (model.safetensors or pytorch_model.bin, sharded or not)")


def _expected_shapes(model_class, config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = model_class(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _check_and_untie(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Size], config
) -> tuple[dict[str, torch.Tensor], bool]:
    """Validates names and shapes against the target model; returns the weights to save (ties deduplicated)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in IGNORED_T5_KEYS}
    if "shared.weight" not in state_dict:
        for alias in (*TIED_EMBEDDING_KEYS, "lm_head.weight"):
            if alias in state_dict:  # some exports keep only an alias of the shared embedding
                state_dict["shared.weight"] = state_dict[alias]
                break
    shared = state_dict.get("shared.weight")
    for alias in TIED_EMBEDDING_KEYS:
        if alias in expected and alias not in state_dict and shared is not None:
            state_dict[alias] = shared
    lm_head = state_dict.get("lm_head.weight")
    lm_head_is_tied = lm_head is None or (shared is not None and torch.equal(lm_head, shared))
    if "lm_head.weight" in expected and lm_head is None and shared is not None:
        state_dict["lm_head.weight"] = shared

    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            "the checkpoint does not match the architecture its config.json describes "
            f"(num_layers={config.num_layers}, num_decoder_layers={config.num_decoder_layers}, "
            f"feed_forward_proj={config.feed_forward_proj!r}).\n"
            f"  missing keys ({len(missing)}): {missing}\n  unexpected keys ({len(unexpected)}): {unexpected}\n"
            "Fix config.json so that it describes these weights; nothing was written."
        )
    mismatched = [
        f"{name}: checkpoint {tuple(state_dict[name].shape)} vs config {tuple(shape)}"
        for name, shape in expected.items()
        if state_dict[name].shape != shape
    ]
    if mismatched:
        raise ConversionError(
            "weight shapes disagree with config.json (d_model, d_kv, num_heads, d_ff, vocab_size, "
            f"relative_attention_num_buckets): d_model={config.d_model}, num_heads={config.num_heads}, "
            f"d_kv={config.d_kv} (num_heads*d_kv={config.num_heads * config.d_kv}), d_ff={config.d_ff}, "
            f"vocab_size={config.vocab_size}.\n  " + "\n  ".join(mismatched[:20]) + "\nNothing was written."
        )
    # Store each tensor once: the aliases of `shared` are re-tied by from_pretrained.
    drop = set(TIED_EMBEDDING_KEYS) | ({"lm_head.weight"} if lm_head_is_tied else set())
    return {k: v.contiguous() for k, v in state_dict.items() if k not in drop}, lm_head_is_tied


def _write_atomically(dst: Path, overwrite: bool, write) -> Path:
    """Runs ``write(tmp_dir)`` and moves the result to ``dst``; never leaves a half-written ``dst``."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"DST {dst} already exists; choose another folder or pass --overwrite")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"DST {dst} exists and is not a folder; nothing was written")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        write(tmp)
        if dst.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            dst.rename(backup / dst.name)
            tmp.rename(dst)
            shutil.rmtree(backup)
        else:
            tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def convert_t5_to_fat5(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                       **fat5_overrides) -> Path:
    """Converts a T5 / T5 v1.1 / mT5 / FLAN-T5 checkpoint into a FAT5 checkpoint with custom code.

    Args:
        src: a local checkpoint folder or a Hub id.
        dst: the folder to create.
        overwrite: replace ``dst`` if it exists.
        **fat5_overrides: FAT5-only config fields (e.g. ``z_loss=1e-4``).

    Returns:
        ``dst`` as a Path. Weights keep their names, values and dtypes.
    """
    from .hub import add_auto_map, write_remote_code
    from .modeling_fat5 import FAT5ForConditionalGeneration

    src_dir = _resolve_source(src)
    raw = _read_config(src_dir)
    model_type = raw.get("model_type")
    if model_type not in T5_MODEL_TYPES:
        hint = " (use --to-t5 to convert a FAT5 checkpoint back to T5)" if model_type == "fat5" else ""
        raise ConversionError(
            f"{src_dir} is a {model_type!r} checkpoint, not T5: expected model_type in {T5_MODEL_TYPES}{hint}"
        )
    fields = {k: v for k, v in raw.items() if k not in _CONFIG_BOOKKEEPING_KEYS}
    if model_type == "mt5":
        # mT5 never rescales the decoder output, whatever its config says about tying (transformers 5 writes
        # tie_word_embeddings: true for it); in FAT5's (T5's) terms that is tie_word_embeddings=False.
        fields.pop("scale_decoder_outputs", None)
        fields["tie_word_embeddings"] = False
    config = FAT5Config.from_dict({**fields, **fat5_overrides})
    state_dict = load_state_dict_files(src_dir)
    # An untied lm_head is saved as its own tensor; from_pretrained keeps it untied, as transformers' T5 does.
    to_save, _ = _check_and_untie(state_dict, _expected_shapes(FAT5ForConditionalGeneration, config), config)
    config.architectures = ["FAT5ForConditionalGeneration"]
    add_auto_map(config)

    def write(tmp: Path) -> None:
        config.save_pretrained(tmp)
        save_file(to_save, tmp / "model.safetensors", metadata={"format": "pt"})
        _copy_side_files(src_dir, tmp)
        write_remote_code(tmp)

    return _write_atomically(Path(dst), overwrite, write)


def convert_fat5_to_t5(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Converts a FAT5 checkpoint with T5 position encoding into a plain ``T5ForConditionalGeneration``.

    The result loads with ``transformers.T5ForConditionalGeneration.from_pretrained`` (no custom
    code), so any T5 tool can serve a model trained with fat5-hf.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    src_dir = _resolve_source(src)
    raw = _read_config(src_dir)
    if raw.get("model_type") != "fat5":
        raise ConversionError(f"{src_dir} is a {raw.get('model_type')!r} checkpoint, not FAT5 (model_type 'fat5')")
    fat5_config = FAT5Config.from_dict({k: v for k, v in raw.items() if k not in _CONFIG_BOOKKEEPING_KEYS})
    if fat5_config.position_encoding_type != "t5":
        raise ConversionError(
            f"position_encoding_type={fat5_config.position_encoding_type!r} has no T5 equivalent; only FAT5 models "
            "with position_encoding_type='t5' convert to T5"
        )
    t5_fields = {name: getattr(fat5_config, name) for name in T5Config.__dataclass_fields__ if hasattr(fat5_config, name)}
    for name in ("decoder_start_token_id", "scale_decoder_outputs", "dtype"):
        if getattr(fat5_config, name, None) is not None:
            t5_fields[name] = getattr(fat5_config, name)
    t5_config = T5Config.from_dict(t5_fields)
    state_dict = load_state_dict_files(src_dir)
    to_save, lm_head_is_tied = _check_and_untie(
        state_dict, _expected_shapes(T5ForConditionalGeneration, t5_config), t5_config
    )
    if not lm_head_is_tied and not t5_config.scale_decoder_outputs:
        # transformers 5 writes tie_word_embeddings: true for T5 and unties on load when the checkpoint
        # holds a distinct lm_head; saying False keeps older transformers from tying it.
        t5_config.tie_word_embeddings = False
    t5_config.architectures = ["T5ForConditionalGeneration"]

    def write(tmp: Path) -> None:
        t5_config.save_pretrained(tmp)
        save_file(to_save, tmp / "model.safetensors", metadata={"format": "pt"})
        _copy_side_files(src_dir, tmp)

    return _write_atomically(Path(dst), overwrite, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fat5_hf.convert",
        description="Convert a Hugging Face T5 / T5 v1.1 / mT5 / FLAN-T5 checkpoint to FAT5, or FAT5 back to T5.",
    )
    parser.add_argument("src", help="checkpoint folder, or a Hub id when online")
    parser.add_argument("dst", help="folder to create")
    parser.add_argument("--to-t5", action="store_true", help="convert a FAT5 checkpoint back to a plain T5")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        if args.to_t5:
            out = convert_fat5_to_t5(args.src, args.dst, overwrite=args.overwrite)
        else:
            out = convert_t5_to_fat5(args.src, args.dst, overwrite=args.overwrite)
    except ConversionError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
