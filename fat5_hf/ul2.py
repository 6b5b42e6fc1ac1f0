"""UL2 mixture-of-denoisers data collator for T5-family encoder-decoders.

The collator turns packed rows of token ids (one or more documents, see `fat5_hf.packing`) into encoder inputs and
decoder targets following UL2's Mixture-of-Denoisers (Tay et al., "UL2: Unifying Language Learning Paradigms",
ICLR 2023, Sec. 3.1 and Table 1):

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

Span corruption (every R and X denoiser) is T5's concatenate-then-split objective applied to the packed row, with
the documents kept apart:

* The counts are drawn over the row's ``n`` content tokens (all its documents): ``round(n * corruption_rate)``
  noise tokens (T5's ``random_spans_noise_mask``, rounded half to even as ``tf.round``), in ``noise /
  mean_span_length`` spans. T5 rounds the number of spans too; with 64-token spans and the ~90 noise tokens of a
  512-token input that is one span of 90 tokens in every row (what UL2 trained), 41% longer than asked. Here the
  number of spans is rounded up with a probability equal to its fractional part, so its expectation is exactly
  ``noise / mean_span_length`` and every denoiser realizes its mean span length, long ones included. Lengths are
  sized for the larger count.
* The spans are laid out as T5 does (uniformly random segmentation, non-noise and noise spans alternating, starting
  with non-noise) over the whole row, conditioned on no span crossing a document boundary (every document starts
  with a non-noise token), by rejection: a long span is never shortened by a document boundary, so realized span
  lengths and noise density are the row's, while each document's inputs and targets hold only its own tokens
  (documents with no span get the target ``</s>``). When no draw out of ``_MAX_LAYOUT_DRAWS`` keeps every
  document apart (many documents much shorter than a span), the draw crossing the fewest boundaries is kept and
  the documents a span crosses are merged into one segment: a counted (``documents_merged``), logged last resort.
* The S denoiser splits each document: by default (``prefix_split="random"``, the ``ul2`` mixture) at a point
  drawn uniformly so that the target holds 1 to ``n - 1`` tokens, as UL2's ``random_prefix_noise_mask`` (half the
  tokens on average, hence ``corruption_rate=0.5``); with ``prefix_split="fixed"`` the target is the last
  ``round(n * corruption_rate)`` tokens. Prefix-LM is per document: a prefix of one document says nothing of the
  next.

Packing: an example's ``document_ids`` (per-token document index from `fat5_hf.packing`) delimit its documents; the
collator can emit ``encoder_segment_ids`` / ``decoder_segment_ids`` (1, 2, ... per document, 0 on padding) so a model
can keep attention within a document, and ``decoder_input_ids`` are shifted right per document.

Lengths: the longest input and target a denoiser can produce is a deterministic function of the document lengths
(`denoised_lengths`). Each denoiser has its own raw length, sized as T5's ``random_spans_helper`` does so that its
inputs or its targets, whichever binds, fill the configured length (`compute_input_and_target_lengths`,
`DataCollatorForUL2.raw_lengths`), and `DataCollatorForUL2.row_fits` tells a packer whether a row of documents fits a
denoiser with every document's mode token, sentinels and eos counted: `fat5_hf.packing.UL2RowPacker` packs each row
for the denoiser drawn for it (the example then carries ``"denoiser"``), so multi-document rows fit without merging
and fill the lengths. Rows packed without a denoiser (``chunk_length`` tokens, the largest single document every
denoiser fits) get one drawn by the collator; if such a row's per-document overhead does not fit, neighbouring
documents are merged (counted, logged). An example that cannot fit at all raises an error instead of being cut.

Reproducibility: each call draws from ``numpy.random.default_rng((seed, epoch, hash of the batch's tokens))``, so a
batch's corruption depends only on the seed, the epoch (`DataCollatorForUL2.set_epoch`, as for samplers) and its
content — not on how many batches came before nor on which DataLoader worker collates it. A resumed run that feeds
the same batches gets the same outputs; `state_dict` / `load_state_dict` carry the seed and epoch.

Statistics: ``python -m fat5_hf.ul2 --stats --tokenizer DIR --files a.jsonl ...`` prints, per denoiser, the realized
noise density, mean span length, documents per row, merged-document rate and padding (`denoiser_statistics`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
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
    "denoiser_statistics",
    "t5_span_corruption_denoisers",
]

logger = logging.getLogger(__name__)

# Rejection draws of a row's span layout before merging the documents a span crosses (see the module docstring).
# A draw keeps a boundary apart with probability about 1 - corruption_rate, so a row of 4 documents at 50% needs
# about 8 draws (about 20 us each).
_MAX_LAYOUT_DRAWS = 256


@dataclass(frozen=True)
class DenoiserSpec:
    """One denoiser of the mixture.

    Args:
        name: a label for logs (e.g. ``"R3"``, ``"X64-50"``, ``"S"``).
        mode_token: the token prepended to the encoder input (e.g. ``"[R]"``); ``""`` for none.
        mean_span_length: mean length of a corrupted span (ignored by prefix-LM denoisers).
        corruption_rate: fraction of the tokens moved to the target (``0 < rate < 1``).
        weight: relative sampling weight in the mixture (normalized by the collator).
        prefix_lm: if True, a sequential (S) denoiser: each document's suffix is the target.
        prefix_split: for prefix-LM denoisers, ``"random"`` (UL2's ``random_prefix_noise_mask``: the target holds
            1 to ``n - 1`` tokens, uniformly; needs ``corruption_rate=0.5``, its mean) or ``"fixed"`` (the last
            ``round(n * corruption_rate)`` tokens).
    """

    name: str
    mode_token: str
    mean_span_length: float
    corruption_rate: float
    weight: float
    prefix_lm: bool = False
    prefix_split: str = "fixed"

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
        if self.prefix_split not in ("random", "fixed"):
            raise ValueError(
                f"DenoiserSpec {self.name!r}: prefix_split must be 'random' or 'fixed', got {self.prefix_split!r}."
            )
        if self.prefix_lm and self.prefix_split == "random" and self.corruption_rate != 0.5:
            raise ValueError(
                f"DenoiserSpec {self.name!r}: a random prefix split targets half of each document on average (UL2's "
                f"random_prefix_noise_mask); set corruption_rate=0.5, or prefix_split='fixed' to target the last "
                f"{self.corruption_rate} of each document."
            )


def default_ul2_denoisers() -> list[DenoiserSpec]:
    """The default mixture: UL2's seven denoisers with FAT5's mode tokens.

    Span lengths and rates are UL2's (Tay et al. 2023, Sec. 3.1.2 / Table 1): R (mu=3, r=0.15), R (8, 0.15),
    X (3, 0.5), X (8, 0.5), X (64, 0.15), X (64, 0.5) and one S (prefix-LM) denoiser. Mode tokens ``[R]``/``[X]``/``[S]``
    as in CATIE's FAT5 (``examples/fat5-fr/train_fat5.py``). Weights: S gets 0.25 and the six span-corruption
    denoisers share the rest uniformly (FAT5 used 0.34 for S, 0.165 for each R and 0.0825 for each X; we did not
    find UL2's own sampling ratios in the sources available to us, so 0.25 for S is our choice). The S denoiser
    splits each document at a random point, as UL2's ``random_prefix_noise_mask`` (``prefix_split="fixed"`` with a
    ``corruption_rate`` targets a fixed share instead). Pass your own list to change any of this.
    """
    span_share = 0.75 / 6
    return [
        DenoiserSpec("R3", "[R]", mean_span_length=3.0, corruption_rate=0.15, weight=span_share),
        DenoiserSpec("R8", "[R]", mean_span_length=8.0, corruption_rate=0.15, weight=span_share),
        DenoiserSpec("X3-50", "[X]", mean_span_length=3.0, corruption_rate=0.5, weight=span_share),
        DenoiserSpec("X8-50", "[X]", mean_span_length=8.0, corruption_rate=0.5, weight=span_share),
        DenoiserSpec("X64-15", "[X]", mean_span_length=64.0, corruption_rate=0.15, weight=span_share),
        DenoiserSpec("X64-50", "[X]", mean_span_length=64.0, corruption_rate=0.5, weight=span_share),
        DenoiserSpec(
            "S", "[S]", mean_span_length=1.0, corruption_rate=0.5, weight=0.25, prefix_lm=True, prefix_split="random"
        ),
    ]


def t5_span_corruption_denoisers() -> list[DenoiserSpec]:
    """T5's original objective alone (mean span 3, 15% corruption, no mode token)."""
    return [DenoiserSpec("T5", "", mean_span_length=3.0, corruption_rate=0.15, weight=1.0)]


def _round_half_even(value: float) -> int:
    # T5 counts noise tokens with tf.round, which rounds half to even (as numpy and Python 3 do): 0.5 -> 0, 1.5 -> 2.
    return int(np.round(value))


def _num_noise_tokens(num_tokens: int, corruption_rate: float) -> int:
    """T5's ``random_spans_noise_mask`` count: at least one noise and one non-noise token (0 below 2 tokens)."""
    if num_tokens < 2:
        return 0
    # In float32 as T5's mask (to_float(length) * noise_density): 190 * 0.15 is 28.500002 there, 28.5 in float64.
    noise = _round_half_even(np.float32(num_tokens) * np.float32(corruption_rate))
    return min(max(noise, 1), num_tokens - 1)


def _span_count_bounds(num_tokens: int, num_noise: int, mean_span_length: float) -> tuple[float, int, int]:
    """``(expected spans, fewest, most)`` for ``num_noise`` noise tokens among ``num_tokens``.

    At least one span, at most one per noise token and one per non-noise token (spans alternate, each non-empty).
    """
    if num_noise == 0:
        return 0.0, 0, 0
    most = min(num_noise, num_tokens - num_noise)
    expected = num_noise / mean_span_length
    fewest = min(max(math.floor(expected), 1), most)
    return expected, fewest, min(max(math.ceil(expected), 1), most)


def _draw_num_spans(num_tokens: int, num_noise: int, mean_span_length: float, rng: np.random.Generator) -> int:
    expected, fewest, most = _span_count_bounds(num_tokens, num_noise, mean_span_length)
    if fewest == most:
        return fewest
    # Rounded up with probability equal to the fractional part: E[spans] = noise / mean_span_length.
    return most if rng.random() < expected - math.floor(expected) else fewest


def denoised_lengths(
    num_tokens: int | Sequence[int], denoiser: DenoiserSpec, mode_token_length: int = 1
) -> tuple[int, int, int]:
    """The longest input and target one denoiser can produce from one row, and its most sentinels.

    Args:
        num_tokens: content tokens of the row's documents (without their trailing eos): one int for one document,
            or a sequence of lengths, one per document.
        denoiser: the denoiser.
        mode_token_length: tokens prepended to each document's input (1, or 0 without a mode token).

    Returns:
        ``(input_length, target_length, num_sentinels)``, every document's mode token and eos included. Span
        corruption lengths are exact up to the one more span the random rounding may draw; a random prefix split
        gives the longest input and the longest target any split can produce.
    """
    lengths = [int(num_tokens)] if np.ndim(num_tokens) == 0 else [int(n) for n in num_tokens]
    num_documents = len(lengths)
    if denoiser.prefix_lm:
        input_length = target_length = 0
        for n in lengths:
            if n < 2:  # nothing to split: the document is input
                input_length += mode_token_length + n + 1
                target_length += 1
            elif denoiser.prefix_split == "random":
                input_length += mode_token_length + n  # n - 1 input tokens and eos at most
                target_length += n  # n - 1 target tokens and eos at most
            else:
                num_noise = _num_noise_tokens(n, denoiser.corruption_rate)
                input_length += mode_token_length + n - num_noise + 1
                target_length += num_noise + 1
        return input_length, target_length, 0
    total = sum(lengths)
    num_noise = _num_noise_tokens(total, denoiser.corruption_rate)
    num_spans = _span_count_bounds(total, num_noise, denoiser.mean_span_length)[2]
    input_length = num_documents * (mode_token_length + 1) + total - num_noise + num_spans
    target_length = num_documents + num_noise + num_spans
    return input_length, target_length, num_spans


def compute_input_and_target_lengths(
    max_input_length: int,
    denoiser: DenoiserSpec,
    max_target_length: int | None = None,
    num_sentinels: int | None = None,
    mode_token_length: int = 1,
) -> tuple[int, int]:
    """How many raw tokens one document may hold so that ``denoiser`` fills but never exceeds the limits.

    The counterpart of T5's ``random_spans_helper``: the largest ``n`` such that a document of ``n`` tokens fits
    ``max_input_length`` input tokens, ``max_target_length`` target tokens and ``num_sentinels`` sentinels, so the
    inputs or the targets, whichever binds, are full.

    Args:
        max_input_length: encoder length limit (mode token and eos included).
        denoiser: the denoiser.
        max_target_length: decoder length limit (eos included); None for no limit.
        num_sentinels: sentinel tokens the tokenizer has (T5: 100); None for no limit.
        mode_token_length: 1 with a mode token, 0 without.

    Returns:
        ``(raw_tokens_length, target_length)``: the document length to cut, and the longest target it produces.
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


def _t5_noise_spans(
    num_tokens: int, num_noise: int, num_spans: int, rng: np.random.Generator, random_roll: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """T5's ``random_spans_noise_mask`` layout as ``(noise span starts, noise span lengths)``, int64 (num_spans,).

    Non-noise and noise spans alternate, non-noise first, lengths uniformly random segmentations. With
    ``random_roll``, rotated as T5's ``random_roll`` does, conditioned on the first token staying non-noise (a span
    wrapped around the end would be two): the rotation brings a uniformly drawn non-noise token to the front.
    """
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(num_tokens - num_noise, num_spans, rng)
    starts = np.cumsum(nonnoise_lengths) + np.cumsum(noise_lengths) - noise_lengths
    if random_roll:
        # The k-th non-noise token sits after the noise spans that end before it.
        k = int(rng.integers(num_tokens - num_noise))
        front = k + int(noise_lengths[: np.searchsorted(np.cumsum(nonnoise_lengths), k, side="right")].sum())
        starts = (starts - front) % num_tokens
    return starts, noise_lengths


def _spans_to_mask(num_tokens: int, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Bool (num_tokens,) mask, True on the non-overlapping spans ``[start, start + length)``."""
    edges = np.zeros(num_tokens + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + lengths, -1)
    return np.cumsum(edges[:-1]) > 0


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
            same lengths instead of from the whole mixture. Each denoiser turns a row into inputs and targets of
            nearly fixed lengths (R: long inputs, short targets; X: both halves; S: up to both), so a batch mixing
            all of them pads every row to the longest of each side. Groups are the denoisers whose full row
            (`raw_lengths`) rounds up to the same input and target lengths (multiples of ``pad_to_multiple_of``); a
            batch draws a group with the group's total probability, then each row a denoiser of the group, so every
            denoiser keeps its probability (`draw_denoisers`; the stream that packs the rows must draw them, see
            `fat5_hf.packing.UL2RowPacker`). An optimizer step then sees fewer denoisers, and the logged loss jumps
            with the group drawn. ``python -m fat5_hf.ul2 --stats`` prints the padding on your data.

    Call it on a list of examples ``{"input_ids": list[int]}``, optionally with ``"document_ids"`` (one int per
    token, equal ids for the tokens of one document) and ``"denoiser"`` (the index in ``denoisers`` the row was
    packed for), as `fat5_hf.packing.UL2RowPacker` produces them. Rows without ``"denoiser"`` get one drawn from the
    mixture and should hold at most `chunk_length` tokens. Returns a dict of torch tensors:

        - ``input_ids`` (int64, (batch, input_len)), ``attention_mask`` (int64, same shape, 1 on real tokens)
        - ``labels`` (int64, (batch, target_len)), -100 on padding
        - ``decoder_input_ids`` (int64, same shape as labels): labels shifted right per document
        - ``decoder_attention_mask`` (int64, same shape as labels)
        - with ``return_segment_ids``: ``encoder_segment_ids`` and ``decoder_segment_ids`` (int64)

    Randomness: a batch's denoisers and spans are a function of ``(seed, epoch, the batch's tokens)``; call
    `set_epoch` at each new pass over the data, and save `state_dict` with the training state to resume.

    Example::

        collator = DataCollatorForUL2(tokenizer, max_input_length=512, seed=0)
        tokenize = make_tokenize_function(tokenizer)
        rows = pack_token_sequences_for_ul2(tokenize({"text": texts})["input_ids"], collator, batch_size=32)
        batch = collator([next(rows) for _ in range(32)])

    Attributes:
        raw_lengths: per denoiser, the largest single document it fits (T5's ``random_spans_helper`` sizing).
        chunk_length: the smallest of ``raw_lengths``: a row of that many tokens fits every denoiser as one document.
        documents_seen, documents_merged: documents collated and documents merged into a neighbour (last resort).
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

        self.raw_lengths = [
            compute_input_and_target_lengths(
                self.max_input_length,
                d,
                self.max_target_length,
                num_sentinels=len(self.sentinel_ids),
                mode_token_length=len(mode_ids),
            )[0]
            for d, mode_ids in zip(self.denoisers, self.mode_token_ids)
        ]
        self.chunk_length = min(self.raw_lengths)

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
        self.documents_seen = 0
        self.documents_merged = 0
        self.last_denoiser_indices: list[int] = []

    def _denoisers_by_padded_length(self) -> list[np.ndarray]:
        """Denoiser indices grouped by the lengths a chunk of each pads to, as `__call__` pads a batch of them."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (denoiser, mode_ids) in enumerate(zip(self.denoisers, self.mode_token_ids)):
            input_length, target_length, _ = denoised_lengths(self.raw_lengths[index], denoiser, len(mode_ids))
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
            for key in ("input_ids", "document_ids", "denoiser"):
                if example.get(key) is not None:
                    values = np.ascontiguousarray(np.asarray(example[key], dtype=np.int64).reshape(-1))
                    digest.update(len(values).to_bytes(8, "little"))
                    digest.update(values.tobytes())
        content_key = int.from_bytes(digest.digest(), "little")
        return np.random.default_rng([self.seed, self.epoch, content_key])

    # ------------------------------------------------------------------------------------------- packing

    def draw_denoisers(self, num_rows: int, rng: np.random.Generator) -> np.ndarray:
        """Denoiser indices for ``num_rows`` rows of one batch: from the mixture, or from one group of it with
        ``group_denoisers_by_length``. Returns int64 ``(num_rows,)``."""
        group = rng.choice(len(self.denoiser_groups), p=self.denoiser_group_probabilities)
        members, probabilities = self.denoiser_groups[group]
        return members[rng.choice(len(members), size=num_rows, p=probabilities)]

    def row_fits(self, document_lengths: Sequence[int], denoiser_index: int) -> bool:
        """Whether documents of these content lengths (trailing eos excluded) fit one row of the denoiser, with
        each document's mode token, sentinels and eos counted, whatever the random draws."""
        input_length, target_length, num_spans = denoised_lengths(
            document_lengths, self.denoisers[denoiser_index], len(self.mode_token_ids[denoiser_index])
        )
        return (
            input_length <= self.max_input_length
            and target_length <= self.max_target_length
            and num_spans <= len(self.sentinel_ids)
        )

    # ------------------------------------------------------------------------------------------- denoising

    def _documents(self, example: Mapping[str, Any]) -> list[np.ndarray]:
        """The example's documents, content only (a document's trailing eos is the separator, re-added later)."""
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
        documents = []
        for start, end in zip(boundaries[:-1], boundaries[1:]):
            tokens = input_ids[start:end]
            documents.append(tokens[:-1] if len(tokens) and tokens[-1] == self.eos_token_id else tokens)
        return documents

    def _merge(self, documents: list[np.ndarray], index: int) -> None:
        """Merges document ``index + 1`` into ``index`` (their separating eos kept as content)."""
        eos = np.asarray([self.eos_token_id], dtype=np.int64)
        documents[index : index + 2] = [np.concatenate([documents[index], eos, documents[index + 1]])]
        self.documents_merged += 1
        if self.documents_merged == 1:
            logger.warning(
                "UL2 collator: merging neighbouring documents into one segment (a last resort: the row's documents "
                "do not fit the denoiser apart, or spans could not be laid out within them). The count is in "
                "collator.documents_merged; `python -m fat5_hf.ul2 --stats` shows the rate on your data."
            )

    def _fit_documents(self, documents: list[np.ndarray], denoiser_index: int, total_tokens: int) -> None:
        """Merges the shortest document with its shorter neighbour until the row fits (rows not packed for this
        denoiser). One document of at most ``raw_lengths[denoiser_index]`` tokens always fits."""
        while len(documents) > 1 and not self.row_fits([len(d) for d in documents], denoiser_index):
            lengths = [len(d) for d in documents]
            shortest = int(np.argmin(lengths))
            if shortest == 0:
                neighbour = 1
            elif shortest == len(documents) - 1:
                neighbour = shortest - 1
            else:
                neighbour = shortest - 1 if lengths[shortest - 1] <= lengths[shortest + 1] else shortest + 1
            self._merge(documents, min(shortest, neighbour))
        if not self.row_fits([len(d) for d in documents], denoiser_index):
            input_length, target_length, num_spans = denoised_lengths(
                [len(d) for d in documents], self.denoisers[denoiser_index], len(self.mode_token_ids[denoiser_index])
            )
            raise ValueError(
                f"An example of {total_tokens} tokens does not fit denoiser {self.denoisers[denoiser_index].name!r}: "
                f"it would need {input_length} input tokens (max_input_length={self.max_input_length}), "
                f"{target_length} target tokens (max_target_length={self.max_target_length}) and {num_spans} "
                f"sentinels (the tokenizer has {len(self.sentinel_ids)}). Cut examples to at most "
                f"collator.raw_lengths[{denoiser_index}]={self.raw_lengths[denoiser_index]} tokens (collator."
                "chunk_length for any denoiser; fat5_hf.packing does) or raise the limits."
            )

    def _span_layout(self, documents: list[np.ndarray], denoiser: DenoiserSpec, rng: np.random.Generator):
        """Noise mask over the row's content, no span crossing a document (merging documents as a last resort).

        Returns ``(mask, documents)``: bool ``(total,)`` and the documents, possibly merged.
        """
        lengths = np.asarray([len(d) for d in documents])
        total = int(lengths.sum())
        num_noise = _num_noise_tokens(total, denoiser.corruption_rate)
        if num_noise == 0:
            return np.zeros(total, dtype=bool), documents
        num_spans = _draw_num_spans(total, num_noise, denoiser.mean_span_length, rng)
        document_starts = np.unique(np.cumsum(lengths)[:-1])
        document_starts = document_starts[(document_starts > 0) & (document_starts < total)]  # documents 2..
        best_mask, best_crossings = None, None
        # No layout keeps the documents apart when the shortest possible longest span fills the longest document.
        draws = _MAX_LAYOUT_DRAWS if math.ceil(num_noise / num_spans) < int(lengths.max()) else 0
        for _ in range(draws):
            # Rolled (T5's random_roll) so that the row need not end with noise: a last document shorter than the
            # last span would otherwise always start inside it.
            starts, span_lengths = _t5_noise_spans(total, num_noise, num_spans, rng, random_roll=True)
            # Document starts inside a span (or on its first token): s <= start < s + length.
            inside = np.searchsorted(document_starts, starts + span_lengths) - np.searchsorted(document_starts, starts)
            num_crossings = int(inside.sum())
            if num_crossings == 0:
                return _spans_to_mask(total, starts, span_lengths), documents
            if best_crossings is None or num_crossings < best_crossings:
                best_mask, best_crossings = _spans_to_mask(total, starts, span_lengths), num_crossings
        if best_mask is None:
            best_mask = _spans_to_mask(total, *_t5_noise_spans(total, num_noise, num_spans, rng))
        # Last resort: the document a span starts in absorbs the next one (their eos becomes content).
        merged_mask, documents = best_mask.tolist(), list(documents)
        for position in sorted(document_starts[best_mask[document_starts]].tolist(), reverse=True):
            index = int(np.searchsorted(np.cumsum([len(d) for d in documents]), position, side="right"))
            merged_mask.insert(position, True)  # the separating eos is part of the span now
            self._merge(documents, index - 1)
        return np.asarray(merged_mask, dtype=bool), documents

    def _denoise_row(self, example: Mapping[str, Any], denoiser_index: int, rng: np.random.Generator):
        denoiser = self.denoisers[denoiser_index]
        mode_ids = np.asarray(self.mode_token_ids[denoiser_index], dtype=np.int64)
        eos = np.asarray([self.eos_token_id], dtype=np.int64)
        documents = self._documents(example)
        self.documents_seen += len(documents)
        self._fit_documents(documents, denoiser_index, len(example["input_ids"]))
        if denoiser.prefix_lm:
            pieces = []
            for tokens in documents:
                n = len(tokens)
                if n < 2:
                    split = n
                elif denoiser.prefix_split == "random":
                    split = int(rng.integers(1, n))  # 1 .. n - 1 input tokens, uniformly
                else:
                    split = n - _num_noise_tokens(n, denoiser.corruption_rate)
                pieces.append((tokens[:split], tokens[split:]))
        else:
            mask, documents = self._span_layout(documents, denoiser, rng)
            tokens = np.concatenate(documents) if documents else np.zeros(0, dtype=np.int64)
            # Vectorized as T5's noise_span_to_unique_sentinel: sentinel k replaces noise span k in the inputs and
            # precedes it in the targets; spans are numbered across the row.
            span_starts = mask & ~np.concatenate([[False], mask[:-1]])
            span_index = np.cumsum(span_starts) - 1
            inputs = np.where(span_starts, self.sentinel_ids[np.maximum(span_index, 0)], tokens)
            input_keep = ~mask | span_starts
            targets = np.stack([self.sentinel_ids[np.maximum(span_index, 0)], tokens], axis=1)
            target_keep = np.stack([span_starts, mask], axis=1)
            ends = np.cumsum([len(d) for d in documents])
            pieces = [
                (inputs[start:end][input_keep[start:end]], targets[start:end][target_keep[start:end]])
                for start, end in zip(np.concatenate([[0], ends[:-1]]), ends)
            ]
        input_pieces, input_segment_ids, target_pieces, target_segment_ids = [], [], [], []
        for segment_number, (document_inputs, document_targets) in enumerate(pieces, start=1):
            segment_inputs = np.concatenate([mode_ids, document_inputs, eos])
            segment_targets = np.concatenate([document_targets, eos])
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
        packed_for = [example.get("denoiser") for example in examples]
        if all(index is not None for index in packed_for):
            denoiser_indices = np.asarray(packed_for, dtype=np.int64)
            if denoiser_indices.min() < 0 or denoiser_indices.max() >= len(self.denoisers):
                raise ValueError(
                    f"An example's 'denoiser' is {int(denoiser_indices.max())}, not an index of this collator's "
                    f"{len(self.denoisers)} denoisers: pack the rows with the same denoisers as the collator."
                )
        elif any(index is not None for index in packed_for):
            raise ValueError("Some examples carry a 'denoiser' and others do not: pack all rows the same way.")
        else:
            denoiser_indices = self.draw_denoisers(len(examples), rng)
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



# --------------------------------------------------------------------------------------------------- statistics


def denoiser_statistics(
    collator: DataCollatorForUL2,
    documents: Iterable[Sequence[int]],
    rows_per_denoiser: int = 64,
    batch_size: int = 32,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """What each denoiser of ``collator`` realizes on ``documents``: packed with `fat5_hf.packing.UL2RowPacker`.

    Args:
        collator: the collator (its settings: lengths, padding, mixture).
        documents: tokenized documents (lists of ids, no eos needed); cycled if too few.
        rows_per_denoiser: rows packed and collated per denoiser.
        batch_size: rows per collated batch (padding is measured on single-denoiser batches of this size).
        seed: seed of the collation's random draws.

    Returns:
        One dict per denoiser: ``name``, ``corruption_rate`` and ``mean_span_length`` (configured),
        ``noise_density`` (target content tokens / content tokens), ``mean_span`` (target content tokens / spans; a
        prefix-LM document counts one span), ``documents_per_row``, ``merged_document_rate`` (documents merged /
        documents), ``input_fill`` and ``target_fill`` (real tokens / max length), ``padding`` (padded share of
        the batches' input and target positions).
    """
    from .packing import UL2RowPacker

    collator = copy.copy(collator)  # its counters and random state stay the caller's
    documents = [list(d) for d in documents if len(d)]
    if not documents:
        raise ValueError("denoiser_statistics needs at least one non-empty document.")
    sentinel_low, sentinel_high = int(collator.sentinel_ids[-1]), int(collator.sentinel_ids[0])
    statistics = []
    for index, denoiser in enumerate(collator.denoisers):
        packer = UL2RowPacker(collator)
        stream = itertools.cycle(documents)
        rows = [packer.pack_row(index, stream) for _ in range(rows_per_denoiser)]
        seen, merged = collator.documents_seen, collator.documents_merged
        collator.load_state_dict({"seed": seed, "epoch": 0})
        content = noise = spans = positions = inputs_real = targets_real = 0
        for start in range(0, len(rows), batch_size):
            batch = collator(rows[start : start + batch_size])
            labels, input_ids = batch["labels"], batch["input_ids"][batch["attention_mask"].bool()]
            targets = labels[labels != -100]
            is_sentinel = (targets >= sentinel_low) & (targets <= sentinel_high)
            is_eos = targets == collator.eos_token_id
            row_noise = int((~is_sentinel & ~is_eos).sum())
            if denoiser.prefix_lm:
                # One span per document whose target holds more than its eos.
                for row_labels in labels:
                    eos_positions = (row_labels == collator.eos_token_id).nonzero().flatten()
                    gaps = torch.diff(eos_positions, prepend=torch.tensor([-1]))
                    spans += int((gaps > 1).sum())
            else:
                spans += int(is_sentinel.sum())
            noise += row_noise
            mode_ids = torch.tensor(collator.mode_token_ids[index], dtype=torch.int64)
            is_marker = (input_ids == collator.eos_token_id) | torch.isin(input_ids, mode_ids)
            is_marker |= (input_ids >= sentinel_low) & (input_ids <= sentinel_high)
            input_content = int((~is_marker).sum())
            content += input_content + row_noise
            inputs_real += int(batch["attention_mask"].sum())
            targets_real += int(batch["decoder_attention_mask"].sum())
            positions += batch["input_ids"].numel() + labels.numel()
        real = inputs_real + targets_real
        document_count = collator.documents_seen - seen
        statistics.append({
            "name": denoiser.name,
            "corruption_rate": denoiser.corruption_rate,
            "mean_span_length": None if denoiser.prefix_lm else denoiser.mean_span_length,
            "noise_density": noise / content,
            "mean_span": noise / spans if spans else float("nan"),
            "documents_per_row": document_count / len(rows),
            "merged_document_rate": (collator.documents_merged - merged) / document_count,
            "input_fill": inputs_real / (len(rows) * collator.max_input_length),
            "target_fill": targets_real / (len(rows) * collator.max_target_length),
            "padding": 1.0 - real / positions,
        })
    return statistics


def format_statistics(statistics: list[dict[str, Any]]) -> str:
    """`denoiser_statistics` as a text table."""
    header = f"{'denoiser':<10}{'rate':>7}{'density':>9}{'span':>7}{'mean span':>11}{'docs/row':>10}{'merged':>8}"
    header += f"{'in fill':>9}{'tgt fill':>10}{'padding':>9}"
    lines = [header]
    for s in statistics:
        configured_span = "-" if s["mean_span_length"] is None else f"{s['mean_span_length']:g}"
        lines.append(
            f"{s['name']:<10}{s['corruption_rate']:>7.3f}{s['noise_density']:>9.3f}{configured_span:>7}"
            f"{s['mean_span']:>11.2f}{s['documents_per_row']:>10.2f}{s['merged_document_rate']:>8.1%}"
            f"{s['input_fill']:>9.1%}{s['target_fill']:>10.1%}{s['padding']:>9.1%}"
        )
    return "\n".join(lines)


def _read_documents(files: list[str], text_column: str) -> list[str]:
    import datasets

    builders = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    suffix = "." + files[0].rsplit(".", 1)[-1].lower()
    if suffix not in builders:
        raise SystemExit(f"--files: unsupported format {suffix!r}; use one of {sorted(builders)}.")
    dataset = datasets.load_dataset(builders[suffix], data_files=files, split="train")
    column = "text" if builders[suffix] == "text" else text_column
    if column not in dataset.column_names:
        raise SystemExit(f"--files have no column {column!r} (columns: {dataset.column_names}); pass --text-column.")
    return [text for text in dataset[column] if text and text.strip()]


def main(argv: list[str] | None = None) -> int:
    """``python -m fat5_hf.ul2 --stats --tokenizer DIR --files a.jsonl ...``: per-denoiser statistics."""
    parser = argparse.ArgumentParser(prog="python -m fat5_hf.ul2", description=main.__doc__)
    parser.add_argument("--stats", action="store_true", required=True, help="print per-denoiser statistics")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or Hub id (with [R]/[S]/[X])")
    parser.add_argument("--files", nargs="+", required=True, help=".txt/.json/.jsonl/.csv/.parquet documents")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--denoisers", choices=["ul2", "t5"], default="ul2")
    parser.add_argument("--max-input-length", type=int, default=512)
    parser.add_argument("--max-target-length", type=int, default=512)
    parser.add_argument("--pad-to-multiple-of", type=int, default=64)
    parser.add_argument("--rows-per-denoiser", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from .packing import make_tokenize_function

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    collator = DataCollatorForUL2(
        tokenizer,
        default_ul2_denoisers() if args.denoisers == "ul2" else t5_span_corruption_denoisers(),
        max_input_length=args.max_input_length,
        max_target_length=args.max_target_length,
        pad_to_multiple_of=args.pad_to_multiple_of,
        return_segment_ids=True,
    )
    texts = _read_documents(args.files, args.text_column)
    documents = make_tokenize_function(tokenizer)({"text": texts})["input_ids"]
    print(f"{len(documents)} documents, {sum(map(len, documents))} tokens; {collator!r}")
    statistics = denoiser_statistics(collator, documents, args.rows_per_denoiser, args.batch_size, args.seed)
    print(format_statistics(statistics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
