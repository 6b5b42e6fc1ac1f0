# Copyright 2026 The fat5-hf contributors. Licensed under the Apache License, Version 2.0.
"""T5's learned relative-position bias: the bucket function and the module that holds the bias table.

The maths is exactly transformers' `T5Attention._relative_position_bucket` / `compute_bias` (from Mesh
TensorFlow), so that a FAT5 model reproduces T5 bit for bit on the PyTorch path. The Triton attention kernel computes
the same buckets in-kernel from `j - i` and reads the same table.
"""

from __future__ import annotations

import torch
from torch import nn

from fat5_kernels.attention_reference import t5_relative_position_bucket

# One bucket function for the model and the kernels' reference (bit-identical to transformers' T5); the import is
# flattened to a same-folder one in Hub exports.
relative_position_bucket = t5_relative_position_bucket


class T5RelativePositionBias(nn.Module):
    """The learned bias table of T5 (held by the first block of a stack and shared by all its blocks).

    Its parameter is `weight` of shape `(num_buckets, num_heads)`, so the state-dict key is
    `...SelfAttention.relative_attention_bias.weight` exactly as in transformers' T5 (which uses an `nn.Embedding`).

    `max_positions` is the longest sequence (cached plus new tokens) the encoding can serve, which `FAT5Stack`
    enforces with a clear error; `None` here: every distance past `max_distance` shares the last bucket, so T5's
    encoding serves any length (how well a model extrapolates past its training length is another matter).
    """

    max_positions: int | None = None

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.num_buckets = num_buckets
        self.num_heads = num_heads
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads))

    def extra_repr(self) -> str:
        return (
            f"num_buckets={self.num_buckets}, num_heads={self.num_heads}, max_distance={self.max_distance}, "
            f"bidirectional={self.bidirectional}"
        )

    def forward(
        self,
        query_length: int,
        key_length: int,
        past_seen_tokens: int | torch.Tensor = 0,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Materialize the bias for a `(query_length, key_length)` score matrix.

        Args:
            query_length (`int`): Number of queries (new tokens).
            key_length (`int`): Number of keys (cached plus new tokens).
            past_seen_tokens (`int` or 0-d tensor): Position of the first query (tokens already in the KV cache).
            device (`torch.device`, *optional*): Where to build it; defaults to the table's device.

        Returns:
            `torch.Tensor` of shape `(1, num_heads, query_length, key_length)`, dtype of the table.
        """
        if device is None:
            device = self.weight.device
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past_seen_tokens
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        relative_position = memory_position - context_position  # (query_length, key_length)
        buckets = relative_position_bucket(
            relative_position,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        values = nn.functional.embedding(buckets, self.weight)  # (query_length, key_length, num_heads)
        return values.permute([2, 0, 1]).unsqueeze(0)

    def kernel_table(self) -> torch.Tensor:
        """The table as the attention kernel reads it: `(num_heads, num_buckets)`, contiguous, with the gradient.

        A copy, not a view: block 0 owns the parameter but every block of the stack reads the table, and under
        FSDP2 (blocks wrapped one by one) block 0's parameters are freed again once its forward is done; an
        activation copy (a few KiB) stays valid for the later blocks, as T5's materialized position bias does.
        """
        return self.weight.t().contiguous()


__all__ = ["relative_position_bucket", "T5RelativePositionBias"]
