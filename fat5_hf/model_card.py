"""Model cards (the ``README.md`` of a saved or pushed model) for the pretraining, finetuning and evaluation recipes.

One module renders every card from a template in ``model_cards/`` with huggingface_hub's ``ModelCard``: YAML metadata
(language, license, library_name, pipeline_tag, tags, datasets, base_model, metrics and a ``model-index`` with one
result per task) then the sections: description, intended use and limits, training data and procedure, evaluation
table, how to load, citation. The cards parse back with ``huggingface_hub.ModelCard.load``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# An installed wheel ships the templates as fat5_hf/model_cards/; a source checkout has them in model_cards/.
_INSTALLED_TEMPLATES = Path(__file__).resolve().parent / "model_cards"
MODEL_CARDS_DIR = _INSTALLED_TEMPLATES if _INSTALLED_TEMPLATES.is_dir() else Path(__file__).resolve().parents[1] / "model_cards"
PRETRAINED_TEMPLATE = MODEL_CARDS_DIR / "fat5_pretrained.md"
FINETUNED_TEMPLATE = MODEL_CARDS_DIR / "fat5_finetuned.md"
EVALUATED_TEMPLATE = MODEL_CARDS_DIR / "fat5_evaluated.md"

CITATION = """@software{fat5_hf,
  title = {fat5-hf: fast T5-family encoder-decoders for Hugging Face Transformers},
  url = {https://github.com/fat5-hf/fat5-hf},
  year = {2026}
}"""

# Task type -> (Hub pipeline tag, Auto class that loads the saved model).
_TASK_TYPE_LOADING = {
    "sequence-classification": ("text-classification", "AutoModelForSequenceClassification"),
    "token-classification": ("token-classification", "AutoModelForTokenClassification"),
    "question-answering": ("question-answering", "AutoModelForQuestionAnswering"),
    "text2text": ("text2text-generation", "AutoModelForSeq2SeqLM"),
}


@dataclass
class TaskResult:
    """One evaluation result of a model on a task: one row of the card's table and one ``model-index`` entry.

    ``task_type`` is a fat5-hf task type (``sequence-classification``, ``token-classification``,
    ``question-answering``, ``text2text``); ``metric_type`` the metric's name (``accuracy``, ``f1``, ``rougeL``...);
    ``dataset_split`` the split it was measured on.
    """

    task_name: str
    task_type: str
    dataset_name: str
    metric_type: str
    metric_value: float
    dataset_config: str | None = None
    dataset_split: str = "test"
    metric_name: str | None = None


def _template(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {path} is missing: fat5-hf ships it in model_cards/ (fat5_hf/model_cards/ once "
            "installed); reinstall fat5-hf"
        )
    return str(path)


def _architecture(model, tokenizer) -> dict[str, Any]:
    config = model.config
    return dict(
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M",
        num_layers=config.num_layers,
        num_decoder_layers=getattr(config, "num_decoder_layers", 0) if config.is_encoder_decoder else 0,
        d_model=config.d_model,
        d_ff=config.d_ff,
        num_heads=config.num_heads,
        d_kv=config.d_kv,
        feed_forward_proj=config.feed_forward_proj,
        position_encoding_type=getattr(config, "position_encoding_type", "t5"),
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        vocab_size=config.vocab_size,
        tokenizer_size=len(tokenizer),
    )


def _eval_results(results: list[TaskResult]) -> list:
    """The ``model-index`` entries of ``results``."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=_TASK_TYPE_LOADING[r.task_type][0],
            dataset_type=r.dataset_name,
            dataset_name=r.task_name,
            dataset_config=r.dataset_config,
            dataset_split=r.dataset_split,
            metric_type=r.metric_type,
            metric_name=r.metric_name or r.metric_type,
            metric_value=round(float(r.metric_value), 4),
        )
        for r in results
    ]


def _hub_base_model(base_model: str | None) -> str | None:
    """``base_model`` when it is a Hub id (a local path goes only into the card's text)."""
    return base_model if base_model and not Path(base_model).exists() and base_model.count("/") == 1 else None


def _results_card_data(
    model_id: str,
    license: str,
    pipeline_tag: str,
    extra_tags: list[str],
    datasets: list[str] | None,
    base_model: str | None,
    results: list[TaskResult],
):
    """The metadata of a card that reports task results: tags, datasets, Hub ``base_model`` and ``model-index``."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        language="fr",
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["fat5", "t5", pipeline_tag, "custom_code", *extra_tags],
        datasets=datasets or None,
        base_model=_hub_base_model(base_model),
        metrics=sorted({r.metric_type for r in results}) or None,
        model_name=model_id,
        eval_results=_eval_results(results) or None,
    )


def write_pretraining_model_card(
    model, tokenizer, config, output_dir: str | Path, steps: int, tokens_seen: int, eval_loss, num_processes: int
):
    """Writes ``output_dir/README.md`` for a model from ``recipes/pretrain.py`` (template ``fat5_pretrained.md``).

    Args:
        model: the trained model (its config gives the architecture table).
        tokenizer: its tokenizer.
        config: the recipe's ``PretrainConfig`` (``data``, ``training``, ``optim`` sections).
        output_dir: where the model was saved.
        steps, tokens_seen, eval_loss, num_processes: what the run did.

    Returns:
        The ``huggingface_hub.ModelCard`` written.
    """
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    data = config.data
    if data.dataset_name:
        data_text = f"`{data.dataset_name}`" + (f" ({data.dataset_config})" if data.dataset_config else "")
        datasets = [data.dataset_name]
    else:
        data_text = "local files: " + ", ".join(f"`{Path(f).name}`" for f in data.train_files)
        datasets = None
    denoisers = data.denoisers
    objective = (
        {
            "ul2": "UL2 mixture of denoisers (R: span corruption, X: extreme corruption, S: sequential prefix-LM)",
            "t5": "T5 span corruption",
        }.get(denoisers, f"custom denoisers {denoisers}")
        if isinstance(denoisers, str)
        else f"denoisers {denoisers}"
    )
    model_id = config.training.hub_model_id or output_dir.name
    card_data = ModelCardData(
        language="fr",
        license=config.training.hub_license,
        library_name="transformers",
        pipeline_tag="text2text-generation",
        tags=["fat5", "t5", "ul2", "text2text-generation", "custom_code"],
        datasets=datasets,
        model_name=model_id,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=_template(PRETRAINED_TEMPLATE),
        model_id=model_id,
        **_architecture(model, tokenizer),
        objective=objective,
        max_input_length=data.max_input_length,
        max_target_length=data.max_target_length or data.max_input_length,
        data=data_text,
        steps=steps,
        tokens_seen=f"{tokens_seen:,}",
        batch_size=config.training.per_device_batch_size,
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        num_processes=num_processes,
        mixed_precision=config.training.mixed_precision or "fp32",
        optimizer=config.optim.name,
        lr=config.optim.lr,
        scheduler=config.optim.scheduler,
        warmup_steps=config.optim.warmup_steps,
        eval_loss=f"{eval_loss:.4f}" if eval_loss is not None else "not evaluated",
        citation=CITATION,
    )
    card.save(output_dir / "README.md")
    return card


def write_finetuning_model_card(
    output_dir: str | Path,
    *,
    model,
    tokenizer,
    model_id: str,
    base_model: str | None,
    task_type: str,
    task_description: str,
    results: list[TaskResult],
    training: dict[str, Any],
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    lora: dict[str, Any] | None = None,
    tags: list[str] | None = None,
):
    """Writes ``output_dir/README.md`` for a finetuned (or evaluated) model (template ``fat5_finetuned.md``).

    Args:
        output_dir: the saved model's folder.
        model, tokenizer: the saved model and its tokenizer (architecture table).
        model_id: the model's name (Hub id when pushed).
        base_model: the checkpoint it was finetuned from: a Hub id goes into ``base_model`` metadata, a local path
            only into the text.
        task_type: fat5-hf task type of the saved model (selects the pipeline tag and the Auto class shown).
        task_description: one line on what the model does.
        results: one `TaskResult` per (task, metric) measured; the first result of each task is its headline.
        training: what the run did, shown as a table (``{"learning rate": 1e-4, "epochs": 3, ...}``).
        datasets: Hub ids of the training datasets (metadata).
        license: licence of the weights (metadata).
        lora: the LoRA settings when the model was trained with LoRA (shown in the procedure section).
        tags: extra tags.

    Returns:
        The ``huggingface_hub.ModelCard`` written.
    """
    from huggingface_hub import ModelCard

    if task_type not in _TASK_TYPE_LOADING:
        raise ValueError(f"task_type={task_type!r}; expected one of {', '.join(_TASK_TYPE_LOADING)}")
    pipeline_tag, auto_class = _TASK_TYPE_LOADING[task_type]
    output_dir = Path(output_dir)
    card_data = _results_card_data(
        model_id, license, pipeline_tag, [*(["lora", "peft"] if lora else []), *(tags or [])], datasets, base_model,
        results,
    )  # fmt: skip
    card = ModelCard.from_template(
        card_data,
        template_path=_template(FINETUNED_TEMPLATE),
        model_id=model_id,
        base_model=base_model or "a randomly initialized FAT5",
        task_description=task_description,
        auto_class=auto_class,
        results=[
            {
                "task": r.task_name,
                "dataset": r.dataset_name + (f" ({r.dataset_config})" if r.dataset_config else ""),
                "split": r.dataset_split,
                "metric": r.metric_name or r.metric_type,
                "value": f"{r.metric_value:.4f}",
            }
            for r in results
        ],
        training=training,
        lora=lora,
        **_architecture(model, tokenizer),
        citation=CITATION,
    )
    card.save(output_dir / "README.md")
    return card


def write_evaluation_model_card(
    output_dir: str | Path,
    *,
    model,
    tokenizer,
    model_id: str,
    base_model: str | None,
    results: list[TaskResult],
    comparison: str,
    training: dict[str, Any],
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
):
    """Writes ``output_dir/README.md`` for a model scored by ``recipes/evaluate_models.py`` (template ``fat5_evaluated.md``).

    Args:
        output_dir: the folder to push (the model before finetuning, saved with its custom code).
        model, tokenizer: that model and its tokenizer (architecture table).
        model_id: the model's name (Hub id when pushed).
        base_model: where the model came from (a Hub id also goes into the ``base_model`` metadata).
        results: one `TaskResult` per task: the mean score of the finetuned copies (``model-index``).
        comparison: the evaluation's Markdown tables (this model and the baselines side by side).
        training: the finetuning settings shared by the tasks, shown as a table.
        datasets: Hub ids of the tasks' datasets (metadata).
        license: licence of the weights (metadata).

    Returns:
        The ``huggingface_hub.ModelCard`` written.
    """
    from huggingface_hub import ModelCard

    card_data = _results_card_data(
        model_id, license, "text2text-generation", ["french-evaluation"], datasets, base_model, results
    )
    card = ModelCard.from_template(
        card_data,
        template_path=_template(EVALUATED_TEMPLATE),
        model_id=model_id,
        base_model=base_model,
        comparison=comparison,
        training=training,
        **_architecture(model, tokenizer),
        citation=CITATION,
    )
    card.save(Path(output_dir) / "README.md")
    return card
