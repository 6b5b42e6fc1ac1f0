"""Tests of the evaluation recipe (recipes/evaluate_models.py) on CPU: a tiny FAT5 against the same weights as a Hugging Face
T5, on two shipped fixtures (classification as text-to-text, NER with token-classification heads).

Covered: the suite end to end (JSON rows, Markdown table with the models as columns, the plot); equal weights give
equal scores; a resumed run skips finished rows and a new seed runs only the new rows; another configuration in the
output folder is refused (files untouched) unless --overwrite_output_dir; bad input (unknown task or suite, seeds
that are not integers, an encoder that cannot generate) gets a clear error or a skip; --push_to_hub uploads the model,
its custom code, the tokenizer, a card that parses back and the results (to a stand-in for the Hub API).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "recipes"
FIXTURES = RECIPES / "data" / "finetune"
sys.path.insert(0, str(RECIPES))

import evaluate_models as evaluate_recipe  # noqa: E402

TINY = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny FAT5 and the same weights converted to a Hugging Face T5."""
    from fat5_hf.convert import convert_fat5_to_t5

    root = tmp_path_factory.mktemp("models")
    fat5 = evaluate_recipe.save_tiny_fat5(root / "fat5-tiny", **TINY)
    return fat5, convert_fat5_to_t5(fat5, root / "t5-tiny")


def suite_args(models, output_dir: Path, *extra: str, seeds: str = "0", tasks: str | None = "allocine,french-ner"):
    fat5, t5 = models
    return [
        *(["--tasks", tasks] if tasks else []),
        "--model_name_or_path", f"FAT5={fat5}",
        "--baselines", f"T5={t5}",
        "--dataset_dir", str(FIXTURES),
        "--output_dir", str(output_dir),
        "--seeds", seeds,
        "--max_seq_length", "64",
        "--max_train_samples", "16", "--max_predict_samples", "8",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--max_steps", "2", "--learning_rate", "1e-3", "--warmup_steps", "0",
        "--generation_max_length", "6", "--generation_num_beams", "1",
        "--use_cpu", "--dataloader_pin_memory", "false",
        *extra,
    ]  # fmt: skip


def rows(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "results.json").read_text())["rows"]


@pytest.fixture(scope="module")
def suite_run(models, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("eval") / "out"
    assert evaluate_recipe.main(suite_args(models, output_dir)) == 0
    return output_dir


@pytest.mark.slow
def test_suite_writes_rows_table_and_plot(suite_run, capsys):
    results = rows(suite_run)
    assert {(r["model"], r["task"], r["seed"]) for r in results} == {
        (m, t, 0) for m in ("FAT5", "T5") for t in ("allocine", "french-ner")
    }
    by_key = {(r["model"], r["task"]): r for r in results}
    assert by_key["FAT5", "allocine"]["task_type"] == "text2text"
    assert by_key["FAT5", "french-ner"]["task_type"] == "token-classification"
    for row in results:
        assert 0.0 <= row["score"] <= 1.0
        assert row["metric"] == {"allocine": "accuracy", "french-ner": "overall_f1"}[row["task"]]
        assert row["train_runtime_s"] > 0 and row["train_input_tokens"] > 0 and row["train_tokens_per_second"] > 0
        assert row["device"].startswith("CPU") and row["transformers"] and row["date"]
    # the same weights, seed and data: FAT5 and transformers' T5 score the same
    for task in ("allocine", "french-ner"):
        assert by_key["FAT5", task]["score"] == pytest.approx(by_key["T5", task]["score"], abs=1e-6)
    table = (suite_run / "results.md").read_text()
    assert "| task (metric) | FAT5 | T5 |" in table
    assert "| allocine (accuracy) |" in table and "| average |" in table and "Finetuning time" in table
    assert (suite_run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_resume_skips_finished_rows_and_runs_new_seeds(suite_run, models, capsys):
    before = rows(suite_run)
    assert evaluate_recipe.main(suite_args(models, suite_run)) == 0
    assert "4 of 4 runs already in" in capsys.readouterr().out
    assert rows(suite_run) == before
    assert evaluate_recipe.main(suite_args(models, suite_run, "--tasks", "allocine", seeds="0,1")) == 0
    out = capsys.readouterr().out
    assert "1 of 2 runs" not in out and "2 of 4 runs already" in out
    after = rows(suite_run)
    assert after[:4] == before and {(r["model"], r["seed"]) for r in after[4:]} == {("FAT5", 1), ("T5", 1)}
    assert "±" in (suite_run / "results.md").read_text()  # two seeds on allocine: a standard deviation


@pytest.mark.slow
def test_push_uploads_model_code_tokenizer_card_and_results(suite_run, models, monkeypatch, tmp_path, capsys):
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.utils import filter_repo_objects
    from transformers import AutoTokenizer

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        calls["upload_folder"] = (repo_id, sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns)))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    argv = suite_args(models, suite_run, "--push_to_hub", "--hub_model_id", "me/fat5-tiny-eval", "--hub_private")
    assert evaluate_recipe.main(argv) == 0  # resumed: nothing to train, only the push
    assert calls["create_repo"] == ("me/fat5-tiny-eval", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, files = calls["upload_folder"]
    assert repo_id == "me/fat5-tiny-eval"
    for name in ("config.json", "model.safetensors", "modeling_fat5.py", "configuration_fat5.py", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "results.json", "results.md", "results.png"):  # fmt: skip
        assert name in files, files
    hub_dir = suite_run / "hub"
    card = ModelCard.load(hub_dir / "README.md")
    assert card.data.language == "fr" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text2text-generation"
    assert {r.dataset_name: r.metric_type for r in card.data.eval_results} == {
        "allocine": "accuracy", "french-ner": "overall_f1",
    }  # fmt: skip
    assert (
        "| task (metric) | FAT5 | T5 |" in card.text
        and 'AutoTokenizer.from_pretrained("me/fat5-tiny-eval", trust_remote_code=False)' in card.text
    )
    # the card's loading example: the tokenizer loads with plain AutoTokenizer, no custom code
    assert "auto_map" not in json.loads((hub_dir / "tokenizer_config.json").read_text())
    assert len(AutoTokenizer.from_pretrained(hub_dir)) == len(AutoTokenizer.from_pretrained(models[0]))


@pytest.mark.slow
def test_another_configuration_is_refused_then_overwritten(models, tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    args = suite_args(models, output_dir, "--tasks", "allocine", "--baselines", "")
    assert evaluate_recipe.main(args) == 2
    assert "not an evaluation's results" in capsys.readouterr().err
    assert (output_dir / "notes.txt").read_text() == "mine"
    assert evaluate_recipe.main([*args, "--overwrite_output_dir"]) == 0
    before = (output_dir / "results.json").read_text()
    assert evaluate_recipe.main([*args, "--learning_rate", "5e-4"]) == 2
    err = capsys.readouterr().err
    assert "another configuration (different training)" in err and "--overwrite_output_dir" in err
    assert (output_dir / "results.json").read_text() == before


def test_a_folder_held_by_another_run_is_refused_and_kept(models, tmp_path, capsys, hold_folder_in_another_process):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("the other run's")
    holder = hold_folder_in_another_process(output_dir)
    args = suite_args(models, output_dir, "--tasks", "allocine", "--baselines", "", "--overwrite_output_dir")
    assert evaluate_recipe.main(args) == 2
    assert f"in use by another run: pid {holder.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in output_dir.iterdir() if not p.name.startswith(".")) == ["notes.txt"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "allocine,sentiment"], "unknown task 'sentiment'; known tasks: allocine, xnli-fr"),
        (["--suite", "english"], "unknown suite 'english'; known suites: french ("),
        (["--seeds", "1,two"], "'two' is not an integer"),
        (["--suite", "french"], "either --tasks"),
        (["--baselines", "FAT5=somewhere"], "two models are named FAT5"),
        (["--dataset_dir", "/nonexistent"], "has no folder for allocine"),
    ],
)
def test_bad_input_is_refused_before_any_run(models, tmp_path, capsys, extra, message):
    output_dir = tmp_path / "out"
    tasks = None if extra[0] == "--suite" and extra[1] != "french" else "allocine,french-ner"
    args = suite_args(models, output_dir, *extra, tasks=tasks)
    assert evaluate_recipe.main(args) == 2
    assert message in capsys.readouterr().err
    assert not output_dir.exists()


def test_task_types_per_model_and_encoders_skip_generation():
    from transformers import BertConfig, T5Config

    from fat5_hf.finetuning import FinetuneConfigError, get_task
    from fat5_hf.finetuning.evaluation import run_task_type

    t5, bert = T5Config(), BertConfig()
    assert run_task_type(t5, get_task("allocine")) == "text2text"
    assert run_task_type(t5, get_task("allocine"), "native") == "sequence-classification"
    assert run_task_type(t5, get_task("french-qa")) == "text2text"
    assert run_task_type(t5, get_task("french-ner")) == "token-classification"
    assert run_task_type(bert, get_task("french-qa")) == "question-answering"
    # a checkpoint finetuned with a task head (evaluated with --do_train false) keeps its head
    assert run_task_type(T5Config(architectures=["T5ForSequenceClassification"]), get_task("allocine")) == (
        "sequence-classification"
    )
    with pytest.raises(FinetuneConfigError, match="encoder-only: it has no decoder"):
        run_task_type(bert, get_task("orange-sum"))


@pytest.mark.slow
def test_lora_trains_adapters_only(suite_run, models, tmp_path):
    output_dir = tmp_path / "lora"
    args = suite_args(models, output_dir, "--baselines", "", "--lora", "--lora_r", "2", tasks="allocine")
    assert evaluate_recipe.main(args) == 0
    (row,) = rows(output_dir)
    full = next(r for r in rows(suite_run) if (r["model"], r["task"]) == ("FAT5", "allocine"))
    assert 0 < row["trainable_parameters"] < full["trainable_parameters"] / 5
    assert json.loads((output_dir / "evaluation_config.json").read_text())["lora"]["lora_r"] == 2


def test_embedded_default_builds_its_models_and_parses(tmp_path, monkeypatch, capsys):
    """The no-argument run's setup (the run itself takes minutes: see the README): with no quickstart model, a tiny
    FAT5 is saved and converted to a Hugging Face T5 with the same weights, then the arguments parse."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    monkeypatch.chdir(tmp_path)
    args, lora_args, training_args = evaluate_recipe.parse_args([])
    assert "no pretrained model in outputs/fat5-tiny-pretrain" in capsys.readouterr().out
    assert args.task_names == ("allocine", "french-ner", "french-qa", "orange-sum")
    assert (training_args.do_train, training_args.do_predict, training_args.max_steps) == (True, True, 32)
    assert not lora_args.lora and training_args.report_to == []
    fat5_dir = tmp_path / "outputs/fat5-tiny-evaluate-models/fat5-tiny"
    t5_dir = fat5_dir.with_name("fat5-tiny-as-t5")
    fat5 = AutoModelForSeq2SeqLM.from_pretrained(fat5_dir).eval()
    t5 = T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(fat5(input_ids=ids, labels=ids).logits, t5(input_ids=ids, labels=ids).logits)


@pytest.mark.slow
def test_encoder_baseline_runs_its_head_and_skips_generation(models, tmp_path, capsys):
    """A BERT-like encoder (from a config, with the shipped tokenizer) runs classification with
    AutoModelForSequenceClassification and is skipped, with the reason, on summarization; the suite goes on."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    encoder = tmp_path / "bert-tiny"
    tokenizer = AutoTokenizer.from_pretrained(RECIPES / "data" / "tokenizer")
    BertModel(BertConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, pad_token_id=tokenizer.pad_token_id)).save_pretrained(encoder)  # fmt: skip
    tokenizer.save_pretrained(encoder)
    output_dir = tmp_path / "out"
    args = suite_args(models, output_dir, "--baselines", f"BERT={encoder}", "--max_train_samples", "8",
                      "--max_predict_samples", "4", "--max_steps", "1", tasks="allocine,orange-sum")  # fmt: skip
    assert evaluate_recipe.main(args) == 0
    out = capsys.readouterr().out
    assert "skipped BERT on orange-sum: orange-sum is a generation task" in out and "encoder-only" in out
    got = {(r["model"], r["task"]): r["task_type"] for r in rows(output_dir)}
    assert got == {("FAT5", "allocine"): "text2text", ("FAT5", "orange-sum"): "text2text",
                   ("BERT", "allocine"): "sequence-classification"}  # fmt: skip
    assert "| orange-sum (rougeL) |" in (output_dir / "results.md").read_text()
    assert "| average (1 tasks all models ran) |" in (output_dir / "results.md").read_text()


@pytest.mark.slow
def test_a_finetuned_model_is_evaluated_alone_with_the_same_score(models, tmp_path):
    """--save_models keeps each finetuned model; --do_train false then scores it alone, with its own head."""
    trained = tmp_path / "trained"
    args = suite_args(models, trained, "--baselines", "", "--save_models", tasks="french-ner")
    assert evaluate_recipe.main(args) == 0
    (row,) = rows(trained)
    finetuned = trained / "runs" / "FAT5" / "french-ner" / "seed-0"
    assert (finetuned / "model.safetensors").is_file() and (finetuned / "README.md").is_file()
    alone = tmp_path / "alone"
    args = suite_args((finetuned, models[1]), alone, "--baselines", "", "--do_train", "false", tasks="french-ner")
    assert evaluate_recipe.main(args) == 0
    (again,) = rows(alone)
    assert again["task_type"] == "token-classification" and again["train_runtime_s"] is None
    assert again["score"] == pytest.approx(row["score"])
