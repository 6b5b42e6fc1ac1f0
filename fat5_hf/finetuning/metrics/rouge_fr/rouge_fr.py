"""ROUGE-1/2/L/Lsum F-measures for French text, computed with rouge-score and a tokenizer that keeps accents.

rouge-score's default tokenizer lower-cases, then replaces every character outside ``[a-z0-9]`` with a space: French
accented words are cut into pieces ("été" gives "t", "très" gives "tr" and "s", "événement" gives "v" and "nement"), so
ROUGE on French compares mangled text and counts spurious one-letter matches. This module gives rouge-score a
tokenizer that lower-cases and keeps the Unicode letters and digits (``\\w+`` runs), without stemming (rouge-score's Porter stemmer is English).
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer, scoring, tokenizers

_DESCRIPTION = """ROUGE F-measures (0 to 1), averaged over the examples, with a Unicode-aware tokenizer: words are runs
of letters and digits, accents kept, lower-cased, not stemmed. rougeLsum splits summaries on newlines."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated summaries.
    references (`list` of `str`): one reference summary each.
    rouge_types (`list` of `str`, default rouge1, rouge2, rougeL, rougeLsum).
Returns:
    one float per rouge type: the mean F-measure over the examples.
Example:
    >>> metric.compute(predictions=["un été chaud"], references=["un été très chaud"])["rouge1"]
    0.8571428571428571
"""

_CITATION = """@inproceedings{lin-2004-rouge, title={{ROUGE}: A Package for Automatic Evaluation of Summaries},
author={Lin, Chin-Yew}, booktitle={Text Summarization Branches Out}, year={2004}, pages={74--81}}"""

_WORD = re.compile(r"\w+")


class UnicodeWordTokenizer(tokenizers.Tokenizer):
    """Lower-cased runs of Unicode letters and digits (``_`` excluded): "L'été 2024" -> ["l", "été", "2024"]."""

    def tokenize(self, text):
        return _WORD.findall(text.lower().replace("_", " "))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeFr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None):
        rouge_types = list(rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"])
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=False, tokenizer=UnicodeWordTokenizer())
        aggregate = {key: [] for key in rouge_types}
        for prediction, reference in zip(predictions, references):
            score: dict[str, scoring.Score] = scorer.score(reference, prediction)
            for key in rouge_types:
                aggregate[key].append(score[key].fmeasure)
        if not predictions:
            raise ValueError("rouge_fr needs at least one prediction")
        return {key: sum(values) / len(values) for key, values in aggregate.items()}
