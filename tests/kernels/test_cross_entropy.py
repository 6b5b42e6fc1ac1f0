"""Fused cross-entropy kernel vs PyTorch (TRITON_INTERPRET=1 on CPU; bf16 tests on the GPU).

Tolerance rule (shared with the attention kernel): measured against an fp64 ground truth, the kernel's relative
error must be at most twice that of the same definition computed in half precision (fp16 on CPU, where the
interpreter's bf16 maths is broken; bf16 on the GPU). fp32 runs must match to fp32 rounding.
"""

import pytest
import torch
import torch.nn.functional as F

from fat5_kernels.cross_entropy_reference import cross_entropy_reference

triton = pytest.importorskip("triton")
import fat5_kernels.cross_entropy as ce_module  # noqa: E402
from fat5_kernels.cross_entropy import cross_entropy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def dense_cross_entropy(logits, labels, *, z_loss=0.0, label_smoothing=0.0, reduction="mean"):
    """The definition, computed in the dtype of ``logits`` (fp64 for the truth, half for the rule's yardstick)."""
    valid = labels != IGNORE
    rows = F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="none")
    z_rows = torch.where(valid, z_loss * torch.logsumexp(logits, -1).square(), 0.0)
    rows = rows + z_rows
    if reduction == "none":
        return rows, z_rows
    loss, z = rows.sum(), z_rows.sum()
    if reduction == "mean":
        count = valid.sum().clamp(min=1)
        loss, z = loss / count, z / count
    return loss, z


def rel_err(got, truth):
    got, truth = got.double(), truth.double()
    norm = truth.norm()
    if norm == 0:
        return (got - truth).norm().item() * float("inf") if (got != truth).any() else 0.0
    return ((got - truth).norm() / norm).item()


def make_case(n_rows, vocab, dtype, ignored_every=4, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, vocab, generator=generator, dtype=torch.float64) * scale).to(DEVICE)
    labels = torch.randint(0, vocab, (n_rows,), generator=generator).to(DEVICE)
    if ignored_every:
        labels[::ignored_every] = IGNORE
    return logits.to(dtype).double(), labels  # fp64 copy of the exactly representable low-precision values


def run_kernel(logits64, labels, dtype, grad_scale=None, **kw):
    logits = logits64.detach().to(dtype).clone().requires_grad_()
    loss, z = cross_entropy(logits, labels, **kw)
    weights = grad_scale if grad_scale is not None else torch.ones_like(loss)
    (loss * weights).sum().backward()
    return loss.detach(), z, logits.grad


def run_dense(logits64, labels, dtype, grad_scale=None, **kw):
    logits = logits64.detach().to(dtype).clone().requires_grad_()
    loss, z = dense_cross_entropy(logits, labels, **kw)
    weights = grad_scale.to(dtype) if grad_scale is not None else torch.ones_like(loss)
    (loss * weights).sum().backward()
    return loss.detach(), z.detach(), logits.grad


def check_against_rule(logits64, labels, dtype, half_dtype, grad_scale=None, **kw):
    loss, z, grad = run_kernel(logits64, labels, dtype, grad_scale, **kw)
    assert loss.dtype == torch.float32 and z.dtype == torch.float32
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    truth = run_dense(logits64, labels, torch.float64, grad_scale.double() if grad_scale is not None else None, **kw)
    if dtype == torch.float32:
        bounds = (2e-6, 2e-6, 2e-6)
    else:
        half = run_dense(logits64, labels, half_dtype, grad_scale, **kw)
        bounds = tuple(2 * rel_err(h, t) + 1e-7 for h, t in zip(half, truth))
    for name, got, want, bound in zip(("loss", "z_loss_term", "grad"), (loss, z, grad), truth, bounds):
        err = rel_err(got, want)
        assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e}"


@pytest.fixture
def multi_pass(monkeypatch):
    """Rows wider than one block at test-sized vocabularies: the loss-only forward loops over blocks, the
    backward grid has several column blocks (and the forward-with-gradient path reads rows twice)."""
    for name in ("MAX_SINGLE_PASS_BLOCK", "MULTI_PASS_BLOCK", "LOSS_ONLY_BLOCK", "BACKWARD_BLOCK"):
        monkeypatch.setattr(ce_module, name, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [37, 300])
@pytest.mark.parametrize(
    "z_loss, label_smoothing, reduction",
    [(0.0, 0.0, "mean"), (1e-2, 0.1, "mean"), (1e-3, 0.0, "sum"), (0.0, 0.2, "none")],
)
def test_matches_reference_single_pass(dtype, vocab, z_loss, label_smoothing, reduction):
    logits64, labels = make_case(19, vocab, dtype)
    check_against_rule(logits64, labels, dtype, torch.float16, z_loss=z_loss, label_smoothing=label_smoothing,
                       reduction=reduction)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("z_loss, label_smoothing, reduction", [(0.0, 0.0, "mean"), (1e-2, 0.1, "none")])
def test_matches_reference_multi_pass(multi_pass, dtype, z_loss, label_smoothing, reduction):
    # 300 = 2 full blocks of 128 + a partial one.
    logits64, labels = make_case(13, 300, dtype, seed=1)
    check_against_rule(logits64, labels, dtype, torch.float16, z_loss=z_loss, label_smoothing=label_smoothing,
                       reduction=reduction)  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_output_scaling(reduction):
    logits64, labels = make_case(11, 50, torch.float32, seed=2)
    n = 11 if reduction == "none" else 1
    grad_scale = torch.linspace(-2.0, 3.0, n, device=DEVICE).reshape(() if n == 1 else (n,))
    check_against_rule(logits64, labels, torch.float32, torch.float16, grad_scale=grad_scale, z_loss=1e-2,
                       label_smoothing=0.1, reduction=reduction)  # fmt: skip


@pytest.mark.parametrize("pass_mode", ["single", "multi"])
def test_all_labels_ignored_gives_zero_loss_and_zero_grad(request, pass_mode):
    if pass_mode == "multi":
        request.getfixturevalue("multi_pass")
    logits = torch.randn(6, 200, device=DEVICE, requires_grad=True)
    labels = torch.full((6,), IGNORE, device=DEVICE)
    loss, z = cross_entropy(logits, labels, z_loss=1e-2, label_smoothing=0.1)
    assert loss.item() == 0.0 and z.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits.grad))


def test_ignored_rows_get_zero_gradient_and_others_do_not_depend_on_them():
    logits64, labels = make_case(9, 40, torch.float32, ignored_every=3, seed=3)
    _, _, grad = run_kernel(logits64, labels, torch.float32)
    assert torch.equal(grad[labels == IGNORE], torch.zeros_like(grad[labels == IGNORE]))
    assert (grad[labels != IGNORE].abs().sum(-1) > 0).all()


def test_inplace_overwrites_logits_and_out_of_place_keeps_them():
    logits64, labels = make_case(7, 33, torch.float32, seed=4)
    kept = logits64.float().requires_grad_()
    loss_kept, _ = cross_entropy(kept, labels, inplace=False)
    loss_kept.backward()
    assert torch.equal(kept.detach(), logits64.float())

    overwritten = logits64.float().requires_grad_()
    loss, _ = cross_entropy(overwritten, labels)
    loss.backward()
    assert torch.equal(loss, loss_kept)
    assert torch.equal(overwritten.grad, kept.grad)
    # The logits' storage now holds the gradient, taken by autograd as is (no (N, V) copy).
    assert overwritten.grad.data_ptr() == overwritten.data_ptr()


def test_other_saved_uses_of_overwritten_logits_raise():
    logits64, labels = make_case(5, 21, torch.float32, seed=10)
    logits = logits64.float().requires_grad_()
    squares = (logits * logits).sum()  # saves logits for its backward, which runs after the cross-entropy's
    loss = cross_entropy(logits, labels)[0] + squares
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    logits = logits64.float().requires_grad_()
    loss = cross_entropy(logits, labels, inplace=False)[0] + (logits * logits).sum()
    loss.backward()
    want = logits64.float().requires_grad_()
    (cross_entropy_reference(want, labels)[0] + (want * want).sum()).backward()
    assert rel_err(logits.grad, want.grad) < 2e-6


def test_no_grad_leaves_logits_untouched():
    logits64, labels = make_case(5, 21, torch.float32, seed=5)
    logits = logits64.float()
    with torch.no_grad():
        loss, _ = cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.equal(logits, logits64.float())
    want, _ = cross_entropy_reference(logits, labels, label_smoothing=0.1)
    assert torch.allclose(loss, want, rtol=1e-6, atol=0)


def test_reference_matches_torch_definition():
    logits64, labels = make_case(17, 29, torch.float32, seed=6)
    got, got_z = cross_entropy_reference(logits64.float(), labels, z_loss=1e-2, label_smoothing=0.1)
    want, want_z = dense_cross_entropy(logits64, labels, z_loss=1e-2, label_smoothing=0.1)
    assert rel_err(got, want) < 1e-6 and rel_err(got_z, want_z) < 1e-6


def test_reference_chunked_checkpointing_matches_unchunked(monkeypatch):
    import fat5_kernels.cross_entropy_reference as ref_module

    logits64, labels = make_case(10, 16, torch.float32, seed=7)
    full = logits64.float().requires_grad_()
    loss_full, _ = cross_entropy_reference(full, labels, z_loss=1e-2)
    loss_full.backward()
    monkeypatch.setattr(ref_module, "_CHUNK_LOGITS", 48)  # 3 rows per chunk
    chunked = logits64.float().requires_grad_()
    loss_chunked, _ = cross_entropy_reference(chunked, labels, z_loss=1e-2)
    loss_chunked.backward()
    assert torch.allclose(loss_full, loss_chunked, rtol=1e-6)
    assert torch.allclose(full.grad, chunked.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "make_inputs, error, match",
    [
        (lambda: (torch.randn(4, 10), torch.zeros(5, dtype=torch.long)), ValueError, "labels must have shape"),
        (lambda: (torch.randn(4, 10), torch.tensor([0, 1, 10, IGNORE])), ValueError, r"labels must be in \[0, 10\)"),
        (lambda: (torch.randn(4, 10), torch.tensor([0, -1, 2, 3])), ValueError, "found -1"),
        (lambda: (torch.randn(4, 10), torch.zeros(4)), TypeError, "integer tensor"),
        (lambda: (torch.randn(4, 10).long(), torch.zeros(4, dtype=torch.long)), TypeError, "logits must be float32"),
        (lambda: (torch.randn(10), torch.zeros(10, dtype=torch.long)), ValueError, "2D tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(make_inputs, error, match):
    logits, labels = make_inputs()
    with pytest.raises(error, match=match):
        cross_entropy(logits.to(DEVICE), labels.to(DEVICE))


@pytest.mark.parametrize("kwargs, match", [({"reduction": "avg"}, "reduction"), ({"label_smoothing": 1.5}, "label_smoothing"), ({"z_loss": -1.0}, "z_loss")])  # fmt: skip
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy(torch.randn(2, 5, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("wide_rows", [False, True])
def test_forward_with_gradient_into_another_buffer(monkeypatch, dtype, wide_rows):
    """The fused linear + CE's kernel called directly: row losses, z terms, log-sum-exps and the gradient of the
    mean loss, written into a buffer with its own row stride; the logits and the buffer's other columns untouched.
    Both paths, at test size: rows read twice by one program, and rows split into parts (64, 64 and 22 columns)."""
    for name in ("MAX_SINGLE_PASS_BLOCK", "MULTI_PASS_BLOCK"):
        monkeypatch.setattr(ce_module, name, 64)
    monkeypatch.setattr(ce_module, "WIDE_ROW_COLS", 100 if wide_rows else 10**6)
    monkeypatch.setattr(ce_module, "SPLIT_ROW_PART_COLS", 64)
    monkeypatch.setattr(ce_module, "SPLIT_ROW_BLOCK", 32)
    logits64, labels = make_case(11, 150, dtype, seed=12)
    labels[1], labels[2] = 0, 149
    logits = logits64.to(dtype)
    grad_storage = torch.full((11, 160), 7.0, dtype=dtype, device=DEVICE)
    grad = grad_storage[:, :150]
    count = (labels != IGNORE).sum()
    row_loss, row_z, lse = (torch.empty(11, device=DEVICE) for _ in range(3))
    ce_module.cross_entropy_forward(logits, labels, count, row_loss, row_z, grad=grad, lse=lse, ignore_index=IGNORE,
                                    z_loss=1e-2, label_smoothing=0.1, divide_by_count=True)  # fmt: skip

    truth = logits64.clone().requires_grad_()
    rows, z_rows = dense_cross_entropy(truth, labels, z_loss=1e-2, label_smoothing=0.1, reduction="none")
    (rows.sum() / count).backward()
    valid = labels != IGNORE
    want_lse = torch.where(valid, torch.logsumexp(logits64, -1), 0.0)
    grad_tolerance = 1e-6 if dtype == torch.float32 else 1e-3  # the gradient is stored in the logits' dtype
    assert rel_err(row_loss, rows) < 1e-6 and rel_err(row_z, z_rows) < 1e-6 and rel_err(lse, want_lse) < 1e-6
    assert rel_err(grad, truth.grad) < grad_tolerance and not grad[~valid].any()
    assert torch.equal(logits, logits64.to(dtype)) and (grad_storage[:, 150:] == 7.0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32128, 250112])
@pytest.mark.parametrize("z_loss, label_smoothing", [(0.0, 0.0), (1e-4, 0.1)])
def test_bf16_on_gpu_against_rule(vocab, z_loss, label_smoothing):
    logits64, labels = make_case(256, vocab, torch.bfloat16, seed=8)
    check_against_rule(logits64, labels, torch.bfloat16, torch.bfloat16, z_loss=z_loss,
                       label_smoothing=label_smoothing)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("z_loss, label_smoothing", [(0.0, 0.0), (1e-4, 0.1)])
def test_wide_rows_with_gradient_replay_in_a_cuda_graph(z_loss, label_smoothing):
    """The forward with gradient on mT5-wide rows (parts that wait for each other) is deterministic, and its
    counters, zeroed by a memset captured with it, let a CUDA graph replay it: every replay gives eager's bits."""
    n, vocab = 300, 250112
    generator = torch.Generator(device=DEVICE).manual_seed(11)
    logits = torch.randn(n, vocab, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    labels = torch.randint(0, vocab, (n,), device=DEVICE, generator=generator)
    labels[::7] = IGNORE
    count = (labels != IGNORE).sum()

    def forward_with_gradient(x, row_loss, row_z):
        ce_module.cross_entropy_forward(x, labels, count, row_loss, row_z, grad=x, ignore_index=IGNORE,
                                        z_loss=z_loss, label_smoothing=label_smoothing, divide_by_count=True)  # fmt: skip

    def new_outputs():  # row losses, and z terms where there is a z-loss
        return [torch.empty(n, device=DEVICE) for _ in range(2 if z_loss else 1)] + [None] * (0 if z_loss else 1)

    eager, eager_outputs = logits.clone(), new_outputs()
    forward_with_gradient(eager, *eager_outputs)
    again, again_outputs = logits.clone(), new_outputs()
    forward_with_gradient(again, *again_outputs)
    assert torch.equal(again, eager) and torch.equal(again_outputs[0], eager_outputs[0])
    assert torch.isfinite(eager).all() and torch.isfinite(eager_outputs[0]).all()

    static, static_outputs = logits.clone(), new_outputs()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward_with_gradient(static, *static_outputs)
    for _ in range(2):
        static.copy_(logits)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, eager)
        assert all(torch.equal(got, want) for got, want in zip(static_outputs, eager_outputs) if want is not None)


@pytest.mark.gpu
def test_runs_inside_torch_compile():
    logits64, labels = make_case(64, 1000, torch.bfloat16, seed=9)

    def loss_fn(logits, labels):
        return cross_entropy(logits * 1.0, labels, z_loss=1e-4, label_smoothing=0.1)[0] * 2.0

    eager_logits = logits64.to(torch.bfloat16).requires_grad_()
    eager = loss_fn(eager_logits, labels)
    eager.backward()
    compiled_logits = logits64.to(torch.bfloat16).requires_grad_()
    compiled = torch.compile(loss_fn)(compiled_logits, labels)
    compiled.backward()
    assert torch.allclose(eager, compiled, rtol=1e-6)
    assert torch.equal(eager_logits.grad, compiled_logits.grad)


@pytest.mark.parametrize("backend", ["recording", "inductor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_traces_the_custom_ops(backend, reduction):
    """fullgraph compile traces the loss as its forward and backward custom ops (no graph break, so a compiled model
    keeps one graph across its loss): losses, z terms and the gradient are eager's, for a grad_output other than 1
    and per-row ones. Under compile the gradient goes to a new buffer (the logits keep their values). Inductor on
    the CPU runs the ops (the Triton kernels under the interpreter)."""
    torch._dynamo.reset()
    logits64, labels = make_case(37, 45, torch.float32, seed=3)
    # check_label_values=False: the range check is a host sync (a graph break), off while training
    kwargs = dict(z_loss=1e-3, label_smoothing=0.1, reduction=reduction, check_label_values=False)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module.print_readable(print_output=False))
        return graph_module.forward

    def loss_fn(logits, labels):
        return cross_entropy(logits, labels, **kwargs)

    grad_scale = torch.full((), 0.5) if reduction == "mean" else torch.linspace(-1.0, 2.0, 37, dtype=torch.float32)
    grad_scale = grad_scale.to(logits64.device)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=recording_backend if backend == "recording" else backend)
    logits = logits64.float().clone().requires_grad_()
    loss, z = compiled(logits, labels)
    (loss * grad_scale).sum().backward()
    want = run_kernel(logits64, labels, torch.float32, grad_scale=grad_scale, **kwargs)
    for got, expected in zip((loss.detach(), z, logits.grad), want):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(logits.detach(), logits64.float())  # not overwritten by the compiled backward
    if backend == "recording":
        joined = "\n".join(graphs)
        assert "cross_entropy_forward" in joined and "cross_entropy_backward" in joined


def test_custom_ops_pass_opcheck():
    logits64, labels = make_case(9, 33, torch.float32, seed=4)
    logits = logits64.float()
    torch.library.opcheck(ce_module._cross_entropy_forward_op, (logits, labels, IGNORE, 1e-3, 0.1))
    lse = torch.logsumexp(logits, dim=-1)
    count = (labels != IGNORE).sum()
    torch.library.opcheck(
        ce_module._cross_entropy_backward_op,
        (logits, labels, lse, count, torch.tensor(0.5, device=logits.device), IGNORE, 1e-3, 0.1, "mean"),
    )
