"""Hub export: a saved FAT5 folder loads with trust_remote_code where fat5-hf is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration, FAT5ForSequenceClassification
from fat5_hf.hub import AUTO_MAP, flatten_imports

TINY = dict(
    vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)

# Runs in a fresh interpreter: hides fat5_hf and fat5_kernels (and triton, when asked) as if they were not
# installed, loads the folder through the Auto class with remote code and checks the outputs saved beside it.
LOADER = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys
    blocked = set(sys.argv[2].split(","))

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named '{name}'", name=name)
            return None

    real_find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] in blocked else real_find_spec(name, *a, **k)
    sys.meta_path.insert(0, NotInstalled())
    for name in list(sys.modules):
        if name.split(".")[0] in blocked:
            del sys.modules[name]

    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    folder = sys.argv[1]
    expected = torch.load(folder + "/expected.pt")
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    for name in blocked:
        assert name not in sys.modules, name
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], decoder_input_ids=expected["decoder_input_ids"]).logits
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
    generated = model.generate(input_ids=expected["input_ids"], max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, expected["generated"])

    # The remote code's kernel seam runs on its own flattened copy of fat5_kernels when triton is there, and on the
    # PyTorch path (what gave the outputs above on CPU) when it is not.
    kernel_ops = sys.modules[type(model).__module__].kernel_ops
    assert kernel_ops.__name__.startswith("transformers_modules"), kernel_ops.__name__
    kernels = ("rms_norm", "gated_activation", "cross_entropy", "fused_linear_cross_entropy", "attention", "rope")
    if "triton" in blocked:
        assert not any(kernel_ops.kernel_available(name) for name in kernels)
    elif not torch.cuda.is_available():  # kernels under the Triton interpreter (TRITON_INTERPRET=1 from conftest)
        assert all(kernel_ops.kernel_available(name) for name in kernels)
        calls = []
        # the encoder's self-attention (packed q/k/v), norms and feed-forwards; the cached decoder runs PyTorch
        patched = ("_triton_t5_flash_attention_qkvpacked", "_triton_rms_norm", "_triton_gated_activation_packed")
        for name in patched:
            original = getattr(kernel_ops, name)
            assert original.__module__.startswith("transformers_modules"), original.__module__
            setattr(kernel_ops, name, lambda *a, _original=original, _name=name, **k: calls.append(_name) or _original(*a, **k))
        with kernel_ops.kernels_on_cpu(), torch.no_grad():
            kernel_logits = model(input_ids=expected["input_ids"], decoder_input_ids=expected["decoder_input_ids"]).logits
        assert set(calls) == set(patched), calls
        scale = expected["logits"].abs().max().item()
        torch.testing.assert_close(kernel_logits, expected["logits"], atol=1e-5 * scale, rtol=1e-4)
        print("REMOTE_KERNELS_OK")
    model.save_pretrained(folder + "/resaved")  # the remote code exports itself again
    print("REMOTE_OK", type(model).__name__)
    """
)


def save_tiny_model(folder, config: FAT5Config | None = None):
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(config or FAT5Config(**TINY)).eval()
    model.save_pretrained(folder)
    input_ids = torch.randint(2, TINY["vocab_size"], (2, 9))
    decoder_input_ids = torch.randint(2, TINY["vocab_size"], (2, 4))
    with torch.no_grad():
        logits = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
    generated = model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
    torch.save(
        {"input_ids": input_ids, "decoder_input_ids": decoder_input_ids, "logits": logits, "generated": generated},
        folder / "expected.pt",
    )
    return model


def run_loader(folder, blocked: str, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), blocked], capture_output=True, text=True, env=env,
        cwd=tmp_path, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "REMOTE_OK FAT5ForConditionalGeneration" in result.stdout
    if "triton" not in blocked and not torch.cuda.is_available():
        assert "REMOTE_KERNELS_OK" in result.stdout


def test_save_pretrained_writes_code_and_auto_map(tmp_path):
    save_tiny_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for name in ("configuration_fat5.py", "modeling_fat5.py", "attention.py", "rms_norm.py", "triton_utils.py"):
        text = (tmp_path / name).read_text()
        assert "from fat5_kernels." not in text and "from fat5_hf." not in text, name


@pytest.mark.parametrize("blocked", ["fat5_hf,fat5_kernels", "fat5_hf,fat5_kernels,triton"],
                         ids=["without-fat5-hf", "without-fat5-hf-and-triton"])
def test_remote_code_loads_without_fat5_hf(tmp_path, blocked):
    save_tiny_model(tmp_path / "model")
    run_loader(tmp_path / "model", blocked, tmp_path)
    resaved = sorted(p.name for p in (tmp_path / "model" / "resaved").glob("*.py"))
    assert resaved == sorted(p.name for p in (tmp_path / "model").glob("*.py"))


def test_encoder_head_exports_its_auto_class(tmp_path):
    torch.manual_seed(0)
    model = FAT5ForSequenceClassification(FAT5Config(**TINY, num_labels=3))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_fat5.FAT5ForSequenceClassification"
    assert (tmp_path / "modeling_fat5.py").is_file()


def test_flatten_imports_rewrites_and_refuses():
    source = "try:\n    from fat5_kernels.rms_norm import rms_norm\nexcept ImportError:\n    pass\n"
    assert "    from .rms_norm import rms_norm\n" in flatten_imports(source)
    with pytest.raises(ValueError, match="cannot be flattened"):
        flatten_imports("import fat5_kernels\n", "x.py")


def test_push_to_hub_uploads_code_and_auto_map(tmp_path, monkeypatch):
    # push_to_hub goes through save_pretrained: the commit carries the same code files and auto_map. The Hub API is
    # replaced by a recorder (the tests are offline); the uploaded files are copied out before the temp folder goes.
    import shutil
    import types

    from transformers.utils import hub as hf_hub_utils

    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    commits = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            commits.append(repo_id)
            for op in operations:
                (uploaded / op.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(op.path_or_fileobj, uploaded / op.path_in_repo)

    monkeypatch.setattr(hf_hub_utils, "hf_api", lambda: RecordingApi())
    model = save_tiny_model(tmp_path / "saved")
    model.push_to_hub("someone/tiny-fat5")
    assert commits == ["someone/tiny-fat5"]
    saved = {p.name for p in (tmp_path / "saved").iterdir() if p.name != "expected.pt"}
    assert saved <= {p.name for p in uploaded.iterdir()}
    assert {"modeling_fat5.py", "configuration_fat5.py", "attention.py", "model.safetensors"} <= saved
    assert json.loads((uploaded / "config.json").read_text())["auto_map"] == AUTO_MAP
