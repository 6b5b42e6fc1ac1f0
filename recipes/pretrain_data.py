"""The pretraining data stream: documents -> tokens -> UL2 rows -> UL2 batches, resumable exactly.

Documents are tokenized once (``split_special_tokens=True``: special-token strings in the text stay text) by
`fat5_hf.packing.make_tokenize_function`; each process reads its own share of the documents, and `UL2BatchStream`
draws each batch's denoisers first, then packs each row for its denoiser with `fat5_hf.packing.UL2RowPacker` (as
many documents as the denoiser fits, each document's mode token, sentinels and eos counted) and collates the rows
with `fat5_hf.ul2.DataCollatorForUL2`. Nothing goes through a ``DataLoader`` or Accelerate's dataloader sharding:
the stream's whole position (epoch, next document or the ``datasets`` stream state, the rest of a document cut at
the end of a row, the batches drawn) forms a small dict saved in every checkpoint, and restoring it replays the
very same batches.

Sources:
- local files (``.txt``: one document per line; ``.json``/``.jsonl``/``.csv``/``.parquet``: a text
  column), read with ``datasets`` into a memory-mapped table and tokenized once (cached by ``datasets``);
  each epoch visits the documents in a new seeded random order, document ``i`` going to process
  ``i % num_processes``.
- a Hub dataset, streamed (``datasets.load_dataset(..., streaming=True)``), tokenized on the fly, split between
  processes with ``split_dataset_by_node`` and shuffled with a buffer; its position is
  ``IterableDataset.state_dict()``. ``datasets`` restores a stream's position but not the content of its
  shuffle buffer, so a resumed *shuffled* stream sees the same documents in a slightly different order;
  unshuffled streams resume exactly.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fat5_hf.packing import UL2RowPacker, make_tokenize_function

LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Data files or datasets that cannot feed the run; the message names the file and the fix."""


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else relative to the repository root (so the defaults work from anywhere)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    from_repo = Path(__file__).resolve().parent.parent / candidate
    return from_repo if from_repo.exists() else candidate


def load_local_documents(files: list[str], text_column: str = "text"):
    """Loads local files into a ``datasets.Dataset`` with one ``text`` column, blank documents removed."""
    import datasets

    if not files:
        raise DataError("No data files given")
    paths = [resolve_path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"Data files not found: {missing}. Check data.train_files / data.eval_files.")
    suffixes = {p.suffix.lower() for p in paths}
    if not suffixes <= LOCAL_BUILDERS.keys() or len({LOCAL_BUILDERS[s] for s in suffixes}) > 1:
        raise DataError(
            f"Data files must share one format among {sorted(LOCAL_BUILDERS)}; got suffixes {sorted(suffixes)}"
        )
    empty = [str(p) for p in paths if p.stat().st_size == 0]
    if empty:
        raise DataError(f"Data files are empty: {empty}")
    builder = LOCAL_BUILDERS[suffixes.pop()]
    dataset = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train")
    column = "text" if builder == "text" else text_column
    if column not in dataset.column_names:
        raise DataError(
            f"{[str(p) for p in paths]} have no column {column!r} (columns: {dataset.column_names}); "
            "set data.text_column"
        )
    dataset = dataset.select_columns([column])
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    dataset = dataset.filter(lambda text: bool(text and text.strip()), input_columns="text")
    if len(dataset) == 0:
        raise DataError(f"{[str(p) for p in paths]} hold no non-empty document")
    return dataset


def load_streamed_documents(name: str, config_name: str | None, split: str, text_column: str = "text"):
    """Opens a Hub dataset as a stream of ``{"text": ...}`` examples."""
    import datasets

    try:
        stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as err:  # datasets raises many types (FileNotFound, DatasetNotFound, ConnectionError)
        raise DataError(f"Cannot stream dataset {name!r} (config {config_name!r}, split {split!r}): {err}") from err
    columns = stream.column_names
    if columns is not None and text_column not in columns:
        raise DataError(f"Dataset {name!r} has no column {text_column!r} (columns: {columns}); set data.text_column")
    stream = stream.select_columns([text_column])
    return stream.rename_column(text_column, "text") if text_column != "text" else stream


class DocumentStream:
    """This process's share of an endless, resumable sequence of tokenized documents.

    Args:
        documents: a ``datasets.Dataset`` (map-style) or ``datasets.IterableDataset`` (streamed) with an
            ``input_ids`` column (token lists), e.g. from `tokenize_documents`.
        seed: seeds each epoch's order (map-style) or the shuffle buffer (streamed).
        process_index, num_processes: which share of the documents this process reads.
        shuffle: visit documents in a random order, a new one each epoch.
        shuffle_buffer_size: size of the shuffle buffer of a streamed dataset.
    """

    def __init__(
        self,
        documents,
        seed: int,
        process_index: int = 0,
        num_processes: int = 1,
        shuffle: bool = True,
        shuffle_buffer_size: int = 10_000,
    ):
        import datasets

        self.seed, self.shuffle = seed, shuffle
        self.process_index, self.num_processes = process_index, num_processes
        self.streamed = isinstance(documents, datasets.IterableDataset)
        if self.streamed:
            from datasets.distributed import split_dataset_by_node

            documents = split_dataset_by_node(documents, rank=process_index, world_size=num_processes)
            if shuffle:
                documents = documents.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
            self._iterator = None
        elif len(documents) < num_processes:
            raise DataError(f"The data holds {len(documents)} documents, fewer than the {num_processes} processes; add data")
        self.documents = documents
        self.epoch = 0
        self.cursor = 0  # documents of this epoch's share already read (map-style)
        self._share: np.ndarray | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.streamed:
            return {"epoch": self.epoch, "stream": self.documents.state_dict()}
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        if self.streamed:
            self.documents.set_epoch(self.epoch)
            self.documents.load_state_dict(state["stream"])
            self._iterator = None
        else:
            self.cursor, self._share = int(state["cursor"]), None

    def _epoch_share(self) -> np.ndarray:
        if self._share is None:
            order = np.arange(len(self.documents))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.documents))
            self._share = order[self.process_index :: self.num_processes]
        return self._share

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        if self.streamed:
            for _ in range(2):
                if self._iterator is None:
                    self.documents.set_epoch(self.epoch)
                    self._iterator = iter(self.documents)
                try:
                    return next(self._iterator)["input_ids"]
                except StopIteration:  # end of the stream: start the next epoch
                    self.epoch += 1
                    self._iterator = None
            raise DataError("The streamed dataset yields no documents for this process; check the dataset and split")
        share = self._epoch_share()
        if self.cursor >= len(share):
            self.epoch, self.cursor, self._share = self.epoch + 1, 0, None
            share = self._epoch_share()
        document = self.documents[int(share[self.cursor])]
        self.cursor += 1
        return document["input_ids"]


class UL2BatchStream:
    """Batches of ``batch_size`` rows, each packed for the denoiser drawn for it and passed through the UL2
    collator; ``state_dict`` covers the documents, the packer, the denoiser draws and the collator."""

    def __init__(self, documents: DocumentStream, collator, batch_size: int):
        self.documents, self.collator, self.batch_size = documents, collator, batch_size
        self.packer = UL2RowPacker(collator)
        self.batches_drawn = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents.state_dict(),
            "packer": self.packer.state_dict(),
            "batches_drawn": self.batches_drawn,
            "collator": self.collator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.documents.load_state_dict(state["documents"])
        self.packer.load_state_dict(state["packer"])
        self.batches_drawn = int(state["batches_drawn"])
        self.collator.load_state_dict(state["collator"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        # The denoisers come first (each row is packed for its own); their draw is keyed on the batch number.
        rng = np.random.default_rng([self.collator.seed, self.batches_drawn])
        denoiser_indices = self.collator.draw_denoisers(self.batch_size, rng)
        rows = [self.packer.pack_row(int(index), self.documents) for index in denoiser_indices]
        self.batches_drawn += 1
        # The collator's noise is keyed on (seed, epoch, rows): a row met again in a later epoch is denoised anew.
        self.collator.set_epoch(self.documents.epoch)
        return self.collator(rows)


class _StreamFromState(torch.utils.data.IterableDataset):
    """A stream's batches from a given state on, each with the stream's state after it (run in a worker process)."""

    def __init__(self, stream, state: dict[str, Any]):
        self.stream, self.state = stream, state

    def __iter__(self):
        self.stream.load_state_dict(self.state)
        while True:
            try:
                batch = next(self.stream)
            except StopIteration:
                return
            yield batch, self.stream.state_dict()


def _as_is(item):
    # The worker hands out (batch, state) pairs unchanged: DataLoader's default conversion would turn the state's
    # numpy values into tensors.
    return item


def _worker_ignores_foreign_sigterm(_worker_id: int) -> None:
    """A preemption (Slurm, ``kill -TERM -<group>``) signals every process: the training process then writes its
    checkpoint, which needs this worker alive until the training process shuts it down. So here SIGTERM ends the
    worker only when the training process sends it (DataLoader's shutdown); from anyone else it is ignored."""
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: only the training process's own SIGTERM handling
        return
    parent = os.getppid()
    # Blocked in this thread and every thread started after it, so the signal waits for the watcher below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="fat5-sigterm-watch", daemon=True).start()


class PrefetchingBatchStream:
    """Builds the next ``depth`` batches of a stream in a worker process, overlapping data work with the step.

    A process rather than a thread: the UL2 collation (about 19 ms for 64 rows) is Python and numpy work that holds
    the GIL, and in a thread it competes with the training loop's own Python, which launches every kernel of an
    eager step (an H200, FAT5-small, 64 rows a step, one process: 101 ms a step with the worker process, 117 and
    151 ms in two runs with a thread). The worker is a ``torch.utils.data.DataLoader`` worker (batches come back
    through shared memory, pinned for asynchronous copies when ``pin_memory``); it ignores a SIGTERM sent to every
    process, so that a preempted run still writes its checkpoint.

    Resumable like the wrapped stream: each batch travels with the stream state *after* it, and ``state_dict``
    returns the state after the last batch handed out, not the worker's (which is ahead). The worker draws no
    global random numbers that matter (the row order and the UL2 noise have their own seeded generators), so the
    training process's RNG streams (dropout) are the same with and without prefetching (the DataLoader seeds its
    worker from a generator of its own).

    Args:
        stream: a `UL2BatchStream` (anything with ``__next__``, ``state_dict`` and ``load_state_dict``).
        depth: batches built ahead (>= 1).
        pin_memory: pin the batches' host memory (CUDA training: the copy to the GPU is then asynchronous).
    """

    def __init__(self, stream, depth: int = 2, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.stream, self.depth, self.pin_memory = stream, depth, pin_memory
        self._state = stream.state_dict()
        self._batches = None

    def close(self) -> None:
        """Stops the worker (DataLoader shuts it down when its iterator is released)."""
        self._batches = None

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._state = state

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            # (Re)start from the state of the last batch handed out.
            loader = torch.utils.data.DataLoader(
                _StreamFromState(self.stream, self._state),
                batch_size=None,
                collate_fn=_as_is,
                num_workers=1,
                prefetch_factor=self.depth,
                pin_memory=self.pin_memory,
                worker_init_fn=_worker_ignores_foreign_sigterm,
                multiprocessing_context="fork" if sys.platform == "linux" else None,
                # Its own generator: a DataLoader otherwise draws its workers' seed from the global RNG, which
                # would shift the training process's dropout after every (re)start.
                generator=torch.Generator(),
            )
            self._batches = iter(loader)
        try:
            batch, self._state = next(self._batches)
        except BaseException:
            self.close()
            raise
        return batch


def tokenize_documents(documents, tokenizer):
    """Tokenizes documents (a ``datasets`` dataset with a ``text`` column) into an ``input_ids`` column, special-token
    strings in the text kept as text (``split_special_tokens=True``)."""
    import datasets

    map_kwargs = {} if isinstance(documents, datasets.IterableDataset) else {"desc": "Tokenizing"}
    return documents.map(
        make_tokenize_function(tokenizer), batched=True, batch_size=1000, remove_columns=["text"], **map_kwargs
    )


def log_denoiser_statistics(collator, documents, log, num_documents: int = 256) -> None:
    """Logs what each denoiser realizes on the first ``num_documents`` tokenized documents (`--stats` figures)."""
    from fat5_hf.ul2 import denoiser_statistics, format_statistics

    sample = [row["input_ids"] for row, _ in zip(documents, range(num_documents))]
    statistics = denoiser_statistics(collator, sample, rows_per_denoiser=32, batch_size=32)
    log("UL2 denoisers on the first %d training documents:\n%s", len(sample), format_statistics(statistics))


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) encoder input plus target tokens of a collated batch."""
    return int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
