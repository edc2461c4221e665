"""WanDiT against diffusers' WanTransformer3DModel (the independent reference), loaded from checkpoints
written here in the diffusers layout and in the official Wan2.1 layout (single file and 2 shards)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from omegaconf import OmegaConf
from safetensors.torch import save_file

from stages.base.dit import (
    WAN_DIT_SIZES,
    RMSNorm,
    WanDiT,
    WanDiTConfig,
    linear_then_gelu,
    official_state_dict_from_diffusers,
    read_config,
    rope_rotations,
    timestep_embedding,
)
from stages.weights import WeightsError
from tests.test_parallel import SMALL_DIT, random_dit

PARITY_TOLERANCE = 1e-5  # max |ours − diffusers| / max |diffusers|, float32
TEXT_LEN = 512  # diffusers configs carry no text_len, so a diffusers checkpoint means Wan's 512

# Small configs: depth, heads, head dim (8 is the smallest with 2 channels per spatial RoPE axis),
# patch size and eps all vary; latent grids (after patching) T'=3, H'=6, W'=10 and others.
CONFIGS = {
    "one-layer": dict(num_attention_heads=2, attention_head_dim=12, num_layers=1, ffn_dim=40, text_dim=16,
                      freq_dim=32, eps=1e-5, patch_size=(1, 2, 2)),
    "two-layers": dict(num_attention_heads=3, attention_head_dim=16, num_layers=2, ffn_dim=96, text_dim=24,
                       freq_dim=64, eps=1e-4, patch_size=(1, 2, 2)),
    "three-layers-odd-patch": dict(num_attention_heads=4, attention_head_dim=8, num_layers=3, ffn_dim=64,
                                   text_dim=8, freq_dim=256, eps=1e-6, patch_size=(2, 1, 2)),
}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def random_diffusers_model(seed: int, **sizes) -> WanTransformer3DModel:
    """A diffusers Wan transformer with every parameter random, including those diffusers or Wan
    initialise to zero or one (biases, norm weights, output layer), so parity covers all of them."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**sizes).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.1)
            elif "scale_shift_table" in name or parameter.ndim == 1:
                parameter.normal_(0.0, 0.5)
            else:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)  # 1 / sqrt(fan in)
    return model


def random_inputs(sizes: dict, grid: tuple[int, int, int], seed: int = 1, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, *(g * p for g, p in zip(grid, sizes["patch_size"])), generator=generator)
    timestep = torch.tensor([999.0, 412.5][:batch])
    text = torch.zeros(batch, TEXT_LEN, sizes["text_dim"])
    text[:, :7] = torch.randn(batch, 7, sizes["text_dim"], generator=generator)  # a zero-padded prompt
    return latents, timestep, text


# The test's own diffusers -> official renaming, written from the list of official names, as regular
# expressions (independent of the table in stages/base/dit.py).
OFFICIAL_RENAMES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn1\.norm_", ".self_attn.norm_"),
    (r"\.attn2\.norm_", ".cross_attn.norm_"),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
]


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in OFFICIAL_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor.contiguous()
    return renamed


def official_config(sizes: dict) -> dict:
    """config.json as the official release writes it (with the keys a small model needs besides)."""
    return {
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
        "dim": sizes["num_attention_heads"] * sizes["attention_head_dim"], "ffn_dim": sizes["ffn_dim"],
        "num_heads": sizes["num_attention_heads"], "num_layers": sizes["num_layers"], "in_dim": 16,
        "out_dim": 16, "freq_dim": sizes["freq_dim"], "text_dim": sizes["text_dim"], "text_len": TEXT_LEN,
        "eps": sizes["eps"], "patch_size": list(sizes["patch_size"]),
    }


def write_official(folder, sizes: dict, state_dict: dict[str, torch.Tensor], shards: int = 1):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(official_config(sizes)))
    if shards == 1:
        save_file(state_dict, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder
    keys = sorted(state_dict)
    weight_map = {}
    for index in range(shards):
        name = f"diffusion_pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[index::shards]
        save_file({key: state_dict[key] for key in part}, str(folder / name))
        weight_map.update({key: name for key in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def case(request, tmp_path_factory):
    """A random diffusers model saved in the diffusers layout, its official state dict, and its
    output on a batch of 2 with an odd latent grid."""
    sizes = CONFIGS[request.param]
    reference = random_diffusers_model(seed=list(CONFIGS).index(request.param), **sizes)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder / "transformer")
    inputs = random_inputs(sizes, grid=(3, 6, 10))
    with torch.no_grad():
        expected = reference(*inputs, return_dict=False)[0]
    return dict(sizes=sizes, folder=folder, reference=reference, inputs=inputs, expected=expected,
                official=to_official(reference.state_dict()))


def run(model: WanDiT, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def test_loads_diffusers_layout_with_parity(case, record_property):
    model = WanDiT.from_pretrained(case["folder"] / "transformer")
    assert model.config.text_len == TEXT_LEN and model.config.eps == case["sizes"]["eps"]
    error = relative_error(run(model, case["inputs"]), case["expected"])
    record_property("relative_error", error)  # collected by bench/parity_report.py
    assert error < PARITY_TOLERANCE


def test_loads_diffusers_pipeline_folder(case):
    (case["folder"] / "model_index.json").write_text("{}")
    model = WanDiT.from_pretrained(case["folder"])
    assert relative_error(run(model, case["inputs"]), case["expected"]) < PARITY_TOLERANCE


@pytest.mark.parametrize("shards", [1, 2], ids=["one-file", "two-shards"])
def test_loads_official_layout_with_parity(case, tmp_path, shards, record_property):
    folder = write_official(tmp_path / "official", case["sizes"], case["official"], shards)
    model = WanDiT.from_pretrained(folder)
    error = relative_error(run(model, case["inputs"]), case["expected"])
    record_property("relative_error", error)
    assert error < PARITY_TOLERANCE
    if shards == 2:  # the index file itself, with the config beside it
        model = WanDiT.from_pretrained(folder / "diffusion_pytorch_model.safetensors.index.json")
        assert relative_error(run(model, case["inputs"]), case["expected"]) < PARITY_TOLERANCE


@pytest.mark.parametrize("case", ["one-layer"], indirect=True)
def test_loads_single_files_with_a_given_config(case, tmp_path):
    folder = write_official(tmp_path / "official", case["sizes"], case["official"])
    config = read_config(folder / "config.json")
    torch.save(case["official"], tmp_path / "dit.pth")
    save_file(case["official"], str(tmp_path / "dit.safetensors"))
    for file in ("dit.pth", "dit.safetensors"):
        model = WanDiT.from_pretrained(tmp_path / file, config=config)
        assert relative_error(run(model, case["inputs"]), case["expected"]) < PARITY_TOLERANCE


def test_official_names_and_conversion(case):
    ours = official_state_dict_from_diffusers(case["reference"].state_dict())
    assert sorted(ours) == sorted(case["official"])
    assert all(torch.equal(ours[key], case["official"][key]) for key in ours)
    model_keys = set(WanDiT(read_config(case["folder"] / "transformer" / "config.json")).state_dict())
    assert model_keys == set(case["official"])


def test_official_key_names_of_the_release():
    with torch.device("meta"):
        model = WanDiT(dataclasses.replace(WAN_DIT_SIZES["1.3b"], num_layers=1))
    expected = {
        "patch_embedding.weight", "patch_embedding.bias", "head.modulation", "head.head.weight",
        "head.head.bias", "blocks.0.modulation", "blocks.0.norm3.weight", "blocks.0.norm3.bias",
    }
    for prefix in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                   "time_projection.1", "blocks.0.ffn.0", "blocks.0.ffn.2"):
        expected |= {f"{prefix}.weight", f"{prefix}.bias"}
    for attention in ("self_attn", "cross_attn"):
        for projection in "qkvo":
            expected |= {f"blocks.0.{attention}.{projection}.{name}" for name in ("weight", "bias")}
        expected |= {f"blocks.0.{attention}.norm_q.weight", f"blocks.0.{attention}.norm_k.weight"}
    assert set(model.state_dict()) == expected
    assert model.state_dict()["blocks.0.modulation"].shape == (1, 6, 1536)
    assert model.state_dict()["head.head.weight"].shape == (16 * 1 * 2 * 2, 1536)


def test_released_sizes_and_config_file(tmp_path):
    # config.json exactly as the Wan2.1-T2V-1.3B release ships it
    release = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
               "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
               "num_layers": 30, "out_dim": 16, "text_len": 512}
    (tmp_path / "config.json").write_text(json.dumps(release))
    assert read_config(tmp_path / "config.json") == WAN_DIT_SIZES["1.3b"]
    for name, (low, high) in {"1.3b": (1.2e9, 1.6e9), "14b": (13e9, 15e9)}.items():
        with torch.device("meta"):
            count = sum(p.numel() for p in WanDiT(WAN_DIT_SIZES[name]).parameters())
        assert low < count < high, (name, count)


@pytest.mark.parametrize("case", ["two-layers"], indirect=True)
def test_second_grid_size_uses_its_own_rotary_embedding(case):
    model = WanDiT.from_pretrained(case["folder"] / "transformer")
    run(model, case["inputs"])  # caches the (3, 6, 10) grid
    inputs = random_inputs(case["sizes"], grid=(2, 5, 3), seed=5, batch=1)
    with torch.no_grad():
        expected = case["reference"](*inputs, return_dict=False)[0]
    assert relative_error(run(model, inputs), expected) < PARITY_TOLERANCE


@pytest.mark.parametrize("case", ["three-layers-odd-patch"], indirect=True)
def test_bfloat16_runs_close_to_float32(case):
    float32 = run(WanDiT.from_pretrained(case["folder"] / "transformer"), case["inputs"])
    cast = WanDiT.from_pretrained(case["folder"] / "transformer").to(torch.bfloat16)
    loaded = WanDiT.from_pretrained(case["folder"] / "transformer", dtype=torch.bfloat16)
    assert loaded.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert loaded.blocks[0].modulation.dtype == torch.float32  # small parts stay float32, as in Wan
    assert loaded.time_embedding[0].weight.dtype == torch.float32
    for model in (cast, loaded):
        output = run(model, case["inputs"])
        assert output.dtype == torch.float32 and torch.isfinite(output).all()
        assert relative_error(output, float32) < 3e-2


def test_timestep_embedding_matches_closed_form():
    timestep = np.array([0.0, 1.0, 412.5, 999.0])
    half = 128
    angles = timestep[:, None] / 10000.0 ** (np.arange(half) / half)
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    ours = timestep_embedding(torch.tensor(timestep, dtype=torch.float32), 2 * half).numpy()
    assert np.abs(ours - expected).max() < 1e-6


@pytest.mark.parametrize("grad", [False, True])  # oneDNN's fused kernel without autograd; torch's ops with it
def test_linear_then_gelu_is_the_tanh_gelu_of_the_linear_map(grad):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    x = torch.randn(2, 7, 24) * 3
    with torch.set_grad_enabled(grad):
        ours = linear_then_gelu(x, linear)
    assert ours.requires_grad == grad
    z = x.double() @ linear.weight.double().T + linear.bias.double()
    expected = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    assert (ours.double() - expected).abs().max() < 1e-5


def test_rms_norm_matches_closed_form_and_trains():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, 16, dtype=torch.float64) * torch.tensor([1e-4, 1.0, 1e3], dtype=torch.float64)[:, None, None]
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    ours = norm(x.float().requires_grad_())
    assert ((ours.double() - expected).abs() / expected.abs().amax(-1, keepdim=True)).max() < 1e-6
    ours.sum().backward()
    assert norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def official_folder_sizes():
    return CONFIGS["one-layer"]


def official_weights(sizes) -> dict[str, torch.Tensor]:
    return to_official(random_diffusers_model(seed=0, **sizes).state_dict())


def test_missing_key_is_named(tmp_path, official_folder_sizes):
    weights = official_weights(official_folder_sizes)
    del weights["blocks.0.cross_attn.k.bias"]
    folder = write_official(tmp_path / "official", official_folder_sizes, weights)
    with pytest.raises(WeightsError, match=r"missing keys: blocks\.0\.cross_attn\.k\.bias"):
        WanDiT.from_pretrained(folder)


def test_wrong_shape_names_key_expected_and_found(tmp_path, official_folder_sizes):
    weights = official_weights(official_folder_sizes)
    weights["head.modulation"] = torch.zeros(1, 3, 24)
    folder = write_official(tmp_path / "official", official_folder_sizes, weights)
    with pytest.raises(WeightsError, match=r"head\.modulation \(expected \(1, 2, 24\), found \(1, 3, 24\)\)"):
        WanDiT.from_pretrained(folder)


def test_integer_tensor_is_a_wrong_dtype(tmp_path, official_folder_sizes):
    weights = official_weights(official_folder_sizes)
    weights["blocks.0.ffn.0.weight"] = torch.zeros_like(weights["blocks.0.ffn.0.weight"], dtype=torch.int32)
    folder = write_official(tmp_path / "official", official_folder_sizes, weights)
    expected = r"blocks\.0\.ffn\.0\.weight \(expected a floating dtype, found torch\.int32\)"
    with pytest.raises(WeightsError, match=expected):
        WanDiT.from_pretrained(folder)


def test_folder_in_no_layout_names_folder_and_expected_files(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not weights")
    with pytest.raises(WeightsError) as error:
        WanDiT.from_pretrained(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "config.json" in message and "diffusion_pytorch_model.safetensors" in message


def test_single_file_without_config_asks_for_one(tmp_path, official_folder_sizes):
    save_file(official_weights(official_folder_sizes), str(tmp_path / "dit.safetensors"))
    with pytest.raises(WeightsError, match="pass config="):
        WanDiT.from_pretrained(tmp_path / "dit.safetensors")


def test_unsupported_config_files(tmp_path):
    file = tmp_path / "config.json"
    file.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(WeightsError, match="neither an official"):
        read_config(file)
    file.write_text(json.dumps({"dim": 24, "num_heads": 2, "model_type": "i2v"}))
    with pytest.raises(WeightsError, match="model_type='i2v'"):
        read_config(file)
    file.write_text(json.dumps({"num_attention_heads": 2, "attention_head_dim": 12, "image_dim": 1280}))
    with pytest.raises(WeightsError, match="image-conditioned"):
        read_config(file)
    file.write_text(json.dumps({"dim": 24, "num_heads": 2, "window": 3}))
    with pytest.raises(WeightsError, match="window"):
        read_config(file)
    file.write_text(json.dumps({"dim": 24, "num_heads": 5}))
    with pytest.raises(WeightsError, match="num_heads=5"):
        read_config(file)


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(dim=30, num_heads=4), "num_heads=4"),
        (dict(dim=16, num_heads=4), "head dim"),  # head dim 4 < 6
        (dict(dim=36, num_heads=4), "head dim"),  # head dim 9 is odd
        (dict(patch_size=[1, 2]), "patch_size"),
        (dict(num_layers=0), "num_layers"),
        (dict(freq_dim=255), "freq_dim"),
        (dict(eps=0.0), "eps"),
    ],
)
def test_invalid_config_names_the_field(changes, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        WanDiTConfig(**{**dataclasses.asdict(WAN_DIT_SIZES["tiny"]), **changes})


def test_wrong_inputs_are_named():
    model = WanDiT(WAN_DIT_SIZES["tiny"])
    latents, timestep = torch.zeros(1, 16, 2, 4, 4), torch.zeros(1)
    with pytest.raises(ValueError, match="text_len=128"):
        model(latents, timestep, torch.zeros(1, 100, 64))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(torch.zeros(1, 16, 2, 5, 4), timestep, torch.zeros(1, 128, 64))
    with pytest.raises(ValueError, match=r"timestep must be \(1,\)"):
        model(latents, torch.zeros(2), torch.zeros(1, 128, 64))


def test_config_is_an_omegaconf_structured_config():
    schema = OmegaConf.structured(WanDiTConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"dim": 256, "num_heads": 4, "patch_size": [1, 4, 4]}))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, WanDiTConfig) and config.head_dim == 64 and config.patch_size == [1, 4, 4]
    with pytest.raises(Exception, match="num_layers"):
        OmegaConf.merge(schema, OmegaConf.create({"num_layers": "many"}))
    for size in WAN_DIT_SIZES.values():
        assert OmegaConf.to_object(OmegaConf.structured(size)) == size


def test_untrained_model_runs_at_the_tiny_size():
    torch.manual_seed(0)
    model = WanDiT(WAN_DIT_SIZES["tiny"])
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.02)  # Wan initialises the output layer to zero
        velocity = model(torch.randn(1, 16, 2, 16, 16), torch.tensor([500.0]), torch.zeros(1, 128, 64))
    assert velocity.shape == (1, 16, 2, 16, 16)
    assert torch.isfinite(velocity).all() and velocity.abs().max() > 0


def test_frame_positions_place_the_frames_on_the_rotary_axis():
    """Frames given positions 0, 3, 6 rotate as frames 0, 3 and 6 of a 7-frame grid do, and their
    rows alone: height and width rotate as before."""
    head_dim = 24
    whole = rope_rotations((7, 2, 3), head_dim).view(7, 6, 1, head_dim // 2)
    spread = rope_rotations((3, 2, 3), head_dim, frame_positions=[0, 3, 6]).view(3, 6, 1, head_dim // 2)
    torch.testing.assert_close(spread, whole[[0, 3, 6]], rtol=0, atol=0)
    torch.testing.assert_close(rope_rotations((3, 2, 3), head_dim, frame_positions=[0, 1, 2]),
                               rope_rotations((3, 2, 3), head_dim), rtol=0, atol=0)


def test_only_the_differences_of_frame_positions_reach_the_velocity():
    """Rotary attention depends on the offsets between tokens: frames at 0, 3, 6 give the velocity of
    frames at 4, 7, 10 (to float rounding), and a different spacing gives another velocity."""
    dit = random_dit()
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, 3, 4, 4, generator=generator)
    timestep, text = torch.tensor([500.0]), torch.randn(1, SMALL_DIT.text_len, SMALL_DIT.text_dim, generator=generator)
    with torch.no_grad():
        spread = dit(latents, timestep, text, frame_positions=[0, 3, 6])
        shifted = dit(latents, timestep, text, frame_positions=[4, 7, 10])
        neighbours = dit(latents, timestep, text)
    torch.testing.assert_close(shifted, spread, rtol=1e-4, atol=1e-5)
    assert (spread - neighbours).abs().max() > 1e-2 * neighbours.abs().max()


@pytest.mark.parametrize("positions", [[0, 3], [0, 3, 3], [6, 3, 0]])
def test_bad_frame_positions_are_named(positions):
    with pytest.raises(ValueError, match=r"frame_positions .* must be 3 rising integers"):
        random_dit()(torch.zeros(1, 16, 3, 4, 4), torch.tensor([500.0]), torch.zeros(1, SMALL_DIT.text_len, SMALL_DIT.text_dim),
                     frame_positions=positions)
