"""`fat5_hf.apply_fat5_kernels` on stock transformers T5-family models.

Each patched module is compared with the stock one: exactly on the PyTorch path (CPU tensors), and within fp32 kernel
tolerance (the kernels' exp2 softmax and fused reductions are not bit-identical) under the Triton interpreter."""

import copy
import json
import logging

import pytest
import torch
from transformers import (
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
    UMT5Config,
    UMT5ForConditionalGeneration,
)
from transformers.models.t5 import modeling_t5

from fat5_hf import apply_fat5_kernels, kernel_ops
from fat5_hf.monkey_patch import FAT5PatchReport

# A tiny T5 v1.1 / original T5 / mT5 layout (as tests/fat5_hf/conftest.py's), random weights.
TINY = dict(
    vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0,
)  # fmt: skip
T5_VARIANTS = {
    "t5": dict(feed_forward_proj="relu"),
    "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=12, num_heads=3),
}

KERNELS = ("attention", "rms_norm", "gated_activation", "cross_entropy", "fused_linear_cross_entropy")
needs_kernels = pytest.mark.skipif(
    not all(kernel_ops.kernel_available(k) for k in KERNELS),
    reason="needs triton and fat5_kernels",
)


def _t5(variant="t5_v1_1", cls=T5ForConditionalGeneration, config_cls=T5Config, seed=0, **overrides):
    torch.manual_seed(seed)
    model = cls(config_cls(**{**TINY, **T5_VARIANTS[variant], **overrides}))
    if hasattr(model, "lm_head") and not model.config.tie_word_embeddings:
        model.lm_head.weight.data.normal_(0, model.config.d_model**-0.5)
    return model


@pytest.fixture
def t5_batch(make_batch):
    """``t5_batch(encoder_lengths, decoder_lengths, left)``: padded ids (vocabulary 96) and labels, -100 at padding."""

    def build(encoder_lengths=(9, 5, 7), decoder_lengths=(4, 6, 2), left=False):
        input_ids, attention_mask = make_batch(96, list(encoder_lengths), seed=1, left=left)
        targets, target_mask = make_batch(96, list(decoder_lengths), seed=5)
        labels = targets.masked_fill(target_mask == 0, -100)
        return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    return build


def _assert_close_to_scale(actual, expected, rtol=1e-4, msg=None):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=1e-5 * max(scale, 1e-3), rtol=rtol, msg=msg)


def _count_calls(monkeypatch, kernel_name: str) -> list:
    """Record each call of `kernel_ops.<kernel_name>` (a list of 1s) while the test runs."""
    calls, kernel = [], getattr(kernel_ops, kernel_name)
    monkeypatch.setattr(kernel_ops, kernel_name, lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    return calls


def _loss_and_grads(model, batch, kernels: bool):
    model.zero_grad(set_to_none=True)
    context = kernel_ops.kernels_on_cpu() if kernels else torch.enable_grad()
    with context:
        out = model(**batch)
        out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------------------------
# Per-module equivalence
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=[pytest.mark.interpreter, needs_kernels])])
def test_patched_layer_norm_matches_t5_layer_norm(kernels):
    torch.manual_seed(0)
    stock = modeling_t5.T5LayerNorm(48, eps=1e-6)
    stock.weight.data.uniform_(0.5, 1.5)
    patched = copy.deepcopy(stock)
    from fat5_hf.monkey_patch import _patch_module

    _patch_module(patched, "rms_norm", "LayerNorm")
    x = torch.randn(3, 5, 48, requires_grad=True)
    expected = stock(x)
    with kernel_ops.kernels_on_cpu() if kernels else torch.enable_grad():
        actual = patched(x)
    if kernels:
        _assert_close_to_scale(actual, expected)
    else:
        assert torch.equal(actual, expected)
    assert "T5LayerNorm[fat5]" in repr(patched)


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=[pytest.mark.interpreter, needs_kernels])])
@pytest.mark.parametrize("activation", ["gated-gelu", "gated-silu"])
def test_patched_gated_mlp_matches_t5(kernels, activation):
    from fat5_hf.monkey_patch import _patch_module

    torch.manual_seed(0)
    stock = modeling_t5.T5DenseGatedActDense(T5Config(**{**TINY, "feed_forward_proj": activation})).eval()
    patched = copy.deepcopy(stock)
    _patch_module(patched, "gated_mlp", "DenseGatedActDense")
    x = torch.randn(2, 7, TINY["d_model"])
    with torch.no_grad():
        expected = stock(x)
        with kernel_ops.kernels_on_cpu() if kernels else torch.no_grad():
            actual = patched(x)
    _assert_close_to_scale(actual, expected, rtol=1e-5)


@pytest.mark.interpreter
@needs_kernels
def test_patched_loss_matches_t5_loss(t5_batch):
    stock = _t5()
    patched = copy.deepcopy(stock)
    report = apply_fat5_kernels(
        patched, rms_norm=False, gated_mlp=False, attention=False, cross_entropy=True, fused_linear_cross_entropy=False
    )
    assert report.patched == {"cross_entropy": 1}
    batch = t5_batch()
    with kernel_ops.kernels_on_cpu():
        actual = patched(**batch)
        as_tuple = patched(**batch, return_dict=False)
    expected = stock(**batch)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(actual.logits, expected.logits)
    torch.testing.assert_close(as_tuple[0], expected.loss, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Fused LM head + loss
# ----------------------------------------------------------------------------------------------------------------
def _lm_model(family):
    """A tiny gated model of `family`; "t5_untied" is T5 v1.1's layout with an `lm_head` of its own (what loading
    a v1.1 checkpoint gives) and no decoder-output rescale, "t5_tied" the original T5's rescale and shared head."""
    if family == "mt5":
        return _t5("mt5", cls=MT5ForConditionalGeneration, config_cls=MT5Config)
    if family == "umt5":
        return _t5("t5_v1_1", cls=UMT5ForConditionalGeneration, config_cls=UMT5Config, tie_word_embeddings=True)
    model = _t5("t5_v1_1", tie_word_embeddings=family == "t5_tied")
    if family == "t5_untied":
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * TINY["d_model"] ** -0.5)
    return model


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("family", ["t5_tied", "t5_untied", "mt5", "umt5"])
def test_fused_loss_and_every_gradient_match_stock(family, t5_batch, monkeypatch):
    """In training with labels, the patched model's loss and the gradient of every parameter (the head's, the
    embeddings', the stacks') equal the stock model's, with rows of ignored labels, and the logits are never
    computed: one fused kernel call, no LM head forward."""
    stock = _lm_model(family).train()
    if family == "t5_tied":
        assert stock.config.scale_decoder_outputs and stock.lm_head.weight is stock.shared.weight
    if family == "t5_untied":
        assert not stock.config.scale_decoder_outputs and stock.lm_head.weight is not stock.shared.weight
    patched = copy.deepcopy(stock)
    report = apply_fat5_kernels(patched, rms_norm=False, gated_mlp=False, attention=False)
    assert report.patched == {"fused_linear_cross_entropy": 1}
    assert "cross_entropy" not in report.not_patched
    fused_calls = _count_calls(monkeypatch, "_triton_fused_linear_cross_entropy")
    ce_calls = _count_calls(monkeypatch, "_triton_cross_entropy")
    head_calls = []
    patched.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    batch = t5_batch()
    batch["labels"][1] = -100  # a whole row ignored, on top of the padding
    expected, expected_grads = _loss_and_grads(stock, batch, kernels=False)
    actual, actual_grads = _loss_and_grads(patched, batch, kernels=True)
    assert (fused_calls, ce_calls, head_calls) == ([1], [], [])
    assert actual.logits is None and expected.logits is not None
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        _assert_close_to_scale(actual_grads[name], grad, msg=name)


@pytest.mark.interpreter
@needs_kernels
def test_fused_loss_keeps_transformers_forward_where_logits_are_needed(t5_batch, monkeypatch):
    """Eval mode, training without labels, a head the kernel cannot take (not a plain `nn.Linear`) and the PyTorch
    path (CPU tensors outside `kernels_on_cpu`) run transformers' forward: logits and loss as stock."""
    stock = _lm_model("t5_tied")
    patched = copy.deepcopy(stock)
    apply_fat5_kernels(patched, rms_norm=False, gated_mlp=False, attention=False)
    fused_calls = _count_calls(monkeypatch, "_triton_fused_linear_cross_entropy")
    batch = t5_batch()
    for training in (False, True):
        stock.train(training)
        patched.train(training)
        inputs = batch if not training else {k: v for k, v in batch.items() if k != "labels"}
        inputs = {**inputs, "decoder_input_ids": stock._shift_right(batch["labels"])}
        expected = stock(**inputs)
        with kernel_ops.kernels_on_cpu():
            actual = patched(**inputs)
        assert torch.equal(actual.logits, expected.logits)
        if not training:
            assert torch.equal(actual.loss, expected.loss)
    patched.train()
    assert torch.equal(patched(**batch).logits, stock.train()(**batch).logits)  # PyTorch path

    class WrappedHead(torch.nn.Linear):  # as an adapter-wrapped head: not `nn.Linear` itself
        pass

    head = WrappedHead(TINY["d_model"], TINY["vocab_size"], bias=False)
    head.weight = patched.lm_head.weight
    patched.lm_head = head
    with kernel_ops.kernels_on_cpu():
        assert patched(**batch).logits is not None
    assert fused_calls == []
    report = apply_fat5_kernels(copy.deepcopy(patched))
    assert "not a plain bias-free nn.Linear" in report.not_patched["fused_linear_cross_entropy"]


@pytest.mark.interpreter
@needs_kernels
def test_fused_loss_takes_transformers_call_forms(t5_batch):
    """`return_dict=False`, positional arguments, precomputed `encoder_outputs` (a tuple) and explicit
    `decoder_input_ids`: the same loss as the stock model, through the fused kernel."""
    stock = _lm_model("t5_tied").train()
    patched = copy.deepcopy(stock)
    apply_fat5_kernels(patched, rms_norm=False, gated_mlp=False, attention=False)
    batch = t5_batch()
    expected = stock(**batch)
    encoder_outputs = (stock.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0],)
    decoder_input_ids = stock._shift_right(batch["labels"])
    with kernel_ops.kernels_on_cpu():
        as_tuple = patched(**batch, return_dict=False)
        positional = patched(batch["input_ids"], batch["attention_mask"], decoder_input_ids, labels=batch["labels"])
        precomputed = patched(
            attention_mask=batch["attention_mask"], encoder_outputs=encoder_outputs, labels=batch["labels"]
        )
    assert isinstance(as_tuple, tuple)
    for loss in (as_tuple[0], positional.loss, precomputed.loss):
        torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=1e-6)
    assert positional.logits is None and precomputed.logits is None


@pytest.mark.interpreter
@needs_kernels
def test_fused_loss_under_peft_lora(t5_batch, monkeypatch):
    """A LoRA-wrapped model (peft, q and v) patched through its wrapper trains on the fused loss: the head stays a
    plain `nn.Linear`, frozen (no weight gradient asked of the kernel); the adapters get the stock gradients."""
    peft = pytest.importorskip("peft")
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    stock = _lm_model("t5_tied").train()
    stock_lora = peft.get_peft_model(stock, lora_config)
    patched_lora = copy.deepcopy(stock_lora)
    for model in (stock_lora, patched_lora):  # B = 0 at init: give the adapters a gradient path through A too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(0))
    report = apply_fat5_kernels(patched_lora, rms_norm=False, gated_mlp=False, attention=False)
    assert report.patched == {"fused_linear_cross_entropy": 1}
    fused_calls = _count_calls(monkeypatch, "_triton_fused_linear_cross_entropy")
    batch = t5_batch()
    expected, expected_grads = _loss_and_grads(stock_lora, batch, kernels=False)
    actual, actual_grads = _loss_and_grads(patched_lora, batch, kernels=True)
    assert fused_calls == [1] and actual.logits is None
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-6, atol=1e-6)
    assert actual_grads.keys() == expected_grads.keys() and all("lora_" in name for name in actual_grads)
    for name, grad in expected_grads.items():
        _assert_close_to_scale(actual_grads[name], grad, msg=name)


@pytest.mark.interpreter
@needs_kernels
def test_fused_loss_of_only_ignored_labels_is_zero(t5_batch):
    # The stock loss is NaN there (0 / 0); the kernel's is 0 with zero gradients, as FAT5's model.
    patched = _lm_model("t5_tied").train()
    apply_fat5_kernels(patched, rms_norm=False, gated_mlp=False, attention=False)
    batch = t5_batch()
    batch["labels"].fill_(-100)
    batch["decoder_input_ids"] = torch.zeros_like(batch["labels"])
    out, grads = _loss_and_grads(patched, batch, kernels=True)
    assert out.loss.item() == 0.0
    assert all(not grad.any() for grad in grads.values())


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("fused", [True, False])
def test_patched_loss_names_a_bad_label(t5_batch, fused):
    patched = _lm_model("t5_tied").train()
    apply_fat5_kernels(
        patched, rms_norm=False, gated_mlp=False, attention=False, cross_entropy=not fused,
        fused_linear_cross_entropy=fused,
    )  # fmt: skip
    batch = t5_batch()
    batch["labels"][0, 0] = TINY["vocab_size"]
    with kernel_ops.kernels_on_cpu(), pytest.raises(ValueError, match=r"`labels` holds ids in \[\d+, 96\]"):
        patched(**batch)


@pytest.mark.slow
@pytest.mark.interpreter
@needs_kernels
def test_compiled_patched_training_step_is_one_graph_with_the_fused_loss(t5_batch):
    """`torch.compile(fullgraph=True)` of the fully patched model in training (what `Trainer(torch_compile=True)`
    does): no graph break (the label check is skipped there), no logits, and the eager step's loss and gradients."""
    model = _lm_model("t5_tied").train()
    apply_fat5_kernels(model)
    batch = t5_batch()
    torch._dynamo.reset()
    compiled, compiled_grads = _loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), batch, True)
    compiled_grads = {name.removeprefix("_orig_mod."): grad for name, grad in compiled_grads.items()}
    eager, eager_grads = _loss_and_grads(model, batch, kernels=True)
    assert compiled.logits is None and eager.logits is None
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-6, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        _assert_close_to_scale(compiled_grads[name], grad, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("left", [False, True])
def test_patched_t5_trains_like_stock_on_padded_batches(left, monkeypatch, t5_batch):
    """Loss, encoder states at the real tokens and every gradient of a padded batch (right or left padding) match
    the stock model; the attention runs unpadded on the varlen kernels, the feed-forward sees only real tokens and
    the LM head and loss are the fused kernel (no logits)."""
    stock = _t5().train()
    patched = copy.deepcopy(stock)
    report = apply_fat5_kernels(patched)
    # per stack: a norm per sublayer and a final one; the attention modules and the two stacks
    assert report.patched == {
        "rms_norm": 2 * 2 + 1 + 2 * 3 + 1,
        "gated_mlp": 4,
        "attention": 6 + 2,
        "attention (cached steps)": 1,  # the decoder stack
        "fused_linear_cross_entropy": 1,
    }
    assert report.not_patched == {}
    varlen_calls = []
    for name in ("_triton_t5_flash_attention_varlen", "_triton_t5_flash_attention_varlen_qkvpacked"):
        kernel = getattr(kernel_ops, name)
        monkeypatch.setattr(kernel_ops, name, lambda *a, _k=kernel, **kw: varlen_calls.append(1) or _k(*a, **kw))
    ff_tokens = []
    patched.encoder.block[1].layer[-1].DenseReluDense.wo.register_forward_hook(
        lambda m, i, o: ff_tokens.append(i[0].shape[:-1])
    )
    batch = t5_batch(left=left)
    expected, expected_grads = _loss_and_grads(stock, batch, kernels=False)
    actual, actual_grads = _loss_and_grads(patched, batch, kernels=True)
    assert len(varlen_calls) == 2 + 2 * 2  # encoder self, decoder self and cross
    assert ff_tokens == [(1, 9 + 5 + 7)]  # packed real tokens only
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert actual.logits is None
    real = batch["attention_mask"].bool()
    _assert_close_to_scale(actual.encoder_last_hidden_state[real], expected.encoder_last_hidden_state[real])
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(actual_grads[name], grad, atol=1e-4 * scale, rtol=1e-3, msg=name)


@pytest.mark.slow
@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize(
    "cls, config_cls, variant",
    [(T5EncoderModel, T5Config, "t5_v1_1"), (MT5ForConditionalGeneration, MT5Config, "mt5")],
)
def test_patched_encoder_model_and_mt5_match_stock(cls, config_cls, variant, t5_batch):
    stock = _t5(variant, cls=cls, config_cls=config_cls).eval()
    patched = copy.deepcopy(stock)
    report = apply_fat5_kernels(patched)
    assert report.patched["attention"] > 0 and report.patched["rms_norm"] > 0
    batch = t5_batch()
    if cls is T5EncoderModel:
        batch.pop("labels")
    with torch.no_grad():
        expected = stock(**batch)
        with kernel_ops.kernels_on_cpu():
            actual = patched(**batch)
    if cls is T5EncoderModel:
        real = batch["attention_mask"].bool()
        _assert_close_to_scale(actual.last_hidden_state[real], expected.last_hidden_state[real])
    else:
        torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("num_beams", [1, 2])
def test_patched_t5_generates_what_stock_generates(num_beams, t5_batch):
    stock = _t5().eval()
    patched = copy.deepcopy(stock)
    apply_fat5_kernels(patched)
    batch = t5_batch()
    batch.pop("labels")
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False)
    expected = stock.generate(**batch, **kwargs)
    with kernel_ops.kernels_on_cpu():
        actual = patched.generate(**batch, **kwargs)
    assert torch.equal(actual, expected)


def test_patched_model_saves_as_the_original_class(tmp_path, t5_batch):
    stock = _t5()
    patched = copy.deepcopy(stock)
    apply_fat5_kernels(patched)
    assert type(patched) is T5ForConditionalGeneration
    assert patched.state_dict().keys() == stock.state_dict().keys()
    patched.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["T5ForConditionalGeneration"]
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    for name, tensor in stock.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    # the CPU path of the patched model is transformers' maths
    batch = t5_batch()
    torch.testing.assert_close(patched(**batch).loss, stock(**batch).loss, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.interpreter
@needs_kernels
def test_patched_t5_trains_with_trainer(tmp_path, t5_batch, monkeypatch):
    fused_calls = _count_calls(monkeypatch, "_triton_fused_linear_cross_entropy")
    model = _t5()
    apply_fat5_kernels(model)
    batches = [t5_batch() for _ in range(2)]
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(3)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, use_cpu=True, report_to=[],
        learning_rate=1e-3, logging_steps=1, save_strategy="no",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with kernel_ops.kernels_on_cpu():
        result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert fused_calls == [1, 1]  # each step's loss on the fused LM head + loss kernel
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------------------------------------------
# Reports and errors
# ----------------------------------------------------------------------------------------------------------------
@needs_kernels
def test_report_names_what_was_not_patched(caplog):
    relu_t5 = _t5("t5", dropout_rate=0.1)
    with caplog.at_level(logging.WARNING):
        report = apply_fat5_kernels(relu_t5, fused_linear_cross_entropy=False)
    assert isinstance(report, FAT5PatchReport)
    assert "not gated" in report.not_patched["gated_mlp"]
    assert "dropout 0.1" in report.not_patched["attention (training)"]
    assert report.not_patched["cross_entropy"] == "switched off by the caller"
    assert report.not_patched["fused_linear_cross_entropy"] == "switched off by the caller"
    assert "gated_mlp not patched" in caplog.text

    umt5 = _t5("t5_v1_1", cls=UMT5ForConditionalGeneration, config_cls=UMT5Config)
    report = apply_fat5_kernels(umt5)
    assert "own relative bias" in report.not_patched["attention"]
    assert report.patched["rms_norm"] > 0 and report.patched["gated_mlp"] > 0


def test_bad_models_and_options_raise():
    from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

    with pytest.raises(TypeError, match="model_type"):
        apply_fat5_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="runs on the kernels already"):
        apply_fat5_kernels(FAT5ForConditionalGeneration(FAT5Config(**TINY)))
    with pytest.raises(TypeError, match="`attention` must be True or False"):
        apply_fat5_kernels(_t5(), attention="yes")
    with pytest.raises(ValueError, match="either cross_entropy=True or fused_linear_cross_entropy=True"):
        apply_fat5_kernels(_t5(), cross_entropy=True)


@needs_kernels
def test_class_patch_reaches_models_built_later():
    t5_forward = modeling_t5.T5LayerNorm.forward
    try:
        report = apply_fat5_kernels()
        assert report.patched["attention"] == 2 * 2  # T5/MT5 Attention and Stack classes
        assert report.patched["attention (cached steps)"] == 2  # T5/MT5 Stack classes
        assert report.patched["fused_linear_cross_entropy"] == 3  # T5, MT5, UMT5ForConditionalGeneration
        model = _t5()
        assert hasattr(type(model.encoder.final_layer_norm).forward, "_fat5_original")
        # patching again, or patching the instance, changes nothing
        apply_fat5_kernels(model)
        assert "forward" not in vars(model.encoder.final_layer_norm)
    finally:
        from transformers.models.mt5 import modeling_mt5
        from transformers.models.umt5 import modeling_umt5

        from fat5_hf.monkey_patch import _unpatched

        for module in (modeling_t5, modeling_mt5, modeling_umt5):
            for value in vars(module).values():
                if isinstance(value, type) and hasattr(value.__dict__.get("forward"), "_fat5_original"):
                    value.forward = _unpatched(value.forward)
                if isinstance(value, type) and "create_masks_for_generate" in value.__dict__:
                    del value.create_masks_for_generate  # the generation mask hook
    assert modeling_t5.T5LayerNorm.forward is t5_forward


def test_without_triton_nothing_is_patched_and_the_report_says_why(monkeypatch, caplog):
    monkeypatch.setattr(kernel_ops, "kernel_available", lambda name: False)
    model = _t5()
    with caplog.at_level(logging.WARNING):
        report = apply_fat5_kernels(model)
    assert report.patched == {}
    # the loss left off by default (cross_entropy, the fused loss's alternative) is not listed
    assert set(report.not_patched) == {"rms_norm", "gated_mlp", "attention", "fused_linear_cross_entropy"}
    assert "not importable" in caplog.text
    assert not any("forward" in vars(module) for module in model.modules())
