"""LoRA on FAT5 with peft: every attention and MLP projection by default, the task head trained in full.

Two traps of a plain ``LoraConfig(task_type="SEQ_CLS", target_modules=["q", "v"])`` on a FAT5 head model, avoided here:

- peft's task types save only the heads they know by name (``classifier``, ``score``); FAT5's
  ``classification_head`` and ``qa_outputs`` would stay frozen at their random initialization. `apply_lora` puts the
  head of the model's class in ``modules_to_save`` (trained in full and saved with the adapters).
- with gradient checkpointing and frozen embeddings, the checkpointed blocks' inputs do not require grad and reentrant
  checkpointing fails with "element 0 of tensors does not require grad"; `apply_lora` makes the embeddings' output
  require grad (``enable_input_require_grads``, as peft's ``prepare_model_for_kbit_training`` does).

A LoRA-wrapped projection is no longer a plain ``nn.Linear``, so the model's fused q/k/v and wi_0/wi_1 matmuls
(``_fusable_projections`` in ``modeling_fat5.py``) fall back to one matmul per projection plus the LoRA branch; the
Triton attention, RMSNorm, gated activation and loss kernels stay in use.
"""

from __future__ import annotations

import torch
from torch import nn

from .arguments import FinetuneConfigError, LoraArguments, split_names

ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
GATED_MLP_PROJECTIONS = ("wi_0", "wi_1", "wo")
MLP_PROJECTIONS = ("wi", "wo")

# Task type -> (peft task type, names of the head modules that the task adds to the model).
TASK_HEADS = {
    "sequence-classification": ("SEQ_CLS", ("classification_head",)),
    "token-classification": ("TOKEN_CLS", ("classifier",)),
    "question-answering": ("QUESTION_ANS", ("qa_outputs",)),
    "text2text": ("SEQ_2_SEQ_LM", ()),
}


def projection_names(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Distinct leaf names of the ``nn.Linear`` modules of ``model`` (``q``, ``wi_0``...), outside ``exclude``d
    modules (the task heads)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(part in exclude for part in name.split(".")):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def default_target_modules(model: nn.Module) -> list[str]:
    """Every attention and MLP projection of a FAT5 model: q, k, v, o and wi_0, wi_1, wo (gated) or wi, wo."""
    mlp = GATED_MLP_PROJECTIONS if getattr(model.config, "is_gated_act", True) else MLP_PROJECTIONS
    return [*ATTENTION_PROJECTIONS, *mlp]


def apply_lora(model: nn.Module, task_type: str, lora_args: LoraArguments, gradient_checkpointing: bool = False):
    """Wraps ``model`` in a peft ``PeftModel`` with LoRA adapters.

    Args:
        model: a FAT5 model of ``task_type``'s class.
        task_type: fat5-hf task type (selects peft's task type and the head saved in full).
        lora_args: rank, alpha, dropout and target modules (default: `default_target_modules`).
        gradient_checkpointing: whether the Trainer will checkpoint activations (the inputs then require grad).

    Returns:
        The ``PeftModel``; only the adapters and the task head are trainable.

    Raises:
        FinetuneConfigError: a target matches no module of the model (the message lists its projections).
    """
    from peft import LoraConfig, get_peft_model

    peft_task_type, heads = TASK_HEADS[task_type]
    heads = tuple(h for h in heads if hasattr(model, h))
    available = projection_names(model, exclude=heads)
    targets = list(split_names(lora_args.lora_target_modules) or default_target_modules(model))
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise FinetuneConfigError(
            f"--lora_target_modules: {', '.join(unknown)} match(es) no module of {type(model).__name__}; its "
            f"projections are {', '.join(available)}"
        )
    config = LoraConfig(
        task_type=peft_task_type,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        modules_to_save=list(heads) or None,
    )
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@torch.no_grad()
def merge_lora(peft_model) -> nn.Module:
    """The base model with the adapters merged into its weights (and the trained heads in place): loads and runs
    without peft. Tied input / output embeddings are not LoRA targets and stay tied."""
    merged = peft_model.merge_and_unload()
    if getattr(merged.config, "tie_word_embeddings", False) and hasattr(merged, "lm_head"):
        merged.tie_weights()
    return merged
