# Copyright 2026 The fat5-hf contributors. Licensed under the Apache License, Version 2.0.
# Architecture from "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (T5) and
# transformers' `modeling_t5.py` (Mesh TensorFlow authors, T5 authors, HuggingFace Inc. team, Apache 2.0).
"""PyTorch FAT5: a drop-in T5 (same modules and parameter names) with seams for fused Triton kernels.

On CPU, or with the kernel switches off, every layer is transformers' T5 maths, so a T5, T5 v1.1, mT5 or FLAN-T5
state dict loads here unchanged and gives the same outputs. On CUDA with triton, `kernel_ops` routes attention (with
T5's relative bias computed in-kernel), RMSNorm, the gated activation and the loss to `fat5_kernels`.
"""

# No `from __future__ import annotations`: transformers inspects `**kwargs: Unpack[TransformersKwargs]` of the
# forwards at runtime (as for T5) to learn which output flags a model takes; string annotations hide it.
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask, create_masks_for_generate
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    QuestionAnsweringModelOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import DUMMY_INPUTS, DUMMY_MASK, TransformersKwargs, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

try:  # what transformers' output-capturing hooks collect during the current call (None: nothing)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # another transformers version: every hook on a block counts as reading its outputs
    _active_collector = None

from . import kernel_ops
from .configuration_fat5 import FAT5Config
from .hub import add_auto_map, write_remote_code
from .kernel_ops import FlashAttentionMask, PackedSequences, segment_ids_to_cu_seqlens
from .position_encoding import (
    ALiBiPositionBias,
    ALiBiSlopes,
    DistanceBias,
    FIREKernelBias,
    FIREPositionBias,
    RotaryAngles,
    RotaryPositionEmbedding,
    T5RelativePositionBias,
    apply_rotary,
    build_position_encoding,
)
from .unpadding import stack_attention

logger = logging.get_logger(__name__)


def check_token_ids(
    input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids", ignore_index: int | None = None
) -> None:
    """Raise a clear `ValueError` for token ids outside `[0, vocab_size)`.

    An out-of-range id would make the embedding lookup (or the loss) crash with an opaque device-side assert on GPU
    (or read garbage). Costs one small device-to-host copy; skipped under `torch.compile`.

    Args:
        input_ids (`torch.LongTensor` of any shape): the ids to check.
        vocab_size (`int`): number of rows of the embedding (or of the LM head's output).
        name (`str`): the argument's name in the error message.
        ignore_index (`int`, *optional*): a value that is allowed besides the ids (-100 for labels).
    """
    if input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if input_ids.dtype.is_floating_point:
        raise ValueError(f"`{name}` must hold integer token ids, got dtype {input_ids.dtype}.")
    if ignore_index is not None:
        # ignored positions count as id 0 (always valid); an all-ignored tensor passes
        input_ids = input_ids.masked_fill(input_ids == ignore_index, 0)
    min_id, max_id = torch.stack(torch.aminmax(input_ids)).tolist()
    if min_id < 0 or max_id >= vocab_size:
        if ignore_index is not None:
            raise ValueError(
                f"`{name}` holds ids in [{min_id}, {max_id}] (besides {ignore_index}, which marks ignored positions) "
                f"but the vocabulary has {vocab_size} entries (valid: 0..{vocab_size - 1} or {ignore_index}). Check "
                "that the tokenizer matches the model and that padding in the labels is replaced by "
                f"{ignore_index}."
            )
        raise ValueError(
            f"`{name}` holds token ids in [{min_id}, {max_id}] but the embedding has {vocab_size} rows (valid ids: "
            f"0..{vocab_size - 1}). Check that the tokenizer matches the model (or call "
            f"`model.resize_token_embeddings(len(tokenizer))`), and that `-100` (a label value) or other padding "
            "values are not passed as input ids."
        )


class FAT5LayerNorm(nn.Module):
    """T5's RMSNorm (no mean subtraction, no bias, variance in fp32), fused Triton kernel on CUDA if enabled."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-6, use_fused_kernel: bool = False, feeds_linear: bool = False
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.use_fused_kernel = use_fused_kernel
        # the norm in front of a block's projections: under autocast the kernel may output the autocast dtype
        self.feeds_linear = feeds_linear

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalized `hidden_states`; with `residual`, `(norm(hidden_states + residual), hidden_states + residual)`
        with the add done by the norm's kernel."""
        return kernel_ops.rms_norm(
            hidden_states, self.weight, self.variance_epsilon, self.use_fused_kernel, self.feeds_linear, residual
        )

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused={self.use_fused_kernel}"


def _norm_after_pending_add(
    layer_norm: FAT5LayerNorm, hidden_states: torch.Tensor, pending_output: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(residual stream, its norm)`. `pending_output` is the previous sublayer's output that its block left to be
    added here: the add runs inside the norm (one pass over the residual stream less)."""
    if pending_output is None:
        return hidden_states, layer_norm(hidden_states)
    normed, hidden_states = layer_norm(pending_output, residual=hidden_states)
    return hidden_states, normed


def _add_or_defer(
    hidden_states: torch.Tensor, output: torch.Tensor, defer_add: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A sublayer's residual connection, or `(residual stream, output)` for the next norm to add (`defer_add`)."""
    return (hidden_states, output) if defer_add else hidden_states + output


def _fusable_projections(*linears: nn.Module) -> bool:
    """Whether projections of one input may run as one matmul by their concatenated weights (the kernel paths' q/k/v
    and wi_0/wi_1): plain bias-free `nn.Linear`s of one weight dtype and device that nothing observes or wraps. A
    LoRA, quantized, offloaded (Accelerate hook) or hooked projection keeps its own call."""
    hooks = torch.nn.modules.module
    if (
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    ):
        return False
    weight = linears[0].weight
    return all(
        type(linear) is nn.Linear
        and linear.bias is None
        and not (
            linear._forward_hooks
            or linear._forward_pre_hooks
            or linear._backward_hooks
            or linear._backward_pre_hooks
            or "forward" in vars(linear)
        )
        and linear.weight.dtype == weight.dtype
        and linear.weight.device == weight.device
        for linear in linears
    )


def _fused_projection(hidden_states: torch.Tensor, *linears: nn.Linear) -> torch.Tensor:
    """`cat([linear(hidden_states) for linear in linears], -1)` as one matmul by the concatenated weights: a wider
    matmul runs faster, and so does its backward when the gradient comes back in one piece (H100, 32768 tokens,
    d_model 512: q/k/v forward 85 vs 102 us, input gradient 78 vs 176 us with the adds, weight gradient 80 vs 110)."""
    return nn.functional.linear(hidden_states, torch.cat([linear.weight for linear in linears]))


def _match_wo_dtype(hidden_states: torch.Tensor, wo: nn.Linear) -> torch.Tensor:
    """T5's guard before `wo`: match its dtype when it was kept in another precision (fp32 `wo` of an fp16 model).

    Skipped under autocast, where `wo` computes in the autocast dtype whatever its input: the cast there and back
    would be an exact round trip costing two passes over the activations.
    """
    if (
        isinstance(wo.weight, torch.Tensor)
        and hidden_states.dtype != wo.weight.dtype
        and wo.weight.dtype != torch.int8
        and not torch.is_autocast_enabled(hidden_states.device.type)
    ):
        hidden_states = hidden_states.to(wo.weight.dtype)
    return hidden_states


class FAT5DenseActDense(nn.Module):
    """Non-gated feed-forward (`relu` in original T5): `wo(dropout(act(wi(x))))`."""

    def __init__(self, config: FAT5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = ACT2FN[config.dense_act_fn]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wi(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return self.wo(_match_wo_dtype(hidden_states, self.wo))


class FAT5DenseGatedActDense(nn.Module):
    """Gated feed-forward (T5 v1.1, mT5, FLAN-T5): `wo(dropout(act(wi_0(x)) * wi_1(x)))`; fused activation on CUDA."""

    def __init__(self, config: FAT5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = ACT2FN[config.dense_act_fn]
        self.act_name = config.dense_act_fn
        self.use_fused_kernel = config.use_fused_glu

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if kernel_ops.can_use_packed_gated_activation(
            hidden_states, self.act_name, self.use_fused_kernel
        ) and _fusable_projections(self.wi_0, self.wi_1):
            gate_up = _fused_projection(hidden_states, self.wi_0, self.wi_1)
            hidden_states = kernel_ops.gated_activation_packed(gate_up, self.act_name)
        else:
            gate = self.wi_0(hidden_states)
            up = self.wi_1(hidden_states)
            hidden_states = kernel_ops.gated_activation(gate, up, self.act, self.act_name, self.use_fused_kernel)
        hidden_states = self.dropout(hidden_states)
        return self.wo(_match_wo_dtype(hidden_states, self.wo))


class FAT5LayerFF(nn.Module):
    def __init__(self, config: FAT5Config):
        super().__init__()
        if config.is_gated_act:
            self.DenseReluDense = FAT5DenseGatedActDense(config)
        else:
            self.DenseReluDense = FAT5DenseActDense(config)
        self.layer_norm = FAT5LayerNorm(
            config.d_model, config.layer_norm_epsilon, config.use_fused_rms_norm, feeds_linear=True
        )
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self, hidden_states: torch.Tensor, pending_output: torch.Tensor | None = None, defer_add: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`hidden_states + FF(norm(hidden_states))`. `pending_output`: the previous sublayer's output, added to
        `hidden_states` first (inside the norm's kernel). `defer_add`: return `(hidden_states, FF output)` unadded."""
        hidden_states, forwarded_states = _norm_after_pending_add(self.layer_norm, hidden_states, pending_output)
        forwarded_states = self.DenseReluDense(forwarded_states)
        return _add_or_defer(hidden_states, self.dropout(forwarded_states), defer_add)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialized attention with an additive position bias (transformers' T5 eager path).

    Returns `(attn_output (B, M, H, D), attn_weights (B, H, M, N))`.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        attn_weights = attn_weights + position_bias
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # a float32 bias (ALiBi's, FIRE's) over half-precision scores promotes them: back to the values' dtype
    attn_weights = nn.functional.softmax(attn_weights, dim=-1).to(value.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _kernel_bias(
    shared, per_distance: bool, num_heads: int
) -> tuple[torch.Tensor | DistanceBias | FIREKernelBias | None, torch.Tensor | None]:
    """`(bias_table, alibi_slopes)` for the attention kernel from what the first layer shared: T5's table, or with
    `per_distance` FIRE's table of every distance, marked `DistanceBias` for the kernel. The layers share FIRE's
    table as a plain tensor, as T5's, so that reentrant gradient checkpointing sees it as an input of each block
    (its gradient reaches FIRE's parameters through every layer). FIRE past its threshold is shared the same way, as
    its compact parameters flattened (`FIREKernelBias.flatten`, 1-D where the table is 2-D), which the kernel
    evaluates per element."""
    if isinstance(shared, ALiBiSlopes):
        return None, shared.slopes
    if isinstance(shared, torch.Tensor):
        if per_distance and shared.dim() == 1:
            return FIREKernelBias.unflatten(shared, num_heads), None
        return (DistanceBias(shared) if per_distance else shared), None
    return None, None


class FAT5Attention(nn.Module):
    """T5 multi-head attention (no score scaling, a position encoding in self-attention, optional KV cache).

    The first self-attention layer of a stack owns the position encoding (`config.position_encoding_type`, built by
    `position_encoding.build_position_encoding`) and returns what the other layers reuse as `position_bias`: a
    materialized bias for T5's buckets, ALiBi and FIRE on the PyTorch path, `RotaryAngles` for RoPE (queries and
    keys are rotated, before the KV cache), and on the kernel path T5's table, `ALiBiSlopes` or FIRE's per-distance
    table (`FIREPositionBias.kernel_table`), or past FIRE's threshold its compact parameters (`FIREKernelBias`,
    flattened, which the stack hands the first layer).

    Three backends, picked per call:

    * the Triton kernel when the stack passes a `FlashAttentionMask` (the bias is computed in-kernel from the
      `(num_heads, num_buckets)` table that the first layer returns as `position_bias`), also for the cached steps
      of `generate()` (`_kernel_forward_with_cache`);
    * otherwise transformers' attention interface selected by `config._attn_implementation` ("eager" or "sdpa",
      the bias materialized as `(1, H, M, N)` and added to the scores / folded into SDPA's float mask).
    """

    def __init__(
        self,
        config: FAT5Config,
        has_relative_attention_bias: bool = False,
        layer_idx: int | None = None,
        is_causal: bool = False,
    ):
        super().__init__()
        self.config = config
        self.is_decoder = config.is_decoder
        self.is_causal = is_causal
        self.has_relative_attention_bias = has_relative_attention_bias
        self.relative_attention_num_buckets = config.relative_attention_num_buckets
        self.relative_attention_max_distance = config.relative_attention_max_distance
        self.d_model = config.d_model
        self.key_value_proj_dim = config.d_kv
        self.n_heads = config.num_heads
        self.dropout = config.dropout_rate
        self.inner_dim = self.n_heads * self.key_value_proj_dim
        # T5 folds the scale into the initialisation of `q`: the scores are not scaled.
        self.scaling = 1.0
        self.layer_idx = layer_idx

        self.q = nn.Linear(self.d_model, self.inner_dim, bias=False)
        self.k = nn.Linear(self.d_model, self.inner_dim, bias=False)
        self.v = nn.Linear(self.d_model, self.inner_dim, bias=False)
        self.o = nn.Linear(self.inner_dim, self.d_model, bias=False)

        if self.has_relative_attention_bias:
            # T5's table and FIRE's MLP keep T5's name `relative_attention_bias` (state-dict keys), RoPE takes
            # transformers' `rotary_emb`; "none" has no module.
            encoding = build_position_encoding(config, bidirectional=not self.is_decoder)
            if isinstance(encoding, RotaryPositionEmbedding):
                self.rotary_emb = encoding
            elif encoding is not None:
                self.relative_attention_bias = encoding
        self.gradient_checkpointing = False

    @property
    def position_encoding(self) -> nn.Module | None:
        """The position-encoding module this layer owns (first self-attention layer of a stack), else None."""
        encoding = getattr(self, "relative_attention_bias", None)
        return encoding if encoding is not None else getattr(self, "rotary_emb", None)

    def _kernel_position_encoding(
        self, length: int, mask: FlashAttentionMask, past_seen_tokens: int | torch.Tensor = 0
    ) -> torch.Tensor | ALiBiSlopes | RotaryAngles | None:
        """What the kernel path shares across the stack for `length` new tokens after `past_seen_tokens` cached
        ones: T5's table, ALiBi's slopes, FIRE's per-distance table or RoPE's angles of the new positions (None
        without an encoding)."""
        encoding, device = self.position_encoding, self.q.weight.device
        if isinstance(encoding, T5RelativePositionBias):
            return encoding.kernel_table()
        if isinstance(encoding, FIREPositionBias):
            # here every query is below FIRE's threshold (`is_distance_only`: past it, the stack hands the first layer
            # FIRE's compact parameters, `FIREKernelBias.flatten`, and this is not called); in
            # the varlen layout the states are one row of all the sequences: the longest sequence sizes the table;
            # a cached step's queries reach back over the cache
            span = length if mask.queries is None else mask.queries.max_seqlen
            return encoding.kernel_table(span + int(past_seen_tokens))
        if isinstance(encoding, ALiBiPositionBias):
            return ALiBiSlopes(encoding.kernel_slopes(device))
        if isinstance(encoding, RotaryPositionEmbedding):
            return RotaryAngles(*encoding.cos_sin(length, past_seen_tokens, device=device))
        return None

    def _layer_cache(self, cache: Cache | None, is_cross_attention: bool) -> tuple[Cache | None, bool]:
        """`(this attention's cache, whether it already holds the cross-attention keys and values)`."""
        return _attention_layer_cache(cache, self.layer_idx, is_cross_attention)

    def _past_seen_tokens(self, cache: Cache | None) -> int | torch.Tensor:
        """Tokens already in the self-attention cache (`_cached_tokens`)."""
        return _cached_tokens(cache, self.layer_idx)

    def _kernel_forward_with_cache(
        self,
        hidden_states: torch.Tensor,
        mask: FlashAttentionMask,
        key_value_states: torch.Tensor | None,
        position_bias,
        cache: Cache,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor | ALiBiSlopes | RotaryAngles | None, None]:
        """The kernel path of a cached step (`generate()`, `kernel_attention_with_cache`), with this layer's position
        encoding: the first layer builds it for the new positions after the cache."""
        input_shape = hidden_states.shape[:-1]
        is_cross_attention = key_value_states is not None
        if not is_cross_attention and position_bias is None and self.has_relative_attention_bias:
            past_seen_tokens = self._past_seen_tokens(self._layer_cache(cache, False)[0])
            position_bias = self._kernel_position_encoding(input_shape[1], mask, past_seen_tokens)
        bias_table, slopes = _kernel_bias(
            None if is_cross_attention else position_bias, self.config.position_encoding_type == "fire", self.n_heads
        )
        rotate = None
        if not is_cross_attention and isinstance(position_bias, RotaryAngles):
            # the new positions; cached keys were rotated when they were new
            rotate = functools.partial(
                kernel_ops.rotary_embedding, cos=position_bias.cos, sin=position_bias.sin,
                use_kernel=self.config.use_triton_attention,
            )  # fmt: skip
        attn_output = kernel_attention_with_cache(
            self, hidden_states, mask, key_value_states, cache, bias_table, alibi_slopes=slopes, rotate=rotate,
            kwargs=kwargs,
        )  # fmt: skip
        return attn_output, position_bias, None

    def compute_bias(
        self, query_length: int, key_length: int, device: torch.device | None = None, past_seen_tokens=0
    ) -> torch.Tensor:
        """Materialized position bias `(1, num_heads, query_length, key_length)` (as T5's `compute_bias`) of T5's
        buckets, ALiBi or FIRE."""
        return self.relative_attention_bias(query_length, key_length, past_seen_tokens=past_seen_tokens, device=device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | FlashAttentionMask | None = None,
        key_value_states: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Self-attention, or cross-attention over `key_value_states`.

        Args:
            hidden_states (`(batch_size, seq_length, d_model)`).
            mask: 4D additive/boolean mask (PyTorch backends) or a `FlashAttentionMask` (kernel backend).
            key_value_states (`(batch_size, source_length, d_model)`, *optional*): encoder output for
                cross-attention.
            position_bias: `(1 or B, H, M, N)` materialized bias (PyTorch backends) or the `(H, num_buckets)` table
                (kernel backend); computed here by the first layer when None.
            cache (`Cache`, *optional*): KV cache (a generation step).

        Returns:
            `(attn_output (B, M, d_model), position_bias, attn_weights or None)`.
        """
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.key_value_proj_dim)
        is_cross_attention = key_value_states is not None

        if isinstance(mask, FlashAttentionMask) and cache is not None:
            return self._kernel_forward_with_cache(hidden_states, mask, key_value_states, position_bias, cache, kwargs)
        if isinstance(mask, FlashAttentionMask):
            # Kernel path: the bias is computed in-kernel from the shared table or slopes.
            if not is_cross_attention and position_bias is None and self.has_relative_attention_bias:
                position_bias = self._kernel_position_encoding(input_shape[1], mask)
            bias_table, slopes = _kernel_bias(
                None if is_cross_attention else position_bias, self.config.position_encoding_type == "fire",
                self.n_heads,
            )
            rotary = position_bias if not is_cross_attention and isinstance(position_bias, RotaryAngles) else None
            if (
                not is_cross_attention
                and rotary is None  # RoPE rotates q and k apart from v: separate projections
                and kernel_ops.can_use_qkv_packed_attention(mask)
                and _fusable_projections(self.q, self.k, self.v)
            ):
                qkv = _fused_projection(hidden_states, self.q, self.k, self.v)
                attn_output = kernel_ops.flash_self_attention_qkvpacked(
                    qkv.view(*input_shape, 3, self.n_heads, self.key_value_proj_dim),
                    mask,
                    bias_table,
                    bidirectional=not self.is_decoder,
                    num_buckets=self.relative_attention_num_buckets,
                    max_distance=self.relative_attention_max_distance,
                    alibi_slopes=slopes,
                )
                return self.o(attn_output.reshape(*input_shape, -1)), position_bias, None
            query_states = self.q(hidden_states).view(hidden_shape)
            current_states = key_value_states if is_cross_attention else hidden_states
            kv_shape = (*current_states.shape[:-1], -1, self.key_value_proj_dim)
            key_states = self.k(current_states).view(kv_shape)
            value_states = self.v(current_states).view(kv_shape).transpose(1, 2)
            if rotary is not None:  # one pre-pass over q and k, (B, L, H, D) as projected
                query_states, key_states = kernel_ops.rotary_embedding(
                    query_states, key_states, rotary.cos, rotary.sin, self.config.use_triton_attention
                )
            attn_output = kernel_ops.flash_attention(
                query_states.transpose(1, 2),
                key_states.transpose(1, 2),
                value_states,
                mask,
                bias_table,
                bidirectional=not self.is_decoder,
                num_buckets=self.relative_attention_num_buckets,
                max_distance=self.relative_attention_max_distance,
                alibi_slopes=slopes,
            )
            attn_output = attn_output.reshape(*input_shape, -1).contiguous()
            return self.o(attn_output), position_bias, None

        query_states = self.q(hidden_states).view(hidden_shape).transpose(1, 2)
        past_seen_tokens = self._past_seen_tokens(cache)
        curr_cache, is_updated = self._layer_cache(cache, is_cross_attention)

        if position_bias is None and isinstance(self.position_encoding, RotaryPositionEmbedding):
            # the new tokens sit after the cached ones; cached keys were rotated when they were new
            position_bias = RotaryAngles(
                *self.rotary_emb.cos_sin(input_shape[1], past_seen_tokens, device=query_states.device)
            )
        rotary = position_bias if not is_cross_attention and isinstance(position_bias, RotaryAngles) else None
        if rotary is not None:
            query_states = apply_rotary(query_states, *rotary)

        current_states = key_value_states if is_cross_attention else hidden_states
        if is_cross_attention and cache is not None and is_updated:
            # cross-attention keys/values are computed once, at the first generation step
            key_states = curr_cache.layers[self.layer_idx].keys
            value_states = curr_cache.layers[self.layer_idx].values
        else:
            kv_shape = (*current_states.shape[:-1], -1, self.key_value_proj_dim)
            key_states = self.k(current_states).view(kv_shape).transpose(1, 2)
            value_states = self.v(current_states).view(kv_shape).transpose(1, 2)
            if rotary is not None:
                key_states = apply_rotary(key_states, *rotary)  # never the values
            if cache is not None:
                key_states, value_states = curr_cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
                if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True

        if position_bias is None:
            key_length = key_states.shape[-2]
            if self.position_encoding is None:
                position_bias = torch.zeros(
                    (1, self.n_heads, input_shape[1], key_length), device=query_states.device, dtype=query_states.dtype
                )
                if self.gradient_checkpointing and self.training:
                    position_bias.requires_grad = True
            else:
                position_bias = self.compute_bias(
                    input_shape[1], key_length, device=query_states.device, past_seen_tokens=past_seen_tokens
                )

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=self.scaling,
            position_bias=None if rotary is not None else position_bias,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o(attn_output)
        return attn_output, position_bias, attn_weights


class FAT5LayerSelfAttention(nn.Module):
    def __init__(self, config: FAT5Config, has_relative_attention_bias: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.SelfAttention = FAT5Attention(
            config,
            has_relative_attention_bias=has_relative_attention_bias,
            layer_idx=layer_idx,
            is_causal=config.is_decoder,
        )
        self.layer_norm = FAT5LayerNorm(
            config.d_model, config.layer_norm_epsilon, config.use_fused_rms_norm, feeds_linear=True
        )
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_bias=None,
        cache=None,
        pending_output=None,
        defer_add=False,
        **kwargs,
    ):
        """`(hidden_states + attention(norm(hidden_states)), position_bias, attn_weights)`; `pending_output` and
        `defer_add` as in `FAT5LayerFF` (with `defer_add` the first item is the pair `(hidden_states, output)`)."""
        hidden_states, normed_hidden_states = _norm_after_pending_add(self.layer_norm, hidden_states, pending_output)
        attention_output, position_bias, attn_weights = self.SelfAttention(
            normed_hidden_states, mask=attention_mask, position_bias=position_bias, cache=cache, **kwargs
        )
        return _add_or_defer(hidden_states, self.dropout(attention_output), defer_add), position_bias, attn_weights


class FAT5LayerCrossAttention(nn.Module):
    def __init__(self, config: FAT5Config, layer_idx: int | None = None):
        super().__init__()
        self.EncDecAttention = FAT5Attention(
            config, has_relative_attention_bias=False, layer_idx=layer_idx, is_causal=False
        )
        self.layer_norm = FAT5LayerNorm(
            config.d_model, config.layer_norm_epsilon, config.use_fused_rms_norm, feeds_linear=True
        )
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self,
        hidden_states,
        key_value_states,
        attention_mask=None,
        position_bias=None,
        cache=None,
        pending_output=None,
        defer_add=False,
        **kwargs,
    ):
        """As `FAT5LayerSelfAttention.forward`, attending to `key_value_states`."""
        hidden_states, normed_hidden_states = _norm_after_pending_add(self.layer_norm, hidden_states, pending_output)
        attention_output, position_bias, attn_weights = self.EncDecAttention(
            normed_hidden_states,
            mask=attention_mask,
            key_value_states=key_value_states,
            position_bias=position_bias,
            cache=cache,
            **kwargs,
        )
        return _add_or_defer(hidden_states, self.dropout(attention_output), defer_add), position_bias, attn_weights


def _clamp_fp16_overflow(hidden_states: torch.Tensor) -> torch.Tensor:
    """T5's guard for fp16 training: if an inf appeared, clamp to just below the fp16 maximum."""
    if hidden_states.dtype == torch.float16:
        clamp_value = torch.where(
            torch.isinf(hidden_states).any(),
            torch.finfo(hidden_states.dtype).max - 1000,
            torch.finfo(hidden_states.dtype).max,
        )
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return hidden_states


def _stream_and_pending(
    sublayer_result: torch.Tensor | tuple[torch.Tensor, torch.Tensor], defer_add: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(residual stream, output left for the next norm)` after a sublayer called with `defer_add`; without it, the
    stream with T5's fp16 overflow clamp applied, and no pending output."""
    if defer_add:
        return sublayer_result
    return _clamp_fp16_overflow(sublayer_result), None


class FAT5Block(GradientCheckpointingLayer):
    """One T5 block: self-attention, cross-attention (decoder only), feed-forward; pre-norm residuals."""

    def __init__(self, config: FAT5Config, has_relative_attention_bias: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.is_decoder = config.is_decoder
        self.layer = nn.ModuleList()
        self.layer.append(
            FAT5LayerSelfAttention(
                config, has_relative_attention_bias=has_relative_attention_bias, layer_idx=layer_idx
            )
        )
        if self.is_decoder:
            self.layer.append(FAT5LayerCrossAttention(config, layer_idx=layer_idx))
        self.layer.append(FAT5LayerFF(config))

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_bias=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        encoder_decoder_position_bias=None,
        cache=None,
        pending_output=None,
        defer_output_add=False,
        **kwargs,
    ):
        """`(hidden_states, self-attention position bias, cross-attention position bias)`.

        `pending_output`: the previous block's feed-forward output, which that block left unadded (its
        `defer_output_add`): the add runs inside this block's first norm. `defer_output_add`: leave this block's
        own feed-forward add to the next block (or the stack's final norm) and return its output as a fourth item;
        the first item is then the residual stream without it. An fp16 residual stream keeps its adds in the
        blocks (T5's overflow clamp sits between add and norm): a pending output is added and clamped first.
        """
        # Each sublayer's residual add but the last is left to the next sublayer's norm, whose kernel fuses it (one
        # pass over the residual stream less, forward and backward); the last one too with `defer_output_add`. An
        # fp16 residual stream keeps the adds: T5 clamps overflows between the add and the next norm.
        defer_add = hidden_states.dtype != torch.float16
        if not defer_add and pending_output is not None:
            hidden_states, pending_output = _clamp_fp16_overflow(hidden_states + pending_output), None
        hidden_states, self_attn_position_bias, _ = self.layer[0](
            hidden_states,
            attention_mask=attention_mask,
            position_bias=position_bias,
            cache=cache,
            pending_output=pending_output,
            defer_add=defer_add,
            **kwargs,
        )
        hidden_states, pending_output = _stream_and_pending(hidden_states, defer_add)

        cross_attn_position_bias = None
        if self.is_decoder and encoder_hidden_states is not None:
            hidden_states, cross_attn_position_bias, _ = self.layer[1](
                hidden_states,
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                position_bias=encoder_decoder_position_bias,
                cache=cache,
                pending_output=pending_output,
                defer_add=defer_add,
                **kwargs,
            )
            hidden_states, pending_output = _stream_and_pending(hidden_states, defer_add)

        defer_output_add = defer_output_add and defer_add
        hidden_states = self.layer[-1](hidden_states, pending_output=pending_output, defer_add=defer_output_add)
        if defer_output_add:
            hidden_states, output = hidden_states
            return hidden_states, self_attn_position_bias, cross_attn_position_bias, output
        hidden_states = _clamp_fp16_overflow(hidden_states)
        return hidden_states, self_attn_position_bias, cross_attn_position_bias


# FSDP2's hooks gather and free a unit's parameters and hook its outputs' gradients; they read no values.
_HOOKS_THAT_READ_NO_VALUES = ("torch.distributed.fsdp.", "torch.distributed._composable.fsdp.")


def _may_read_values(hook) -> bool:
    return not getattr(hook, "__module__", "").startswith(_HOOKS_THAT_READ_NO_VALUES)


def _block_hidden_states_observed(blocks: nn.ModuleList) -> bool:
    """Whether something reads the blocks' input or output hidden states in this call: a forward (pre-)hook (a
    user's, or transformers' output capture while it collects hidden states; not FSDP2's). They must then be
    whole, each block's feed-forward add done inside it."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return True
    for block in blocks:
        if any(_may_read_values(hook) for hook in block._forward_pre_hooks.values()):
            return True
        for hook in block._forward_hooks.values():
            if not _may_read_values(hook):
                continue
            if getattr(hook, "__name__", None) != "output_capturing_hook" or _active_collector is None:
                return True
            collecting = _active_collector.get()
            if collecting and "hidden_states" in collecting:
                return True
    return False


class FAT5ClassificationHead(nn.Module):
    """Sentence-level head, T5 style: dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, config: FAT5Config):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(p=config.classifier_dropout)
        self.out_proj = nn.Linear(config.d_model, config.num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.dense(hidden_states)
        hidden_states = torch.tanh(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return self.out_proj(hidden_states)


class FAT5PreTrainedModel(PreTrainedModel):
    """Weight initialisation (T5's), `_shift_right`, and the flags transformers reads."""

    config_class = FAT5Config
    config: FAT5Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FAT5Block"]
    # T5's fp16 guard: `from_pretrained(..., dtype=torch.float16)` keeps the feed-forward output projections `wo`
    # in fp32 (bf16-trained T5 checkpoints overflow fp16 there). transformers applies it only to fp16 loads, so bf16
    # (the training default) stays pure bf16 with no layer forced to fp32.
    _keep_in_fp32_modules = ["wo"]

    # The bias goes through the eager path or SDPA's float mask (exact); flash-attention 2 and flex are not wired.
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_sdpa = True
    _can_compile_fullgraph = False

    _can_record_outputs = {
        "hidden_states": OutputRecorder(FAT5Block, index=0),
        "attentions": OutputRecorder(FAT5LayerSelfAttention, index=-1),
        "cross_attentions": OutputRecorder(FAT5LayerCrossAttention, index=-1),
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` (so `push_to_hub` too), plus the model and kernel code flattened into
        the folder and an `auto_map`: it loads with `trust_remote_code=True` where fat5-hf is not installed."""
        add_auto_map(self.config)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint that lacks the learned parameters of its position
        encoding (FIRE's MLP, or T5's table), which would otherwise be silently left at their random initialisation
        (e.g. a T5 checkpoint loaded with `position_encoding_type="fire"`)."""
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = [key for key in loading_info["missing_keys"] if ".relative_attention_bias." in key]
        if missing:
            kind = model.config.position_encoding_type
            raise ValueError(
                f"The checkpoint has no weights for the position encoding position_encoding_type={kind!r}: missing "
                f"{sorted(missing)}. It was trained with another encoding (a T5 checkpoint has only 't5'); load it "
                f"with the encoding it was trained with, or build a fresh model with `{cls.__name__}(config)` and "
                "train it."
            )
        return (model, loading_info) if wants_loading_info else model

    @property
    def dummy_inputs(self):
        input_ids = torch.tensor(DUMMY_INPUTS)
        input_mask = torch.tensor(DUMMY_MASK)
        return {"decoder_input_ids": input_ids, "input_ids": input_ids, "decoder_attention_mask": input_mask}

    def _init_weights(self, module):
        """T5's initialisation (Mesh TensorFlow), scaled by `config.initializer_factor`."""
        super()._init_weights(module)
        factor = self.config.initializer_factor
        d_model = self.config.d_model
        if isinstance(module, FAT5LayerNorm):
            init.constant_(module.weight, factor * 1.0)
        elif isinstance(module, (FAT5Model, FAT5ForConditionalGeneration, FAT5EncoderModel)):
            init.normal_(module.shared.weight, mean=0.0, std=factor * 1.0)
            if hasattr(module, "lm_head") and not self.config.tie_word_embeddings:
                init.normal_(module.lm_head.weight, mean=0.0, std=factor * 1.0)
        elif isinstance(module, FAT5ForQuestionAnswering):
            init.normal_(module.qa_outputs.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.zeros_(module.qa_outputs.bias)
        elif isinstance(module, FAT5ForTokenClassification):
            init.normal_(module.classifier.weight, mean=0.0, std=factor * 1.0)
            init.zeros_(module.classifier.bias)
        elif isinstance(module, FAT5ClassificationHead):
            init.normal_(module.dense.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.zeros_(module.dense.bias)
            init.normal_(module.out_proj.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, FAT5DenseActDense):
            init.normal_(module.wi.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.normal_(module.wo.weight, mean=0.0, std=factor * (self.config.d_ff**-0.5))
        elif isinstance(module, FAT5DenseGatedActDense):
            init.normal_(module.wi_0.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.normal_(module.wi_1.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.normal_(module.wo.weight, mean=0.0, std=factor * (self.config.d_ff**-0.5))
        elif isinstance(module, FAT5Attention):
            d_kv, n_heads = self.config.d_kv, self.config.num_heads
            init.normal_(module.q.weight, mean=0.0, std=factor * ((d_model * d_kv) ** -0.5))
            init.normal_(module.k.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.normal_(module.v.weight, mean=0.0, std=factor * (d_model**-0.5))
            init.normal_(module.o.weight, mean=0.0, std=factor * ((n_heads * d_kv) ** -0.5))
            if isinstance(module.position_encoding, T5RelativePositionBias):
                init.normal_(module.relative_attention_bias.weight, mean=0.0, std=factor * (d_model**-0.5))
        elif isinstance(module, FIREPositionBias):
            # FIRE's paper: c = 1 and the threshold L at its configured start; the MLP's input lies in about [-1, 1]
            init.normal_(module.mlp[0].weight, mean=0.0, std=factor * 1.0)
            init.zeros_(module.mlp[0].bias)
            init.normal_(module.mlp[2].weight, mean=0.0, std=factor * module.width**-0.5)
            init.zeros_(module.mlp[2].bias)
            init.constant_(module.distance_scale, 1.0)
            init.constant_(module.threshold, module.initial_threshold)

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers 5 treats any model defined outside its package as "custom code" and then only initializes
        # modules that own parameters, which skips the composite modules `_init_weights` dispatches on (attention,
        # MLPs, the model itself): q/k/v/o would keep a default init and the bias table its `torch.empty` garbage.
        # `_init_weights` uses `transformers.initialization`, which honours `_is_hf_initialized` per parameter, so
        # the in-library behaviour is safe here.
        super()._initialize_weights(module, is_custom_code=False)

    def _shift_right(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Labels -> decoder inputs: prepend `decoder_start_token_id`, drop the last token, -100 -> pad."""
        decoder_start_token_id = self.config.decoder_start_token_id
        pad_token_id = self.config.pad_token_id
        if decoder_start_token_id is None:
            raise ValueError(
                "`config.decoder_start_token_id` must be set to build decoder inputs from labels (T5 uses the pad "
                "token id, 0)."
            )
        if pad_token_id is None:
            raise ValueError("`config.pad_token_id` must be set to replace -100 labels in the decoder inputs.")
        shifted_input_ids = input_ids.new_zeros(input_ids.shape)
        shifted_input_ids[..., 1:] = input_ids[..., :-1].clone()
        shifted_input_ids[..., 0] = decoder_start_token_id
        shifted_input_ids.masked_fill_(shifted_input_ids == -100, pad_token_id)
        return shifted_input_ids


class FAT5Stack(FAT5PreTrainedModel):
    """The encoder or the decoder: embeddings, blocks (block 0 owns the relative bias table), final norm."""

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.is_decoder = config.is_decoder
        self.block = nn.ModuleList(
            [
                FAT5Block(config, has_relative_attention_bias=bool(i == 0), layer_idx=i)
                for i in range(config.num_layers)
            ]
        )
        self.final_layer_norm = FAT5LayerNorm(config.d_model, config.layer_norm_epsilon, config.use_fused_rms_norm)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.post_init()
        self.gradient_checkpointing = False

    def set_input_embeddings(self, new_embeddings):
        self.embed_tokens = new_embeddings

    def _check_sequence_length(self, seq_length: int, cache: Cache | None) -> None:
        """Raise a clear `ValueError` when the input is longer than the position encoding can serve (its
        `max_positions`; T5's relative buckets have no limit), instead of failing somewhere inside attention."""
        encoding = self.block[0].layer[0].SelfAttention.position_encoding
        max_positions = getattr(encoding, "max_positions", None)
        if max_positions is None:
            return
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        if past_length + seq_length > max_positions:
            part = "decoder" if self.is_decoder else "encoder"
            raise ValueError(
                f"The {part} input spans {past_length + seq_length} positions ({past_length} cached + {seq_length} "
                f"new) but position_encoding_type={self.config.position_encoding_type!r} serves at most "
                f"{max_positions}. Truncate the input (e.g. `tokenizer(..., truncation=True, "
                f"max_length={max_positions})`) or use a shorter `max_new_tokens`."
            )

    def _residual_stream_dtype(self, inputs_embeds: torch.Tensor) -> torch.dtype | None:
        """The dtype to cast the embeddings to (`config.residual_dtype`), or None to keep T5's stream.

        The residual adds promote, so the stream holds a dtype only if it is at least as wide as the sublayers'
        outputs (the autocast dtype, else the embeddings'). Otherwise the cast would only round the embeddings: in
        an fp32 model outside autocast (inference of a model pretrained with a bf16 stream) the stream stays fp32,
        as T5's; under another autocast dtype the model also warns.
        """
        if self.config.residual_dtype is None:
            return None
        wanted = getattr(torch, self.config.residual_dtype)
        device_type = inputs_embeds.device.type
        autocast = torch.is_autocast_enabled(device_type)
        compute = torch.get_autocast_dtype(device_type) if autocast else inputs_embeds.dtype
        if torch.promote_types(wanted, compute) == wanted:
            return wanted
        if autocast:
            logger.warning_once(
                f"config.residual_dtype={self.config.residual_dtype!r} cannot hold under {compute} autocast (the "
                f"residual adds would widen it): the residual stream stays {inputs_embeds.dtype}. Use "
                f"{self.config.residual_dtype} autocast (Accelerate's mixed_precision) or residual_dtype=None."
            )
        return None

    def _use_flash_attention(
        self, inputs_embeds, attention_mask, encoder_attention_mask, cache, kwargs
    ) -> tuple[bool, torch.Tensor | None]:
        """`(whether the stack runs its attention on the kernel, the position bias its first layer starts from)`: the
        latter is FIRE's compact parameters (flattened, `FIREKernelBias.flatten`) when the kernel evaluates FIRE per
        element, else None."""
        output_attentions = kwargs.get("output_attentions")
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if encoder_attention_mask is not None and encoder_attention_mask.dim() != 2:
            return False, None
        use_flash = kernel_ops.can_use_flash_attention(
            self.config.use_triton_attention,
            inputs_embeds,
            attention_mask,
            cache,
            bool(output_attentions),
            self.config.dropout_rate,
            self.training,
            cache_on_kernel=self.config.use_triton_attention_with_cache,
        )
        if use_flash and self.config.position_encoding_type == "fire":
            # The kernel reads FIRE's per-distance table, exact while every query (cached tokens included) is below
            # the learned threshold (one read of it per stack forward), and cheapest. Past it, or when the table is
            # too wide for the kernel's table gradient, the kernel evaluates FIRE per element from its compact
            # parameters, with their gradients; FIRE wider than that kernel serves takes the PyTorch path.
            length = (int(cache.get_seq_length()) if cache is not None else 0) + inputs_embeds.shape[1]
            encoding = self.block[0].layer[0].SelfAttention.position_encoding
            table_differentiable = not torch.is_grad_enabled() or kernel_ops.can_differentiate_distance_table(
                encoding.table_radius(length), encoding.bidirectional
            )
            if table_differentiable and encoding.is_distance_only(length):
                return True, None
            if not kernel_ops.can_evaluate_fire(encoding.width):
                return False, None
            return True, encoding.kernel_fire_bias().flatten()
        return use_flash, None

    @staticmethod
    def _checked_segment_ids(segment_ids, states, attention_mask, name: str) -> torch.Tensor:
        """Segment ids (the argument `name`) checked against the states they describe; tokens that the attention
        mask drops count as padding (id 0)."""
        if not isinstance(segment_ids, torch.Tensor) or tuple(segment_ids.shape) != tuple(states.shape[:2]):
            raise ValueError(
                f"{name} must be an integer tensor of shape (batch, length) = {tuple(states.shape[:2])} "
                f"(1, 2, ... per document of a packed row, 0 on padding); got "
                f"{tuple(getattr(segment_ids, 'shape', ()))}."
            )
        segment_ids = segment_ids.to(states.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            segment_ids = segment_ids * (attention_mask.to(segment_ids.device) != 0)
        return segment_ids

    def _segment_masks(self, segment_ids, encoder_segment_ids, use_flash: bool, dtype: torch.dtype):
        """Self- and cross-attention masks that keep each token within its document: `FlashAttentionMask`s over the
        kernel's varlen layout, or additive `(batch, 1, query, key)` masks for the PyTorch attention."""
        if use_flash:
            own = PackedSequences(*segment_ids_to_cu_seqlens(segment_ids))
            self_mask = FlashAttentionMask(key_padding_mask=None, causal=self.is_decoder, queries=own, keys=own)
            cross_mask = None
            if encoder_segment_ids is not None:
                encoder = PackedSequences(*segment_ids_to_cu_seqlens(encoder_segment_ids))
                documents = segment_ids.amax(dim=1), encoder_segment_ids.amax(dim=1)
                if own.cu_seqlens.numel() != encoder.cu_seqlens.numel() or not torch.equal(*documents):
                    raise ValueError(
                        "decoder_segment_ids and encoder_segment_ids must number the same documents in each row "
                        "(1..k, in order, each with input and target tokens)."
                    )
                cross_mask = FlashAttentionMask(key_padding_mask=None, causal=False, queries=own, keys=encoder)
            return self_mask, cross_mask

        def additive(query_ids, key_ids, causal):
            allowed = (query_ids[:, :, None] == key_ids[:, None, :]) & (key_ids[:, None, :] > 0)
            if causal:
                allowed = allowed & torch.ones(allowed.shape[1:], dtype=torch.bool, device=allowed.device).tril()
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

        cross = additive(segment_ids, encoder_segment_ids, False) if encoder_segment_ids is not None else None
        return additive(segment_ids, segment_ids, self.is_decoder), cross

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        inputs_embeds=None,
        cache=None,
        use_cache=None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if self.config.check_token_ids:
                check_token_ids(
                    input_ids, self.embed_tokens.num_embeddings, "decoder_input_ids" if self.is_decoder else "input_ids"
                )
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache is True and not self.is_decoder:
            raise ValueError(f"`use_cache` can only be set to `True` if {self} is used as a decoder")
        # Packed rows of several documents (`fat5_hf.ul2.DataCollatorForUL2(return_segment_ids=True)`): the top
        # models pass their kwargs to both stacks; each takes its own ids, the decoder also the encoder's.
        own_name = "decoder_segment_ids" if self.is_decoder else "encoder_segment_ids"
        segment_ids = kwargs.pop(own_name, None)
        encoder_segment_ids = kwargs.pop("encoder_segment_ids", None)
        kwargs.pop("decoder_segment_ids", None)
        if segment_ids is not None:
            if self.config.position_encoding_type == "fire":
                raise ValueError(
                    f"{own_name}: FIRE's bias depends on each query's position in its document, which packed rows "
                    "do not give it; pass one document per row (no segment ids) with position_encoding_type='fire'."
                )
            segment_ids = self._checked_segment_ids(segment_ids, inputs_embeds, attention_mask, own_name)
            if self.is_decoder and encoder_hidden_states is not None:
                if encoder_segment_ids is None:
                    raise ValueError(
                        "decoder_segment_ids needs encoder_segment_ids too: cross-attention keeps each target "
                        "document on its own input document."
                    )
                encoder_segment_ids = self._checked_segment_ids(
                    encoder_segment_ids, encoder_hidden_states, encoder_attention_mask, "encoder_segment_ids"
                )
            use_cache, cache = False, None  # packed rows are for training and scoring, not incremental decoding

        if self.is_decoder:
            if use_cache and cache is None:
                # The stack's config has `num_layers = num_decoder_layers`: the cache has one layer per decoder block.
                if self.config.is_encoder_decoder:
                    cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
                else:
                    cache = DynamicCache(config=self.config)
        else:
            # the encoder never uses (nor touches) the decoder's cache
            cache = None
        self._check_sequence_length(inputs_embeds.shape[1], cache)

        use_flash, kernel_position_bias = self._use_flash_attention(
            inputs_embeds, attention_mask, encoder_attention_mask, cache, kwargs
        )
        has_cross_attention = self.is_decoder and encoder_hidden_states is not None
        block_outputs_observed = _block_hidden_states_observed(self.block)
        encoder_extended_attention_mask = None
        kernel_attention = None
        if segment_ids is not None:
            attention_mask, encoder_extended_attention_mask = self._segment_masks(
                segment_ids, encoder_segment_ids if encoder_hidden_states is not None else None, use_flash,
                inputs_embeds.dtype,
            )  # fmt: skip
        elif use_flash and cache is not None:
            # A cached step: the keys come from the cache, in the padded (batch, key) layout.
            attention_mask = FlashAttentionMask(_bool_mask(attention_mask), causal=True)
            if has_cross_attention:
                encoder_extended_attention_mask = FlashAttentionMask(_bool_mask(encoder_attention_mask), causal=False)
        elif use_flash:
            # Padding becomes varlen metadata once for all layers; the layers run on the real tokens only unless
            # something reads the blocks' hidden states (which must keep their padded shape).
            kernel_attention = stack_attention(
                attention_mask,
                encoder_attention_mask if has_cross_attention else None,
                batch=inputs_embeds.shape[0],
                length=inputs_embeds.shape[1],
                encoder_length=encoder_hidden_states.shape[1] if has_cross_attention else None,
                causal=self.is_decoder,
                unpad_layers=not block_outputs_observed,
                device=inputs_embeds.device,
            )
            attention_mask = kernel_attention.self_attention
            encoder_extended_attention_mask = kernel_attention.cross_attention
        else:
            if self.is_decoder:
                attention_mask = create_causal_mask(
                    config=self.config,
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask,
                    cache=cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache,
                )
            else:
                attention_mask = create_bidirectional_mask(
                    config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
                )
            if self.is_decoder and encoder_hidden_states is not None:
                encoder_extended_attention_mask = create_bidirectional_mask(
                    config=self.config,
                    inputs_embeds=inputs_embeds,
                    attention_mask=encoder_attention_mask,
                    encoder_hidden_states=encoder_hidden_states,
                )

        position_bias = kernel_position_bias
        encoder_decoder_position_bias = None
        residual_dtype = self._residual_stream_dtype(inputs_embeds)
        if residual_dtype is not None:
            inputs_embeds = inputs_embeds.to(residual_dtype)
        hidden_states = self.dropout(inputs_embeds)
        if kernel_attention is not None and kernel_attention.unpadded:
            hidden_states = kernel_attention.pack(hidden_states)
            if has_cross_attention:
                encoder_hidden_states = kernel_attention.pack(encoder_hidden_states, encoder=True)

        # Each block's last residual add goes into the next block's first norm (the last one into the final norm),
        # unless the blocks' hidden states are read (asked for, hooks) or the blocks are checkpointed (a pending
        # output passed by keyword would lose its gradient under reentrant checkpointing).
        checkpointing = self.training and torch.is_grad_enabled() and any(b.gradient_checkpointing for b in self.block)
        defer_output_add = not (checkpointing or block_outputs_observed)
        pending_output = None
        for layer_module in self.block:
            block_outputs = layer_module(
                hidden_states,
                attention_mask,
                position_bias,
                encoder_hidden_states,
                encoder_extended_attention_mask,
                encoder_decoder_position_bias,  # positional, for gradient checkpointing
                cache=cache,
                pending_output=pending_output,
                defer_output_add=defer_output_add,
                **kwargs,
            )
            hidden_states, self_attention_position_bias, cross_attention_position_bias = block_outputs[:3]
            pending_output = block_outputs[3] if len(block_outputs) > 3 else None
            # T5 shares the first layer's position bias with all the layers of the stack
            position_bias = self_attention_position_bias
            if self.is_decoder and encoder_hidden_states is not None:
                encoder_decoder_position_bias = cross_attention_position_bias

        hidden_states = _norm_after_pending_add(self.final_layer_norm, hidden_states, pending_output)[1]
        hidden_states = self.dropout(hidden_states)
        if kernel_attention is not None and kernel_attention.unpadded:
            hidden_states = kernel_attention.unpack(hidden_states, *inputs_embeds.shape[:2])
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return mask.bool() if mask is not None else None


def _attention_layer_cache(cache: Cache | None, layer_idx: int, is_cross_attention: bool) -> tuple[Cache | None, bool]:
    """`(the attention's own cache, whether it already holds the cross-attention keys and values)`."""
    if isinstance(cache, EncoderDecoderCache):
        curr_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
        return curr_cache, bool(cache.is_updated.get(layer_idx))
    return cache, False


def _cached_tokens(cache: Cache | None, layer_idx: int) -> int | torch.Tensor:
    """Tokens already in a self-attention cache: an int, or a static cache's device tensor (a copy: the cache update
    increments it in place, and the value is used after it)."""
    past_seen_tokens = cache.get_seq_length(layer_idx) if cache is not None else 0
    return past_seen_tokens.clone() if isinstance(past_seen_tokens, torch.Tensor) else past_seen_tokens


def kernel_attention_with_cache(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    mask: FlashAttentionMask,
    key_value_states: torch.Tensor | None,
    cache: Cache,
    bias_table: torch.Tensor | DistanceBias | None,
    *,
    alibi_slopes: torch.Tensor | None = None,
    rotate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    kwargs: dict | None = None,
) -> torch.Tensor:
    """One cached step of a T5 attention layer on the kernel (the steps of `generate()`): self-attention of the new
    tokens over the cache (their bias computed in-kernel at their positions; a static cache's length passed as a
    device tensor, so that a compiled step serves every position with one graph), or cross-attention over the
    encoder keys and values (projected and cached at the first step). Shared by `FAT5Attention` and the patched
    stock `T5Attention` (`fat5_hf.monkey_patch`), which have the same projections and attributes.

    Args:
        attention: the layer (`q`, `k`, `v`, `o`, `layer_idx`, `is_decoder`, `key_value_proj_dim`,
            `relative_attention_num_buckets`, `relative_attention_max_distance`).
        hidden_states (`(batch, new_tokens, d_model)`): the normed states of the new tokens.
        mask (`FlashAttentionMask`): the padded layout's 2D mask (over the tokens so far, or the encoder's).
        key_value_states (`(batch, source_length, d_model)`, *optional*): the encoder output (cross-attention).
        cache (`Cache`): the decoder's cache (an `EncoderDecoderCache`, or one self-attention cache).
        bias_table: as `kernel_ops.flash_attention`'s (None for cross-attention).
        alibi_slopes: as `kernel_ops.flash_attention`'s.
        rotate: `(query, key) -> (query, key)` on `(batch, new_tokens, heads, head_dim)` projections before the
            keys are cached (RoPE's rotation of the new positions).
        kwargs: passed to the cache's `update`.

    Returns:
        `torch.Tensor` of shape `(batch, new_tokens, d_model)`: the output projection.
    """
    input_shape = hidden_states.shape[:-1]
    layer_idx = attention.layer_idx
    is_cross_attention = key_value_states is not None
    curr_cache, is_updated = _attention_layer_cache(cache, layer_idx, is_cross_attention)
    past_seen_tokens = 0 if is_cross_attention else _cached_tokens(curr_cache, layer_idx)

    query_states = attention.q(hidden_states).view(*input_shape, -1, attention.key_value_proj_dim)
    if is_cross_attention and is_updated:
        key_states = curr_cache.layers[layer_idx].keys
        value_states = curr_cache.layers[layer_idx].values
    else:
        current_states = key_value_states if is_cross_attention else hidden_states
        kv_shape = (*current_states.shape[:-1], -1, attention.key_value_proj_dim)
        key_states = attention.k(current_states).view(kv_shape)
        value_states = attention.v(current_states).view(kv_shape)
        if rotate is not None:
            query_states, key_states = rotate(query_states, key_states)
        key_states, value_states = curr_cache.update(
            key_states.transpose(1, 2), value_states.transpose(1, 2), layer_idx, kwargs=kwargs or {}
        )
        if is_cross_attention and isinstance(cache, EncoderDecoderCache):
            cache.is_updated[layer_idx] = True

    query_offset = None
    if not is_cross_attention and (
        isinstance(past_seen_tokens, torch.Tensor) or key_states.shape[-2] != past_seen_tokens + input_shape[1]
    ):
        # a static cache: more slots than tokens; the kernel reads where the new tokens sit from the device
        if not isinstance(past_seen_tokens, torch.Tensor):
            past_seen_tokens = torch.full((), past_seen_tokens, dtype=torch.long, device=query_states.device)
        query_offset = past_seen_tokens
    attn_output = kernel_ops.flash_attention(
        query_states.transpose(1, 2),
        key_states,
        value_states,
        mask,
        bias_table,
        bidirectional=not attention.is_decoder,
        num_buckets=attention.relative_attention_num_buckets,
        max_distance=attention.relative_attention_max_distance,
        alibi_slopes=alibi_slopes,
        query_offset=query_offset,
    )
    return attention.o(attn_output.reshape(*input_shape, -1))


def decoder_mask_for_kernel(attention_mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor | None:
    """`create_masks_for_generate`'s answer when the decoder's cached steps run on the kernel, which masks the future
    and a static cache's unfilled slots from the cache's length itself: the 2D decoder mask (usually None), padded to
    a static cache's slots so that a compiled step sees one shape at every step."""
    slots = cache.get_max_length() if cache is not None else -1  # -1: a dynamic cache
    if attention_mask is not None and slots > attention_mask.shape[1]:
        attention_mask = nn.functional.pad(attention_mask, (0, slots - attention_mask.shape[1]))
    return attention_mask


def _as_encoder_output(encoder_outputs) -> BaseModelOutput:
    if isinstance(encoder_outputs, BaseModelOutput):
        return encoder_outputs
    if isinstance(encoder_outputs, BaseModelOutputWithPastAndCrossAttentions):
        # The stack's own output. Read it by name: indexing a ModelOutput skips its None fields, so with
        # `output_attentions=True` alone `[1]` would be the attentions, filed as hidden states.
        return BaseModelOutput(
            last_hidden_state=encoder_outputs.last_hidden_state,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )
    return BaseModelOutput(
        last_hidden_state=encoder_outputs[0],
        hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
        attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
    )


def _build_stacks(config: FAT5Config) -> tuple[FAT5Stack, FAT5Stack]:
    encoder_config = copy.deepcopy(config)
    encoder_config.is_decoder = False
    encoder_config.use_cache = False
    encoder = FAT5Stack(encoder_config)

    decoder_config = copy.deepcopy(config)
    decoder_config.is_decoder = True
    decoder_config.num_layers = config.num_decoder_layers
    decoder = FAT5Stack(decoder_config)
    return encoder, decoder


class FAT5Model(FAT5PreTrainedModel):
    """The bare FAT5 encoder-decoder, outputting the decoder's last hidden states (as `T5Model`)."""

    _keys_to_ignore_on_load_unexpected = ["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"]
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder, self.decoder = _build_stacks(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new_embeddings):
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(new_embeddings)
        self.decoder.set_input_embeddings(new_embeddings)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        encoder_outputs: tuple[tuple[torch.Tensor]] | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): encoder token ids.
            attention_mask (`(batch_size, sequence_length)`, *optional*): 1 = token, 0 = padding.
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_length)`): decoder inputs, starting
                with `decoder_start_token_id` (see `_shift_right`).
            decoder_attention_mask (`(batch_size, target_length)`, *optional*): decoder padding mask (the causal
                mask is always applied).
            encoder_outputs (*optional*): precomputed encoder outputs (skips the encoder).
            cache (`EncoderDecoderCache`, *optional*): KV cache for generation (`past_key_values` is accepted as a
                deprecated alias, as in transformers 5.24).
            inputs_embeds, decoder_inputs_embeds (*optional*): embeddings instead of ids.
            use_cache (`bool`, *optional*): return the cache.

        Returns:
            `Seq2SeqModelOutput`.
        """
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
            )
        encoder_outputs = _as_encoder_output(encoder_outputs)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            encoder_hidden_states=encoder_outputs[0],
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


@dataclass
class FAT5Seq2SeqLMOutput(Seq2SeqLMOutput):
    """`Seq2SeqLMOutput` plus the two parts of the loss.

    Args:
        ce_loss (`torch.FloatTensor` of shape `()`, *optional*): the (label-smoothed) cross-entropy alone, detached.
        z_loss (`torch.FloatTensor` of shape `()`, *optional*): the z-loss term `config.z_loss * mean(logsumexp**2)`,
            detached (0 when `config.z_loss == 0`). `loss = ce_loss + z_loss`, with gradients through `loss`.
    """

    ce_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None


def lm_head_and_loss(
    sequence_output: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor | None,
    *,
    training: bool,
    use_kernel: bool,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    check_labels: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The LM head and its loss, as `FAT5ForConditionalGeneration` computes them (also used by the stock T5-family
    models that `fat5_hf.apply_fat5_kernels` patches).

    In training with labels, when `kernel_ops.can_fuse_linear_cross_entropy` allows it, the projection and the loss
    run as one fused kernel and the `(batch, target_length, vocab)` logits are never materialized (returned as
    None). Otherwise `lm_head` computes the logits and, with labels, `kernel_ops.cross_entropy` the loss (its kernel
    when `use_kernel` and possible, else PyTorch).

    Args:
        sequence_output (`torch.Tensor` of shape `(batch, target_length, d_model)`): decoder output, already
            rescaled where the model rescales it.
        lm_head (`nn.Module`): the `(vocab, d_model)` projection.
        labels (`torch.LongTensor` of shape `(batch, target_length)`, *optional*): ids or -100.
        training (`bool`): the model's mode (eval keeps the logits).
        use_kernel (`bool`): the loss kernels' switch.
        z_loss, label_smoothing, chunk_size, vocab_chunk_size, check_labels: as in
            `kernel_ops.fused_linear_cross_entropy`.

    Returns:
        `(logits, loss, z_loss_term)`: logits `(batch, target_length, vocab)` or None when fused; the loss (mean over
        labels != -100, fp32) and its z term, both None without labels.
    """
    fused = labels is not None and training
    if fused and kernel_ops.can_fuse_linear_cross_entropy(sequence_output, lm_head, use_kernel):
        loss, z_loss_term = kernel_ops.fused_linear_cross_entropy(
            sequence_output.reshape(-1, sequence_output.size(-1)),
            lm_head.weight,
            labels.to(sequence_output.device).reshape(-1),
            z_loss=z_loss,
            label_smoothing=label_smoothing,
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
            check_labels=check_labels,
        )
        return None, loss, z_loss_term
    lm_logits = lm_head(sequence_output)
    if labels is None:
        return lm_logits, None, None
    loss, z_loss_term = kernel_ops.cross_entropy(
        lm_logits.view(-1, lm_logits.size(-1)),
        labels.to(lm_logits.device).view(-1),  # model parallelism
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        use_kernel=use_kernel,
        check_labels=check_labels,
    )
    return lm_logits, loss, z_loss_term


class FAT5ForConditionalGeneration(FAT5PreTrainedModel, GenerationMixin):
    """FAT5 with a language-modeling head (as `T5ForConditionalGeneration`), for training and `generate()`.

    The loss is cross-entropy over labels != -100 (mean over those tokens; 0 when there are none) plus
    `config.z_loss * mean(logsumexp(logits)**2)`, with `config.label_smoothing`, computed in fp32.

    Logits rule: when the fused linear + cross-entropy kernel is used (CUDA, triton, `config.use_fused_cross_entropy`,
    `model.training` and `labels` given), the `(batch, target_length, vocab)` logits are never materialized and
    `logits` is `None`. In eval mode (and in `generate()`), or without labels, logits are always returned.

    Packed rows (several documents a row, as `fat5_hf.ul2.DataCollatorForUL2(return_segment_ids=True)` makes them):
    pass `encoder_segment_ids` and `decoder_segment_ids` (int `(batch, length)`, 1..k for the documents of a row in
    the same order on both sides, 0 on padding) as keyword arguments. Attention then stays within each document,
    each target document cross-attends to its own input document, and every document gets the outputs it would get
    alone (the kernel path runs the varlen kernel, one sequence per document). Also accepted by `FAT5Model`
    (both) and the encoder-only classes (`encoder_segment_ids`); not with a KV cache.
    """

    _keys_to_ignore_on_load_unexpected = ["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"]
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
        "lm_head.weight": "shared.weight",
    }

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.model_dim = config.d_model
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder, self.decoder = _build_stacks(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new_embeddings):
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(new_embeddings)
        self.decoder.set_input_embeddings(new_embeddings)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        encoder_outputs: tuple[tuple[torch.Tensor]] | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FAT5Seq2SeqLMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): encoder token ids.
            attention_mask (`(batch_size, sequence_length)`, *optional*): 1 = token, 0 = padding.
            decoder_input_ids (`(batch_size, target_length)`, *optional*): built from `labels` by `_shift_right`
                when omitted.
            decoder_attention_mask (`(batch_size, target_length)`, *optional*): decoder padding mask.
            encoder_outputs (*optional*): precomputed encoder outputs.
            cache (`EncoderDecoderCache`, *optional*): KV cache (`past_key_values` is a deprecated alias).
            inputs_embeds, decoder_inputs_embeds (*optional*): embeddings instead of ids.
            labels (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*): target ids in
                `[0, vocab_size)`, or -100 for positions that do not count.
            use_cache (`bool`, *optional*): return the cache.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*, keyword): the number of non-ignored labels in
                the whole (gradient-accumulated, possibly multi-process) batch, as transformers' `Trainer` passes
                it: the loss is then `sum / num_items_in_batch` instead of a mean over this call's labels, so that
                gradient accumulation gives the same update as one large batch.

        Returns:
            `FAT5Seq2SeqLMOutput` (`Seq2SeqLMOutput` with `ce_loss` and `z_loss`).

        Example:

        ```python
        >>> model = FAT5ForConditionalGeneration(FAT5Config(feed_forward_proj="gated-gelu"))
        >>> out = model(input_ids=input_ids, labels=labels)
        >>> out.loss.backward()
        >>> generated = model.generate(input_ids, max_new_tokens=20)
        ```
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if labels is not None and self.config.check_token_ids:
            # Checked here, once: before `_shift_right` turns a bad label into a bad decoder input (whose error would
            # not name `labels`), and so the loss kernels need not check (and sync) again.
            check_token_ids(labels, self.config.vocab_size, "labels", ignore_index=-100)
        if use_cache is None and (labels is not None or self.training):
            # A KV cache is only useful for generation; not building one in training lets the decoder use the
            # attention kernel (as Bart, FAT5 drops it when labels are given unless `use_cache=True` is passed).
            use_cache = False

        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
            )
        encoder_outputs = _as_encoder_output(encoder_outputs)
        hidden_states = encoder_outputs[0]

        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
            decoder_segment_ids = kwargs.get("decoder_segment_ids")
            if decoder_segment_ids is not None:  # packed targets: every document starts from the start token
                starts = torch.ones_like(decoder_segment_ids, dtype=torch.bool)
                starts[:, 1:] = decoder_segment_ids[:, 1:] != decoder_segment_ids[:, :-1]
                decoder_input_ids = decoder_input_ids.masked_fill(
                    starts.to(decoder_input_ids.device), self.config.decoder_start_token_id
                )

        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            encoder_hidden_states=hidden_states,
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )

        sequence_output = decoder_outputs[0]
        if self.config.scale_decoder_outputs:
            # original T5 (tied embeddings) rescales before the projection; v1.1 does not
            sequence_output = sequence_output * (self.model_dim**-0.5)

        ce_loss = None
        lm_logits, loss, z_loss_term = lm_head_and_loss(
            sequence_output,
            self.lm_head,
            labels,
            training=self.training,
            use_kernel=self.config.use_fused_cross_entropy,
            z_loss=self.config.z_loss,
            label_smoothing=self.config.label_smoothing,
            chunk_size=self.config.loss_chunk_size,
            vocab_chunk_size=self.config.loss_vocab_chunk_size,
            check_labels=False,  # checked at the top of forward
        )
        if loss is not None:
            if num_items_in_batch is not None:
                # The kernels and the reference return means over this call's labels: rescale to sum / total.
                scale = (labels.to(loss.device) != -100).sum() / num_items_in_batch
                loss, z_loss_term = loss * scale, z_loss_term * scale
            z_loss_term = z_loss_term.detach()
            # No subtraction without z-loss: Inductor (torch 2.13, CPU) folds the constant zero and returns a
            # `loss` without grad_fn when the graph also outputs `loss.detach() - 0` (tests/fat5_hf/test_modeling.py).
            ce_loss = loss.detach() - z_loss_term if self.config.z_loss > 0 else loss.detach()

        return FAT5Seq2SeqLMOutput(
            loss=loss,
            logits=lm_logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            ce_loss=ce_loss,
            z_loss=z_loss_term,
        )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return self._shift_right(labels)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, **kwargs):
        """`generate()`'s hook that turns the decoder's 2D mask into the 4D mask of a compilable (static) cache.

        When the decoder attends on the kernel, which masks the future and a static cache's unfilled slots from the
        cache's length itself, the 2D mask (usually None: no decoder mask) is kept, so the stack stays on the kernel
        path; it is padded to the static cache's slots, so that a compiled step sees one shape at every step.
        Otherwise transformers' `create_masks_for_generate` builds the 4D mask.
        """
        decodes_on_kernel = kernel_ops.can_use_flash_attention(
            config.use_triton_attention, inputs_embeds, attention_mask, cache, False, 0.0, False,
            cache_on_kernel=config.use_triton_attention_with_cache,
        )  # fmt: skip
        if decodes_on_kernel:
            return decoder_mask_for_kernel(attention_mask, cache)
        return create_masks_for_generate(
            config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, **kwargs
        )


class FAT5EncoderModel(FAT5PreTrainedModel):
    """The FAT5 encoder alone (as `T5EncoderModel`): embeddings + encoder stack."""

    _tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight"}
    _keys_to_ignore_on_load_unexpected = [r"decoder", r"lm_head"]

    def __init__(self, config: FAT5Config):
        # A copy: unlike T5EncoderModel, the caller's config object is not modified.
        config = copy.deepcopy(config)
        config.use_cache = False
        config.is_encoder_decoder = False
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder = False
        self.encoder = FAT5Stack(encoder_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new_embeddings):
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(new_embeddings)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.
            attention_mask (`(batch_size, sequence_length)`, *optional*): 1 = token, 0 = padding.
            inputs_embeds (`(batch_size, sequence_length, d_model)`, *optional*): instead of `input_ids`.

        Returns:
            `BaseModelOutput` with `last_hidden_state` of shape `(batch_size, sequence_length, d_model)`.
        """
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)


def _encoder_only_config(config: FAT5Config) -> FAT5Config:
    config = copy.deepcopy(config)
    config.use_cache = False
    config.is_encoder_decoder = False
    return config


class FAT5EncoderHeadModel(FAT5PreTrainedModel):
    """Base of the encoder-only heads: a `FAT5EncoderModel` as `self.transformer`, on an encoder-only copy of the
    config. A seq2seq checkpoint (FAT5 or T5) loads into any head: the decoder and `lm_head` weights are ignored."""

    _keys_to_ignore_on_load_unexpected = [r"decoder\.", r"lm_head"]

    def __init__(self, config: FAT5Config):
        super().__init__(_encoder_only_config(config))
        self.num_labels = self.config.num_labels
        self.transformer = FAT5EncoderModel(self.config)

    def get_input_embeddings(self):
        return self.transformer.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.transformer.set_input_embeddings(new_embeddings)

    def _encode(self, input_ids, attention_mask, inputs_embeds, kwargs: dict) -> BaseModelOutput:
        """Run the encoder. Decoder inputs, which T5's seq2seq heads take, are dropped with a warning: these heads
        have no decoder, so a T5 script that passes them keeps running but should know they change nothing."""
        ignored = sorted(key for key, value in kwargs.items() if key.startswith("decoder_") and value is not None)
        if ignored:
            logger.warning_once(
                f"{type(self).__name__} is encoder-only (unlike transformers' T5 heads): {', '.join(ignored)} "
                "are ignored."
            )
        kwargs = {key: value for key, value in kwargs.items() if not key.startswith("decoder_")}
        return self.transformer(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)


def check_class_labels(labels: torch.Tensor, num_labels: int, name: str = "labels", ignore_index: int = -100) -> None:
    """Raise a clear `ValueError` for class ids outside `[0, num_labels)` (``ignore_index`` allowed).

    PyTorch's cross-entropy reports them as a bare ``IndexError: Target 7 is out of bounds`` on CPU and as a
    device-side assert on GPU, naming neither the labels nor the model's ``num_labels``. One small device-to-host
    copy, like `check_token_ids`; skipped under `torch.compile`.

    Args:
        labels (`torch.LongTensor` of any shape): class ids.
        num_labels (`int`): the head's number of classes (`config.num_labels`).
        name (`str`): the argument's name in the error message.
        ignore_index (`int`): the value that marks positions the loss ignores (-100, as `CrossEntropyLoss`).
    """
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    if labels.dtype.is_floating_point:
        raise ValueError(
            f"`{name}` must hold integer class ids for single-label classification, got dtype {labels.dtype}."
        )
    # ignored positions count as class 0 (always valid): one min/max read back, as in check_token_ids
    class_ids = labels.masked_fill(labels == ignore_index, 0)
    min_id, max_id = torch.stack(torch.aminmax(class_ids)).tolist()
    if min_id < 0 or max_id >= num_labels:
        bad = sorted(set(class_ids[(class_ids < 0) | (class_ids >= num_labels)].tolist()))
        raise ValueError(
            f"`{name}` holds class ids {bad[:10]}{' ...' if len(bad) > 10 else ''} outside the model's "
            f"config.num_labels={num_labels} classes (valid: 0..{num_labels - 1}, or {ignore_index} to ignore a "
            f"position). Load the model with the dataset's number of classes, e.g. `from_pretrained(..., "
            f"num_labels={max(max_id + 1, num_labels)})` (and `id2label`/`label2id`), or check the label column."
        )


def check_span_positions(start_positions: torch.Tensor, end_positions: torch.Tensor) -> None:
    """Raise a clear `ValueError` for negative answer-span positions.

    Positions at or past the sequence length are ignored by the loss (transformers' convention for answers cut off
    by truncation), but the loss clamps negative ones to 0, the first token: a -100 meant as "no label" would train
    on a wrong span without any error.

    Args:
        start_positions, end_positions (`torch.LongTensor` of shape `(batch_size,)`): token positions.
    """
    if start_positions.numel() == 0 or torch.compiler.is_compiling():
        return
    if int(torch.minimum(start_positions.min(), end_positions.min())) >= 0:  # one read back for both
        return
    for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
        bad = sorted(set(positions[positions < 0].tolist()))
        if bad:
            raise ValueError(
                f"`{name}` holds negative positions {bad[:10]}; answer-span positions are token indices in "
                "[0, sequence_length) (positions >= sequence_length are ignored by the loss). Mark unanswerable "
                "examples with position 0, as transformers' question-answering examples do, or drop them."
            )


class FAT5ForSequenceClassification(FAT5EncoderHeadModel):
    """Encoder-only sequence classification / regression (CamemBERT-style use of a T5 encoder).

    Unlike transformers' `T5ForSequenceClassification` (which runs the decoder and pools the hidden state of the last
    EOS token), FAT5 runs only the encoder and pools by the **mean of the encoder's last hidden states over the
    non-padding tokens** (`attention_mask == 1`; all tokens when no mask is given), then applies a T5-style head:
    dropout -> dense -> tanh -> dropout -> out_proj. The loss follows `config.problem_type` like every transformers
    classifier: "regression" (MSE), "single_label_classification" (cross-entropy), "multi_label_classification"
    (BCE with logits); inferred from `num_labels` and the label dtype when unset.

    A seq2seq checkpoint (FAT5 or T5) loads into it: the encoder weights are used, the decoder and `lm_head` ignored.
    """

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.classification_head = FAT5ClassificationHead(self.config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.
            attention_mask (`(batch_size, sequence_length)`, *optional*): 1 = token, 0 = padding (used for pooling).
            inputs_embeds (*optional*): instead of `input_ids`.
            labels (`(batch_size,)` class ids, or `(batch_size, num_labels)` floats for regression/multi-label).

        Returns:
            `SequenceClassifierOutput` with `logits` of shape `(batch_size, num_labels)`.
        """
        outputs = self._encode(input_ids, attention_mask, inputs_embeds, kwargs)
        hidden_states = outputs[0]  # (batch_size, sequence_length, d_model)
        if attention_mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            if attention_mask.dim() != 2:
                raise ValueError(
                    "FAT5ForSequenceClassification pools over a 2D padding mask (batch_size, sequence_length); got "
                    f"a mask of shape {tuple(attention_mask.shape)}."
                )
            weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits = self.classification_head(pooled)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif self.num_labels > 1 and labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss_fct = MSELoss()
                if self.num_labels == 1:
                    loss = loss_fct(logits.squeeze(), labels.squeeze().to(logits.dtype))
                else:
                    loss = loss_fct(logits, labels.to(logits.dtype))
            elif self.config.problem_type == "single_label_classification":
                if self.config.check_token_ids:
                    check_class_labels(labels, self.num_labels)
                loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
            elif self.config.problem_type == "multi_label_classification":
                loss = BCEWithLogitsLoss()(logits, labels.to(logits.dtype))

        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class FAT5ForTokenClassification(FAT5EncoderHeadModel):
    """Encoder-only token classification (NER, POS...), as transformers' `T5ForTokenClassification`:
    encoder -> dropout(`classifier_dropout`) -> linear. Labels -100 are ignored."""

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.dropout = nn.Dropout(self.config.classifier_dropout)
        self.classifier = nn.Linear(self.config.hidden_size, self.config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.
            attention_mask (`(batch_size, sequence_length)`, *optional*): 1 = token, 0 = padding.
            inputs_embeds (*optional*): instead of `input_ids`.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): class ids, -100 ignored.

        Returns:
            `TokenClassifierOutput` with `logits` of shape `(batch_size, sequence_length, num_labels)`.
        """
        outputs = self._encode(input_ids, attention_mask, inputs_embeds, kwargs)
        hidden_states = self.dropout(outputs[0])
        logits = self.classifier(hidden_states)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.check_token_ids:
                check_class_labels(labels, self.num_labels)
            loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class FAT5ForQuestionAnswering(FAT5EncoderHeadModel):
    """Encoder-only extractive question answering (SQuAD-style span start/end logits on the encoder output).

    Unlike transformers' `T5ForQuestionAnswering` (which runs the decoder over the shifted input), FAT5 predicts the
    spans from the encoder's last hidden states with one linear layer (`qa_outputs`, 2 outputs: start and end).
    """

    def __init__(self, config: FAT5Config):
        super().__init__(config)
        self.qa_outputs = nn.Linear(self.config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        r"""
        Args (in the order of `T5ForQuestionAnswering.forward`, less its decoder arguments):
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): question + context token ids.
            attention_mask (`(batch_size, sequence_length)`, *optional*): 1 = token, 0 = padding.
            start_positions, end_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*): span labels;
                positions outside the sequence are ignored in the loss.
            inputs_embeds (*optional*): instead of `input_ids`.

        Returns:
            `QuestionAnsweringModelOutput` with `start_logits` and `end_logits` of shape `(batch_size,
            sequence_length)`.
        """
        outputs = self._encode(input_ids, attention_mask, inputs_embeds, kwargs)
        logits = self.qa_outputs(outputs[0])
        start_logits, end_logits = logits.split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()

        total_loss = None
        if start_positions is not None and end_positions is not None:
            if start_positions.dim() > 1:
                start_positions = start_positions.squeeze(-1)
            if end_positions.dim() > 1:
                end_positions = end_positions.squeeze(-1)
            if self.config.check_token_ids:
                check_span_positions(start_positions, end_positions)
            # positions outside the model inputs do not count
            ignored_index = start_logits.size(1)
            start_positions = start_positions.to(start_logits.device).clamp(0, ignored_index)
            end_positions = end_positions.to(end_logits.device).clamp(0, ignored_index)
            loss_fct = CrossEntropyLoss(ignore_index=ignored_index)
            total_loss = (loss_fct(start_logits, start_positions) + loss_fct(end_logits, end_positions)) / 2

        return QuestionAnsweringModelOutput(
            loss=total_loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "FAT5EncoderModel",
    "FAT5ForConditionalGeneration",
    "FAT5ForQuestionAnswering",
    "FAT5ForSequenceClassification",
    "FAT5ForTokenClassification",
    "FAT5Model",
    "FAT5PreTrainedModel",
    "FAT5Seq2SeqLMOutput",
    "FAT5Stack",
]
