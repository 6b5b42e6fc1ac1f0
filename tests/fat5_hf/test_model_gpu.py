"""The whole model on a GPU with every Triton kernel on, against the PyTorch path (bf16 autocast).

Rule (as for the kernels): the kernel path's error against an fp32 reference is at most twice the error
of the PyTorch path computed in the same precision, plus a small floor for values near zero.
"""

from __future__ import annotations

import pytest
import torch

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration

pytestmark = pytest.mark.gpu

SHAPE = dict(
    vocab_size=1000, d_model=256, d_kv=64, d_ff=704, num_layers=3, num_decoder_layers=2, num_heads=4,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, z_loss=1e-4,
)
KERNELS_OFF = dict(use_triton_attention=False, use_fused_rms_norm=False, use_fused_glu=False,
                   use_fused_cross_entropy=False)


def batch(device):
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, SHAPE["vocab_size"], (4, 300), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 200:] = 0
    attention_mask[3, 17:] = 0
    labels = torch.randint(2, SHAPE["vocab_size"], (4, 130), generator=gen)
    labels[2, 90:] = -100
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def loss_and_grads(model, inputs, autocast: bool):
    model.zero_grad()
    input_ids, attention_mask, labels = inputs
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("residual_dtype", [None, "bfloat16"])
def test_training_step_with_kernels_matches_pytorch_path(residual_dtype):
    # with residual_dtype="bfloat16" both paths keep a bf16 residual stream; the truth is the fp32 model
    torch.manual_seed(0)
    reference = FAT5ForConditionalGeneration(FAT5Config(**SHAPE, **KERNELS_OFF)).cuda().train()
    torch_config = FAT5Config(**SHAPE, **KERNELS_OFF, residual_dtype=residual_dtype)
    torch_path = FAT5ForConditionalGeneration(torch_config).cuda().train()
    with_kernels = FAT5ForConditionalGeneration(FAT5Config(**SHAPE, residual_dtype=residual_dtype)).cuda().train()
    torch_path.load_state_dict(reference.state_dict())
    with_kernels.load_state_dict(reference.state_dict())
    inputs = batch("cuda")

    ref_loss, ref_grads = loss_and_grads(reference, inputs, autocast=False)  # fp32 truth
    torch_loss, torch_grads = loss_and_grads(torch_path, inputs, autocast=True)
    kernel_loss, kernel_grads = loss_and_grads(with_kernels, inputs, autocast=True)

    assert abs(kernel_loss - ref_loss) <= 2 * abs(torch_loss - ref_loss) + 2e-3 * ref_loss
    for name, grad in ref_grads.items():
        kernel_err = relative_error(kernel_grads[name], grad)
        torch_err = relative_error(torch_grads[name], grad)
        assert kernel_err <= 2 * torch_err + 2e-3, (name, kernel_err, torch_err)


def test_pure_bf16_training_step_and_generation():
    torch.manual_seed(0)
    model = FAT5ForConditionalGeneration(FAT5Config(**SHAPE)).cuda().to(torch.bfloat16).train()
    input_ids, attention_mask, labels = batch("cuda")
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits is None  # training with labels: fused lm_head + loss, no logits
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        assert out.logits is not None and torch.isfinite(out.loss)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, num_beams=2)
    assert generated.shape[0] == input_ids.shape[0]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_steps_match_eager(mode):
    """`torch.compile` over the kernels (opaque custom ops), and the same step replayed as CUDA graphs
    (`mode="reduce-overhead"`, what `benchmarks/pretrain.py --variants fat5_cudagraphs` times): three optimizer
    steps give the eager model's losses."""
    torch.manual_seed(0)
    eager = FAT5ForConditionalGeneration(FAT5Config(**SHAPE)).cuda().train()
    compiled_model = FAT5ForConditionalGeneration(FAT5Config(**SHAPE)).cuda().train()
    compiled_model.load_state_dict(eager.state_dict())
    input_ids, attention_mask, labels = batch("cuda")

    def losses(model, forward, cuda_graphs: bool) -> torch.Tensor:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # small steps: the runs must not diverge chaotically
        values = []
        for _ in range(3):  # cudagraph trees: a warm-up run, a recorded one, a replay
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            values.append(loss.detach().float().clone())
        return torch.stack(values)

    if mode == "reduce-overhead":
        # The kernels' device caches first filled inside the graphs' warm-up run (as in a training script that
        # compiles before any eager call): they must stay out of the graph pool, or cudagraph trees refuse them.
        import fat5_kernels.attention as attention
        import fat5_kernels.attention_fwd as attention_fwd
        import fat5_kernels.attention_reference as attention_reference

        for cache in (attention._PADDED_DISTANCE_BUCKETS, attention_fwd._DUMMIES, attention_reference._LAYOUT_CACHE):
            cache.clear()
    got = losses(compiled_model, torch.compile(compiled_model, mode=mode), cuda_graphs=mode == "reduce-overhead")
    expected = losses(eager, eager, cuda_graphs=False)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
