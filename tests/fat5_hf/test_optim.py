"""Tests of fat5_hf.optim: AdamWScale against its formula, the parameter groups and the schedules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fat5_hf.optim import AdamWScale, build_optimizer, build_scheduler, parameter_groups

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def reference_adamw_scale(param, grads, lr, betas, eps, weight_decay, min_rms):
    """The update written out in float64, one step per gradient."""
    p = param.detach().double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        rms = max(p.pow(2).mean().sqrt().item(), min_rms)
        p = p * (1 - lr * weight_decay)
        p = p - step_size * rms * m / (v.sqrt() + eps)
    return p


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_scale_matches_formula(weight_decay):
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(16, 8) * 0.05)
    grads = [torch.randn(16, 8) for _ in range(3)]
    expected = reference_adamw_scale(param, grads, 5e-3, (0.9, 0.999), 1e-8, weight_decay, 1e-3)
    optimizer = AdamWScale([param], lr=5e-3, weight_decay=weight_decay)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=1e-7)


def test_update_is_relative_to_the_weight_scale():
    # Same gradients, weights 100x larger: the update is 100x larger (plain Adam's would be the same).
    torch.manual_seed(0)
    base = torch.randn(32, 4)
    grad = torch.randn(32, 4)
    updates = []
    for scale in (1.0, 100.0):
        param = nn.Parameter(base * scale)
        param.grad = grad.clone()
        AdamWScale([param], lr=1e-2).step()
        updates.append((param.detach() - base * scale).abs().mean().item())
    assert updates[1] == pytest.approx(100 * updates[0], rel=1e-4)


def test_zero_weights_still_move_with_min_rms():
    param = nn.Parameter(torch.zeros(10))
    param.grad = torch.ones(10)
    AdamWScale([param], lr=1.0, min_rms=1e-3).step()
    torch.testing.assert_close(param.detach(), torch.full((10,), -1e-3), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_update_matches_the_loop_bit_for_bit(dtype):
    """The `torch._foreach_*` path (the default on CUDA) against the per-parameter loop, forced on the CPU: two
    groups, weight decay on one, a parameter that gets its first gradient a step late (its own step count)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 64), nn.LayerNorm(64), nn.Linear(64, 5)).to(dtype)
    late = nn.Parameter(torch.randn(7, dtype=dtype))
    models = [model, copy.deepcopy(model)]
    lates = [late, copy.deepcopy(late)]
    optimizers = [
        AdamWScale(
            [
                {"params": list(m.parameters())[:3], "weight_decay": 0.1},
                {"params": [*list(m.parameters())[3:], extra], "weight_decay": 0.0},
            ],
            lr=5e-3,
            foreach=foreach,
        )
        for m, extra, foreach in zip(models, lates, (False, True))
    ]
    for step in range(4):
        x = torch.randn(8, 37, dtype=dtype)
        for m, extra, optimizer in zip(models, lates, optimizers):
            optimizer.zero_grad()
            loss = m(x).float().pow(2).mean() + (extra.float().sum() if step > 0 else 0.0)
            loss.backward()
            optimizer.step()
    for p, q in zip([*models[0].parameters(), lates[0]], [*models[1].parameters(), lates[1]]):
        assert torch.equal(p, q)
    assert optimizers[1].state[lates[1]]["step"] == 3


def _run_two_group_model(dtype, device="cpu", **optimizer_kwargs):
    """Four steps of AdamWScale on a small model: two groups, weight decay on one, a parameter that gets its first
    gradient a step late (its own step count). Returns the parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 64), nn.LayerNorm(64), nn.Linear(64, 5)).to(device, dtype)
    late = nn.Parameter(torch.randn(7, dtype=dtype, device=device))
    optimizer = AdamWScale(
        [
            {"params": list(model.parameters())[:3], "weight_decay": 0.1},
            {"params": [*list(model.parameters())[3:], late], "weight_decay": 0.0},
        ],
        **{"lr": 5e-3, **optimizer_kwargs},
    )
    for step in range(4):
        x = torch.randn(8, 37, dtype=dtype).to(device)
        optimizer.zero_grad()
        loss = model(x).float().pow(2).mean() + (late.float().sum() if step > 0 else 0.0)
        loss.backward()
        optimizer.step()
    assert optimizer.state[late]["step"] == 3
    return [p.detach() for p in [*model.parameters(), late]]


@pytest.mark.parametrize(
    "dtype, device",
    # bf16 on the GPU only: the Triton interpreter's bf16 rounding is not the GPU's (and a loop over fp16 states
    # divides by sqrt(v) + eps with eps = 0 in fp16).
    [pytest.param(torch.float32, "cpu", marks=pytest.mark.skipif(ON_GPU, reason="interpreter on CPU machines")),
     pytest.param(torch.float32, "cuda", marks=pytest.mark.gpu),
     pytest.param(torch.bfloat16, "cuda", marks=pytest.mark.gpu)],
)  # fmt: skip
def test_fused_update_matches_the_loop(dtype, device):
    """The Triton kernel (the default on CUDA; on the CPU under the interpreter) against the per-parameter loop. The
    kernel rounds once from float32 where the loop rounds after each op: equal up to the storage's rounding."""
    pytest.importorskip("fat5_kernels.adamw_scale", reason="the fused update needs triton")
    loop = _run_two_group_model(dtype, device, foreach=False)
    fused = _run_two_group_model(dtype, device, fused=True)
    # bf16: up to a couple of ulps (2^-8 relative) after four steps of per-op rounding in the loop
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 8e-3}
    for p, q in zip(loop, fused):
        torch.testing.assert_close(q, p, **tolerance)
    assert not torch.equal(fused[0], _run_two_group_model(dtype, device, fused=True, lr=5e-2)[0])  # lr matters


def test_fused_and_foreach_are_exclusive_and_fused_rejects_what_it_cannot_update():
    with pytest.raises(ValueError, match="exclusive"):
        AdamWScale([nn.Parameter(torch.zeros(2))], fused=True, foreach=True)
    pytest.importorskip("fat5_kernels.adamw_scale", reason="the fused update needs triton")
    transposed = nn.Parameter(torch.randn(4, 3, device=DEVICE).t())
    transposed.grad = torch.ones_like(transposed)
    before = transposed.detach().clone()
    with pytest.raises(ValueError, match="fused=True. cannot update.*not contiguous.*fused=False"):
        AdamWScale([transposed], fused=True).step()
    assert torch.equal(transposed.detach(), before)
    AdamWScale([transposed]).step()  # the default takes the loop for it
    assert not torch.equal(transposed.detach(), before)


def test_default_implementation_and_old_checkpoints(monkeypatch):
    """On the CPU the defaults keep the per-parameter loop; a param group saved before `foreach` and `fused`
    existed loads and steps (the keys are optional)."""
    calls = []
    monkeypatch.setattr(AdamWScale, "_foreach_update", lambda self, *args: calls.append(("foreach", args)))
    monkeypatch.setattr(AdamWScale, "_fused_update", lambda self, *args: calls.append(("fused", args)))
    param = nn.Parameter(torch.randn(4))
    optimizer = AdamWScale([param])
    param.grad = torch.ones(4)
    optimizer.step()
    assert calls == []
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        del group["foreach"], group["fused"]
    restored = AdamWScale([param], fused=True)
    restored.load_state_dict(state)
    restored.step()  # the loaded group has neither key: the default choice, the loop here
    assert calls == [] and restored.state[param]["step"] == 2
    on_device = nn.Parameter(torch.randn(4, device=DEVICE))  # CUDA on the GPU machine, CPU under the interpreter
    on_device.grad = torch.ones_like(on_device)
    AdamWScale([on_device], fused=True).step()
    AdamWScale([on_device], foreach=True).step()
    assert [name for name, _ in calls] == ["fused", "foreach"]


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(4)]
    optimizer = AdamWScale(model.parameters(), lr=1e-2)

    def step(opt, mod, gs):
        for p, g in zip(mod.parameters(), gs):
            p.grad = g.clone()
        opt.step()

    for gs in grads[:2]:
        step(optimizer, model, gs)
    clone = nn.Linear(6, 3)
    clone.load_state_dict(model.state_dict())
    clone_optimizer = AdamWScale(clone.parameters(), lr=1e-2)
    # Deep copy: as after a save and load (torch shares the state tensors otherwise).
    clone_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for gs in grads[2:]:
        step(optimizer, model, gs)
        step(clone_optimizer, clone, gs)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr": -1.0}, "learning rate"), ({"betas": (1.0, 0.9)}, "betas"), ({"weight_decay": -0.1}, "weight_decay")],
)
def test_adamw_scale_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamWScale([nn.Parameter(torch.zeros(2))], **kwargs)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.layer_norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied


def test_parameter_groups_skip_decay_on_norms_and_biases_and_dedupe_tied():
    groups = parameter_groups(_Tiny(), weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {tuple(p.shape) for p in decay["params"]} == {(10, 4), (4, 4)}
    assert len(decay["params"]) == 2  # the tied embedding / head appears once
    assert len(no_decay["params"]) == 3  # proj.bias, layer_norm.weight, layer_norm.bias


def test_build_optimizer_names():
    model = _Tiny()
    assert isinstance(build_optimizer(model, "adamw_scale"), AdamWScale)
    adamw = build_optimizer(model, "adamw", lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and not adamw.defaults["fused"]  # CPU: no fused kernel
    with pytest.raises(ValueError, match="adamw_scale"):
        build_optimizer(model, "sgd")


def _lrs(name, warmup, total, steps, **kwargs):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, name, warmup, total, kwargs or None)
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def test_schedules():
    # Inverse square root (T5): linear warm-up to the peak, then lr * sqrt(warmup / step).
    inv = _lrs("inverse_sqrt", 4, 100, 17)
    assert inv[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert inv[16] == pytest.approx(math.sqrt(4 / 16))
    cosine = _lrs("cosine", 2, 10, 11)
    assert cosine[2] == pytest.approx(1.0) and cosine[10] == pytest.approx(0.0, abs=1e-12)
    floor = _lrs("cosine_with_min_lr", 2, 10, 11)
    assert floor[10] == pytest.approx(0.1)  # default min_lr_rate
    assert _lrs("constant_with_warmup", 2, 10, 5) == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    linear = _lrs("linear", 0, 4, 5)
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="Unknown scheduler"):
        _lrs("cosine_typo", 1, 10, 1)
    with pytest.raises(ValueError, match="longer than the run"):
        _lrs("cosine", 20, 10, 1)


def test_fused_adamw_matches_the_loop_implementation():
    """build_optimizer(fused=True) gives torch's fused AdamW (CPU kernels exist since torch 2.4; CUDA in
    pretraining), with the same steps as the for-loop AdamW within float rounding."""
    torch.manual_seed(0)
    models = [_Tiny(), _Tiny()]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], "adamw", lr=1e-2, weight_decay=0.1, fused=True)
    looped = build_optimizer(models[1], "adamw", lr=1e-2, weight_decay=0.1, fused=False)
    assert fused.defaults["fused"] and not looped.defaults["fused"]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    initial = models[0].proj.weight.detach().clone()
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, (fused, looped)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (models[0].proj.weight - initial).abs().min() > 0  # every weight moved
