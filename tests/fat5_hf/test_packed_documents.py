"""Packed rows of several documents (`encoder_segment_ids` / `decoder_segment_ids`, as `DataCollatorForUL2` emits
them): each document gets the logits it gets alone, on the PyTorch attention and on the kernels' varlen path."""

import contextlib

import pytest
import torch

from fat5_hf import FAT5EncoderModel, FAT5ForConditionalGeneration, FAT5Model, kernel_ops

# (input length, target length) of the documents of each row
ROWS = [[(5, 4), (7, 3)], [(9, 6)]]
ENC_LEN, DEC_LEN = 14, 8


def _documents(vocab_size: int):
    gen = torch.Generator().manual_seed(3)
    return [
        [(torch.randint(2, vocab_size, (n,), generator=gen), torch.randint(2, vocab_size, (m,), generator=gen))
         for n, m in row]
        for row in ROWS
    ]  # fmt: skip


def _packed_batch(documents):
    input_ids = torch.zeros(len(documents), ENC_LEN, dtype=torch.long)
    labels = torch.full((len(documents), DEC_LEN), -100, dtype=torch.long)
    encoder_segment_ids = torch.zeros_like(input_ids)
    decoder_segment_ids = torch.zeros_like(labels)
    for row, docs in enumerate(documents):
        enc = dec = 0
        for number, (inputs, targets) in enumerate(docs, start=1):
            input_ids[row, enc : enc + len(inputs)] = inputs
            encoder_segment_ids[row, enc : enc + len(inputs)] = number
            labels[row, dec : dec + len(targets)] = targets
            decoder_segment_ids[row, dec : dec + len(targets)] = number
            enc, dec = enc + len(inputs), dec + len(targets)
    return dict(
        input_ids=input_ids,
        attention_mask=(encoder_segment_ids > 0).long(),
        labels=labels,
        decoder_attention_mask=(decoder_segment_ids > 0).long(),
        encoder_segment_ids=encoder_segment_ids,
        decoder_segment_ids=decoder_segment_ids,
    )


@pytest.mark.parametrize("path", ["eager", "sdpa", pytest.param("kernels", marks=pytest.mark.interpreter)])
def test_each_document_gets_its_own_logits(tiny_fat5_config, path):
    if path == "kernels" and not kernel_ops.kernel_available("attention"):
        pytest.skip("fat5_kernels' attention kernel needs triton")
    torch.manual_seed(0)
    config = tiny_fat5_config(use_triton_attention=path == "kernels", attn_implementation="eager" if path == "eager" else "sdpa")
    model = FAT5ForConditionalGeneration(config).eval()
    documents = _documents(model.config.vocab_size)
    context = kernel_ops.kernels_on_cpu() if path == "kernels" else contextlib.nullcontext()
    with torch.no_grad(), context:
        packed = model(**_packed_batch(documents))
        for row, docs in enumerate(documents):
            start = 0
            for inputs, targets in docs:
                alone = model(input_ids=inputs[None], labels=targets[None]).logits[0]
                torch.testing.assert_close(packed.logits[row, start : start + len(targets)], alone, atol=1e-5, rtol=1e-4)
                start += len(targets)
    # without the segment ids the second document of row 0 sees the first one: the test can tell the difference
    batch = _packed_batch(documents)
    del batch["encoder_segment_ids"], batch["decoder_segment_ids"]
    with torch.no_grad():
        mixed = model(**batch).logits
    assert not torch.allclose(mixed[0, 4:7], packed.logits[0, 4:7], atol=1e-3)


def test_segment_ids_are_checked(tiny_fat5_config):
    model = FAT5ForConditionalGeneration(tiny_fat5_config()).eval()
    batch = _packed_batch(_documents(model.config.vocab_size))
    with pytest.raises(ValueError, match="encoder_segment_ids must be an integer tensor of shape"):
        model(**{**batch, "encoder_segment_ids": batch["encoder_segment_ids"][:, :5]})
    with pytest.raises(ValueError, match="decoder_segment_ids needs encoder_segment_ids"):
        model(**{key: value for key, value in batch.items() if key != "encoder_segment_ids"})


@pytest.mark.interpreter
def test_kernel_path_refuses_documents_without_a_partner(tiny_fat5_config):
    # The varlen cross-attention pairs the i-th target document with the i-th input document.
    if not kernel_ops.kernel_available("attention"):
        pytest.skip("fat5_kernels' attention kernel needs triton")
    model = FAT5ForConditionalGeneration(tiny_fat5_config(use_triton_attention=True)).eval()
    batch = _packed_batch(_documents(model.config.vocab_size))
    batch["decoder_segment_ids"][1, :6] = 2  # row 1: a target document 2 that has no input document
    with kernel_ops.kernels_on_cpu(), pytest.raises(ValueError, match="must number the same documents"):
        model(**batch)


@pytest.mark.interpreter
def test_kernel_path_runs_the_varlen_kernel(tiny_fat5_config, monkeypatch):
    if not kernel_ops.kernel_available("attention"):
        pytest.skip("fat5_kernels' attention kernel needs triton")
    calls = []
    for name in ("_triton_t5_flash_attention_varlen", "_triton_t5_flash_attention_varlen_qkvpacked"):
        kernel = getattr(kernel_ops, name)
        monkeypatch.setattr(kernel_ops, name, lambda *a, _k=kernel, _n=name, **kw: calls.append((_n, kw)) or _k(*a, **kw))
    model = FAT5ForConditionalGeneration(tiny_fat5_config(use_triton_attention=True)).eval()
    with torch.no_grad(), kernel_ops.kernels_on_cpu():
        model(**_packed_batch(_documents(model.config.vocab_size)))
    # encoder and decoder self-attention on packed q/k/v, cross-attention (no bias) on separate ones
    self_calls = [kw for name, kw in calls if name.endswith("qkvpacked")]
    cross_calls = [kw for name, kw in calls if not name.endswith("qkvpacked")]
    assert len(self_calls) == model.config.num_layers + model.config.num_decoder_layers
    assert len(cross_calls) == model.config.num_decoder_layers
    assert all(kw["bias_table"] is None for kw in cross_calls)
    assert all(kw["bias_table"] is not None for kw in self_calls)


@pytest.mark.parametrize("model_class", [FAT5EncoderModel, FAT5Model])
def test_encoder_and_bare_model_take_segment_ids(tiny_fat5_config, model_class):
    torch.manual_seed(0)
    model = model_class(tiny_fat5_config(attn_implementation="eager")).eval()
    documents = _documents(model.config.vocab_size)
    batch = _packed_batch(documents)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  encoder_segment_ids=batch["encoder_segment_ids"])  # fmt: skip
    if model_class is FAT5Model:
        shifted = model._shift_right(batch["labels"].clamp(min=0))
        inputs.update(decoder_input_ids=shifted, decoder_segment_ids=batch["decoder_segment_ids"])
    with torch.no_grad():
        packed = model(**inputs)
        start = 0
        for inputs_alone, _ in documents[0]:
            alone = model(input_ids=inputs_alone[None], **({} if model_class is FAT5EncoderModel else
                                                         {"decoder_input_ids": shifted[:1, :1]}))  # fmt: skip
            states = packed.last_hidden_state if model_class is FAT5EncoderModel else packed.encoder_last_hidden_state
            want = alone.last_hidden_state if model_class is FAT5EncoderModel else alone.encoder_last_hidden_state
            torch.testing.assert_close(states[0, start : start + len(inputs_alone)], want[0], atol=1e-5, rtol=1e-4)
            start += len(inputs_alone)


@pytest.mark.interpreter
def test_kernel_path_gradients_match_the_pytorch_path(tiny_fat5_config):
    # Training runs through the varlen kernel's backward and the gather / scatter around it.
    if not kernel_ops.kernel_available("attention"):
        pytest.skip("fat5_kernels' attention kernel needs triton")
    torch.manual_seed(0)
    reference = FAT5ForConditionalGeneration(tiny_fat5_config(attn_implementation="eager"))
    kernel_model = FAT5ForConditionalGeneration(tiny_fat5_config(use_triton_attention=True))
    kernel_model.load_state_dict(reference.state_dict())
    batch = _packed_batch(_documents(reference.config.vocab_size))
    reference(**batch).loss.backward()
    with kernel_ops.kernels_on_cpu():
        kernel_model(**batch).loss.backward()
    for (name, want), got in zip(reference.named_parameters(), kernel_model.parameters()):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
