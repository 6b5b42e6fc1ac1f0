"""benchmarks/length_generalization.py on CPU at toy sizes: the span corruption and the results' shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import length_generalization  # noqa: E402

from fat5_hf import kernel_ops  # noqa: E402


@pytest.mark.parametrize("length", [16, 100, 1000])
def test_span_corruption_hides_and_returns_every_noise_token(length):
    rng = np.random.default_rng(length)
    window = rng.integers(3, 259, size=length)
    inputs, targets = length_generalization.span_corruption(window, sentinel_base=259, sentinels=4, rng=rng)
    assert inputs[-1] == 1 and targets[-1] == 1
    # put each span back in place of its sentinel: the window again
    spans, current = [], None
    for token in targets[:-1]:
        if token >= 259:
            current = []
            spans.append((token, current))
        else:
            current.append(token)
    rebuilt = []
    for token in inputs[:-1]:
        if token >= 259:
            sentinel, span = spans.pop(0)
            assert sentinel == token
            rebuilt.extend(span)
        else:
            rebuilt.append(token)
    assert spans == [] and np.array_equal(rebuilt, window)
    noise = len(targets) - 1 - sum(1 for t in targets[:-1] if t >= 259)
    assert abs(noise - 0.15 * length) <= 1
    assert {t for t in inputs if t >= 259} <= set(range(259, 263))  # sentinels reused cyclically


def test_tiny_run_writes_the_results(tmp_path):
    results = length_generalization.main([
        "--device", "cpu", "--encodings", "t5,rope", "--steps", "2", "--batch-size", "2", "--train-length", "32",
        "--eval-lengths", "32,64", "--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--eval-windows", "1",
        "--output-dir", str(tmp_path),
    ])  # fmt: skip
    written = json.loads((tmp_path / "length_generalization.json").read_text())
    assert written == results
    assert set(written) == {"environment", "args", "rows"}
    assert set(written["environment"]) == {"gpu", "gpus", "torch", "cuda", "triton", "transformers", "python", "date",
                                           "commit"}  # fmt: skip
    assert written["args"]["train_file"] == "recipes/data/fr_corpus_train.jsonl"
    assert [(r["position_encoding"], r["length"]) for r in written["rows"]] == [
        ("t5", 32), ("t5", 64), ("rope", 32), ("rope", 64)
    ]
    assert all(np.isfinite(r["eval_loss"]) and r["windows"] == 1 for r in written["rows"])
    table = (tmp_path / "length_generalization.md").read_text()
    assert "| rope |" in table and "L=64" in table


@pytest.mark.interpreter
def test_fire_is_evaluated_past_its_threshold_in_the_kernel(tmp_path):
    """FIRE trained at length 16 (threshold 16) and evaluated at 48 on the kernel path: no materialized bias."""
    if not kernel_ops.kernel_available("attention"):
        pytest.skip("fat5_kernels has no attention kernel here")
    with kernel_ops.kernels_on_cpu():
        results = length_generalization.main([
            "--device", "cpu", "--encodings", "fire", "--steps", "1", "--batch-size", "1", "--train-length", "16",
            "--eval-lengths", "48", "--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--eval-windows", "1",
            "--output-dir", str(tmp_path),
        ])  # fmt: skip
    (row,) = results["rows"]
    assert row["encoder_length"] > 16 and np.isfinite(row["eval_loss"])
    assert row["materialized_biases"] == 0
