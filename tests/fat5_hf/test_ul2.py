"""Exactness tests of the UL2 collator: reconstruction token by token, sentinel order, lengths, rates, edge cases."""

import itertools

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fat5_hf.packing import pack_token_sequences, pack_token_sequences_for_ul2
from fat5_hf.ul2 import (
    DataCollatorForUL2,
    DenoiserSpec,
    compute_input_and_target_lengths,
    default_ul2_denoisers,
    denoised_lengths,
    t5_span_corruption_denoisers,
)

NUM_WORDS = 200
NUM_SENTINELS = 100
MODE_TOKENS = ["[R]", "[S]", "[X]"]
FIRST_WORD_ID = 3  # pad=0, eos=1, unk=2 as in T5


def make_tokenizer(num_sentinels=NUM_SENTINELS, sentinels_descending=True, mode_tokens=MODE_TOKENS):
    """A word-level tokenizer with T5's special-token layout: words, mode tokens, then sentinels (<extra_id_0> last)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i in range(NUM_WORDS):
        vocab[f"w{i}"] = len(vocab)
    for token in mode_tokens:
        vocab[token] = len(vocab)
    base = len(vocab)
    for k in range(num_sentinels):
        vocab[f"<extra_id_{k}>"] = base + (num_sentinels - 1 - k if sentinels_descending else k)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(mode_tokens) + [f"<extra_id_{k}>" for k in range(num_sentinels)],
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def random_words(rng, n):
    return rng.integers(FIRST_WORD_ID, FIRST_WORD_ID + NUM_WORDS, size=n).tolist()


def reconstruct(collator, batch, row):
    """Rebuild the original content of each segment from inputs and targets alone, checking the format on the way.

    Returns a list (one per segment) of (content tokens, mode token id or None).
    """
    sentinel_ids = collator.sentinel_ids
    is_sentinel = lambda t: sentinel_ids[-1] <= t <= sentinel_ids[0]
    input_mask = batch["attention_mask"][row].bool()
    target_mask = batch["labels"][row] != -100
    inputs = batch["input_ids"][row][input_mask].tolist()
    targets = batch["labels"][row][target_mask].tolist()
    input_segments = batch["encoder_segment_ids"][row][input_mask].tolist()
    target_segments = batch["decoder_segment_ids"][row][target_mask].tolist()
    # padding is exactly the tail
    assert input_mask.tolist() == [True] * len(inputs) + [False] * (len(input_mask) - len(inputs))
    assert target_mask.tolist() == [True] * len(targets) + [False] * (len(target_mask) - len(targets))
    assert (batch["input_ids"][row][~input_mask] == collator.pad_token_id).all()
    assert sorted(set(input_segments)) == list(range(1, max(input_segments) + 1))
    assert sorted(set(input_segments)) == sorted(set(target_segments))

    # sentinels appear in order <extra_id_0>, <extra_id_1>, ... across the row, the same in inputs and targets
    input_sentinels = [t for t in inputs if is_sentinel(t)]
    target_sentinels = [t for t in targets if is_sentinel(t)]
    assert input_sentinels == target_sentinels == sentinel_ids[: len(input_sentinels)].tolist()

    segments = []
    for segment in sorted(set(input_segments)):
        seg_in = [t for t, s in zip(inputs, input_segments) if s == segment]
        seg_out = [t for t, s in zip(targets, target_segments) if s == segment]
        assert seg_in[-1] == collator.eos_token_id and seg_out[-1] == collator.eos_token_id
        seg_in, seg_out = seg_in[:-1], seg_out[:-1]
        mode = None
        if seg_in and seg_in[0] in collator._all_mode_ids:
            mode, seg_in = seg_in[0], seg_in[1:]
        if not any(is_sentinel(t) for t in seg_in):
            # prefix-LM (or uncorrupted) segment: inputs are a prefix, targets the rest
            assert not any(is_sentinel(t) for t in seg_out)
            segments.append((seg_in + seg_out, mode))
            continue
        # span corruption: targets = <s_k> span_k <s_k+1> span_k+1 ..., each span non-empty
        spans, current = {}, None
        for t in seg_out:
            if is_sentinel(t):
                current = t
                spans[current] = []
            else:
                assert current is not None, "targets must start with a sentinel"
                spans[current].append(t)
        assert all(len(s) > 0 for s in spans.values()), "empty noise span"
        assert seg_out[0] == next(t for t in seg_in if is_sentinel(t))
        # non-noise spans are non-empty too: no two sentinels adjacent, each document starts with non-noise
        assert not is_sentinel(seg_in[0])
        assert all(not (is_sentinel(a) and is_sentinel(b)) for a, b in zip(seg_in, seg_in[1:]))
        content = []
        for t in seg_in:
            content.extend(spans.pop(t) if is_sentinel(t) else [t])
        assert not spans
        segments.append((content, mode))
    return segments


def expected_segments(collator, example):
    """Original documents of an example, trailing eos removed (before any merging)."""
    ids = list(example["input_ids"])
    doc_ids = example.get("document_ids", [0] * len(ids))
    docs, current = [], []
    for i, (t, d) in enumerate(zip(ids, doc_ids)):
        current.append(t)
        if i + 1 == len(ids) or doc_ids[i + 1] != d:
            docs.append(current)
            current = []
    return docs


def flatten_with_eos(collator, docs, last_had_eos):
    """Concatenate segments, restoring the eos that separated documents."""
    out = []
    for i, doc in enumerate(docs):
        out.extend(doc)
        if i + 1 < len(docs) or last_had_eos:
            out.append(collator.eos_token_id)
    return out


def check_batch(collator, examples, batch):
    for row, example in enumerate(examples):
        segments = reconstruct(collator, batch, row)
        denoiser_index = collator.last_denoiser_indices[row]
        mode_ids = collator.mode_token_ids[denoiser_index]
        for _, mode in segments:
            assert mode == (mode_ids[0] if mode_ids else None)
        original = list(example["input_ids"])
        rebuilt = flatten_with_eos(collator, [s for s, _ in segments], original[-1] == collator.eos_token_id)
        assert rebuilt == original, "inputs + targets do not reconstruct the original row"
        assert int(batch["attention_mask"][row].sum()) <= collator.max_input_length
        assert int(batch["decoder_attention_mask"][row].sum()) <= collator.max_target_length


def with_mode_ids(collator):
    collator._all_mode_ids = {ids[0] for ids in collator.mode_token_ids if ids}
    return collator


def test_t5_lengths_follow_random_spans_helper():
    # T5's random_spans_helper: 512 input tokens <- 568 raw tokens, 114 target tokens (mean span 3, 15% noise).
    # The number of spans is rounded at random here (up to one more than T5's), so one raw token less fits.
    spec = t5_span_corruption_denoisers()[0]
    assert compute_input_and_target_lengths(512, spec, mode_token_length=0) == (567, 115)
    assert denoised_lengths(567, spec, mode_token_length=0) == (512, 115, 29)
    assert denoised_lengths(568, spec, mode_token_length=0)[0] == 513
    # several documents: one eos (and mode token) each, the counts drawn over the whole row
    assert denoised_lengths([300, 267], spec, mode_token_length=1) == (2 * 2 + 567 - 85 + 29, 2 + 85 + 29, 29)


def test_tokenizer_conventions(tokenizer):
    collator = DataCollatorForUL2(tokenizer, max_input_length=64, seed=0)
    vocab = tokenizer.get_vocab()
    assert collator.sentinel_ids[0] == vocab["<extra_id_0>"] == max(vocab.values())
    assert collator.sentinel_ids[-1] == vocab[f"<extra_id_{NUM_SENTINELS - 1}>"]
    assert [ids[0] for ids in collator.mode_token_ids] == [vocab[d.mode_token] for d in collator.denoisers]

    with pytest.raises(ValueError, match="<extra_id_0> has the highest id"):
        DataCollatorForUL2(make_tokenizer(sentinels_descending=False), max_input_length=64)
    with pytest.raises(ValueError, match=r"Mode token '\[S\]' is not a special token"):
        DataCollatorForUL2(make_tokenizer(mode_tokens=["[R]", "[X]"]), max_input_length=64)
    with pytest.raises(ValueError, match="no sentinel tokens"):
        DataCollatorForUL2(make_tokenizer(num_sentinels=0), max_input_length=64)
    with pytest.raises(ValueError, match="corruption_rate"):
        DenoiserSpec("bad", "[R]", 3.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="cannot fill"):
        DataCollatorForUL2(tokenizer, max_input_length=3)


ALL_DENOISERS = default_ul2_denoisers() + t5_span_corruption_denoisers()


@pytest.mark.parametrize("denoiser", ALL_DENOISERS, ids=[d.name for d in ALL_DENOISERS])
@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_reconstruction_exact(tokenizer, denoiser, packed):
    collator = with_mode_ids(
        DataCollatorForUL2(tokenizer, [denoiser], max_input_length=96, seed=1, return_segment_ids=True)
    )
    rng = np.random.default_rng(0)
    if packed:
        docs = [random_words(rng, int(n)) for n in rng.integers(1, 60, size=60)]
        examples = list(pack_token_sequences(docs, collator.chunk_length, collator.eos_token_id))
    else:
        lengths = [collator.chunk_length, collator.chunk_length - 1, 17, 5, 2, 1]
        examples = [{"input_ids": random_words(rng, n)} for n in lengths]
    for start in range(0, len(examples), 8):
        chunk = examples[start : start + 8]
        check_batch(collator, chunk, collator(chunk))


def test_mixture_reconstruction_and_shapes(tokenizer):
    collator = with_mode_ids(
        DataCollatorForUL2(
            tokenizer, max_input_length=80, seed=3, return_segment_ids=True, pad_to_max_length=True,
            pad_to_multiple_of=64,
        )
    )
    rng = np.random.default_rng(1)
    docs = [random_words(rng, int(n)) for n in rng.integers(1, 120, size=80)]
    examples = list(pack_token_sequences(docs, collator.chunk_length, collator.eos_token_id))
    batch = collator(examples)
    assert batch["input_ids"].shape == (len(examples), 128) and batch["labels"].shape == (len(examples), 128)
    assert all(v.dtype == torch.int64 for v in batch.values())
    check_batch(collator, examples, batch)
    assert len(set(collator.last_denoiser_indices)) > 3


def test_decoder_inputs_shifted_per_document(tokenizer):
    collator = DataCollatorForUL2(tokenizer, t5_span_corruption_denoisers(), max_input_length=64, seed=0,
                                  return_segment_ids=True, decoder_start_token_id=0)
    rng = np.random.default_rng(2)
    example = {"input_ids": random_words(rng, 20) + [1] + random_words(rng, 25) + [1],
               "document_ids": [0] * 21 + [1] * 26}
    batch = collator([example])
    labels, decoder_inputs, segments = batch["labels"][0], batch["decoder_input_ids"][0], batch["decoder_segment_ids"][0]
    n = int(batch["decoder_attention_mask"][0].sum())
    assert (labels[n:] == -100).all() and (labels[:n] != -100).all()
    for i in range(n):
        if i == 0 or segments[i] != segments[i - 1]:
            assert decoder_inputs[i] == 0
        else:
            assert decoder_inputs[i] == labels[i - 1]
    assert segments[:n].unique().tolist() == [1, 2]


SPAN_DENOISERS = [d for d in default_ul2_denoisers() if not d.prefix_lm]


@pytest.mark.parametrize("denoiser", SPAN_DENOISERS, ids=[d.name for d in SPAN_DENOISERS])
def test_empirical_rate_and_span_length(tokenizer, denoiser):
    # Long rows so that the number of spans is large (the 100 sentinels still cap X3-50).
    collator = DataCollatorForUL2(tokenizer, [denoiser], max_input_length=2048, seed=4, return_segment_ids=True)
    n = collator.raw_lengths[0]
    rng = np.random.default_rng(5)
    examples = [{"input_ids": random_words(rng, n)} for _ in range(16)]
    batch = collator(examples)
    sentinel_low, sentinel_high = collator.sentinel_ids[-1], collator.sentinel_ids[0]
    span_lengths, noise_counts, span_counts = [], [], []
    for row in range(len(examples)):
        targets = batch["labels"][row][batch["labels"][row] != -100][:-1].tolist()
        is_sentinel = [sentinel_low <= t <= sentinel_high for t in targets]
        noise_counts.append(len(targets) - sum(is_sentinel))
        span_counts.append(sum(is_sentinel))
        length = None
        for flag in is_sentinel:
            if flag:
                if length:
                    span_lengths.append(length)
                length = 0
            else:
                length = (length or 0) + 1
        if length:
            span_lengths.append(length)
    # noise tokens: T5's count, rounded half to even, in every row
    assert noise_counts == [round(n * denoiser.corruption_rate)] * 16
    # spans: noise / mean_span_length rounded down or up, never further
    expected_spans = noise_counts[0] / denoiser.mean_span_length
    assert set(span_counts) <= {min(np.floor(expected_spans), 100), min(np.ceil(expected_spans), 100)}
    assert abs(np.mean(span_lengths) - denoiser.mean_span_length) <= 0.1 * denoiser.mean_span_length
    # spans are random: their lengths vary
    assert np.std(span_lengths) > 0


def test_mixture_proportions(tokenizer):
    denoisers = default_ul2_denoisers()
    collator = DataCollatorForUL2(tokenizer, denoisers, max_input_length=32, seed=6)
    rng = np.random.default_rng(7)
    counts = np.zeros(len(denoisers))
    for _ in range(40):
        collator([{"input_ids": random_words(rng, 10)} for _ in range(50)])
        counts += np.bincount(collator.last_denoiser_indices, minlength=len(denoisers))
    expected = np.array([d.weight for d in denoisers]) / sum(d.weight for d in denoisers)
    # 2000 draws: 4 standard deviations of a binomial proportion
    assert np.all(np.abs(counts / counts.sum() - expected) <= 4 * np.sqrt(expected * (1 - expected) / 2000))


def test_group_denoisers_by_length(tokenizer):
    """`group_denoisers_by_length`: the groups are the denoisers whose chunk pads to the same lengths; each batch
    draws its rows' denoisers from one group; groups and denoisers within them keep the mixture's probabilities;
    rows stay exact; batches pad less than mixed batches of the same rows."""
    denoisers = default_ul2_denoisers()
    collator = with_mode_ids(
        DataCollatorForUL2(tokenizer, denoisers, max_input_length=64, pad_to_multiple_of=16, seed=6,
                           group_denoisers_by_length=True, return_segment_ids=True)
    )  # fmt: skip
    mixed = DataCollatorForUL2(tokenizer, denoisers, max_input_length=64, pad_to_multiple_of=16, seed=6)
    assert "group_denoisers_by_length=True" in repr(collator) and "group_denoisers" not in repr(mixed)
    # R (mean span 3 or 8) and X (mean span 64, 15%): long inputs, short targets; the other X and S (a random
    # split can fill either side): both sides full
    groups = [members.tolist() for members, _ in collator.denoiser_groups]
    assert groups == [[0, 1, 4], [2, 3, 5, 6]]
    padded = lambda n: -(-n // 16) * 16
    for members in groups:
        shapes = {tuple(padded(n) for n in denoised_lengths(collator.raw_lengths[i], denoisers[i])[:2]) for i in members}
        assert len(shapes) == 1
    expected = np.array([d.weight for d in denoisers]) / sum(d.weight for d in denoisers)
    assert collator.denoiser_group_probabilities.tolist() == pytest.approx([expected[g].sum() for g in groups])
    # padded to the limits, every batch has one shape already: one group, the whole mixture
    static = DataCollatorForUL2(tokenizer, denoisers, max_input_length=64, pad_to_max_length=True,
                                group_denoisers_by_length=True)  # fmt: skip
    assert [members.tolist() for members, _ in static.denoiser_groups] == [list(range(len(denoisers)))]

    rng = np.random.default_rng(7)
    documents = [random_words(rng, int(n)) for n in rng.integers(5, 80, size=500)]
    grouped_rows = pack_token_sequences_for_ul2(itertools.cycle(documents), collator, seed=7, batch_size=8)
    mixed_rows = pack_token_sequences_for_ul2(itertools.cycle(documents), mixed, seed=7, batch_size=8)
    group_counts, row_counts = np.zeros(len(groups)), np.zeros(len(denoisers))
    padded_tokens, padded_tokens_mixed, batches_mixing = 0, 0, 0
    for _ in range(600):
        examples = [next(grouped_rows) for _ in range(8)]
        batch = collator(examples)
        used = set(collator.last_denoiser_indices)
        (group,) = [g for g, members in enumerate(groups) if used <= set(members)]
        group_counts[group] += 1
        row_counts += np.bincount(collator.last_denoiser_indices, minlength=len(denoisers))
        batches_mixing += len(used) > 1
        padded_tokens += batch["input_ids"].numel() + batch["labels"].numel()
        mixed_batch = mixed([next(mixed_rows) for _ in range(8)])
        padded_tokens_mixed += mixed_batch["input_ids"].numel() + mixed_batch["labels"].numel()
    check_batch(collator, examples, batch)
    # 4 standard deviations of a binomial proportion: groups over 600 batches, denoisers over their group's rows
    group_expected = collator.denoiser_group_probabilities
    assert np.all(np.abs(group_counts / 600 - group_expected) <= 4 * np.sqrt(group_expected * (1 - group_expected) / 600))
    for members, probabilities in collator.denoiser_groups:
        rows = row_counts[members].sum()
        spread = 4 * np.sqrt(probabilities * (1 - probabilities) / rows) + 1e-12
        assert np.all(np.abs(row_counts[members] / rows - probabilities) <= spread)
    assert batches_mixing > 300  # rows of one batch still mix the denoisers of their group
    assert padded_tokens < 0.9 * padded_tokens_mixed


def test_edge_cases(tokenizer):
    collator = with_mode_ids(DataCollatorForUL2(tokenizer, t5_span_corruption_denoisers(), max_input_length=40,
                                                seed=8, return_segment_ids=True))
    rng = np.random.default_rng(9)
    # very short documents, a lone eos piece, and a row made only of tiny documents
    examples = [
        {"input_ids": [5]},
        {"input_ids": [5, 6]},
        {"input_ids": [1, 5, 6, 7, 1], "document_ids": [0, 1, 1, 1, 1]},
        {"input_ids": [5, 1, 6, 1, 7, 1], "document_ids": [0, 0, 1, 1, 2, 2]},
    ]
    tiny_docs = [random_words(rng, 2) for _ in range(30)]
    examples += list(pack_token_sequences(tiny_docs, collator.chunk_length, collator.eos_token_id))
    batch = collator(examples)
    check_batch(collator, examples, batch)
    # a 1-token example is not corrupted: inputs [mode?, 5, eos], targets [eos]
    assert batch["input_ids"][0][:2].tolist() == [5, 1] and batch["labels"][0][:2].tolist() == [1, -100]

    # a noise density giving more spans than non-noise tokens: spans are capped so every non-noise span is non-empty
    dense = DenoiserSpec("dense", "[X]", mean_span_length=1.0, corruption_rate=0.9, weight=1.0)
    collator = with_mode_ids(DataCollatorForUL2(tokenizer, [dense], max_input_length=64, seed=10,
                                                return_segment_ids=True))
    examples = [{"input_ids": random_words(rng, n)} for n in (collator.chunk_length, 10, 3, 2)]
    batch = collator(examples)
    check_batch(collator, examples, batch)
    assert denoised_lengths(10, dense) == (1 + 1 + 1 + 1, 9 + 1 + 1, 1)

    # many tiny documents with a mode token each overflow the limits: neighbours are merged, nothing is dropped
    # (R3 on a 2-token document: [R] a <extra_id_k> </s> is 4 input tokens for 3 raw tokens)
    r3 = default_ul2_denoisers()[0]
    collator = with_mode_ids(DataCollatorForUL2(tokenizer, [r3], max_input_length=40, seed=11, return_segment_ids=True))
    examples = list(pack_token_sequences([random_words(rng, 2) for _ in range(40)], collator.chunk_length, 1))
    batch = collator(examples)
    check_batch(collator, examples, batch)
    full_rows = [i for i, e in enumerate(examples) if len(e["input_ids"]) == collator.chunk_length]
    assert len(full_rows) >= 2
    for i in full_rows:
        assert int(batch["encoder_segment_ids"][i].max()) < len(set(examples[i]["document_ids"]))


def test_nothing_truncated(tokenizer):
    collator = DataCollatorForUL2(tokenizer, max_input_length=64, seed=11)
    rng = np.random.default_rng(12)
    # chunk_length fits every denoiser of the mixture, whatever is drawn
    for _ in range(5):
        collator([{"input_ids": random_words(rng, collator.chunk_length)} for _ in range(16)])
    with pytest.raises(ValueError, match="does not fit denoiser"):
        collator([{"input_ids": random_words(rng, 4 * collator.chunk_length)}])
    with pytest.raises(ValueError, match="document_ids has"):
        collator([{"input_ids": [5, 6, 7], "document_ids": [0, 0]}])


def test_reproducible_and_resumable(tokenizer):
    rng = np.random.default_rng(13)
    batches = [[{"input_ids": random_words(rng, 40)} for _ in range(4)] for _ in range(4)]

    def run(collator, bs):
        return [collator(b) for b in bs]

    def same(a, b):
        return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)

    first = DataCollatorForUL2(tokenizer, max_input_length=48, seed=14)
    outputs = run(first, batches)
    # a fresh collator with the same seed, and a "resumed" one that skipped the first half, give the same batches
    assert same(run(DataCollatorForUL2(tokenizer, max_input_length=48, seed=14), batches), outputs)
    resumed = DataCollatorForUL2(tokenizer, max_input_length=48, seed=999)
    resumed.load_state_dict(first.state_dict())
    assert same(run(resumed, batches[2:]), outputs[2:])
    # the outcome does not depend on the call order (DataLoader workers collate batches out of order)
    assert same(run(DataCollatorForUL2(tokenizer, max_input_length=48, seed=14), batches[::-1]), outputs[::-1])
    # another seed or another epoch gives other corruptions
    assert not same(run(DataCollatorForUL2(tokenizer, max_input_length=48, seed=15), batches), outputs)
    next_epoch = DataCollatorForUL2(tokenizer, max_input_length=48, seed=14)
    next_epoch.set_epoch(1)
    assert not same(run(next_epoch, batches), outputs)
    assert next_epoch.state_dict()["epoch"] == 1


def test_dataloader_workers_match_main_process(tokenizer):
    rng = np.random.default_rng(18)
    rows = [{"input_ids": random_words(rng, 30)} for _ in range(12)]
    collator = DataCollatorForUL2(tokenizer, max_input_length=48, seed=19)
    in_process = list(torch.utils.data.DataLoader(rows, batch_size=3, collate_fn=collator))
    with_workers = list(
        torch.utils.data.DataLoader(rows, batch_size=3, collate_fn=collator, num_workers=2,
                                    multiprocessing_context="fork")
    )
    assert all(torch.equal(a[k], b[k]) for a, b in zip(in_process, with_workers) for k in a)


def test_batch_feeds_a_t5_model(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    collator = DataCollatorForUL2(tokenizer, max_input_length=32, seed=16)
    rng = np.random.default_rng(17)
    batch = collator([{"input_ids": random_words(rng, collator.chunk_length)} for _ in range(3)])
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    # one document per row: on real target positions the decoder inputs are exactly T5's own shift of the labels
    real = batch["decoder_attention_mask"].bool()
    assert torch.equal(batch["decoder_input_ids"][real], model._shift_right(batch["labels"])[real])
