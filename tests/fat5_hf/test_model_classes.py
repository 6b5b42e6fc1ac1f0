"""Every FAT5 model class: the PreTrainedModel flags transformers reads, gradient checkpointing, T5's forward
signatures, and the attention implementations it accepts or refuses."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import PreTrainedModel

from fat5_hf import (
    FAT5EncoderModel,
    FAT5ForConditionalGeneration,
    FAT5ForQuestionAnswering,
    FAT5ForSequenceClassification,
    FAT5ForTokenClassification,
    FAT5Model,
)
from fat5_hf.modeling_fat5 import FAT5Block

# FAT5 class -> the transformers T5 class it stands in for.
T5_EQUIVALENTS = {
    FAT5Model: "T5Model",
    FAT5ForConditionalGeneration: "T5ForConditionalGeneration",
    FAT5EncoderModel: "T5EncoderModel",
    FAT5ForSequenceClassification: "T5ForSequenceClassification",
    FAT5ForTokenClassification: "T5ForTokenClassification",
    FAT5ForQuestionAnswering: "T5ForQuestionAnswering",
}
MODEL_CLASSES = list(T5_EQUIVALENTS)
IDS = [c.__name__ for c in MODEL_CLASSES]
# T5's sequence-classification and QA heads run the decoder; FAT5's are encoder-only (see their docstrings) and take
# these through **kwargs, with a warning (tests/fat5_hf/test_heads.py::test_heads_warn_that_decoder_inputs_are_ignored).
T5_DECODER_ARGUMENTS = {"decoder_input_ids", "decoder_attention_mask", "encoder_outputs", "decoder_inputs_embeds",
                        "use_cache"}


def _inputs(model_class, make_batch):
    input_ids, attention_mask = make_batch(96, [6, 4])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if model_class in (FAT5Model, FAT5ForConditionalGeneration):
        inputs["decoder_input_ids"] = make_batch(96, [3, 3], seed=4)[0]
    return inputs


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=IDS)
def test_flags_transformers_reads(model_class):
    assert issubclass(model_class, PreTrainedModel)
    assert model_class._no_split_modules == ["FAT5Block"]  # device_map / FSDP wrap at block granularity, as T5
    assert model_class.supports_gradient_checkpointing
    assert model_class._supports_sdpa and not model_class._supports_flash_attn and not model_class._supports_flex_attn
    assert model_class._keep_in_fp32_modules == ["wo"]  # T5's fp16-load guard (bf16 loads are not affected)


@pytest.mark.parametrize("attn_implementation", ["flash_attention_2", "flex_attention"])
def test_unsupported_attention_implementations_are_refused(tiny_fat5_config, attn_implementation):
    # The flags are honest: the relative bias is not wired into those backends, so asking for one is an error.
    with pytest.raises(ValueError, match="does not support"):
        FAT5ForConditionalGeneration._from_config(tiny_fat5_config(), attn_implementation=attn_implementation)


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=IDS)
def test_gradient_checkpointing_on_every_class(tiny_fat5_config, make_batch, model_class):
    torch.manual_seed(0)
    # float64: the recomputation's different summation order stays far below the tolerance
    model = model_class(tiny_fat5_config(num_labels=3, initializer_factor=0.5)).double().train()
    inputs = _inputs(model_class, make_batch)

    def grads():
        model.zero_grad()
        model(**inputs)[0].pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    model.gradient_checkpointing_enable()
    blocks = [m for m in model.modules() if isinstance(m, FAT5Block)]
    assert blocks and all(block.gradient_checkpointing for block in blocks)
    checkpointed = grads()
    assert checkpointed.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-10, rtol=1e-7, msg=name)


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=IDS)
def test_forward_signature_is_t5s(model_class):
    t5_parameters = list(inspect.signature(getattr(transformers, T5_EQUIVALENTS[model_class]).forward).parameters)
    fat5_parameters = list(inspect.signature(model_class.forward).parameters)
    if model_class in (FAT5ForSequenceClassification, FAT5ForQuestionAnswering):
        t5_parameters = [name for name in t5_parameters if name not in T5_DECODER_ARGUMENTS]
    assert fat5_parameters == t5_parameters  # same names in the same order, `cache` and **kwargs included


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=IDS)
def test_output_attentions_and_hidden_states_on_every_class(tiny_fat5_config, make_batch, model_class):
    model = model_class(tiny_fat5_config(num_labels=3, attn_implementation="eager")).eval()
    with torch.no_grad():
        out = model(**_inputs(model_class, make_batch), output_attentions=True, output_hidden_states=True)
    if model_class in (FAT5Model, FAT5ForConditionalGeneration):
        hidden_states = (out.encoder_hidden_states, out.decoder_hidden_states)
        attentions = (out.encoder_attentions, out.decoder_attentions, out.cross_attentions)
    else:
        hidden_states, attentions = (out.hidden_states,), (out.attentions,)
    for states in hidden_states:
        assert len(states) == 3 and states[0].shape[-1] == 32  # embeddings + 2 blocks
    for weights in attentions:
        assert len(weights) == 2 and weights[0].shape[1] == 4  # 2 blocks, 4 heads
        assert torch.isfinite(weights[0]).all()


@pytest.mark.parametrize("variant", ["t5", "mt5"])
def test_bare_model_matches_t5model(t5_pair, make_batch, variant):
    # FAT5Model has its own forward (not the one of FAT5ForConditionalGeneration): same outputs as transformers'
    # T5Model on T5's weights, with and without the KV cache.
    t5_lm, fat5_lm = t5_pair(variant, "eager")
    t5 = transformers.T5Model(t5_lm.config).eval()
    fat5 = FAT5Model(fat5_lm.config).eval()
    t5.load_state_dict(t5_lm.state_dict(), strict=False)
    incompatible = fat5.load_state_dict(t5.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    input_ids, attention_mask = make_batch(96, [7, 4])
    decoder_input_ids, decoder_attention_mask = make_batch(96, [4, 4], seed=6)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                  decoder_attention_mask=decoder_attention_mask)
    with torch.no_grad():
        expected, actual = t5(**kwargs), fat5(**kwargs)
        torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state, atol=1e-5,
                                   rtol=0)
        first = fat5(**{**kwargs, "decoder_input_ids": decoder_input_ids[:, :3], "decoder_attention_mask": None},
                     use_cache=True)
        step = fat5(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids[:, 3:],
                    cache=first.cache, use_cache=True)
    torch.testing.assert_close(step.last_hidden_state[:, 0], expected.last_hidden_state[:, 3], atol=1e-5, rtol=0)
