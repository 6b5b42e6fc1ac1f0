"""--push_to_hub of the finetuning recipe, against a stand-in for the Hub API: one upload of the output folder with the
model, its custom code, the tokenizer, the FAT5 model card and the results (the Trainer's own push, which would
replace the card, is not used)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))

import finetune  # noqa: E402


@pytest.fixture
def hub_stand_in(monkeypatch):
    """Records ``create_repo`` and the files ``upload_folder`` would send (its ignore patterns applied)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    calls = {"uploads": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        calls["uploads"].append((repo_id, sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_finetune_push_uploads_model_code_tokenizer_card_and_results(hub_stand_in, tmp_path):
    from huggingface_hub import ModelCard

    output_dir = tmp_path / "out"
    args = [
        "--tokenizer_name", str(RECIPES / "data" / "tokenizer"),
        "--config_overrides", "d_model=32,d_kv=8,num_heads=4,d_ff=64,num_layers=1,num_decoder_layers=1",
        "--task", "allocine", "--dataset_path", str(RECIPES / "data" / "finetune" / "allocine"),
        "--output_dir", str(output_dir), "--do_train", "--do_predict",
        "--max_seq_length", "32", "--max_train_samples", "8", "--max_predict_samples", "4",
        "--per_device_train_batch_size", "4", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--push_to_hub", "--hub_model_id", "me/fat5-allocine", "--hub_private_repo", "true",
    ]  # fmt: skip
    assert finetune.main(args) == 0
    assert hub_stand_in["create_repo"] == ("me/fat5-allocine", {"private": True, "exist_ok": True,
                                                                "repo_type": "model"})  # fmt: skip
    ((repo_id, files),) = hub_stand_in["uploads"]  # one push, after the card was written
    assert repo_id == "me/fat5-allocine"
    for name in ("config.json", "model.safetensors", "modeling_fat5.py", "configuration_fat5.py", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "all_results.json", "test_predictions.jsonl"):  # fmt: skip
        assert name in files, files
    card = ModelCard.load(output_dir / "README.md")
    assert "fat5" in card.data.tags and card.data.model_name == "me/fat5-allocine"


def test_finetune_push_without_training_is_refused(hub_stand_in, tmp_path, capsys):
    args = ["--tokenizer_name", str(RECIPES / "data" / "tokenizer"), "--task", "allocine",
            "--output_dir", str(tmp_path / "out"), "--do_predict", "--push_to_hub", "--hub_model_id", "me/x",
            "--use_cpu", "--report_to", "none"]  # fmt: skip
    assert finetune.main(args) == 2
    assert "needs --do_train and --hub_model_id" in capsys.readouterr().err
    assert hub_stand_in["uploads"] == [] and not (tmp_path / "out").exists()
