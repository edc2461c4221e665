"""The wavelet transform against pywavelets, and the upsampler's defining property: its output,
transformed back, holds the input (times the low-band gain) in its low band."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from stages.ssr import WaveletUpsampler, WaveletUpsamplerConfig, dwt2, idwt2
from stages.ssr.wavelet import LOW_BAND_GAIN, _filter_bank
from stages.weights import load_into, read_state_dict

WAVELETS = ["haar", "db2", "db4", "sym4", "coif1"]
# (B, C, H, W): non-square, single image, and sizes smaller than the longer filters (wrap-around)
SHAPES = [(2, 3, 8, 12), (1, 1, 16, 6), (1, 2, 2, 4)]


def pywt_bands(x: np.ndarray, wavelet: str) -> np.ndarray:
    approximation, (horizontal, vertical, diagonal) = pywt.dwt2(x, wavelet, mode="periodization")
    return np.stack([approximation, horizontal, vertical, diagonal], axis=2)  # (B, C, 4, h, w)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dwt2_and_idwt2_equal_pywt(wavelet: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal(shape)
    bands = rng.standard_normal((*shape[:2], 4, shape[2] // 2, shape[3] // 2))

    got = dwt2(torch.from_numpy(image), wavelet).numpy()
    np.testing.assert_allclose(got, pywt_bands(image, wavelet), rtol=0, atol=1e-10)

    expected = pywt.idwt2(
        (bands[:, :, 0], (bands[:, :, 1], bands[:, :, 2], bands[:, :, 3])), wavelet, mode="periodization"
    )
    np.testing.assert_allclose(idwt2(torch.from_numpy(bands), wavelet).numpy(), expected, rtol=0, atol=1e-10)


def test_float32_matches_pywt_to_float32_precision() -> None:
    image = np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 16))
    got = dwt2(torch.from_numpy(image).float(), "db2")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), pywt_bands(image, "db2"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_perfect_reconstruction_and_energy(wavelet: str) -> None:
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 10, 14, generator=generator, dtype=torch.float64)
    bands = dwt2(image, wavelet)
    torch.testing.assert_close(idwt2(bands, wavelet), image, rtol=0, atol=1e-10)
    # orthonormal: energy preserved, and idwt2 is the adjoint of dwt2 (<dwt2 x, b> == <x, idwt2 b>)
    torch.testing.assert_close(bands.square().sum(), image.square().sum(), rtol=1e-12, atol=0)
    other_bands = torch.randn(bands.shape, generator=generator, dtype=torch.float64)
    adjoint_side = (image * idwt2(other_bands, wavelet)).sum()
    torch.testing.assert_close((bands * other_bands).sum(), adjoint_side, rtol=1e-12, atol=0)
    torch.testing.assert_close(dwt2(idwt2(other_bands, wavelet), wavelet), other_bands, rtol=0, atol=1e-10)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_low_band_gain_keeps_a_constant_image(wavelet: str) -> None:
    constant = 0.37
    approximation, details = pywt.dwt2(np.full((8, 8), constant), wavelet, mode="periodization")
    np.testing.assert_allclose(approximation, LOW_BAND_GAIN * constant, rtol=0, atol=1e-12)
    bands = torch.zeros(1, 1, 4, 4, 4, dtype=torch.float64)
    bands[:, :, 0] = LOW_BAND_GAIN * constant
    expected = torch.full((1, 1, 8, 8), constant, dtype=torch.float64)
    torch.testing.assert_close(idwt2(bands, wavelet), expected, rtol=0, atol=1e-12)


def test_gradients_flow_after_first_use_in_inference_mode() -> None:
    _filter_bank.cache_clear()
    with torch.inference_mode():
        dwt2(torch.zeros(1, 1, 4, 4), "db2")  # caches the float32 kernels while in inference mode
    image = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    weights = torch.randn(1, 1, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    (dwt2(image, "db2") * weights).sum().backward()
    # the gradient of x -> <dwt2 x, w> is the adjoint applied to w, i.e. idwt2(w)
    torch.testing.assert_close(image.grad, idwt2(weights, "db2"))


def test_transform_errors_name_the_problem() -> None:
    image = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"'nosuch'.*wavelist\(kind='discrete'\)"):
        dwt2(image, "nosuch")
    with pytest.raises(ValueError, match="'bior2.2' is not orthogonal"):
        dwt2(image, "bior2.2")
    with pytest.raises(ValueError, match="'dmey'.*approximately orthonormal"):
        idwt2(torch.zeros(1, 1, 4, 2, 2), "dmey")
    with pytest.raises(ValueError, match="H=5, W=4"):
        dwt2(torch.zeros(1, 1, 5, 4), "haar")
    with pytest.raises(ValueError, match=r"\(1, 4, 4\)"):
        dwt2(torch.zeros(1, 4, 4), "haar")
    with pytest.raises(ValueError, match=r"\(1, 1, 3, 2, 2\)"):
        idwt2(torch.zeros(1, 1, 3, 2, 2), "haar")
    with pytest.raises(ValueError, match="torch.int64"):
        dwt2(torch.zeros(1, 1, 4, 4, dtype=torch.long), "haar")


def randomise_last_layers(upsampler: WaveletUpsampler, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for level in upsampler.levels:
            level.tail.weight.copy_(0.1 * torch.randn(level.tail.weight.shape, generator=generator))
            level.tail.bias.copy_(0.1 * torch.randn(level.tail.bias.shape, generator=generator))


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("trained", [False, True])
def test_output_low_band_is_the_input(wavelet: str, scale: int, trained: bool) -> None:
    torch.manual_seed(5)
    config = WaveletUpsamplerConfig(wavelet=wavelet, channels=8, num_blocks=2, scale=scale)
    upsampler = WaveletUpsampler(config).double()
    if trained:
        randomise_last_layers(upsampler, seed=6)
    first, second = torch.rand(2, 2, 3, 6, 10, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        _, previous = upsampler(first)
        # the second frame of each video, predicted with the first frame's output bands as state
        for frames, output in ((first, upsampler(first)[0]), (second, upsampler(second, previous)[0])):
            # Undo one level at a time: each level's low band is the gain times the level's input.
            levels = {2: 1, 4: 2}[scale]
            current = output
            for _ in range(levels):
                bands = dwt2(current, wavelet)
                if trained:  # the network really did predict detail, so the check below is not vacuous
                    assert bands[:, :, 1:].abs().max() > 1e-3
                else:
                    assert bands[:, :, 1:].abs().max() < 1e-12
                current = bands[:, :, 0] / LOW_BAND_GAIN
            torch.testing.assert_close(current, frames, rtol=0, atol=1e-12)


def test_untrained_haar_upsampler_repeats_each_pixel() -> None:
    frames = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(7)) * 2 - 1
    upsampler = WaveletUpsampler(WaveletUpsamplerConfig(wavelet="haar", channels=8, num_blocks=1, scale=4))
    with torch.no_grad():
        output, _ = upsampler(frames)
    expected = frames.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("wavelet", ["haar", "db4"])
@pytest.mark.parametrize("scale", [2, 4])
def test_shapes_and_untrained_constant_frame(wavelet: str, scale: int) -> None:
    torch.manual_seed(8)
    config = WaveletUpsamplerConfig(wavelet=wavelet, channels=8, num_blocks=1, scale=scale)
    upsampler = WaveletUpsampler(config)
    frames = torch.empty(2, 3, 5, 9).uniform_(-1, 1)
    frames[1] = torch.tensor([-0.5, 0.25, 0.9]).view(3, 1, 1)  # the second frame is constant per colour
    with torch.no_grad():
        output, _ = upsampler(frames)
    assert output.shape == (2, 3, scale * 5, scale * 9)
    expected = torch.tensor([-0.5, 0.25, 0.9]).view(3, 1, 1).expand(3, scale * 5, scale * 9)
    torch.testing.assert_close(output[1], expected, rtol=0, atol=1e-5)


def test_upsampler_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="got 3"):
        WaveletUpsampler(WaveletUpsamplerConfig(scale=3))
    with pytest.raises(ValueError, match="'nosuch'"):
        WaveletUpsampler(WaveletUpsamplerConfig(wavelet="nosuch"))
    with pytest.raises(ValueError, match="'bior1.3'"):
        WaveletUpsampler(WaveletUpsamplerConfig(wavelet="bior1.3"))
    with pytest.raises(ValueError, match="got 0"):
        WaveletUpsampler(WaveletUpsamplerConfig(channels=0))
    upsampler = WaveletUpsampler(WaveletUpsamplerConfig(channels=4, num_blocks=1))
    with pytest.raises(ValueError, match=r"\(1, 4, 8, 8\)"):
        upsampler(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 3, 0, 8\)"):
        upsampler(torch.zeros(1, 3, 0, 8))
    with pytest.raises(ValueError, match="torch.uint8"):
        upsampler(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_default_size_config_and_weight_loading(tmp_path) -> None:
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WaveletUpsamplerConfig), {"scale": 4}))
    assert isinstance(config, WaveletUpsamplerConfig) and config.scale == 4
    torch.manual_seed(9)
    trained = WaveletUpsampler(config)
    assert sum(parameter.numel() for parameter in trained.parameters()) <= 200_000
    randomise_last_layers(trained, seed=10)
    save_file(trained.state_dict(), str(tmp_path / "ssr.safetensors"))

    torch.manual_seed(11)
    loaded = WaveletUpsampler(config)
    load_into(loaded, read_state_dict(tmp_path / "ssr.safetensors"), "ssr.safetensors")
    frames = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames)[0], trained(frames)[0], rtol=0, atol=0)
