"""Chunked fused linear + cross-entropy vs PyTorch (TRITON_INTERPRET=1 on CPU; bf16 tests on the GPU).

Same tolerance rule as the cross-entropy kernel: against an fp64 ground truth, the relative error of the loss, of
d(hidden) and of d(weight) must be at most twice that of the dense definition (``hidden @ weight.T`` then
cross-entropy, with autograd) computed in half precision (fp16 on CPU, bf16 on the GPU).
"""

import pytest
import torch
import torch.nn.functional as F

from fat5_kernels.cross_entropy_reference import linear_cross_entropy_reference

triton = pytest.importorskip("triton")
from fat5_kernels.fused_linear_cross_entropy import default_chunk_size, fused_linear_cross_entropy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def dense_linear_cross_entropy(hidden, weight, labels, *, z_loss=0.0, label_smoothing=0.0, reduction="mean"):
    """The definition in the inputs' dtype: logits, F.cross_entropy, z-loss; mean = sum / max(count, 1)."""
    logits = hidden @ weight.t()
    valid = labels != IGNORE
    rows = F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="none")
    z_rows = torch.where(valid, z_loss * torch.logsumexp(logits, -1).square(), 0.0)
    loss, z = (rows + z_rows).sum(), z_rows.sum()
    if reduction == "mean":
        count = valid.sum().clamp(min=1)
        loss, z = loss / count, z / count
    return loss, z


def rel_err(got, truth):
    got, truth = got.double(), truth.double()
    norm = truth.norm()
    if norm == 0:
        return 0.0 if torch.equal(got, truth) else float("inf")
    return ((got - truth).norm() / norm).item()


def make_case(n_tokens, hidden_size, vocab, dtype, ignored_every=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64) * (2.0 / hidden_size**0.5)
    labels = torch.randint(0, vocab, (n_tokens,), generator=generator)
    if ignored_every:
        labels[::ignored_every] = IGNORE
    # fp64 copies of the exactly representable low-precision values.
    return hidden.to(dtype).double().to(DEVICE), weight.to(dtype).double().to(DEVICE), labels.to(DEVICE)


def run(fn, hidden64, weight64, labels, dtype, grad_scale=1.0, **kw):
    hidden = hidden64.detach().to(dtype).clone().requires_grad_()
    weight = weight64.detach().to(dtype).clone().requires_grad_()
    loss, z = fn(hidden, weight, labels, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), z.detach(), hidden.grad, weight.grad


def check_against_rule(hidden64, weight64, labels, dtype, half_dtype, grad_scale=1.0, **kw):
    got = run(fused_linear_cross_entropy, hidden64, weight64, labels, dtype, grad_scale, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype
    loss_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "vocab_chunk_size")}
    truth = run(dense_linear_cross_entropy, hidden64, weight64, labels, torch.float64, grad_scale, **loss_kw)
    if dtype == torch.float32:
        bounds = (2e-6,) * 4
    else:
        half = run(dense_linear_cross_entropy, hidden64, weight64, labels, half_dtype, grad_scale, **loss_kw)
        bounds = tuple(2 * rel_err(h, t) + 1e-7 for h, t in zip(half, truth))
    for name, g, want, bound in zip(("loss", "z_loss_term", "d_hidden", "d_weight"), got, truth, bounds):
        err = rel_err(g, want)
        assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "n_tokens, hidden_size, vocab, chunk_size",
    [(45, 24, 37, 16), (40, 32, 130, 40), (21, 16, 300, 8)],  # ragged last chunk, one chunk, many chunks
)
@pytest.mark.parametrize(
    "z_loss, label_smoothing, reduction", [(0.0, 0.0, "mean"), (1e-2, 0.1, "mean"), (1e-3, 0.1, "sum")]
)
def test_matches_reference(dtype, n_tokens, hidden_size, vocab, chunk_size, z_loss, label_smoothing, reduction):
    hidden64, weight64, labels = make_case(n_tokens, hidden_size, vocab, dtype)
    check_against_rule(hidden64, weight64, labels, dtype, torch.float16, z_loss=z_loss,
                       label_smoothing=label_smoothing, reduction=reduction, chunk_size=chunk_size)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "n_tokens, hidden_size, vocab, chunk_size, vocab_chunk_size",
    # ragged last slice and chunk, one row chunk, slices of one column, a slice as wide as the vocabulary
    [(45, 24, 37, 16, 8), (40, 32, 130, 40, 64), (21, 16, 30, 8, 1), (13, 8, 20, 5, 20)],
)
@pytest.mark.parametrize(
    "z_loss, label_smoothing, reduction", [(0.0, 0.0, "mean"), (1e-2, 0.1, "mean"), (1e-3, 0.1, "sum")]
)
def test_vocabulary_slices_match_reference(
    dtype, n_tokens, hidden_size, vocab, chunk_size, vocab_chunk_size, z_loss, label_smoothing, reduction
):
    hidden64, weight64, labels = make_case(n_tokens, hidden_size, vocab, dtype)
    check_against_rule(hidden64, weight64, labels, dtype, torch.float16, z_loss=z_loss,
                       label_smoothing=label_smoothing, reduction=reduction, chunk_size=chunk_size,
                       vocab_chunk_size=vocab_chunk_size)  # fmt: skip


def test_vocabulary_slices_with_an_in_vocabulary_ignore_index_and_all_ignored_rows():
    """ignore_index=0 is also a vocabulary id: shifted into a slice it must not read as ignored; rows labelled 0 are
    ignored, every other row counts. All rows ignored: zero loss, zero gradients."""
    hidden64, weight64, labels = make_case(30, 16, 50, torch.float32, ignored_every=0, seed=4)
    labels[::3] = 0
    hidden, weight = hidden64.float().requires_grad_(), weight64.float().requires_grad_()
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=0, chunk_size=7, vocab_chunk_size=6)
    loss.backward()
    hidden_ref, weight_ref = hidden64.clone().requires_grad_(), weight64.clone().requires_grad_()
    want = F.cross_entropy(hidden_ref @ weight_ref.t(), labels, ignore_index=0)
    want.backward()
    assert rel_err(loss, want) < 2e-6
    assert rel_err(hidden.grad, hidden_ref.grad) < 2e-6 and rel_err(weight.grad, weight_ref.grad) < 2e-6
    hidden.grad = weight.grad = None
    loss, z = fused_linear_cross_entropy(hidden, weight, torch.full_like(labels, IGNORE), z_loss=1e-2,
                                         label_smoothing=0.1, chunk_size=8, vocab_chunk_size=16)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and z.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()


@pytest.mark.parametrize("wide_rows", [False, True])
def test_rows_read_twice(monkeypatch, wide_rows):
    import fat5_kernels.cross_entropy as ce_module

    # Rows wider than one block: the chunk's kernel reads each row twice, the second time backwards (32k
    # vocabularies on the GPU). Wide rows (mT5's) are split into parts, each read twice, that combine their
    # statistics: here 150 columns in parts of 64, 64 and 22, two blocks a part. On the CPU the parts publish and
    # finish in two launches; the GPU tests run the one-launch path, where the parts wait for each other.
    monkeypatch.setattr(ce_module, "MAX_SINGLE_PASS_BLOCK", 64)
    monkeypatch.setattr(ce_module, "MULTI_PASS_BLOCK", 64)
    monkeypatch.setattr(ce_module, "WIDE_ROW_COLS", 100 if wide_rows else 10**6)
    monkeypatch.setattr(ce_module, "SPLIT_ROW_PART_COLS", 64)
    monkeypatch.setattr(ce_module, "SPLIT_ROW_BLOCK", 32)
    for dtype in (torch.float32, torch.float16):
        hidden64, weight64, labels = make_case(20, 16, 150, dtype, seed=9)
        labels[1], labels[2] = 149, 0  # labels in the first and the last (partial) part
        check_against_rule(hidden64, weight64, labels, dtype, torch.float16, z_loss=1e-2, label_smoothing=0.1,
                           chunk_size=8)  # fmt: skip
        check_against_rule(hidden64, weight64, labels, dtype, torch.float16, chunk_size=8, reduction="sum")


def test_grad_output_scaling_and_default_chunks():
    hidden64, weight64, labels = make_case(30, 16, 50, torch.float32, seed=1)
    check_against_rule(hidden64, weight64, labels, torch.float32, torch.float16, grad_scale=-2.5, z_loss=1e-2,
                       label_smoothing=0.1)  # fmt: skip


def test_all_labels_ignored_gives_zero_loss_and_zero_grads():
    hidden64, weight64, labels = make_case(12, 8, 20, torch.float32, seed=2)
    labels = torch.full_like(labels, IGNORE)
    loss, z, d_hidden, d_weight = run(fused_linear_cross_entropy, hidden64, weight64, labels, torch.float32,
                                      z_loss=1e-2, label_smoothing=0.1, chunk_size=5)  # fmt: skip
    assert loss.item() == 0.0 and z.item() == 0.0
    assert torch.equal(d_hidden, torch.zeros_like(d_hidden)) and torch.equal(d_weight, torch.zeros_like(d_weight))


def test_frozen_weight_or_hidden_gets_no_gradient():
    hidden64, weight64, labels = make_case(10, 8, 20, torch.float32, seed=3)
    hidden = hidden64.float().requires_grad_()
    weight = weight64.float()  # frozen LM head
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    loss.backward()
    want_hidden = hidden64.float().requires_grad_()
    linear_cross_entropy_reference(want_hidden, weight64.float(), labels)[0].backward()
    assert weight.grad is None and rel_err(hidden.grad, want_hidden.grad) < 2e-6

    weight = weight64.float().requires_grad_()
    loss, _ = fused_linear_cross_entropy(hidden64.float(), weight, labels, chunk_size=4)
    loss.backward()
    want_weight = weight64.float().requires_grad_()
    linear_cross_entropy_reference(hidden64.float(), want_weight, labels)[0].backward()
    assert rel_err(weight.grad, want_weight.grad) < 2e-6


def test_no_grad_gives_the_loss():
    hidden64, weight64, labels = make_case(10, 8, 20, torch.float32, seed=4)
    with torch.no_grad():
        loss, z = fused_linear_cross_entropy(hidden64.float(), weight64.float(), labels, z_loss=1e-2, chunk_size=3)
    want, want_z = linear_cross_entropy_reference(hidden64.float(), weight64.float(), labels, z_loss=1e-2)
    assert rel_err(loss, want) < 2e-6 and rel_err(z, want_z) < 2e-6


def test_autocast_casts_both_inputs_and_grads_reach_fp32_parameters():
    hidden64, weight64, labels = make_case(12, 16, 40, torch.float32, seed=10)
    hidden = hidden64.float().requires_grad_()
    weight = weight64.float().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    # The LM head ran on bf16 operands, as F.linear does under autocast: same loss as that, not the fp32 one.
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        autocast_logits = F.linear(hidden64.float(), weight64.float())
    autocast_loss = F.cross_entropy(autocast_logits.float(), labels, ignore_index=IGNORE)
    fp32_loss = F.cross_entropy(hidden64.float() @ weight64.float().t(), labels, ignore_index=IGNORE)
    # (measured on CPU: 8e-8 from the autocast loss, 5.5e-4 from the fp32 one)
    assert rel_err(loss, autocast_loss) < 1e-4 and rel_err(loss, fp32_loss) > 2e-4
    # bf16 gradients (and, under the interpreter, bf16 stores that truncate): a loose check against fp64.
    truth = run(dense_linear_cross_entropy, hidden64, weight64, labels, torch.float64)
    for got, want in zip((hidden.grad, weight.grad), (truth[2], truth[3])):
        assert rel_err(got, want) < 3e-2


def test_batch_and_sequence_dimensions_are_flattened():
    hidden64, weight64, labels = make_case(12, 8, 20, torch.float32, seed=5)
    flat, _ = fused_linear_cross_entropy(hidden64.float(), weight64.float(), labels)
    batched, _ = fused_linear_cross_entropy(hidden64.float().view(3, 4, 8), weight64.float(), labels.view(3, 4))
    assert torch.equal(flat, batched)


def test_reference_matches_dense_definition_and_checkpointed_chunks(monkeypatch):
    import fat5_kernels.cross_entropy_reference as ref_module

    hidden64, weight64, labels = make_case(14, 8, 20, torch.float32, seed=6)
    truth = run(dense_linear_cross_entropy, hidden64, weight64, labels, torch.float64, z_loss=1e-2,
                label_smoothing=0.1)  # fmt: skip
    monkeypatch.setattr(ref_module, "_CHUNK_LOGITS", 60)  # 3 rows per checkpointed chunk
    got = run(linear_cross_entropy_reference, hidden64, weight64, labels, torch.float32, z_loss=1e-2,
              label_smoothing=0.1)  # fmt: skip
    for g, want in zip(got, truth):
        assert rel_err(g, want) < 2e-6


def test_default_chunk_size():
    # A (chunk, V) buffer of at most 1 GiB, power-of-two rows in [64, 8192], at most the number of tokens.
    assert default_chunk_size(16384, 32128, 2) == 8192
    assert default_chunk_size(16384, 250112, 2) == 2048
    assert default_chunk_size(16384, 250112, 4) == 1024
    assert default_chunk_size(16384, 250112, 2, max_chunk_bytes=2**25) == 64
    assert default_chunk_size(10, 32128, 2) == 10


@pytest.mark.parametrize(
    "hidden, weight, labels, kwargs, error, match",
    [
        ((4, 8), (10, 8), (5,), {}, ValueError, "labels must have shape"),
        ((4, 8), (10, 6), (4,), {}, ValueError, "same d"),
        ((4, 8), (10, 8), (4,), {"reduction": "none"}, ValueError, "reduction='mean' or 'sum'"),
        ((4, 8), (10, 8), (4,), {"chunk_size": 0}, ValueError, "chunk_size"),
        ((4, 8), (10, 8), (4,), {"vocab_chunk_size": 0}, ValueError, "vocab_chunk_size"),
    ],
)
def test_bad_inputs_raise_clear_errors(hidden, weight, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(torch.randn(*hidden, device=DEVICE), torch.randn(*weight, device=DEVICE),
                                   torch.zeros(*labels, dtype=torch.long, device=DEVICE), **kwargs)  # fmt: skip


def test_bad_dtypes_and_label_values_raise():
    hidden, weight = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    labels = torch.tensor([0, 1, 2, IGNORE], device=DEVICE)
    with pytest.raises(TypeError, match="same dtype"):
        fused_linear_cross_entropy(hidden, weight.half(), labels)
    with pytest.raises(TypeError, match="integer tensor"):
        fused_linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 10, IGNORE], device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "vocab, chunk_size, vocab_chunk_size",
    [(32128, None, None), (32128, 256, None), (250112, None, None), (32128, None, 4096), (250112, 512, 4096)],
)
@pytest.mark.parametrize("z_loss, label_smoothing", [(0.0, 0.0), (1e-4, 0.1)])
def test_bf16_on_gpu_against_rule(vocab, chunk_size, vocab_chunk_size, z_loss, label_smoothing):
    hidden64, weight64, labels = make_case(1024, 256, vocab, torch.bfloat16, seed=7)
    check_against_rule(hidden64, weight64, labels, torch.bfloat16, torch.bfloat16, z_loss=z_loss,
                       label_smoothing=label_smoothing, chunk_size=chunk_size,
                       vocab_chunk_size=vocab_chunk_size)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [65537, 250112])
def test_wide_rows_in_other_dtypes_on_gpu(dtype, vocab):
    """fp32 and fp16 through the split-row kernel; 65,537 columns leave a last part of one column."""
    hidden64, weight64, labels = make_case(256, 64, vocab, dtype, seed=13)
    labels[1] = vocab - 1
    check_against_rule(hidden64, weight64, labels, dtype, torch.float16, z_loss=1e-4, label_smoothing=0.1)


@pytest.mark.gpu
def test_wide_rows_in_two_launches_on_gpu(monkeypatch):
    """The split-row kernel's fallback (publish, then finish) where a GPU has fewer SMs than a row has parts."""
    import fat5_kernels.cross_entropy as ce_module

    monkeypatch.setattr(ce_module, "multiprocessor_count", lambda device: 0)
    hidden64, weight64, labels = make_case(512, 256, 250112, torch.bfloat16, seed=10)
    check_against_rule(hidden64, weight64, labels, torch.bfloat16, torch.bfloat16, z_loss=1e-4, label_smoothing=0.1)


@pytest.mark.gpu
def test_runs_inside_torch_compile():
    hidden64, weight64, labels = make_case(300, 64, 1000, torch.bfloat16, seed=8)

    def loss_fn(hidden, weight, labels):
        return fused_linear_cross_entropy(hidden * 1.0, weight, labels, z_loss=1e-4, chunk_size=128)[0] * 2.0

    results = []
    for fn in (loss_fn, torch.compile(loss_fn)):
        hidden = hidden64.to(torch.bfloat16).requires_grad_()
        weight = weight64.to(torch.bfloat16).requires_grad_()
        loss = fn(hidden, weight, labels)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["recording", "inductor"])
def test_torch_compile_traces_the_custom_op(backend):
    """fullgraph compile traces the fused loss as its custom op (no graph break, so a compiled model keeps one graph
    across its loss, which CUDA-graph replays need): the loss, z term and both gradients are eager's, also with a
    grad_output other than 1 (the backward's out-of-place scale under compile). Inductor on the CPU runs the op
    (the Triton kernel under the interpreter)."""
    from fat5_kernels import fused_linear_cross_entropy as module

    torch._dynamo.reset()
    hidden64, weight64, labels = make_case(37, 24, 45, torch.float32)
    # check_label_values=False: the range check is a host sync (a graph break), off while training
    kwargs = dict(z_loss=1e-3, label_smoothing=0.1, chunk_size=16, check_label_values=False)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module.print_readable(print_output=False))
        return graph_module.forward

    def loss_fn(hidden, weight, labels):
        return fused_linear_cross_entropy(hidden, weight, labels, **kwargs)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=recording_backend if backend == "recording" else backend)
    got = run(compiled, hidden64, weight64, labels, torch.float32, grad_scale=0.5)
    want = run(loss_fn, hidden64, weight64, labels, torch.float32, grad_scale=0.5)
    if backend == "recording":
        assert "fused_linear_cross_entropy_forward" in "\n".join(graphs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    for vocab_chunk_size in (0, 8):  # whole rows, vocabulary slices
        args = (hidden64.float(), weight64.float(), labels, IGNORE, 1e-3, 0.1, "mean", 16, vocab_chunk_size, True, False)
        torch.library.opcheck(module._fused_linear_cross_entropy_forward_op, args)
