"""Tests of the finetuning recipe (recipes/finetune.py) on CPU with a tiny FAT5 and the shipped French fixtures.

Covered: each task type (sequence classification, pairs as text-to-text, NER, extractive QA with a stride, generative
QA, summarization) trains a few steps with a falling loss, evaluates and predicts, writing the example scripts' files;
LoRA trains far fewer parameters, trains the head, still learns, works with gradient checkpointing; merged and
unmerged predictions are equal, adapters reload on their own, tied embeddings stay tied; a saved model reloads with
equal predictions; every bad input gets a clear error (exit status 2) before any training, with the output folder
untouched; the embedded default run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "recipes"
FIXTURES = RECIPES / "data" / "finetune"
sys.path.insert(0, str(RECIPES))

import finetune  # noqa: E402

# A few-second model: one encoder and one decoder layer of width 32.
TINY_BASE = dict(
    d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1, num_decoder_layers=1, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny seq2seq FAT5 saved with the shipped tokenizer: the 'pretrained' checkpoint every test finetunes."""
    from transformers import AutoTokenizer

    from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

    path = tmp_path_factory.mktemp("base") / "fat5-tiny"
    tokenizer = AutoTokenizer.from_pretrained(RECIPES / "data" / "tokenizer")
    torch.manual_seed(0)
    config = FAT5Config(vocab_size=2048, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.pad_token_id, **TINY_BASE)  # fmt: skip
    FAT5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def finetune_args(base: Path, output_dir: Path, task: str, *extra: str, steps: int = 16) -> list[str]:
    return [
        "--model_name_or_path", str(base),
        "--task", task,
        "--dataset_path", str(FIXTURES / task),
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval", "--do_predict",
        "--max_seq_length", "64",
        "--max_train_samples", "32", "--max_eval_samples", "8", "--max_predict_samples", "8",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3", "--max_steps", str(steps), "--warmup_steps", "0",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--seed", "0", "--dataloader_pin_memory", "false",
        *extra,
    ]  # fmt: skip


def losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [record["loss"] for record in state["log_history"] if "loss" in record]


def assert_loss_falls(output_dir: Path) -> None:
    values = losses(output_dir)
    assert len(values) >= 8, values
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < 0.9 * first, f"loss did not fall: {values}"


def results(output_dir: Path, phase: str) -> dict:
    return json.loads((output_dir / f"{phase}_results.json").read_text())


def predictions(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / finetune_module_predictions()).read_text().splitlines()]


def finetune_module_predictions() -> str:
    from fat5_hf.finetuning.trainer import PREDICTIONS_FILE

    return PREDICTIONS_FILE


def load_card(output_dir: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(output_dir / "README.md")


# ------------------------------------------------------------------------------------------- task types


@pytest.mark.slow
def test_sequence_classification_trains_evaluates_and_reloads(base_model, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "allocine"
    assert finetune.main(finetune_args(base_model, out, "allocine")) == 0
    assert_loss_falls(out)
    for phase, key in (("eval", "eval_accuracy"), ("test", "test_accuracy")):
        assert 0.0 <= results(out, phase)[key] <= 1.0
    all_results = json.loads((out / "all_results.json").read_text())
    assert {"train_loss", "eval_accuracy", "test_accuracy", "test_macro_f1"} <= set(all_results)
    records = predictions(out)
    assert len(records) == 8 and {r["prediction"] for r in records} <= {"neg", "pos"}
    card = load_card(out)
    assert card.data.pipeline_tag == "text-classification" and card.data.language == "fr"
    assert [r.metric_type for r in card.data.eval_results] == ["accuracy", "accuracy"]
    assert (out / "modeling_fat5.py").is_file()  # custom code, for users without fat5-hf

    # The saved model and tokenizer give the predictions the run wrote.
    import fat5_hf  # noqa: F401  (Auto classes)

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    test = [json.loads(line) for line in (FIXTURES / "allocine" / "test.jsonl").read_text().splitlines()[:8]]
    batch = tokenizer([r["review"] for r in test], truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in predicted] == [r["prediction"] for r in records]


@pytest.mark.slow
def test_pair_classification_as_text2text(base_model, tmp_path):
    out = tmp_path / "xnli"
    args = finetune_args(base_model, out, "xnli-fr", "--task_type", "text2text", "--generation_max_length", "6")
    assert finetune.main(args) == 0
    assert_loss_falls(out)
    assert {"eval_accuracy", "eval_macro_f1"} <= set(results(out, "eval"))
    records = predictions(out)
    assert {r["reference"] for r in records} <= {"entailment", "neutral", "contradiction"}
    assert load_card(out).data.pipeline_tag == "text2text-generation"


@pytest.mark.slow
def test_token_classification(base_model, tmp_path):
    out = tmp_path / "ner"
    assert finetune.main(finetune_args(base_model, out, "french-ner", "--learning_rate", "5e-3")) == 0
    assert_loss_falls(out)
    eval_results = results(out, "eval")
    assert {"eval_overall_f1", "eval_overall_precision", "eval_overall_recall", "eval_PER_f1"} <= set(eval_results)
    record = predictions(out)[0]
    assert len(record["prediction"]) == len(record["reference"])  # one tag per word (first pieces)
    assert set(record["reference"]) <= {"O", "PER", "ORG", "LOC", "MISC"}


@pytest.mark.slow
def test_extractive_qa_with_stride_and_unanswerable(base_model, tmp_path):
    out = tmp_path / "qa"
    # 56-token windows (question included) with an 8-token stride: every context spans several windows.
    args = finetune_args(base_model, out, "french-qa", "--max_seq_length", "56", "--doc_stride", "8")
    assert finetune.main(args) == 0
    assert_loss_falls(out)
    test_results = results(out, "test")
    assert {"test_exact_match", "test_f1", "test_HasAns_f1", "test_NoAns_f1"} <= set(test_results)
    records = predictions(out)
    contexts = [
        json.loads(line)["context"] for line in (FIXTURES / "french-qa" / "test.jsonl").read_text().splitlines()
    ]
    assert all(r["prediction"] in contexts[int(r["id"])] for r in records)  # spans of the context, or ""


@pytest.mark.slow
def test_generative_qa(base_model, tmp_path):
    out = tmp_path / "gqa"
    args = finetune_args(
        base_model, out, "french-qa", "--task_type", "text2text", "--max_target_length", "16",
        "--generation_max_length", "16",
    )  # fmt: skip
    assert finetune.main(args) == 0
    assert_loss_falls(out)
    assert {"eval_exact_match", "eval_f1"} <= set(results(out, "eval"))


@pytest.mark.slow
def test_summarization_with_beams(base_model, tmp_path):
    out = tmp_path / "sum"
    args = finetune_args(
        base_model, out, "orange-sum", "--max_target_length", "24", "--generation_max_length", "24",
        "--generation_num_beams", "2",
    )  # fmt: skip
    assert finetune.main(args) == 0
    assert_loss_falls(out)
    assert {"test_rouge1", "test_rouge2", "test_rougeL", "test_rougeLsum"} <= set(results(out, "test"))
    assert all(isinstance(r["prediction"], str) for r in predictions(out))


# ------------------------------------------------------------------------------------------- LoRA


@pytest.mark.slow
def test_lora_trains_the_head_and_merges_to_equal_predictions(base_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fat5_hf  # noqa: F401

    full_out, lora_out = tmp_path / "full", tmp_path / "lora"
    assert finetune.main(finetune_args(base_model, full_out, "allocine", "--do_predict", "false")) == 0
    args = finetune_args(base_model, lora_out, "allocine", "--lora", "--lora_r", "4", "--merge_lora",
                         "--learning_rate", "1e-2")  # fmt: skip
    assert finetune.main(args) == 0
    assert_loss_falls(lora_out)
    lora_train = results(lora_out, "train")
    full_state = json.loads((full_out / "trainer_state.json").read_text())
    assert full_state["log_history"]  # both trained

    # Far fewer trainable parameters, the head among them (saved with the adapters).
    from safetensors.torch import load_file

    adapter = load_file(lora_out / "lora_adapter" / "adapter_model.safetensors")
    assert any("classification_head" in k for k in adapter) and any("lora_A" in k for k in adapter)
    trainable = sum(t.numel() for t in adapter.values())
    merged = AutoModelForSequenceClassification.from_pretrained(lora_out).eval()  # no peft needed
    assert trainable < 0.35 * sum(p.numel() for p in merged.parameters())
    base = AutoModelForSequenceClassification.from_pretrained(base_model)
    assert not torch.equal(merged.classification_head.out_proj.weight, base.classification_head.out_proj.weight)
    assert lora_train["train_loss"] > 0

    # Merged model == adapters loaded on their own over the base, and == the run's test predictions.
    tokenizer = AutoTokenizer.from_pretrained(lora_out)
    test = [json.loads(line) for line in (FIXTURES / "allocine" / "test.jsonl").read_text().splitlines()[:8]]
    batch = tokenizer([r["review"] for r in test], truncation=True, max_length=64, padding=True, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    )
    unmerged = PeftModel.from_pretrained(base, lora_out / "lora_adapter").eval()
    with torch.no_grad():
        merged_logits, unmerged_logits = merged(**batch).logits, unmerged(**batch).logits
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-4, atol=1e-5)
    assert [merged.config.id2label[i] for i in merged_logits.argmax(-1).tolist()] == [
        r["prediction"] for r in predictions(lora_out)
    ]


@pytest.mark.slow
def test_lora_text2text_with_gradient_checkpointing_keeps_embeddings_tied(base_model, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    import fat5_hf  # noqa: F401

    out = tmp_path / "lora-sum"
    args = finetune_args(
        base_model, out, "orange-sum", "--lora", "--merge_lora", "--learning_rate", "1e-2",
        # reentrant checkpointing is where frozen embeddings break the backward pass
        "--gradient_checkpointing", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}',
        "--max_target_length", "24", "--do_eval", "false", "--do_predict", "false",
    )  # fmt: skip
    assert finetune.main(args) == 0  # no "element 0 of tensors does not require grad"
    assert_loss_falls(out)
    merged = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert merged.lm_head.weight.data_ptr() == merged.shared.weight.data_ptr()


def test_lora_defaults_target_every_projection_and_the_head():
    from fat5_hf import FAT5Config, FAT5ForQuestionAnswering
    from fat5_hf.finetuning import LoraArguments
    from fat5_hf.finetuning.lora import apply_lora

    model = FAT5ForQuestionAnswering(FAT5Config(vocab_size=64, **TINY_BASE))
    peft_model = apply_lora(model, "question-answering", LoraArguments(lora=True, lora_r=2))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("qa_outputs" in name for name in trainable)
    assert all("lora_" in name or "qa_outputs" in name for name in trainable)


# ------------------------------------------------------------------------------------------- bad input


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_and_fail(capsys, argv: list[str], *messages: str) -> None:
    assert finetune.main(argv) == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, err


def test_unknown_task_lists_known_ones(capsys, tmp_path):
    run_and_fail(capsys, ["--task", "alocine", "--do_train", "--output_dir", str(tmp_path / "o")],
                 "unknown task 'alocine'", "allocine", "french-ner", "orange-sum")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_missing_columns_are_named(capsys, base_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"texte": "Très bien.", "label": 1}])
    argv = ["--model_name_or_path", str(base_model), "--task_type", "sequence-classification", "--train_file",
            str(data), "--text_column_names", "sentence", "--label_column_name", "label", "--do_train",
            "--output_dir", str(tmp_path / "o")]  # fmt: skip
    run_and_fail(capsys, argv, "lacks the column(s) sentence", "its columns: texte, label")
    assert not (tmp_path / "o").exists()


def test_labels_outside_the_label_set_are_named(capsys, base_model, tmp_path):
    rows = [{"review": "Bien.", "label": 1}, {"review": "Nul.", "label": 0}, {"review": "Bof.", "label": 3}]
    folder = tmp_path / "allocine"
    folder.mkdir()
    for split in ("train", "validation"):
        write_jsonl(folder / f"{split}.jsonl", rows)
    argv = ["--model_name_or_path", str(base_model), "--task", "allocine", "--dataset_path", str(folder),
            "--do_train", "--do_eval", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    run_and_fail(capsys, argv, "labels outside the label set", "3 (1x)", "neg, pos")


def test_unknown_lora_target_lists_the_projections(capsys, base_model, tmp_path):
    argv = finetune_args(base_model, tmp_path / "o", "allocine", "--lora", "--lora_target_modules", "query,v")
    run_and_fail(capsys, argv, "query match(es) no module", "q, v, wi_0, wi_1, wo")
    assert not (tmp_path / "o").exists()


def test_text2text_from_an_encoder_only_checkpoint_is_refused(capsys, base_model, tmp_path):
    from fat5_hf import FAT5ForSequenceClassification

    encoder_only = tmp_path / "encoder-only"
    FAT5ForSequenceClassification.from_pretrained(base_model, num_labels=2).save_pretrained(encoder_only)
    argv = finetune_args(encoder_only, tmp_path / "o", "allocine", "--task_type", "text2text",
                         "--tokenizer_name", str(base_model))  # fmt: skip
    run_and_fail(capsys, argv, "needs an encoder-decoder checkpoint", "encoder-only")
    run_and_fail(capsys, finetune_args(base_model, tmp_path / "o", "french-ner", "--task_type", "text2text"),
                 "no text-to-text form")  # fmt: skip


def test_non_empty_output_dir_is_refused_and_kept(capsys, base_model, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    run_and_fail(capsys, finetune_args(base_model, out, "allocine"), f"--output_dir {out} is not empty",
                 "--overwrite_output_dir")  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier results"


def test_output_dir_held_by_another_run_is_refused_even_with_overwrite(
    capsys, base_model, tmp_path, hold_folder_in_another_process
):
    """A live process holding the folder (another recipe's run) wins: the finetuning run refuses and deletes nothing."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("the other run's file")
    holder = hold_folder_in_another_process(out)
    run_and_fail(capsys, finetune_args(base_model, out, "allocine", "--overwrite_output_dir"),
                 f"in use by another run: pid {holder.pid}")  # fmt: skip
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "the other run's file"


def test_output_dir_holding_an_input_is_refused(capsys, base_model, tmp_path):
    before = sorted(p.name for p in base_model.iterdir())
    argv = finetune_args(base_model, base_model, "allocine", "--overwrite_output_dir")
    run_and_fail(capsys, argv, "holds an input of this run")
    assert sorted(p.name for p in base_model.iterdir()) == before


def test_bad_arguments_exit_2(capsys, tmp_path):
    run_and_fail(capsys, ["--do_train", "--output_dir", str(tmp_path)], "pass --task NAME")
    run_and_fail(capsys, ["--task", "allocine", "--task_type", "summarization"], "expected one of")
    run_and_fail(capsys, ["--task", "allocine", "--merge_lora"], "--merge_lora needs --lora")


# ------------------------------------------------------------------------------------------- command line


def test_yaml_config_and_list_tasks(capsys, tmp_path):
    import yaml

    from fat5_hf.finetuning import TASKS

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"task": "french-qa", "output_dir": str(tmp_path / "o"), "do_train": True,
                                      "lora": True, "lora_r": 4}))  # fmt: skip
    model_args, data_args, lora_args, training_args = finetune.parse_args([str(config)])
    assert data_args.task == "french-qa" and lora_args.lora_r == 4 and training_args.do_train
    shipped_configs = sorted((RECIPES / "configs").glob("finetune-*.yaml"))
    assert shipped_configs
    for shipped in shipped_configs:
        values = yaml.safe_load(shipped.read_text())
        values.pop("bf16")  # TrainingArguments refuses bf16 on a machine without a GPU
        copy = tmp_path / shipped.name
        copy.write_text(yaml.safe_dump(values))
        model_args, data_args, lora_args, training_args = finetune.parse_args([str(copy)])
        assert data_args.task in TASKS and training_args.do_train, shipped
    assert finetune.main(["--list_tasks"]) == 0
    table = capsys.readouterr().out
    assert all(f"`{name}`" in table for name in ("allocine", "xnli-fr", "pawsx-fr", "french-ner", "french-qa"))


@pytest.mark.slow
def test_embedded_default_runs(monkeypatch, tmp_path, capsys):
    """`python recipes/finetune.py` with no argument, shortened to a few steps (later flags win in argparse)."""
    monkeypatch.chdir(tmp_path)  # outputs/ is relative: no pretraining quickstart model here
    defaults = finetune.embedded_default_args
    monkeypatch.setattr(
        finetune, "embedded_default_args",
        lambda: [*defaults(), "--max_steps", "3", "--max_eval_samples", "8", "--max_predict_samples", "8", "--use_cpu",
                 "--dataloader_pin_memory", "false"],
    )  # fmt: skip
    assert finetune.main([]) == 0
    out = capsys.readouterr().out
    assert "randomly initialized tiny FAT5" in out and "allocine test: test_accuracy=" in out
    assert (tmp_path / "outputs" / "fat5-tiny-finetune-allocine" / "test_results.json").is_file()
