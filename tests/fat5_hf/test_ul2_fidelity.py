"""UL2 fidelity against an independent reference of T5's span corruption, on the shipped corpus and tokenizer at the
FAT5-small settings (512/512, the ``ul2`` mixture, ``pad_to_multiple_of=64``, segment ids): documents kept apart in
every denoiser, realized noise density and mean span within 10% of each denoiser's configuration, rows sized per
denoiser, UL2's random prefix split, and literal special-token strings kept as text."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from fat5_hf.packing import UL2RowPacker, make_tokenize_function, pack_token_sequences_for_ul2
from fat5_hf.ul2 import (
    DataCollatorForUL2,
    DenoiserSpec,
    compute_input_and_target_lengths,
    default_ul2_denoisers,
    denoiser_statistics,
    main,
)

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "recipes" / "data" / "tokenizer"
TRAIN_FILE = REPO / "recipes" / "data" / "fr_corpus_train.jsonl"
DENOISERS = default_ul2_denoisers()


# ------------------------------------------------------------------------------- reference: T5's functions


def t5_num_noise_tokens(length: int, noise_density: float) -> int:
    """``random_spans_noise_mask``'s count: ``tf.round(to_float(length) * noise_density)`` (float32, half to even)."""
    num_noise = round(float(np.float32(length) * np.float32(noise_density)))  # Python's round: half to even
    return min(max(num_noise, 1), length - 1)


def t5_random_spans_helper(inputs_length, noise_density, mean_noise_span_length, extra_in=1, extra_out=1):
    """T5's ``random_spans_helper`` (t5/data/preprocessors.py), transcribed: raw tokens for ``inputs_length``."""

    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return (num_nonnoise_tokens + num_noise_spans * extra_in + 1, num_noise_tokens + num_noise_spans * extra_out + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = lengths(tokens_length)
    if noise_density == 0.5 and targets > inputs:
        tokens_length -= 1
        targets -= 1
    return tokens_length, targets


def t5_noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size):
    """T5's ``noise_span_to_unique_sentinel``: each noise span becomes one sentinel, ``vocab_size - 1`` first."""
    previous_is_noise = np.concatenate([[False], noise_mask[:-1]])
    first_noise = noise_mask & ~previous_is_noise
    subsequent_noise = noise_mask & previous_is_noise
    sentinel = vocab_size - np.cumsum(first_noise)
    return np.where(first_noise, sentinel, tokens)[~subsequent_noise]


# ------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def documents(tokenizer):
    texts = [json.loads(line)["text"] for line in TRAIN_FILE.read_text().splitlines()]
    return make_tokenize_function(tokenizer)({"text": texts})["input_ids"]


def fat5_small_collator(tokenizer, denoisers=None, seed=0):
    return DataCollatorForUL2(
        tokenizer, denoisers, max_input_length=512, max_target_length=512, pad_to_multiple_of=64, seed=seed,
        return_segment_ids=True,
    )  # fmt: skip


def split_documents(collator, batch, row):
    """Per document of a row: (inputs without mode token and eos, targets without eos)."""
    input_mask, target_mask = batch["attention_mask"][row].bool(), batch["decoder_attention_mask"][row].bool()
    inputs, targets = batch["input_ids"][row][input_mask], batch["labels"][row][target_mask]
    input_segments = batch["encoder_segment_ids"][row][input_mask]
    target_segments = batch["decoder_segment_ids"][row][target_mask]
    mode_length = len(collator.mode_token_ids[collator.last_denoiser_indices[row]])
    pieces = []
    for segment in range(1, int(input_segments.max()) + 1):
        document_inputs = inputs[input_segments == segment].tolist()
        document_targets = targets[target_segments == segment].tolist()
        assert document_inputs[-1] == document_targets[-1] == collator.eos_token_id
        pieces.append((document_inputs[mode_length:-1], document_targets[:-1]))
    return pieces


def mask_from_outputs(collator, document_inputs, document_targets):
    """The content and noise mask of one document, read back from its inputs and targets."""
    sentinels = set(collator.sentinel_ids.tolist())
    spans, current = {}, None
    for token in document_targets:
        if token in sentinels:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    content, mask = [], []
    for token in document_inputs:
        span = spans.pop(token) if token in sentinels else [token]
        content += span
        mask += [token in sentinels] * len(span)
    assert not spans
    return content, mask


# ------------------------------------------------------------------------------------------------- tests


def test_noise_counts_are_t5s_rounded_half_to_even(tokenizer):
    """Single documents of every length: the noise-token count is exactly T5's, computed in float32 and rounded half
    to even (rounding half up gives 3 for 5 * 0.5; float64 gives 28 for 190 * 0.15, float32's 28.500002 gives 29)."""
    for rate in (0.15, 0.5):
        collator = fat5_small_collator(tokenizer, [DenoiserSpec("X", "[X]", 3.0, rate, 1.0)])
        rng = np.random.default_rng(0)
        rows = [{"input_ids": rng.integers(300, 1500, size=n).tolist()} for n in [*range(2, 120), 190, 350]]
        batch = collator(rows)
        for row, example in enumerate(rows):
            ((inputs, targets),) = split_documents(collator, batch, row)
            noise = sum(1 for t in targets if t not in set(collator.sentinel_ids.tolist()))
            assert noise == t5_num_noise_tokens(len(example["input_ids"]), rate), (len(example["input_ids"]), rate)


def test_raw_lengths_are_t5s_helper_up_to_the_random_span_rounding(tokenizer):
    """Each denoiser's raw length is T5's ``random_spans_helper`` (mode token counted as an extra input token), at
    most one token shorter: the random rounding may draw one span more than T5's ``round``. The binding side fills
    its length, unless the 100 sentinels run out first (X3-50: 128 spans would fill 512 tokens)."""
    collator = fat5_small_collator(tokenizer)
    for denoiser, raw_length in zip(DENOISERS, collator.raw_lengths):
        if denoiser.prefix_lm:
            assert raw_length == 511  # a random split may put all but one token on either side
            continue
        # The mode token takes one input position; T5's helper bounds the targets by the inputs at 50% noise.
        t5_length, _ = t5_random_spans_helper(512 - 1, denoiser.corruption_rate, denoiser.mean_span_length)
        if denoiser.name == "X3-50":  # without the sentinel cap
            assert raw_length < t5_length - 100
            raw_length = compute_input_and_target_lengths(512, denoiser, 512, num_sentinels=None)[0]
        assert abs(raw_length - t5_length) <= 1, denoiser.name


def test_layout_is_t5s_noise_span_to_unique_sentinel_and_keeps_documents_apart(tokenizer, documents):
    """Every denoiser on rows packed for it from the shipped corpus: several documents a row, none merged, each
    document's inputs and targets hold only its own tokens, and the row's inputs and targets are T5's
    ``noise_span_to_unique_sentinel`` of the row's content and noise mask (sentinels numbered across the row; T5's
    random roll may leave non-noise at the end, where T5 would add one more target sentinel)."""
    collator = fat5_small_collator(tokenizer)
    vocab_size = int(collator.sentinel_ids[0]) + 1
    for index, denoiser in enumerate(DENOISERS):
        packer = UL2RowPacker(collator)
        stream = iter(documents * 3)
        rows = [packer.pack_row(index, stream) for _ in range(24)]
        merged_before = collator.documents_merged
        batch = collator(rows)
        assert collator.documents_merged == merged_before, denoiser.name
        multi_document_rows = 0
        for row, example in enumerate(rows):
            pieces = split_documents(collator, batch, row)
            originals = np.split(np.asarray(example["input_ids"]), np.flatnonzero(np.diff(example["document_ids"])) + 1)
            assert len(pieces) == len(originals)  # one segment per document: boundaries kept
            multi_document_rows += len(pieces) > 1
            content, mask = [], []
            for (document_inputs, document_targets), original in zip(pieces, originals):
                original = original[:-1] if original[-1] == collator.eos_token_id else original
                if denoiser.prefix_lm:
                    assert document_inputs + document_targets == original.tolist()
                    continue
                document_content, document_mask = mask_from_outputs(collator, document_inputs, document_targets)
                assert document_content == original.tolist()
                assert not document_mask or not document_mask[0]  # documents start with non-noise
                content += document_content
                mask += document_mask
            if denoiser.prefix_lm:
                continue
            tokens, mask = np.asarray(content), np.asarray(mask, dtype=bool)
            expected_inputs = t5_noise_span_to_unique_sentinel(tokens, mask, vocab_size)
            expected_targets = t5_noise_span_to_unique_sentinel(tokens, ~mask, vocab_size)
            if not mask[-1]:
                expected_targets = expected_targets[:-1]
            assert sum((i for i, _ in pieces), []) == expected_inputs.tolist()
            assert sum((t for _, t in pieces), []) == expected_targets.tolist()
        assert multi_document_rows >= 12, denoiser.name


def test_realized_statistics_within_ten_percent_of_each_denoiser(tokenizer, documents):
    """The issue's target: at the FAT5-small settings on the shipped corpus, each R/X denoiser's realized noise
    density and mean span within 10% of its configuration (X64-15 included), S targets half of each document on
    average, no document merged, and the binding side of every span denoiser full (X3-50: its 100 sentinels)."""
    collator = fat5_small_collator(tokenizer)
    statistics = denoiser_statistics(collator, documents, rows_per_denoiser=96, batch_size=32, seed=1)
    for denoiser, stats in zip(DENOISERS, statistics):
        assert stats["name"] == denoiser.name
        assert abs(stats["noise_density"] - denoiser.corruption_rate) <= 0.1 * denoiser.corruption_rate, stats
        assert stats["merged_document_rate"] == 0.0 and stats["documents_per_row"] > 2, stats
        if denoiser.prefix_lm:
            continue
        assert abs(stats["mean_span"] - denoiser.mean_span_length) <= 0.1 * denoiser.mean_span_length, stats
        binding = max(stats["input_fill"], stats["target_fill"])
        assert binding > (0.75 if denoiser.name == "X3-50" else 0.98), stats


def test_random_prefix_split_is_uniform_and_fixed_split_kept(tokenizer):
    """UL2's ``random_prefix_noise_mask``: 1 to n - 1 target tokens, uniformly, per document; the fixed split is an
    option (the last round(n * rate) tokens, deterministic)."""
    (s_denoiser,) = [d for d in DENOISERS if d.prefix_lm]
    assert s_denoiser.prefix_split == "random" and s_denoiser.corruption_rate == 0.5
    collator = fat5_small_collator(tokenizer, [s_denoiser])
    rng = np.random.default_rng(2)
    n, rows = 11, 4000
    counts = np.zeros(n, dtype=np.int64)
    for _ in range(rows // 500):
        examples = [{"input_ids": rng.integers(300, 1500, size=n).tolist()} for _row in range(500)]
        batch = collator(examples)
        for row in range(len(examples)):
            ((inputs, targets),) = split_documents(collator, batch, row)
            assert inputs + targets == examples[row]["input_ids"]
            counts[len(targets)] += 1
    assert counts[0] == 0  # never an empty target nor an empty prefix
    expected = rows / (n - 1)
    assert np.all(np.abs(counts[1:] - expected) <= 4 * np.sqrt(expected * (1 - 1 / (n - 1))))
    chi_square = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi_square < 27.9  # 9 degrees of freedom, p = 0.001

    fixed = DenoiserSpec("S25", "[S]", 1.0, 0.25, 1.0, prefix_lm=True, prefix_split="fixed")
    collator = fat5_small_collator(tokenizer, [fixed])
    batch = collator([{"input_ids": list(range(300, 300 + n))}] * 3)
    assert all(len(split_documents(collator, batch, row)[0][1]) == round(n * 0.25) for row in range(3))
    with pytest.raises(ValueError, match="corruption_rate=0.5"):
        DenoiserSpec("S", "[S]", 1.0, 0.25, 1.0, prefix_lm=True, prefix_split="random")
    with pytest.raises(ValueError, match="prefix_split"):
        DenoiserSpec("S", "[S]", 1.0, 0.5, 1.0, prefix_lm=True, prefix_split="uniform")


def test_literal_special_token_strings_stay_text(tokenizer, monkeypatch):
    """A document that contains the text ``[X]`` or ``<extra_id_0>`` keeps it as text (the library's and the
    recipe's tokenization): no mode token or sentinel id comes from the text, and an R3 row then holds each sentinel
    once."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    import datasets
    from pretrain_data import tokenize_documents

    collator = fat5_small_collator(tokenizer, DENOISERS[:1])
    sentinel_ids = set(collator.sentinel_ids.tolist())
    text = "Le mode [X] et la sentinelle <extra_id_0> puis [R] [S] restent du texte. " * 8
    mode_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("[R]", "[S]", "[X]")}
    # Without split_special_tokens the tokenizer would turn them into special ids: the case that matters.
    assert mode_ids | {int(collator.sentinel_ids[0])} <= set(tokenizer(text, add_special_tokens=False)["input_ids"])
    library_ids = make_tokenize_function(tokenizer)({"text": [text]})["input_ids"][0]
    recipe_ids = tokenize_documents(datasets.Dataset.from_dict({"text": [text]}), tokenizer)[0]["input_ids"]
    assert library_ids == recipe_ids and not (mode_ids | sentinel_ids) & set(library_ids)
    decoded = tokenizer.decode(library_ids)
    assert decoded.count("<extra_id_0>") == 8 and decoded.count("[X]") == 8

    batch = collator(list(pack_token_sequences_for_ul2([library_ids] * 4, collator, seed=0)))
    for row in range(batch["input_ids"].shape[0]):
        inputs = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        used = [t for t in inputs if t in sentinel_ids]
        assert len(used) == len(set(used)) > 0  # <extra_id_0> once, as the first span's sentinel


def test_packer_rows_fit_fill_and_resume(tokenizer, documents):
    """Rows packed per denoiser hold the document stream exactly (eos after each whole document), each fits its
    denoiser, and a packer restored from ``state_dict`` continues with the very same rows."""
    collator = fat5_small_collator(tokenizer)
    draws = np.random.default_rng(3).integers(len(DENOISERS), size=40).tolist()
    packer, stream = UL2RowPacker(collator), iter(documents)
    rows = [packer.pack_row(d, stream) for d in draws[:20]]
    state, rest = packer.state_dict(), list(stream)
    continued = iter(rest)
    rows += [packer.pack_row(d, continued) for d in draws[20:]]
    resumed = UL2RowPacker(collator)
    resumed.load_state_dict(state)
    replayed = iter(rest)
    assert [resumed.pack_row(d, replayed) for d in draws[20:]] == rows[20:]
    flat = [t for row in rows for t in row["input_ids"]]
    expected = [t for document in documents for t in [*document, collator.eos_token_id]]
    assert flat == expected[: len(flat)]
    eos = collator.eos_token_id
    for row in rows:
        pieces = np.split(np.asarray(row["input_ids"]), np.flatnonzero(np.diff(row["document_ids"])) + 1)
        content_lengths = [len(piece) - (piece[-1] == eos) for piece in pieces]
        assert collator.row_fits(content_lengths, row["denoiser"])
        # full: one more token of the next document would not fit (the stream never runs dry here)
        assert not collator.row_fits([*content_lengths[:-1], content_lengths[-1] + 1], row["denoiser"]) or (
            pieces[-1][-1] == eos and not collator.row_fits([*content_lengths, 1], row["denoiser"])
        )


def test_stats_command_prints_each_denoiser(capsys):
    assert main(["--stats", "--tokenizer", str(TOKENIZER_DIR), "--files", str(TRAIN_FILE),
                 "--rows-per-denoiser", "8", "--batch-size", "8"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("denoiser"))) + 1 :]
    assert [line.split()[0] for line in table] == [d.name for d in DENOISERS]
    assert torch.tensor([float(line.split()[2]) for line in table[:6]]).sub(
        torch.tensor([d.corruption_rate for d in DENOISERS[:6]])
    ).abs().max() < 0.05
