"""UL2 mixture-of-denoisers data collator for T5-family encoder-decoders.

The collator turns fixed-length chunks of token ids (one packed row of one or more documents, see
`fat5_hf.packing`) into encoder inputs and decoder targets following UL2's Mixture-of-Denoisers
(Tay et al., "UL2: Unifying Language Learning Paradigms", ICLR 2023, Sec. 3.1 and Table 1):

* **R**egular span corruption (T5's objective: short spans, 15% corruption),
* e**X**treme span corruption (long spans and/or a high corruption rate),
* **S**equential prefix language modeling (the encoder sees a prefix, the decoder predicts the rest).

Format of one row (one document, denoiser with mode token ``[R]``)::

    original   a b c d e f g h
    inputs     [R] a b <extra_id_0> e f <extra_id_1> </s>
    targets    <extra_id_0> c d <extra_id_1> g h </s>

* The mode token (UL2's "paradigm token"; UL2 calls them ``[NLU]``/``[NLG]``/``[S2S]``, FAT5 ``[R]``/``[S]``/``[X]``)
  is prepended to the encoder input of every document of the row, so each document still sees it when attention
  is restricted to the document. It must be a real special token of the tokenizer (one id, never split, never unk).
  An empty ``mode_token`` means "no mode token" (plain T5 span corruption).
* Sentinels follow T5's convention: ``<extra_id_0>`` has the HIGHEST id and ``<extra_id_k>`` is ``id(<extra_id_0>) - k``.
  They are numbered in order across the whole row (not restarted per document), so targets stay unambiguous even for
  a model that ignores the document boundaries.
* Span positions follow T5's ``random_spans_noise_mask``: the number of noise tokens and of spans is deterministic
  (``round(n * corruption_rate)`` and ``round(noise / mean_span_length)``, rounding half up), the segmentation is
  uniformly random, spans alternate non-noise / noise starting with non-noise (so the last tokens are always noise).
* The S denoiser cuts each document at ``n - round(n * corruption_rate)``: the prefix goes to the encoder, the
  suffix (``corruption_rate`` of the tokens) is the target, without sentinels.

Packing: when an example carries ``document_ids`` (per-token document index from `fat5_hf.packing`), each document
is denoised on its own (like t5x's pack-after-denoise) and the collator can emit ``encoder_segment_ids`` /
``decoder_segment_ids`` (1, 2, ... per document, 0 on padding) so a model can keep attention within a document, and
``decoder_input_ids`` are shifted right per document. Documents shorter than two tokens, or rows whose per-document
overhead (one mode token and one eos per document, at least one span per document) would not fit the length limits,
are merged with a neighbouring document into one segment: nothing is ever truncated or dropped.

Lengths: the number of input and target tokens is a deterministic function of the document lengths, so
`compute_input_and_target_lengths` tells the data pipeline exactly how many raw tokens one example may hold for a
denoiser, and `DataCollatorForUL2.chunk_length` is the largest example length that fits every denoiser of the
mixture. An example that cannot fit raises an error instead of being cut.

Reproducibility: each call draws from ``numpy.random.default_rng((seed, epoch, hash of the batch's tokens))``, so a
batch's corruption depends only on the seed, the epoch (`DataCollatorForUL2.set_epoch`, as for samplers) and its
content — not on how many batches came before nor on which DataLoader worker collates it. A resumed run that feeds
the same batches gets the same outputs; `state_dict` / `load_state_dict` carry the seed and epoch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "DenoiserSpec",
    "DataCollatorForUL2",
    "compute_input_and_target_lengths",
    "default_ul2_denoisers",
    "denoised_lengths",
    "t5_span_corruption_denoisers",
]


@dataclass(frozen=True)
class DenoiserSpec:
    """One denoiser of the mixture.

    Args:
        name: a label for logs (e.g. ``"R3"``, ``"X64-50"``, ``"S"``).
        mode_token: the token prepended to the encoder input (e.g. ``"[R]"``); ``""`` for none.
        mean_span_length: mean length of a corrupted span (ignored by prefix-LM denoisers).
        corruption_rate: fraction of the tokens moved to the target (``0 < rate < 1``).
        weight: relative sampling weight in the mixture (normalized by the collator).
        prefix_lm: if True, a sequential (S) denoiser: the last ``corruption_rate`` of each document is the target.
    """

    name: str
    mode_token: str
    mean_span_length: float
    corruption_rate: float
    weight: float
    prefix_lm: bool = False

    def __post_init__(self):
        if not self.name:
            raise ValueError("DenoiserSpec.name must be a non-empty string.")
        if not 0.0 < self.corruption_rate < 1.0:
            raise ValueError(
                f"DenoiserSpec {self.name!r}: corruption_rate must be in (0, 1), got {self.corruption_rate}."
            )
        if not self.prefix_lm and not self.mean_span_length >= 1.0:
            raise ValueError(
                f"DenoiserSpec {self.name!r}: mean_span_length must be >= 1, got {self.mean_span_length}."
            )
        if not (self.weight > 0.0 and math.isfinite(self.weight)):
            raise ValueError(f"DenoiserSpec {self.name!r}: weight must be a positive number, got {self.weight}.")


def default_ul2_denoisers() -> list[DenoiserSpec]:
    """The default mixture: UL2's seven denoisers with FAT5's mode tokens.

    Span lengths and rates are UL2's (Tay et al. 2023, Sec. 3.1.2 / Table 1): R (mu=3, r=0.15), R (8, 0.15),
    X (3, 0.5), X (8, 0.5), X (64, 0.15), X (64, 0.5) and one S (prefix-LM) denoiser. Mode tokens ``[R]``/``[X]``/``[S]``
    as in CATIE's FAT5 (``examples/fat5-fr/train_fat5.py``). Weights: S gets 0.25 and the six span-corruption
    denoisers share the rest uniformly (FAT5 used 0.34 for S, 0.165 for each R and 0.0825 for each X; we did not
    find UL2's own sampling ratios in the sources available to us, so 0.25 for S is our choice). The S denoiser
    predicts the last 25% of each document (FAT5's predicts the last 75%). Pass your own list to change any of this.
    """
    span_share = 0.75 / 6
    return [
        DenoiserSpec("R3", "[R]", mean_span_length=3.0, corruption_rate=0.15, weight=span_share),
        DenoiserSpec("R8", "[R]", mean_span_length=8.0, corruption_rate=0.15, weight=span_share),
        DenoiserSpec("X3-50", "[X]", mean_span_length=3.0, corruption_rate=0.5, weight=span_share),
        DenoiserSpec("X8-50", "[X]", mean_span_length=8.0, corruption_rate=0.5, weight=span_share),
        DenoiserSpec("X64-15", "[X]", mean_span_length=64.0, corruption_rate=0.15, weight=span_share),
        DenoiserSpec("X64-50", "[X]", mean_span_length=64.0, corruption_rate=0.5, weight=span_share),
        DenoiserSpec("S", "[S]", mean_span_length=1.0, corruption_rate=0.25, weight=0.25, prefix_lm=True),
    ]


def t5_span_corruption_denoisers() -> list[DenoiserSpec]:
    """T5's original objective alone (mean span 3, 15% corruption, no mode token)."""
    return [DenoiserSpec("T5", "", mean_span_length=3.0, corruption_rate=0.15, weight=1.0)]


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _num_noise_tokens_and_spans(num_tokens: int, denoiser: DenoiserSpec) -> tuple[int, int]:
    """Deterministic number of target tokens and of spans for a segment of ``num_tokens`` content tokens.

    Segments shorter than 2 tokens are not corrupted (0, 0). Otherwise at least one token stays in the input and
    at least one goes to the target; for span corruption the number of spans is at most the number of noise tokens
    and at most the number of non-noise tokens (spans alternate non-noise / noise, each non-empty).
    """
    if num_tokens < 2:
        return 0, 0
    num_noise = min(max(_round_half_up(num_tokens * denoiser.corruption_rate), 1), num_tokens - 1)
    if denoiser.prefix_lm:
        return num_noise, 0
    num_spans = _round_half_up(num_noise / denoiser.mean_span_length)
    num_spans = min(max(num_spans, 1), num_noise, num_tokens - num_noise)
    return num_noise, num_spans


def denoised_lengths(num_tokens: int, denoiser: DenoiserSpec, mode_token_length: int = 1) -> tuple[int, int, int]:
    """Exact lengths produced by one denoiser on one segment (document) of ``num_tokens`` content tokens.

    Args:
        num_tokens: content tokens of the segment (without a trailing eos).
        denoiser: the denoiser.
        mode_token_length: tokens prepended to the input (1, or 0 without a mode token).

    Returns:
        ``(input_length, target_length, num_sentinels)``, eos included in both lengths.
    """
    num_noise, num_spans = _num_noise_tokens_and_spans(num_tokens, denoiser)
    input_length = mode_token_length + num_tokens - num_noise + num_spans + 1
    target_length = num_noise + num_spans + 1
    return input_length, target_length, num_spans


def compute_input_and_target_lengths(
    max_input_length: int,
    denoiser: DenoiserSpec,
    max_target_length: int | None = None,
    num_sentinels: int | None = None,
    mode_token_length: int = 1,
) -> tuple[int, int]:
    """How many raw tokens one example may hold so that ``denoiser`` never exceeds the limits (no truncation).

    The counterpart of T5's ``random_spans_helper``, exact for this collator: it returns the largest ``n`` such
    that every single-document example of at most ``n`` tokens fits ``max_input_length`` input tokens,
    ``max_target_length`` target tokens and ``num_sentinels`` sentinels.

    Args:
        max_input_length: encoder length limit (mode token and eos included).
        denoiser: the denoiser.
        max_target_length: decoder length limit (eos included); None for no limit.
        num_sentinels: sentinel tokens the tokenizer has (T5: 100); None for no limit.
        mode_token_length: 1 with a mode token, 0 without.

    Returns:
        ``(raw_tokens_length, target_length)``: the example length to cut, and the target length it produces.
    """
    def fits(n: int) -> bool:
        input_length, target_length, spans = denoised_lengths(n, denoiser, mode_token_length)
        return (
            input_length <= max_input_length
            and (max_target_length is None or target_length <= max_target_length)
            and (num_sentinels is None or spans <= num_sentinels)
        )

    # Lengths grow with n (monotone), so scan upwards until the first length that does not fit. Input length is
    # at least n * (1 - rate), which bounds the scan.
    upper_bound = int(max_input_length / (1.0 - denoiser.corruption_rate)) + 4
    raw_length = 0
    while raw_length < upper_bound and fits(raw_length + 1):
        raw_length += 1
    if raw_length < 2:
        raise ValueError(
            f"Denoiser {denoiser.name!r} cannot fill max_input_length={max_input_length}, "
            f"max_target_length={max_target_length}, num_sentinels={num_sentinels}: even a 2-token example does not "
            "fit. Increase the length limits."
        )
    return raw_length, denoised_lengths(raw_length, denoiser, mode_token_length)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``num_items`` into ``num_segments`` non-empty parts, uniformly at random. Returns int64 lengths."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [num_items])))


def _sentinel_ids_from_tokenizer(tokenizer) -> np.ndarray:
    """Ids of ``<extra_id_0>, <extra_id_1>, ...``; checks T5's convention (``<extra_id_0>`` highest, contiguous)."""
    vocab = tokenizer.get_vocab()
    sentinel_ids = []
    while f"<extra_id_{len(sentinel_ids)}>" in vocab:
        sentinel_ids.append(vocab[f"<extra_id_{len(sentinel_ids)}>"])
    if not sentinel_ids:
        raise ValueError(
            "The tokenizer has no sentinel tokens (<extra_id_0>, <extra_id_1>, ...). Train one with "
            "recipes/train_tokenizer.py or use a T5 tokenizer (extra_ids=100)."
        )
    sentinel_ids = np.asarray(sentinel_ids, dtype=np.int64)
    expected = sentinel_ids[0] - np.arange(len(sentinel_ids))
    if not np.array_equal(sentinel_ids, expected):
        raise ValueError(
            "Sentinel tokens must follow T5's convention: <extra_id_0> has the highest id and <extra_id_k> is "
            f"id(<extra_id_0>) - k; got <extra_id_0>={sentinel_ids[0]}, <extra_id_1>="
            f"{sentinel_ids[1] if len(sentinel_ids) > 1 else None}. Re-train the tokenizer with "
            "recipes/train_tokenizer.py."
        )
    return sentinel_ids


def _mode_token_id(tokenizer, mode_token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(mode_token)
    encoded = tokenizer(mode_token, add_special_tokens=False)["input_ids"]
    if token_id is None or token_id == tokenizer.unk_token_id or list(encoded) != [token_id]:
        raise ValueError(
            f"Mode token {mode_token!r} is not a special token of the tokenizer (it encodes to {list(encoded)}). "
            f"Add it with tokenizer.add_special_tokens({{'additional_special_tokens': [{mode_token!r}]}}) and resize "
            "the model's embeddings, train a tokenizer with recipes/train_tokenizer.py, or use mode_token=''."
        )
    return int(token_id)


@dataclass
class _Segment:
    """One document of a row: content tokens (trailing eos removed) and whether the eos was there."""

    tokens: np.ndarray
    had_eos: bool


class DataCollatorForUL2:
    """UL2 mixture-of-denoisers collator (R, X, S denoisers) for T5-family encoder-decoders.

    Args:
        tokenizer: a tokenizer with T5 sentinels (``<extra_id_0>`` highest id), ``pad_token_id``, ``eos_token_id``
            and every mode token of ``denoisers`` as a special token.
        denoisers: the mixture; default `default_ul2_denoisers()`.
        max_input_length: encoder length limit (mode tokens and eos included).
        max_target_length: decoder length limit (eos included); default ``max_input_length``.
        pad_to_multiple_of: pad both sides to a multiple of this (tensor cores like multiples of 8 or 64).
        seed: seed of the collator's random stream; None draws one (still saved by `state_dict`).
        pad_to_max_length: pad to ``max_input_length`` / ``max_target_length`` (static shapes, e.g. torch.compile)
            instead of the longest row of the batch.
        return_segment_ids: also return ``encoder_segment_ids`` and ``decoder_segment_ids`` (int64, 1..k per
            document of the row, 0 on padding). Off by default since a plain T5 ``forward`` rejects unknown keys.
        decoder_start_token_id: first decoder input of each document; default the pad id (T5's convention).
        group_denoisers_by_length: draw each batch's denoisers from one group of denoisers whose examples pad to the
            same lengths instead of from the whole mixture. Each denoiser turns a chunk into inputs and targets of
            nearly fixed lengths (R: long inputs, short targets; X: both halves; S: 3:1), so a batch mixing all of
            them pads every row to the longest of each side. Groups are the denoisers whose `chunk_length`-token
            example rounds up to the same input and target lengths (multiples of ``pad_to_multiple_of``); a batch
            draws a group with the group's total probability, then each row a denoiser of the group, so every
            denoiser keeps its probability. With the UL2 default, 512 + 512 tokens and 64-row batches of French
            text, padding is 31% of a mixed batch (``pad_to_multiple_of=64``; 40% padded to 512) and 8-13% of a
            grouped one (``pad_to_multiple_of`` 64 or 128: 4 or 3 groups, as many batch shapes). An optimizer step
            then sees fewer denoisers, and the logged loss jumps with the group drawn.

    Call it on a list of examples ``{"input_ids": list[int]}`` (optionally ``"document_ids"``: one int per token,
    equal ids for the tokens of one document, as produced by `fat5_hf.packing`). Each example should hold at most
    `chunk_length` tokens. Returns a dict of torch tensors:

        - ``input_ids`` (int64, (batch, input_len)), ``attention_mask`` (int64, same shape, 1 on real tokens)
        - ``labels`` (int64, (batch, target_len)), -100 on padding
        - ``decoder_input_ids`` (int64, same shape as labels): labels shifted right per document
        - ``decoder_attention_mask`` (int64, same shape as labels)
        - with ``return_segment_ids``: ``encoder_segment_ids`` and ``decoder_segment_ids`` (int64)

    Randomness: a batch's denoisers and spans are a function of ``(seed, epoch, the batch's tokens)``; call
    `set_epoch` at each new pass over the data, and save `state_dict` with the training state to resume.

    Example::

        collator = DataCollatorForUL2(tokenizer, max_input_length=512, seed=0)
        rows = pack_dataset(dataset, collator.chunk_length, tokenizer.eos_token_id, tokenizer=tokenizer)
        loader = torch.utils.data.DataLoader(rows, batch_size=32, collate_fn=collator)

    Attributes:
        chunk_length: the largest example length that fits every denoiser for a single-document example.
        last_denoiser_indices: index into ``denoisers`` used for each row of the last batch (for logging).
        denoiser_groups: ``(denoiser indices, their probabilities within the group)`` per group (without
            ``group_denoisers_by_length``, one group: the whole mixture); ``denoiser_group_probabilities`` holds
            each group's probability.
    """

    def __init__(
        self,
        tokenizer,
        denoisers: list[DenoiserSpec] | None = None,
        max_input_length: int = 512,
        max_target_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        seed: int | None = None,
        *,
        pad_to_max_length: bool = False,
        return_segment_ids: bool = False,
        decoder_start_token_id: int | None = None,
        group_denoisers_by_length: bool = False,
    ):
        self.tokenizer = tokenizer
        self.denoisers = list(denoisers) if denoisers is not None else default_ul2_denoisers()
        if not self.denoisers:
            raise ValueError("denoisers must contain at least one DenoiserSpec (or be None for the UL2 default).")
        for denoiser in self.denoisers:
            if not isinstance(denoiser, DenoiserSpec):
                raise TypeError(f"denoisers must be DenoiserSpec instances, got {type(denoiser).__name__}.")
        self.max_input_length = int(max_input_length)
        self.max_target_length = int(max_target_length) if max_target_length is not None else self.max_input_length
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}.")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_to_max_length = pad_to_max_length
        self.return_segment_ids = return_segment_ids

        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer needs a pad token and an eos token (T5: pad=0, eos=1).")
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.decoder_start_token_id = (
            int(decoder_start_token_id) if decoder_start_token_id is not None else self.pad_token_id
        )
        self.sentinel_ids = _sentinel_ids_from_tokenizer(tokenizer)
        self.mode_token_ids = [
            [_mode_token_id(tokenizer, d.mode_token)] if d.mode_token else [] for d in self.denoisers
        ]

        weights = np.asarray([d.weight for d in self.denoisers], dtype=np.float64)
        self.denoiser_probabilities = weights / weights.sum()

        self.chunk_length = min(
            compute_input_and_target_lengths(
                self.max_input_length,
                d,
                self.max_target_length,
                num_sentinels=len(self.sentinel_ids),
                mode_token_length=len(mode_ids),
            )[0]
            for d, mode_ids in zip(self.denoisers, self.mode_token_ids)
        )

        self.group_denoisers_by_length = bool(group_denoisers_by_length)
        groups = (
            self._denoisers_by_padded_length() if self.group_denoisers_by_length else [np.arange(len(self.denoisers))]
        )
        totals = np.asarray([self.denoiser_probabilities[members].sum() for members in groups])
        self.denoiser_groups = [(m, self.denoiser_probabilities[m] / total) for m, total in zip(groups, totals)]
        self.denoiser_group_probabilities = totals / totals.sum()

        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        self.seed = int(seed)
        self.epoch = 0
        self.num_batches_seen = 0  # informational (per process: DataLoader workers hold copies)
        self.last_denoiser_indices: list[int] = []

    def _denoisers_by_padded_length(self) -> list[np.ndarray]:
        """Denoiser indices grouped by the lengths a chunk of each pads to, as `__call__` pads a batch of them."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (denoiser, mode_ids) in enumerate(zip(self.denoisers, self.mode_token_ids)):
            input_length, target_length, _ = denoised_lengths(self.chunk_length, denoiser, len(mode_ids))
            padded = (self._padded_length(input_length, self.max_input_length),
                      self._padded_length(target_length, self.max_target_length))  # fmt: skip
            groups.setdefault(padded, []).append(index)
        return [np.asarray(indices) for indices in groups.values()]

    # ----------------------------------------------------------------------------------------------- state

    def set_epoch(self, epoch: int) -> None:
        """Change the random stream for a new pass over the data (call it before creating the epoch's iterator)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """Everything the randomness depends on besides the batches themselves."""
        return {"seed": self.seed, "epoch": self.epoch, "num_batches_seen": self.num_batches_seen}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state.get("epoch", 0))
        self.num_batches_seen = int(state.get("num_batches_seen", 0))

    def _batch_rng(self, examples: Sequence[Mapping[str, Any]]) -> np.random.Generator:
        # Keyed on the batch content rather than on a call counter: DataLoader workers each hold a copy of the
        # collator (a counter would be replayed by every worker and never reach the main process's checkpoint).
        digest = hashlib.blake2b(digest_size=16)
        for example in examples:
            for key in ("input_ids", "document_ids"):
                if example.get(key) is not None:
                    values = np.ascontiguousarray(np.asarray(example[key], dtype=np.int64).reshape(-1))
                    digest.update(len(values).to_bytes(8, "little"))
                    digest.update(values.tobytes())
        content_key = int.from_bytes(digest.digest(), "little")
        return np.random.default_rng([self.seed, self.epoch, content_key])

    # ------------------------------------------------------------------------------------------- denoising

    def _segments(self, example: Mapping[str, Any]) -> list[_Segment]:
        input_ids = np.asarray(example["input_ids"], dtype=np.int64).reshape(-1)
        document_ids = example.get("document_ids")
        if document_ids is None:
            boundaries = [0, len(input_ids)]
        else:
            document_ids = np.asarray(document_ids).reshape(-1)
            if len(document_ids) != len(input_ids):
                raise ValueError(
                    f"document_ids has {len(document_ids)} entries but input_ids has {len(input_ids)} tokens."
                )
            changes = np.nonzero(document_ids[1:] != document_ids[:-1])[0] + 1
            boundaries = [0, *changes.tolist(), len(input_ids)]
        segments = []
        for start, end in zip(boundaries[:-1], boundaries[1:]):
            tokens = input_ids[start:end]
            had_eos = len(tokens) > 0 and tokens[-1] == self.eos_token_id
            segments.append(_Segment(tokens[:-1] if had_eos else tokens, had_eos))
        return segments

    def _merge_segments(self, first: _Segment, second: _Segment) -> _Segment:
        head = np.append(first.tokens, self.eos_token_id) if first.had_eos else first.tokens
        return _Segment(np.concatenate([head, second.tokens]).astype(np.int64), second.had_eos)

    def _row_lengths(self, segments: list[_Segment], denoiser_index: int) -> tuple[int, int, int]:
        mode_length = len(self.mode_token_ids[denoiser_index])
        totals = [0, 0, 0]
        for segment in segments:
            lengths = denoised_lengths(len(segment.tokens), self.denoisers[denoiser_index], mode_length)
            totals = [t + x for t, x in zip(totals, lengths)]
        return totals[0], totals[1], totals[2]

    def _fits(self, segments: list[_Segment], denoiser_index: int) -> bool:
        input_length, target_length, num_spans = self._row_lengths(segments, denoiser_index)
        return (
            input_length <= self.max_input_length
            and target_length <= self.max_target_length
            and num_spans <= len(self.sentinel_ids)
        )

    def _plan_segments(self, segments: list[_Segment], denoiser_index: int) -> list[_Segment]:
        """Merge too-short documents, then merge neighbours until the row fits (never truncates)."""
        segments = list(segments)
        # Documents of fewer than 2 content tokens cannot be split into input and target: join a neighbour.
        index = 0
        while len(segments) > 1 and index < len(segments):
            if len(segments[index].tokens) < 2:
                if index > 0:
                    segments[index - 1 : index + 1] = [self._merge_segments(segments[index - 1], segments[index])]
                    index -= 1
                else:
                    segments[0:2] = [self._merge_segments(segments[0], segments[1])]
            else:
                index += 1
        # Per-document overhead (mode token, eos, at least one span each) may overflow: merge the shortest
        # segment with its shorter neighbour until it fits. One segment of <= chunk_length tokens always fits.
        while len(segments) > 1 and not self._fits(segments, denoiser_index):
            lengths = [len(s.tokens) for s in segments]
            shortest = int(np.argmin(lengths))
            if shortest == 0:
                neighbour = 1
            elif shortest == len(segments) - 1:
                neighbour = shortest - 1
            else:
                neighbour = shortest - 1 if lengths[shortest - 1] <= lengths[shortest + 1] else shortest + 1
            left = min(shortest, neighbour)
            segments[left : left + 2] = [self._merge_segments(segments[left], segments[left + 1])]
        if not self._fits(segments, denoiser_index):
            input_length, target_length, num_spans = self._row_lengths(segments, denoiser_index)
            total = sum(len(s.tokens) + s.had_eos for s in segments)
            raise ValueError(
                f"An example of {total} tokens does not fit denoiser {self.denoisers[denoiser_index].name!r}: it "
                f"would need {input_length} input tokens (max_input_length={self.max_input_length}), "
                f"{target_length} target tokens (max_target_length={self.max_target_length}) and {num_spans} "
                f"sentinels (the tokenizer has {len(self.sentinel_ids)}). Cut examples to at most "
                f"collator.chunk_length={self.chunk_length} tokens (fat5_hf.packing does) or raise the limits."
            )
        return segments

    def _denoise_segment(
        self, tokens: np.ndarray, denoiser: DenoiserSpec, first_sentinel: int, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """Returns (input pieces, target pieces, spans used) for one segment's content (no mode token, no eos)."""
        num_tokens = len(tokens)
        num_noise, num_spans = _num_noise_tokens_and_spans(num_tokens, denoiser)
        if num_noise == 0:
            return [tokens], [], 0
        if denoiser.prefix_lm:
            split = num_tokens - num_noise
            return [tokens[:split]], [tokens[split:]], 0
        noise_lengths = _random_segmentation(num_noise, num_spans, rng)
        nonnoise_lengths = _random_segmentation(num_tokens - num_noise, num_spans, rng)
        # Vectorized as T5's noise_span_to_unique_sentinel: spans alternate non-noise, noise, starting with
        # non-noise. Inputs keep the non-noise tokens and put sentinel k on the first token of noise span k;
        # targets keep the noise tokens and put sentinel k on the first token of the non-noise span before it.
        span_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
        span_starts = np.concatenate([[0], np.cumsum(span_lengths)[:-1]])
        nonnoise_starts, noise_starts = span_starts[0::2], span_starts[1::2]
        is_noise = np.repeat(np.tile(np.array([False, True]), num_spans), span_lengths)
        sentinels = self.sentinel_ids[first_sentinel : first_sentinel + num_spans]
        inputs = tokens.copy()
        inputs[noise_starts] = sentinels
        input_keep = ~is_noise
        input_keep[noise_starts] = True
        targets = tokens.copy()
        targets[nonnoise_starts] = sentinels
        target_keep = is_noise.copy()
        target_keep[nonnoise_starts] = True
        return [inputs[input_keep]], [targets[target_keep]], num_spans

    def _denoise_row(self, example: Mapping[str, Any], denoiser_index: int, rng: np.random.Generator):
        denoiser = self.denoisers[denoiser_index]
        mode_ids = np.asarray(self.mode_token_ids[denoiser_index], dtype=np.int64)
        eos = np.asarray([self.eos_token_id], dtype=np.int64)
        segments = self._plan_segments(self._segments(example), denoiser_index)
        input_pieces, input_segment_ids, target_pieces, target_segment_ids = [], [], [], []
        sentinels_used = 0
        for segment_number, segment in enumerate(segments, start=1):
            inputs, targets, spans = self._denoise_segment(segment.tokens, denoiser, sentinels_used, rng)
            sentinels_used += spans
            segment_inputs = np.concatenate([mode_ids, *inputs, eos])
            segment_targets = np.concatenate([*targets, eos])
            input_pieces.append(segment_inputs)
            target_pieces.append(segment_targets)
            input_segment_ids.append(np.full(len(segment_inputs), segment_number, dtype=np.int64))
            target_segment_ids.append(np.full(len(segment_targets), segment_number, dtype=np.int64))
        return (
            np.concatenate(input_pieces),
            np.concatenate(input_segment_ids),
            np.concatenate(target_pieces),
            np.concatenate(target_segment_ids),
        )

    # ------------------------------------------------------------------------------------------------ call

    def _padded_length(self, longest: int, limit: int) -> int:
        length = limit if self.pad_to_max_length else longest
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("DataCollatorForUL2 got an empty list of examples.")
        for example in examples:
            if "input_ids" not in example:
                raise KeyError(f"Each example needs an 'input_ids' field; got keys {sorted(example)}.")
        rng = self._batch_rng(examples)
        self.num_batches_seen += 1
        if self.group_denoisers_by_length:
            group = rng.choice(len(self.denoiser_groups), p=self.denoiser_group_probabilities)
            members, probabilities = self.denoiser_groups[group]
            denoiser_indices = members[rng.choice(len(members), size=len(examples), p=probabilities)]
        else:
            denoiser_indices = rng.choice(len(self.denoisers), size=len(examples), p=self.denoiser_probabilities)
        self.last_denoiser_indices = denoiser_indices.tolist()

        rows = []
        for example, denoiser_index in zip(examples, denoiser_indices):
            if len(example["input_ids"]) == 0:
                raise ValueError("Got an example with no tokens; filter empty documents before collating.")
            rows.append(self._denoise_row(example, int(denoiser_index), rng))

        input_length = self._padded_length(max(len(r[0]) for r in rows), self.max_input_length)
        target_length = self._padded_length(max(len(r[2]) for r in rows), self.max_target_length)
        batch_size = len(rows)
        input_ids = np.full((batch_size, input_length), self.pad_token_id, dtype=np.int64)
        labels = np.full((batch_size, target_length), -100, dtype=np.int64)
        decoder_input_ids = np.full((batch_size, target_length), self.pad_token_id, dtype=np.int64)
        encoder_segment_ids = np.zeros((batch_size, input_length), dtype=np.int64)
        decoder_segment_ids = np.zeros((batch_size, target_length), dtype=np.int64)
        for row, (inputs, input_segments, targets, target_segments) in enumerate(rows):
            input_ids[row, : len(inputs)] = inputs
            encoder_segment_ids[row, : len(inputs)] = input_segments
            labels[row, : len(targets)] = targets
            decoder_segment_ids[row, : len(targets)] = target_segments
            # Shift right within each document: its first decoder input is the start token.
            shifted = np.concatenate([[self.decoder_start_token_id], targets[:-1]])
            document_starts = np.concatenate([[True], target_segments[1:] != target_segments[:-1]])
            shifted[document_starts] = self.decoder_start_token_id
            decoder_input_ids[row, : len(targets)] = shifted

        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy((encoder_segment_ids > 0).astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "decoder_input_ids": torch.from_numpy(decoder_input_ids),
            "decoder_attention_mask": torch.from_numpy((decoder_segment_ids > 0).astype(np.int64)),
        }
        if self.return_segment_ids:
            batch["encoder_segment_ids"] = torch.from_numpy(encoder_segment_ids)
            batch["decoder_segment_ids"] = torch.from_numpy(decoder_segment_ids)
        return batch

    def __repr__(self) -> str:
        mixture = ", ".join(f"{d.name}:{p:.3f}" for d, p in zip(self.denoisers, self.denoiser_probabilities))
        return (
            f"{type(self).__name__}(max_input_length={self.max_input_length}, max_target_length="
            f"{self.max_target_length}, chunk_length={self.chunk_length}, denoisers=[{mixture}]"
            + (", group_denoisers_by_length=True)" if self.group_denoisers_by_length else ")")
        )

