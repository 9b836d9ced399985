"""Optimiser and learning-rate schedule, as in MAE.

AdamW with two parameter groups: weight decay on matrices only, none on biases,
norms (all 1-D parameters) and the learned tokens / position embeddings (decaying
those towards zero only hurts).  The learning rate is set every iteration:
linear warm-up, then a half cosine down to ``min_lr`` at the end of the schedule.
"""

from __future__ import annotations

import math

import torch

# Parameter names (last component) that are tokens or positions, not weights.
NO_DECAY_NAMES = ("cls_token", "mask_token", "dist_token", "reg_token")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: ``weight_decay`` on matrices, 0 on the rest (module docstring)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or name.endswith(".bias") or last in NO_DECAY_NAMES or "pos_embed" in last:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel when every parameter is on the CPU or a CUDA device."""
    # The fused kernel updates each tensor in one pass: optimizer.step() went from 18 ms to
    # 5 ms at ViT-Tiny on 2 CPU cores (benchmarks/results/bench-2026-11-22.md).
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=fused or None)


#: Optimiser settings that choose an implementation (kernel), not what is computed.
_IMPL_KEYS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the optimiser's own kernel choice.

    ``load_state_dict`` copies every group setting from the checkpoint, including
    ``fused``: a checkpoint written before the fused AdamW (``fused=None``) would
    silently switch a resumed run back to the slower foreach kernel.  Which kernel
    runs is this process's choice (the results agree to rounding, see
    tests/test_bench_fastpaths.py), so the values :func:`build_optimizer` chose are
    put back, and the fused kernel's ``step`` counters moved to where it wants them
    (float32 on the parameter's device; the foreach path keeps them on the CPU).
    """
    impl = [{k: g[k] for k in _IMPL_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, impl):
        group.update(keep)
        if not group.get("fused"):
            continue
        for p in group["params"]:
            st = optimizer.state.get(p)
            step = st.get("step") if st else None
            if isinstance(step, torch.Tensor) and (step.device != p.device or step.dtype != torch.float32):
                st["step"] = step.to(device=p.device, dtype=torch.float32)


def grad_norm_(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total L2 norm of the gradients of ``params`` (a 0-d tensor on their device); rescales
    them to ``max_norm`` when above it.

    ``clip_grad_norm_(params, inf)`` (the norm for the log alone) also multiplies every
    gradient by 1.0, a second pass over them: 7.4 ms of a 260 ms ViT-Tiny step on 2
    CPU cores, the norm alone 2.1 ms.  The norm itself stays: metrics.csv logs it and a
    non-finite norm is how a step with non-finite gradients is detected and skipped.
    Gradients come out identical to ``clip_grad_norm_`` (a factor of 1.0 is exact).
    Nothing is read back to the host on a GPU: there the clip factor (at most 1) is
    applied on the device whether or not the norm is above ``max_norm``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is None:  # torch < 2.6: no separate norm, clip_grad_norm_ does both
        return torch.nn.utils.clip_grad_norm_(params, float("inf") if max_norm is None else max_norm)
    norm = get_total_norm(grads)
    # Reading the norm is free on the CPU: skip the rescaling pass when it would multiply by 1.
    # Never true for a NaN norm: that step is skipped anyway.
    if max_norm is not None and (norm.device.type != "cpu" or float(norm) > max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        # (step + 1): the very first step already learns something.
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr``, ignoring ``lr_scale`` (see ``lr_decay.set_scaled_lr``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
