"""The recipe benchmark's command lines, summary and report; one short eager run of the embedded default on the CPU
(the timings themselves need a GPU)."""

import argparse
import importlib.util
import json
import os

import pytest
import results_io

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "pretrain_recipe.py")
_spec = importlib.util.spec_from_file_location("pretrain_recipe_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def _args(**overrides):
    fields = dict(config="", config_data=False, steps=6, logging_steps=2, skip_windows=1, pad_to_multiple_of=512,
                  group_denoisers_by_length=False, mixed_precision="bf16", override=[])  # fmt: skip
    return argparse.Namespace(**{**fields, **overrides})


def test_modes_differ_only_in_their_compile_options(tmp_path):
    args = _args(override=["training.per_device_batch_size=8"])
    eager, graphs = (benchmark.recipe_command(args, mode, str(tmp_path)) for mode in ("eager", "cudagraphs"))
    # the mode's options, then the user's overrides last (so that they win)
    assert graphs == eager[:-1] + benchmark.MODES["cudagraphs"] + ["training.per_device_batch_size=8"]
    assert "data.collator_kwargs.pad_to_multiple_of=512" in eager and "data.dataset_name=null" in eager
    assert not any("group_denoisers_by_length" in part for part in eager)
    per_batch = benchmark.recipe_command(_args(group_denoisers_by_length=True), "eager", str(tmp_path))
    assert "data.collator_kwargs.group_denoisers_by_length=true" in per_batch
    assert "--config" not in eager  # '' runs the embedded default
    assert "data.dataset_name=null" not in benchmark.recipe_command(_args(config_data=True), "eager", str(tmp_path))


def test_summary_skips_the_warm_up_windows_and_reports_the_median(tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [dict(step=2 * i, loss=5.0 - i, tokens_per_s=rate) for i, rate in enumerate([10, 400, 100, 300], 1)]
    log.write_text("\n".join(json.dumps(r) for r in [*records, dict(step=8, eval_loss=1.25, sample="x")]) + "\n")
    row = benchmark.summarize("eager", str(log), skip_windows=1)
    assert row["tokens_per_s"] == 300 and (row["tokens_per_s_min"], row["tokens_per_s_max"]) == (100, 400)
    assert row["timed_windows"] == 3 and row["steps"] == 8 and row["final_loss"] == 1.0 and row["eval_loss"] == 1.25
    assert row["loss_windows"] == [4.0, 3.0, 2.0, 1.0]
    with pytest.raises(SystemExit, match="none left after --skip-windows 4"):
        benchmark.summarize("eager", str(log), skip_windows=4)


def test_markdown_ratio_against_eager():
    common = dict(steps=60, timed_windows=5, tokens_per_s_windows=[], final_loss=9.4, eval_loss=9.0)
    rows = [
        dict(mode="eager", tokens_per_s=300_000, tokens_per_s_min=270_000, tokens_per_s_max=350_000, **common),
        dict(mode="cudagraphs", tokens_per_s=416_000, tokens_per_s_min=415_000, tokens_per_s_max=418_000, **common),
    ]
    lines = results_io.markdown_table(rows, benchmark.columns(rows)).splitlines()
    assert "60 steps a mode" in benchmark.method(_args(steps=60, logging_steps=10))
    assert lines[-1] == "| cudagraphs | 416,000 | 415,000-418,000 | 1.39x | 9.400 | 9.000 |"


@pytest.mark.slow
def test_short_eager_run_on_cpu(tmp_path):
    """The whole path on the CPU: the recipe launched for the embedded default, its log summarized, the report
    written."""
    argv = ["--config", "", "--modes", "eager", "--steps", "4", "--logging-steps", "1", "--skip-windows", "1",
            "--pad-to-multiple-of", "0", "--mixed-precision", "no", "--override", "training.cpu=true",
            "--override", "training.per_device_batch_size=2", "--output-dir", str(tmp_path)]  # fmt: skip
    (row,) = benchmark.main(argv)
    assert row["mode"] == "eager" and row["steps"] == 4 and row["timed_windows"] == 3 and row["tokens_per_s"] > 0
    saved = json.loads((tmp_path / "pretrain_recipe.json").read_text())
    assert saved["rows"] == [row] and saved["environment"]["gpu"] == "CPU"
    assert (tmp_path / "pretrain_recipe.md").read_text().splitlines()[-1].startswith("| eager | ")
