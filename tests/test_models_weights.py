"""Encoder weights: timm checkpoints in (channel and grid adaptation), timm-loadable exports out."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from mim_workbench.errors import CheckpointError
from mim_workbench.models import (
    ModelConfig,
    build_model,
    create_encoder_from_export,
    export_encoder,
    load_encoder_weights,
    read_export_metadata,
)

NAME = "vit_tiny_patch16_224"
ARCH = dict(embed_dim=64, depth=2, num_heads=2)
TINY = dict(img_size=(64, 96), decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **ARCH)


def timm_vit(in_chans: int, img_size, **kw) -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model(NAME, pretrained=False, in_chans=in_chans, img_size=img_size, **ARCH, **kw)


def test_timm_rgb_checkpoint_into_grey_model_sums_channels_and_resamples_pos(tmp_path):
    src = timm_vit(3, 32)  # classifier head included, 2x2 grid
    path = tmp_path / "timm_rgb.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = build_model(ModelConfig.from_dict(dict(**TINY, in_chans=1)))
    report = load_encoder_weights(model.encoder, path)
    sd = src.state_dict()
    torch.testing.assert_close(model.encoder.patch_embed.proj.weight,
                               sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    expected_pos = resample_abs_pos_embed(sd["pos_embed"], new_size=[4, 6], old_size=[2, 2], num_prefix_tokens=1)
    torch.testing.assert_close(model.encoder.pos_embed.data, expected_pos)
    torch.testing.assert_close(model.encoder.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert set(report.unexpected) == {"head.weight", "head.bias"}
    assert not report.missing
    assert any("3->1" in a for a in report.adapted) and any("2x2 -> 4x6" in a for a in report.adapted)
    # A grey image fed to the RGB model as R=G=B gives the grey model's patch embedding.
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        rgb = src.patch_embed(x.expand(-1, 3, -1, -1))
        grey = torch.nn.functional.conv2d(x, model.encoder.patch_embed.proj.weight,
                                          model.encoder.patch_embed.proj.bias, stride=16).flatten(2).transpose(1, 2)
    torch.testing.assert_close(rgb, grey, rtol=1e-4, atol=1e-5)


def test_grey_checkpoint_into_rgb_model_repeats_channels(tmp_path):
    src = timm_vit(1, (64, 96), num_classes=0)
    path = tmp_path / "grey.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = build_model(ModelConfig.from_dict(dict(**TINY, in_chans=3)), init=path)
    assert any("1->3" in a for a in model.init_report.adapted)
    w = src.state_dict()["patch_embed.proj.weight"]
    torch.testing.assert_close(model.encoder.patch_embed.proj.weight, w.repeat(1, 3, 1, 1) / 3)
    torch.testing.assert_close(model.encoder.pos_embed.data, src.pos_embed.data)


def test_export_loads_strictly_into_timm(tmp_path):
    model = build_model(ModelConfig.from_dict(dict(**TINY, in_chans=1, method="miram")))
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not just the initialisation
    path = export_encoder(model, tmp_path / "out" / "encoder.safetensors")
    meta = read_export_metadata(path)
    assert meta["model"] == NAME and json.loads(meta["img_size"]) == [64, 96] and meta["in_chans"] == "1"
    assert meta["method"] == "miram" and json.loads(meta["grid"]) == [4, 6]
    enc = timm.create_model(NAME, pretrained=False, in_chans=1, img_size=(64, 96), num_classes=0, **ARCH)
    enc.load_state_dict(load_file(str(path)), strict=True)
    x = torch.rand(2, 1, 64, 96)
    model.eval(), enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), model.encoder.forward_features(x))
    rebuilt = create_encoder_from_export(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), enc(x))
    assert not list(tmp_path.glob("out/*.tmp"))


def test_export_reloads_at_another_size_with_resampled_pos(tmp_path):
    model = build_model(ModelConfig.from_dict(TINY))
    path = export_encoder(model, tmp_path / "enc.safetensors")
    bigger = build_model(ModelConfig.from_dict({**TINY, "img_size": (96, 128)}))
    report = load_encoder_weights(bigger, path)  # a MIM model works too (its .encoder is used)
    assert any("4x6 -> 6x8" in a for a in report.adapted)  # old grid from the export's metadata
    assert bigger.encoder.pos_embed.shape == (1, 1 + 48, 64)
    torch.testing.assert_close(bigger.encoder.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)


def test_legacy_pth_mae_style_checkpoint(tmp_path):
    """A facebookresearch/mae-style .pth: {"model": {...}} with decoder keys and a DDP prefix."""
    src = timm_vit(1, (64, 96), num_classes=0)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd["module.decoder_embed.weight"] = torch.zeros(32, 64)
    sd["module.mask_token"] = torch.zeros(1, 1, 32)
    path = tmp_path / "mae.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    model = build_model(ModelConfig.from_dict(TINY))
    report = load_encoder_weights(model.encoder, path)
    assert set(report.unexpected) == {"decoder_embed.weight", "mask_token"}
    torch.testing.assert_close(model.encoder.norm.weight, src.norm.weight)


def test_full_model_state_dict_uses_encoder_part(tmp_path):
    trained = build_model(ModelConfig.from_dict(TINY))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    fresh = build_model(ModelConfig.from_dict(dict(**TINY, method="simmim")))
    report = load_encoder_weights(fresh.encoder, tmp_path)  # a checkpoint folder works too
    assert not report.unexpected and any("encoder.*" in a for a in report.adapted)
    torch.testing.assert_close(fresh.encoder.patch_embed.proj.weight, trained.encoder.patch_embed.proj.weight)


def test_bad_weight_files_raise_checkpoint_error(tmp_path):
    enc = build_model(ModelConfig.from_dict(TINY)).encoder
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder_weights(enc, tmp_path / "missing.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported"):
        load_encoder_weights(enc, tmp_path / "w.npz")
    partial = {k: v.contiguous() for k, v in enc.state_dict().items() if not k.startswith("blocks.1.")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*blocks.1"):
        load_encoder_weights(enc, tmp_path / "partial.safetensors")
    assert load_encoder_weights(enc, tmp_path / "partial.safetensors", strict=False).missing
    wide = timm_vit(1, (64, 96), num_classes=0)
    sd = {k: v for k, v in wide.state_dict().items()}
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(100, 64)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="fc1.weight"):
        load_encoder_weights(enc, tmp_path / "wide.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    enc = build_model(ModelConfig.from_dict(TINY)).encoder
    with pytest.raises(CheckpointError, match="weights_only"):
        load_encoder_weights(enc, path)
