"""generate(): greedy, sampling and beam search identical to transformers' T5; KV cache sized by the decoder depth."""

from __future__ import annotations

import pytest
import torch
from transformers import EncoderDecoderCache, StaticCache

from fat5_hf import FAT5ForConditionalGeneration


@pytest.mark.parametrize("variant", ["t5", "t5_v1_1", "mt5"])
def test_greedy_and_beam_search_match_t5(t5_pair, make_batch, variant):
    t5, fat5 = t5_pair(variant, "sdpa")
    input_ids, attention_mask = make_batch(96, [7, 4, 6])
    for kwargs in (dict(num_beams=1), dict(num_beams=3, num_return_sequences=2)):
        expected = t5.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, **kwargs)
        actual = fat5.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, **kwargs)
        assert torch.equal(actual, expected), kwargs


def test_sampling_matches_t5_with_same_seed(t5_pair, make_batch):
    t5, fat5 = t5_pair("t5_v1_1", "eager")
    input_ids, attention_mask = make_batch(96, [5, 7])
    outputs = []
    for model in (t5, fat5):
        torch.manual_seed(123)
        outputs.append(
            model.generate(input_ids, attention_mask=attention_mask, do_sample=True, top_k=20, max_new_tokens=8)
        )
    assert torch.equal(outputs[0], outputs[1])


def test_cached_greedy_equals_uncached(t5_pair, make_batch):
    _, fat5 = t5_pair("t5_v1_1", "eager")
    input_ids, attention_mask = make_batch(96, [7, 3])
    cached = fat5.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False)
    uncached = fat5.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("num_layers, num_decoder_layers", [(2, 3), (3, 1)])
def test_generation_with_cache_when_decoder_depth_differs(
    tiny_fat5_config, make_batch, num_layers, num_decoder_layers
):
    # transformers 5.24's T5 sizes the generation cache by `num_layers` and fails here
    torch.manual_seed(0)
    config = tiny_fat5_config(num_layers=num_layers, num_decoder_layers=num_decoder_layers, initializer_factor=0.5)
    model = FAT5ForConditionalGeneration(config).eval()
    assert config.get_text_config(decoder=True).num_hidden_layers == num_decoder_layers
    assert config.num_hidden_layers == num_layers  # the encoder depth, as in T5
    input_ids, attention_mask = make_batch(96, [6, 4])
    for kwargs in (dict(num_beams=1), dict(num_beams=3)):
        cached = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, use_cache=True, **kwargs
        )
        uncached = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, use_cache=False, **kwargs
        )
        assert torch.equal(cached, uncached), kwargs

    out = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=3, return_dict_in_generate=True, do_sample=False
    )
    assert isinstance(out.cache, EncoderDecoderCache)
    assert len(out.cache.self_attention_cache.layers) == num_decoder_layers


def test_forward_with_labels_returns_no_cache_unless_asked(tiny_fat5_config, make_batch):
    model = FAT5ForConditionalGeneration(tiny_fat5_config()).eval()
    input_ids, _ = make_batch(96, [5, 5])
    labels, _ = make_batch(96, [3, 3], seed=2)
    assert model(input_ids=input_ids, labels=labels).cache is None
    assert isinstance(model(input_ids=input_ids, labels=labels, use_cache=True).cache, EncoderDecoderCache)
    # the deprecated `past_key_values` name of transformers 5.24 is still accepted
    first = model(input_ids=input_ids, decoder_input_ids=labels[:, :2], use_cache=True)
    step = model(
        input_ids=input_ids, decoder_input_ids=labels[:, 2:3], past_key_values=first.cache, use_cache=True
    )
    full = model(input_ids=input_ids, decoder_input_ids=labels, use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, 2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_layers, num_decoder_layers", [(2, 2), (2, 3)])
def test_static_cache_generation_equals_dynamic(tiny_fat5_config, make_batch, num_layers, num_decoder_layers):
    # transformers' other encoder-decoder cache: a StaticCache (one layer per decoder block) for self-attention
    torch.manual_seed(0)
    config = tiny_fat5_config(num_layers=num_layers, num_decoder_layers=num_decoder_layers, initializer_factor=0.5)
    model = FAT5ForConditionalGeneration(config).eval()
    input_ids, attention_mask = make_batch(96, [7, 4])
    for kwargs in (dict(num_beams=1), dict(num_beams=2)):
        dynamic = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, **kwargs)
        out = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
            cache_implementation="static", return_dict_in_generate=True, **kwargs,
        )
        assert torch.equal(out.sequences, dynamic), kwargs
    assert isinstance(out.cache, EncoderDecoderCache)
    assert isinstance(out.cache.self_attention_cache, StaticCache)
    assert len(out.cache.self_attention_cache.layers) == num_decoder_layers
