"""`generate()` on stock T5 / mT5 after `fat5_hf.apply_fat5_kernels`, with the decoder's cached steps on the attention
kernel (Triton interpreter, fp32): self-attention over a DynamicCache or a StaticCache (the static cache's length read
on the device) and cross-attention over the cached encoder keys give the stock model's tokens, the steps really run
the kernel, and `attention_with_cache=False` keeps them on transformers' attention."""

import copy

import pytest
import torch
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    MT5Config,
    MT5ForConditionalGeneration,
    StaticCache,
    T5Config,
    T5ForConditionalGeneration,
    UMT5Config,
    UMT5ForConditionalGeneration,
)

from fat5_hf import apply_fat5_kernels, kernel_ops

if not kernel_ops.kernel_available("attention"):
    pytest.skip("needs triton and fat5_kernels", allow_module_level=True)

# As tests/fat5_hf/test_monkey_patch.py's tiny models; mT5 with 3 heads of 12.
TINY = dict(
    vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)  # fmt: skip
FAMILIES = {
    "t5": (T5ForConditionalGeneration, T5Config, {}),
    "mt5": (MT5ForConditionalGeneration, MT5Config, dict(d_kv=12, num_heads=3)),
    "umt5": (UMT5ForConditionalGeneration, UMT5Config, {}),
}
NEW_TOKENS = 4


def _stock_and_patched(family="t5", **options):
    cls, config_cls, overrides = FAMILIES[family]
    torch.manual_seed(0)
    stock = cls(config_cls(**{**TINY, **overrides})).eval()
    stock.lm_head.weight.data.normal_(0, TINY["d_model"] ** -0.5)
    patched = copy.deepcopy(stock)
    return stock, patched, apply_fat5_kernels(patched, **options)


def _generate(model, input_ids, attention_mask, **kwargs):
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, **kwargs,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_greedy_and_beam_search_decode_on_the_kernel_with_stock_tokens(
    family, cache_implementation, make_batch, decode_calls
):
    stock, patched, report = _stock_and_patched(family)
    assert report.patched["attention (cached steps)"] == 1  # the decoder stack
    input_ids, attention_mask = make_batch(96, [7, 4])
    layers = stock.config.num_decoder_layers
    for num_beams in (1, 2):
        kwargs = dict(num_beams=num_beams, cache_implementation=cache_implementation)
        expected = _generate(stock, input_ids, attention_mask, **kwargs)
        decode_calls.clear()
        with kernel_ops.kernels_on_cpu():
            tokens = _generate(patched, input_ids, attention_mask, **kwargs)
        assert torch.equal(tokens, expected), kwargs
        # every step: each decoder layer's self-attention (with the T5 table; a static cache's offset) and its
        # cross-attention over the encoder's cached keys, on the kernel
        static = cache_implementation == "static"
        assert sorted(decode_calls) == sorted(
            [(static, True)] * NEW_TOKENS * layers + [(False, False)] * NEW_TOKENS * layers
        )


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_chunked_cached_forwards_with_a_decoder_mask_match_stock(make_batch, monkeypatch, static):
    """Several new tokens a step after a cached prefix, with a 2D decoder mask over the tokens so far (a padded row),
    through the model's forward: the logits of the stock model within fp32 kernel tolerance."""
    stock, patched, _ = _stock_and_patched()
    self_attention_offsets = []  # the decoder's self-attention calls into the kernel: static-cache offset given?
    original = kernel_ops.flash_attention

    def recording(query, key, value, mask, *args, **kwargs):
        if mask.causal:
            self_attention_offsets.append(kwargs.get("query_offset") is not None)
        return original(query, key, value, mask, *args, **kwargs)

    monkeypatch.setattr(kernel_ops, "flash_attention", recording)
    config = stock.config
    input_ids, attention_mask = make_batch(96, [7, 5])
    decoder_input_ids, _ = make_batch(96, [9, 9], seed=4)
    decoder_mask = torch.ones_like(decoder_input_ids)
    decoder_mask[1, 2] = 0

    def chunks(model):
        self_cache = StaticCache(config=config, max_cache_len=16) if static else DynamicCache(config=config)
        cache = EncoderDecoderCache(self_cache, DynamicCache(config=config))
        logits = []
        for start, end in ((0, 3), (3, 4), (4, 9)):
            mask = decoder_mask[:, :end]
            if static:  # the stock model takes a static cache's mask over its slots, as generate() builds it
                mask = torch.nn.functional.pad(mask, (0, 16 - end))
            out = model(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids[:, start:end],
                decoder_attention_mask=mask, cache=cache, use_cache=True,
            )  # fmt: skip
            assert out.cache is cache
            logits.append(out.logits)
        return torch.cat(logits, dim=1)

    with torch.no_grad():
        expected = chunks(stock)
        with kernel_ops.kernels_on_cpu():
            logits = chunks(patched)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert self_attention_offsets == [static] * 3 * config.num_decoder_layers  # each chunk, each layer


@pytest.mark.slow
@pytest.mark.interpreter
def test_compiled_static_step_on_the_kernel_is_one_graph(make_batch, decode_launches):
    """transformers' compiled decoding step (`cache_implementation="static"`) on the patched model: one graph for every
    step, each step running the kernel with the static cache's length as the offset, and the stock tokens."""
    from test_static_cache_generation import _compiled_graphs_and_tokens

    stock, patched, _ = _stock_and_patched()
    input_ids, attention_mask = make_batch(96, [9, 6])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    expected = stock.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with kernel_ops.kernels_on_cpu():
        graphs, tokens = _compiled_graphs_and_tokens(patched, batch, 5)
    assert torch.equal(tokens, expected)
    assert graphs == 1
    layers = stock.config.num_decoder_layers
    # each layer's self-attention at each position (the first step included), and its cross-attention
    assert sorted(decode_launches, key=str) == sorted(list(range(5)) * layers + [None] * 5 * layers, key=str)


@pytest.mark.slow
@pytest.mark.interpreter
def test_switch_off_keeps_cached_steps_on_transformers_attention(make_batch, decode_calls):
    stock, patched, report = _stock_and_patched(attention_with_cache=False)
    assert report.not_patched["attention (cached steps)"] == "switched off by the caller"
    assert "attention (cached steps)" not in report.patched
    input_ids, attention_mask = make_batch(96, [6, 3])
    for cache_implementation in (None, "static"):
        expected = _generate(stock, input_ids, attention_mask, cache_implementation=cache_implementation)
        with kernel_ops.kernels_on_cpu():
            tokens = _generate(patched, input_ids, attention_mask, cache_implementation=cache_implementation)
        assert torch.equal(tokens, expected), cache_implementation
    assert decode_calls == []
    # patching again turns them on
    report = apply_fat5_kernels(patched)
    assert report.patched["attention (cached steps)"] == 1
    with kernel_ops.kernels_on_cpu():
        _generate(patched, input_ids, attention_mask)
    assert len(decode_calls) == 2 * NEW_TOKENS * stock.config.num_decoder_layers


@pytest.mark.interpreter
def test_umt5_reports_its_attention_and_generates_on_transformers_attention(make_batch, decode_calls):
    stock, patched, report = _stock_and_patched("umt5")
    assert "own relative bias" in report.not_patched["attention"]
    assert "attention (cached steps)" not in report.patched
    assert not hasattr(patched, "create_masks_for_generate")
    input_ids, attention_mask = make_batch(96, [6, 3])
    expected = _generate(stock, input_ids, attention_mask)
    with kernel_ops.kernels_on_cpu():
        assert torch.equal(_generate(patched, input_ids, attention_mask), expected)
    assert decode_calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_gpu_patched_generation_on_the_kernel_matches_stock(family, cache_implementation, make_batch, decode_launches):
    """The compiled kernels on CUDA (fp32: the stock tokens), with transformers' own compiled step (inductor) for the
    static cache."""
    stock, patched, _ = _stock_and_patched(family)
    stock, patched = stock.cuda(), patched.cuda()
    input_ids, attention_mask = (t.cuda() for t in make_batch(96, [37, 20, 9]))
    for num_beams in (1, 3):
        expected = _generate(stock, input_ids, attention_mask, num_beams=num_beams)
        decode_launches.clear()
        kwargs = dict(num_beams=num_beams, cache_implementation=cache_implementation)
        assert torch.equal(_generate(patched, input_ids, attention_mask, **kwargs), expected), kwargs
        assert len(decode_launches) == 2 * NEW_TOKENS * stock.config.num_decoder_layers  # self- and cross-attention
