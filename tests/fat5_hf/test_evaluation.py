"""Unit tests of the evaluation suite's pieces that need no training: model entries, the output-folder rule, the
tables (mean ± std, best in bold, the suite average over the tasks every model ran), the plot, the evaluation model
card (renders and parses back) and the Hub push helper's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fat5_hf.finetuning.evaluation import (
    CONFIG_JSON,
    EvaluationConfigError,
    ModelEntry,
    plot_results,
    prepare_evaluation_dir,
    results_table,
)


def make_row(model: str, task: str, seed: int, score: float, seconds: float = 10.0) -> dict:
    return {"model": model, "task": task, "seed": seed, "score": score, "metric": {"allocine": "accuracy",
            "french-ner": "overall_f1"}[task], "train_runtime_s": seconds, "train_tokens_per_second": 1000.0,
            "device": "CPU (x86_64)", "commit": "abcdef1234567", "transformers": "5", "torch": "2"}  # fmt: skip


ROWS = [
    make_row("FAT5", "allocine", 1, 0.80, 5.0),
    make_row("FAT5", "allocine", 2, 0.90, 7.0),
    make_row("T5", "allocine", 1, 0.70),
    make_row("T5", "allocine", 2, 0.70),
    make_row("FAT5", "french-ner", 1, 0.40),
    make_row("FAT5", "french-ner", 2, 0.50),
    make_row("T5", "french-ner", 1, 0.60),
    make_row("T5", "french-ner", 2, 0.60),
]


def test_model_entries_parse_names_paths_and_conversion():
    assert ModelEntry.parse("google/mt5-small") == ModelEntry("mt5-small", "google/mt5-small")
    assert ModelEntry.parse("mine=./out/fat5/") == ModelEntry("mine", "./out/fat5/")
    assert ModelEntry.parse("fat5:google/flan-t5-small") == ModelEntry(
        "flan-t5-small (as FAT5)", "google/flan-t5-small", convert_to_fat5=True
    )
    with pytest.raises(EvaluationConfigError, match="no checkpoint"):
        ModelEntry.parse("name=")


def test_table_has_mean_std_best_in_bold_and_average():
    table = results_table(ROWS)
    assert "| task (metric) | FAT5 | T5 |" in table
    # allocine: FAT5 85 ± 7.07 (sample std) beats T5 70
    assert "| allocine (accuracy) | **85.00 ± 7.07** | 70.00 ± 0.00 |" in table
    assert "| french-ner (overall_f1) | 45.00 ± 7.07 | **60.00 ± 0.00** |" in table
    assert "| average | 65.00 | 65.00 |" not in table  # a tie: both bold
    assert "| average | **65.00** | **65.00** |" in table
    assert "| allocine | 6.0 s (1,000 tok/s) | 10.0 s (1,000 tok/s) |" in table


def test_average_counts_only_tasks_every_model_ran():
    rows = [make_row("FAT5", "allocine", 1, 0.8), make_row("FAT5", "french-ner", 1, 0.4),
            make_row("BERT", "allocine", 1, 0.6)]  # fmt: skip
    table = results_table(rows)
    assert "| french-ner (overall_f1) | **40.00** | - |" in table
    assert "| average (1 tasks all models ran) | **80.00** | 60.00 |" in table


def test_plot_writes_a_png(tmp_path):
    path = plot_results(ROWS, tmp_path / "results.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_output_dir_rule(tmp_path):
    out = tmp_path / "out"
    settings = {"training": {"learning_rate": 1e-3}, "lora": None}
    assert prepare_evaluation_dir(out, settings, False) == []
    assert json.loads((out / CONFIG_JSON).read_text()) == settings
    (out / "results.json").write_text(json.dumps({"rows": ROWS[:2]}))
    assert prepare_evaluation_dir(out, settings, False) == ROWS[:2]  # same configuration: resumed
    other = {"training": {"learning_rate": 5e-4}, "lora": None}
    with pytest.raises(EvaluationConfigError, match=r"another configuration \(different training\)"):
        prepare_evaluation_dir(out, other, False)
    assert json.loads((out / "results.json").read_text())["rows"] == ROWS[:2]  # nothing lost
    rows = [{**ROWS[0], "model_name_or_path": "a"}]
    (out / "results.json").write_text(json.dumps({"rows": rows}))
    assert prepare_evaluation_dir(out, settings, False, models={"FAT5": "a", "T5": "t"}) == rows
    with pytest.raises(EvaluationConfigError, match=r"models now named for other checkpoints: FAT5 \(a, now b\)"):
        prepare_evaluation_dir(out, settings, False, models={"FAT5": "b"})
    assert prepare_evaluation_dir(out, other, True) == []
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_JSON]
    (tmp_path / "file").write_text("x")
    with pytest.raises(EvaluationConfigError, match="is a file"):
        prepare_evaluation_dir(tmp_path / "file", settings, True)


def test_evaluation_card_renders_and_parses_back(tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from transformers import AutoTokenizer

    from fat5_hf import FAT5Config, FAT5ForConditionalGeneration
    from fat5_hf.model_card import TaskResult, write_evaluation_model_card

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[2] / "recipes" / "data" / "tokenizer")
    model = FAT5ForConditionalGeneration(FAT5Config(vocab_size=2048, d_model=16, d_kv=4, num_heads=4, d_ff=32,
                                                    num_layers=1, num_decoder_layers=1))  # fmt: skip
    results = [
        TaskResult("allocine", "text2text", "tblard/allocine", "accuracy", 0.85),
        TaskResult("french-ner", "token-classification", "CATIE-AQ/frenchNER_4entities", "overall_f1", 0.45),
    ]
    write_evaluation_model_card(
        tmp_path, model=model, tokenizer=tokenizer, model_id="me/fat5-eval", base_model="me/fat5-base",
        results=results, comparison=results_table(ROWS), training={"learning rate": 1e-3},
        datasets=["tblard/allocine", "CATIE-AQ/frenchNER_4entities"],
    )  # fmt: skip
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert (data.language, data.license, data.library_name, data.pipeline_tag) == (
        "fr", "apache-2.0", "transformers", "text2text-generation",
    )  # fmt: skip
    assert data.base_model == "me/fat5-base" and data.datasets == ["tblard/allocine", "CATIE-AQ/frenchNER_4entities"]
    assert data.metrics == ["accuracy", "overall_f1"] and "fat5" in data.tags
    name, parsed = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "me/fat5-eval"
    assert [(r.dataset_name, r.task_type, r.metric_value) for r in parsed] == [
        ("allocine", "text2text-generation", 0.85), ("french-ner", "token-classification", 0.45),
    ]  # fmt: skip
    for section in ("## Intended use and limits", "## Training data and procedure", "## Evaluation",
                    "## How to load", "## Citation", "| allocine (accuracy) | **85.00 ± 7.07** |"):  # fmt: skip
        assert section in card.text


def test_push_helper_refuses_incomplete_folders(tmp_path):
    from fat5_hf.hub_push import HubPushError, push_folder_to_hub

    with pytest.raises(HubPushError, match="needs --hub_model_id"):
        push_folder_to_hub(tmp_path, None, commit_message="x")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HubPushError, match=r"missing README.md"):
        push_folder_to_hub(tmp_path, "me/x", commit_message="x")
