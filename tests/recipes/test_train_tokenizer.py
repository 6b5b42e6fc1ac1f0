"""recipes/train_tokenizer.py: T5 layout, byte fallback, French normalization, file and streaming paths, bad input."""

import importlib.util
import json
import sys
import unicodedata
from pathlib import Path

import pytest
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "recipes" / "data"


def load_script():
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO / "recipes" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_tokenizer"] = module
    spec.loader.exec_module(module)
    return module


train_tokenizer_script = load_script()


@pytest.fixture(scope="module")
def corpus_texts():
    lines = (DATA / "fr_corpus_train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:25]]


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory, corpus_texts):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(corpus_texts)), "utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_jsonl):
    output = tmp_path_factory.mktemp("tok") / "tokenizer"
    rc = train_tokenizer_script.main(
        ["--files", str(small_jsonl), "--vocab-size", "700", "--num-sentinels", "20", "--output-dir", str(output)]
    )
    assert rc == 0
    return output


def expected_normalization(text):
    return " ".join(unicodedata.normalize("NFKC", text).split())


def test_t5_layout(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    # SentencePiece-style: a Unigram model with byte fallback, NFKC first in the normalizer, "▁" word marker
    saved = json.loads((trained / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["model"]["type"] == "Unigram" and saved["model"]["byte_fallback"] is True
    assert saved["normalizer"]["normalizers"][0]["type"] == "NFKC"
    assert saved["pre_tokenizer"]["type"] == "Metaspace" and saved["pre_tokenizer"]["replacement"] == "▁"
    assert tokenizer.is_fast
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == 700
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert [vocab[f"<extra_id_{k}>"] for k in range(20)] == list(range(699, 679, -1))
    assert vocab["<extra_id_0>"] == max(vocab.values())
    assert [vocab[t] for t in ("[R]", "[S]", "[X]")] == [677, 678, 679]
    assert "<extra_id_20>" not in vocab
    assert [vocab[f"<0x{b:02X}>"] for b in (0, 255)] == [3, 258]
    for token in ["[R]", "[S]", "[X]", "<extra_id_0>", "<extra_id_19>"]:
        assert token in tokenizer.all_special_tokens


def test_encoding_is_french_friendly_and_lossless(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    text = "[S] Où est l'Œuvre ?  Ça coûte 3,50 €…\n\tÉvidemment — 😀 日本 ÅNGSTRÖM <extra_id_3> fin."
    ids = tokenizer(text)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.unk_token_id not in ids  # byte fallback: unseen characters become byte pieces
    assert ids[0] == tokenizer.convert_tokens_to_ids("[S]")
    assert tokenizer.convert_tokens_to_ids("<extra_id_3>") in ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert any(t.startswith("<0x") for t in tokens)  # the emoji and CJK went through bytes
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    body = text.replace("[S] ", "").replace(" <extra_id_3>", "")
    assert decoded == expected_normalization(body)  # accents, case, « ? » spacing kept; whitespace as T5
    assert "?" in decoded and " ?" in decoded  # no English clean-up of French spacing


def test_round_trip_on_corpus(trained, corpus_texts):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    for text in corpus_texts[:10]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == expected_normalization(text)


def test_streaming_dataset_path_matches_files(trained, small_jsonl, tmp_path):
    # `--dataset json --data-files` goes through datasets.load_dataset(..., streaming=True), like a Hub dataset.
    output = tmp_path / "streamed"
    rc = train_tokenizer_script.main(
        [
            "--dataset",
            "json",
            "--data-files",
            str(small_jsonl),
            "--vocab-size",
            "700",
            "--num-sentinels",
            "20",
            "--output-dir",
            str(output),
        ]
    )
    assert rc == 0
    assert (output / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()


def test_txt_files_and_max_documents(tmp_path, corpus_texts):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(t.replace("\n", " ") for t in corpus_texts), encoding="utf-8")
    output = tmp_path / "tok"
    rc = train_tokenizer_script.main(
        ["--files", str(path), "--max-documents", "10", "--vocab-size", "600", "--output-dir", str(output)]
    )
    assert rc == 0
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1
    assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == len(tokenizer) - 100


def test_bad_input(tmp_path, small_jsonl, capsys):
    run = train_tokenizer_script.main
    assert run(["--files", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "a")]) == 2
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run(["--files", str(empty), "--output-dir", str(tmp_path / "b")]) == 2
    assert "empty" in capsys.readouterr().err
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "   "}) + "\n")
    assert run(["--files", str(blank), "--vocab-size", "600", "--output-dir", str(tmp_path / "c")]) == 2
    assert "No text" in capsys.readouterr().err
    assert run(["--files", str(small_jsonl), "--text-column", "body", "--output-dir", str(tmp_path / "d")]) == 2
    assert "no column 'body'" in capsys.readouterr().err
    assert run(["--files", str(small_jsonl), "--vocab-size", "300", "--output-dir", str(tmp_path / "e")]) == 2
    assert "too small" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["--vocab-size", "600", "--output-dir", str(tmp_path / "f")])  # neither --files nor --dataset
    for name in "abcdef":
        assert not (tmp_path / name).exists()


def test_existing_output_dir_is_never_overwritten(tmp_path, small_jsonl, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    args = ["--files", str(small_jsonl), "--vocab-size", "600", "--output-dir", str(output)]
    assert train_tokenizer_script.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and (output / "keep.txt").read_text() == "precious"
    assert train_tokenizer_script.main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in output.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_shipped_tokenizer_is_reproduced_by_the_script(tmp_path):
    """recipes/data/tokenizer is exactly what the documented command produces from the shipped corpus."""
    output = tmp_path / "tokenizer"
    rc = train_tokenizer_script.main(
        ["--files", str(DATA / "fr_corpus_train.jsonl"), "--vocab-size", "2048", "--output-dir", str(output)]
    )
    assert rc == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (output / name).read_bytes() == (DATA / "tokenizer" / name).read_bytes(), name
    shipped = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    assert len(shipped) == 2048 and shipped.convert_tokens_to_ids("<extra_id_0>") == 2047
    # the embedded tiny run's encoder length (data.max_input_length), not transformers' unbounded 1e30
    assert shipped.model_max_length == 128


def test_model_max_length_comes_from_the_pretraining_config(trained, small_jsonl, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert tokenizer.model_max_length == 128  # the recipe's default config
    assert len(tokenizer("mot " * 1000, truncation=True)["input_ids"]) == 128
    small = REPO / "recipes" / "configs" / "pretrain-fat5-small.yaml"
    common = ["--files", str(small_jsonl), "--vocab-size", "600", "--num-sentinels", "20"]
    assert train_tokenizer_script.main([*common, "--config", str(small), "--output-dir", str(tmp_path / "a")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "a").model_max_length == 512
    assert train_tokenizer_script.main([*common, "--model-max-length", "1024", "--output-dir", str(tmp_path / "b")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "b").model_max_length == 1024


def test_output_dir_held_by_a_running_recipe_is_refused(tmp_path, small_jsonl, capsys, hold_folder_in_another_process):
    """A folder that another process holds (a pretraining run, say) is refused even with --overwrite, untouched."""
    output = tmp_path / "run"
    output.mkdir()
    (output / "train_log.jsonl").write_text('{"step": 1}\n')
    holder = hold_folder_in_another_process(output)
    args = ["--files", str(small_jsonl), "--vocab-size", "600", "--output-dir", str(output), "--overwrite"]
    assert train_tokenizer_script.main(args) == 2
    assert f"in use by another run: pid {holder.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir() if p.name != ".fat5_hf_run.lock") == ["train_log.jsonl"]
