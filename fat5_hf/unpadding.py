# Copyright 2026 The fat5-hf contributors. Licensed under the Apache License, Version 2.0.
"""Padded batches on the attention kernel's varlen layout: padding tokens cost nothing.

A finetuning batch (`DataCollatorForSeq2Seq`, `DataCollatorWithPadding`) is padded to its longest row. On the kernel
path a stack turns its padding mask into FlashAttention's varlen metadata once per forward (`cu_seqlens`, the
indices of the real tokens, the longest row), shared by every layer:

* attention runs only over real tokens, for encoder self-attention, decoder self-attention and cross-attention;
* where nothing reads the blocks' hidden states, the whole stack runs on the packed real tokens, viewed
  `(1, total, d_model)`: the projections, norms and feed-forward layers skip the padding too. The stack gathers
  the real tokens once before its first block and scatters them back after its final norm.

Each row's real tokens must be contiguous (right or left padding): T5's relative bias then sees the same distances
in the packed row as in the padded one, so the outputs equal the padded computation's at the real tokens. A mask
with holes keeps the padded layout and the kernel's key-padding mask. At padding positions the stack outputs
zeros (as FlashAttention's `pad_input`), where the padded computation outputs values that no real token reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernel_ops import FlashAttentionMask, PackedSequences


def _layout_of_mask(attention_mask: torch.Tensor | None) -> str | PackedSequences:
    """`"full"` (no padding), `"holes"` (a row's real tokens are not contiguous) or the rows' `PackedSequences`, one
    sequence per row (a row without real tokens is an empty sequence). One device-to-host copy."""
    if attention_mask is None:
        return "full"
    real = attention_mask != 0
    batch, length = real.shape
    lengths = real.sum(dim=1)
    positions = torch.arange(length, device=real.device)
    first = torch.where(real, positions, length).amin(dim=1)
    last = torch.where(real, positions, -1).amax(dim=1)
    contiguous = (lengths == 0) | (last - first + 1 == lengths)
    all_contiguous, total, longest = torch.stack((contiguous.all().long(), lengths.sum(), lengths.max())).tolist()
    if total == batch * length:
        return "full"
    if not all_contiguous:
        return "holes"
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=real.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    indices = torch.nonzero(real.reshape(-1), as_tuple=False).flatten()
    return PackedSequences(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=longest)


def _all_tokens(batch: int, length: int, device: torch.device) -> PackedSequences:
    """`PackedSequences` of unpadded rows: row `b` is tokens `b * length ... (b + 1) * length - 1`."""
    cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return PackedSequences(torch.arange(batch * length, device=device), cu_seqlens, length)


def sequences_from_attention_mask(attention_mask: torch.Tensor) -> PackedSequences | None:
    """FlashAttention's varlen metadata of a padded batch, one sequence per row.

    Args:
        attention_mask (`torch.Tensor` of shape `(batch, length)`): 1 (or True) on real tokens, 0 on padding; each
            row's real tokens contiguous.

    Returns:
        `PackedSequences` (`indices` int64 `(total,)` into the flattened `(batch * length)`, `cu_seqlens` int32
        `(batch + 1,)`, `max_seqlen`), or None when a row's real tokens are not contiguous.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (batch, length), got {tuple(attention_mask.shape)}.")
    layout = _layout_of_mask(attention_mask)
    if layout == "full":
        return _all_tokens(*attention_mask.shape, attention_mask.device)
    return None if layout == "holes" else layout


@dataclass(frozen=True)
class StackAttention:
    """The kernel masks of one stack's forward and, when the layers run unpadded, how to pack their states.

    Attributes:
        self_attention (`FlashAttentionMask`): the mask every self-attention layer of the stack gets.
        cross_attention (`FlashAttentionMask`, *optional*): the decoder's cross-attention mask.
        tokens (`PackedSequences`, *optional*): set when the layers run on packed real tokens: the stack's layout.
        encoder_tokens (`PackedSequences`, *optional*): the encoder states' layout then (decoder only).
    """

    self_attention: FlashAttentionMask
    cross_attention: FlashAttentionMask | None = None
    tokens: PackedSequences | None = None
    encoder_tokens: PackedSequences | None = None

    @property
    def unpadded(self) -> bool:
        return self.tokens is not None

    def pack(self, hidden_states: torch.Tensor, encoder: bool = False) -> torch.Tensor:
        """`(batch, length, d)` -> the real tokens `(1, total, d)` (a view when there is no padding)."""
        layout = self.encoder_tokens if encoder else self.tokens
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        if layout.indices.numel() != rows.shape[0]:
            rows = rows.index_select(0, layout.indices)
        return rows.unsqueeze(0)

    def unpack(self, hidden_states: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """The real tokens `(1, total, d)` -> `(batch, length, d)`, zeros at padding positions."""
        rows = hidden_states.squeeze(0)
        if self.tokens.indices.numel() != batch * length:
            rows = rows.new_zeros(batch * length, rows.shape[-1]).index_copy(0, self.tokens.indices, rows)
        return rows.view(batch, length, -1)


def stack_attention(
    attention_mask: torch.Tensor | None,
    encoder_attention_mask: torch.Tensor | None,
    *,
    batch: int,
    length: int,
    encoder_length: int | None,
    causal: bool,
    unpad_layers: bool,
    device: torch.device,
) -> StackAttention:
    """The kernel masks of a stack's forward, from its 2D padding masks (computed once, shared by all layers).

    Args:
        attention_mask (`(batch, length)`, *optional*): the stack's padding mask (1 = real token).
        encoder_attention_mask (`(batch, encoder_length)`, *optional*): the encoder's, for cross-attention.
        batch, length: the stack's input shape.
        encoder_length (`int`, *optional*): length of the encoder states; None when there is no cross-attention.
        causal (`bool`): decoder self-attention.
        unpad_layers (`bool`): run the whole stack on packed real tokens where there is padding (False when
            something reads the blocks' hidden states, which must keep their `(batch, length, d)` shape).
        device: where the states are.

    Returns:
        `StackAttention`. Without padding anywhere, with a mask whose real tokens are not contiguous, or under
        `torch.compile`, the masks carry the 2D key-padding masks (the padded layout); otherwise they use the varlen
        layout.
    """
    has_cross = encoder_length is not None
    if torch.compiler.is_compiling():
        # The varlen layout's sizes depend on the data. Computing it eagerly behind a graph break works but costs
        # `fullgraph=True` and CUDA-graph replays, and recompiles: the token count turns dynamic after one, but the
        # varlen kernels read `max_seqlen` as a Python int (one graph per distinct longest row). A compiled stack
        # keeps the padded layout, one graph for every batch of its shape.
        own = encoder = "padded"
    else:
        own = _layout_of_mask(attention_mask)
        encoder = _layout_of_mask(encoder_attention_mask) if has_cross else "full"
    if own == "padded" or "holes" in (own, encoder) or (own == "full" and encoder == "full"):

        def padded(mask: torch.Tensor | None, is_causal: bool) -> FlashAttentionMask:
            return FlashAttentionMask(key_padding_mask=mask.bool() if mask is not None else None, causal=is_causal)

        return StackAttention(
            padded(attention_mask, causal), padded(encoder_attention_mask, False) if has_cross else None
        )
    if own == "full":
        own = _all_tokens(batch, length, device)
    if has_cross and encoder == "full":
        encoder = _all_tokens(batch, encoder_length, device)
    self_mask = FlashAttentionMask(None, causal, queries=own, keys=own, unpadded=unpad_layers)
    cross_mask = (
        FlashAttentionMask(None, False, queries=own, keys=encoder, unpadded=unpad_layers) if has_cross else None
    )
    if not unpad_layers:
        return StackAttention(self_mask, cross_mask)
    return StackAttention(self_mask, cross_mask, tokens=own, encoder_tokens=encoder if has_cross else None)


__all__ = ["StackAttention", "sequences_from_attention_mask", "stack_attention"]
