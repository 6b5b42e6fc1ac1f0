"""FAT5 under transformers' Seq2SeqTrainer with no FAT5-specific code: training, gradient accumulation, generation."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import AutoModelForSeq2SeqLM, Seq2SeqTrainer, Seq2SeqTrainingArguments, default_data_collator

import fat5_hf  # noqa: F401  (registers the Auto classes)
from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

CONFIG = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=8,
              relative_attention_max_distance=16, z_loss=1e-3)


def toy_dataset(n: int = 8) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, CONFIG["vocab_size"], (n, 12), generator=gen)
    labels = torch.randint(2, CONFIG["vocab_size"], (n, 7), generator=gen)
    # uneven label counts per example: a mean per micro-batch would weight them wrongly under accumulation
    for row in range(n):
        labels[row, 2 + row % 5 :] = -100
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": [[1] * 12] * n,
                              "labels": labels.tolist()})


def test_num_items_in_batch_gives_sum_over_total():
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(FAT5Config(**{**CONFIG, "z_loss": 0.0})).eval()
    batch = toy_dataset(4)[:]
    input_ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels, num_items_in_batch=100)
        token_sum = torch.nn.functional.cross_entropy(
            out.logits.view(-1, out.logits.size(-1)), labels.view(-1), ignore_index=-100, reduction="sum"
        )
    torch.testing.assert_close(out.loss, token_sum / 100)


def train_once(tmp_path, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    FAT5ForConditionalGeneration(FAT5Config(**CONFIG)).save_pretrained(tmp_path / "init")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "init")
    # SGD with lr 1: the update is the gradient itself (Adam's first step, ~lr*sign(g), would hide scale errors).
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / f"out_{batch_size}_{accumulation}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, lr_scheduler_type="constant", optim="sgd",
        use_cpu=True, report_to="none", save_strategy="no", seed=0, dataloader_drop_last=True,
        per_device_eval_batch_size=4, predict_with_generate=True, generation_max_length=6,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=toy_dataset(4),
                             eval_dataset=toy_dataset(4), data_collator=default_data_collator)
    trainer.train()
    predictions = trainer.predict(toy_dataset(4))
    assert predictions.predictions.shape[0] == 4 and "test_loss" in predictions.metrics
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_seq2seq_trainer_accumulation_matches_one_large_batch(tmp_path):
    large = train_once(tmp_path, batch_size=4, accumulation=1)
    accumulated = train_once(tmp_path, batch_size=2, accumulation=2)
    for name, param in large.items():
        torch.testing.assert_close(accumulated[name], param, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_finetunes_a_classification_head_loaded_through_auto(tmp_path):
    # CamemBERT-style use: a FAT5 seq2seq checkpoint -> AutoModelForSequenceClassification -> plain Trainer.
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    FAT5ForConditionalGeneration(FAT5Config(**CONFIG)).save_pretrained(tmp_path / "init")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "init", num_labels=2)
    assert type(model).__name__ == "FAT5ForSequenceClassification"
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, CONFIG["vocab_size"], (16, 10), generator=gen)
    labels = (input_ids[:, 0] > CONFIG["vocab_size"] // 2).long()  # learnable from the first token
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": [[1] * 10] * 16,
                              "labels": labels.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=8, learning_rate=3e-3,
        use_cpu=True, report_to="none", save_strategy="no", seed=0, logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=default_data_collator)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.8 * before, (before, after)
