"""FAT5Config: T5Config compatibility, FAT5 fields, validation, Auto classes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTextEncoding,
    AutoModelForTokenClassification,
    PreTrainedConfig,
    T5Config,
)

import fat5_hf
from fat5_hf import (
    FAT5Config,
    FAT5EncoderModel,
    FAT5ForConditionalGeneration,
    FAT5ForQuestionAnswering,
    FAT5ForSequenceClassification,
    FAT5ForTokenClassification,
    FAT5Model,
)


def test_defaults_match_t5config():
    t5, fat5 = T5Config(), FAT5Config()
    for field in dataclasses.fields(T5Config):
        assert getattr(fat5, field.name) == getattr(t5, field.name), field.name
    for derived in ("dense_act_fn", "is_gated_act", "scale_decoder_outputs", "tie_word_embeddings"):
        assert getattr(fat5, derived) == getattr(t5, derived), derived
    assert fat5.decoder_start_token_id == 0  # T5's checkpoints set it; T5Config() lacks it
    assert fat5.hidden_size == 512 and fat5.num_attention_heads == 8 and fat5.num_hidden_layers == 6
    assert fat5.head_dim == 64


def test_every_t5_field_round_trips():
    values = dict(
        vocab_size=250112,
        d_model=48,
        d_kv=16,
        d_ff=96,
        num_layers=3,
        num_decoder_layers=5,
        num_heads=6,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        dropout_rate=0.05,
        layer_norm_epsilon=1e-5,
        initializer_factor=0.5,
        feed_forward_proj="gated-silu",
        is_encoder_decoder=True,
        use_cache=False,
        pad_token_id=3,
        eos_token_id=2,
        classifier_dropout=0.2,
        is_decoder=False,
    )
    t5_own_fields = {f.name for f in dataclasses.fields(T5Config)} - {f.name for f in dataclasses.fields(PreTrainedConfig)}
    assert t5_own_fields <= set(values)
    config = FAT5Config(**values, decoder_start_token_id=3, z_loss=1e-4, label_smoothing=0.1)
    reloaded = FAT5Config.from_dict(config.to_dict())
    for name, value in values.items():
        assert getattr(reloaded, name) == value, name
    assert reloaded.dense_act_fn == "silu" and reloaded.is_gated_act
    assert reloaded.z_loss == 1e-4 and reloaded.label_smoothing == 0.1 and reloaded.decoder_start_token_id == 3


@pytest.mark.parametrize(
    "config_json, scale",
    [
        ({"feed_forward_proj": "relu"}, True),  # original T5
        ({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}, False),  # v1.1 config, older writers
        ({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": True, "scale_decoder_outputs": False}, False),
    ],
)
def test_tie_word_embeddings_and_scale_decoder_outputs_like_t5(config_json, scale):
    t5, fat5 = T5Config.from_dict(config_json), FAT5Config.from_dict(config_json)
    assert t5.scale_decoder_outputs == fat5.scale_decoder_outputs == scale
    assert t5.tie_word_embeddings is fat5.tie_word_embeddings is True
    assert FAT5Config.from_dict(fat5.to_dict()).scale_decoder_outputs == scale


def test_gated_gelu_is_the_tanh_approximation():
    assert FAT5Config(feed_forward_proj="gated-gelu").dense_act_fn == "gelu_new"
    assert FAT5Config(feed_forward_proj="gelu").dense_act_fn == "gelu"


def test_fat5_fields_defaults():
    config = FAT5Config()
    assert config.position_encoding_type == "t5"
    assert config.use_triton_attention and config.use_fused_rms_norm and config.use_fused_cross_entropy
    assert config.use_fused_glu
    assert config.z_loss == 0.0 and config.label_smoothing == 0.0
    assert config.residual_dtype is None
    assert config.loss_chunk_size is None and config.loss_vocab_chunk_size is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(position_encoding_type="sinusoidal"), r"position_encoding_type` must be one of \['t5', 'alibi'"),
        (dict(feed_forward_proj="gated-gelu-x"), "feed_forward_proj"),
        (dict(feed_forward_proj="relu-gated"), "feed_forward_proj"),
        (dict(feed_forward_proj="gated-nonsense"), "not a key of transformers' ACT2FN"),
        (dict(d_model=0), "`d_model` must be a positive integer"),
        (dict(num_heads=-2), "`num_heads` must be a positive integer"),
        (dict(num_decoder_layers=0), "`num_decoder_layers` must be a positive integer"),
        (dict(relative_attention_num_buckets=1), "at least 2"),
        # the decoder's bucketing needs max_distance > num_buckets // 2 (else negative bucket ids)
        (dict(relative_attention_num_buckets=8, relative_attention_max_distance=4),
         r"`relative_attention_max_distance` \(4\) must be larger than `relative_attention_num_buckets // 2` \(4\)"),
        (dict(relative_attention_num_buckets=32, relative_attention_max_distance=3), "relative_attention_max_distance"),
        (dict(use_fused_rms_norm="yes"), "`use_fused_rms_norm` must be True or False"),
        (dict(check_token_ids=1), "`check_token_ids` must be True or False"),
        (dict(z_loss="1e-4"), "`z_loss` must be a number"),
        (dict(label_smoothing=None), "`label_smoothing` must be a number"),
        (dict(feed_forward_proj=None), "`feed_forward_proj` must be a string"),
        (dict(dropout_rate=1.0), "`dropout_rate` must be a probability"),
        (dict(classifier_dropout=-0.1), "`classifier_dropout` must be a probability"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
        (dict(z_loss=-1e-4), "`z_loss` must be a non-negative"),
        (dict(label_smoothing=1.0), r"`label_smoothing` must be in \[0, 1\)"),
        (dict(loss_chunk_size=0), r"`loss_chunk_size` must be None \(the default\) or a positive number of token rows"),
        (dict(loss_vocab_chunk_size=4096.0), "`loss_vocab_chunk_size` must be None .* vocabulary columns, got 4096.0"),
        (dict(loss_chunk_size=True), "`loss_chunk_size` must be None"),
        (dict(residual_dtype="bf16"),
         r"`residual_dtype` must be None .* \['float32', 'bfloat16', 'float16'\], got 'bf16'"),
    ],
)
def test_invalid_values_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FAT5Config(**kwargs)


def test_wrong_types_are_rejected():
    with pytest.raises(ValueError, match="d_model"):
        FAT5Config(d_model="512")


def test_smallest_valid_bucket_range_gives_valid_buckets():
    # max_distance = num_buckets // 2 + 1 is the smallest accepted value: every bucket id is in range
    from fat5_hf.position_encoding import relative_position_bucket

    config = FAT5Config(relative_attention_num_buckets=8, relative_attention_max_distance=5)
    relative_position = torch.arange(-40, 41)
    for bidirectional in (True, False):
        buckets = relative_position_bucket(
            relative_position, bidirectional=bidirectional, num_buckets=config.relative_attention_num_buckets,
            max_distance=config.relative_attention_max_distance,
        )
        assert buckets.min() >= 0 and buckets.max() < config.relative_attention_num_buckets


def test_auto_config_for_model():
    config = AutoConfig.for_model("fat5", d_model=64, num_heads=2)
    assert isinstance(config, FAT5Config) and config.d_model == 64


AUTO_CLASSES = [
    (AutoModel, FAT5Model),
    (AutoModelForSeq2SeqLM, FAT5ForConditionalGeneration),
    (AutoModelForTextEncoding, FAT5EncoderModel),
    (AutoModelForSequenceClassification, FAT5ForSequenceClassification),
    (AutoModelForTokenClassification, FAT5ForTokenClassification),
    (AutoModelForQuestionAnswering, FAT5ForQuestionAnswering),
]


@pytest.mark.parametrize("auto_class, model_class", AUTO_CLASSES, ids=[c.__name__ for _, c in AUTO_CLASSES])
def test_auto_classes_round_trip(tmp_path, tiny_fat5_config, auto_class, model_class):
    config = tiny_fat5_config(num_labels=3)
    model = auto_class.from_config(config)
    assert type(model) is model_class
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "fat5"
    reloaded = auto_class.from_pretrained(tmp_path)
    assert type(reloaded) is model_class
    original, loaded = model.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys()
    for key in original:
        assert torch.equal(original[key], loaded[key]), key


def test_modeling_files_import_only_same_folder_modules():
    # the Hub export flattens these files next to each other: only relative imports of each other + torch/transformers
    import ast
    import pathlib

    package = pathlib.Path(fat5_hf.__file__).parent
    allowed_relative = {"configuration_fat5", "modeling_fat5", "position_encoding", "kernel_ops", "unpadding", "hub"}
    for name in allowed_relative - {"hub"}:
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert node.level == 1 and (node.module in allowed_relative or node.module is None), (name, node.module)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] in {"torch", "transformers", "huggingface_hub", "__future__",
                                                     "collections", "dataclasses", "fat5_kernels", "math",
                                                     "contextlib", "threading", "copy", "typing"}, (name, node.module)
