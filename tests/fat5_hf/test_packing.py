"""Document packing: exact token stream, row-local document ids, datasets.map / streaming paths, end to end with UL2."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from fat5_hf.packing import (
    make_tokenize_function,
    pack_batch,
    pack_dataset,
    pack_token_sequences,
    pack_token_sequences_for_ul2,
    segment_ids_to_cu_seqlens,
)
from fat5_hf.ul2 import DataCollatorForUL2

EOS = 1
REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "recipes" / "data" / "tokenizer"
VALIDATION_FILE = REPO / "recipes" / "data" / "fr_corpus_validation.jsonl"


def check_rows(rows, documents, chunk_length, drop_remainder=False):
    """Rows are consecutive slices of the eos-joined stream; document ids restart per row and follow boundaries."""
    stream, stream_docs = [], []
    for index, doc in enumerate(d for d in documents if len(d) > 0):
        tokens = list(doc) + ([EOS] if doc[-1] != EOS else [])
        stream += tokens
        stream_docs += [index] * len(tokens)
    flat = [t for r in rows for t in r["input_ids"]]
    expected_length = len(stream) - (len(stream) % chunk_length if drop_remainder else 0)
    assert flat == stream[:expected_length]
    position = 0
    for row_index, row in enumerate(rows):
        ids, doc_ids = row["input_ids"], row["document_ids"]
        assert len(ids) == len(doc_ids)
        if row_index < len(rows) - 1 or drop_remainder:
            assert len(ids) == chunk_length
        else:
            assert 0 < len(ids) <= chunk_length
        global_docs = stream_docs[position : position + len(ids)]
        # row-local ids: 0 for the first document of the row, +1 at each new document
        expected = np.cumsum([0] + [int(a != b) for a, b in zip(global_docs, global_docs[1:])]).tolist()
        assert doc_ids == expected
        position += len(ids)


def test_docstring_example():
    assert pack_batch({"input_ids": [[5, 6, 7], [8, 9]]}, chunk_length=4, eos_token_id=EOS) == {
        "input_ids": [[5, 6, 7, 1], [8, 9, 1]],
        "document_ids": [[0, 0, 0, 0], [0, 0, 0]],
    }


@pytest.mark.parametrize("chunk_length", [1, 7, 16, 100])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_pack_token_sequences_exact(chunk_length, drop_remainder):
    rng = np.random.default_rng(0)
    documents = [rng.integers(3, 50, size=int(n)).tolist() for n in rng.integers(0, 40, size=30)]
    documents[3] = []  # empty documents are skipped
    documents[5] = documents[5] + [EOS]  # an eos already there is not doubled
    rows = list(pack_token_sequences(documents, chunk_length, EOS, drop_remainder=drop_remainder))
    check_rows(rows, documents, chunk_length, drop_remainder)


def test_long_document_spans_rows():
    rows = list(pack_token_sequences([[5] * 10, [6] * 3], chunk_length=4, eos_token_id=EOS))
    assert [r["input_ids"] for r in rows] == [[5, 5, 5, 5], [5, 5, 5, 5], [5, 5, 1, 6], [6, 6, 1]]
    assert [r["document_ids"] for r in rows] == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0]]


def test_bad_input():
    with pytest.raises(ValueError, match="chunk_length"):
        list(pack_token_sequences([[5]], 0, EOS))
    with pytest.raises(KeyError, match="input_ids"):
        pack_batch({"text": ["a"]}, 4, EOS)
    with pytest.raises(KeyError, match="body"):
        make_tokenize_function(lambda x, **k: None, text_column="body")({"text": ["a"]})


def test_datasets_map_and_streaming_paths(tmp_path):
    rng = np.random.default_rng(1)
    documents = [rng.integers(3, 50, size=int(n)).tolist() for n in rng.integers(1, 30, size=25)]
    dataset = datasets.Dataset.from_dict({"input_ids": documents, "other": list(range(25))})
    # one map batch holding every document packs exactly like the plain generator
    packed = pack_dataset(dataset, 16, EOS, batch_size=100)
    assert packed.column_names == ["input_ids", "document_ids"]
    check_rows(list(packed), documents, 16)

    # streamed from a local json file (the same code path as load_dataset(name, streaming=True))
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"input_ids": d, "meta": "x"}) + "\n" for d in documents))
    streamed = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    rows = list(pack_dataset(streamed, 16, EOS, batch_size=100))
    check_rows(rows, documents, 16)


def test_text_to_ul2_batch_end_to_end():
    """Shipped tokenizer + validation corpus -> packing -> UL2 collator: every token of every row is accounted for."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    collator = DataCollatorForUL2(tokenizer, max_input_length=128, seed=0, return_segment_ids=True)
    texts = datasets.load_dataset("json", data_files=str(VALIDATION_FILE), split="train")
    packed = pack_dataset(texts, collator.chunk_length, tokenizer.eos_token_id, tokenizer=tokenizer, batch_size=1000)
    rows = list(packed)
    assert len(rows) > 10 and all(len(r["input_ids"]) == collator.chunk_length for r in rows[:-1])
    # the packed stream decodes back to the (normalized) documents
    stream = [t for r in rows for t in r["input_ids"]]
    documents = tokenizer.decode(stream, skip_special_tokens=False).split(tokenizer.eos_token)
    assert documents[0].startswith(texts[0]["title"]) and len(documents) == len(texts) + 1

    batch = collator(rows[:16])
    for side, mask in (("encoder_segment_ids", "attention_mask"), ("decoder_segment_ids", "decoder_attention_mask")):
        _, cu_seqlens, _ = segment_ids_to_cu_seqlens(batch[side])
        assert len(cu_seqlens) - 1 == int(batch[side].amax(dim=1).sum())  # one sequence per (row, document)
        assert int(cu_seqlens[-1]) == int(batch[mask].sum())
    sentinel_low, sentinel_high = collator.sentinel_ids[-1], collator.sentinel_ids[0]
    mode_ids = {ids[0] for ids in collator.mode_token_ids}
    for row, example in enumerate(rows[:16]):
        inputs = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        targets = batch["labels"][row][batch["decoder_attention_mask"][row].bool()].tolist()
        is_extra = lambda t: sentinel_low <= t <= sentinel_high or t in mode_ids
        content = [t for t in inputs + targets if not is_extra(t) and t != tokenizer.eos_token_id]
        original = [t for t in example["input_ids"] if t != tokenizer.eos_token_id]
        assert sorted(content) == sorted(original)
        assert len(inputs) <= 128 and len(targets) <= 128


def test_segment_ids_to_cu_seqlens():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 2, 3, 3, 0, 0]])
    indices, cu_seqlens, max_seqlen = segment_ids_to_cu_seqlens(segment_ids)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 18, 19, 20, 21]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 5, 11, 12, 13, 15]
    assert max_seqlen == 6
    # rows whose last document has the same id as the next row's first are still separate sequences
    _, cu, _ = segment_ids_to_cu_seqlens(torch.tensor([[1, 1], [1, 1]]))
    assert cu.tolist() == [0, 2, 4]
    _, cu, m = segment_ids_to_cu_seqlens(torch.zeros(2, 3, dtype=torch.long))
    assert cu.tolist() == [0] and m == 0
    with pytest.raises(ValueError, match="batch, length"):
        segment_ids_to_cu_seqlens(torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("max_input_length", [128, 512])
def test_packed_corpus_keeps_each_denoisers_rate_and_span_length(max_input_length):
    """On real rows packed for their denoiser (several documents a row, documents cut at row boundaries), the
    span denoisers realize their corruption rate and, where a row holds a span's worth of noise, their mean span
    length (the S split is random: see test_ul2_fidelity.py)."""
    from fat5_hf.ul2 import default_ul2_denoisers

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    texts = datasets.load_dataset("json", data_files=str(VALIDATION_FILE), split="train")
    documents = make_tokenize_function(tokenizer, "text")(texts[:])["input_ids"]
    for denoiser in default_ul2_denoisers():
        collator = DataCollatorForUL2(tokenizer, [denoiser], max_input_length=max_input_length, seed=0)
        rows = list(pack_token_sequences_for_ul2(documents * 4, collator, seed=0))
        batch = collator(rows)
        labels = batch["labels"]
        is_sentinel = (labels >= int(collator.sentinel_ids[-1])) & (labels <= int(collator.sentinel_ids[0]))
        noise = int(((labels != -100) & ~is_sentinel & (labels != tokenizer.eos_token_id)).sum())
        spans = int(is_sentinel.sum())
        if denoiser.prefix_lm:
            assert spans == 0
            continue
        content = sum(sum(t != tokenizer.eos_token_id for t in row["input_ids"]) for row in rows)
        assert abs(noise / content - denoiser.corruption_rate) < 0.01, (denoiser.name, noise / content)
        if noise / len(rows) >= denoiser.mean_span_length:  # at least one span's worth of noise a row
            assert abs(noise / spans - denoiser.mean_span_length) < 0.1 * denoiser.mean_span_length, denoiser.name
        assert collator.documents_merged == 0
