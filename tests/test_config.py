"""Configs: defaults, YAML files, overrides, and every bad value named before a model loads."""


import pytest

from cascade.config import CONFIG_DIR, load_config
from cascade.errors import ConfigError

WAN_CONFIGS = {  # Wan's DiT sizes and the resolution each model is published for (480p, 720p)
    "wan2.1-t2v-1.3b.yaml": (dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), (480, 832)),
    "wan2.1-t2v-14b.yaml": (dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), (720, 1280)),
}


def test_tiny_is_the_default_and_overrides_apply():
    config = load_config(None, ["stages.base.steps=7", "stages.tsr.factor=2", "video.height=64"])
    assert config.name == "tiny"
    assert (config.stages.base.steps, config.stages.tsr.factor, config.video.height) == (7, 2, 64)
    assert config.video.width == load_config().video.width  # untouched values keep their defaults


@pytest.mark.parametrize("file_name", sorted(WAN_CONFIGS))
def test_wan_configs_need_a_checkpoint_and_hold_wan_sizes(file_name, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint"):
        load_config(CONFIG_DIR / file_name)
    config = load_config(CONFIG_DIR / file_name, [f"checkpoint={tmp_path}"])
    dit, (sizes, (height, width)) = config.stages.base.dit, WAN_CONFIGS[file_name]
    assert {key: getattr(dit, key) for key in sizes} == sizes
    assert (dit.text_dim, dit.text_len, dit.freq_dim, dit.patch_size) == (4096, 512, 256, [1, 2, 2])
    # every weights path follows the checkpoint folder
    assert config.stages.base.dit_weights == str(tmp_path)
    assert config.stages.tsr.vae_weights == str(tmp_path)
    assert (config.video.height, config.video.width, config.video.num_frames, config.video.fps) == (height, width, 81, 16)
    assert config.stages.base.steps == 50 and config.stages.base.guidance_scale == 5.0


@pytest.mark.parametrize(
    "override, named",
    [
        ("stages.base.stepz=3", "stepz"),  # unknown key
        ("stages.base.steps=many", "steps"),  # wrong type
        ("video.height=100", "video.height"),
        ("video.width=0", "video.width"),
        ("video.num_frames=18", "video.num_frames"),
        ("stages.tsr.factor=9", "stages.tsr.factor"),
        ("stages.tsr.factor=0", "stages.tsr.factor"),
        ("stages.ssr.upsampler.scale=3", "stages.ssr.upsampler.scale"),
        ("stages.base.sampler=heun", "stages.base.sampler"),
        ("stages.tsr.interpolator=magic", "stages.tsr.interpolator"),
        ("stages.base.dtype=float8", "stages.base.dtype"),
        ("stages.base.dit.text_dim=32", "stages.base.dit.text_dim"),
        ("steps", "key=value"),
    ],
)
def test_bad_values_are_named(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert named in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_config_file_lists_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="not found.*tiny.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_wrong_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  base:\n    guidance: 3\n")
    with pytest.raises(ConfigError, match="guidance"):
        load_config(path)
