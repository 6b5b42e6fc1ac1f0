"""`generate()` with the cached steps on the attention kernel (Triton interpreter, fp32): the decoder's self-attention
over a DynamicCache or a StaticCache (the new positions' bias in-kernel, a static cache's length read on the device)
and cross-attention over the cached encoder keys give the tokens of the PyTorch path and of HF T5, and the steps
really run the kernel."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from fat5_hf import FAT5ForConditionalGeneration, kernel_ops

if not kernel_ops.kernel_available("attention"):
    pytest.skip("needs triton and fat5_kernels", allow_module_level=True)


NEW_TOKENS = 4


def _generate(model, input_ids, attention_mask, **kwargs):
    torch.manual_seed(123)  # sampling: the same draws on every path
    kwargs = {"do_sample": False, **kwargs}
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs
    )


def test_caches_the_kernel_reads(tiny_fat5_config):
    config = tiny_fat5_config()
    dynamic = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    static = EncoderDecoderCache(StaticCache(config=config, max_cache_len=8), DynamicCache())
    assert kernel_ops.kernel_can_read_cache(dynamic) and kernel_ops.kernel_can_read_cache(DynamicCache())
    with torch.no_grad():
        assert kernel_ops.kernel_can_read_cache(static)
    assert not kernel_ops.kernel_can_read_cache(static)  # the offset kernel has no backward
    assert not kernel_ops.kernel_can_read_cache(Cache(layers=[DynamicSlidingWindowLayer(sliding_window=4)]))
    assert not kernel_ops.kernel_can_read_cache(((torch.zeros(1), torch.zeros(1)),))  # a legacy tuple


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_beam_and_sampling_on_the_kernel_match_t5(t5_pair, make_batch, decode_calls, cache_implementation):
    t5, fat5 = t5_pair("t5_v1_1")
    input_ids, attention_mask = make_batch(96, [7, 4])
    searches = [dict(num_beams=1), dict(num_beams=2)]
    if cache_implementation is None:  # sampling draws from the same logits whatever the cache
        searches.append(dict(do_sample=True, top_k=20))
    for kwargs in searches:
        expected = _generate(t5, input_ids, attention_mask, **kwargs)
        kwargs["cache_implementation"] = cache_implementation
        assert torch.equal(_generate(fat5, input_ids, attention_mask, **kwargs), expected)
        decode_calls.clear()
        with kernel_ops.kernels_on_cpu():
            assert torch.equal(_generate(fat5, input_ids, attention_mask, **kwargs), expected), kwargs
        # every step: each decoder layer's self-attention (with the T5 table) and cross-attention on the kernel
        steps, layers = NEW_TOKENS, fat5.config.num_decoder_layers
        static = cache_implementation == "static"
        assert sorted(decode_calls) == sorted([(static, True)] * steps * layers + [(False, False)] * steps * layers)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("encoding", ["rope", "alibi"])
def test_rope_and_alibi_decoding_on_the_kernel_match_pytorch(tiny_fat5_config, make_batch, decode_calls, encoding):
    """RoPE rotates the new queries and keys at their positions after the cache; ALiBi's slopes go to the kernel."""
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(
        tiny_fat5_config(position_encoding_type=encoding, rope_fraction=0.5, initializer_factor=0.5)
    ).eval()
    input_ids, attention_mask = make_batch(96, [6, 3])
    for cache_implementation in (None, "static"):
        expected = _generate(model, input_ids, attention_mask, cache_implementation=cache_implementation)
        with kernel_ops.kernels_on_cpu():
            tokens = _generate(model, input_ids, attention_mask, cache_implementation=cache_implementation)
        assert torch.equal(tokens, expected), cache_implementation
    assert len(decode_calls) == 2 * NEW_TOKENS * model.config.num_decoder_layers * 2


@pytest.mark.slow
@pytest.mark.interpreter
def test_switch_keeps_cached_steps_on_pytorch(tiny_fat5_config, make_batch, decode_calls):
    model = FAT5ForConditionalGeneration(tiny_fat5_config(use_triton_attention_with_cache=False)).eval()
    input_ids, attention_mask = make_batch(96, [6, 3])
    with kernel_ops.kernels_on_cpu():
        for cache_implementation in (None, "static"):
            _generate(model, input_ids, attention_mask, cache_implementation=cache_implementation)
    assert decode_calls == []


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_chunked_steps_with_a_decoder_mask_match_pytorch(tiny_fat5_config, make_batch, static):
    """Several new tokens a step (M > 1) after a cached prefix, with a 2D decoder mask over the tokens so far (a
    static cache has more slots: the kernel path pads the mask), against the PyTorch path."""
    torch.manual_seed(0)
    config = tiny_fat5_config(initializer_factor=0.5)
    model = FAT5ForConditionalGeneration(config).eval()
    input_ids, attention_mask = make_batch(96, [7, 5])
    decoder_input_ids, _ = make_batch(96, [9, 9], seed=4)
    decoder_mask = torch.ones_like(decoder_input_ids)
    decoder_mask[1, 2] = 0

    def chunks():
        self_cache = StaticCache(config=config, max_cache_len=16) if static else DynamicCache(config=config)
        cache = EncoderDecoderCache(self_cache, DynamicCache(config=config))
        logits = []
        for start, end in ((0, 3), (3, 4), (4, 9)):
            out = model(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids[:, start:end],
                decoder_attention_mask=decoder_mask[:, :end], cache=cache, use_cache=True,
            )  # fmt: skip
            logits.append(out.logits)
        return torch.cat(logits, dim=1)

    with torch.no_grad():
        expected = chunks()
        with kernel_ops.kernels_on_cpu():
            logits = chunks()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.interpreter
def test_decoder_prompt_with_its_mask_on_the_kernel(tiny_fat5_config, make_batch, decode_calls):
    """`generate()` continuing decoder prompts with a decoder mask (a left-padded row): with a static cache the 2D
    mask is padded to the cache's slots (one shape for every step) instead of becoming transformers' 4D mask."""
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(tiny_fat5_config(initializer_factor=0.5)).eval()
    input_ids, attention_mask = make_batch(96, [7, 4])
    prompt = dict(decoder_input_ids=torch.tensor([[0, 5, 9], [0, 0, 7]]),
                  decoder_attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))  # fmt: skip
    for cache_implementation in (None, "static"):
        expected = _generate(model, input_ids, attention_mask, cache_implementation=cache_implementation, **prompt)
        decode_calls.clear()
        with kernel_ops.kernels_on_cpu():
            tokens = _generate(model, input_ids, attention_mask, cache_implementation=cache_implementation, **prompt)
        assert torch.equal(tokens, expected), cache_implementation
        static = cache_implementation == "static"
        # the prompt's step has 3 queries; the NEW_TOKENS - 1 steps after it one each
        assert decode_calls.count((static, True)) == (NEW_TOKENS - 1) * model.config.num_decoder_layers


@pytest.mark.slow
@pytest.mark.interpreter
def test_compiled_static_step_on_the_kernel_is_one_graph_with_t5_tokens(t5_pair, make_batch, decode_launches):
    """transformers compiles the decoding step (`cache_implementation="static"`): one graph serves every step, and
    each step runs the kernel with the static cache's length as the offset."""
    from test_static_cache_generation import _compiled_graphs_and_tokens

    t5, fat5 = t5_pair("t5_v1_1")
    input_ids, attention_mask = make_batch(96, [9, 6])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    expected = t5.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with kernel_ops.kernels_on_cpu():
        graphs, tokens = _compiled_graphs_and_tokens(fat5, batch, 5)
    assert torch.equal(tokens, expected)
    assert graphs == 1  # no recompilation as the cache fills: the offset is read on the device
    layers = fat5.config.num_decoder_layers
    # each layer's self-attention at each position (the prefill included), and its cross-attention
    assert sorted(decode_launches, key=str) == sorted(list(range(5)) * layers + [None] * 5 * layers, key=str)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_gpu_generation_on_the_kernel_matches_t5(t5_pair, make_batch, decode_launches, cache_implementation):
    """The compiled kernels on CUDA (fp32: exact products, the same tokens as HF T5), with transformers' own
    compiled step (inductor) for the static cache."""
    t5, fat5 = t5_pair("t5_v1_1", "sdpa")
    t5, fat5 = t5.cuda(), fat5.cuda()
    input_ids, attention_mask = (t.cuda() for t in make_batch(96, [37, 20, 9]))
    for kwargs in (dict(num_beams=1), dict(num_beams=3)):
        expected = _generate(t5, input_ids, attention_mask, **kwargs)
        decode_launches.clear()
        tokens = _generate(fat5, input_ids, attention_mask, cache_implementation=cache_implementation, **kwargs)
        assert torch.equal(tokens, expected), kwargs
        assert len(decode_launches) == 2 * NEW_TOKENS * fat5.config.num_decoder_layers  # self- and cross-attention
