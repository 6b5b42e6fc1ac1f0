"""Exact match and F1 of extractive / generated answers, with FQuAD's French normalization and SQuAD v2's rules.

SQuAD's official script normalizes answers by lower-casing, removing punctuation and the English articles
(a, an, the) and collapsing spaces. For French that leaves "la tour Eiffel" and "tour Eiffel" unequal; FQuAD's
evaluation strips the French articles instead. Here, in this order (elisions must go before the apostrophe is removed
with the punctuation): lower-case; remove the articles le, la, les, un, une, des, du, au, aux, de la, de l' and the
elided l' and d' (straight or typographic apostrophe); remove punctuation (every Unicode punctuation character,
guillemets included); collapse spaces. Accents are kept.

Unanswerable questions (SQuAD v2): a reference with no answer text counts as the answer "", so a prediction scores 1
exactly when it is empty too.
"""

import collections
import re
import unicodedata

import datasets
import evaluate

_DESCRIPTION = """SQuAD-style exact match and token F1 (0 to 100) for French answers: French articles and elisions are
removed before comparison, punctuation is any Unicode punctuation, accents are kept; empty references are unanswerable
questions (SQuAD v2)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `dict`): {"id": str, "prediction_text": str}; "" means "no answer".
    references (`list` of `dict`): {"id": str, "answers": {"text": list of str, "answer_start": list of int}}.
Returns:
    exact_match, f1 (`float`, 0 to 100): best over each question's reference answers, averaged over questions;
    total; and HasAns_exact_match / HasAns_f1 / HasAns_total, NoAns_* for answerable and unanswerable questions
    when both kinds are present.
Example:
    >>> metric.compute(predictions=[{"id": "1", "prediction_text": "la tour Eiffel"}],
    ...                references=[{"id": "1", "answers": {"text": ["Tour Eiffel"], "answer_start": [0]}}])
    {'exact_match': 100.0, 'f1': 100.0, 'total': 1}
"""

_CITATION = """@inproceedings{dhoffschmidt-etal-2020-fquad, title={{FQ}u{AD}: {F}rench Question Answering Dataset},
author={d'Hoffschmidt, Martin and Belblidia, Wacim and Heinrich, Quentin and Brendl{\\'e}, Tom and Vidal, Maxime},
booktitle={Findings of EMNLP}, year={2020}}"""

_ARTICLES = re.compile(r"\b(?:de\s+la|de\s+l['’]|le|la|les|un|une|des|du|au|aux)\b|\b[ld]['’]")


def normalize_answer(text: str) -> str:
    """Lower-case, French articles and elisions out, punctuation out, spaces collapsed (see the module docstring)."""
    text = _ARTICLES.sub(" ", text.lower())
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # unanswerable on either side: 1 when both are empty
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadFr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
            reference_urls=["https://fquad.illuin.tech/", "https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references):
        predicted = {p["id"]: p["prediction_text"] for p in predictions}
        scores = {"HasAns": [], "NoAns": []}
        for ref in references:
            if ref["id"] not in predicted:
                raise ValueError(f"no prediction for question id {ref['id']!r}")
            golds = [t for t in ref["answers"]["text"] if normalize_answer(t)] or [""]
            prediction = predicted[ref["id"]]
            kind = "HasAns" if golds != [""] else "NoAns"
            scores[kind].append(
                (max(exact_match(prediction, g) for g in golds), max(f1(prediction, g) for g in golds))
            )
        every = scores["HasAns"] + scores["NoAns"]
        if not every:
            raise ValueError("squad_fr needs at least one question")
        result = {
            "exact_match": 100.0 * sum(em for em, _ in every) / len(every),
            "f1": 100.0 * sum(f for _, f in every) / len(every),
            "total": len(every),
        }
        if scores["HasAns"] and scores["NoAns"]:
            for kind, values in scores.items():
                result[f"{kind}_exact_match"] = 100.0 * sum(em for em, _ in values) / len(values)
                result[f"{kind}_f1"] = 100.0 * sum(f for _, f in values) / len(values)
                result[f"{kind}_total"] = len(values)
        return result
