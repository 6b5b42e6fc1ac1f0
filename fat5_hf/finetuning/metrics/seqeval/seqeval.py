"""Entity-level precision, recall and F1 of tag sequences, computed with seqeval (offline twin of the Hub's
``seqeval``).

Tags are ``B-X`` / ``I-X`` (IOB2, CoNLL) or bare entity types (``PER``, ``LOC``: the IO scheme of datasets such as
frenchNER_4entities). seqeval reads the first letter of a tag as its B/I prefix, so a bare ``PER`` would become an
entity of type ``ER``; bare types are therefore read as ``I-<type>`` (a run of equal tags is one entity).
"""

import datasets
import evaluate
from seqeval.metrics import accuracy_score, classification_report

_DESCRIPTION = """Entity-level scores of sequence labelling (NER): an entity counts as found when its type and its
whole span match. Returns overall precision / recall / F1 / token accuracy and per-type precision / recall / F1."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`): predicted tags, one list per sentence.
    references (`list` of `list` of `str`): true tags, same lengths.
    zero_division (`int`, default 0): value of a ratio whose denominator is 0.
Returns:
    overall_precision, overall_recall, overall_f1, overall_accuracy (`float`, 0 to 1), and for each entity type X a
    dict `X` with precision, recall, f1, number.
Example:
    >>> metric.compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "O"]])["overall_f1"]
    1.0
"""

_CITATION = """@misc{seqeval, title={{seqeval}: A Python framework for sequence labeling evaluation},
url={https://github.com/chakki-works/seqeval}, author={Hiroki Nakayama}, year={2018}}"""

_PREFIXES = ("B-", "I-", "E-", "S-", "L-", "U-")


def _with_prefix(tag: str) -> str:
    return tag if tag == "O" or tag.startswith(_PREFIXES) else f"I-{tag}"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/chakki-works/seqeval"],
        )

    def _compute(self, predictions, references, zero_division=0):
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            if len(pred) != len(ref):
                raise ValueError(f"sentence {i}: {len(pred)} predicted tags for {len(ref)} reference tags")
        predictions = [[_with_prefix(t) for t in seq] for seq in predictions]
        references = [[_with_prefix(t) for t in seq] for seq in references]
        report = classification_report(
            y_true=references, y_pred=predictions, output_dict=True, zero_division=zero_division
        )
        scores = {
            entity_type: {
                "precision": float(values["precision"]),
                "recall": float(values["recall"]),
                "f1": float(values["f1-score"]),
                "number": int(values["support"]),
            }
            for entity_type, values in report.items()
            if not entity_type.endswith(" avg")
        }
        micro = report["micro avg"]
        scores["overall_precision"] = float(micro["precision"])
        scores["overall_recall"] = float(micro["recall"])
        scores["overall_f1"] = float(micro["f1-score"])
        scores["overall_accuracy"] = float(accuracy_score(y_true=references, y_pred=predictions))
        return scores
