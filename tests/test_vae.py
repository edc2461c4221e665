"""The Wan2.1 VAE against diffusers' `AutoencoderKLWan` (the reference), loaded from both checkpoint
layouts, plus shapes, causality, chunked decoding, tiling and errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf

from stages.base.vae import (
    WAN_VAE_SIZES,
    AttentionBlock,
    WanVAE,
    WanVAEConfig,
    blend_weights,
    channel_norm,
    official_state_dict_from_diffusers,
    tile_spans,
)
from stages.weights import WeightsError

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

# A small VAE of the Wan2.1 structure; z_dim 4 with its own latent statistics, so that the test
# also checks they travel through the diffusers config.json.
SMALL = WanVAEConfig(base_dim=8, z_dim=4, latents_mean=[0.3, -0.5, 1.2, 0.0], latents_std=[1.5, 0.7, 2.5, 1.1])
PARITY_TOLERANCE = 1e-4  # max |ours − reference| / max |reference|


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms' gammas included, scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("gamma"):
                parameter.copy_(1 + 0.3 * noise)
            elif parameter.dim() > 1:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            else:
                parameter.copy_(0.1 * noise)


def random_frames(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_latents(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def small_pair() -> tuple[WanVAE, AutoencoderKLWan]:
    """Our small VAE with random weights, and diffusers' loaded with the same weights through
    diffusers' own converter of the official names."""
    ours = WanVAE(SMALL).eval()
    randomise(ours, seed=0)
    reference = AutoencoderKLWan(
        base_dim=SMALL.base_dim, z_dim=SMALL.z_dim, latents_mean=SMALL.latents_mean, latents_std=SMALL.latents_std
    ).eval()
    reference.load_state_dict(convert_wan_vae_to_diffusers(ours.state_dict()), strict=True)
    return ours, reference


def reference_encode(reference: AutoencoderKLWan, frames: torch.Tensor) -> torch.Tensor:
    """diffusers' posterior mean, normalised as Wan does: (mu − mean) / std."""
    mean = torch.tensor(reference.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return (reference.encode(frames).latent_dist.mean - mean) / std


def reference_decode(reference: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(reference.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return reference.decode(latents * std + mean).sample


def assert_matches_reference(ours: WanVAE, reference: AutoencoderKLWan, num_frames: int, seed: int,
                             record_property) -> None:
    frames = random_frames((2, 3, num_frames, 16, 24), seed)
    latents = ours.encode(frames)
    assert latents.shape == (2, SMALL.z_dim, 1 + (num_frames - 1) // 4, 2, 3)
    encode_error = relative_error(latents, reference_encode(reference, frames))
    record_property("encode_relative_error", encode_error)  # collected by bench/parity_report.py
    assert encode_error < PARITY_TOLERANCE

    decoded = ours.decode(latents)
    expected = reference_decode(reference, latents)
    assert decoded.shape == expected.shape == frames.shape
    assert (expected.abs() < 1).float().mean() > 0.5  # most values unclamped: the comparison means something
    decode_error = relative_error(decoded, expected)
    record_property("decode_relative_error", decode_error)
    assert decode_error < PARITY_TOLERANCE


def test_diffusers_folder_matches_diffusers(small_pair, tmp_path, record_property):
    _, reference = small_pair
    reference.save_pretrained(tmp_path / "vae")  # a pipeline folder's vae/: config.json + safetensors
    for path in (tmp_path / "vae", tmp_path):
        loaded = WanVAE.from_pretrained(path)
        assert loaded.config.latents_mean == SMALL.latents_mean and loaded.config.z_dim == SMALL.z_dim
        assert loaded.config.base_dim == SMALL.base_dim
    assert_matches_reference(loaded, reference, num_frames=9, seed=1, record_property=record_property)  # 3 latent frames


def test_official_pth_matches_diffusers(small_pair, tmp_path, record_property):
    ours, reference = small_pair
    torch.save(ours.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    from_folder = WanVAE.from_pretrained(tmp_path, config=SMALL)
    from_file = WanVAE.from_pretrained(tmp_path / "Wan2.1_VAE.pth", config=SMALL)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(from_folder.state_dict()[name], tensor)
    assert_matches_reference(from_file, reference, num_frames=13, seed=2, record_property=record_property)  # 4 latent frames


def test_wan21_names_and_shapes_are_the_official_ones():
    """At full size, diffusers' converter of official names maps our state dict onto exactly the
    parameters of diffusers' default (Wan2.1) VAE, and our converter maps them back."""
    with torch.device("meta"):
        ours = WanVAE(WAN_VAE_SIZES["wan2.1"]).state_dict()
        theirs = AutoencoderKLWan().state_dict()
    converted = convert_wan_vae_to_diffusers(ours)
    assert {name: tuple(tensor.shape) for name, tensor in converted.items()} == {
        name: tuple(tensor.shape) for name, tensor in theirs.items()
    }
    assert set(official_state_dict_from_diffusers(theirs)) == set(ours)
    assert sum(tensor.numel() for tensor in ours.values()) == 126_892_531


def test_shapes_and_compression_of_the_tiny_size():
    torch.manual_seed(0)
    vae = WanVAE(WAN_VAE_SIZES["tiny"]).eval()
    assert (vae.temporal_compression, vae.spatial_compression) == (4, 8)
    for num_frames, latent_frames in ((1, 1), (5, 2), (9, 3)):
        latents = vae.encode(random_frames((2, 3, num_frames, 16, 32), seed=num_frames))
        assert latents.shape == (2, 16, latent_frames, 2, 4) and latents.dtype == torch.float32
        frames = vae.decode(latents)
        assert frames.shape == (2, 3, num_frames, 16, 32)
        assert frames.abs().max() <= 1.0


def test_encoding_and_decoding_are_causal(small_pair):
    ours, _ = small_pair
    frames = random_frames((1, 3, 9, 16, 16), seed=3)
    changed = frames.clone()
    changed[:, :, 5:] = random_frames((1, 3, 4, 16, 16), seed=4)  # only the last chunk differs
    latents, latents_changed = ours.encode(frames), ours.encode(changed)
    assert torch.equal(latents[:, :, :2], latents_changed[:, :, :2])
    assert not torch.allclose(latents[:, :, 2], latents_changed[:, :, 2])

    decoded = ours.decode(latents)
    later_changed = latents.clone()
    later_changed[:, :, 2] += 1.0
    decoded_changed = ours.decode(later_changed)
    assert torch.equal(decoded[:, :, :5], decoded_changed[:, :, :5])
    assert not torch.allclose(decoded[:, :, 5:], decoded_changed[:, :, 5:])


def test_iter_decode_yields_the_chunks_of_decode(small_pair):
    ours, _ = small_pair
    latents = random_latents((1, SMALL.z_dim, 4, 2, 2), seed=5)
    reported = []
    chunks = list(ours.iter_decode(latents, progress=lambda done, total: reported.append((done, total))))
    assert [chunk.shape[2] for chunk in chunks] == [1, 4, 4, 4]
    assert reported == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert torch.equal(torch.cat(chunks, dim=2), ours.decode(latents))


@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float16, 300.0)])
def test_channel_norm_is_the_float32_norm_over_channels(dtype, magnitude):
    """The CPU's channel-by-channel sum against torch's vector_norm; float16 values of 300, whose
    squares overflow float16, still give their norm."""
    x = (torch.randn(2, 7, 3, 5, 6, generator=torch.Generator().manual_seed(0)) * magnitude).to(dtype)
    reference = torch.linalg.vector_norm(x.double(), dim=1, keepdim=True)
    norm = channel_norm(x)
    assert norm.dtype == torch.float32 and norm.shape == (2, 1, 3, 5, 6)
    torch.testing.assert_close(norm.double(), reference, rtol=1e-6, atol=0)


def test_blend_weights_are_linear_ramps_summing_to_one():
    spans = tile_spans(10, tile_size=4, overlap=2)
    assert spans == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert tile_spans(11, tile_size=4, overlap=1) == [(0, 4), (3, 7), (6, 10), (7, 11)]
    for spans in (tile_spans(10, 4, 2), tile_spans(11, 4, 1), tile_spans(9, 5, 0)):
        total = torch.zeros(spans[-1][1] * 8)
        for (start, end), weight in zip(spans, blend_weights(spans, scale=8)):
            total[start * 8 : end * 8] += weight
        torch.testing.assert_close(total, torch.ones_like(total))
    first, second = blend_weights([(0, 4), (2, 6)], scale=1)
    torch.testing.assert_close(first, torch.tensor([1, 1, 2 / 3, 1 / 3]))
    torch.testing.assert_close(second, torch.tensor([1 / 3, 2 / 3, 1, 1]))


def _tiled_copy(model: WanVAE, tile_size: int, tile_overlap: int) -> WanVAE:
    tiled = WanVAE(dataclasses.replace(model.config, tile_size=tile_size, tile_overlap=tile_overlap)).eval()
    tiled.load_state_dict(model.state_dict())
    return tiled


def _without_attention(model: WanVAE) -> WanVAE:
    """A copy whose middle attention blocks are the identity (as the official initialisation makes
    them): attention spans the whole frame, which no tiling can reproduce, while the convolutions'
    reach is local."""
    copy = _tiled_copy(model, 0, 0)
    with torch.no_grad():
        for module in copy.modules():
            if isinstance(module, AttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
    return copy


def test_tiling_of_a_spatially_local_network_is_exact(small_pair):
    """With every spatial kernel reduced to its centre tap, each output pixel depends only on its
    own position: tiles placed right and blended with weights summing to one must reproduce the
    untiled result."""
    local = _without_attention(small_pair[0])
    with torch.no_grad():
        for module in local.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.weight.shape[-1] == 3:
                centre = module.weight[..., 1, 1].clone()
                module.weight.zero_()
                module.weight[..., 1, 1] = centre
    latents = random_latents((1, SMALL.z_dim, 2, 10, 12), seed=6)
    frames = random_frames((1, 3, 5, 80, 96), seed=7)
    tiled = _tiled_copy(local, tile_size=4, tile_overlap=2)
    torch.testing.assert_close(tiled.decode(latents), local.decode(latents), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiled.encode(frames), local.encode(frames), atol=1e-5, rtol=0)


def test_tiled_decode_is_close_to_untiled_and_blending_reduces_seams(small_pair):
    """A random network reaches far (its receptive field spans more than a tile), so tiles differ
    from the whole frame near their borders; blending the overlaps must bring them closer than
    abutting tiles do. (Measured: mean error 15% of the mean signal, 38% of the abutting tiles'.)"""
    convolutional = _without_attention(small_pair[0])
    latents = random_latents((1, SMALL.z_dim, 1, 6, 6), seed=8)
    smooth = torch.nn.functional.interpolate(latents, size=(1, 24, 24), mode="trilinear")
    untiled = convolutional.decode(smooth)
    abutting = _tiled_copy(convolutional, tile_size=12, tile_overlap=0).decode(smooth)
    blended = _tiled_copy(convolutional, tile_size=12, tile_overlap=6).decode(smooth)
    blended_error, abutting_error = (blended - untiled).abs(), (abutting - untiled).abs()
    assert blended_error.mean() < 0.2 * untiled.abs().mean()
    assert blended_error.mean() < 0.5 * abutting_error.mean()
    assert blended_error.max() < 0.5 * abutting_error.max()


@pytest.mark.parametrize(
    ("shape", "message"),
    [((1, 3, 8, 16, 16), "frame count 8"), ((1, 3, 5, 12, 16), "12x16"), ((1, 4, 5, 16, 16), "(1, 4, 5, 16, 16)")],
)
def test_bad_frames_are_named(small_pair, shape, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        small_pair[0].encode(torch.zeros(shape))


def test_bad_latents_and_configs_are_named(small_pair):
    with pytest.raises(ValueError, match=r"\(B, 4, T', h, w\).*\(1, 16, 2, 2, 2\)"):
        small_pair[0].decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="latents_std has 16 values; z_dim = 4"):
        WanVAE(dataclasses.replace(SMALL, latents_std=WanVAEConfig().latents_std))
    with pytest.raises(ValueError, match="tile_overlap 4 must be smaller than tile_size 4"):
        WanVAE(dataclasses.replace(SMALL, tile_size=4, tile_overlap=4))


def test_bad_checkpoints_are_named(small_pair, tmp_path):
    ours, reference = small_pair
    with pytest.raises(WeightsError, match="Wan2.1_VAE.pth.*config.json"):
        WanVAE.from_pretrained(tmp_path)  # empty folder: neither layout

    partial = dict(ours.state_dict())
    del partial["decoder.head.2.bias"]
    partial["encoder.conv1.weight"] = partial["encoder.conv1.weight"][:4]
    torch.save(partial, tmp_path / "Wan2.1_VAE.pth")
    expected = r"missing keys: decoder\.head\.2\.bias.*mis-shaped keys: encoder\.conv1\.weight"
    with pytest.raises(WeightsError, match=expected):
        WanVAE.from_pretrained(tmp_path, config=SMALL)
    with pytest.raises(WeightsError, match="mis-shaped"):  # the right file, the wrong sizes
        WanVAE.from_pretrained(tmp_path / "Wan2.1_VAE.pth", config=WAN_VAE_SIZES["tiny"])

    folder = tmp_path / "wan22"
    reference.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "is_residual": True}))
    with pytest.raises(WeightsError, match="is_residual = True"):
        WanVAE.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model.safetensors"):
        WanVAE.from_pretrained(folder)


def test_config_is_an_omegaconf_structured_config():
    merged = OmegaConf.merge(OmegaConf.structured(WanVAEConfig), OmegaConf.create({"tile_size": 32, "base_dim": 16}))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, WanVAEConfig) and (config.tile_size, config.base_dim) == (32, 16)
    assert config.latents_std[0] == 2.8184 and config.temporal_downsample == [False, True, True]
    assert WAN_VAE_SIZES["tiny"].base_dim == 16 and WAN_VAE_SIZES["wan2.1"].base_dim == 96
