"""Train a T5-style SentencePiece (Unigram) tokenizer for FAT5 pretraining.

The result is a Hugging Face fast tokenizer (``tokenizer.json`` + config) loadable with
``AutoTokenizer.from_pretrained(output_dir)``, laid out like T5's:

* ids 0, 1, 2 are ``<pad>``, ``</s>`` (eos), ``<unk>``; ``</s>`` is appended to every encoded sequence;
* 256 byte pieces ``<0x00>``..``<0xFF>`` (byte fallback: characters never seen in training are encoded as their
  UTF-8 bytes instead of ``<unk>``);
* the learned Unigram pieces;
* the UL2 mode tokens (``[R]``, ``[S]``, ``[X]`` by default) and the sentinels, ``<extra_id_0>`` with the HIGHEST id
  (``<extra_id_k>`` = ``vocab_size - 1 - k``), all registered as special tokens: never split, never ``<unk>``.

The pretraining data path tokenizes raw documents with ``split_special_tokens=True``
(`fat5_hf.packing.make_tokenize_function`), so that the text ``[X]`` or ``<extra_id_0>`` written in a document stays
text; called as usual (``tokenizer("[S] ...")``), the tokenizer maps those strings to their special ids, as fine-tuning
prompts expect.

Normalization is French-friendly and T5-like: NFKC (composes accents, turns non-breaking spaces into spaces), case
and accents kept, every run of whitespace (newlines included, as T5) collapsed to one space, ``▁`` word-boundary
marker before every word (SentencePiece's "Metaspace"). ``clean_up_tokenization_spaces`` is off so French spacing
before ``! ? ; :`` survives decoding.

``model_max_length`` is the encoder input length the model is trained for: the pretraining recipe's
``data.max_input_length`` (``--config``, the embedded tiny run by default) or ``--model-max-length``. The tokenizer then
warns when a text is longer (and ``truncation=True`` cuts there) instead of reporting an unbounded length.

We train with the ``tokenizers`` library's Unigram trainer rather than the ``sentencepiece`` trainer: it reads any
Python iterator (a streamed ``datasets`` dataset included) without writing a temporary text file, and it builds the
fast tokenizer directly, so the special-token layout above is set explicitly instead of converted from a ``.model``.

Examples::

    python recipes/train_tokenizer.py --files recipes/data/fr_corpus_train.jsonl --vocab-size 2048 \\
        --output-dir recipes/data/tokenizer
    python recipes/train_tokenizer.py --dataset wikimedia/wikipedia --dataset-config 20231101.fr \\
        --max-documents 500000 --vocab-size 32768 --output-dir tokenizer-fr-32k \\
        --config recipes/configs/pretrain-fat5-small.yaml
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from fat5_hf.output_dir import (
    OutputDirInUseError,
    ensure_output_dir_free,
    lock_output_dir,
    output_dir_contents,
    publish_dir_atomically,
)

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
DEFAULT_MODE_TOKENS = ("[R]", "[S]", "[X]")
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]
# Characters of French (and its typography) kept in the alphabet even if a corpus lacks some of them.
FRENCH_ALPHABET = list("àâäçéèêëîïôöùûüÿœæÀÂÄÇÉÈÊËÎÏÔÖÙÛÜŸŒÆ«»’€")
# File suffix -> `datasets` builder used to stream it.
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

__all__ = ["iter_texts_from_dataset", "iter_texts_from_files", "main", "save_tokenizer", "train_tokenizer"]


def _file_builder(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    builder = FILE_BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise ValueError(f"Unsupported file type {path.name!r}: use one of {sorted(FILE_BUILDERS)} (optionally .gz).")
    return builder


def iter_texts_from_files(files: Sequence[str | os.PathLike], text_column: str = "text") -> Iterator[str]:
    """Stream the documents of local ``.txt`` (one per line), ``.json``/``.jsonl``/``.csv``/``.parquet`` files.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is empty, of an unsupported type, or mixes types with the others.
    """
    paths = [Path(f) for f in files]
    builder = _check_files(paths)
    return _stream_files(paths, builder, text_column)


def _check_files(paths: list[Path]) -> str:
    if not paths:
        raise ValueError("No input files given.")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Training file not found: {str(path)!r}.")
        if path.stat().st_size == 0:
            raise ValueError(f"Training file is empty: {str(path)!r}.")
    builders = {_file_builder(p) for p in paths}
    if len(builders) > 1:
        raise ValueError(f"Mixed file types ({sorted(builders)}); train on files of one type at a time.")
    return builders.pop()


def _stream_files(paths: list[Path], builder: str, text_column: str) -> Iterator[str]:
    import datasets

    dataset = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", streaming=True)
    yield from _iter_column(dataset, text_column, source=", ".join(str(p) for p in paths))


def iter_texts_from_dataset(
    name: str,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    data_files: Sequence[str] | None = None,
) -> Iterator[str]:
    """Stream the documents of a ``datasets`` dataset (``load_dataset(name, config, streaming=True)``)."""
    import datasets

    dataset = datasets.load_dataset(name, config, split=split, data_files=data_files, streaming=True)
    yield from _iter_column(dataset, text_column, source=name)


def _iter_column(dataset, text_column: str, source: str) -> Iterator[str]:
    for index, example in enumerate(dataset):
        if text_column not in example:
            raise KeyError(
                f"{source}: no column {text_column!r} (columns: {sorted(example)}); pass --text-column."
            )
        text = example[text_column]
        if text is None:
            continue
        if not isinstance(text, str):
            raise TypeError(f"{source}: row {index} column {text_column!r} is {type(text).__name__}, not text.")
        if text.strip():
            yield text


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(left=True, right=True)]
    )


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)


def _decoder() -> decoders.Decoder:
    return decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    num_sentinels: int = 100,
    mode_tokens: Sequence[str] = DEFAULT_MODE_TOKENS,
    max_piece_length: int = 16,
    byte_fallback: bool = True,
    show_progress: bool = False,
    model_max_length: int | None = None,
):
    """Train the tokenizer and wrap it as a ``transformers.PreTrainedTokenizerFast``.

    Args:
        texts: documents (any iterable, consumed once).
        vocab_size: total vocabulary size, special tokens, byte pieces, mode tokens and sentinels included. A small
            corpus may yield fewer learned pieces; the returned tokenizer then has ``len(tokenizer) < vocab_size``.
        num_sentinels: number of ``<extra_id_k>`` tokens (T5: 100).
        mode_tokens: UL2 mode tokens to register as special tokens.
        max_piece_length: longest learned piece, in characters.
        byte_fallback: encode unseen characters as UTF-8 byte pieces instead of ``<unk>``.
        show_progress: show the trainer's progress bars.
        model_max_length: the model's input length, saved in ``tokenizer_config.json`` (``None``: unbounded, as
            transformers' default of 1e30).

    Returns:
        A ``PreTrainedTokenizerFast`` with pad=0, eos=1, unk=2 and ``<extra_id_0>`` as its highest id.
    """
    from transformers import PreTrainedTokenizerFast

    mode_tokens = list(mode_tokens)
    if len(set(mode_tokens)) != len(mode_tokens):
        raise ValueError(f"Duplicate mode tokens: {mode_tokens}.")
    base_specials = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN] + (BYTE_TOKENS if byte_fallback else [])
    trainer_vocab_size = vocab_size - num_sentinels - len(mode_tokens)
    minimum = len(base_specials) + len(FRENCH_ALPHABET) + 16
    if trainer_vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the special tokens, byte pieces, {len(mode_tokens)} mode tokens "
            f"and {num_sentinels} sentinels leave {trainer_vocab_size} ids; use at least "
            f"{minimum + num_sentinels + len(mode_tokens)}."
        )

    counting = _CountingIterator(texts)
    backend = Tokenizer(models.Unigram())
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.UnigramTrainer(
        vocab_size=trainer_vocab_size,
        special_tokens=base_specials,
        unk_token=UNK_TOKEN,
        initial_alphabet=FRENCH_ALPHABET,
        max_piece_length=max_piece_length,
        show_progress=show_progress,
    )
    backend.train_from_iterator(counting, trainer=trainer)
    if counting.count == 0:
        raise ValueError("No text to train on: every document was empty.")

    # Rebuild the model from the learned (piece, score) list to switch byte fallback on (the trainer has no such
    # option); pad/eos/unk stay 0/1/2 and the byte pieces follow.
    learned = json.loads(backend.to_str())["model"]["vocab"]
    num_fixed = len(base_specials)
    assert [p for p, _ in learned[:num_fixed]] == base_specials
    vocab = [(piece, 0.0) for piece in base_specials] + _canonical_pieces(learned[num_fixed:])
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=byte_fallback))
    tokenizer.normalizer = _normalizer()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = _decoder()
    tokenizer.add_special_tokens([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
    # Appended last, sentinels in decreasing index order: <extra_id_0> gets the highest id, as in T5.
    sentinels = [f"<extra_id_{k}>" for k in range(num_sentinels)]
    tokenizer.add_special_tokens(mode_tokens + sentinels[::-1])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, 1)]
    )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=mode_tokens + sentinels,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": model_max_length} if model_max_length is not None else {}),
    )
    _check_layout(wrapped, mode_tokens, num_sentinels)
    return wrapped


def _canonical_pieces(pieces: list[list]) -> list[tuple[str, float]]:
    """Make the learned vocabulary identical from run to run.

    The trainer's scores carry floating-point noise (~1e-14, from parallel summation order) that reorders near-ties,
    and it appends the characters that EM did not keep in hash-map order with artificial scores 1e-4 apart. We give
    that trailing block of single characters one common score, round all scores, and sort by (score, piece).
    """
    pieces = [(piece, float(score)) for piece, score in pieces]
    # Walk back over consecutive single characters whose scores step by the trainer's 1e-4.
    tail_start = len(pieces) - 1
    while (
        tail_start > 0
        and len(pieces[tail_start][0]) == 1
        and len(pieces[tail_start - 1][0]) == 1
        and 0.0 <= pieces[tail_start - 1][1] - pieces[tail_start][1] < 1.5e-4
    ):
        tail_start -= 1
    if tail_start < len(pieces) - 1:
        tail_score = max(score for _, score in pieces[tail_start:])
        pieces[tail_start:] = [(piece, tail_score) for piece, _ in pieces[tail_start:]]
    return sorted(((piece, round(score, 8)) for piece, score in pieces), key=lambda item: (-item[1], item[0]))


class _CountingIterator:
    """Wraps the text stream to count non-empty documents (the trainer swallows an empty stream silently)."""

    def __init__(self, texts: Iterable[str]):
        self._texts = iter(texts)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        text = next(self._texts)
        self.count += 1
        return text


def _check_layout(tokenizer, mode_tokens: Sequence[str], num_sentinels: int) -> None:
    vocab = tokenizer.get_vocab()
    size = len(tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for k in range(num_sentinels):
        assert vocab[f"<extra_id_{k}>"] == size - 1 - k, "sentinel ids must count down from the last id"
    for token in mode_tokens:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [vocab[token]]


def save_tokenizer(tokenizer, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save atomically (`fat5_hf.output_dir.publish_dir_atomically`: written aside, then published), holding the
    folder's lock meanwhile, so that a folder a running recipe holds is refused rather than overwritten.

    Refuses a non-empty ``output_dir`` unless ``overwrite``; an error while saving leaves the previous contents.
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    with lock_output_dir(output_dir):
        publish_dir_atomically(output_dir, tokenizer.save_pretrained)
    return output_dir


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output-dir {str(output_dir)!r} exists and is not a folder.")
    ensure_output_dir_free(output_dir)
    if output_dir_contents(output_dir) and not overwrite:
        raise FileExistsError(
            f"--output-dir {str(output_dir)!r} exists and is not empty; pass --overwrite to replace it."
        )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a T5-style Unigram tokenizer (sentinels, UL2 mode tokens, byte fallback).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--files", nargs="+", help="local .txt (one document per line), .jsonl/.json, .csv, .parquet")
    source.add_argument("--dataset", help="a datasets name or builder (streamed), e.g. wikimedia/wikipedia or json")
    parser.add_argument("--dataset-config", default=None, help="dataset configuration name, e.g. 20231101.fr")
    parser.add_argument("--data-files", nargs="+", default=None, help="data_files passed to load_dataset")
    parser.add_argument("--split", default="train", help="dataset split")
    parser.add_argument("--text-column", default="text", help="column holding the text")
    parser.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    parser.add_argument("--vocab-size", type=int, default=32_768, help="total size, special tokens included")
    parser.add_argument("--num-sentinels", type=int, default=100, help="number of <extra_id_k> tokens")
    parser.add_argument("--mode-tokens", nargs="*", default=list(DEFAULT_MODE_TOKENS), help="UL2 mode tokens")
    parser.add_argument("--max-piece-length", type=int, default=16, help="longest learned piece (characters)")
    parser.add_argument("--no-byte-fallback", action="store_true", help="map unseen characters to <unk>")
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--config",
        default=None,
        help="pretraining config (YAML) whose data.max_input_length becomes the tokenizer's model_max_length "
        "(default: the recipe's embedded tiny run)",
    )
    length.add_argument("--model-max-length", type=int, default=None, help="the model's input length, in tokens")
    parser.add_argument("--output-dir", required=True, help="where to save the tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args(argv)
    if args.max_documents is not None and args.max_documents < 1:
        parser.error("--max-documents must be positive.")
    if args.num_sentinels < 0:
        parser.error("--num-sentinels must be >= 0.")
    if args.model_max_length is not None and args.model_max_length < 1:
        parser.error("--model-max-length must be positive.")
    return args


def resolve_model_max_length(args: argparse.Namespace) -> int:
    """``--model-max-length``, else ``data.max_input_length`` of the pretraining config ``--config`` (or defaults)."""
    if args.model_max_length is not None:
        return args.model_max_length
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pretrain_config import ConfigError, load_config

    try:
        return load_config(args.config).data.max_input_length
    except ConfigError as err:
        raise ValueError(f"--config: {err}") from err


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, TypeError, OutputDirInUseError) as err:
        print(f"train_tokenizer.py: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    # Fail before the (possibly long) training on everything that can be checked up front.
    _check_output_dir(Path(args.output_dir), args.overwrite)
    model_max_length = resolve_model_max_length(args)
    if args.files:
        texts = iter_texts_from_files(args.files, args.text_column)
    else:
        texts = iter_texts_from_dataset(
            args.dataset, args.dataset_config, args.split, args.text_column, args.data_files
        )
    if args.max_documents is not None:
        texts = itertools.islice(texts, args.max_documents)
    tokenizer = train_tokenizer(
        texts,
        vocab_size=args.vocab_size,
        num_sentinels=args.num_sentinels,
        mode_tokens=args.mode_tokens,
        max_piece_length=args.max_piece_length,
        byte_fallback=not args.no_byte_fallback,
        show_progress=sys.stderr.isatty(),
        model_max_length=model_max_length,
    )
    output_dir = save_tokenizer(tokenizer, args.output_dir, overwrite=args.overwrite)
    print(
        f"Saved a tokenizer of {len(tokenizer)} tokens (requested {args.vocab_size}) to {output_dir}: "
        f"pad={tokenizer.pad_token_id} eos={tokenizer.eos_token_id} unk={tokenizer.unk_token_id}, "
        f"<extra_id_0>={tokenizer.convert_tokens_to_ids('<extra_id_0>') if args.num_sentinels else None}, "
        f"mode tokens {dict(zip(args.mode_tokens, tokenizer.convert_tokens_to_ids(args.mode_tokens)))}, "
        f"model_max_length={tokenizer.model_max_length}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
