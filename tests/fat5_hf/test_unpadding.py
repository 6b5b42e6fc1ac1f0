"""Padded batches on the kernel path run unpadded (`fat5_hf.unpadding`): the varlen metadata of a padding mask, and a
FAT5 model whose layers see only the real tokens giving the padded computation's outputs and gradients (fp32, Triton
interpreter: within the kernels' tolerance, as in test_modeling's kernel tests)."""

import pytest
import torch

from fat5_hf import FAT5ForConditionalGeneration, kernel_ops
from fat5_hf.unpadding import sequences_from_attention_mask, stack_attention


def test_sequences_from_right_left_and_empty_rows():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    packed = sequences_from_attention_mask(mask)
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 5, 9]
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.indices.tolist() == [0, 1, 2, 6, 7, 12, 13, 14, 15]
    assert packed.max_seqlen == 4


def test_masks_with_holes_keep_the_padded_layout():
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    assert sequences_from_attention_mask(holes) is None
    masks = stack_attention(holes, None, batch=2, length=4, encoder_length=None, causal=False, unpad_layers=True,
                            device=holes.device)  # fmt: skip
    assert not masks.unpadded and masks.self_attention.queries is None
    assert torch.equal(masks.self_attention.key_padding_mask, holes.bool())


def test_full_rows_need_no_metadata_and_bad_shapes_raise():
    full = torch.ones(2, 5, dtype=torch.long)
    masks = stack_attention(full, None, batch=2, length=5, encoder_length=None, causal=False, unpad_layers=True,
                            device=full.device)  # fmt: skip
    assert not masks.unpadded and masks.self_attention.queries is None
    assert sequences_from_attention_mask(full).cu_seqlens.tolist() == [0, 5, 10]
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        sequences_from_attention_mask(torch.ones(5))


def test_decoder_without_padding_attends_to_the_packed_encoder():
    encoder_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    masks = stack_attention(None, encoder_mask, batch=2, length=4, encoder_length=3, causal=True, unpad_layers=True,
                            device=encoder_mask.device)  # fmt: skip
    assert masks.tokens.cu_seqlens.tolist() == [0, 4, 8]
    assert masks.encoder_tokens.cu_seqlens.tolist() == [0, 2, 5]
    states = torch.randn(2, 4, 6)
    packed = masks.pack(states)
    assert packed.shape == (1, 8, 6) and packed.data_ptr() == states.data_ptr()  # a view: no padding to drop
    assert masks.pack(torch.randn(2, 3, 6), encoder=True).shape == (1, 5, 6)
    assert torch.equal(masks.unpack(packed, 2, 4), states)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["right", "left_encoder_and_decoder_mask", "hidden_states_observed"])
def test_unpadded_layers_match_the_padded_computation(tiny_fat5_config, make_batch, monkeypatch, case):
    if not kernel_ops.kernel_available("attention"):
        pytest.skip("needs triton and fat5_kernels")
    torch.manual_seed(0)
    # logits returned (not fused into the loss) so that they can be compared
    model = FAT5ForConditionalGeneration(tiny_fat5_config(use_fused_cross_entropy=False)).train()
    input_ids, attention_mask = make_batch(96, [9, 4, 7], seed=1, left=case.startswith("left"))
    targets, target_mask = make_batch(96, [3, 6, 2], seed=2)
    batch = dict(
        input_ids=input_ids, attention_mask=attention_mask, labels=targets.masked_fill(target_mask == 0, -100)
    )
    if case.startswith("left"):
        batch["decoder_input_ids"] = model._shift_right(batch["labels"])
        batch["decoder_attention_mask"] = model._shift_right(target_mask).index_fill(1, torch.tensor([0]), 1)
    ff_inputs = []
    wo = model.encoder.block[0].layer[-1].DenseReluDense.wo
    wo.register_forward_hook(lambda module, args, out: ff_inputs.append(tuple(args[0].shape[:-1])))
    if case == "hidden_states_observed":
        model.decoder.block[1].register_forward_hook(lambda *args: None)
        model.encoder.block[1].register_forward_hook(lambda *args: None)

    def outputs_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters()}

    expected, expected_grads = outputs_and_grads()
    ff_inputs.clear()
    with kernel_ops.kernels_on_cpu():
        actual, actual_grads = outputs_and_grads()
    # the layers saw only the 20 real tokens, unless something reads the blocks' (padded) hidden states
    assert ff_inputs == ([(3, 9)] if case == "hidden_states_observed" else [(1, 20)])
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)
    labelled = batch["labels"] != -100
    scale = expected.logits.abs().max().item()
    torch.testing.assert_close(actual.logits[labelled], expected.logits[labelled], atol=1e-5 * scale, rtol=1e-4)
    real = attention_mask.bool()
    torch.testing.assert_close(
        actual.encoder_last_hidden_state[real], expected.encoder_last_hidden_state[real], atol=1e-5, rtol=1e-4
    )
    if case != "hidden_states_observed":
        assert actual.encoder_last_hidden_state[~real].abs().max() == 0  # padding positions are zeros
    for name, grad in expected_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(actual_grads[name], grad, atol=1e-4 * scale, rtol=1e-3, msg=name)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_on_the_kernels_gives_t5s_tokens(t5_pair, make_batch, num_beams):
    """The encoder runs unpadded on the kernels once, then the decoding steps (KV cache: PyTorch attention, fused
    norms and feed-forward): greedy and beam search give HF T5's tokens on the same weights."""
    if not kernel_ops.kernel_available("attention"):
        pytest.skip("needs triton and fat5_kernels")
    t5, fat5 = t5_pair("t5_v1_1")
    input_ids, attention_mask = make_batch(96, [9, 4, 7], seed=1)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, num_beams=num_beams)
    expected = t5.generate(**kwargs)
    with kernel_ops.kernels_on_cpu():
        assert torch.equal(fat5.generate(**kwargs), expected)
