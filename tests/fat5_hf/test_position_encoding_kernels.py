"""The model's kernel path for each position encoding (Triton interpreter, fp32) against its PyTorch path: ALiBi
through the attention kernel's slopes, RoPE through the pre-pass kernel, FIRE through its per-distance table (within
its threshold), values and gradients of every parameter."""

from __future__ import annotations

import pytest
import torch

from fat5_hf import FAT5ForConditionalGeneration, kernel_ops


def _labels(lengths, vocab_size=96, seed=3):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.full((len(lengths), max(lengths)), -100)
    for row, length in enumerate(lengths):
        labels[row, :length] = torch.randint(2, vocab_size, (length,), generator=gen)
    return labels


_KERNELS = (
    "_triton_t5_flash_attention", "_triton_t5_flash_attention_qkvpacked", "_triton_t5_flash_attention_varlen",
    "_triton_t5_flash_attention_varlen_qkvpacked", "_triton_rope",
)  # fmt: skip


def _record(monkeypatch, name, calls):
    """Record `(kernel, bias)` of each call of `kernel_ops.<name>`; bias is "alibi", "t5", "distance" or None."""
    kernel = getattr(kernel_ops, name)

    def recording(*args, **kwargs):
        bias = next((kind for kind in ("alibi_slopes", "bias_table", "distance_bias") if kwargs.get(kind) is not None), None)
        calls.append((name, {"alibi_slopes": "alibi", "bias_table": "t5", "distance_bias": "distance"}.get(bias)))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kernel_ops, name, recording)


def _kernels_importable():
    if not (kernel_ops.kernel_available("attention") and kernel_ops.kernel_available("rope")):
        pytest.skip("fat5_kernels has no attention or rope kernel here")


def _assert_same_logits_and_grads(actual, expected):
    (logits, grads), (expected_logits, expected_grads) = actual, expected
    scale = expected_logits.abs().max().item()
    torch.testing.assert_close(logits, expected_logits, atol=1e-5 * scale, rtol=1e-4)
    for name, grad in grads.items():
        # a floor for gradients that are zero up to rounding (FIRE's output bias adds a constant to each head's row)
        scale = max(expected_grads[name].abs().max().item(), 1e-2)
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-4 * scale, rtol=1e-3, msg=name)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("encoding", ["alibi", "rope", "fire", "none"])
def test_kernel_path_matches_pytorch(tiny_fat5_config, make_batch, monkeypatch, encoding):
    _kernels_importable()
    calls = []
    for name in _KERNELS:
        _record(monkeypatch, name, calls)
    torch.manual_seed(0)
    config = tiny_fat5_config(
        position_encoding_type=encoding, use_fused_rms_norm=False, use_fused_glu=False, use_fused_cross_entropy=False,
        rope_fraction=0.5, fire_threshold=5.0,
    )  # fmt: skip
    model = FAT5ForConditionalGeneration(config).train()  # no KV cache: both stacks can take the kernel path
    input_ids, attention_mask = make_batch(96, [9, 6])
    labels = _labels([5, 3])

    def loss_and_grads():
        model.zero_grad()
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        outputs.loss.backward()
        return outputs.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected_logits, expected_grads = loss_and_grads()
    assert calls == []
    with kernel_ops.kernels_on_cpu():
        logits, grads = loss_and_grads()
    self_attention = [call for call in calls if call[0] != "_triton_rope" and call[1] is not None]
    # The encoder's batch is padded: every attention of both stacks runs unpadded (the varlen kernels).
    if encoding == "alibi":  # 2 + 2 self-attentions with the slopes (packed q/k/v), never T5's table
        assert sorted(set(calls)) == [("_triton_t5_flash_attention_varlen", None),
                                      ("_triton_t5_flash_attention_varlen_qkvpacked", "alibi")]  # fmt: skip
        assert len(self_attention) == 4
    elif encoding == "rope":  # one rotation per self-attention, then the kernel without bias
        assert [call[0] for call in calls].count("_triton_rope") == 4 and self_attention == []
    elif encoding == "fire":
        # The encoder's 9 positions pass FIRE's threshold of 5: its stack takes the PyTorch path. The decoder's 5
        # (positions 0..4) are below it: its self-attentions read FIRE's per-distance table, with cross-attention.
        assert self_attention == [("_triton_t5_flash_attention_varlen_qkvpacked", "distance")] * 2
        assert len(calls) == 4
    else:
        assert self_attention == [] and len(calls) == 6
    _assert_same_logits_and_grads((logits, grads), (expected_logits, expected_grads))


@pytest.mark.gpu
@pytest.mark.parametrize("encoding", ["t5", "alibi", "rope", "fire", "none"])
def test_bf16_kernel_path_is_as_accurate_as_bf16_pytorch(encoding):
    """Under bf16 autocast at a real length, the kernel path's loss and gradients are within twice the error of the
    PyTorch path's (both against the fp32 PyTorch path)."""
    from fat5_hf import FAT5Config

    config = FAT5Config(
        vocab_size=512, d_model=256, d_kv=64, num_heads=4, d_ff=512, num_layers=2, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, position_encoding_type=encoding, fire_threshold=256.0,
    )  # fmt: skip
    torch.manual_seed(0)
    models = {}
    for use_kernels in (False, True):
        torch.manual_seed(0)
        models[use_kernels] = FAT5ForConditionalGeneration(
            FAT5Config(**{**config.to_dict(), "use_triton_attention": use_kernels})
        ).cuda().train()  # fmt: skip
    models[True].load_state_dict(models[False].state_dict())
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 512, (4, 1024), generator=gen).cuda()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 700:] = 0
    labels = torch.randint(2, 512, (4, 256), generator=gen).cuda()

    def loss_and_grads(model, autocast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return loss.float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])

    loss32, grads32 = loss_and_grads(models[False], autocast=False)
    loss_ref, grads_ref = loss_and_grads(models[False], autocast=True)
    loss_kernel, grads_kernel = loss_and_grads(models[True], autocast=True)
    assert (loss_kernel - loss32).abs() <= 2 * (loss_ref - loss32).abs() + 1e-3
    reference_error = (grads_ref - grads32).norm() / grads32.norm()
    kernel_error = (grads_kernel - grads32).norm() / grads32.norm()
    assert kernel_error <= 2 * reference_error + 1e-3, (kernel_error, reference_error)
