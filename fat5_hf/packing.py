"""Document packing: turn tokenized documents into fixed-length rows for pretraining.

Documents are joined into one token stream, each followed by eos, and the stream is cut into rows of
``chunk_length`` tokens (`DataCollatorForUL2.chunk_length` fits every UL2 denoiser one document at a time;
`UL2RowPacker` below packs rows for UL2 without merging). Each row also gets ``document_ids``: one int per token,
the index (within the row, from 0) of the document the token comes from, so the collator can keep documents apart
and a model can keep attention inside a document. A document that crosses a row boundary continues in the next row
as that row's first document.

    >>> pack_batch({"input_ids": [[5, 6, 7], [8, 9]]}, chunk_length=4, eos_token_id=1)
    {'input_ids': [[5, 6, 7, 1], [8, 9, 1]], 'document_ids': [[0, 0, 0, 0], [0, 0, 0]]}

`pack_batch` is a ``datasets.Dataset.map(batched=True)`` function (rows never span two map batches, so a large
``batch_size`` wastes less); `pack_dataset` applies it to a ``datasets.Dataset`` / ``IterableDataset``, and
`pack_token_sequences` packs any iterable of token lists lazily (a plain Python stream).

`UL2RowPacker` packs rows for the UL2 collator, each sized for the denoiser drawn for it: a row holds as many
documents as that denoiser fits with every document's mode token, sentinels and eos counted
(`fat5_hf.ul2.DataCollatorForUL2.row_fits`), so multi-document rows keep their documents apart and fill the lengths;
`pack_token_sequences_for_ul2` is its lazy stream.

Raw text is tokenized with ``split_special_tokens=True`` (`make_tokenize_function`): a document that contains the
text ``[X]`` or ``<extra_id_0>`` keeps it as text, never as a mode token or a sentinel.

`segment_ids_to_cu_seqlens` turns the collator's ``encoder_segment_ids`` / ``decoder_segment_ids`` into the
``(indices, cu_seqlens, max_seqlen)`` triple of variable-length ("varlen") attention kernels, one sequence per
document of each row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .kernel_ops import segment_ids_to_cu_seqlens  # the model's attention reads it; re-exported for data code

__all__ = [
    "UL2RowPacker",
    "make_tokenize_function",
    "pack_batch",
    "pack_dataset",
    "pack_token_sequences",
    "pack_token_sequences_for_ul2",
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
    """A ``datasets.map(batched=True)`` function tokenizing raw text of ``text_column``.

    Packing adds the eos separators, so documents are tokenized with ``add_special_tokens=False``; and with
    ``split_special_tokens=True``, so that special-token strings written in the text (``[X]``, ``<extra_id_0>``,
    ``</s>``) are tokenized as text rather than becoming mode, sentinel or eos ids.
    """

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        if text_column not in batch:
            raise KeyError(f"Column {text_column!r} not found (columns: {sorted(batch)}); pass text_column=...")
        # verbose=False: whole documents are longer than model_max_length by design, packing cuts them into rows.
        # split_special_tokens=True: a literal "[X]" or "<extra_id_0>" in raw text stays text.
        encoded = tokenizer(batch[text_column], add_special_tokens=False, split_special_tokens=True, verbose=False)
        return {"input_ids": encoded["input_ids"]}

    return tokenize


class UL2RowPacker:
    """Packs documents into rows for `fat5_hf.ul2.DataCollatorForUL2`, each row sized for its own denoiser.

    A row for denoiser ``d`` takes whole documents while ``collator.row_fits`` holds (every document's mode token,
    sentinels and eos counted), then the longest prefix of the next document that still fits; the rest of that
    document opens the next row. So no row ever needs merging, and each denoiser's inputs or targets (whichever
    binds) are as full as its documents allow.

    Args:
        collator: the `fat5_hf.ul2.DataCollatorForUL2` the rows are for.

    ``state_dict`` holds the rest of the document cut at the end of the last row, for exact resumption.
    """

    def __init__(self, collator):
        self.collator = collator
        self.eos_token_id = int(collator.eos_token_id)
        self.pending: list[int] = []

    def state_dict(self) -> dict[str, list[int]]:
        return {"pending": list(self.pending)}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        self.pending = [int(t) for t in state["pending"]]

    def _longest_prefix(self, lengths: list[int], content: int, denoiser_index: int) -> int:
        """The most content tokens of the next document that fit after ``lengths`` (lengths grow with n)."""
        low, high = 0, content
        while low < high:
            middle = (low + high + 1) // 2
            if self.collator.row_fits([*lengths, middle], denoiser_index):
                low = middle
            else:
                high = middle - 1
        return low

    def pack_row(self, denoiser_index: int, documents: Iterator[Sequence[int]]) -> dict[str, Any]:
        """One row for ``denoiser_index``, drawing documents (token lists, eos appended if missing) as needed.

        Returns ``{"input_ids": list[int], "document_ids": list[int], "denoiser": int}``; raises ``StopIteration``
        when ``documents`` is exhausted and nothing is left to pack (a last row may be shorter).
        """
        row_ids: list[int] = []
        row_documents: list[int] = []
        lengths: list[int] = []
        while True:
            if self.pending:
                tokens, self.pending = self.pending, []
            else:
                try:
                    tokens = list(next(documents))
                except StopIteration:
                    if row_ids:
                        break
                    raise
                if not tokens:
                    continue
                if tokens[-1] != self.eos_token_id:
                    tokens.append(self.eos_token_id)
            content = len(tokens) - (tokens[-1] == self.eos_token_id)
            take = len(tokens)
            if not self.collator.row_fits([*lengths, content], denoiser_index):
                take = self._longest_prefix(lengths, content, denoiser_index)
                if take == 0:
                    if not row_ids:
                        raise ValueError(
                            f"Not even one token fits denoiser {denoiser_index} of the collator; raise the lengths."
                        )
                    self.pending = tokens
                    break
            row_ids.extend(tokens[:take])
            row_documents.extend([len(lengths)] * take)
            lengths.append(min(take, content))
            if take < len(tokens):
                self.pending = tokens[take:]
                break
        return {"input_ids": row_ids, "document_ids": row_documents, "denoiser": int(denoiser_index)}


def pack_token_sequences_for_ul2(
    sequences: Iterable[Sequence[int]], collator, seed: int = 0, batch_size: int = 1
) -> Iterator[dict[str, Any]]:
    """Lazily pack token sequences into rows for ``collator``, drawing each row's denoiser first.

    Args:
        sequences: tokenized documents (lists of int ids).
        collator: the `fat5_hf.ul2.DataCollatorForUL2` the rows are for.
        seed: seeds the denoiser draws.
        batch_size: rows drawn together (one group per batch with ``collator.group_denoisers_by_length``; use the
            DataLoader's batch size then).

    Yields:
        ``{"input_ids", "document_ids", "denoiser"}`` rows (see `UL2RowPacker`).
    """
    packer, documents = UL2RowPacker(collator), iter(sequences)
    rng = np.random.default_rng(seed)
    while True:
        for denoiser_index in collator.draw_denoisers(batch_size, rng):
            try:
                yield packer.pack_row(int(denoiser_index), documents)
            except StopIteration:
                return


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
