"""Position encodings (T5 buckets, ALiBi, RoPE, FIRE, none): the modules' maths, the config checks, and the model
with each one (cached decoding, save/load with remote code, conversion, loading errors). fp32 on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration
from fat5_hf.position_encoding import (
    POSITION_ENCODINGS,
    ALiBiPositionBias,
    FIREPositionBias,
    RotaryPositionEmbedding,
    alibi_slopes,
    apply_rotary,
)

ENCODINGS = list(POSITION_ENCODINGS)


# ---- the modules ----------------------------------------------------------------------------------------------
def test_alibi_slopes_follow_the_paper():
    # Press et al.'s geometric sequence for 8 heads; 12 heads take 8 of it and 4 odd terms of the 16-head one
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(k + 1) for k in range(8)]))
    expected_12 = [2.0 ** -(k + 1) for k in range(8)] + [2.0 ** -(0.5 * k) for k in (1, 3, 5, 7)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected_12))


def test_alibi_bias_is_minus_slope_times_distance_with_cached_queries():
    bias = ALiBiPositionBias(num_heads=4, bidirectional=True)(query_length=2, key_length=5, past_seen_tokens=3)
    assert bias.shape == (1, 4, 2, 5)
    # query 0 sits at position 3 (after 3 cached tokens): distances to keys 0..4 are 3, 2, 1, 0, 1
    torch.testing.assert_close(bias[0, 0, 0], -alibi_slopes(4)[0] * torch.tensor([3.0, 2.0, 1.0, 0.0, 1.0]))


def test_rope_scores_depend_on_the_distance_only():
    rope = RotaryPositionEmbedding(head_dim=8, fraction=1.0, base=100.0)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    cos, sin = rope.cos_sin(12)
    scores = (apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2))[0, 0]
    # the same vectors at every position: each diagonal (fixed j - i) holds one value, and they differ
    for offset in (-3, 0, 5):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 5)[0])


def test_partial_rope_leaves_the_other_channels():
    rope = RotaryPositionEmbedding(head_dim=8, fraction=0.5)
    assert rope.rotary_dim == 4
    x = torch.randn(2, 3, 5, 8)
    rotated = apply_rotary(x, *rope.cos_sin(5, past_seen_tokens=2))
    assert torch.equal(rotated[..., 4:], x[..., 4:])
    assert not torch.allclose(rotated[..., :4], x[..., :4])
    # a rotation: the norm of each pair is kept
    torch.testing.assert_close(rotated[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))


def _random_fire(bidirectional: bool, threshold: float, seed: int = 0, distance_scale: float = 0.8) -> FIREPositionBias:
    torch.manual_seed(seed)
    fire = FIREPositionBias(num_heads=3, width=16, threshold=threshold, bidirectional=bidirectional)
    with torch.no_grad():
        for parameter in fire.parameters():
            parameter.normal_()
        fire.distance_scale.fill_(distance_scale)
        fire.threshold.fill_(threshold)
    return fire


def _fire_by_hand(module: FIREPositionBias, i: int, j: int) -> torch.Tensor:
    c, threshold = module.distance_scale.item(), module.threshold.item()
    value = math.log(c * abs(j - i) + 1) / math.log(c * max(threshold, i) + 1)
    if module.bidirectional and j < i:
        value = -value
    hidden = torch.relu(module.mlp[0].weight[:, 0] * value + module.mlp[0].bias)
    return module.mlp[2].weight @ hidden + module.mlp[2].bias


@pytest.mark.parametrize("bidirectional", [True, False])
def test_fire_is_the_paper_formula_and_not_a_function_of_distance_alone(bidirectional):
    fire = _random_fire(bidirectional, threshold=4.0, distance_scale=0.7)
    bias = fire(query_length=10, key_length=12, past_seen_tokens=2).detach()  # queries at positions 2..11
    for i, j in [(2, 0), (5, 7), (11, 3), (9, 9)]:
        torch.testing.assert_close(bias[0, :, i - 2, j], _fire_by_hand(fire, i, j).detach(), atol=1e-5, rtol=1e-5)
    # past the threshold the normalizer grows with the query: distance 1 reads differently at queries 5 and 11
    assert not torch.allclose(bias[0, :, 5 - 2, 4], bias[0, :, 11 - 2, 10])


def test_fire_parameters_all_get_gradients():
    torch.manual_seed(0)
    fire = FIREPositionBias(num_heads=2, width=8, threshold=3.0, bidirectional=False)
    with torch.no_grad():
        for parameter in fire.parameters():
            parameter.normal_()
        fire.distance_scale.fill_(1.0)
        fire.threshold.fill_(3.0)
    (fire(6, 6) * torch.randn(1, 2, 6, 6)).sum().backward()
    for name, parameter in fire.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bidirectional", [True, False])
def test_fire_table_equals_the_plain_mlp_values_and_gradients(bidirectional):
    # the bias is evaluated through the MLP's exact piecewise-linear table (no (M, N, width) activation)
    fire = _random_fire(bidirectional, threshold=5.0)
    with torch.no_grad():
        fire.mlp[0].weight[3] = 0.0  # a unit that never switches
    upstream = torch.randn(1, 3, 9, 12)
    results = []
    for evaluate in (fire, fire.mlp_bias):
        fire.zero_grad()
        bias = evaluate(9, 12, past_seen_tokens=3)
        (bias * upstream).sum().backward()
        results.append((bias.detach(), {name: p.grad.clone() for name, p in fire.named_parameters()}))
    (table_bias, table_grads), (mlp_bias, mlp_grads) = results
    torch.testing.assert_close(table_bias, mlp_bias, atol=1e-5, rtol=1e-5)
    for name, grad in mlp_grads.items():
        torch.testing.assert_close(table_grads[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4, msg=name)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_fire_kernel_table_is_the_bias_of_each_distance_below_the_threshold(bidirectional):
    """Column `d + R` of the kernel's table is the bias of every (query, key) pair at distance `d` whose query is
    below the threshold, values and gradients of every FIRE parameter; `R = 2**k - 1 >= length - 1`."""
    fire = _random_fire(bidirectional, threshold=9.5)
    table = fire.kernel_table(10)
    radius = 15
    assert table.shape == (3, 2 * radius + 1) and table.dtype == torch.float32
    bias = fire(10, 10)[0]  # queries 0..9, all below 9.5
    query, key = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    spread = table[:, key - query + radius]
    torch.testing.assert_close(spread, bias, atol=1e-6, rtol=1e-6)
    upstream = torch.randn(3, 10, 10)
    grads = []
    for values in (spread, bias):
        grads.append(torch.autograd.grad((values * upstream).sum(), list(fire.parameters()), retain_graph=True))
    for (name, _), from_table, from_forward in zip(fire.named_parameters(), *grads):
        assert from_forward.abs().sum() > 0 or name == "mlp.2.bias", name
        torch.testing.assert_close(from_table, from_forward, atol=1e-6, rtol=1e-5, msg=name)
    # past the threshold the normalizer grows with the query: the table no longer describes the bias
    assert not torch.allclose(fire.kernel_table(12)[:, radius - 11], fire(12, 12)[0, :, 11, 0])  # query 11, key 0
    assert [fire.kernel_table(n).shape[1] for n in (1, 2, 3, 64, 65)] == [3, 3, 7, 127, 255]


@pytest.mark.parametrize(
    "threshold,num_positions,expected",
    [(9.5, 10, True), (9.0, 10, False), (-9.5, 10, True), (0.2, 1, True), (0.2, 2, False), (1.5, 2, True)],
)
def test_fire_is_distance_only_strictly_below_the_threshold(threshold, num_positions, expected):
    # positions 0 .. num_positions - 1 against max(|L|, 1); at a tie the PyTorch path's maximum splits the gradient
    assert _random_fire(True, threshold).is_distance_only(num_positions) is expected


# ---- the config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_is_accepted(encoding):
    assert FAT5Config(position_encoding_type=encoding).position_encoding_type == encoding


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(position_encoding_type="sinusoidal"),
         r"must be one of \['t5', 'alibi', 'rope', 'fire', 'none'\], got 'sinusoidal'"),
        (dict(position_encoding_type="rope", d_kv=8, rope_fraction=0.375), r"\(8\) x `rope_fraction` \(0\.375\) = 3 channels.*even.*rope_fraction=0\.5"),
        (dict(position_encoding_type="rope", d_kv=7), r"\(7\) x .* = 7 channels.*rope_fraction=0\.857"),
        (dict(position_encoding_type="rope", rope_fraction=1.5), "must round to an even number in"),
        (dict(rope_base=0), "`rope_base` must be a positive number"),
        (dict(fire_mlp_width=0), "`fire_mlp_width` must be a positive integer"),
        (dict(fire_threshold=-1.0), "`fire_threshold` must be a positive number"),
    ],
)  # fmt: skip
def test_bad_position_encoding_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FAT5Config(**kwargs)


# ---- the model ------------------------------------------------------------------------------------------------
def _model(tiny_fat5_config, encoding: str, **overrides) -> FAT5ForConditionalGeneration:
    torch.manual_seed(0)
    # a larger init than T5's, so that greedy decoding of a random model does not settle on one token
    config = tiny_fat5_config(position_encoding_type=encoding, initializer_factor=2.0, fire_threshold=6.0, **overrides)
    return FAT5ForConditionalGeneration(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cached_static_and_uncached_greedy_decoding_agree(tiny_fat5_config, make_batch, encoding):
    model = _model(tiny_fat5_config, encoding)
    input_ids, attention_mask = make_batch(96, [9, 5])
    # no token twice: a random model would otherwise repeat one token, which checks little
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=9, min_new_tokens=9, do_sample=False,
                  no_repeat_ngram_size=1)  # fmt: skip
    cached = model.generate(input_ids, **kwargs)
    assert torch.equal(model.generate(input_ids, use_cache=False, **kwargs), cached)
    assert torch.equal(model.generate(input_ids, cache_implementation="static", **kwargs), cached)
    # one cached step gives the logits of the full forward at that position (positions of the new token)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=cached).logits
        prefix = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=cached[:, :7],
                       use_cache=True)  # fmt: skip
        step = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=cached[:, 7:8],
                     cache=prefix.cache, use_cache=True)  # fmt: skip
    scale = full.abs().max().item()
    torch.testing.assert_close(step.logits[:, -1], full[:, 7], atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_only_none_leaves_the_encoder_blind_to_order(tiny_fat5_config, encoding):
    # without a position encoding the encoder is permutation-equivariant; every encoding breaks that
    model = _model(tiny_fat5_config, encoding)
    input_ids = torch.randint(2, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = model.encoder(input_ids=input_ids).last_hidden_state
        permuted = model.encoder(input_ids=input_ids[:, order]).last_hidden_state
    difference = (permuted - states[:, order]).abs().max().item()
    assert difference < 1e-4 if encoding == "none" else difference > 1e-2, difference


@pytest.mark.parametrize("encoding", ["alibi", "rope", "fire"])
def test_parameters_of_each_encoding(tiny_fat5_config, encoding):
    model = _model(tiny_fat5_config, encoding)
    names = [name for name, _ in model.named_parameters() if ".SelfAttention.relative_attention_bias." in name]
    if encoding == "fire":  # learned: block 0 of each stack holds FIRE's MLP, c and threshold, initialized
        assert len(names) == 12
        fire = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        assert fire.distance_scale.item() == 1.0 and fire.threshold.item() == 6.0
        assert fire.mlp[0].weight.abs().sum() > 0
    else:  # ALiBi and RoPE learn nothing
        assert names == []
    assert not any("EncDecAttention.relative_attention_bias" in name for name, _ in model.named_parameters())


def test_fire_weights_missing_from_a_checkpoint_are_an_error(tiny_fat5_config, tmp_path):
    _model(tiny_fat5_config, "t5").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no weights for the position encoding position_encoding_type='fire'.*"
                                         r"relative_attention_bias\.mlp\.0\.weight"):  # fmt: skip
        FAT5ForConditionalGeneration.from_pretrained(tmp_path, position_encoding_type="fire")
    # a parameter-free encoding loads (T5's table is simply unused)
    FAT5ForConditionalGeneration.from_pretrained(tmp_path, position_encoding_type="alibi")


@pytest.mark.parametrize("encoding", ["alibi", "rope", "fire", "none"])
def test_only_t5_converts_to_t5(tiny_fat5_config, tmp_path, encoding):
    from fat5_hf.convert import ConversionError, convert_fat5_to_t5

    _model(tiny_fat5_config, encoding).save_pretrained(tmp_path / "fat5")
    with pytest.raises(ConversionError, match=f"position_encoding_type='{encoding}' has no T5 equivalent"):
        convert_fat5_to_t5(tmp_path / "fat5", tmp_path / "t5")
    assert not (tmp_path / "t5").exists()


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["alibi", "rope", "fire", "none"])
def test_each_encoding_saves_loads_with_remote_code_and_generates(tmp_path, encoding):
    from test_hub import TINY, run_loader, save_tiny_model

    save_tiny_model(tmp_path / "model", FAT5Config(**TINY, position_encoding_type=encoding))
    run_loader(tmp_path / "model", "fat5_hf,fat5_kernels,triton", tmp_path)


@pytest.mark.parametrize("encoding", ["alibi", "rope", "none"])
def test_packed_documents_get_their_own_logits(tiny_fat5_config, encoding):
    # ALiBi's and RoPE's scores depend on distances only: a document packed after another reads as if alone
    from test_packed_documents import _documents, _packed_batch

    model = _model(tiny_fat5_config, encoding, use_triton_attention=False)
    documents = _documents(model.config.vocab_size)
    with torch.no_grad():
        packed = model(**_packed_batch(documents)).logits
        inputs, targets = documents[0][1]  # the second document of row 0, packed after 5 input and 4 target tokens
        alone = model(input_ids=inputs[None], labels=targets[None]).logits[0]
    scale = alone.abs().max().item()
    torch.testing.assert_close(packed[0, 4 : 4 + len(targets)], alone, atol=1e-5 * scale, rtol=1e-4)


def test_fire_refuses_packed_documents(tiny_fat5_config):
    from test_packed_documents import _documents, _packed_batch

    model = _model(tiny_fat5_config, "fire")
    with pytest.raises(ValueError, match="encoder_segment_ids: FIRE's bias depends on each query's position"):
        model(**_packed_batch(_documents(model.config.vocab_size)))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_bfloat16_model_runs_each_encoding(tiny_fat5_config, attn_implementation, encoding):
    # ALiBi's and FIRE's float32 biases over bf16 scores must not leave float32 weights facing bf16 values
    config = tiny_fat5_config(position_encoding_type=encoding, attn_implementation=attn_implementation)
    model = FAT5ForConditionalGeneration(config).to(torch.bfloat16).eval()
    input_ids = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model(input_ids=input_ids, decoder_input_ids=input_ids, output_attentions=attn_implementation == "eager")
    assert outputs.logits.dtype == torch.bfloat16 and torch.isfinite(outputs.logits).all()
    assert model.generate(input_ids, max_new_tokens=3, do_sample=False).shape == (2, 4)
