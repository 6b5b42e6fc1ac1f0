# Copyright 2026 The fat5-hf contributors. Licensed under the Apache License, Version 2.0.
"""The FAT5 kernels on stock Hugging Face T5-family models, without converting the checkpoint.

`apply_fat5_kernels(model=None, ...)` works in Liger-Kernel's two phases:

* it patches the `forward` of transformers' T5, mT5 and UMT5 classes, so models built or loaded afterwards run on the
  kernels;
* given an already loaded `model`, it also patches that model's modules in place.

The model keeps its class, its parameters and its state dict keys, so it saves, loads and pushes as the original
class. Each patched forward is transformers' maths on the PyTorch path (CPU tensors, or a call the kernel cannot
serve: `output_attentions`, attention-probability dropout, a KV cache it cannot read) and calls `fat5_hf.kernel_ops`
otherwise:

* `T5LayerNorm` -> the fused RMSNorm kernel;
* `T5DenseGatedActDense` (gated-gelu / gated-silu: T5 v1.1, FLAN-T5, mT5, UMT5) -> one `[wi_0; wi_1]` matmul and the
  fused gated activation;
* `T5Stack` + `T5Attention` -> the flash-attention kernel with T5's relative bias computed in-kernel; padded batches
  run unpadded (`fat5_hf.unpadding`); the decoder's cached steps of `generate()` (a `DynamicCache` or a compiled
  `StaticCache`, and the cached cross-attention) too, as FAT5's (`attention_with_cache`);
* the LM head and loss of `*ForConditionalGeneration` in training -> the fused linear + cross-entropy kernel, which
  never materializes the `(tokens, vocab)` logits (`fused_linear_cross_entropy`, the default, as Liger-Kernel's
  option of that name), or the cross-entropy kernel on the logits (`cross_entropy`).

What it could not patch (a non-gated feed-forward, UMT5's per-layer attention bias, an activation the kernel lacks)
is logged as a warning and listed in the returned `FAT5PatchReport`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_masks_for_generate
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, Seq2SeqLMOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from . import kernel_ops, unpadding
from .kernel_ops import FlashAttentionMask
from .modeling_fat5 import (
    _as_encoder_output,
    _block_hidden_states_observed,
    _bool_mask,
    _fusable_projections,
    _fused_projection,
    _match_wo_dtype,
    check_token_ids,
    decoder_mask_for_kernel,
    kernel_attention_with_cache,
    lm_head_and_loss,
)

logger = logging.get_logger(__name__)

# transformers' activation modules that the fused gated-activation kernel implements, by type.
_KERNEL_ACTIVATIONS = {
    "NewGELUActivation": "gelu_new",
    "GELUTanh": "gelu_pytorch_tanh",
    "PytorchGELUTanh": "gelu_pytorch_tanh",
    "SiLUActivation": "silu",
    "SiLU": "silu",
}

# model_type -> (transformers module, class-name prefix, whether its attention is T5's: one bias table in block 0)
_FAMILIES = {
    "t5": ("transformers.models.t5.modeling_t5", "T5", True),
    "mt5": ("transformers.models.mt5.modeling_mt5", "MT5", True),
    "umt5": ("transformers.models.umt5.modeling_umt5", "UMT5", False),
}

# Whether `*ForConditionalGeneration.forward` rescales the decoder output by `d_model**-0.5` before the LM head when
# `config.scale_decoder_outputs` (transformers 5: T5 and UMT5 do, for the original T5's tied embeddings; MT5 never).
_RESCALES_DECODER_OUTPUT = {"t5": True, "mt5": False, "umt5": True}

COMPONENTS = ("rms_norm", "gated_mlp", "attention", "cross_entropy", "fused_linear_cross_entropy")
# The report's entry for the decoder's steps over a KV cache (`attention_with_cache`).
_CACHED_STEPS = "attention (cached steps)"
# The two LM-loss components: alternatives, at most one of them on.
_LOSS_COMPONENTS = ("cross_entropy", "fused_linear_cross_entropy")
_KERNEL_OF_COMPONENT = {
    "rms_norm": "rms_norm",
    "gated_mlp": "gated_activation",
    "attention": "attention",
    "cross_entropy": "cross_entropy",
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
}


@dataclass
class FAT5PatchReport:
    """What `apply_fat5_kernels` patched.

    Attributes:
        patched (`dict[str, int]`): component -> number of modules (or classes, without a model) now on the kernels;
            `"attention (cached steps)"`: the decoder stacks whose steps over a KV cache run on the kernel too.
        not_patched (`dict[str, str]`): component -> why it keeps transformers' PyTorch code.
    """

    patched: dict[str, int] = field(default_factory=dict)
    not_patched: dict[str, str] = field(default_factory=dict)

    def _count(self, component: str) -> None:
        self.patched[component] = self.patched.get(component, 0) + 1


# ----------------------------------------------------------------------------------------------------------------
# Patched forwards. Each is built around the original forward, which it calls where the kernel path does not apply.
# ----------------------------------------------------------------------------------------------------------------
def _rms_norm_forward(original: Callable) -> Callable:
    def forward(self, hidden_states):
        return kernel_ops.rms_norm(hidden_states, self.weight, self.variance_epsilon, use_kernel=True)

    return forward


def _gated_mlp_forward(original: Callable) -> Callable:
    def forward(self, hidden_states):
        act_name = _KERNEL_ACTIVATIONS.get(type(self.act).__name__)
        if act_name is None:
            return original(self, hidden_states)
        if kernel_ops.can_use_packed_gated_activation(hidden_states, act_name, True) and _fusable_projections(
            self.wi_0, self.wi_1
        ):
            hidden_states = kernel_ops.gated_activation_packed(
                _fused_projection(hidden_states, self.wi_0, self.wi_1), act_name
            )
        else:
            gate, up = self.wi_0(hidden_states), self.wi_1(hidden_states)
            hidden_states = kernel_ops.gated_activation(gate, up, self.act, act_name, use_kernel=True)
        hidden_states = self.dropout(hidden_states)
        return self.wo(_match_wo_dtype(hidden_states, self.wo))

    return forward


def _attention_forward(original: Callable) -> Callable:
    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        if not isinstance(mask, FlashAttentionMask):
            return original(
                self, hidden_states, mask=mask, key_value_states=key_value_states, position_bias=position_bias,
                cache=cache, **kwargs,
            )  # fmt: skip
        # Kernel path: block 0 returns its `(num_heads, num_buckets)` table as the position bias, which the stack
        # hands to the other blocks.
        is_cross_attention = key_value_states is not None
        if not is_cross_attention and position_bias is None and self.has_relative_attention_bias:
            position_bias = self.relative_attention_bias.weight.t().contiguous()
        if cache is not None:  # a cached step of `generate()`: the new tokens over the cache, in the padded layout
            bias_table = None if is_cross_attention else position_bias
            attn_output = kernel_attention_with_cache(
                self, hidden_states, mask, key_value_states, cache, bias_table, kwargs=kwargs
            )
            return attn_output, position_bias, None
        t5_bias = dict(
            bidirectional=not self.is_decoder,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        input_shape = hidden_states.shape[:-1]
        if (
            not is_cross_attention
            and kernel_ops.can_use_qkv_packed_attention(mask)
            and _fusable_projections(self.q, self.k, self.v)
        ):
            qkv = _fused_projection(hidden_states, self.q, self.k, self.v)
            qkv = qkv.view(*input_shape, 3, self.n_heads, self.key_value_proj_dim)
            attn_output = kernel_ops.flash_self_attention_qkvpacked(qkv, mask, position_bias, **t5_bias)
            return self.o(attn_output.reshape(*input_shape, -1)), position_bias, None
        current_states = key_value_states if is_cross_attention else hidden_states
        query_states = self.q(hidden_states).view(*input_shape, -1, self.key_value_proj_dim).transpose(1, 2)
        kv_shape = (*current_states.shape[:-1], -1, self.key_value_proj_dim)
        key_states = self.k(current_states).view(kv_shape).transpose(1, 2)
        value_states = self.v(current_states).view(kv_shape).transpose(1, 2)
        bias_table = None if is_cross_attention else position_bias
        attn_output = kernel_ops.flash_attention(query_states, key_states, value_states, mask, bias_table, **t5_bias)
        return self.o(attn_output.reshape(*input_shape, -1).contiguous()), position_bias, None

    return forward


def _stack_can_use_kernels(
    stack, inputs: torch.Tensor, attention_mask, encoder_attention_mask, cache, use_cache, kwargs, cache_on_kernel
) -> bool:
    """Whether a patched stack's forward can run its attention on the kernel (else transformers' forward runs): with
    a KV cache (given, or the `DynamicCache` that a decoder with `use_cache` builds) only with `cache_on_kernel` and
    a cache the kernel reads."""
    config = stack.config
    if use_cache is None:
        # transformers' stack would build a cache from `config.use_cache`; in training nothing reads it.
        use_cache = config.use_cache and not stack.training
    wants_outputs = any(
        kwargs.get(name, getattr(config, name, False)) for name in ("output_attentions", "output_hidden_states")
    )
    attention_dropout = stack.block[0].layer[0].SelfAttention.dropout
    return (
        kernel_ops.can_use_flash_attention(
            True, inputs, attention_mask, cache, wants_outputs, attention_dropout, stack.training, cache_on_kernel
        )
        and (cache_on_kernel or not (stack.is_decoder and use_cache))
        and (encoder_attention_mask is None or encoder_attention_mask.dim() == 2)
    )


def _stack_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        inputs_embeds=None,
        cache=None,
        use_cache=None,
        **kwargs,
    ):
        cache = kwargs.pop("past_key_values", cache)
        inputs = inputs_embeds if inputs_embeds is not None else input_ids
        cache_on_kernel = forward._fat5_attention_with_cache
        if inputs is None or not _stack_can_use_kernels(
            self, inputs, attention_mask, encoder_attention_mask, cache, use_cache, kwargs, cache_on_kernel
        ):
            return original(
                self, input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, inputs_embeds=inputs_embeds, cache=cache,
                use_cache=use_cache, **kwargs,
            )  # fmt: skip
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        has_cross_attention = self.is_decoder and encoder_hidden_states is not None
        if not self.is_decoder:
            cache = None  # as transformers' stack: the encoder never touches the decoder's cache
        elif cache is None and (use_cache if use_cache is not None else self.config.use_cache and not self.training):
            cache = DynamicCache(config=self.config)
            if self.config.is_encoder_decoder:
                cache = EncoderDecoderCache(cache, DynamicCache(config=self.config))
        if cache is not None:
            return _stack_cached_step(
                self, inputs_embeds, attention_mask, encoder_hidden_states, encoder_attention_mask, cache
            )
        batch, length = inputs_embeds.shape[:2]
        masks = unpadding.stack_attention(
            attention_mask,
            encoder_attention_mask if has_cross_attention else None,
            batch=batch,
            length=length,
            encoder_length=encoder_hidden_states.shape[1] if has_cross_attention else None,
            causal=self.is_decoder,
            unpad_layers=not _block_hidden_states_observed(self.block),
            device=inputs_embeds.device,
        )
        hidden_states = self.dropout(inputs_embeds)
        if masks.unpadded:
            hidden_states = masks.pack(hidden_states)
            if has_cross_attention:
                encoder_hidden_states = masks.pack(encoder_hidden_states, encoder=True)
        position_bias = None
        for block in self.block:
            hidden_states, position_bias, _ = block(
                hidden_states,
                masks.self_attention,
                position_bias,
                encoder_hidden_states,
                masks.cross_attention,
                None,  # positional, as transformers' stack passes them, for gradient checkpointing
            )
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        if masks.unpadded:
            hidden_states = masks.unpack(hidden_states, batch, length)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states)

    # `apply_fat5_kernels(attention_with_cache=...)` sets it on each patched stack forward (`_switch_cached_steps`).
    forward._fat5_attention_with_cache = True
    return forward


def _stack_cached_step(
    stack, inputs_embeds, attention_mask, encoder_hidden_states, encoder_attention_mask, cache
) -> BaseModelOutputWithPastAndCrossAttentions:
    """A decoder step over a KV cache on the kernel (as `FAT5Stack`'s): the new tokens attend to the cache in the
    padded `(batch, key)` layout, under the 2D masks of the tokens so far and of the encoder."""
    self_attention = FlashAttentionMask(_bool_mask(attention_mask), causal=True)
    cross_attention = FlashAttentionMask(_bool_mask(encoder_attention_mask), causal=False)
    hidden_states = stack.dropout(inputs_embeds)
    position_bias = None
    for block in stack.block:
        hidden_states, position_bias, _ = block(
            hidden_states, self_attention, position_bias, encoder_hidden_states, cross_attention, None, cache=cache
        )
    hidden_states = stack.dropout(stack.final_layer_norm(hidden_states))
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)


def _create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, **kwargs):
    """`generate()`'s hook for the decoder mask of a compilable (static) cache, on a patched
    `*ForConditionalGeneration` (as `FAT5ForConditionalGeneration`'s): when the patched decoder runs its cached steps
    on the kernel, the 2D mask stays 2D (`decoder_mask_for_kernel`), so the step stays on the kernel; otherwise
    transformers' 4D mask."""
    decoder_on_kernel = getattr(self.decoder.forward, "_fat5_attention_with_cache", False)
    if decoder_on_kernel and kernel_ops.can_use_flash_attention(
        True, inputs_embeds, attention_mask, cache, False, 0.0, False, cache_on_kernel=True
    ):
        return decoder_mask_for_kernel(attention_mask, cache)
    return create_masks_for_generate(
        config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, **kwargs
    )


def _lm_loss_forward(original: Callable) -> Callable:
    signature = inspect.signature(original)
    var_keyword = next(p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        labels = arguments.get("labels")
        if labels is None:
            return original(self, *args, **kwargs)
        # transformers' forward without labels (it would compute the loss in PyTorch), then the loss kernel. The
        # labels are checked first, before `_shift_right` turns a bad label into a bad decoder input.
        check_token_ids(labels, self.config.vocab_size, "labels", ignore_index=-100)
        arguments["labels"] = None
        if arguments.get("decoder_input_ids") is None and arguments.get("decoder_inputs_embeds") is None:
            arguments["decoder_input_ids"] = self._shift_right(labels)
        extra = dict(arguments.pop(var_keyword, {}))
        return_dict = arguments.pop("return_dict", extra.pop("return_dict", None))
        arguments.pop("self")
        outputs = original(self, **arguments, **extra, return_dict=True)
        labels = labels.to(outputs.logits.device)
        loss, _ = kernel_ops.cross_entropy(
            outputs.logits.reshape(-1, outputs.logits.shape[-1]), labels.reshape(-1), use_kernel=True,
            check_labels=False,
        )  # fmt: skip
        outputs = type(outputs)(loss=loss, **outputs)  # rebuilt: `loss` first, as `to_tuple()` expects
        use_return_dict = return_dict if return_dict is not None else self.config.return_dict
        return outputs if use_return_dict else outputs.to_tuple()

    return forward


def _fused_lm_loss_forward(original: Callable) -> Callable:
    signature = inspect.signature(original)
    var_keyword = next(p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        extra = dict(arguments.pop(var_keyword, {}))
        labels = arguments.get("labels")
        if (
            labels is None
            or not self.training
            or arguments.get("cache") is not None
            or extra.get("past_key_values") is not None
            or not kernel_ops.can_fuse_linear_cross_entropy(self.lm_head.weight, self.lm_head, True)
        ):
            return original(self, *args, **kwargs)
        return_dict = extra.pop("return_dict", None)
        arguments.pop("self")
        outputs = _seq2seq_lm_fused_loss(self, **arguments, **extra)
        use_return_dict = return_dict if return_dict is not None else self.config.return_dict
        return outputs if use_return_dict else outputs.to_tuple()

    return forward


def _seq2seq_lm_fused_loss(
    model: PreTrainedModel,
    labels: torch.Tensor,
    input_ids=None,
    attention_mask=None,
    decoder_input_ids=None,
    decoder_attention_mask=None,
    encoder_outputs=None,
    cache=None,
    inputs_embeds=None,
    decoder_inputs_embeds=None,
    use_cache=None,
    **kwargs,
) -> Seq2SeqLMOutput:
    """transformers' `T5ForConditionalGeneration.forward` (5.24; MT5's and UMT5's are the same but for the rescale),
    with the LM head and loss on the fused kernel: `logits` is None. The loss is the stock one, the mean over labels
    != -100 of this call (0 rather than NaN when there are none); like the stock model, it ignores a
    `num_items_in_batch` that `Trainer` passes."""
    # Checked once, before `_shift_right` turns a bad label into a bad decoder input; skipped under torch.compile.
    check_token_ids(labels, model.config.vocab_size, "labels", ignore_index=-100)
    if encoder_outputs is None:
        encoder_outputs = model.encoder(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
    encoder_outputs = _as_encoder_output(encoder_outputs)
    if decoder_input_ids is None and decoder_inputs_embeds is None:
        decoder_input_ids = model._shift_right(labels)
    decoder_outputs = model.decoder(
        input_ids=decoder_input_ids,
        attention_mask=decoder_attention_mask,
        inputs_embeds=decoder_inputs_embeds,
        cache=cache,
        encoder_hidden_states=encoder_outputs.last_hidden_state,
        encoder_attention_mask=attention_mask,
        use_cache=use_cache,
        **kwargs,
    )
    sequence_output = decoder_outputs[0]
    if _RESCALES_DECODER_OUTPUT[model.config.model_type] and model.config.scale_decoder_outputs:
        sequence_output = sequence_output * (model.model_dim**-0.5)
    _, loss, _ = lm_head_and_loss(
        sequence_output, model.lm_head, labels, training=True, use_kernel=True, check_labels=False
    )
    return Seq2SeqLMOutput(
        loss=loss,
        logits=None,
        cache=decoder_outputs.cache,
        decoder_hidden_states=decoder_outputs.hidden_states,
        decoder_attentions=decoder_outputs.attentions,
        cross_attentions=decoder_outputs.cross_attentions,
        encoder_last_hidden_state=encoder_outputs.last_hidden_state,
        encoder_hidden_states=encoder_outputs.hidden_states,
        encoder_attentions=encoder_outputs.attentions,
    )


# component -> (class-name suffixes it patches, forward factory)
_PATCHES = {
    "rms_norm": (("LayerNorm",), _rms_norm_forward),
    "gated_mlp": (("DenseGatedActDense",), _gated_mlp_forward),
    "attention": (("Attention", "Stack"), None),
    "cross_entropy": (("ForConditionalGeneration",), _lm_loss_forward),
    "fused_linear_cross_entropy": (("ForConditionalGeneration",), _fused_lm_loss_forward),
}
_ATTENTION_FACTORIES = {"Attention": _attention_forward, "Stack": _stack_forward}


def _factory(component: str, suffix: str) -> Callable:
    return _ATTENTION_FACTORIES[suffix] if component == "attention" else _PATCHES[component][1]


def _unpatched(forward: Callable) -> Callable:
    return getattr(forward, "_fat5_original", forward)


def _patched(original: Callable, component: str, suffix: str) -> Callable:
    forward = functools.wraps(original)(_factory(component, suffix)(original))
    forward._fat5_original = original
    return forward


def _patch_class(cls: type, component: str, suffix: str) -> None:
    """Patch `cls.forward` (once)."""
    if not hasattr(cls.forward, "_fat5_original"):
        cls.forward = _patched(cls.forward, component, suffix)


def _patch_module(module: nn.Module, component: str, suffix: str) -> None:
    """Bind the patched forward to this module only, and show it in its repr (Liger's `_bind_method_to_module`)."""
    if hasattr(type(module).forward, "_fat5_original") or hasattr(vars(module).get("forward"), "_fat5_original"):
        return
    original = _unpatched(type(module).forward)
    module.forward = types.MethodType(_patched(original, component, suffix), module)
    name = type(module).__name__
    module._get_name = types.MethodType(lambda self: f"{name}[fat5]", module)


def _switch_cached_steps(stack_forward: Callable, on: bool) -> None:
    """Set the `attention_with_cache` switch of a patched stack forward (a class's function or a bound method)."""
    getattr(stack_forward, "__func__", stack_forward)._fat5_attention_with_cache = on


def _install_generation_mask_hook(owner: type | nn.Module) -> None:
    """`_create_masks_for_generate` on a `*ForConditionalGeneration` class or model, where `generate()` looks for a
    model's own `create_masks_for_generate` (T5's classes have none)."""
    if isinstance(owner, type):
        owner.create_masks_for_generate = _create_masks_for_generate
    else:
        owner.create_masks_for_generate = types.MethodType(_create_masks_for_generate, owner)


def _check_components(options: dict[str, bool]) -> list[str]:
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"apply_fat5_kernels: `{name}` must be True or False, got {value!r}.")
    return [name for name, value in options.items() if value]


def _family_of(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "fat5":
        raise TypeError(
            "apply_fat5_kernels: this is a FAT5 model, which runs on the kernels already (config switches)."
        )
    if model_type not in _FAMILIES:
        raise TypeError(
            f"apply_fat5_kernels patches transformers' T5, mT5 and UMT5 models (model_type "
            f"{sorted(_FAMILIES)}); got {type(model).__name__} with model_type={model_type!r}. Convert other "
            "T5-like checkpoints with `fat5_hf.convert` instead."
        )
    return model_type


def apply_fat5_kernels(
    model: nn.Module | None = None,
    *,
    rms_norm: bool = True,
    gated_mlp: bool = True,
    attention: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    attention_with_cache: bool = True,
) -> FAT5PatchReport:
    """Run transformers' T5, mT5 and UMT5 models on the FAT5 Triton kernels, in place.

    Without `model`: patches the classes of transformers' `t5`, `mt5` and `umt5` modules, so every model of those
    families (already built or built later) runs on the kernels. With `model`: patches only that model's modules,
    which keep their classes and parameters (`save_pretrained` writes the original class and state dict keys).
    The kernels run on CUDA tensors (on CPU tensors only inside `fat5_hf.kernel_ops.kernels_on_cpu()`, under the
    Triton interpreter); elsewhere the patched forwards are transformers' own maths.

    Args:
        model (`PreTrainedModel`, *optional*): a loaded `T5ForConditionalGeneration`, `T5EncoderModel`, `T5Model`,
            their mT5 / UMT5 counterparts, or a model containing them (e.g. a PEFT-wrapped one).
        rms_norm (`bool`): `T5LayerNorm` on the fused RMSNorm kernel.
        gated_mlp (`bool`): the gated feed-forward (gated-gelu, gated-silu) on one matmul and the fused activation.
        attention (`bool`): the stacks' attention on the flash kernel (relative bias in-kernel, padded batches
            unpadded). A call with `output_attentions`, or attention-probability dropout in training
            (`config.dropout_rate > 0`), keeps transformers' attention.
        cross_entropy (`bool`): the LM loss of `*ForConditionalGeneration` on the cross-entropy kernel, over the
            logits that transformers' LM head computes (kept in the output).
        fused_linear_cross_entropy (`bool`): in training with `labels` (and the kernels usable: CUDA tensors, a plain
            bias-free `nn.Linear` head), the LM head and the loss of `*ForConditionalGeneration` as one fused kernel
            that never materializes the `(batch, target_length, vocab)` logits: the output's `logits` is then None,
            as with Liger-Kernel's option of that name. In eval mode, without labels, in generation, or on the
            PyTorch path, transformers' forward runs and returns the logits. The default; exclusive with
            `cross_entropy`.
        attention_with_cache (`bool`): with `attention`, the decoder's steps over a KV cache (`generate()`, or a
            forward with `use_cache`) on the kernel too, as FAT5's `use_triton_attention_with_cache`: self-attention
            over a `DynamicCache` or a `StaticCache` (whose length the kernel reads on the device: a compiled static
            step is one graph) and cross-attention over the cached encoder keys and values. `generate()` then keeps
            the decoder mask 2D for a static cache (a `create_masks_for_generate` hook on the model). Other caches
            (sliding-window, quantized), and a static cache with gradients enabled, keep transformers' attention.
            False: every cached step on transformers' attention. Patching again updates it.

    Returns:
        `FAT5PatchReport`: what was patched and what was not (and why); the latter is also logged as a warning. The
        loss component left off when the other one is on is not listed.

    Raises:
        TypeError: `model` is not a T5, mT5 or UMT5 model (or is a FAT5 model), or an option is not a bool.
        ValueError: both `cross_entropy` and `fused_linear_cross_entropy` are True.
    """
    components = _check_components(
        dict(rms_norm=rms_norm, gated_mlp=gated_mlp, attention=attention, cross_entropy=cross_entropy,
             fused_linear_cross_entropy=fused_linear_cross_entropy)
    )  # fmt: skip
    _check_components(dict(attention_with_cache=attention_with_cache))
    if cross_entropy and fused_linear_cross_entropy:
        raise ValueError(
            "apply_fat5_kernels: the LM loss runs on one kernel: pass either cross_entropy=True or "
            "fused_linear_cross_entropy=True (the default), not both."
        )
    report = FAT5PatchReport()
    loss_on = any(name in components for name in _LOSS_COMPONENTS)
    for name in COMPONENTS:
        if name not in components and not (loss_on and name in _LOSS_COMPONENTS):
            report.not_patched[name] = "switched off by the caller"
    for name in list(components):
        if not kernel_ops.kernel_available(_KERNEL_OF_COMPONENT[name]):
            report.not_patched[name] = "triton or its fat5_kernels module is not importable: transformers' code runs"
            components.remove(name)
    if model is None:
        _patch_classes(components, report, attention_with_cache)
    else:
        _patch_model(model, components, report, attention_with_cache)
    if "attention" in report.patched and not attention_with_cache:
        report.not_patched[_CACHED_STEPS] = "switched off by the caller"
    for name, reason in report.not_patched.items():
        if reason != "switched off by the caller":
            logger.warning(f"apply_fat5_kernels: {name} not patched: {reason}")
    return report


def _patch_classes(components: list[str], report: FAT5PatchReport, attention_with_cache: bool) -> None:
    for model_type, (module_name, prefix, t5_attention) in _FAMILIES.items():
        module = importlib.import_module(module_name)
        for component in components:
            if component == "attention" and not t5_attention:
                report.not_patched.setdefault(
                    "attention", f"{model_type}: each layer has its own relative bias table (no kernel path)"
                )
                continue
            for suffix in _PATCHES[component][0]:
                _patch_class(getattr(module, f"{prefix}{suffix}"), component, suffix)
                report._count(component)
            if component == "attention":
                _switch_cached_steps(getattr(module, f"{prefix}Stack").forward, attention_with_cache)
                _install_generation_mask_hook(getattr(module, f"{prefix}ForConditionalGeneration"))
                if attention_with_cache:
                    report._count(_CACHED_STEPS)


def _patch_model(model: nn.Module, components: list[str], report: FAT5PatchReport, attention_with_cache: bool) -> None:
    families = {_family_of(m) for m in model.modules() if isinstance(m, PreTrainedModel)}
    if not families:
        _family_of(model)  # raises, naming the model's type
    for family in families:
        module_name, prefix, t5_attention = _FAMILIES[family]
        classes = vars(importlib.import_module(module_name))
        for component in components:
            if component == "attention" and not t5_attention:
                report.not_patched["attention"] = (
                    f"{family}: each layer has its own relative bias table (no kernel path)"
                )
                continue
            for suffix in _PATCHES[component][0]:
                wanted = classes[f"{prefix}{suffix}"]
                for module in model.modules():
                    if type(module) is wanted:
                        _patch_module(module, component, suffix)
                        report._count(component)
            if component == "attention":
                for module in model.modules():
                    if type(module) is classes[f"{prefix}Stack"] and module.is_decoder:
                        _switch_cached_steps(module.forward, attention_with_cache)
                        if attention_with_cache:
                            report._count(_CACHED_STEPS)
                    elif type(module) is classes[f"{prefix}ForConditionalGeneration"]:
                        _install_generation_mask_hook(module)
    _report_unpatched_modules(model, components, report)


def _report_unpatched_modules(model: nn.Module, components: list[str], report: FAT5PatchReport) -> None:
    """The model's parts that the patched components do not reach."""
    if "gated_mlp" in components:
        if any(
            type(m).__name__.endswith("DenseActDense") and "Gated" not in type(m).__name__ for m in model.modules()
        ):
            report.not_patched["gated_mlp"] = "the feed-forward is not gated (original T5's relu): no fused kernel"
        activations = {
            type(m.act).__name__ for m in model.modules() if type(m).__name__.endswith("DenseGatedActDense")
        }
        unsupported = sorted(a for a in activations if a not in _KERNEL_ACTIVATIONS)
        if unsupported:
            report.not_patched["gated_mlp"] = (
                f"activation {', '.join(unsupported)} has no fused kernel (gelu_new, gelu_pytorch_tanh, silu do): "
                "the feed-forward keeps transformers' code"
            )
    if "attention" in components and "attention" in report.patched:
        for m in model.modules():
            dropout = getattr(m, "dropout", 0.0)
            if type(m).__name__.endswith("Attention") and isinstance(dropout, float) and dropout > 0:
                report.not_patched["attention (training)"] = (
                    f"attention-probability dropout {dropout} has no kernel: training forwards keep transformers' "
                    "attention (evaluation and inference use the kernel). Load with `dropout_rate=0.0` to train on it."
                )
                break
    for name in _LOSS_COMPONENTS:
        if name in components and name not in report.patched:
            report.not_patched[name] = "no *ForConditionalGeneration head in this model (no LM loss)"
    if "fused_linear_cross_entropy" in report.patched:
        heads = [m.lm_head for m in model.modules() if type(m).__name__.endswith("ForConditionalGeneration")]
        if any(type(head) is not nn.Linear or head.bias is not None for head in heads):
            report.not_patched["fused_linear_cross_entropy"] = (
                "the LM head is not a plain bias-free nn.Linear (an adapter or wrapper on `lm_head`?): transformers' "
                "head and loss run"
            )


__all__ = ["COMPONENTS", "FAT5PatchReport", "apply_fat5_kernels"]
