"""MIM models: shapes, losses, rendering, configs.  Tiny ViTs (64-d, 2 blocks) on 64x96 images."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mim_workbench.errors import ConfigError
from mim_workbench.masking import mask_to_indices
from mim_workbench.models import METHODS, MIMModel, ModelConfig, build_model
from mim_workbench.models import encoder as encoder_mod
from mim_workbench.models.patches import denormalise_patches, normalise_patches, patchify, unpatchify

H, W, P = 64, 96, 16
GH, GW = H // P, W // P
L = GH * GW
B = 2
TINY = dict(img_size=(H, W), embed_dim=64, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, codebook_size=16)
PIXEL_METHODS = ("mae", "simmim", "miram")   # the methods that predict pixels


def tiny(method: str = "mae", chans: int = 1, **kw) -> MIMModel:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(dict(method=method, in_chans=chans, **{**TINY, **kw})))
    if model.needs_fitting:   # BEiT's tokenizer, on a few random images
        model.fit(torch.rand(8, chans, H, W, generator=torch.Generator().manual_seed(1)), seed=0)
    return model


def strategy_for(method: str) -> str:
    return "block" if method == "simmim" else "random"


def batch(model: MIMModel, *, seed: int = 0, ratio: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    C = model.in_chans
    x = torch.rand(B, C, H, W, generator=g)
    mask = model.make_mask(strategy_for(model.cfg.method), B, ratio, generator=g)
    fine = torch.rand(B, C, 2 * H, 2 * W, generator=g) if model.cfg.method == "miram" else None
    return x, mask, fine


def pixel_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, 1, H, W] bool."""
    return mask.view(-1, 1, GH, GW).repeat_interleave(P, 2).repeat_interleave(P, 3)


# --------------------------------------------------------------------- forward / backward / shapes
@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("method", PIXEL_METHODS)
def test_forward_backward_shapes(method, chans):
    model = tiny(method, chans)
    assert model.grid == (GH, GW) and model.patch_size == P and model.num_patches == L
    x, mask, fine = batch(model)
    out = model(x, mask, fine)
    assert out.loss.dim() == 0 and out.loss.requires_grad and torch.isfinite(out.loss)
    M = int(mask[0].sum())
    assert out.pred.shape == (B, M, P * P * chans)
    assert all(not v.requires_grad and torch.isfinite(v) for v in out.losses.values())
    expected_keys = {"mae": {"pixel", "stats"}, "simmim": {"pixel"}, "miram": {"pixel", "stats", "fine"}}[method]
    assert set(out.losses) == expected_keys
    if method == "simmim":
        assert out.pred_stats is None
    else:
        assert out.pred_stats.shape == (B, M, 2 * chans)
    out.loss.backward()
    grads = [p.grad for p in model.encoder.blocks.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder.patch_embed.proj.weight.grad is not None

    r = model.render(out, x)
    for name in ("masked", "reconstruction", "recon_plus_visible"):
        t = getattr(r, name)
        assert t.shape == (B, chans, H, W) and t.dtype == torch.float32 and not t.requires_grad
    assert r.error.shape == (B, 1, H, W) and r.patch_mse.shape == (B, GH, GW) and r.mask.shape == (B, 1, H, W)
    pm = pixel_mask(mask)
    vis = (~pm).expand_as(x)
    # Visible patches are the input, exactly; error and masked preview follow the mask.
    assert torch.equal(r.recon_plus_visible[vis], x[vis])
    assert torch.equal(r.masked[vis], x[vis]) and bool((r.masked[pm.expand_as(x)] == 0.5).all())
    assert bool((r.error[~pm] == 0).all()) and bool((r.error[pm] > 0).all())
    assert bool((r.patch_mse.view(B, L)[~mask] == 0).all())
    if method == "miram":
        assert r.fine_reconstruction.shape == (B, chans, 2 * H, 2 * W)
        fvis = (~pm).repeat_interleave(2, 2).repeat_interleave(2, 3).expand_as(fine)
        assert torch.equal(r.fine_reconstruction[fvis], fine[fvis])
    else:
        assert r.fine_reconstruction is None
    if method == "simmim":  # SimMIM predicts visible patches too and shows them
        assert not torch.equal(r.reconstruction, r.recon_plus_visible)
    else:
        assert torch.equal(r.reconstruction, r.recon_plus_visible)


@pytest.mark.parametrize("method", PIXEL_METHODS)
def test_error_is_patch_mse_of_rendered_reconstruction(method):
    model = tiny(method).eval()
    x, mask, fine = batch(model)
    with torch.no_grad():
        r = model.render(model(x, mask, fine), x)
    mse = ((r.recon_plus_visible - x) ** 2).view(B, 1, GH, P, GW, P).mean((1, 3, 5))  # [B, gh, gw]
    torch.testing.assert_close(r.patch_mse, mse * mask.view(B, GH, GW), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------- loss semantics
@pytest.mark.parametrize("method", PIXEL_METHODS)
def test_loss_depends_only_on_masked_targets(method):
    """Changing the target on visible patches leaves every loss unchanged; on a masked patch it does not."""
    model = tiny(method).eval()
    x, mask, fine = batch(model)
    pm = pixel_mask(mask).expand_as(x)
    noise = torch.rand_like(x)
    with torch.no_grad():
        base = model(x, mask, fine, target=x)
        other_visible = model(x, mask, fine, target=torch.where(pm, x, noise))
        other_masked = model(x, mask, fine, target=torch.where(pm, noise, x))
    for key in base.losses:
        if key == "fine":
            continue
        torch.testing.assert_close(base.losses[key], other_visible.losses[key], rtol=0, atol=0)
    assert not torch.equal(base.losses["pixel"], other_masked.losses["pixel"])
    if method == "miram":  # the fine target: same rule at 2x
        fpm = pm.repeat_interleave(2, 2).repeat_interleave(2, 3)
        fnoise = torch.rand_like(fine)
        with torch.no_grad():
            a = model(x, mask, fine)
            b = model(x, mask, torch.where(fpm, fine, fnoise))
            c = model(x, mask, torch.where(fpm, fnoise, fine))
        assert torch.equal(a.losses["fine"], b.losses["fine"])
        assert not torch.equal(a.losses["fine"], c.losses["fine"])


@pytest.mark.parametrize("chans,decoder_depth", [(1, 1), (3, 1), (1, 3)])
def test_mae_matches_plain_reference_computation(chans, decoder_depth):
    """Visible-only patch embedding, last decoder block and heads at the masked rows only ==
    MAE computed the plain way (loss and gradients)."""
    model = tiny("mae", chans, stats_loss_weight=0.0, decoder_depth=decoder_depth)
    x, mask, _ = batch(model, ratio=0.75)
    out = model(x, mask)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    enc, dec = model.encoder, model.decoder
    idx = mask_to_indices(mask)
    D = enc.embed_dim
    # MAE as in the paper's code: embed every patch, add positions, drop masked tokens.
    t = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    t = torch.gather(t, 1, idx.ids_keep[..., None].expand(-1, -1, D))
    t = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1), t], 1)
    t = enc.norm(enc.blocks(t))
    t = dec.embed(t)
    Dd = t.shape[-1]
    tokens = torch.cat([t[:, 1:], dec.mask_token.expand(B, idx.n_masked, -1)], 1)
    tokens = torch.gather(tokens, 1, idx.ids_restore[..., None].expand(-1, -1, Dd))
    t = torch.cat([t[:, :1], tokens], 1) + dec.pos_embed
    pred = model.head(dec.norm(dec.blocks(t)))[:, 1:]                      # every patch predicted
    target, _ = normalise_patches(patchify(x, P), chans)
    per_patch = ((pred - target) ** 2).mean(-1)
    ref = (per_patch * mask).sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(out.losses["pixel"], ref.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("variant", ["plain", "qk_norm+layerscale", "matmul_attention", "no_qkv_bias"])
def test_last_decoder_block_at_masked_rows_equals_whole_block(variant):
    """block_at_rows == block(x) gathered at the rows, values and gradients (every input and weight)."""
    from timm.models.vision_transformer import Block

    from mim_workbench.models.decoder import block_at_rows, rows_supported

    torch.manual_seed(0)
    kw = {"qk_norm": True, "init_values": 0.1} if variant == "qk_norm+layerscale" else {}
    block = Block(32, 4, qkv_bias=variant != "no_qkv_bias", **kw)
    block.attn.fused_attn = variant != "matmul_attention"
    assert rows_supported(block)
    x = torch.randn(3, 13, 32, requires_grad=True)
    rows = torch.stack([torch.randperm(13)[:9] for _ in range(3)])
    g = torch.randn(3, 9, 32)

    def grads(fn):
        x.grad = None
        block.zero_grad(set_to_none=True)
        y = fn()
        y.backward(g)
        return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in block.named_parameters()}

    y_ref, gx_ref, gw_ref = grads(lambda: block(x).gather(1, rows[..., None].expand(-1, -1, 32)))
    y, gx, gw = grads(lambda: block_at_rows(block, x, rows))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    for n in gw_ref:
        torch.testing.assert_close(gw[n], gw_ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_unknown_block_kinds_run_whole():
    from mim_workbench.models.decoder import block_at_rows, rows_supported

    block = torch.nn.Linear(8, 8)
    x, rows = torch.randn(2, 5, 8), torch.tensor([[0, 3], [4, 1]])
    assert not rows_supported(block)
    torch.testing.assert_close(block_at_rows(block, x, rows), block(x).gather(1, rows[..., None].expand(-1, -1, 8)))


@pytest.mark.parametrize("method", ["mae", "miram"])
def test_linear_patch_embed_equals_conv_path(method, monkeypatch):
    """The fast visible-only patch embedding gives the conv path's loss and gradients."""
    model = tiny(method, 3)
    x, mask, fine = batch(model)
    fast = model(x, mask, fine)
    fast.loss.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(encoder_mod, "has_linear_patch_embed", lambda enc: False)
    plain = model(x, mask, fine)
    plain.loss.backward()
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_simmim_loss_is_l1_over_masked_pixels():
    model = tiny("simmim", 3).eval()
    x, mask, _ = batch(model)
    with torch.no_grad():
        out = model(x, mask)
        rec = unpatchify(out.full_pred, P, model.grid, 3)
        pm = pixel_mask(mask).float()
        ref = (F.l1_loss(rec, x, reduction="none") * pm).sum() / (pm.sum() * 3)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- rendering honesty
@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("method", PIXEL_METHODS)
def test_render_ignores_true_content_of_masked_patches(method, chans):
    """Changing the input under the mask changes nothing in the reconstruction of masked patches.

    With norm_pix_loss this shows de-normalisation uses predicted statistics, not the
    true ones (which would change with the masked pixels).
    """
    model = tiny(method, chans).eval()
    x, mask, fine = batch(model)
    pm = pixel_mask(mask).expand_as(x)
    x2 = torch.where(pm, torch.rand_like(x) * 3, x)
    with torch.no_grad():
        r1 = model.render(model(x, mask, fine), x)
        r2 = model.render(model(x2, mask, fine), x2)
    torch.testing.assert_close(r1.recon_plus_visible[pm], r2.recon_plus_visible[pm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1.reconstruction[pm], r2.reconstruction[pm], rtol=1e-5, atol=1e-6)


def test_norm_pix_round_trip_and_stats_head_used():
    p = torch.rand(2, 5, 3 * 16)
    n, stats = normalise_patches(p, 3)
    torch.testing.assert_close(denormalise_patches(n, stats.mean, stats.log_std, 3), p, rtol=1e-5, atol=1e-6)
    model = tiny("mae", norm_pix_loss=False)
    x, mask, _ = batch(model)
    out = model(x, mask)
    assert out.pred_stats is None and set(out.losses) == {"pixel"} and not out.normalized
    assert model.render(out, x).reconstruction.shape == (B, 1, H, W)


# --------------------------------------------------------------------- inputs and config errors
def test_miram_requires_fine_image():
    model = tiny("miram")
    x, mask, fine = batch(model)
    with pytest.raises(ConfigError, match="MIRAM needs the fine image"):
        model(x, mask)
    with pytest.raises(ConfigError, match=r"\[2, 1, 128, 192\]"):
        model(x, mask, fine[..., :100])


def test_forward_rejects_wrong_inputs():
    model = tiny("mae")
    x, mask, _ = batch(model)
    with pytest.raises(ConfigError, match=r"\[B, 1, 64, 96\]"):
        model(x[..., :80], mask)
    bad = mask.clone()
    bad[0, ~mask[0]] = True  # sample 0 masks everything, sample 1 half
    with pytest.raises(ConfigError, match="different number"):
        model(x, bad)


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="70x96"):
        build_model(ModelConfig.from_dict({**TINY, "img_size": (70, 96)}))
    with pytest.raises(ConfigError, match="70x96"):
        ModelConfig.from_dict(dict(**{**TINY, "img_size": (70, 96)}, patch_size=16))
    with pytest.raises(ConfigError, match="'dino'.*mae, simmim, miram, beit, feature"):
        ModelConfig.from_dict(dict(method="dino"))
    with pytest.raises(ConfigError, match="vit_nonexistent"):
        build_model(ModelConfig.from_dict(dict(model="vit_nonexistent")))
    with pytest.raises(ConfigError, match="decoder_embed_dim"):
        ModelConfig.from_dict(dict(decoder_embed_dim=30, decoder_num_heads=4))
    with pytest.raises(ConfigError, match="img_size"):
        ModelConfig.from_dict(dict(img_size=(224,)))
    with pytest.raises(ConfigError, match="mask_patch_size 40"):
        build_model(ModelConfig.from_dict(dict(**TINY, method="simmim", mask_patch_size=40)))
    with pytest.raises(ConfigError, match="resnet18"):
        build_model(ModelConfig.from_dict(dict(model="resnet18")))
    with pytest.raises(ConfigError, match="distillation"):
        build_model(ModelConfig.from_dict({**TINY, "model": "deit_tiny_distilled_patch16_224"}))


def test_config_json_round_trip():
    cfg = ModelConfig.from_dict(dict(**TINY, method="miram", in_chans=3))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict(dict(img_size=128)).encoder.img_size == (128, 128)
    with pytest.raises(ConfigError, match="bogus"):
        ModelConfig.from_dict({**d, "bogus": 1})
    assert build_model(d).cfg == cfg  # build_model takes the dict too


def test_model_mask_helpers():
    model = tiny("simmim")
    assert model.mask_options("block") == {"patch_size": 16, "mask_patch_size": 32}
    assert model.mask_options("random") == {}
    region_px = torch.zeros(B, H, W)
    region_px[:, :32, :32] = 1
    m = model.make_mask("region", B, 4 / L, region=region_px, generator=torch.Generator().manual_seed(0))
    assert bool(m.view(B, GH, GW)[:, :2, :2].all())  # pixel mask converted to coverage
    names = model.no_weight_decay()
    assert {"mask_token", "encoder.cls_token"} <= names
    assert "encoder.pos_embed" in tiny("mae").no_weight_decay()


def test_encoder_is_timm_vit_with_sincos_pos_embed():
    from timm.models.vision_transformer import VisionTransformer

    model = tiny("mae")
    assert isinstance(model.encoder, VisionTransformer)
    assert model.encoder.blocks[0].attn.fused_attn  # timm's F.scaled_dot_product_attention path
    pos = model.encoder.pos_embed
    assert not pos.requires_grad  # MAE: fixed sin-cos unless learn_pos_embed
    torch.testing.assert_close(pos, encoder_mod.sincos_2d(64, (GH, GW), prefix=1))
    assert tiny("mae", learn_pos_embed=True).encoder.pos_embed.requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_register_tokens_no_class_token_and_odd_widths(method):
    """timm ViTs without a class token, with registers, and widths that are not multiples of 4."""
    model = tiny(method, model="vit_base_patch16_reg4_gap_256", embed_dim=42, num_heads=3,
                 decoder_embed_dim=30, decoder_num_heads=3)
    assert model.encoder.cls_token is None and model.encoder.num_prefix_tokens == 4
    x, mask, fine = batch(model)
    out = model(x, mask, fine)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.render(out, x).reconstruction.shape == (B, 1, H, W)


@pytest.mark.parametrize("method", METHODS)
def test_autocast_bf16(method):
    """Mixed precision (as the trainer uses on GPUs) runs and gives a float32 loss."""
    model = tiny(method, 3)
    x, mask, fine = batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask, fine)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    r = model.render(out, x)
    assert r.reconstruction.dtype == torch.float32
