"""Temporal super-resolution: warping, classical optical flow, frame interpolation.

Every expectation comes from scenes rendered analytically: a pattern evaluated at shifted
coordinates, never produced by the warp under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from stages.pixels import to_model_range, to_uint8
from stages.tsr import (
    ClassicalFlowConfig,
    ClassicalFlowInterpolator,
    backward_warp,
    estimate_flow,
    interpolate_frames,
    interpolate_with_flows,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run this module single-threaded: on the shared 2-core machines a second OpenMP thread that
    waits for a busy core makes these small convolutions up to ten times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Analytic scenes


def texture(x: torch.Tensor, y: torch.Tensor, seed: int, shortest: float = 5.0, longest: float = 128.0) -> torch.Tensor:
    """A smooth random texture in about [0, 1]: twelve plane waves, wavelengths log-uniform in
    [shortest, longest] pixels, random directions and phases; x, y are pixel coordinates."""
    generator = torch.Generator().manual_seed(seed)
    waves = 12
    wavelengths = shortest * (longest / shortest) ** torch.rand(waves, generator=generator, dtype=torch.float64)
    angles = 2 * math.pi * torch.rand(waves, generator=generator, dtype=torch.float64)
    phases = 2 * math.pi * torch.rand(waves, generator=generator, dtype=torch.float64)
    total = torch.zeros_like(x)
    for wavelength, angle, phase in zip(wavelengths, angles, phases):
        total = total + torch.sin(2 * math.pi / wavelength * (torch.cos(angle) * x + torch.sin(angle) * y) + phase)
    return 0.5 + 0.25 * total / math.sqrt(waves / 2)


def pixel_grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    return xs, ys


def translated_texture(height: int, width: int, dx: float, dy: float, seed: int = 0) -> torch.Tensor:
    """(3, H, W) RGB texture moved by (dx, dy) pixels: frame(p) = texture(p − (dx, dy))."""
    xs, ys = pixel_grid(height, width)
    longest = float(max(height, width))
    return torch.stack([texture(xs - dx, ys - dy, seed + channel, longest=longest) for channel in range(3)]).float()


DISC_RADIUS = 14.0
DISC_START = (60.0, 48.0)  # centre (x, y) at time 0 in a 96 × 128 frame


def disc_scene(shift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured disc moved `shift` pixels right over a static textured background, 96 × 128.

    Returns the RGB frame (3, H, W) and the disc's hard mask (H, W). The disc alone lights the red
    channel, so the red mass locates it; its texture moves with it; its edge is anti-aliased.
    """
    xs, ys = pixel_grid(96, 128)
    distance = torch.sqrt((xs - DISC_START[0] - shift) ** 2 + (ys - DISC_START[1]) ** 2)
    alpha = (DISC_RADIUS - distance + 0.5).clamp(0, 1)
    disc = texture(xs - shift, ys, seed + 10)
    red = alpha * (0.3 + 0.7 * disc)
    green = alpha * disc + (1 - alpha) * texture(xs, ys, seed + 20)
    blue = alpha * (1 - disc) + (1 - alpha) * texture(xs, ys, seed + 30)
    return torch.stack([red, green, blue]).float(), (distance < DISC_RADIUS).float()


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    return -10 * math.log10((image - reference).square().mean().item())


def red_centroid_x(frame: torch.Tensor) -> float:
    mass = frame[0].clamp_min(0)
    xs = torch.arange(frame.shape[-1], dtype=frame.dtype)
    return ((mass.sum(0) * xs).sum() / mass.sum()).item()


# ---------------------------------------------------------------------------------------------------
# backward_warp


def test_backward_warp_integer_flow_reproduces_the_shifted_frame():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 20, 24)
    flow = torch.zeros(2, 2, 20, 24)
    flow[:, 0], flow[:, 1] = 3.0, -2.0
    warped = backward_warp(image, flow)
    # output(y, x) = image(y − 2, x + 3) wherever that lies inside the image
    torch.testing.assert_close(warped[..., 2:, :-3], image[..., :-2, 3:], atol=1e-5, rtol=0)
    # outside, the border is repeated: the last column and first row of the image
    torch.testing.assert_close(warped[..., 2:, -1], image[..., :-2, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(warped[..., 0, :-3], image[..., 0, 3:], atol=1e-5, rtol=0)


def test_backward_warp_is_exact_on_bilinear_patterns_and_close_on_smooth_ones():
    height, width = 40, 48
    xs, ys = pixel_grid(height, width)
    # A spatially varying sub-pixel flow, kept inside the frame by the margins checked below.
    flow_x = 0.37 + 0.8 * torch.sin(xs / 7) * torch.cos(ys / 5)
    flow_y = -0.61 + 0.7 * torch.cos(xs / 6 + ys / 9)
    flow = torch.stack((flow_x, flow_y))[None].float()
    interior = (slice(3, -3), slice(3, -3))

    def bilinear(x, y):
        return 0.2 + 0.03 * x - 0.05 * y + 0.002 * x * y

    warped = backward_warp(bilinear(xs, ys)[None, None].float(), flow)[0, 0]
    expected = bilinear(xs + flow_x, ys + flow_y).float()
    torch.testing.assert_close(warped[interior], expected[interior], atol=1e-4, rtol=0)

    def waves(x, y):
        return torch.sin(2 * math.pi * x / 23) + torch.cos(2 * math.pi * (0.6 * x + 0.8 * y) / 19)

    warped = backward_warp(waves(xs, ys)[None, None].float(), flow)[0, 0]
    expected = waves(xs + flow_x, ys + flow_y).float()
    unwarped_error = (waves(xs, ys).float() - expected)[interior].abs().max()
    warp_error = (warped - expected)[interior].abs().max()
    assert warp_error < 0.03, warp_error  # bilinear interpolation error of a ~20 px wave
    assert unwarped_error > 10 * warp_error  # the flow is large enough for the check to mean something


def test_backward_warp_zero_flow_is_identity_in_half_precision():
    torch.manual_seed(1)
    image = torch.rand(1, 4, 9, 11, dtype=torch.float16)
    warped = backward_warp(image, torch.zeros(1, 2, 9, 11))
    assert warped.dtype == torch.float16
    torch.testing.assert_close(warped, image, atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------------
# estimate_flow


@pytest.mark.parametrize(
    "dx, dy",
    [(0.0, 0.0), (0.35, -0.6), (2.5, 1.25), (-5.5, 3.3), (12.0, -7.5)],
)
def test_estimate_flow_recovers_a_translation(dx, dy):
    source = translated_texture(128, 128, 0.0, 0.0)[None]
    target = translated_texture(128, 128, dx, dy)[None]  # source(p) = target(p + (dx, dy))
    flow = estimate_flow(source, target)
    assert flow.shape == (1, 2, 128, 128)
    margin = 16 + math.ceil(max(abs(dx), abs(dy)))
    interior = flow[0, :, margin:-margin, margin:-margin]
    error_x = (interior[0] - dx).abs()
    error_y = (interior[1] - dy).abs()
    assert error_x.median() < 0.1 and error_y.median() < 0.1, (error_x.median(), error_y.median())
    assert torch.quantile(torch.maximum(error_x, error_y).flatten(), 0.95) < 0.25
    if dx == dy == 0:
        assert flow.abs().max() < 1e-2


def test_estimate_flow_follows_an_eighth_of_the_frame_and_ignores_value_range():
    height, width, dx, dy = 96, 160, -20.0, 12.0  # 1/8 of the width and of the height
    source = translated_texture(height, width, 0.0, 0.0, seed=5)[None]
    target = translated_texture(height, width, dx, dy, seed=5)[None]
    flow = estimate_flow(source, target)
    interior = flow[0, :, 24:-24, 32:-32]
    assert (interior[0] - dx).abs().median() < 0.1
    assert (interior[1] - dy).abs().median() < 0.1
    # The same frames mapped to [−1, 1] give the same flow, up to rounding: luminance is normalised
    # per pair (rounding can tip a few of propagation's comparisons, hence the looser maximum).
    rescaled = estimate_flow(2 * source - 1, 2 * target - 1)
    assert (rescaled - flow).abs().mean() < 1e-4
    torch.testing.assert_close(rescaled, flow, atol=0.05, rtol=0)


def test_flow_config_is_a_structured_config_and_rejects_bad_values():
    merged = OmegaConf.merge(OmegaConf.structured(ClassicalFlowConfig), {"iterations": 5})
    config = OmegaConf.to_object(merged)
    assert isinstance(config, ClassicalFlowConfig) and config.iterations == 5
    with pytest.raises(ValueError, match="window_sigma.*-1"):
        ClassicalFlowConfig(window_sigma=-1.0)
    with pytest.raises(ValueError, match="levels.*0"):
        ClassicalFlowConfig(levels=0)


# ---------------------------------------------------------------------------------------------------
# Interpolation between two frames


def test_interpolator_puts_a_moving_disc_halfway_and_beats_blending():
    motion = 8.0
    frames_0, frames_1, middles = [], [], []
    for seed in (0, 2):
        frames_0.append(disc_scene(0.0, seed)[0])
        frames_1.append(disc_scene(motion, seed)[0])
        middles.append(disc_scene(motion / 2, seed)[0])
    frame0, frame1 = torch.stack(frames_0), torch.stack(frames_1)  # (2, 3, 96, 128)

    result = ClassicalFlowInterpolator()(frame0, frame1, [0.0, 0.5, 1.0])
    assert result.shape == (3, 2, 3, 96, 128)
    assert torch.equal(result[0], frame0) and torch.equal(result[2], frame1)
    for index, truth in enumerate(middles):
        middle = result[1, index]
        assert abs(red_centroid_x(middle) - red_centroid_x(truth)) < 0.5
        blended = 0.5 * (frame0[index] + frame1[index])
        assert psnr(middle, truth) > psnr(blended, truth) + 5.0, (psnr(middle, truth), psnr(blended, truth))


def test_fusion_with_exact_flows_handles_occlusions_better_than_linear_flow_blending():
    """Given the true flows, the fixed-point intermediate flows and occlusion-aware weights must
    beat the Super SloMo linear flow combination with plain (1 − t, t) blending clearly."""
    motion, t = 8.0, 0.5
    frame0, disc_0 = disc_scene(0.0)
    frame1, disc_1 = disc_scene(motion)
    truth = disc_scene(motion * t)[0]
    zeros = torch.zeros_like(disc_0)
    flow_01 = torch.stack((motion * disc_0, zeros))[None]  # the disc moves right, the rest stays
    flow_10 = torch.stack((-motion * disc_1, zeros))[None]

    fused = interpolate_with_flows(frame0[None], frame1[None], flow_01, flow_10, [t])[0, 0]

    flow_t0 = -(1 - t) * t * flow_01 + t * t * flow_10
    flow_t1 = (1 - t) ** 2 * flow_01 - t * (1 - t) * flow_10
    linear = (1 - t) * backward_warp(frame0[None], flow_t0) + t * backward_warp(frame1[None], flow_t1)
    assert psnr(fused, truth) > psnr(linear[0], truth) + 5.0, (psnr(fused, truth), psnr(linear[0], truth))
    assert psnr(fused, truth) > 35.0


def test_interpolator_rejects_times_outside_the_pair():
    frame = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="1.5"):
        ClassicalFlowInterpolator()(frame, frame, [0.5, 1.5])


# ---------------------------------------------------------------------------------------------------
# interpolate_frames


def blend_interpolator(frame0: torch.Tensor, frame1: torch.Tensor, times: list[float]) -> torch.Tensor:
    """Linear cross-fade: a transparent interpolator to check where interpolate_frames puts frames."""
    return torch.stack([(1 - t) * frame0 + t * frame1 for t in times])


def test_interpolate_frames_places_every_frame_in_order():
    torch.manual_seed(2)
    frames = torch.rand(6, 3, 8, 10)
    calls = []
    output = interpolate_frames(
        frames, 3, blend_interpolator, progress=lambda done, total: calls.append((done, total)), pairs_per_batch=2
    )
    assert output.shape == (16, 3, 8, 10)
    for index in range(6):
        assert torch.equal(output[3 * index], frames[index])
    for pair in range(5):
        for step in (1, 2):
            expected = (1 - step / 3) * frames[pair] + step / 3 * frames[pair + 1]
            torch.testing.assert_close(output[3 * pair + step], expected)
    assert calls == [(2, 5), (4, 5), (5, 5)]


@pytest.mark.parametrize("factor", [2, 4])
def test_interpolate_frames_with_the_classical_interpolator(factor):
    frames = torch.stack([translated_texture(32, 40, 1.5 * index, -0.5 * index) for index in range(4)])
    output = interpolate_frames(frames, factor, ClassicalFlowInterpolator(), pairs_per_batch=2)
    assert output.shape == (3 * factor + 1, 3, 32, 40)
    for index in range(4):
        assert torch.equal(output[factor * index], frames[index])
    # A new frame sits on the texture moved by its fraction of the motion, away from the borders.
    truth = translated_texture(32, 40, 1.5 / factor, -0.5 / factor)
    assert psnr(output[1][:, 6:-6, 6:-6], truth[:, 6:-6, 6:-6]) > 35.0


def test_interpolate_frames_factor_one_and_single_frame_return_the_input():
    frames = torch.rand(3, 3, 8, 8)
    assert torch.equal(interpolate_frames(frames, 1, blend_interpolator), frames)
    assert torch.equal(interpolate_frames(frames[:1], 4, blend_interpolator), frames[:1])


@pytest.mark.parametrize("factor", [0, 9, -2, 2.5, True, "3"])
def test_interpolate_frames_rejects_bad_factors(factor):
    with pytest.raises(ValueError, match=f"factor.*{factor!r}"):
        interpolate_frames(torch.rand(3, 3, 8, 8), factor, blend_interpolator)


def test_interpolate_frames_rejects_empty_and_integer_clips():
    with pytest.raises(ValueError, match=r"T >= 1.*\(0, 3, 8, 8\)"):
        interpolate_frames(torch.rand(0, 3, 8, 8), 2, blend_interpolator)
    with pytest.raises(ValueError, match="int64"):
        interpolate_frames(torch.zeros(3, 3, 8, 8, dtype=torch.int64), 2, blend_interpolator)


def test_interpolate_frames_takes_uint8_clips_batch_by_batch():
    """uint8 frames give what converting the whole clip to [-1, 1] and rounding the result gives,
    converted a batch of pairs at a time."""
    frames = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    whole = to_uint8(interpolate_frames(to_model_range(frames), 3, blend_interpolator))
    assert torch.equal(interpolate_frames(frames, 3, blend_interpolator, pairs_per_batch=2), whole)
