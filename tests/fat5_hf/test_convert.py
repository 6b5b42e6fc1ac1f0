"""T5 <-> FAT5 conversion on small random checkpoints of each T5 family, built locally (no downloads)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSeq2SeqLM,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from fat5_hf import FAT5ForConditionalGeneration
from fat5_hf.convert import ConversionError, convert_fat5_to_t5, convert_t5_to_fat5, main

TINY = dict(
    vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0,
)
# Edits of the config.json that transformers 5 writes, to get the file an older writer produced (None: drop the key).
# transformers 5 writes `tie_word_embeddings: true` plus `scale_decoder_outputs`; older files say nothing about the
# rescale and record the v1.1 convention as `tie_word_embeddings: false`. Both kinds must convert exactly.
OLD_V1_1_CONFIG = {"scale_decoder_outputs": None, "tie_word_embeddings": False}
OLD_ORIGINAL_T5_CONFIG = {"scale_decoder_outputs": None, "tie_word_embeddings": None, "n_positions": 512}  # t5-small's

# (config class, model class, fields, config.json edits) for each family.
FAMILIES = {
    # original T5 (tied, decoder output rescaled), config.json as transformers 5 writes it
    "t5": (T5Config, T5ForConditionalGeneration, dict(feed_forward_proj="relu"), {}),
    # original T5 with a config.json as published on the Hub (no tie / rescale keys, an unused n_positions)
    "t5_old_config": (T5Config, T5ForConditionalGeneration, dict(feed_forward_proj="relu"), OLD_ORIGINAL_T5_CONFIG),
    # v1.1 and FLAN-T5 as published: config.json says tie_word_embeddings: false (pre-transformers-5 style)
    "t5_v1_1": (T5Config, T5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                OLD_V1_1_CONFIG),
    # v1.1 saved by transformers 5: tie_word_embeddings: true, scale_decoder_outputs: false
    "t5_v1_1_new_config": (T5Config, T5ForConditionalGeneration,
                           dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), {}),
    "flan_t5": (T5Config, T5ForConditionalGeneration,
                dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3), OLD_V1_1_CONFIG),
    # mT5 written by transformers 5 (scale_decoder_outputs: false, tie_word_embeddings: true), d_kv*heads != d_model
    "mt5": (MT5Config, MT5ForConditionalGeneration,
            dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=12, num_heads=3), {}),
}


def make_t5_checkpoint(path, family: str, seed: int = 0):
    config_class, model_class, fields, config_edits = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**TINY, **fields}))
    if not getattr(model.config, "scale_decoder_outputs", False):  # v1.1-style (and mT5) checkpoints carry their own lm_head
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.2)
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    if family == "t5_v1_1_new_config":  # the premise of the family: transformers 5's way of writing v1.1
        assert config["tie_word_embeddings"] is True and config["scale_decoder_outputs"] is False
    for key, value in config_edits.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return model_class.from_pretrained(path).eval()


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, TINY["vocab_size"], (2, 11), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = torch.randint(2, TINY["vocab_size"], (2, 6), generator=gen)
    labels[0, 4:] = -100
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("family", list(FAMILIES))
def test_t5_to_fat5_matches_transformers(tmp_path, family):
    t5 = make_t5_checkpoint(tmp_path / "t5", family)
    convert_t5_to_fat5(tmp_path / "t5", tmp_path / "fat5")
    fat5 = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "fat5").eval()
    assert isinstance(fat5, FAT5ForConditionalGeneration)
    assert fat5.config.num_decoder_layers == t5.config.num_decoder_layers

    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        ref = t5(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out = fat5(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)

    gen_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    # transformers' T5 sizes its generation cache by the encoder depth and fails when the decoder is deeper: the
    # reference then decodes without cache (FAT5 still uses its cache).
    ref_kwargs = dict(gen_kwargs, use_cache=t5.config.num_decoder_layers == t5.config.num_layers)
    assert torch.equal(fat5.generate(**gen_kwargs), t5.generate(**ref_kwargs))
    assert torch.equal(fat5.generate(**gen_kwargs, num_beams=3), t5.generate(**ref_kwargs, num_beams=3))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_changes_no_weight(tmp_path, family):
    t5 = make_t5_checkpoint(tmp_path / "t5", family)
    convert_t5_to_fat5(tmp_path / "t5", tmp_path / "fat5")
    convert_fat5_to_t5(tmp_path / "fat5", tmp_path / "t5_again")
    convert_t5_to_fat5(tmp_path / "t5_again", tmp_path / "fat5_again")

    # The T5 written back is an ordinary transformers T5 with the original weights.
    t5_again = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5_again")
    original = t5.state_dict()
    for name, tensor in t5_again.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert t5_again.config.scale_decoder_outputs == getattr(t5.config, "scale_decoder_outputs", False)
    # FAT5 -> T5 -> FAT5 leaves the weight files identical.
    assert_same_tensors(load_file(tmp_path / "fat5" / "model.safetensors"),
                        load_file(tmp_path / "fat5_again" / "model.safetensors"))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_dtype_and_side_files_are_kept(tmp_path):
    t5 = make_t5_checkpoint(tmp_path / "t5", "t5_v1_1")
    t5.to(torch.bfloat16).save_pretrained(tmp_path / "t5_bf16")
    (tmp_path / "t5_bf16" / "tokenizer_config.json").write_text("{}")
    convert_t5_to_fat5(tmp_path / "t5_bf16", tmp_path / "fat5")
    weights = load_file(tmp_path / "fat5" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert (tmp_path / "fat5" / "tokenizer_config.json").is_file()
    config = json.loads((tmp_path / "fat5" / "config.json").read_text())
    assert config["model_type"] == "fat5"
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_fat5.FAT5ForConditionalGeneration"
    assert (tmp_path / "fat5" / "modeling_fat5.py").is_file()


def test_existing_destination_is_refused_and_untouched(tmp_path):
    make_t5_checkpoint(tmp_path / "t5", "t5")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        convert_t5_to_fat5(tmp_path / "t5", dst)
    assert (dst / "precious.txt").read_text() == "keep me"
    convert_t5_to_fat5(tmp_path / "t5", dst, overwrite=True)
    assert not (dst / "precious.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "t5"]  # no temporary folder left behind


def test_source_that_is_not_t5_is_refused(tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="'bert' checkpoint, not T5"):
        convert_t5_to_fat5(src, tmp_path / "out")
    with pytest.raises(ConversionError, match="no config.json"):
        convert_t5_to_fat5(tmp_path, tmp_path / "out2")
    with pytest.raises(ConversionError, match="not FAT5"):
        convert_fat5_to_t5(src, tmp_path / "out3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]  # nothing written, no temporary folder left


def test_heads_times_d_kv_mismatch_is_named(tmp_path):
    make_t5_checkpoint(tmp_path / "t5", "t5")
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    config["d_kv"] = 4  # weights were made with d_kv=8
    (tmp_path / "t5" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"(?s)num_heads\*d_kv=16.*SelfAttention\.q\.weight"):
        convert_t5_to_fat5(tmp_path / "t5", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5"]  # nothing written, no temporary folder left


def test_heads_times_d_kv_mismatch_in_a_fat5_checkpoint_is_refused_at_load(tmp_path):
    # A FAT5 folder whose config.json disagrees with its weights: from_pretrained refuses (transformers' size check
    # stays on for FAT5), it does not load a randomly re-initialized attention.
    make_t5_checkpoint(tmp_path / "t5", "t5_v1_1")
    convert_t5_to_fat5(tmp_path / "t5", tmp_path / "fat5")
    config = json.loads((tmp_path / "fat5" / "config.json").read_text())
    config["d_kv"] = 4
    (tmp_path / "fat5" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "fat5")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    make_t5_checkpoint(tmp_path / "t5", "t5_v1_1")
    weights = load_file(tmp_path / "t5" / "model.safetensors")
    del weights["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    weights["encoder.block.9.layer.0.SelfAttention.q.weight"] = torch.zeros(32, 32)
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "t5" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError) as err:
        convert_t5_to_fat5(tmp_path / "t5", tmp_path / "out")
    assert "encoder.block.1.layer.1.DenseReluDense.wo.weight" in str(err.value)
    assert "encoder.block.9.layer.0.SelfAttention.q.weight" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5"]  # nothing written, no temporary folder left


def test_cli(tmp_path, capsys):
    make_t5_checkpoint(tmp_path / "t5", "t5")
    main([str(tmp_path / "t5"), str(tmp_path / "fat5")])
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "t5"), str(tmp_path / "fat5")])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    result = subprocess.run(
        [sys.executable, "-m", "fat5_hf.convert", str(tmp_path / "fat5"), str(tmp_path / "t5_back"), "--to-t5"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t5_back" / "model.safetensors").is_file()


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    # SRC that is not a local folder but has the shape of a Hub id ("namespace/name") is looked up on the Hub;
    # offline (as the tests run) it cannot be fetched. Other missing paths are reported as missing folders.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match="'someone/no-such-t5' is neither a local folder nor a downloadable Hub"):
        convert_t5_to_fat5("someone/no-such-t5", tmp_path / "out")
    for local in ("./missing-folder", str(tmp_path / "missing" / "folder"), "a/b/c"):
        with pytest.raises(ConversionError, match="does not exist"):
            convert_t5_to_fat5(local, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_hub_id_source_is_downloaded_then_converted(tmp_path, monkeypatch):
    # The network is replaced by a local snapshot: what is checked is that a "namespace/name" SRC goes to the Hub
    # download (with the checkpoint's files allowed) and converts like a local folder.
    import huggingface_hub

    t5 = make_t5_checkpoint(tmp_path / "snapshot", "t5_v1_1")
    requests = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requests.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    convert_t5_to_fat5("google/t5-v1_1-tiny", tmp_path / "fat5")
    assert requests and requests[0][0] == "google/t5-v1_1-tiny"
    assert "config.json" in requests[0][1] and "*.safetensors" in requests[0][1]
    fat5 = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "fat5").eval()
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            fat5(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits,
            t5(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits, atol=1e-4, rtol=0,
        )


def test_sharded_checkpoint_converts(tmp_path):
    t5 = make_t5_checkpoint(tmp_path / "t5", "t5_v1_1")
    t5.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert_t5_to_fat5(tmp_path / "sharded", tmp_path / "fat5")
    fat5 = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "fat5")
    expected = t5.state_dict()
    for name, tensor in fat5.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
