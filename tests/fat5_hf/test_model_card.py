"""Model cards (fat5_hf/model_card.py): pretraining and finetuning cards parse back with huggingface_hub's ModelCard,
and their metadata (model-index included) validates."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration, FAT5ForSequenceClassification
from fat5_hf.model_card import TaskResult, write_finetuning_model_card, write_pretraining_model_card

TINY = dict(vocab_size=64, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1, num_decoder_layers=1)


class _Tokenizer:
    def __len__(self):
        return 60


def _metadata(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_finetuning_card_metadata_model_index_and_sections(tmp_path):
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import model_index_to_eval_results

    model = FAT5ForSequenceClassification(FAT5Config(num_labels=2, **TINY))
    results = [
        TaskResult(
            "allocine", "sequence-classification", "tblard/allocine", "accuracy", 0.91234, dataset_split="test"
        ),
        TaskResult("xnli-fr", "sequence-classification", "facebook/xnli", "accuracy", 0.75, dataset_config="fr"),
    ]
    write_finetuning_model_card(
        tmp_path, model=model, tokenizer=_Tokenizer(), model_id="org/fat5-allocine", base_model="org/fat5-base",
        task_type="sequence-classification", task_description="sentiment of French film reviews",
        results=results, training={"learning rate": 1e-4, "epochs": 3}, datasets=["tblard/allocine"],
        lora={"r": 8, "alpha": 16, "merged": True},
    )  # fmt: skip
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert (data.language, data.license, data.library_name) == ("fr", "apache-2.0", "transformers")
    assert data.pipeline_tag == "text-classification" and data.base_model == "org/fat5-base"
    assert data.datasets == ["tblard/allocine"] and data.metrics == ["accuracy"]
    assert {"fat5", "custom_code", "lora", "peft"} <= set(data.tags)
    # model-index: one result per task, parsed back into EvalResults
    name, parsed = model_index_to_eval_results(_metadata(tmp_path / "README.md")["model-index"])
    assert name == "org/fat5-allocine"
    assert [(r.dataset_name, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_value) for r in parsed] == [
        ("allocine", "tblard/allocine", None, "test", 0.9123),
        ("xnli-fr", "facebook/xnli", "fr", "test", 0.75),
    ]
    assert all(r.task_type == "text-classification" for r in parsed)
    ModelCardData(**data.to_dict())  # the metadata round-trips through huggingface_hub's own checks
    for section in ("## Intended use and limits", "## Training data and procedure", "## Evaluation",
                    "## How to load", "## Citation"):  # fmt: skip
        assert section in card.text
    assert "| allocine | tblard/allocine | test | accuracy | 0.9123 |" in card.text
    assert (
        'AutoModelForSequenceClassification.from_pretrained("org/fat5-allocine", trust_remote_code=True)' in card.text
    )
    assert "merged into the weights" in card.text and "| learning rate | 0.0001 |" in card.text


def test_local_base_model_is_not_hub_metadata(tmp_path):
    from huggingface_hub import ModelCard

    model = FAT5ForConditionalGeneration(FAT5Config(**TINY))
    write_finetuning_model_card(
        tmp_path, model=model, tokenizer=_Tokenizer(), model_id="summarizer", base_model=str(tmp_path),
        task_type="text2text", task_description="summaries", results=[], training={},
    )  # fmt: skip
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and card.data.pipeline_tag == "text2text-generation"
    assert "model-index" not in _metadata(tmp_path / "README.md")
    with pytest.raises(ValueError, match="task_type='ner'"):
        write_finetuning_model_card(tmp_path, model=model, tokenizer=_Tokenizer(), model_id="x", base_model=None,
                                    task_type="ner", task_description="", results=[], training={})  # fmt: skip


def test_pretraining_card(tmp_path):
    from huggingface_hub import ModelCard

    model = FAT5ForConditionalGeneration(FAT5Config(**TINY))
    config = SimpleNamespace(
        data=SimpleNamespace(dataset_name="allenai/c4", dataset_config="fr", train_files=[], denoisers="ul2",
                             max_input_length=512, max_target_length=None),
        training=SimpleNamespace(hub_model_id=None, hub_license="apache-2.0", per_device_batch_size=8,
                                 gradient_accumulation_steps=2, mixed_precision="bf16"),
        optim=SimpleNamespace(name="adamw_scale", lr=5e-3, scheduler="cosine", warmup_steps=100),
    )  # fmt: skip
    write_pretraining_model_card(model, _Tokenizer(), config, tmp_path, steps=40, tokens_seen=12345, eval_loss=2.5,
                                 num_processes=1)  # fmt: skip
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.datasets == ["allenai/c4"] and card.data.pipeline_tag == "text2text-generation"
    assert "40 optimizer steps, 12,345 tokens seen" in card.text and "UL2 mixture of denoisers" in card.text
    assert "## Citation" in card.text
