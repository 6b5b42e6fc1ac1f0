"""Encoder-only heads: sequence / token classification and extractive QA."""

from __future__ import annotations

import logging

import pytest
import torch

from fat5_hf import (
    FAT5ForConditionalGeneration,
    FAT5ForQuestionAnswering,
    FAT5ForSequenceClassification,
    FAT5ForTokenClassification,
)


def _grads_finite(model):
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    return all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "num_labels, problem_type, labels",
    [
        (3, None, torch.tensor([0, 2])),  # inferred single-label
        (1, None, torch.tensor([0.5, -1.0])),  # inferred regression
        (3, "multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ],
)
def test_sequence_classification_forward_loss_backward(tiny_fat5_config, make_batch, num_labels, problem_type, labels):
    torch.manual_seed(0)
    model = FAT5ForSequenceClassification(tiny_fat5_config(num_labels=num_labels, problem_type=problem_type)).train()
    input_ids, attention_mask = make_batch(96, [6, 3])
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, num_labels)
    expected_problem = problem_type or ("regression" if num_labels == 1 else "single_label_classification")
    assert model.config.problem_type == expected_problem
    out.loss.backward()
    assert torch.isfinite(out.loss) and _grads_finite(model)


def test_sequence_classification_pools_mean_over_non_padding(tiny_fat5_config, make_batch):
    torch.manual_seed(0)
    model = FAT5ForSequenceClassification(tiny_fat5_config(num_labels=2)).eval()
    input_ids, attention_mask = make_batch(96, [5, 3])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = model.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = torch.stack([hidden[0, :5].mean(0), hidden[1, :3].mean(0)])
        torch.testing.assert_close(logits, model.classification_head(pooled))
        # padding content does not change the prediction
        changed = input_ids.clone()
        changed[1, 3:] = 7
        torch.testing.assert_close(model(input_ids=changed, attention_mask=attention_mask).logits, logits)


def test_token_classification_forward_loss_backward(tiny_fat5_config, make_batch):
    torch.manual_seed(0)
    model = FAT5ForTokenClassification(tiny_fat5_config(num_labels=5)).train()
    input_ids, attention_mask = make_batch(96, [6, 3])
    labels = torch.randint(0, 5, input_ids.shape).masked_fill(attention_mask == 0, -100)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, 6, 5)
    out.loss.backward()
    assert torch.isfinite(out.loss) and _grads_finite(model)


def test_question_answering_forward_loss_backward(tiny_fat5_config, make_batch):
    torch.manual_seed(0)
    model = FAT5ForQuestionAnswering(tiny_fat5_config()).train()
    input_ids, attention_mask = make_batch(96, [6, 4])
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        start_positions=torch.tensor([1, 2]),
        end_positions=torch.tensor([3, 99]),  # out of range: ignored, as in transformers
    )
    assert out.start_logits.shape == out.end_logits.shape == (2, 6)
    out.loss.backward()
    assert torch.isfinite(out.loss) and _grads_finite(model)


@pytest.mark.parametrize(
    "head, labels, message",
    [
        (FAT5ForSequenceClassification, torch.tensor([0, 7]), r"ids \[7\] outside the model's config.num_labels=3"),
        (FAT5ForSequenceClassification, torch.tensor([-1, 1]), r"class ids \[-1\] .*valid: 0\.\.2, or -100"),
        (FAT5ForTokenClassification, torch.tensor([[0, 1, 2, 3, 9, -100]] * 2), r"ids \[9\] .*num_labels=4 .*0\.\.3"),
    ],
)
def test_classification_labels_outside_num_labels_name_the_field(tiny_fat5_config, make_batch, head, labels, message):
    """Instead of PyTorch's bare `IndexError: Target 7 is out of bounds`: which labels, which range, which field."""
    model = head(tiny_fat5_config(num_labels=3 if head is FAT5ForSequenceClassification else 4))
    input_ids, attention_mask = make_batch(96, [6, 3])
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    # -100 (ignored positions) and in-range ids pass; the check can be switched off with the token-id checks
    in_range = labels.clamp(-100, 2).masked_fill(labels < 0, -100)
    model(input_ids=input_ids, attention_mask=attention_mask, labels=in_range)
    model.config.check_token_ids = False
    with pytest.raises(IndexError):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_question_answering_refuses_negative_positions(tiny_fat5_config, make_batch):
    """The loss clamps a negative position to 0, the first token: -100 as "no answer" would train silently."""
    model = FAT5ForQuestionAnswering(tiny_fat5_config())
    input_ids, attention_mask = make_batch(96, [6, 4])
    with pytest.raises(ValueError, match=r"`end_positions` holds negative positions \[-100\]"):
        model(input_ids=input_ids, attention_mask=attention_mask, start_positions=torch.tensor([1, 2]),
              end_positions=torch.tensor([3, -100]))  # fmt: skip


@pytest.mark.parametrize("head", [FAT5ForSequenceClassification, FAT5ForTokenClassification, FAT5ForQuestionAnswering])
def test_heads_output_attentions_and_hidden_states(tiny_fat5_config, make_batch, head):
    model = head(tiny_fat5_config(num_labels=2, attn_implementation="eager")).eval()
    input_ids, attention_mask = make_batch(96, [6, 4])
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 6, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 6, 6)


@pytest.mark.parametrize("head", [FAT5ForSequenceClassification, FAT5ForTokenClassification, FAT5ForQuestionAnswering])
def test_heads_load_encoder_from_seq2seq_checkpoint(tmp_path, tiny_fat5_config, head):
    torch.manual_seed(0)
    seq2seq = FAT5ForConditionalGeneration(tiny_fat5_config(num_labels=2))
    seq2seq.save_pretrained(tmp_path)
    model = head.from_pretrained(tmp_path)
    expected = seq2seq.state_dict()
    for key, value in model.transformer.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("head", [FAT5ForSequenceClassification, FAT5ForTokenClassification, FAT5ForQuestionAnswering])
def test_heads_warn_that_decoder_inputs_are_ignored(tiny_fat5_config, make_batch, head):
    # T5's heads run a decoder; a T5 script passing decoder inputs keeps running, with a warning that they do nothing
    from transformers.utils import logging as hf_logging

    model = head(tiny_fat5_config()).eval()
    input_ids, attention_mask = make_batch(96, [6, 4])
    logger = hf_logging.get_logger("fat5_hf.modeling_fat5")
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with torch.no_grad():
            plain = model(input_ids=input_ids, attention_mask=attention_mask)
            with_decoder = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=input_ids[:, :2])
    finally:
        logger.removeHandler(handler)
    assert any("encoder-only" in w and "decoder_input_ids are ignored" in w for w in warnings), warnings
    for name in plain.keys():
        torch.testing.assert_close(with_decoder[name], plain[name], rtol=0, atol=0)
