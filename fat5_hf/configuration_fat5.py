# Copyright 2026 The fat5-hf contributors. Licensed under the Apache License, Version 2.0.
"""FAT5 model configuration: every `T5Config` field with the same meaning, plus FAT5's kernel and loss switches."""

from __future__ import annotations

import copy
import numbers
import re

import transformers
from huggingface_hub.dataclasses import strict

# The oldest transformers FAT5 runs on (pyproject.toml's bound; a test keeps the two equal). Checked here, on import,
# because this file also travels with models exported for `trust_remote_code`, where fat5-hf's own requirements are
# not installed: an older transformers would otherwise fail later with an unrelated-looking error. Major.minor are
# compared (a dev build of the minimum counts as the minimum), without `packaging`, which exported files do not import.
MIN_TRANSFORMERS_VERSION = "5.24"
_installed = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())
if _installed < tuple(int(part) for part in MIN_TRANSFORMERS_VERSION.split(".")):
    raise ImportError(
        f"FAT5 needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers {transformers.__version__} is "
        f"installed: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION},<6'"
    )

from transformers import PreTrainedConfig  # noqa: E402  (after the version check: older releases lack it)

# The position encodings of the self-attention (`position_encoding.build_position_encoding` builds them).
POSITION_ENCODINGS = ("t5", "alibi", "rope", "fire", "none")
RESIDUAL_DTYPES = (None, "float32", "bfloat16", "float16")


@strict
class FAT5Config(PreTrainedConfig):
    r"""
    Configuration of a FAT5 encoder-decoder. It accepts every field of transformers' `T5Config` with the same meaning
    and defaults (a `config.json` written for T5, T5 v1.1, mT5 or FLAN-T5 describes the same network here), and adds
    the switches for FAT5's fused kernels and training loss.

    Args:
        vocab_size (`int`, *optional*, defaults to 32128): Size of the vocabulary.
        d_model (`int`, *optional*, defaults to 512): Size of the hidden states.
        d_kv (`int`, *optional*, defaults to 64): Size of each attention head (need not be `d_model // num_heads`).
        d_ff (`int`, *optional*, defaults to 2048): Size of the feed-forward inner layer.
        num_layers (`int`, *optional*, defaults to 6): Number of encoder blocks.
        num_decoder_layers (`int`, *optional*): Number of decoder blocks; defaults to `num_layers`.
        num_heads (`int`, *optional*, defaults to 8): Number of attention heads.
        relative_attention_num_buckets (`int`, *optional*, defaults to 32): Number of relative-position buckets.
        relative_attention_max_distance (`int`, *optional*, defaults to 128): Distance beyond which all relative
            positions share one bucket.
        dropout_rate (`float`, *optional*, defaults to 0.1): Dropout probability of every dropout layer.
        layer_norm_epsilon (`float`, *optional*, defaults to 1e-6): Epsilon of the RMS norms.
        initializer_factor (`float`, *optional*, defaults to 1.0): Scale of the initialisation (1.0 for training).
        feed_forward_proj (`str`, *optional*, defaults to `"relu"`): `"{ACT}"` or `"gated-{ACT}"` with `ACT` a key
            of transformers' `ACT2FN`: `"relu"` (original T5), `"gated-gelu"` (T5 v1.1, mT5, FLAN-T5),
            `"gated-silu"`, `"gelu"`...
        classifier_dropout (`float`, *optional*, defaults to 0.0): Dropout of the classification heads.
        decoder_start_token_id (`int`, *optional*, defaults to 0): First decoder input (T5 uses the pad token).
        position_encoding_type (`str`, *optional*, defaults to `"t5"`): Position encoding of the encoder's and the
            decoder's self-attention (cross-attention has none): `"t5"` (T5's learned relative-position buckets,
            the only one a T5 checkpoint has), `"alibi"` (fixed per-head linear distance penalties, symmetric in
            the encoder, causal in the decoder), `"rope"` (rotary embeddings of queries and keys), `"fire"` (a
            learned MLP over the log distance, normalized by the query position) or `"none"`.
        rope_base (`float`, *optional*, defaults to 10000.0): RoPE's base: channel pair `c` turns at
            `rope_base ** (-2c / rotary_dim)` radians per position.
        rope_fraction (`float`, *optional*, defaults to 1.0): Fraction of each head's `d_kv` channels that RoPE
            rotates (partial rotary, e.g. 0.25 in GPT-NeoX); `d_kv * rope_fraction` must round to an even number.
        fire_mlp_width (`int`, *optional*, defaults to 32): Hidden width of FIRE's MLP (1 -> width -> num_heads).
        fire_threshold (`float`, *optional*, defaults to 512.0): Initial value of FIRE's learned interpolation
            threshold `L`: queries past position `L` have their distances normalized by their own position. While
            every query of a call is below the (learned) threshold, FIRE's bias depends on the distance alone and the
            Triton attention kernel reads it as an exact per-distance table (with gradients, for sequences up to
            4096 tokens in the encoder and 8192 in the decoder). A call with a query at or past it (or a training
            call longer than the table's gradient serves) is evaluated per element in the kernel from FIRE's
            piecewise-linear parameters, in training too: the backward returns the gradients of `distance_scale`,
            `threshold` and the MLP without an `L x L` tensor. A `fire_mlp_width` above 64 takes the PyTorch attention
            path there, which materializes the `(1, H, M, N)` bias.
        use_triton_attention (`bool`, *optional*, defaults to `True`): Use the Triton flash-attention kernel with the
            relative bias computed in-kernel when it can serve the call (CUDA tensors, triton installed, no
            `output_attentions`, no attention-probability dropout, 2D padding mask; a KV cache as
            `use_triton_attention_with_cache` says).
        use_triton_attention_with_cache (`bool`, *optional*, defaults to `True`): With `use_triton_attention`, also
            run the cached steps of `generate()` on the kernel: the decoder's self-attention over a `DynamicCache`
            or `StaticCache` (the new positions' bias computed in-kernel, a static cache's length read on the
            device) and cross-attention over the cached encoder keys. `False` keeps those steps on the PyTorch
            attention (`attn_implementation`), e.g. to compare their speed.
        use_fused_rms_norm (`bool`, *optional*, defaults to `True`): Use the fused Triton RMSNorm on CUDA.
        use_fused_glu (`bool`, *optional*, defaults to `True`): Use the fused gated activation (`gated-gelu`,
            `gated-silu`) on CUDA.
        use_fused_cross_entropy (`bool`, *optional*, defaults to `True`): On CUDA, compute the LM loss with the Triton
            cross-entropy kernel; in training (`model.training` with `labels`), fuse the `lm_head` projection into
            it, in which case the output `logits` is `None`.
        z_loss (`float`, *optional*, defaults to 0.0): Coefficient of the z-loss `mean(logsumexp(logits)**2)` added
            to the LM loss (PaLM uses 1e-4).
        label_smoothing (`float`, *optional*, defaults to 0.0): Label smoothing of the LM loss, in `[0, 1)`.
        loss_chunk_size (`int`, *optional*): Token rows per chunk of the fused training loss (the `lm_head`
            projection fused into the cross-entropy): it holds a `(loss_chunk_size, vocab_size)` logits buffer.
            `None` (default) takes the largest power of two up to 8192 rows that fits 1 GiB. Smaller chunks use
            less memory and run slower (see `fat5_kernels.fused_linear_cross_entropy.default_chunk_size`).
        loss_vocab_chunk_size (`int`, *optional*): Also slice the vocabulary of the fused training loss into
            slices of this many columns: a small `(rows, slice)` logits buffer (16 MiB by default) for one more
            logits matmul, under Liger-Kernel's peak memory but slower (bound by the host on 32k vocabularies
            outside CUDA graphs). `None` (default) keeps whole rows.
        check_token_ids (`bool`, *optional*, defaults to `True`): Check that `input_ids`, `decoder_input_ids` and
            `labels` lie in the vocabulary (a clear `ValueError` instead of a device-side assert). On a GPU each
            check waits for the ids (a host sync per check, which stalls kernel launches): a data pipeline that
            guarantees the range (the pretraining recipe's) can turn it off for speed.
        residual_dtype (`str`, *optional*): Dtype of the residual stream, the hidden states that run through the
            blocks: the embeddings are cast to it. `None` (default) keeps T5's, the embeddings' dtype (fp32 under
            autocast over fp32 weights). `"bfloat16"` under bf16 autocast keeps the stream, the norms' saved inputs
            and the stream's gradient in bf16, as T5X trains T5 (bf16 activations over fp32 parameters): the norms
            move half the bytes and the saved activations take less memory, at the cost of rounding each residual
            sum to bf16. `"float32"` keeps an fp32 stream in a bf16 or fp16 model (Megatron-LM's
            `fp32_residual_connection`). The residual adds promote, so the setting applies only where the stream
            can hold it, i.e. where the sublayers' outputs (the autocast dtype, else the model's) are no wider: an
            fp32 model outside autocast keeps T5's fp32 stream (so a model pretrained with `"bfloat16"` runs
            inference as T5), and another autocast dtype keeps it too, with a warning.

    The kernel switches only take effect on CUDA with triton installed; elsewhere FAT5 runs plain PyTorch that
    reproduces transformers' T5 exactly.

    Like transformers 5's `T5Config`, `tie_word_embeddings` is always stored as `True`; the original T5 convention
    (tied embeddings and decoder output rescaled by `d_model**-0.5`) versus v1.1 (no rescale, separate `lm_head`
    weights in the checkpoint) is recorded in `scale_decoder_outputs`, derived from `tie_word_embeddings=False` in
    older configs.

    Example:

    ```python
    >>> from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

    >>> config = FAT5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # a T5 v1.1 layout
    >>> model = FAT5ForConditionalGeneration(config)
    ```
    """

    model_type = "fat5"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    }

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float | int = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    is_encoder_decoder: bool = True
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0
    classifier_dropout: float | int = 0.0
    is_decoder: bool = False

    # FAT5's own fields.
    position_encoding_type: str = "t5"
    rope_base: float | int = 10000.0
    rope_fraction: float | int = 1.0
    fire_mlp_width: int = 32
    fire_threshold: float | int = 512.0
    use_triton_attention: bool = True
    use_triton_attention_with_cache: bool = True
    use_fused_rms_norm: bool = True
    use_fused_cross_entropy: bool = True
    use_fused_glu: bool = True
    z_loss: float | int = 0.0
    label_smoothing: float | int = 0.0
    loss_chunk_size: int | None = None
    loss_vocab_chunk_size: int | None = None
    check_token_ids: bool = True
    residual_dtype: str | None = None

    def __post_init__(self, **kwargs):
        self.num_decoder_layers = self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers
        if not isinstance(self.feed_forward_proj, str):
            raise ValueError(
                f"`feed_forward_proj` must be a string such as 'relu', 'gated-gelu' or 'gated-silu', got "
                f"{self.feed_forward_proj!r}."
            )

        act_info = self.feed_forward_proj.split("-")
        self.dense_act_fn = act_info[-1]
        self.is_gated_act = act_info[0] == "gated"
        # Same backwards-compatible alias as T5: "gated-gelu" means the tanh approximation of GELU.
        if self.feed_forward_proj == "gated-gelu":
            self.dense_act_fn = "gelu_new"

        # Same convention as transformers 5's T5Config: original T5 ties the embeddings and rescales the decoder
        # output by d_model**-0.5; v1.1 configs say `tie_word_embeddings: false` and do not rescale. The flag is
        # recorded as `scale_decoder_outputs` and `tie_word_embeddings` is always True (an untied `lm_head` in a
        # checkpoint is kept untied at load because both weights are present with different values).
        self.scale_decoder_outputs = kwargs.pop("tie_word_embeddings", None) is not False
        self.tie_word_embeddings = True

        super().__post_init__(**kwargs)
        # `@strict` wraps validation errors of `validate_*` methods in its own exception type; FAT5's checks raise
        # plain `ValueError`s here so that callers can catch them the usual way.
        self._check_fat5_fields()

    def _check_fat5_fields(self) -> None:
        positive_ints = (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_decoder_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.relative_attention_num_buckets < 2:
            raise ValueError(
                f"`relative_attention_num_buckets` must be at least 2 (half the buckets are exact offsets, half "
                f"logarithmic), got {self.relative_attention_num_buckets}."
            )
        # The decoder's (one-directional) bucketing gives distances below `num_buckets // 2` a bucket each and spaces
        # the rest logarithmically up to `max_distance`; with `max_distance <= num_buckets // 2` that log range is
        # empty or negative and the bucket ids come out negative (out-of-range reads of the bias table).
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise ValueError(
                f"`relative_attention_max_distance` ({self.relative_attention_max_distance}) must be larger than "
                f"`relative_attention_num_buckets // 2` ({self.relative_attention_num_buckets // 2}): distances "
                "below that get exact buckets and the rest are bucketed logarithmically up to the max distance. T5 "
                "uses 32 buckets and a max distance of 128."
            )
        for name in ("use_triton_attention", "use_triton_attention_with_cache", "use_fused_rms_norm",
                     "use_fused_cross_entropy", "use_fused_glu", "check_token_ids"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
        for name in ("dropout_rate", "classifier_dropout", "layer_norm_epsilon", "initializer_factor", "z_loss",
                     "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real: numpy floats too
                raise ValueError(f"`{name}` must be a number, got {value!r}.")
        for name in ("dropout_rate", "classifier_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}.")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"`layer_norm_epsilon` must be > 0, got {self.layer_norm_epsilon!r}.")
        if not self.initializer_factor > 0:
            raise ValueError(f"`initializer_factor` must be > 0, got {self.initializer_factor!r}.")

        act_info = self.feed_forward_proj.split("-")
        if (len(act_info) > 1 and act_info[0] != "gated") or len(act_info) > 2:
            raise ValueError(
                f"`feed_forward_proj`: {self.feed_forward_proj!r} is not a valid activation of the feed-forward "
                "layer. Use `gated-{ACT_FN}` or `{ACT_FN}`, e.g. 'relu' (T5), 'gated-gelu' (T5 v1.1, mT5, "
                "FLAN-T5) or 'gated-silu'."
            )
        from transformers.activations import ACT2FN

        if self.dense_act_fn not in ACT2FN:
            raise ValueError(
                f"`feed_forward_proj`: activation {self.dense_act_fn!r} (from {self.feed_forward_proj!r}) is not a "
                f"key of transformers' ACT2FN; use one of {sorted(ACT2FN)}."
            )

        self._check_position_encoding()

        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(
                f"`residual_dtype` must be None (the embeddings' dtype, as T5) or one of {list(RESIDUAL_DTYPES[1:])}, "
                f"got {self.residual_dtype!r}."
            )

        if not self.z_loss >= 0:
            raise ValueError(f"`z_loss` must be a non-negative coefficient (e.g. 1e-4), got {self.z_loss!r}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing!r}.")
        for name in ("loss_chunk_size", "loss_vocab_chunk_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"`{name}` must be None (the default) or a positive number of "
                    f"{'token rows' if name == 'loss_chunk_size' else 'vocabulary columns'}, got {value!r}."
                )

    def _check_position_encoding(self) -> None:
        if self.position_encoding_type not in POSITION_ENCODINGS:
            raise ValueError(
                f"`position_encoding_type` must be one of {list(POSITION_ENCODINGS)}, got "
                f"{self.position_encoding_type!r}."
            )
        for name in ("rope_base", "rope_fraction", "fire_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        if isinstance(self.fire_mlp_width, bool) or not isinstance(self.fire_mlp_width, int) or self.fire_mlp_width < 1:
            raise ValueError(f"`fire_mlp_width` must be a positive integer, got {self.fire_mlp_width!r}.")
        if self.position_encoding_type == "rope":
            rotated = self.d_kv * self.rope_fraction
            if self.rope_fraction > 1 or round(rotated) % 2 or round(rotated) == 0:
                even = max(2, 2 * round(rotated / 2))
                raise ValueError(
                    f"RoPE rotates channel pairs: `d_kv` ({self.d_kv}) x `rope_fraction` ({self.rope_fraction}) = "
                    f"{rotated:g} channels, which must round to an even number in [2, d_kv]. Use e.g. "
                    f"rope_fraction={min(even, self.d_kv - self.d_kv % 2) / self.d_kv:g}."
                )

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """Like `PreTrainedConfig.get_text_config`, but `decoder=True` reports the decoder depth.

        Generation sizes its KV caches with `get_text_config(decoder=True).num_hidden_layers`; T5 maps that to
        `num_layers` (the encoder depth), which breaks cached generation when `num_decoder_layers != num_layers`.
        """
        text_config = super().get_text_config(decoder=decoder, encoder=encoder)
        wants_decoder_only = bool(decoder) and not encoder
        if wants_decoder_only and text_config.num_layers != text_config.num_decoder_layers:
            if text_config is self:
                text_config = copy.deepcopy(self)
            text_config.num_layers = text_config.num_decoder_layers
        return text_config


__all__ = ["FAT5Config"]
