"""FAT5 vs transformers' T5, in fp32 on CPU: same parameters, same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

from fat5_hf import FAT5Config, FAT5EncoderModel, FAT5ForConditionalGeneration, kernel_ops

VARIANTS = ["t5", "t5_v1_1", "mt5", "gated_silu"]


def _labels(vocab_size: int, lengths: list[int], make_batch):
    labels, mask = make_batch(vocab_size, lengths, seed=3)
    return labels.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_loss_match_t5(t5_pair, make_batch, variant, attn_implementation):
    t5, fat5 = t5_pair(variant, attn_implementation)
    input_ids, attention_mask = make_batch(96, [7, 5, 3])
    labels = _labels(96, [4, 6, 2], make_batch)
    with torch.no_grad():
        expected = t5(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        actual = fat5(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state, atol=1e-5, rtol=0)
    # the z-loss part is reported separately and is 0 by default
    assert actual.z_loss.item() == 0.0
    torch.testing.assert_close(actual.ce_loss, actual.loss.detach())


@pytest.mark.parametrize("variant", ["t5", "t5_v1_1"])
def test_decoder_padding_mask_and_left_padding_match_t5(t5_pair, make_batch, variant):
    t5, fat5 = t5_pair(variant, "eager")
    input_ids, attention_mask = make_batch(96, [6, 2, 4], left=True)
    decoder_input_ids, decoder_attention_mask = make_batch(96, [3, 5, 1], seed=7)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_attention_mask,
    )
    with torch.no_grad():
        torch.testing.assert_close(fat5(**kwargs).logits, t5(**kwargs).logits, atol=1e-4, rtol=0)


def test_state_dict_keys_identical_and_load_strict_both_ways(t5_pair):
    t5, fat5 = t5_pair("t5_v1_1")
    assert list(t5.state_dict()) == list(fat5.state_dict())
    assert t5.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape == (8, 4)
    # only block 0 of each stack holds the bias table, as in T5
    for stack in (fat5.encoder, fat5.decoder):
        assert [hasattr(b.layer[0].SelfAttention, "relative_attention_bias") for b in stack.block] == [True, False]
    incompatible = fat5.load_state_dict(t5.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    incompatible = t5.load_state_dict(fat5.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys


def test_gradients_match_t5(t5_pair, make_batch):
    t5, fat5 = t5_pair("t5_v1_1", "eager")
    t5.train()
    fat5.train()
    input_ids, attention_mask = make_batch(96, [7, 5])
    labels = _labels(96, [4, 6], make_batch)
    t5(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    fat5(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    t5_params = dict(t5.named_parameters())
    for name, param in fat5.named_parameters():
        torch.testing.assert_close(param.grad, t5_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_encoder_model_matches_t5_encoder(t5_pair, make_batch):
    t5, fat5 = t5_pair("mt5", "eager")
    t5_encoder = T5EncoderModel(t5.config).eval()
    fat5_encoder = FAT5EncoderModel(fat5.config).eval()
    t5_encoder.load_state_dict(t5.state_dict(), strict=False)
    missing = fat5_encoder.load_state_dict(t5_encoder.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    input_ids, attention_mask = make_batch(96, [7, 4])
    with torch.no_grad():
        expected = t5_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        actual = fat5_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
    assert len(actual.hidden_states) == len(expected.hidden_states) == 3
    for a, e in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=0)


def test_output_attentions_and_hidden_states_match_t5(t5_pair, make_batch):
    t5, fat5 = t5_pair("t5", "eager")
    input_ids, attention_mask = make_batch(96, [6, 4])
    decoder_input_ids, _ = make_batch(96, [3, 3], seed=5)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        output_attentions=True,
        output_hidden_states=True,
    )
    with torch.no_grad():
        expected = t5(**kwargs)
        actual = fat5(**kwargs)
    for field in (
        "encoder_attentions",
        "decoder_attentions",
        "cross_attentions",
        "encoder_hidden_states",
        "decoder_hidden_states",
    ):
        a, e = getattr(actual, field), getattr(expected, field)
        assert a is not None and len(a) == len(e), field
        for x, y in zip(a, e):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=field)
    assert actual.encoder_attentions[0].shape == (2, 4, 6, 6)
    assert actual.cross_attentions[0].shape == (2, 4, 3, 6)
    # return_dict=False gives the tuple form, logits first
    with torch.no_grad():
        as_tuple = fat5(input_ids=input_ids, decoder_input_ids=decoder_input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (2, 3, 96)


def test_gradient_checkpointing_gives_same_gradients(tiny_fat5_config, make_batch):
    torch.manual_seed(0)
    # float64, so that the recomputation's different summation order stays far below the tolerance
    model = FAT5ForConditionalGeneration(tiny_fat5_config()).double().train()
    input_ids, attention_mask = make_batch(96, [7, 5])
    labels = _labels(96, [4, 6], make_batch)

    def grads():
        model.zero_grad()
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads()
    model.gradient_checkpointing_enable()
    assert model.encoder.block[1].gradient_checkpointing
    checkpointed = grads()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-9, rtol=1e-7, msg=name)
    # the shared relative bias table of the encoder gets its gradient through the checkpointed layers
    assert checkpointed["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].abs().sum() > 0


@pytest.mark.parametrize("mode", ["pure_bf16", "autocast_bf16"])
def test_bf16_forward_backward_finite(tiny_fat5_config, make_batch, mode):
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config(z_loss=1e-4)).train()
    if mode == "pure_bf16":
        model = model.to(torch.bfloat16)
    input_ids, attention_mask = make_batch(96, [7, 5])
    labels = _labels(96, [4, 6], make_batch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast_bf16"):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.loss.dtype == torch.float32  # the loss is computed in fp32
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    if mode == "pure_bf16":  # nothing is forced back to fp32 (T5 keeps `wo` in fp32)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_fp16_overflow_clamp_matches_t5(t5_pair, make_batch):
    t5, fat5 = t5_pair("t5_v1_1", "eager")
    # Feed-forward outputs past the fp16 range (as bf16-trained checkpoints give) in encoder block 0: both models
    # clamp the infinities in the residual stream the same way, and the output stays finite.
    with torch.no_grad():
        for model in (t5, fat5):
            model.encoder.block[0].layer[-1].DenseReluDense.wo.weight.mul_(1e5)
    t5, fat5 = t5.half(), fat5.half()  # all fp16, `wo` included (T5's fp32 `wo` is a load-time guard, tested apart)
    overflowed = []
    fat5.encoder.block[0].layer[-1].register_forward_hook(
        lambda module, args, output: overflowed.append(bool(torch.isinf(output).any()))
    )
    input_ids, attention_mask = make_batch(96, [7, 5])
    with torch.no_grad():
        expected = t5.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        actual = fat5.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert overflowed == [True]  # the premise: the block's output overflowed before the clamp
    assert torch.isfinite(expected).all() and torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-3)


def test_loss_with_all_labels_ignored_is_zero(tiny_fat5_config, make_batch):
    model = FAT5ForConditionalGeneration(tiny_fat5_config(z_loss=1e-3)).train()
    input_ids, _ = make_batch(96, [5, 5])
    labels = torch.full((2, 4), -100)
    out = model(input_ids=input_ids, labels=labels)
    assert out.loss.item() == 0.0 and not torch.isnan(out.loss)
    out.loss.backward()  # a zero loss still backpropagates (zero gradients), no NaN
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_z_loss_and_label_smoothing(tiny_fat5_config, make_batch):
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config(z_loss=1e-2, label_smoothing=0.1)).eval()
    input_ids, attention_mask = make_batch(96, [7, 5])
    labels = _labels(96, [4, 6], make_batch)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    logits = out.logits.view(-1, 96)
    flat = labels.view(-1)
    keep = flat != -100
    expected_ce = torch.nn.functional.cross_entropy(logits, flat, ignore_index=-100, label_smoothing=0.1)
    expected_z = 1e-2 * torch.logsumexp(logits[keep], dim=-1).pow(2).mean()
    torch.testing.assert_close(out.ce_loss, expected_ce)
    torch.testing.assert_close(out.z_loss, expected_z)
    torch.testing.assert_close(out.loss, expected_ce + expected_z)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_inductor_compiled_loss_backpropagates_like_eager(tiny_fat5_config, make_batch, z_loss):
    """`torch.compile` (Inductor on the CPU, what the pretraining recipe's `model.torch_compile` does there): the
    loss keeps its graph and matches eager, with and without z-loss. The model once returned `loss.detach() - 0`
    next to the loss, and Inductor (torch 2.13) then gave a loss without grad_fn."""
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config(z_loss=z_loss)).train()
    input_ids, attention_mask = make_batch(96, [7, 5])
    labels = _labels(96, [4, 6], make_batch)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    eager = model(**batch)
    eager_grads = torch.autograd.grad(eager.loss, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model)(**batch)
    assert compiled.loss.grad_fn is not None
    compiled_grads = torch.autograd.grad(compiled.loss, list(model.parameters()))
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.ce_loss, eager.ce_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_labels_are_shifted_right_like_t5(tiny_fat5_config):
    model = FAT5ForConditionalGeneration(tiny_fat5_config(decoder_start_token_id=0, pad_token_id=0))
    labels = torch.tensor([[5, 6, -100, -100], [7, 8, 9, 1]])
    assert model._shift_right(labels).tolist() == [[0, 5, 6, 0], [0, 7, 8, 9]]


@pytest.mark.parametrize("bad_id", [-1, 96, 1000])
def test_out_of_range_token_ids_raise(tiny_fat5_config, bad_id):
    model = FAT5ForConditionalGeneration(tiny_fat5_config())
    input_ids = torch.tensor([[3, 4, bad_id]])
    with pytest.raises(ValueError, match=r"embedding has 96 rows"):
        model(input_ids=input_ids, decoder_input_ids=torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"`decoder_input_ids` holds token ids .* embedding has 96 rows"):
        model(input_ids=torch.tensor([[3, 4]]), decoder_input_ids=torch.tensor([[0, bad_id]]))
    # labels are checked before `_shift_right` turns them into decoder inputs, so the error names them; -100 is fine
    with pytest.raises(ValueError, match=r"`labels` holds ids .* vocabulary has 96 entries"):
        model(input_ids=torch.tensor([[3, 4]]), labels=torch.tensor([[5, -100, bad_id]]))
    model(input_ids=torch.tensor([[3, 4]]), labels=torch.tensor([[5, -100, 95]]))


@pytest.mark.interpreter
def test_check_token_ids_false_skips_the_checks(tiny_fat5_config, make_batch):
    # The switch trades the clear error for no host sync: PyTorch's own error (or a device assert) remains.
    model = FAT5ForConditionalGeneration(tiny_fat5_config(check_token_ids=False))
    with pytest.raises(IndexError):
        model(input_ids=torch.tensor([[3, 4, 96]]), decoder_input_ids=torch.tensor([[0]]))
    with pytest.raises(IndexError):  # the PyTorch loss's own error for a label >= vocab_size
        model(input_ids=torch.tensor([[3, 4]]), decoder_input_ids=torch.tensor([[0, 5]]), labels=torch.tensor([[5, 96]]))
    kernels = ("_triton_cross_entropy", "_triton_fused_linear_cross_entropy")  # eval loss, training loss
    if not all(getattr(kernel_ops, name) is not None for name in kernels):
        return
    input_ids, _ = make_batch(96, [5])
    decoder_input_ids = torch.tensor([[0, 5, 7]])
    for check in (True, False):
        model = FAT5ForConditionalGeneration(tiny_fat5_config(check_token_ids=check))
        for name, training in zip(kernels, (False, True)):
            model.train(training)
            validated, original = [], getattr(kernel_ops, name)

            def spy(*args, original=original, validated=validated, **kwargs):
                validated.append(kwargs["check_label_values"])
                return original(*args, **kwargs)

            with kernel_ops.kernels_on_cpu(), pytest.MonkeyPatch.context() as patch:
                patch.setattr(kernel_ops, name, spy)
                if check:
                    # the model checks the labels once, before the decoder: the loss kernels are never reached
                    with pytest.raises(ValueError, match=r"`labels` holds ids in \[1, 96\]"):
                        model(
                            input_ids=input_ids, decoder_input_ids=decoder_input_ids, labels=torch.tensor([[5, 96, 1]])
                        )
                    assert validated == [], name
                # valid labels: the kernels are not asked to check again (a second host sync on GPU)
                model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, labels=torch.tensor([[5, 7, 1]]))
            assert validated == [False], name


def test_peft_lora_on_q_v_trains(tiny_fat5_config, make_batch):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config())
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    )
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    # 2 encoder + 2 decoder blocks; q and v of self-attention (+ cross-attention in the decoder); A and B each
    assert len(trainable) == (2 * 2 + 2 * 4) * 2 and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    input_ids, attention_mask = make_batch(96, [7, 5])
    labels = _labels(96, [4, 6], make_batch)
    before = lora(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    before.backward()
    optimizer.step()
    after = lora(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.isfinite(after) and after.item() != before.item()


# ---------------------------------------------------------------------------------------------------------------
# The kernel seam: with `kernels_on_cpu()` the Triton kernels run under the interpreter and must agree with the
# PyTorch path (fp32). Skipped for kernels that have not landed in fat5_kernels yet.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.interpreter
def test_fused_norm_glu_and_loss_paths_match_pytorch(tiny_fat5_config, make_batch):
    for name in ("rms_norm", "gated_activation", "cross_entropy"):
        if not kernel_ops.kernel_available(name):
            pytest.skip(f"fat5_kernels has no {name} kernel here")
    torch.manual_seed(0)
    config = tiny_fat5_config(use_triton_attention=False, z_loss=1e-3, label_smoothing=0.1)
    model = FAT5ForConditionalGeneration(config).eval()
    input_ids, attention_mask = make_batch(96, [6, 4])
    labels = _labels(96, [3, 2], make_batch)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        with kernel_ops.kernels_on_cpu():
            actual = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    scale = expected.logits.abs().max().item()
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.z_loss, expected.z_loss, atol=1e-6, rtol=1e-5)


@pytest.mark.interpreter
def test_fused_training_loss_takes_the_configs_chunk_sizes(tiny_fat5_config, make_batch, monkeypatch):
    """`loss_chunk_size` / `loss_vocab_chunk_size` reach the fused LM-head loss (token chunks of 3 rows, vocabulary
    slices of 40, 40 and 16 columns), whose loss and gradients match the PyTorch path's."""
    if not kernel_ops.kernel_available("fused_linear_cross_entropy"):
        pytest.skip("fat5_kernels has no fused_linear_cross_entropy kernel here")
    calls = []
    kernel = kernel_ops._triton_fused_linear_cross_entropy

    def recording_kernel(*args, **kwargs):
        calls.append((kwargs["chunk_size"], kwargs["vocab_chunk_size"]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kernel_ops, "_triton_fused_linear_cross_entropy", recording_kernel)
    torch.manual_seed(0)
    config = tiny_fat5_config(use_triton_attention=False, z_loss=1e-3, loss_chunk_size=3, loss_vocab_chunk_size=40)
    model = FAT5ForConditionalGeneration(config).train()
    input_ids, attention_mask = make_batch(96, [6, 4])
    labels = _labels(96, [5, 3], make_batch)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected_grads = loss_and_grads()
    with kernel_ops.kernels_on_cpu():
        loss, grads = loss_and_grads()
    assert calls == [(3, 40)]
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        scale = grad.abs().max().item() + 1e-12
        torch.testing.assert_close(grads[name], grad, atol=1e-4 * scale, rtol=1e-3, msg=name)


@pytest.mark.interpreter
def test_training_loss_is_fused_in_every_call_form(tiny_fat5_config, make_batch, monkeypatch):
    """Training with labels on the kernel path takes the fused LM head + loss (no logits) whatever the call form:
    `return_dict=False`, gradient checkpointing, a PEFT-wrapped model (LoRA on q/v: the head stays a plain
    `nn.Linear`) and `Trainer`'s `num_items_in_batch`; eval mode and calls without labels keep the logits. (The
    compiled step: `test_compiled_training_step_with_every_kernel_is_one_graph`.)"""
    if not kernel_ops.kernel_available("fused_linear_cross_entropy"):
        pytest.skip("fat5_kernels has no fused_linear_cross_entropy kernel here")
    peft = pytest.importorskip("peft")
    calls, kernel = [], kernel_ops._triton_fused_linear_cross_entropy
    monkeypatch.setattr(
        kernel_ops, "_triton_fused_linear_cross_entropy", lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    )
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config(use_triton_attention=False)).train()
    input_ids, attention_mask = make_batch(96, [6, 4])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=_labels(96, [5, 3], make_batch))
    with kernel_ops.kernels_on_cpu():
        loss = model(**batch).loss
        as_tuple = model(**batch, return_dict=False)
        model.activation_checkpointing_enable()
        checkpointed = model(**batch)
        model.activation_checkpointing_disable()
        summed = model(**batch, num_items_in_batch=torch.tensor(16))
        lora_config = peft.LoraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
        lora = peft.get_peft_model(model, lora_config)(**batch)
        assert calls == [1] * 5
        assert checkpointed.logits is None and summed.logits is None and lora.logits is None
        assert len(as_tuple) == len(model(**batch).to_tuple())  # the tuple has no logits either
        torch.testing.assert_close(summed.loss, loss * 8 / 16)  # 8 labelled tokens of 16 in the whole batch
        for other in (as_tuple[0], checkpointed.loss, lora.loss):
            torch.testing.assert_close(other, loss)
        assert model.eval()(**batch).logits is not None
        no_labels = {k: v for k, v in batch.items() if k != "labels"}
        assert model.train()(**no_labels, decoder_input_ids=model._shift_right(batch["labels"])).logits is not None
    assert calls == [1] * 6


@pytest.mark.interpreter
def test_block_norms_store_the_autocast_dtype_for_their_linears():
    # Under autocast a block's norm feeds only nn.Linear layers, which cast to the autocast dtype: the kernel
    # stores that dtype directly, with the values of T5's fp32 output cast. The stacks' final norms keep fp32.
    if not kernel_ops.kernel_available("rms_norm"):
        pytest.skip("fat5_kernels has no rms_norm kernel here")
    from fat5_hf.modeling_fat5 import FAT5LayerNorm

    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 16)
    half = torch.float16  # the interpreter truncates (does not round) to bf16: fp16 checks the rounding exactly
    for feeds_linear, want_dtype in ((True, half), (False, torch.float32)):
        norm = FAT5LayerNorm(16, use_fused_kernel=True, feeds_linear=feeds_linear)
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
        with torch.no_grad():
            expected = norm(hidden)  # PyTorch path, fp32
            with kernel_ops.kernels_on_cpu(), torch.autocast("cpu", dtype=half):
                actual = norm(hidden)
        assert actual.dtype == want_dtype
        torch.testing.assert_close(actual, expected.to(want_dtype), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("residual_dtype", [None, "bfloat16"])
@pytest.mark.interpreter
def test_residual_adds_fused_into_the_next_norm_under_autocast(tiny_fat5_config, make_batch, monkeypatch, residual_dtype):
    """Under autocast the sublayers output half precision: every residual add goes into the next norm's kernel, the
    next sublayer's or, for each block's last one, the next block's first norm or the stack's final norm. T5's
    stream is fp32 (fp32 stream + half output); with `residual_dtype="bfloat16"` it is bf16 (bf16 + bf16). Loss
    and gradients match the PyTorch path under the same autocast: closely for the fp32 stream (checked under fp16
    autocast, whose maths the interpreter gets right), within bf16 roundings for the bf16 one (the interpreter
    truncates where the GPU rounds)."""
    if not kernel_ops.kernel_available("rms_norm"):
        pytest.skip("fat5_kernels has no rms_norm kernel here")
    residual_dtypes = []
    kernel = kernel_ops._triton_rms_norm

    def recording_kernel(hidden_states, weight, eps, residual=None, **kwargs):
        residual_dtypes.append(None if residual is None else (hidden_states.dtype, residual.dtype))
        return kernel(hidden_states, weight, eps, residual=residual, **kwargs)

    monkeypatch.setattr(kernel_ops, "_triton_rms_norm", recording_kernel)
    torch.manual_seed(0)
    config = tiny_fat5_config(
        residual_dtype=residual_dtype, use_triton_attention=False, use_fused_glu=False, use_fused_cross_entropy=False
    )
    model = FAT5ForConditionalGeneration(config).train()
    input_ids, attention_mask = make_batch(96, [7, 5])
    labels = _labels(96, [4, 6], make_batch)
    half = torch.float16 if residual_dtype is None else torch.bfloat16
    stream = torch.float32 if residual_dtype is None else torch.bfloat16

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=half):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected_loss, expected_grads = loss_and_grads()
    assert residual_dtypes == []
    with kernel_ops.kernels_on_cpu():
        loss, grads = loss_and_grads()
    fused = [dtypes for dtypes in residual_dtypes if dtypes is not None]
    # every sublayer's add: encoder blocks self-attention and FF, decoder blocks also cross-attention
    assert len(fused) == 2 * config.num_layers + 3 * config.num_decoder_layers
    assert set(fused) == {(half, stream)}
    if residual_dtype is None:
        torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-4)
        for name, grad in expected_grads.items():
            scale = grad.abs().max().item() + 1e-12
            torch.testing.assert_close(grads[name], grad, atol=2e-3 * scale, rtol=2e-2, msg=name)
    else:
        torch.testing.assert_close(loss, expected_loss, atol=2e-2, rtol=2e-2)
        flat, expected_flat = (torch.cat([g.flatten() for g in d.values()]) for d in (grads, expected_grads))
        assert torch.nn.functional.cosine_similarity(flat, expected_flat, dim=0) > 0.99


def _stream_dtypes(model) -> list[torch.dtype]:
    """Dtypes of every block's output stream in one call (forward hooks: the blocks then add their outputs)."""
    seen = []
    for block in (*model.encoder.block, *model.decoder.block):
        block.register_forward_hook(lambda module, args, output: seen.append(output[0].dtype))
    return seen


@pytest.mark.parametrize("residual_dtype", ["bfloat16", "float32"])
def test_residual_dtype_sets_the_stream_dtype(tiny_fat5_config, make_batch, residual_dtype):
    """`residual_dtype` casts the embeddings: under bf16 autocast over fp32 weights the stream is bf16 with
    "bfloat16" (T5X) and fp32 by default; in a bf16 model "float32" keeps it fp32. Training still reaches every
    parameter, in its own dtype."""
    torch.manual_seed(0)
    config = tiny_fat5_config(residual_dtype=residual_dtype)
    model = FAT5ForConditionalGeneration(config).train()
    default = FAT5ForConditionalGeneration(tiny_fat5_config())
    default.load_state_dict(model.state_dict())
    if residual_dtype == "float32":
        model, default = model.to(torch.bfloat16), default.to(torch.bfloat16)
    want, default_want = (torch.bfloat16, torch.float32) if residual_dtype == "bfloat16" else (torch.float32, torch.bfloat16)
    input_ids, attention_mask = make_batch(96, [7, 5])
    labels = _labels(96, [4, 6], make_batch)
    losses = []
    for candidate, stream_dtype in ((model, want), (default, default_want)):
        seen = _stream_dtypes(candidate)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = candidate(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        assert set(seen) == {stream_dtype} and len(seen) == config.num_layers + config.num_decoder_layers
        losses.append(loss.item())
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == param.dtype and torch.isfinite(param.grad).all(), name
    # the same network: the streams' roundings differ
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_residual_dtype_applies_only_where_the_stream_can_hold_it(tiny_fat5_config, make_batch, caplog):
    """A bf16 stream cannot hold where the sublayers output fp32 or fp16: an fp32 model outside autocast (inference
    of a model pretrained with the bf16 stream) runs exactly as T5, and fp16 autocast keeps T5's stream too, with a
    warning that names the fix."""
    import transformers

    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config(residual_dtype="bfloat16")).eval()
    default = FAT5ForConditionalGeneration(tiny_fat5_config()).eval()
    default.load_state_dict(model.state_dict())
    input_ids, attention_mask = make_batch(96, [7, 5])
    decoder_input_ids, _ = make_batch(96, [4, 4], seed=3)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"), torch.no_grad():
            assert torch.equal(model(**kwargs).logits, default(**kwargs).logits)
            assert caplog.text == ""
            seen = _stream_dtypes(model)
            with torch.autocast("cpu", dtype=torch.float16):
                model(**kwargs)
    finally:
        transformers.logging.disable_propagation()
    assert set(seen) == {torch.float32}
    assert "residual_dtype='bfloat16' cannot hold under torch.float16 autocast" in caplog.text
    assert "residual_dtype=None" in caplog.text


def test_block_hooks_and_hidden_states_see_whole_residual_stream(tiny_fat5_config, make_batch):
    """Each block leaves its feed-forward add to the next block's first norm (or the final norm) unless its hidden
    states are read: forward hooks on the blocks, or `output_hidden_states`, then see the whole stream, and the
    outputs are the same bit for bit either way."""
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config(num_layers=3)).eval()
    input_ids, attention_mask = make_batch(96, [7, 5])
    decoder_input_ids, _ = make_batch(96, [4, 4], seed=3)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    with torch.no_grad():
        deferred = model(**kwargs)
        with_hidden = model(**kwargs, output_hidden_states=True)
        seen = []
        handles = [
            block.register_forward_hook(lambda module, args, output: seen.append(output[0]))
            for block in model.encoder.block
        ]
        hooked = model(**kwargs)
        for handle in handles:
            handle.remove()
        # the last block's output is the whole stream: the final norm of it is the encoder's output
        assert torch.equal(model.encoder.final_layer_norm(seen[-1]), hooked.encoder_last_hidden_state)
    # transformers replaces the last hidden state with the final norm's output; the others are the blocks' outputs
    assert len(seen) == 3 and len(with_hidden.encoder_hidden_states) == 4
    for hidden, block_output in zip(with_hidden.encoder_hidden_states[1:-1], seen[:-1]):
        assert torch.equal(hidden, block_output)
    for outputs in (with_hidden, hooked):
        assert torch.equal(outputs.logits, deferred.logits)
        assert torch.equal(outputs.encoder_last_hidden_state, deferred.encoder_last_hidden_state)


@pytest.mark.interpreter
def test_flash_attention_path_matches_pytorch(tiny_fat5_config, make_batch, monkeypatch):
    if not kernel_ops.kernel_available("attention"):
        pytest.skip("fat5_kernels has no attention kernel here")
    calls = []

    def counting(name):
        kernel = getattr(kernel_ops, name)

        def counting_kernel(*args, **kwargs):
            calls.append((name.endswith("qkvpacked"), kwargs["causal"]))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(kernel_ops, name, counting_kernel)

    for kernel in ("", "_qkvpacked", "_varlen", "_varlen_qkvpacked"):
        counting(f"_triton_t5_flash_attention{kernel}")
    torch.manual_seed(0)
    config = tiny_fat5_config(use_fused_rms_norm=False, use_fused_glu=False, use_fused_cross_entropy=False)
    # training mode (dropout 0): no KV cache, so encoder and decoder both take the kernel path
    model = FAT5ForConditionalGeneration(config).train()
    input_ids, attention_mask = make_batch(96, [9, 6])
    labels = _labels(96, [5, 3], make_batch)
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected.loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert calls == []
    model.zero_grad()
    with kernel_ops.kernels_on_cpu():
        actual = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        actual.loss.backward()
    # 2 encoder and 2 decoder (causal) self-attentions on packed q/k/v, 2 cross-attentions on separate ones (all
    # varlen: the encoder rows are padded)
    assert sorted(calls) == [(False, False)] * 2 + [(True, False)] * 2 + [(True, True)] * 2
    # the kernel's exp2-based softmax is fp32-accurate, not bit-identical: compare relative to the values' scale
    scale = expected.logits.abs().max().item()
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(param.grad, expected_grads[name], atol=1e-4 * scale, rtol=1e-3, msg=name)


def test_fusable_projections_only_for_plain_unobserved_linears():
    """q/k/v (and wi_0/wi_1) are concatenated into one matmul only when nothing could tell the difference: plain
    bias-free nn.Linear of one dtype, without module hooks, global hooks or a patched forward (Accelerate)."""
    from fat5_hf.modeling_fat5 import _fusable_projections

    def linears(**kwargs):
        return [torch.nn.Linear(8, 8, bias=False, **kwargs) for _ in range(3)]

    assert _fusable_projections(*linears())
    biased = linears()
    biased[1] = torch.nn.Linear(8, 8)
    assert not _fusable_projections(*biased)
    mixed = linears()
    mixed[2] = mixed[2].to(torch.float16)
    assert not _fusable_projections(*mixed)

    class Wrapped(torch.nn.Linear):  # a LoRA or quantized layer subclasses (or replaces) nn.Linear
        pass

    assert not _fusable_projections(*linears()[:2], Wrapped(8, 8, bias=False))
    for register in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook"):
        hooked = linears()
        getattr(hooked[0], register)(lambda *args: None)
        assert not _fusable_projections(*hooked), register
    patched = linears()
    patched[1].forward = lambda x: x  # what accelerate's add_hook_to_module does
    assert not _fusable_projections(*patched)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not _fusable_projections(*linears())
    finally:
        handle.remove()


@pytest.mark.interpreter
def test_kernel_path_packs_projections_and_matches_separate_ones(tiny_fat5_config, make_batch, monkeypatch):
    """On the kernel path, self-attention runs one q/k/v matmul into the packed attention kernel and the gated
    feed-forward one wi_0/wi_1 matmul into the packed activation; loss and every gradient match the separate
    projections (same kernels on views), and a hook on a projection keeps it separate (the hook sees its call)."""
    if not (kernel_ops.kernel_available("attention") and kernel_ops.kernel_available("gated_activation")):
        pytest.skip("fat5_kernels has no attention or gated-activation kernel here")
    from fat5_hf import modeling_fat5

    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config(use_fused_cross_entropy=False)).train()
    input_ids, attention_mask = make_batch(96, [9, 6])
    labels = _labels(96, [5, 3], make_batch)
    packed_calls = []
    for name in ("_triton_t5_flash_attention_varlen_qkvpacked", "_triton_gated_activation_packed"):
        kernel = getattr(kernel_ops, name)
        monkeypatch.setattr(
            kernel_ops, name, lambda *a, _k=kernel, _n=name, **kw: packed_calls.append(_n) or _k(*a, **kw)
        )

    def loss_and_grads():
        model.zero_grad()
        with kernel_ops.kernels_on_cpu():
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed_loss, packed_grads = loss_and_grads()
    layers = model.config.num_layers + model.config.num_decoder_layers
    assert sorted(packed_calls) == ["_triton_gated_activation_packed"] * layers + [
        "_triton_t5_flash_attention_varlen_qkvpacked"  # the encoder rows are padded: varlen layout
    ] * layers
    packed_calls.clear()
    monkeypatch.setattr(modeling_fat5, "_fusable_projections", lambda *linears: False)
    separate_loss, separate_grads = loss_and_grads()
    assert packed_calls == []
    torch.testing.assert_close(packed_loss, separate_loss, rtol=1e-6, atol=1e-6)
    for name, grad in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)

    monkeypatch.undo()
    seen = []
    model.encoder.block[0].layer[0].SelfAttention.k.register_forward_hook(lambda m, i, o: seen.append("k"))
    model.decoder.block[1].layer[-1].DenseReluDense.wi_1.register_forward_hook(lambda m, i, o: seen.append("wi_1"))
    hooked_loss, _ = loss_and_grads()
    assert sorted(seen) == ["k", "wi_1"]
    torch.testing.assert_close(hooked_loss, separate_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused_loss", [True, False])
@pytest.mark.interpreter
def test_compiled_training_step_with_every_kernel_is_one_graph(tiny_fat5_config, make_batch, monkeypatch, fused_loss):
    """`torch.compile(model, fullgraph=True)` over every kernel (attention, norms, gated activation and either loss,
    each a custom op): one graph, no break, which CUDA-graph replays of a training step need. Loss and gradients
    are the eager kernels' (the graph runs the same ops)."""
    for name in ("attention", "rms_norm", "gated_activation", "cross_entropy", "fused_linear_cross_entropy"):
        if not kernel_ops.kernel_available(name):
            pytest.skip(f"fat5_kernels has no {name} kernel here")
    if not fused_loss:  # the LM head as nn.Linear, then the plain cross-entropy kernel
        monkeypatch.setattr(kernel_ops, "can_fuse_linear_cross_entropy", lambda *args: False)
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config(z_loss=1e-3, check_token_ids=False)).train()
    input_ids, attention_mask = make_batch(96, [9, 6])
    labels = _labels(96, [5, 3], make_batch)

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        with kernel_ops.kernels_on_cpu():
            out = forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            out.loss.backward()
        assert (out.logits is None) == fused_loss  # the fused LM head + loss, compiled or not
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    torch._dynamo.reset()
    got_loss, got_grads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    want_loss, want_grads = loss_and_grads(model)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("variant", ["t5", "t5_v1_1"])
def test_fresh_init_matches_t5_statistics_and_is_seeded(variant):
    # transformers 5 initializes "custom code" models leaf by leaf unless told otherwise: every parameter must get
    # T5's init (same std per tensor as HF T5) and two models built with one seed must be identical.
    layout = (
        dict(feed_forward_proj="relu")
        if variant == "t5"
        else dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    )
    fields = dict(vocab_size=500, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4, **layout)
    t5_config, fat5_config = T5Config(**fields), FAT5Config(**fields)
    torch.manual_seed(0)
    t5_params = dict(T5ForConditionalGeneration(t5_config).named_parameters())
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(FAT5ForConditionalGeneration(fat5_config))
    for name, param in models[0].named_parameters():
        expected = t5_params[name].std().item()
        assert abs(param.std().item() - expected) <= 0.15 * expected, name
        assert torch.equal(param, dict(models[1].named_parameters())[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_keeps_t5s_fp16_guard_only(t5_pair, tmp_path, dtype):
    # T5's fp16 guard: loaded in fp16, the feed-forward output projections `wo` stay fp32 (bf16-trained checkpoints
    # overflow fp16 there); loaded in bf16 (the training default) nothing is forced to fp32.
    from fat5_hf.convert import convert_t5_to_fat5

    t5, _ = t5_pair("t5_v1_1")
    t5.save_pretrained(tmp_path / "t5")
    convert_t5_to_fat5(tmp_path / "t5", tmp_path / "fat5")
    t5 = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype=dtype).eval()
    fat5 = FAT5ForConditionalGeneration.from_pretrained(tmp_path / "fat5", dtype=dtype).eval()
    t5_dtypes = {name: p.dtype for name, p in t5.named_parameters()}
    fat5_dtypes = {name: p.dtype for name, p in fat5.named_parameters()}
    assert fat5_dtypes == t5_dtypes
    fp32 = sorted(name for name, d in fat5_dtypes.items() if d == torch.float32)
    if dtype == torch.float16:
        assert fp32 and all(name.endswith("DenseReluDense.wo.weight") for name in fp32), fp32
        assert len(fp32) == 4  # 2 encoder + 2 decoder blocks
    else:
        assert fp32 == []
    input_ids = torch.tensor([[5, 9, 17, 33, 2, 1]])
    decoder_input_ids = torch.tensor([[0, 7, 11]])
    with torch.no_grad():
        expected = t5(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
        actual = fat5(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_t5_encoding_serves_lengths_past_max_distance(t5_pair):
    # Distances past relative_attention_max_distance (16 here) share the last bucket: no length limit, same as T5.
    t5, fat5 = t5_pair("t5", "eager")
    assert fat5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.max_positions is None
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 96, (1, 70), generator=gen)
    decoder_input_ids = torch.randint(2, 96, (1, 40), generator=gen)
    with torch.no_grad():
        expected = t5(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
        actual = fat5(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_input_longer_than_the_position_encoding_serves_raises(tiny_fat5_config):
    # An encoding with a finite range declares it as `max_positions` (T5's has none); the stacks enforce it.
    model = FAT5ForConditionalGeneration(tiny_fat5_config()).eval()
    model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.max_positions = 8
    model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.max_positions = 5
    with torch.no_grad():
        model(input_ids=torch.full((2, 8), 3), decoder_input_ids=torch.full((2, 5), 3))  # at the limit: fine
        with pytest.raises(ValueError, match=r"encoder input spans 9 positions .* serves at most 8.*max_length=8"):
            model(input_ids=torch.full((2, 9), 3), decoder_input_ids=torch.full((2, 5), 3))
        with pytest.raises(ValueError, match=r"decoder input spans 6 positions \(0 cached \+ 6 new\)"):
            model(input_ids=torch.full((2, 8), 3), decoder_input_ids=torch.full((2, 6), 3))
        # cached generation counts the cached positions: the 5 decoder positions of 5 new tokens fit, 6 do not
        assert model.generate(torch.full((1, 8), 3), max_new_tokens=5, min_new_tokens=5).shape == (1, 6)
        with pytest.raises(ValueError, match=r"decoder input spans 6 positions \(5 cached \+ 1 new\)"):
            model.generate(torch.full((1, 8), 3), max_new_tokens=6, min_new_tokens=6)
