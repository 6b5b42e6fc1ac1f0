"""The finetuning data pipeline (fat5_hf/finetuning/data.py, tasks.py): registry, loading the shipped fixtures through
the registry's loading code, label alignment for NER, QA windows and post-processing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fat5_hf.finetuning import TASKS, DataTrainingArguments, FinetuneConfigError, UnknownTaskError, get_task
from fat5_hf.finetuning.data import (
    load_raw_datasets,
    postprocess_qa_predictions,
    preprocess,
    resolve_label_names,
    resolve_task,
    squad_answers,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "recipes" / "data" / "finetune"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REPO_ROOT / "recipes" / "data" / "tokenizer")


class _Args(SimpleNamespace):
    """The part of TrainingArguments that preprocessing uses."""

    def main_process_first(self, desc=""):
        import contextlib

        return contextlib.nullcontext()


def test_registry_has_the_french_tasks_with_their_hub_ids():
    expected = {
        "allocine": ("tblard/allocine", None, "sequence-classification", "accuracy"),
        "xnli-fr": ("facebook/xnli", "fr", "sequence-classification", "accuracy"),
        "pawsx-fr": ("google-research-datasets/paws-x", "fr", "sequence-classification", "accuracy"),
        "french-ner": ("CATIE-AQ/frenchNER_4entities", None, "token-classification", "seqeval"),
        "french-qa": ("CATIE-AQ/frenchQA", None, "question-answering", "squad_fr"),
        "orange-sum": ("EdinburghNLP/orange_sum", "abstract", "text2text", "rouge_fr"),
    }
    for name, (dataset, config, task_type, metric) in expected.items():
        spec = get_task(name)
        assert (spec.dataset_name, spec.dataset_config, spec.task_type, spec.metric) == (dataset, config, task_type,
                                                                                        metric)  # fmt: skip
    with pytest.raises(UnknownTaskError, match="known tasks: allocine, french-ner"):
        get_task("squad")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_fixture_loads_through_the_registry_code(name):
    spec = get_task(name)
    raw = load_raw_datasets(spec, DataTrainingArguments(task=name, dataset_path=str(FIXTURES / name)))
    assert set(raw) == {"train", "validation", "test"} and all(len(split) > 0 for split in raw.values())
    labels = resolve_label_names(spec, raw)
    assert labels == (list(spec.label_names) if spec.label_names else None)


def test_text2text_recasts_classification_and_qa_not_ner():
    recast = resolve_task(DataTrainingArguments(task="allocine", task_type="text2text"))
    assert recast.task_type == "text2text" and recast.label_words == ("négatif", "positif")
    qa = resolve_task(DataTrainingArguments(task="french-qa", task_type="text2text"))
    assert qa.task_type == "text2text" and qa.metric == "squad_fr"
    with pytest.raises(FinetuneConfigError, match="no text-to-text form"):
        resolve_task(DataTrainingArguments(task="french-ner", task_type="text2text"))
    with pytest.raises(FinetuneConfigError, match="may only recast it as text2text"):
        resolve_task(DataTrainingArguments(task="allocine", task_type="token-classification"))


def test_custom_task_needs_its_columns(tmp_path):
    with pytest.raises(FinetuneConfigError, match="--text_column_names and --label_column_name"):
        resolve_task(DataTrainingArguments(task_type="sequence-classification", train_file=str(tmp_path / "a.csv")))
    with pytest.raises(FinetuneConfigError, match="expected a .csv, .json, .jsonl or .parquet"):
        DataTrainingArguments(task_type="text2text", train_file="data.txt")


def test_ner_labels_go_to_the_first_piece_or_to_all_pieces(tokenizer):
    import datasets

    spec = get_task("french-ner")
    words = ["Émile", "Zola", "habite", "Aix-en-Provence", "."]
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"tokens": words, "ner_tags": [1, 1, 0, 3, 0]}])})
    encoding = tokenizer(words, is_split_into_words=True)
    word_ids = encoding.word_ids()
    assert word_ids.count(3) > 1, "the test needs a word cut into several pieces"
    for label_all, expected in ((False, "first"), (True, "all")):
        args = DataTrainingArguments(task="french-ner", max_seq_length=64, label_all_tokens=label_all)
        features, _ = preprocess(spec, raw, tokenizer, args, list(spec.label_names), _Args())
        labels = features["train"][0]["labels"]
        pieces_of_word3 = [i for i, w in enumerate(word_ids) if w == 3]
        assert labels[pieces_of_word3[0]] == 3
        rest = [labels[i] for i in pieces_of_word3[1:]]
        assert rest == ([3] * len(rest) if expected == "all" else [-100] * len(rest))
        assert labels[-1] == -100  # EOS


def test_qa_windows_with_a_stride_locate_the_answer(tokenizer):
    import datasets

    spec = get_task("french-qa")
    rows = [json.loads(line) for line in (FIXTURES / "french-qa" / "train.jsonl").read_text().splitlines()[:4]]
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    args = DataTrainingArguments(task="french-qa", max_seq_length=48, doc_stride=8)
    features, examples = preprocess(spec, raw, tokenizer, args, None, _Args())
    train = features["train"]
    assert len(train) > len(rows)  # long contexts give several windows
    found = 0
    for feature in train:
        start, end = feature["start_positions"], feature["end_positions"]
        if start == 0 and end == 0:
            continue  # null answer: unanswerable, or the answer is outside this window
        text = tokenizer.decode(feature["input_ids"][start : end + 1]).strip()
        assert text in {r["answer"] for r in rows}, text
        found += 1
    assert found >= sum(1 for r in rows if r["answer"])  # every answer lies wholly in at least one window


def test_squad_answers_from_flat_columns():
    spec = get_task("french-qa")
    example = {"context": "Elle est née à Lyon.", "answer": "Lyon", "answer_start": 3}  # wrong offset
    assert squad_answers(spec, example) == {"text": ["Lyon"], "answer_start": [15]}
    assert squad_answers(spec, {"context": "x", "answer": "", "answer_start": -1}) == {"text": [], "answer_start": []}
    from fat5_hf.finetuning import FinetuneDataError

    with pytest.raises(FinetuneDataError, match="not in its context"):
        squad_answers(spec, {"context": "Elle est née à Lyon.", "answer": "Paris", "answer_start": 0})


def test_qa_postprocessing_picks_the_best_span_or_no_answer():
    import datasets

    context = "Marie est née à Lyon en 1900."
    examples = datasets.Dataset.from_list([{"id": "1", "context": context}, {"id": "2", "context": context}])
    # token k covers characters offsets[k]; position 0 is the question (None), the null answer's position
    offsets = [None, (0, 5), (6, 9), (10, 13), (14, 15), (16, 20), (21, 23), (24, 28)]
    features = datasets.Dataset.from_list(
        [{"example_id": "1", "offset_mapping": offsets}, {"example_id": "2", "offset_mapping": offsets}]
    )
    start = np.full((2, 9), -5.0)  # one column of padding beyond the offsets
    end = np.full((2, 9), -5.0)
    start[:, 5], end[:, 5] = 4.0, 4.0  # "Lyon"
    start[:, 8] = end[:, 8] = 50.0  # padding: ignored
    start[1, 0] = end[1, 0] = 6.0  # example 2: the null answer scores 12 > 8
    answers = postprocess_qa_predictions(examples, features, start, end, n_best_size=3, max_answer_length=5)
    assert answers == {"1": "Lyon", "2": ""}
    assert postprocess_qa_predictions(examples, features, start, end, with_negative=False)["2"] == "Lyon"
