"""Document packing: turn tokenized documents into fixed-length rows for pretraining.

Documents are joined into one token stream, each followed by eos, and the stream is cut into rows of
``chunk_length`` tokens (use `DataCollatorForUL2.chunk_length` so the UL2 collator never has to truncate). Each row
also gets ``document_ids``: one int per token, the index (within the row, from 0) of the document the token comes
from, so the collator can denoise documents separately and a model can keep attention inside a document. A document
that crosses a row boundary continues in the next row as that row's first document.

    >>> pack_batch({"input_ids": [[5, 6, 7], [8, 9]]}, chunk_length=4, eos_token_id=1)
    {'input_ids': [[5, 6, 7, 1], [8, 9, 1]], 'document_ids': [[0, 0, 0, 0], [0, 0, 0]]}

`pack_batch` is a ``datasets.Dataset.map(batched=True)`` function (rows never span two map batches, so a large
``batch_size`` wastes less); `pack_dataset` applies it to a ``datasets.Dataset`` / ``IterableDataset``, and
`pack_token_sequences` packs any iterable of token lists lazily (a plain Python stream).

`segment_ids_to_cu_seqlens` turns the collator's ``encoder_segment_ids`` / ``decoder_segment_ids`` into the
``(indices, cu_seqlens, max_seqlen)`` triple of variable-length ("varlen") attention kernels, one sequence per
document of each row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .kernel_ops import segment_ids_to_cu_seqlens  # the model's attention reads it; re-exported for data code

__all__ = [
    "make_tokenize_function",
    "pack_batch",
    "pack_dataset",
    "pack_token_sequences",
    "segment_ids_to_cu_seqlens",
]


def _check_chunk_length(chunk_length: int) -> None:
    if not isinstance(chunk_length, int) or chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive integer, got {chunk_length!r}.")


def pack_token_sequences(
    sequences: Iterable[Sequence[int]],
    chunk_length: int,
    eos_token_id: int,
    add_eos: bool = True,
    drop_remainder: bool = False,
) -> Iterator[dict[str, list[int]]]:
    """Lazily pack token sequences into rows of ``chunk_length`` tokens.

    Args:
        sequences: tokenized documents (lists of int ids, no special tokens needed).
        chunk_length: tokens per row.
        eos_token_id: separator appended after each document.
        add_eos: append eos to each document unless it already ends with it.
        drop_remainder: drop the final row if shorter than ``chunk_length`` (default: keep it, shorter).

    Yields:
        ``{"input_ids": list[int], "document_ids": list[int]}`` rows; empty documents are skipped.
    """
    _check_chunk_length(chunk_length)
    row_ids: list[int] = []
    row_documents: list[int] = []
    for sequence in sequences:
        tokens = [int(t) for t in sequence]
        if not tokens:
            continue
        if add_eos and tokens[-1] != eos_token_id:
            tokens.append(eos_token_id)
        position = 0
        while position < len(tokens):
            # A new document in this row gets the next row-local index.
            document_index = row_documents[-1] + 1 if row_documents else 0
            take = min(chunk_length - len(row_ids), len(tokens) - position)
            row_ids.extend(tokens[position : position + take])
            row_documents.extend([document_index] * take)
            position += take
            if len(row_ids) == chunk_length:
                yield {"input_ids": row_ids, "document_ids": row_documents}
                row_ids, row_documents = [], []
    if row_ids and not drop_remainder:
        yield {"input_ids": row_ids, "document_ids": row_documents}


def pack_batch(
    batch: dict[str, list[Any]],
    chunk_length: int,
    eos_token_id: int,
    input_column: str = "input_ids",
    add_eos: bool = True,
    drop_remainder: bool = False,
) -> dict[str, list[list[int]]]:
    """``datasets.map(batched=True)`` function: pack the documents of one map batch into rows.

    Args:
        batch: a map batch with a column of token lists (``input_column``); other columns are dropped, so call
            ``map`` with ``remove_columns=dataset.column_names``.
        chunk_length, eos_token_id, add_eos, drop_remainder: see `pack_token_sequences`.

    Returns:
        ``{"input_ids": [...rows], "document_ids": [...rows]}``.
    """
    if input_column not in batch:
        raise KeyError(
            f"Column {input_column!r} not found (columns: {sorted(batch)}); tokenize first, e.g. with "
            "make_tokenize_function(tokenizer)."
        )
    rows = list(pack_token_sequences(batch[input_column], chunk_length, eos_token_id, add_eos, drop_remainder))
    return {"input_ids": [r["input_ids"] for r in rows], "document_ids": [r["document_ids"] for r in rows]}


def make_tokenize_function(tokenizer, text_column: str = "text") -> Callable[[dict[str, list]], dict[str, list]]:
    """A ``datasets.map(batched=True)`` function tokenizing ``text_column`` without special tokens.

    Packing adds the eos separators, so documents are tokenized with ``add_special_tokens=False``.
    """

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        if text_column not in batch:
            raise KeyError(f"Column {text_column!r} not found (columns: {sorted(batch)}); pass text_column=...")
        # verbose=False: whole documents are longer than model_max_length by design, packing cuts them into rows.
        return {"input_ids": tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]}

    return tokenize


def pack_dataset(
    dataset,
    chunk_length: int,
    eos_token_id: int,
    tokenizer=None,
    text_column: str = "text",
    batch_size: int = 1000,
    drop_remainder: bool = False,
    num_proc: int | None = None,
):
    """Tokenize (if ``tokenizer`` is given) and pack a ``datasets.Dataset`` or ``IterableDataset``.

    Args:
        dataset: a ``datasets.Dataset``/``IterableDataset`` with a ``text_column`` (when ``tokenizer`` is given)
            or an ``input_ids`` column of token lists.
        chunk_length: tokens per row (e.g. ``collator.chunk_length``).
        eos_token_id: the document separator.
        tokenizer: optional tokenizer applied first (no special tokens).
        text_column: text column name.
        batch_size: documents per map batch (at most one shorter row per batch unless ``drop_remainder``).
        drop_remainder: drop the shorter last row of each map batch.
        num_proc: worker processes for ``Dataset.map`` (ignored for iterable datasets).

    Returns:
        A dataset of the same kind with columns ``input_ids`` and ``document_ids``.
    """
    _check_chunk_length(chunk_length)
    is_iterable = not hasattr(dataset, "__len__")
    map_kwargs = {} if is_iterable else {"num_proc": num_proc}
    # select_columns first: streamed datasets may not know their column names, which remove_columns needs.
    if tokenizer is not None:
        dataset = dataset.select_columns([text_column]).map(
            make_tokenize_function(tokenizer, text_column),
            batched=True,
            batch_size=batch_size,
            remove_columns=[text_column],
            **map_kwargs,
        )
    return dataset.select_columns(["input_ids"]).map(
        pack_batch,
        batched=True,
        batch_size=batch_size,
        remove_columns=["input_ids"],
        fn_kwargs={"chunk_length": chunk_length, "eos_token_id": eos_token_id, "drop_remainder": drop_remainder},
        **map_kwargs,
    )
