"""The shipped ``evaluate`` metric modules (fat5_hf/finetuning/metrics) against values computed by hand, offline."""

from __future__ import annotations

import pytest

from fat5_hf.finetuning.metrics import METRIC_NAMES, load_metric


def test_every_registry_metric_ships_and_loads_offline():
    from fat5_hf.finetuning import TASKS

    assert {spec.metric for spec in TASKS.values()} <= set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert load_metric(name).name  # evaluate.load of a local folder: no Hub
    with pytest.raises(ValueError, match="fat5-hf ships accuracy"):
        load_metric("bleu")


def test_accuracy_and_macro_f1():
    result = load_metric("accuracy").compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    # accuracy 3/4; F1 per class: 0 -> 1, 1 -> p 1/2 r 1 -> 2/3, 2 -> p 1 r 1/2 -> 2/3; macro = (1 + 2/3 + 2/3) / 3
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_seqeval_entity_f1_with_io_and_bio_tags():
    metric = load_metric("seqeval")
    # IO tags (frenchNER): gold PER(0-1), LOC(3); predicted PER(0), LOC(3) -> 1 of 2 right both ways.
    io = metric.compute(predictions=[["PER", "O", "O", "LOC"]], references=[["PER", "PER", "O", "LOC"]])
    assert io["overall_precision"] == pytest.approx(0.5) and io["overall_recall"] == pytest.approx(0.5)
    assert io["overall_f1"] == pytest.approx(0.5) and io["overall_accuracy"] == pytest.approx(0.75)
    assert io["LOC"]["f1"] == 1.0 and io["PER"]["f1"] == 0.0
    # BIO tags, two sentences: gold PER, ORG, LOC; predicted PER (right), ORG with a wrong span -> p 1/2, r 1/3.
    bio = metric.compute(
        predictions=[["B-PER", "I-PER", "O"], ["B-ORG", "O", "O", "O"]],
        references=[["B-PER", "I-PER", "O"], ["B-ORG", "I-ORG", "O", "B-LOC"]],
    )
    assert bio["overall_precision"] == pytest.approx(1 / 2) and bio["overall_recall"] == pytest.approx(1 / 3)
    assert bio["overall_f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


def test_squad_fr_strips_french_articles_not_english_ones():
    import importlib.util

    from fat5_hf.finetuning.metrics import metric_path

    spec = importlib.util.spec_from_file_location("squad_fr", f"{metric_path('squad_fr')}/squad_fr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.normalize_answer("L'Académie française") == "académie française"
    assert module.normalize_answer("de la Tour d’Auvergne, « le » château !") == "tour auvergne château"
    assert module.normalize_answer("Les Misérables") == "misérables"
    assert module.normalize_answer("The Louvre") == "the louvre"  # English articles are words here

    metric = load_metric("squad_fr")
    refs = [
        {"id": "a", "answers": {"text": ["Louvre"], "answer_start": [0]}},
        {"id": "b", "answers": {"text": ["Louvre"], "answer_start": [0]}},
        {"id": "c", "answers": {"text": ["musée du Louvre", "Louvre"], "answer_start": [0, 9]}},
        {"id": "d", "answers": {"text": [], "answer_start": []}},  # unanswerable
        {"id": "e", "answers": {"text": [], "answer_start": []}},
    ]
    preds = [
        {"id": "a", "prediction_text": "le Louvre"},  # EM 1, F1 1
        {"id": "b", "prediction_text": "the Louvre"},  # EM 0, F1: p 1/2 r 1 -> 2/3
        {"id": "c", "prediction_text": "au musée"},  # best of two: "musée louvre" vs "musée": p 1 r 1/2 -> 2/3
        {"id": "d", "prediction_text": ""},  # right abstention: 1, 1
        {"id": "e", "prediction_text": "Paris"},  # wrong: 0, 0
    ]
    result = metric.compute(predictions=preds, references=refs)
    assert result["exact_match"] == pytest.approx(100 * 2 / 5)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3 + 1 + 0) / 5)
    assert result["HasAns_total"] == 3 and result["NoAns_total"] == 2
    assert result["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 3) and result["NoAns_f1"] == 50.0


def test_rouge_fr_keeps_accented_words():
    from rouge_score import tokenizers

    metric = load_metric("rouge_fr")
    result = metric.compute(predictions=["Un été chaud"], references=["un été très chaud"])
    # unigrams: 3 of 3 predicted in 4 reference -> p 1, r 3/4, F 6/7; bigrams: "un été" of 2 vs 3 -> p 1/2, r 1/3
    assert result["rouge1"] == pytest.approx(6 / 7) and result["rougeL"] == pytest.approx(6 / 7)
    assert result["rouge2"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    # rouge-score's own tokenizer cuts words at accented letters (the trap this metric avoids) ...
    assert tokenizers.DefaultTokenizer().tokenize("été très à Noël") == ["t", "tr", "s", "no", "l"]
    # ... here: 2 of 2 predicted words in 3 reference words -> p 1, r 2/3, F 4/5
    assert metric.compute(predictions=["été chaud"], references=["été très chaud"])["rouge1"] == pytest.approx(0.8)
    # rougeLsum splits on newlines; averages over examples
    two = metric.compute(predictions=["a b", "c"], references=["a b", "d"])
    assert two["rouge1"] == pytest.approx(0.5)
