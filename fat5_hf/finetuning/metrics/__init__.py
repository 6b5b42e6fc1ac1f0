"""The registry's metrics as local ``evaluate`` modules, so that they load offline.

``evaluate.load("accuracy")`` fetches its script from the Hub; ``evaluate.load(<folder>)`` reads a local one. Each
folder here holds ``<name>/<name>.py``, an ``evaluate.Metric`` computed with the library behind it (scikit-learn,
seqeval, rouge-score), so that ``metric.compute(predictions=..., references=...)`` works as users know it:

- ``accuracy``: accuracy and macro F1 of class ids (scikit-learn);
- ``seqeval``: entity-level precision / recall / F1 of tag sequences (seqeval), IO tags accepted;
- ``squad_fr``: exact match and F1 of answers with FQuAD's French normalization (French articles, not English ones),
  SQuAD v2's handling of unanswerable questions;
- ``rouge_fr``: ROUGE-1/2/L/Lsum (rouge-score) with a tokenizer that keeps accented letters.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = tuple(sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file()))


def metric_path(name: str) -> str:
    """The folder to pass to ``evaluate.load`` for the metric ``name`` (one of `METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; fat5-hf ships {', '.join(METRIC_NAMES)}")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a shipped metric, offline. ``kwargs`` go to ``evaluate.load`` (``experiment_id``...)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
