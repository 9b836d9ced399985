"""PretrainConfig: defaults, presets, files, validation, and the resume merge rules."""

from __future__ import annotations

import json

import pytest

from mim_workbench.errors import ConfigError
from mim_workbench.models.config import parse_img_size
from mim_workbench.training.config import PRESETS, PretrainConfig, read_config_file
from mim_workbench.training.pretrain_loop import merge_resume_config


def test_defaults_are_cpu_sized_and_resolve_per_method():
    c = PretrainConfig()
    assert (c.encoder.model, c.encoder.img_size, c.batch_size) == ("vit_tiny_patch16_224", (224, 224), 16)
    assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (128, 4, 4)
    assert c.betas == (0.9, 0.95) and c.weight_decay == 0.05 and (c.resolved().blr, c.lr_scaling) == (4e-4, "sqrt")
    r = c.resolved()
    assert (r.strategy, r.ratio, r.clip_grad) == ("random", 0.75, None)
    assert r.lr == pytest.approx(1e-4)   # 4e-4 * sqrt(16 / 256)
    s = PretrainConfig(method="simmim").resolved()
    assert (s.strategy, s.ratio, s.clip_grad) == ("block", 0.6, 5.0)
    m = PretrainConfig(method="miram", strategy="region", ratio=0.5).resolved()
    assert (m.strategy, m.ratio) == ("region", 0.5)


def test_lr_scales_with_effective_batch_unless_given():
    assert PretrainConfig(batch_size=32, accum_steps=4, lr_scaling="linear", blr=1.5e-4).absolute_lr() == \
        pytest.approx(1.5e-4 * 128 / 256)
    assert PretrainConfig(batch_size=64).absolute_lr() == pytest.approx(4e-4 * 0.5)
    assert PretrainConfig(batch_size=32, lr=1e-3).resolved().lr == 1e-3
    # Adam's square-root rule: a batch of 16 gets a quarter of blr, not a sixteenth.
    assert PretrainConfig(batch_size=16, blr=4e-4, lr_scaling="sqrt").absolute_lr() == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="lr_scaling"):
        PretrainConfig(lr_scaling="cubic")


def test_rgmim_paper_preset_and_explicit_override():
    c = PretrainConfig.from_dict({"preset": "rgmim-paper"})
    assert c.encoder.model == "vit_base_patch16_224"
    assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (512, 8, 16)
    assert (c.batch_size, c.blr, c.weight_decay, c.epochs, c.strategy, c.ratio) == (256, 1.5e-4, 0.05, 40, "region", 0.75)
    c2 = PretrainConfig.from_dict({"preset": "rgmim-paper", "batch_size": 8})
    assert c2.batch_size == 8 and c2.encoder.model == "vit_base_patch16_224"
    assert "cpu" in PRESETS


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="bach_size.*epoks|epoks.*bach_size"):
        PretrainConfig.from_dict({"bach_size": 4, "epoks": 3})


def test_json_round_trip(tmp_path):
    c = PretrainConfig.from_dict(dict(data="d", out="o", img_size="96x128", method="simmim", mask_options={"mask_patch_size": 32},
                       checkpoint_every=10, betas=(0.8, 0.9)))
    f = tmp_path / "c.json"
    c.to_json(f)
    back = PretrainConfig.from_file(f)
    assert back == c
    assert back.encoder.img_size == (96, 128) and back.betas == (0.8, 0.9)
    assert json.loads(f.read_text())["encoder"]["img_size"] == [96, 128]


def test_toml_file_with_dashes_and_table(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[pretrain]\ndata = "x"\nbatch-size = 8\nimg_size = "128"\nmethod = "miram"\n', encoding="utf-8")
    c = PretrainConfig.from_file(f)
    assert (c.data, c.batch_size, c.encoder.img_size, c.method) == ("x", 8, (128, 128), "miram")
    bad = tmp_path / "bad.toml"
    bad.write_text("data = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="TOML"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "missing.json")


@pytest.mark.parametrize("values, name", [
    ({"ratio": 1.5}, "ratio"), ({"method": "dino"}, "method"), ({"strategy": "grid"}, "strategy"),
    ({"batch_size": 0}, "batch_size"), ({"amp": "fp8"}, "amp"), ({"device": "tpu"}, "device"),
    ({"checkpoint_every": "hourly"}, "checkpoint_every"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"preset": "huge"}, "preset"), ({"img_size": "12x"}, "img_size"), ({"lr": -1.0}, "lr"),
])
def test_bad_values_name_the_setting(values, name):
    with pytest.raises(ConfigError, match=name):
        PretrainConfig.from_dict(values)


def test_parse_img_size():
    assert parse_img_size(224) == (224, 224)
    assert parse_img_size("256x320") == (256, 320)
    assert parse_img_size([64, 96]) == (64, 96)


def test_resume_merge_keeps_checkpoint_settings_and_takes_run_control():
    saved = PretrainConfig(data="d", out="o", batch_size=8, epochs=5, seed=3).resolved()
    given = PretrainConfig(resume="o", epochs=9, max_steps=100, threads=1)
    merged = merge_resume_config(given, saved)
    assert (merged.batch_size, merged.seed, merged.data) == (8, 3, "d")
    assert (merged.epochs, merged.max_steps, merged.threads, merged.resume) == (9, 100, 1, "o")
    with pytest.raises(ConfigError, match="batch_size"):
        merge_resume_config(PretrainConfig(resume="o", batch_size=4), saved)


def test_encoder_settings_nested_or_flat_make_the_same_config():
    flat = PretrainConfig.from_dict({"img_size": "96x128", "embed_dim": 64, "num_heads": 2, "epochs": 3})
    nested = PretrainConfig.from_dict({"encoder": {"img_size": [96, 128], "embed_dim": 64, "num_heads": 2},
                                       "epochs": 3})
    assert flat == nested and flat.encoder.img_size == (96, 128)
    assert set(flat.to_dict()["encoder"]) >= {"model", "img_size", "in_chans", "embed_dim"}
    assert "img_size" not in flat.to_dict()
    with pytest.raises(ConfigError, match="embed_dim given both flat and under encoder"):
        PretrainConfig.from_dict({"embed_dim": 64, "encoder": {"embed_dim": 32}})
    with pytest.raises(ConfigError, match="unknown encoder setting.*widht"):
        PretrainConfig.from_dict({"encoder": {"widht": 3}})
    with pytest.raises(ConfigError, match="embed_dim 30 is not divisible by num_heads 4"):
        PretrainConfig.from_dict({"embed_dim": 30, "num_heads": 4})


def test_a_preset_keeps_its_encoder_fields_that_the_user_did_not_set():
    c = PretrainConfig.from_dict({"preset": "quick-cpu", "encoder": {"depth": 3}})
    assert (c.encoder.depth, c.encoder.img_size, c.encoder.patch_size) == (3, (64, 64), 4)
    assert PretrainConfig.from_dict({"preset": "cpu", "img_size": 96}).encoder.img_size == (96, 96)


def test_finetune_nests_the_scratch_architecture_and_keeps_its_input_size():
    from mim_workbench.training.finetune import FinetuneConfig

    c = FinetuneConfig.from_dict({"img_size": 64, "embed_dim": 32, "depth": 1, "num_heads": 2})
    assert c.img_size == (64, 64) and c.encoder.embed_dim == 32 and c.encoder.img_size == (224, 224)
    assert c.model_config().encoder.img_size == (64, 64)        # a scratch encoder is built at the input size
    assert FinetuneConfig.from_dict(c.to_dict()) == c
