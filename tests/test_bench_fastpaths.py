"""Every fast path gives the plain path's values and gradients (to tolerance), never tested for speed.

* the attention path under CPU bf16 autocast (timm's matmul attention instead of the
  fused kernel, which is slow in bf16 on the CPU) against the fused path;
* fused AdamW (the optimiser the benchmark recommends for the training loop) against
  the default (foreach) AdamW with the training loop's parameter groups;
* bf16 autocast on the CPU keeps the loss finite and close to fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from mim_workbench.bench import REFERENCE_CONFIG, example_batch, make_step
from mim_workbench.training.optim import param_groups

TINY = {**REFERENCE_CONFIG, "img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3,
        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "batch_size": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fused_adamw_equals_default_adamw_with_training_groups():
    """torch.optim.AdamW(fused=True) on the CPU == the default implementation, same gradients, 3 steps."""
    step_a = make_step(TINY, seed=1)
    step_b = make_step(TINY, seed=1)
    opt_a = torch.optim.AdamW(param_groups(step_a.model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    opt_b = torch.optim.AdamW(param_groups(step_b.model, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=True)
    x = example_batch(TINY)
    for _ in range(3):
        out = step_a.model(x, step_a.mask(x.shape[0]))
        out.loss.backward()
        for p, q in zip(step_a.model.parameters(), step_b.model.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
    for (n, p), (_, q) in zip(step_a.model.named_parameters(), step_b.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("method", ["mae", "simmim", "miram"])
def test_bf16_autocast_loss_close_to_fp32(method):
    cfg = {**TINY, "method": method}
    x = example_batch(cfg)
    fp32, bf16 = make_step(cfg, seed=2), make_step(cfg, seed=2, amp="bf16")
    losses = [(float(fp32(x)), float(bf16(x))) for _ in range(3)]
    for a, b in losses:
        assert math.isfinite(b)
        assert abs(a - b) <= 0.05 * abs(a) + 1e-3, losses


# ---------------------------------------------------------------------------- attention path
def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["mae", "simmim", "miram"])
def test_cpu_bf16_attention_path_matches_fused_path(method, monkeypatch):
    """Under CPU bf16 autocast the blocks use timm's matmul attention; loss and gradients
    agree with the fused (SDPA) path to bf16 precision, and the flags are restored."""
    from mim_workbench.models import encoder as enc_mod

    cfg = {**TINY, "method": method}
    x = example_batch(cfg)
    fine = torch.nn.functional.interpolate(x, scale_factor=2) if method == "miram" else None
    step = make_step(cfg, seed=4)
    model = step.model
    mask = step.mask(x.shape[0])
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attn and all(m.fused_attn for m in attn)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append(True)
        return real_sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(x, mask, fine)
    assert not seen, "fused SDPA must not run under CPU bf16 autocast"
    assert all(m.fused_attn for m in attn), "flags must be restored"
    fast.loss.backward()
    g_fast = _grads(model)
    model.zero_grad(set_to_none=True)

    monkeypatch.setattr(enc_mod, "cpu_bf16_autocast", lambda t: False)   # force the fused path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x, mask, fine)
    assert seen, "the fused path runs when the switch is off"
    plain.loss.backward()
    g_plain = _grads(model)
    torch.testing.assert_close(fast.loss, plain.loss, rtol=2e-2, atol=2e-3)
    for n, g in g_plain.items():
        if g.numel() < 64 or float(g.norm()) < 1e-6:
            continue
        cos = torch.nn.functional.cosine_similarity(g.flatten().float(), g_fast[n].flatten().float(), dim=0)
        assert cos > 0.98, (n, float(cos))


def test_fp32_keeps_the_fused_path(monkeypatch):
    step = make_step(TINY, seed=4)
    x = example_batch(TINY)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    step.model(x, step.mask(x.shape[0]))
    assert len(calls) == TINY["depth"] + TINY["decoder_depth"]
