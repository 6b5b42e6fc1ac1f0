# Copyright 2026 The fat5-hf contributors. Licensed under the Apache License, Version 2.0.
"""Position encodings of FAT5's self-attention: T5's buckets, ALiBi, RoPE and FIRE (or none).

Each is a module owned by the first self-attention layer of a stack and shared by all its layers, as T5's bias
table is (`build_position_encoding` picks it from the config). Their `forward` is the plain PyTorch computation, the
reference the Triton kernels are tested against; cross-attention has no position encoding.

T5's maths is exactly transformers' `T5Attention._relative_position_bucket` / `compute_bias` (from Mesh
TensorFlow), so that a FAT5 model reproduces T5 bit for bit on the PyTorch path. The Triton attention kernel computes
the same buckets in-kernel from `j - i` and reads the same table.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fat5_kernels.attention_reference import t5_relative_position_bucket
from fat5_kernels.rope_reference import rotate_half_reference

from .configuration_fat5 import POSITION_ENCODINGS

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


class RotaryAngles(NamedTuple):
    """What the first layer of a RoPE stack shares with the others instead of a bias: float32 `(L, rotary_dim // 2)`
    cosines and sines of the query positions."""

    cos: torch.Tensor
    sin: torch.Tensor


class ALiBiSlopes(NamedTuple):
    """What the first layer of an ALiBi stack shares with the others on the kernel path: float32 `(H,)` slopes."""

    slopes: torch.Tensor


class DistanceBias(NamedTuple):
    """FIRE's table on the kernel path, as the attention layers hand it to `kernel_ops` (which reads it as the kernel's
    `distance_bias`): `(H, 2R + 1)` the bias of every signed distance `d` in `[-R, R]` at column `d + R`
    (`FIREPositionBias.kernel_table`), with the gradient."""

    table: torch.Tensor


class FIREKernelBias(NamedTuple):
    """FIRE's compact parameters on the kernel path past its threshold, as the attention layers hand them to
    `kernel_ops` (which passes them as the kernel's `fire_bias`, evaluated per element, with gradients):
    `FIREPositionBias.kernel_fire_bias`."""

    distance_scale: torch.Tensor
    threshold: torch.Tensor
    breakpoints: torch.Tensor
    slopes: torch.Tensor
    intercepts: torch.Tensor

    def flatten(self) -> torch.Tensor:
        """One float32 vector `[distance_scale, threshold, breakpoints (W,), slopes (H * (W + 1),), intercepts
        (H * (W + 1),)]`, differentiable: how a stack shares them across its layers, as a plain tensor that
        reentrant gradient checkpointing sees as each block's input (and returns the gradient of)."""
        return torch.cat(
            (self.distance_scale.reshape(1), self.threshold.reshape(1), self.breakpoints, self.slopes.flatten(),
             self.intercepts.flatten())
        )  # fmt: skip

    @classmethod
    def unflatten(cls, flat: torch.Tensor, num_heads: int) -> FIREKernelBias:
        """The inverse of `flatten` for `num_heads` heads (views of `flat`)."""
        width = (flat.numel() - 2 - 2 * num_heads) // (2 * num_heads + 1)
        lines = flat[2 + width :].view(2, num_heads, width + 1)
        return cls(flat[0], flat[1], flat[2 : 2 + width], lines[0], lines[1])


# ----------------------------------------------------------------------------------------------------------------
# ALiBi
# ----------------------------------------------------------------------------------------------------------------
def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al., 2022, "Train Short, Test Long"), float32 `(num_heads,)`.

    A power of two `n` of heads gets the geometric sequence `2**(-8 k / n)`, `k = 1..n`; any other count takes
    the `2**floor(log2 n)` sequence and the odd-indexed terms of the `2 * 2**floor(log2 n)` one, as the reference
    implementation does. Built with device ops only (no host-to-device copy, so also under CUDA-graph capture).
    """
    closest = 1 << (num_heads.bit_length() - 1)
    slopes = torch.exp2(-8.0 / closest * torch.arange(1, closest + 1, dtype=torch.float32, device=device))
    if closest == num_heads:
        return slopes
    extra = torch.exp2(-4.0 / closest * torch.arange(1, 2 * (num_heads - closest), 2, dtype=torch.float32, device=device))
    return torch.cat((slopes, extra))


class ALiBiPositionBias(nn.Module):
    """ALiBi: a fixed bias `-slope_h * |key_position - query_position|` per head, no parameters.

    The encoder's is symmetric (both directions penalized alike, as in bidirectional ALiBi); the decoder's
    self-attention is causal, so only `d <= 0` is ever read and the bias is ALiBi's original `-slope * (i - j)`.
    The Triton kernel computes it from the slopes (`kernel_slopes`); the PyTorch path materializes it.
    """

    max_positions: int | None = None

    def __init__(self, num_heads: int, bidirectional: bool):
        super().__init__()
        self.num_heads = num_heads
        self.bidirectional = bidirectional

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, bidirectional={self.bidirectional}"

    def kernel_slopes(self, device: torch.device) -> torch.Tensor:
        """The float32 `(num_heads,)` slopes the attention kernel takes as `alibi_slopes`."""
        return alibi_slopes(self.num_heads, device)

    def forward(
        self,
        query_length: int,
        key_length: int,
        past_seen_tokens: int | torch.Tensor = 0,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """The float32 bias `(1, num_heads, query_length, key_length)` (arguments as `T5RelativePositionBias`)."""
        distance = _distance(query_length, key_length, past_seen_tokens, device)
        return (-alibi_slopes(self.num_heads, device)[:, None, None] * distance.abs()).unsqueeze(0)


def _distance(query_length: int, key_length: int, past_seen_tokens: int | torch.Tensor, device) -> torch.Tensor:
    """float32 `(query_length, key_length)` distances `key_position - query_position`, the queries at positions
    `past_seen_tokens + arange(query_length)`."""
    query_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past_seen_tokens
    key_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
    return (key_position - query_position).float()


# ----------------------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------------------
class RotaryPositionEmbedding(nn.Module):
    """RoPE (Su et al., 2021, "RoFormer"): queries and keys (never values) rotated by their absolute position.

    The first `rotary_dim = round(head_dim * fraction)` channels of each head are rotated in the GPT-NeoX
    ("rotate half") pairing: channel `c < rotary_dim / 2` pairs with `c + rotary_dim / 2`, at frequency
    `base ** (-2c / rotary_dim)`; the other channels pass unchanged (partial rotary, as GPT-J/NeoX). The
    frequencies are recomputed per call (no buffer to initialize or save). The model applies it with
    `apply_rotary` (PyTorch) or the `fat5_kernels.rope` pre-pass kernel.
    """

    max_positions: int | None = None

    def __init__(self, head_dim: int, fraction: float = 1.0, base: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dimension(head_dim, fraction)
        self.base = float(base)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}"

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)`, float32 `(*positions.shape, rotary_dim // 2)`, of integer `positions`."""
        half = self.rotary_dim // 2
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float32, device=positions.device) * 2 / self.rotary_dim)
        angles = positions.float()[..., None] * inv_freq
        return angles.cos(), angles.sin()

    def cos_sin(
        self, query_length: int, past_seen_tokens: int | torch.Tensor = 0, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` `(query_length, rotary_dim // 2)` of positions `past_seen_tokens + arange(query_length)`."""
        return self(torch.arange(query_length, dtype=torch.long, device=device) + past_seen_tokens)


def rotary_dimension(head_dim: int, fraction: float) -> int:
    """The number of channels RoPE rotates, `round(head_dim * fraction)`; a ValueError unless even and positive."""
    rotary_dim = round(head_dim * fraction)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"RoPE rotates channel pairs: `rope_fraction` ({fraction}) x `d_kv` ({head_dim}) = {head_dim * fraction:g} "
            f"must round to an even number of channels in (0, {head_dim}]; e.g. rope_fraction="
            f"{max(2, 2 * round(head_dim * fraction / 2)) / head_dim:g}."
        )
    return rotary_dim


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `2 * cos.shape[-1]` channels of `x` (the PyTorch path; `fat5_kernels.rope` on the kernel's).

    Args:
        x: `(B, H, L, D)` queries or keys, any float dtype.
        cos, sin: float32 `(L, rotary_dim // 2)`, from `RotaryPositionEmbedding.cos_sin`.

    Returns:
        `(B, H, L, D)` in `x`'s dtype; computed in float32.
    """
    return rotate_half_reference(x, cos, sin)


# ----------------------------------------------------------------------------------------------------------------
# FIRE
# ----------------------------------------------------------------------------------------------------------------
class FIREPositionBias(nn.Module):
    """FIRE (Li et al., 2024, "Functional Interpolation for Relative Positions Improves Long Context
    Transformers"): a learned function of the distance, normalized by the query position.

        b_h(i, j) = f_h( psi(|j - i|) / psi(max(L, i)) ),   psi(x) = log(c x + 1)

    with `f` an MLP `1 -> width -> num_heads` (ReLU), `c` and the threshold `L` learned ("progressive
    interpolation": queries past `L` see their distances shrink into the range seen in training). In the encoder
    (bidirectional) the MLP input carries the sign of `j - i`, so keys before and after a query differ; in the
    decoder only `j <= i` is read, which is the paper's causal form. `c` and `L` enter through their absolute
    values, and `max(L, i)` through at least 1, which keeps the ratio defined whatever the optimizer does to them.

    The bias is evaluated through the MLP's exact piecewise-linear form (`piecewise_linear_table`: `width`
    breakpoints, a slope and an intercept per head and segment), so it costs the memory of the `(1, H, M, N)`
    bias the PyTorch attention adds, never an `(M, N, width)` activation; `mlp_bias` is the plain evaluation.

    On the attention kernel's path: while every query position `i` is below the threshold (`i < max(|L|, 1)`,
    `is_distance_only`), the normalizer is the same for all queries and the bias is a function of the signed
    distance alone; `kernel_table` evaluates it once per distance, `(H, 2R + 1)`, and the kernel reads it as a
    per-distance table (no `L x L` tensor), its gradient flowing back to every FIRE parameter by autograd (the kernel
    differentiates tables for sequences up to 4096 tokens bidirectional, 8192 causal; longer training calls take the
    PyTorch path). A call with a query at or past the threshold (sequences longer than the threshold) that needs no
    gradient (evaluation, generation) reads `kernel_fire_bias`, FIRE's compact parameters, from which the kernel
    evaluates the bias per element (no `L x L` tensor either); training past the threshold takes the PyTorch path,
    which materializes the `(1, H, M, N)` bias.

    Parameters (state-dict keys under `...SelfAttention.relative_attention_bias.`): `mlp.0.weight` `(width, 1)`,
    `mlp.0.bias` `(width,)`, `mlp.2.weight` `(num_heads, width)`, `mlp.2.bias` `(num_heads,)`, `distance_scale`
    `()` (`c`), `threshold` `()` (`L`).
    """

    max_positions: int | None = None

    def __init__(self, num_heads: int, width: int, threshold: float, bidirectional: bool):
        super().__init__()
        self.num_heads = num_heads
        self.width = width
        self.bidirectional = bidirectional
        self.initial_threshold = float(threshold)  # `_init_weights` sets `threshold` to it
        self.mlp = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, num_heads))
        self.distance_scale = nn.Parameter(torch.empty(()))
        self.threshold = nn.Parameter(torch.empty(()))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, width={self.width}, bidirectional={self.bidirectional}"

    def normalized_distance(self, query_position: torch.Tensor, key_position: torch.Tensor) -> torch.Tensor:
        """The MLP input `sign * psi(|j - i|) / psi(max(L, i))` (float32), broadcasting the integer positions."""
        c = self.distance_scale.float().abs()
        distance = (key_position - query_position).float()
        magnitude = torch.log1p(c * distance.abs())
        # at least one position: a threshold trained to 0 must not divide the first query's distances by 0
        reach = torch.maximum(query_position.float(), self.threshold.float().abs()).clamp_min(1.0)
        normalizer = torch.log1p(c * reach)
        normalized = magnitude / normalizer
        return torch.where(distance < 0, -normalized, normalized) if self.bidirectional else normalized

    def is_distance_only(self, num_positions: int) -> bool:
        """Whether queries at positions `0 .. num_positions - 1` (cached tokens included) are all below the
        threshold, `i < max(|L|, 1)`: there the bias is a function of the distance alone and `kernel_table` is
        exact, gradients included (strictly below: at `i == |L|`, `forward`'s `maximum` splits the gradient
        between `i` and `L`).

        Reads the learned threshold from its device: one synchronization, which the model does once per stack
        forward, not per layer. Under `torch.compile` the read is a graph break at each stack's entry (the value
        decides the path; `fullgraph=True` raises there): compile a FIRE model without `fullgraph`.
        """
        if num_positions <= 1:
            return True
        threshold = self.threshold.detach()
        if hasattr(threshold, "full_tensor"):  # a sharded (DTensor) parameter outside its module's forward
            threshold = threshold.full_tensor()
        return num_positions - 1 < max(abs(float(threshold)), 1.0)

    @staticmethod
    def table_radius(max_length: int) -> int:
        """The radius `R` of `kernel_table` for sequences up to `max_length`: the smallest `2**k - 1 >= max_length - 1`
        (at least 1), rounded up so that few table sizes (kernel specializations) occur."""
        return max(1 << max(0, int(max_length) - 1).bit_length(), 2) - 1

    def kernel_table(self, max_length: int) -> torch.Tensor:
        """FIRE's bias of every signed distance, for the attention kernel's per-distance table (`distance_bias`).

        Exact for queries below the threshold (`is_distance_only`): column `d + R` holds `b_h(i, i + d)` for any
        such query `i`, computed with the same operations as `forward`, and differentiable in `distance_scale`,
        `threshold` and the MLP's parameters.

        Args:
            max_length (`int`): the longest sequence of the call (queries and keys), which sets the radius
                (`table_radius`).

        Returns:
            `torch.Tensor` of shape `(num_heads, 2R + 1)`, in the MLP's dtype (the dtype `forward`'s bias has).
        """
        radius = self.table_radius(max_length)
        device = self.threshold.device
        distance = torch.arange(-radius, radius + 1, dtype=torch.long, device=device)
        # a query at position 0: below the threshold, the normalizer psi(max(|L|, 1)) is that of any such query
        normalized = self.normalized_distance(torch.zeros((), dtype=torch.long, device=device), distance)
        return self._piecewise_linear_bias(normalized).to(self.mlp[0].weight.dtype)

    def kernel_fire_bias(self) -> FIREKernelBias:
        """FIRE's compact parameters for the attention kernel's in-kernel FIRE bias (`fire_bias`), exact at every
        query position, past the threshold included: `(distance_scale (), threshold (), breakpoints (width,), slopes
        (num_heads, width + 1), intercepts (num_heads, width + 1))`, float32. Differentiable in `distance_scale`,
        `threshold` and (through `piecewise_linear_table`) the MLP's parameters: the kernel's backward returns the
        gradients of all but the breakpoints, which are piecewise constant."""
        breakpoints, slopes, intercepts = self.piecewise_linear_table()
        return FIREKernelBias(self.distance_scale.float(), self.threshold.float(), breakpoints, slopes, intercepts)

    def piecewise_linear_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FIRE's MLP as the exact piecewise-linear function it is: `(breakpoints, slopes, intercepts)`.

        A ReLU MLP of one input is linear between the `width` points where a hidden unit switches on or off:
        `f_h(x) = slopes[h, k] * x + intercepts[h, k]` for `x` in segment `k = (breakpoints[k-1], breakpoints[k]]`
        (`torch.bucketize(x, breakpoints)`), which holds exactly. Returns float32 `breakpoints` `(width,)`, sorted
        (`inf` for units whose input weight is 0: they never switch), and `slopes`, `intercepts` `(num_heads,
        width + 1)`, differentiable in the MLP's parameters (which units are on in a segment is piecewise constant).
        """
        w1, b1 = self.mlp[0].weight[:, 0].float(), self.mlp[0].bias.float()
        w2, b2 = self.mlp[2].weight.float(), self.mlp[2].bias.float()
        with torch.no_grad():
            switch = torch.where(w1 != 0, -b1 / torch.where(w1 != 0, w1, 1.0), float("inf"))
            breakpoints = switch.sort().values
            inf = torch.full((1,), float("inf"), device=w1.device)
            low, high = torch.cat((-inf, breakpoints)), torch.cat((breakpoints, inf))
            # a point inside each segment (empty ones included: any value serves them)
            inside = torch.where(
                torch.isfinite(low) & torch.isfinite(high), (low + high) / 2,
                torch.where(torch.isfinite(high), high - 1, torch.where(torch.isfinite(low), low + 1, 0.0)),
            )  # fmt: skip
            active = (w1[:, None] * inside[None, :] + b1[:, None] > 0).float()  # (width, width + 1)
        slopes = w2 @ (w1[:, None] * active)
        intercepts = w2 @ (b1[:, None] * active) + b2[:, None]
        return breakpoints, slopes, intercepts

    def forward(
        self,
        query_length: int,
        key_length: int,
        past_seen_tokens: int | torch.Tensor = 0,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """The bias `(1, num_heads, query_length, key_length)` (arguments as `T5RelativePositionBias`), in the MLP's
        dtype.

        Evaluated through `piecewise_linear_table`: the MLP's value at every `(query, key)` pair without an
        `(M, N, width)` activation (memory of a few `(M, N)` tensors, as T5's materialized bias). `mlp_bias` is the
        plain MLP, the reference.
        """
        normalized = self._normalized_distances(query_length, key_length, past_seen_tokens, device)  # (M, N)
        return self._piecewise_linear_bias(normalized).to(self.mlp[0].weight.dtype).unsqueeze(0)

    def _piecewise_linear_bias(self, normalized: torch.Tensor) -> torch.Tensor:
        """float32 `(num_heads, *normalized.shape)`: the MLP at the float32 inputs `normalized`."""
        breakpoints, slopes, intercepts = self.piecewise_linear_table()
        segment = torch.bucketize(normalized.detach(), breakpoints)
        return slopes[:, segment] * normalized + intercepts[:, segment]

    def mlp_bias(
        self,
        query_length: int,
        key_length: int,
        past_seen_tokens: int | torch.Tensor = 0,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """`forward` computed plainly: the MLP applied to every `(query, key)` pair (an `(M, N, width)` activation)."""
        normalized = self._normalized_distances(query_length, key_length, past_seen_tokens, device)
        values = self.mlp(normalized.to(self.mlp[0].weight.dtype)[..., None])  # (M, N, H)
        return values.permute(2, 0, 1).unsqueeze(0)

    def _normalized_distances(self, query_length, key_length, past_seen_tokens, device) -> torch.Tensor:
        if device is None:
            device = self.threshold.device
        query_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past_seen_tokens
        key_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        return self.normalized_distance(query_position, key_position)


# ----------------------------------------------------------------------------------------------------------------
# Choosing one
# ----------------------------------------------------------------------------------------------------------------
def build_position_encoding(config, bidirectional: bool) -> nn.Module | None:
    """The position-encoding module that the first self-attention layer of a stack owns (shared by the stack).

    Args:
        config: a `FAT5Config` (`position_encoding_type` and its options).
        bidirectional: True for the encoder, False for the decoder's (causal) self-attention.

    Returns:
        `T5RelativePositionBias`, `ALiBiPositionBias`, `FIREPositionBias`, `RotaryPositionEmbedding`, or None for
        `"none"`.
    """
    kind = config.position_encoding_type
    if kind == "t5":
        return T5RelativePositionBias(
            config.relative_attention_num_buckets, config.num_heads, config.relative_attention_max_distance,
            bidirectional,
        )  # fmt: skip
    if kind == "alibi":
        return ALiBiPositionBias(config.num_heads, bidirectional)
    if kind == "fire":
        return FIREPositionBias(config.num_heads, config.fire_mlp_width, config.fire_threshold, bidirectional)
    if kind == "rope":
        return RotaryPositionEmbedding(config.d_kv, config.rope_fraction, config.rope_base)
    if kind == "none":
        return None
    raise ValueError(f"`position_encoding_type` must be one of {list(POSITION_ENCODINGS)}, got {kind!r}.")


__all__ = [
    "POSITION_ENCODINGS",
    "ALiBiPositionBias",
    "ALiBiSlopes",
    "DistanceBias",
    "FIREKernelBias",
    "RotaryAngles",
    "FIREPositionBias",
    "RotaryPositionEmbedding",
    "T5RelativePositionBias",
    "alibi_slopes",
    "apply_rotary",
    "build_position_encoding",
    "relative_position_bucket",
    "rotary_dimension",
]
