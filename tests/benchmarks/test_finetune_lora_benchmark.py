"""The LoRA benchmark's models and report (CPU; the timings themselves need a GPU)."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "finetune_lora.py")
_spec = importlib.util.spec_from_file_location("finetune_lora_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def test_lora_model_wraps_every_projection_and_trains_the_head(monkeypatch):
    small = dict(benchmark.MODEL_CONFIG, vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
                 num_decoder_layers=1)  # fmt: skip
    monkeypatch.setattr(benchmark, "MODEL_CONFIG", small)
    model = benchmark.build("classifier", "lora", device="cpu")
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert any("classification_head" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = benchmark.make_batch("seq2seq", 2, 8, 4, device="cpu")
    assert batch["labels"].shape == (2, 4) and batch["attention_mask"][0, 6:].sum() == 0


def test_markdown_rows_and_ratio():
    args = dict(batch_size=32, input_length=512, target_length=128)
    common = dict(model="seq2seq", parameters=77e6, peak_GB=10.0, forward_ms=5.0)
    rows = [
        dict(mode="full", train_ms=100.0, trainable_parameters=77e6, **common),
        dict(mode="lora", train_ms=80.0, trainable_parameters=2e6, merged_forward_ms=4.0, **common),
    ]
    lines = benchmark.to_markdown(args, rows).splitlines()
    assert lines[-1] == "| seq2seq | lora | 2.00M of 77.0M | 80.00 | 0.80x | 10.00 | 5.00 | 4.00 |"
