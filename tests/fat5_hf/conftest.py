"""Tiny T5 / FAT5 pairs for the model tests: same seed, same weights, fp32, CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration, kernel_ops

# The T5-family layouts the model must reproduce. d_kv * num_heads != d_model in "mt5" (as in mT5-small: 6 x 64 vs 512).
T5_VARIANTS = {
    # original T5: relu, tied embeddings, decoder output rescaled by d_model**-0.5
    "t5": dict(feed_forward_proj="relu"),
    # T5 v1.1 / FLAN-T5: gated-gelu, untied lm_head, no rescale
    "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # mT5: gated-gelu, untied, inner attention size != d_model
    "mt5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=12, num_heads=3),
    # UL2-style: gated-silu, untied
    "gated_silu": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False),
}

TINY = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    decoder_start_token_id=0,
)

# Fields of a T5 config.json that are derived (not constructor arguments) or identify the class.
_DERIVED_KEYS = ("model_type", "transformers_version", "architectures", "dense_act_fn", "is_gated_act")


def fat5_config_from_t5(t5_config: T5Config, **overrides) -> FAT5Config:
    """The FAT5 config that describes the same network as `t5_config` (what loading its config.json gives)."""
    fields = {k: v for k, v in t5_config.to_dict().items() if k not in _DERIVED_KEYS}
    fields.update(overrides)
    return FAT5Config(**fields)


def build_t5_and_fat5(variant: str, attn_implementation: str = "eager", seed: int = 0, tmp_path=None, **overrides):
    """A random HF T5ForConditionalGeneration and the FAT5ForConditionalGeneration loaded from its checkpoint.

    Untied variants get a distinct `lm_head` (as real v1.1 checkpoints), which only `save_pretrained` /
    `from_pretrained` keeps untied, so both models go through a checkpoint on disk.
    """
    torch.manual_seed(seed)
    t5_config = T5Config(**{**TINY, **T5_VARIANTS[variant], **overrides})
    t5 = T5ForConditionalGeneration(t5_config)
    if not t5.config.scale_decoder_outputs:
        t5.lm_head.weight = torch.nn.Parameter(torch.randn_like(t5.lm_head.weight) * t5_config.d_model**-0.5)
    t5.save_pretrained(tmp_path)
    t5 = T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=attn_implementation).eval()
    fat5 = FAT5ForConditionalGeneration.from_pretrained(
        tmp_path, config=fat5_config_from_t5(t5.config), attn_implementation=attn_implementation
    ).eval()
    return t5, fat5


@pytest.fixture
def t5_pair(tmp_path):
    """Factory: `t5_pair(variant, attn_implementation="eager", **config_overrides) -> (t5, fat5)`."""
    counter = iter(range(1000))

    def make(variant: str, attn_implementation: str = "eager", **overrides):
        return build_t5_and_fat5(
            variant, attn_implementation, tmp_path=tmp_path / f"ckpt{next(counter)}", **overrides
        )

    return make


@pytest.fixture
def tiny_fat5_config():
    """Factory for small FAT5 configs (v1.1 layout by default)."""

    def make(**overrides) -> FAT5Config:
        fields = {**TINY, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, **overrides}
        return FAT5Config(**fields)

    return make


def padded_batch(vocab_size: int, lengths: list[int], seed: int = 1, left: bool = False):
    """Random ids (>= 2, so no pad/eos inside) with right (or left) padding: `(input_ids, attention_mask)`."""
    gen = torch.Generator().manual_seed(seed)
    max_len = max(lengths)
    input_ids = torch.zeros(len(lengths), max_len, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), max_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids = torch.randint(2, vocab_size, (length,), generator=gen)
        span = slice(max_len - length, max_len) if left else slice(0, length)
        input_ids[row, span] = ids
        attention_mask[row, span] = 1
    return input_ids, attention_mask


@pytest.fixture
def make_batch():
    return padded_batch


# The cached decoding steps of FAT5 and of the patched stock models, counted two ways.
@pytest.fixture
def decode_calls(monkeypatch):
    """The model's calls into the Triton attention with one query a row (decoding steps), as
    `(static-cache offset given, a T5 bias table given)`."""
    calls = []
    original = kernel_ops.flash_attention

    def counting(query, *args, **kwargs):
        if query.shape[2] == 1:
            calls.append((kwargs.get("query_offset") is not None, args[3] is not None))  # key, value, mask, table
        return original(query, *args, **kwargs)

    monkeypatch.setattr(kernel_ops, "flash_attention", counting)
    return calls


@pytest.fixture
def decode_launches(monkeypatch):
    """The attention kernel's launches with one query a row, as the query offsets they got (None: aligned to the end
    of the keys). Counted in the launcher, which the custom ops call when they run: a counter in code that
    `torch.compile` traces would itself be guarded on (a recompilation a step)."""
    from fat5_kernels import attention

    offsets = []
    launch = attention.t5_attention_forward

    def recording(q, *args, query_offset=None, cu_seqlens_q=None, **kwargs):
        if cu_seqlens_q is None and q.shape[2] == 1:
            offsets.append(None if query_offset is None else int(query_offset.reshape(-1)[0]))
        return launch(q, *args, query_offset=query_offset, cu_seqlens_q=cu_seqlens_q, **kwargs)

    monkeypatch.setattr(attention, "t5_attention_forward", recording)
    return offsets
