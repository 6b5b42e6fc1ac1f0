"""Optimizers and learning-rate schedules for pretraining T5-family models.

- :class:`AdamWScale`: AdamW whose step is scaled by each parameter's root mean square, the variant
  nanoT5 and FAT5 pretrain T5 with (learning rates near 5e-3 work where plain AdamW needs ~1e-4).
- :func:`build_optimizer`: AdamW (fused on CUDA) or AdamWScale, with weight decay kept off norms and
  biases.
- :func:`build_scheduler`: the usual warm-up schedules (inverse square root, cosine, linear, constant),
  all from :func:`transformers.get_scheduler`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fat5_kernels.triton_utils import triton_interpreter_enabled

try:
    from fat5_kernels.adamw_scale import adamw_scale_update_ as _triton_adamw_scale_update
except ImportError:  # triton is missing: the foreach and loop paths
    _triton_adamw_scale_update = None

OPTIMIZER_NAMES = ("adamw", "adamw_scale")

# Schedules exposed by the recipes; each maps to a name `transformers.get_scheduler` knows.
SCHEDULER_NAMES = {
    "constant": "constant",
    "constant_with_warmup": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_min_lr": "cosine_with_min_lr",
    "inverse_sqrt": "inverse_sqrt",
    "warmup_stable_decay": "warmup_stable_decay",
}


class AdamWScale(Optimizer):
    r"""AdamW whose update of each parameter is multiplied by that parameter's root mean square.

    Adam normalizes the gradient, so its update has about the same size for every parameter. Here the
    update of a tensor ``p`` is further scaled by ``max(rms(p), min_rms)``, so that each step changes a
    tensor by roughly the same *relative* amount whatever its scale. This is the relative step size of
    Adafactor (Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    `scale_parameter=True`), moved onto AdamW by nanoT5 (Nawrot, 2023, "nanoT5: A PyTorch Framework for
    Pre-training and Fine-tuning T5-style Models with Limited Resources"), and used by FAT5 to pretrain
    T5 in bf16 with learning rates around 5e-3.

    For a parameter :math:`p` with gradient :math:`g` at step :math:`t`:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2 \\
        p \leftarrow p (1 - \eta \lambda) - \eta \, \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
        \, \max(\mathrm{rms}(p), \epsilon_{rms}) \, \frac{m_t}{\sqrt{v_t} + \epsilon}

    (weight decay :math:`\lambda` is decoupled as in AdamW; nanoT5 applies it after the update, which
    differs by a factor :math:`1 - \eta\lambda` on the update and is immaterial in practice).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        betas: coefficients of the running averages of the gradient and of its square.
        eps: added to :math:`\sqrt{v_t}`.
        weight_decay: decoupled weight decay :math:`\lambda`.
        min_rms: lower bound :math:`\epsilon_{rms}` of the RMS scale, so that parameters initialized at
            (or decayed to) zero still move. Adafactor and nanoT5 use 1e-3.
        correct_bias: apply Adam's bias correction.
        fused: update all parameters of a group (of one device and dtype) with one Triton kernel launch that
            reads each parameter, gradient and moment once (`fat5_kernels.adamw_scale`). ``None`` (default) picks
            it when every parameter is a plain, contiguous CUDA tensor, triton is installed and ``foreach`` is not
            set; ``True`` on other tensors raises.
        foreach: update all parameters of a group (of one device and dtype) with ``torch._foreach_*`` ops, a
            dozen kernel launches per group instead of a dozen per parameter (FAT5-small's 281 parameter
            tensors: 27 aten ops a step instead of 3,874, counted on the CPU). ``None`` picks it for plain CUDA
            tensors when the fused kernel cannot run. CPU and FSDP2-sharded (DTensor) parameters take the
            per-parameter loop by default.

    All states are kept in the parameter's dtype and device; the RMS stays a tensor (no host sync), and
    works on sharded parameters (FSDP2 DTensors) since ``norm`` and ``numel`` there are global. The fused
    kernel computes in float32 and rounds once to the storage dtype, where the loop and foreach paths round
    after each op: equal in float32 up to rounding, closer to exact in bfloat16. One step over FAT5-small's 282
    float32 tensors (147M parameters) on an H100: 2.24 ms fused (2.13 ms of it on the GPU), 6.70 ms foreach, 39.6 ms
    in the loop, against 1.62 ms for torch's fused AdamW (``benchmarks/results/optimizer.md``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 5e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_rms: float = 1e-3,
        correct_bias: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas {betas}: each must be in [0, 1)")
        if eps < 0.0:
            raise ValueError(f"Invalid eps {eps}: must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay {weight_decay}: must be >= 0")
        if min_rms < 0.0:
            raise ValueError(f"Invalid min_rms {min_rms}: must be >= 0")
        if fused and foreach:
            raise ValueError("AdamWScale: fused=True and foreach=True are exclusive; set one of them")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            min_rms=min_rms,
            correct_bias=correct_bias,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _rms(tensor: torch.Tensor) -> torch.Tensor:
        # Computed in fp32: a bf16 sum of squares over millions of elements loses most of its digits.
        return tensor.detach().float().norm(2) / math.sqrt(tensor.numel())

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, step_sizes = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWScale does not support sparse gradients; use dense embeddings")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step_size = group["lr"]
                if group["correct_bias"]:
                    beta1, beta2 = group["betas"]
                    step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                params.append(p)
                step_sizes.append(step_size)
            implementation = _implementation(group, params)
            if implementation == "loop":
                for p, step_size in zip(params, step_sizes):
                    self._single_update(group, p, step_size)
                continue
            by_device_and_dtype: dict[tuple, tuple[list, list]] = {}
            for p, step_size in zip(params, step_sizes):
                same_kind, their_step_sizes = by_device_and_dtype.setdefault((p.device, p.dtype), ([], []))
                same_kind.append(p)
                their_step_sizes.append(step_size)
            update = self._fused_update if implementation == "fused" else self._foreach_update
            for same_kind, their_step_sizes in by_device_and_dtype.values():
                update(group, same_kind, their_step_sizes)
        return loss

    def _single_update(self, group: dict, p: torch.Tensor, step_size: float) -> None:
        (beta1, beta2), eps = group["betas"], group["eps"]
        state = self.state[p]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(p.grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        # The RMS is measured before the decay, on the weights the gradient was computed for.
        scale = self._rms(p).clamp_min(group["min_rms"]).to(p.dtype)
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        update = exp_avg / exp_avg_sq.sqrt().add_(eps)
        p.sub_(update.mul_(scale * step_size))

    def _foreach_update(self, group: dict, params: list[torch.Tensor], step_sizes: list[float]) -> None:
        """`_single_update` over parameters of one device and dtype, op by op with ``torch._foreach_*``."""
        (beta1, beta2), eps = group["betas"], group["eps"]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # fp32 norms of the weights before the decay (as `_rms`), then the RMS scale in the weights' dtype
        scales = torch._foreach_norm(params, 2, dtype=torch.float32)
        torch._foreach_div_(scales, [math.sqrt(p.numel()) for p in params])
        torch._foreach_clamp_min_(scales, group["min_rms"])
        if params[0].dtype != torch.float32:  # one cast, not one a parameter
            scales = list(torch.stack(scales).to(params[0].dtype).unbind())
        if group["weight_decay"] > 0.0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, eps)
        updates = torch._foreach_div(exp_avgs, denominators)
        torch._foreach_mul_(updates, torch._foreach_mul(scales, step_sizes))
        torch._foreach_sub_(params, updates)

    def _fused_update(self, group: dict, params: list[torch.Tensor], step_sizes: list[float]) -> None:
        """`_single_update` over parameters of one device and dtype, as one Triton launch."""
        (beta1, beta2), eps = group["betas"], group["eps"]
        _triton_adamw_scale_update(
            params,
            [p.grad for p in params],
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            step_sizes,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            min_rms=group["min_rms"],
            decay_factor=1.0 - group["lr"] * group["weight_decay"],
            check_inputs=False,  # states made like their parameter; `_why_not_fused` checked the rest
        )


def _implementation(group: dict, params: list[torch.Tensor]) -> str:
    """"fused", "foreach" or "loop" for a group's parameters (see AdamWScale's ``fused`` and ``foreach``)."""
    # Both keys are absent from the param groups of checkpoints saved before they existed: the defaults then.
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        reason = _why_not_fused(params, allow_cpu=triton_interpreter_enabled())
        if reason:
            raise ValueError(f"AdamWScale(fused=True) cannot update these parameters: {reason}. Use fused=False")
        return "fused"
    if fused is None and foreach is None and _why_not_fused(params) is None:  # implies plain CUDA tensors
        return "fused"
    plain_cuda = all(p.is_cuda and type(p.data) is torch.Tensor for p in params)
    return "foreach" if (plain_cuda if foreach is None else foreach) else "loop"


def _why_not_fused(params: list[torch.Tensor], allow_cpu: bool = False) -> str | None:
    """Why the fused kernel cannot update ``params`` (None when it can)."""
    if _triton_adamw_scale_update is None:
        return "triton is not installed"
    for p in params:
        if type(p.data) is not torch.Tensor:
            # FSDP2's DTensor shards (and other subclasses) keep the loop, whose ops handle them (global norms).
            return f"a parameter is a {type(p.data).__name__}, not a plain tensor"
        if not (p.is_cuda or allow_cpu):
            return f"a parameter is on {p.device}, not on a CUDA device"
        for tensor in (p, p.grad):
            if not tensor.is_contiguous() or tensor.data_ptr() % 16:
                return "a parameter or gradient is not contiguous from a 16-byte boundary"
    return None


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits trainable parameters into a decayed group (matrices, embeddings) and a non-decayed one.

    Norm weights and biases (every parameter with fewer than 2 dimensions, or whose name contains
    "norm") get no weight decay, as in T5X, nanoT5 and transformers' Trainer. A tied parameter is
    listed once.
    """
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw_scale",
    lr: float = 5e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    fused: bool | None = None,
) -> Optimizer:
    """Creates the optimizer of a pretraining run.

    Args:
        model: the model whose trainable parameters are optimized (after ``accelerator.prepare`` for FSDP).
        name: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw_scale"`` (:class:`AdamWScale`).
        lr, betas, eps, weight_decay: the usual AdamW hyperparameters.
        fused: use ``torch.optim.AdamW(fused=True)``; ``None`` picks it when every parameter is on CUDA.
            Ignored by ``adamw_scale``.
    """
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ValueError("The model has no trainable parameter (every requires_grad is False)")
    if name == "adamw":
        if fused is None:
            fused = all(p.is_cuda for group in groups for p in group["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)
    if name == "adamw_scale":
        return AdamWScale(groups, lr=lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {list(OPTIMIZER_NAMES)}")


def build_scheduler(
    optimizer: Optimizer,
    name: str,
    warmup_steps: int,
    total_steps: int,
    scheduler_kwargs: dict | None = None,
) -> LRScheduler:
    """Creates a learning-rate schedule with linear warm-up, stepped once per optimizer step.

    Args:
        optimizer: the optimizer whose learning rate is scheduled.
        name: one of ``constant``, ``constant_with_warmup``, ``linear``, ``cosine``, ``cosine_with_min_lr``
            (pass ``{"min_lr_rate": 0.1}``), ``inverse_sqrt`` (T5's schedule: ``lr / sqrt(max(step, warmup))``
            up to the constant that makes it continuous after warm-up) and ``warmup_stable_decay``
            (pass ``{"num_decay_steps": ...}``).
        warmup_steps: linear warm-up from 0, in optimizer steps.
        total_steps: the length of the run, in optimizer steps (decaying schedules reach their end there).
        scheduler_kwargs: extra arguments of the transformers schedule (``scheduler_specific_kwargs``).
    """
    from transformers import get_scheduler

    if name not in SCHEDULER_NAMES:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {sorted(SCHEDULER_NAMES)}")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"warmup_steps must be >= 0 and total_steps > 0, got {warmup_steps} and {total_steps}")
    if name != "constant" and name != "inverse_sqrt" and warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) is longer than the run ({total_steps} steps)")
    kwargs = dict(scheduler_kwargs or {})
    if name == "cosine_with_min_lr" and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
        kwargs["min_lr_rate"] = 0.1
    return get_scheduler(
        SCHEDULER_NAMES[name],
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=kwargs or None,
    )
