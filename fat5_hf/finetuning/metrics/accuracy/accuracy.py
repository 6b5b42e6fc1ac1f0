"""Accuracy and macro F1 of class ids, computed with scikit-learn (offline twin of the Hub's ``accuracy``)."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score

_DESCRIPTION = """Accuracy: the fraction of predictions equal to their reference, and macro_f1: the unweighted mean of
the per-class F1 scores (classes seen in references or predictions)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    sample_weight (`list` of `float`, *optional*): per-example weights.
Returns:
    accuracy (`float`, 0 to 1), macro_f1 (`float`, 0 to 1).
Example:
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'macro_f1': 0.6666666666666666}
"""

_CITATION = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython},
author={Pedregosa, F. and others},
journal={Journal of Machine Learning Research}, volume={12}, pages={2825--2830}, year={2011}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {
            "accuracy": float(accuracy_score(references, predictions, sample_weight=sample_weight)),
            "macro_f1": float(f1_score(references, predictions, average="macro", sample_weight=sample_weight)),
        }
