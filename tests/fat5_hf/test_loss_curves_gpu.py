"""Kernels on and off follow the same loss curve: a small model trained for a few hundred steps on real text (this
repository's own Markdown and Python files, as UTF-8 bytes), bf16 autocast, padded and unpadded batches; FAT5 with
its kernel switches on / off, and a stock transformers T5 with / without `apply_fat5_kernels`.

Rule: both runs start from the same weights and see the same batches; their smoothed losses (mean of windows of 25
steps) differ by at most 3% after the first window, and both learn (the last window well below the first). bf16
rounding differs between the paths, so the curves are not bit-identical; 3% is far below what a wrong mask, bias or
gradient gives (those change the curve's level by tens of percent within a hundred steps)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration, apply_fat5_kernels

pytestmark = pytest.mark.gpu

STEPS, WINDOW, BATCH = 300, 25, 16
SHAPE = dict(
    vocab_size=259, d_model=256, d_kv=64, num_heads=4, d_ff=704, num_layers=4, num_decoder_layers=4,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
    pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=32, relative_attention_max_distance=128,
)  # fmt: skip
KERNELS_OFF = dict(use_triton_attention=False, use_fused_rms_norm=False, use_fused_glu=False,
                   use_fused_cross_entropy=False)  # fmt: skip


def _corpus() -> torch.Tensor:
    root = Path(__file__).resolve().parents[2]
    files = sorted([*root.glob("*.md"), *root.glob("fat5_hf/*.py"), *root.glob("kernels/fat5_kernels/*.py")])
    data = b"\n".join(path.read_bytes() for path in files)
    return torch.tensor(list(data), dtype=torch.long) + 3  # ids 0-2: pad, eos, unused


def _batches(padded: bool, device: str) -> list[dict]:
    """Continue-the-text pairs: an input span of text and the span that follows it as the target."""
    corpus, gen = _corpus(), torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        if padded:
            enc = torch.randint(32, 257, (BATCH,), generator=gen)
            dec = torch.randint(8, 65, (BATCH,), generator=gen)
        else:
            enc, dec = torch.full((BATCH,), 256), torch.full((BATCH,), 64)
        starts = torch.randint(0, len(corpus) - 400, (BATCH,), generator=gen)
        input_ids = torch.zeros(BATCH, int(enc.max()), dtype=torch.long)
        labels = torch.full((BATCH, int(dec.max())), -100, dtype=torch.long)
        for row in range(BATCH):
            start, n, m = int(starts[row]), int(enc[row]), int(dec[row])
            input_ids[row, :n] = corpus[start : start + n]
            labels[row, :m] = corpus[start + n : start + n + m]
        batch = dict(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=labels)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def _loss_curve(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    model.cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    losses = []
    for batch in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    return torch.stack(losses).cpu().view(-1, WINDOW).mean(dim=1)


def _assert_same_curve(with_kernels: torch.Tensor, without: torch.Tensor) -> None:
    assert without[-1] < 0.8 * without[0] and with_kernels[-1] < 0.8 * with_kernels[0], (with_kernels, without)
    relative = ((with_kernels - without).abs() / without)[1:]
    assert relative.max() < 0.03, (with_kernels.tolist(), without.tolist())


@pytest.mark.parametrize("padded", [False, True], ids=["full_rows", "padded"])
def test_fat5_kernels_on_and_off_follow_the_same_loss_curve(padded):
    torch.manual_seed(0)
    with_kernels = FAT5ForConditionalGeneration(FAT5Config(**SHAPE))
    without = FAT5ForConditionalGeneration(FAT5Config(**SHAPE, **KERNELS_OFF))
    without.load_state_dict(with_kernels.state_dict())
    batches = _batches(padded, "cuda")
    _assert_same_curve(_loss_curve(with_kernels, batches), _loss_curve(without, batches))


@pytest.mark.parametrize("padded", [False, True], ids=["full_rows", "padded"])
def test_patched_stock_t5_follows_the_stock_loss_curve(padded):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    stock = T5ForConditionalGeneration(T5Config(**SHAPE, attn_implementation="sdpa"))
    patched = copy.deepcopy(stock)
    report = apply_fat5_kernels(patched)
    assert set(report.patched) == {"rms_norm", "gated_mlp", "attention", "fused_linear_cross_entropy"}
    batches = _batches(padded, "cuda")
    _assert_same_curve(_loss_curve(patched, batches), _loss_curve(stock, batches))
