"""Long clips by windows (flows/windows.py, `stages.base.window`): the spans cover the clip with the
fewest windows that keep the overlap, the blend weights are a partition of unity that ramps across
each overlap, a model that does not look past a frame samples the same clip with or without
windows (with the overview window too), the overview window's velocity is the clip's at its frames
and the stage runs it at their places in the clip, the base stage's windowed denoising equals a
reference loop written out here (each window a DiT call of W latent frames, velocities averaged on
shared frames), the long-clip check reads the changes at the joints and how far the object falls
back, and bad settings are named. The tiny world's 49-frame check is in tests/test_world_cascade.py."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from cascade.config import load_config
from cascade.errors import ConfigError
from flows import flow_sigmas, sample_euler
from flows.windows import WindowConfig, blend_weights, overview_frames, window_spans, windowed_velocity
from stages.base.stage import BaseStage
from stages.base.teacache import TeaCacheConfig
from stages.world import DIRECTIONS, PromptCase, clip_for, held_out_prompts, object_centre, render_clip
from stages.world_checks import check_long_clip
from tests.test_parallel import SMALL_DIT, random_dit

WINDOWS_49 = [[0, 5], [3, 8], [5, 10], [8, 13]]  # 13 latent frames in windows of 5 overlapping by 2


@pytest.mark.parametrize("length, window, overlap", [
    (13, 5, 2), (13, 5, 1), (13, 5, 4), (13, 5, 0), (5, 5, 2), (3, 5, 2), (21, 5, 2), (14, 4, 3), (100, 7, 3),
])
def test_spans_cover_the_clip_with_the_fewest_windows_that_overlap_enough(length, window, overlap):
    spans = window_spans(length, window, overlap)
    if length <= window:
        assert spans == [(0, length)]
        return
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(stop - start == window for start, stop in spans)
    assert all(previous[1] - following[0] >= overlap for previous, following in zip(spans, spans[1:]))
    # one window fewer cannot cover the clip with that overlap: (count − 1) windows reach at most
    # window + (count − 2)·(window − overlap) frames
    count = len(spans)
    assert window + (count - 2) * (window - overlap) < length
    assert count == 1 + math.ceil((length - window) / (window - overlap))


def test_spans_of_the_issue_example():
    assert window_spans(13, 5, 1) == [(0, 5), (4, 9), (8, 13)]
    assert window_spans(13, 5, 2) == [(0, 5), (3, 8), (5, 10), (8, 13)]


def test_blend_weights_ramp_across_each_overlap_and_sum_to_one():
    spans = [(0, 5), (3, 8), (5, 10), (8, 13)]
    weights = blend_weights(spans, 13)
    torch.testing.assert_close(weights.sum(0), torch.ones(13, dtype=torch.float64), rtol=0, atol=1e-15)
    for index, (start, stop) in enumerate(spans):
        assert (weights[index, :start] == 0).all() and (weights[index, stop:] == 0).all()
    # frames 3, 4 are shared by windows 0 and 1 (two frames): ramps 2/3, 1/3 and 1/3, 2/3
    torch.testing.assert_close(weights[:2, 3:5], torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]], dtype=torch.float64))
    assert weights[0, :3].eq(1).all() and weights[3, 10:].eq(1).all()


def test_overview_frames_spread_from_the_first_frame_to_the_last():
    assert overview_frames(13, 5) == [0, 3, 6, 9, 12]  # 49 frames: every 12th frame, at 0, 12, … 48
    assert overview_frames(9, 5) == [0, 2, 4, 6, 8]
    assert overview_frames(14, 4) == [0, 4, 9, 13]  # 13/3 apart, rounded
    assert overview_frames(6, 5) == [0, 1, 2, 4, 5]
    with pytest.raises(ValueError, match="longer than it; got length=5, window=5"):
        overview_frames(5, 5)


@pytest.mark.parametrize("overview", [[], [0, 3, 6, 9, 12]])
def test_a_frame_local_model_samples_the_same_clip_with_or_without_windows(overview):
    """A velocity that at each frame depends on that frame alone is the same from every window, the
    overview window's included, so the blend returns it unchanged and the sampled clip is the one
    sampled without windows."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 13, 3, 3, generator=generator)
    target = torch.randn(1, 4, 13, 3, 3, generator=generator)

    def velocity(x, sigma):  # flow velocity towards `target`: v = (x − target)/σ
        return (x - target) / sigma

    def window_velocity(index, x, sigma):
        frames = overview if index == len(spans) else list(range(*spans[index]))
        return (x - target[:, :, frames]) / sigma

    spans = window_spans(13, 5, 2)
    sigmas = flow_sigmas(10, 3.0)
    whole = sample_euler(velocity, noise, sigmas)
    windowed = sample_euler(windowed_velocity(window_velocity, spans, overview), noise, sigmas)
    torch.testing.assert_close(windowed, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, target, rtol=1e-5, atol=1e-5)  # Euler on this flow lands on the target


def test_the_overview_window_sets_the_velocity_at_its_frames():
    """Window i answers i + 1 everywhere: the overview (window 4 of 13 latent frames in windows of 5
    overlapping by 2) gives its frames 0, 3, 6, 9, 12 a velocity of 5; the other frames keep the blend
    of the windows that hold them (frame 4, shared by windows 0 and 1 with weights 1/3 and 2/3: 5/3)."""
    spans = window_spans(13, 5, 2)
    velocity = windowed_velocity(lambda index, x, sigma: torch.full_like(x, index + 1.0), spans, overview_frames(13, 5))
    per_frame = velocity(torch.zeros(1, 1, 13, 1, 1), torch.tensor(0.5)).flatten()
    blend = blend_weights(spans, 13).T.float() @ torch.arange(1.0, 5.0)  # (13,) without the overview
    expected = blend.clone()
    expected[[0, 3, 6, 9, 12]] = 5.0
    torch.testing.assert_close(per_frame, expected)
    assert per_frame[4].item() == pytest.approx(5 / 3)


def test_the_blend_follows_the_device_and_dtype_of_the_clip():
    """The weights are made on the CPU; the clip may live on a GPU. The meta device stands in for one
    here: a CPU weight meeting a clip elsewhere would raise."""
    velocity = windowed_velocity(lambda index, x, sigma: 2 * x, window_spans(5, 3, 1))
    on_meta = velocity(torch.zeros(1, 2, 5, 2, 2, device="meta", dtype=torch.float16), torch.tensor(0.5))
    assert (on_meta.device.type, on_meta.dtype, on_meta.shape) == ("meta", torch.float16, (1, 2, 5, 2, 2))


def windowed_stage(steps: int = 4, **window) -> BaseStage:
    config = load_config(None, [f"stages.base.steps={steps}", "stages.base.sampler=euler", "stages.base.shift=3",
                                "stages.base.guidance_scale=4"]).stages.base
    config = dataclasses.replace(config, dit=SMALL_DIT, dit_weights="", teacache=TeaCacheConfig(),
                                 window=WindowConfig(**window))
    stage = BaseStage(config)
    stage.dit = random_dit()
    return stage


def test_the_stage_denoises_windows_as_the_reference_loop():
    """Latent frames 7 in windows of 3 with overlap 1: windows [0, 3), [2, 5), [4, 7). Each step, each
    window's guided velocity comes from a DiT call on its 3 frames alone (positions 0, 1, 2, as in
    training), and frames 2 and 4, shared by two windows, take the mean of the two; then one Euler step."""
    stage = windowed_stage(latent_frames=3, overlap=1)
    generator = torch.Generator().manual_seed(3)
    condition, uncondition = torch.randn(2, 1, SMALL_DIT.text_len, SMALL_DIT.text_dim, generator=generator)
    noise = torch.randn(1, 16, 7, 4, 4, generator=generator)
    seen_frames = []
    hook = stage.dit.register_forward_pre_hook(lambda module, inputs: seen_frames.append(inputs[0].shape[2]))
    notes = {}
    latents = stage.denoise(noise, condition, uncondition, notes)
    hook.remove()
    assert seen_frames == [3] * 4 * 3  # every DiT call holds one window: 4 steps × 3 windows
    assert notes["windows"] == [[0, 3], [2, 5], [4, 7]] and notes["model_calls"] == 12

    sigmas = flow_sigmas(4, 3.0)
    x = noise.clone()
    with torch.no_grad():
        for step in range(4):
            sigma = sigmas[step].item()
            timestep = torch.full((2,), 1000 * sigma)
            velocities = []
            for start in (0, 2, 4):
                both = stage.dit(torch.cat([x[:, :, start:start + 3]] * 2), timestep,
                                 torch.cat([condition, uncondition]))
                velocity_condition, velocity_uncondition = both.chunk(2)
                velocities.append(velocity_uncondition + 4 * (velocity_condition - velocity_uncondition))
            first, second, third = velocities
            velocity = torch.cat([first[:, :, :2], (first[:, :, 2:] + second[:, :, :1]) / 2, second[:, :, 1:2],
                                  (second[:, :, 2:] + third[:, :, :1]) / 2, third[:, :, 1:]], dim=2)
            x = x + (sigmas[step + 1].item() - sigma) * velocity
    torch.testing.assert_close(latents, x, rtol=1e-5, atol=1e-5)


def test_the_stage_runs_the_overview_window_at_the_places_of_its_frames():
    """Latent frames 7 in windows of 3 with overlap 1, and the overview: frames 0, 3 and 6 in one
    DiT call at rotary positions 0, 3 and 6, whose guided velocity replaces the blend there."""
    stage = windowed_stage(latent_frames=3, overlap=1, overview=True)
    plain = windowed_stage(latent_frames=3, overlap=1)
    generator = torch.Generator().manual_seed(3)
    condition, uncondition = torch.randn(2, 1, SMALL_DIT.text_len, SMALL_DIT.text_dim, generator=generator)
    noise = torch.randn(1, 16, 7, 4, 4, generator=generator)
    notes = {}
    latents = stage.denoise(noise, condition, uncondition, notes)
    assert notes["overview"] == [0, 3, 6] and notes["model_calls"] == 4 * 4  # 4 steps × (3 windows + overview)

    blended = windowed_velocity(lambda index, x, sigma: guided(x, sigma, None), window_spans(7, 3, 1))
    sigmas = flow_sigmas(4, 3.0)

    def guided(x, sigma, frame_positions):
        timestep = torch.full((2,), 1000 * float(sigma))
        both = plain.dit(torch.cat([x] * 2), timestep, torch.cat([condition, uncondition]), frame_positions=frame_positions)
        velocity_condition, velocity_uncondition = both.chunk(2)
        return velocity_uncondition + 4 * (velocity_condition - velocity_uncondition)

    x = noise.clone()
    with torch.no_grad():
        for step in range(4):
            velocity = blended(x, sigmas[step])
            velocity[:, :, [0, 3, 6]] = guided(x[:, :, [0, 3, 6]], sigmas[step], [0, 3, 6])
            x = x + (sigmas[step + 1].item() - sigmas[step].item()) * velocity
    torch.testing.assert_close(latents, x, rtol=1e-5, atol=1e-5)


def test_a_clip_no_longer_than_a_window_is_denoised_as_without_windows():
    generator = torch.Generator().manual_seed(4)
    condition, uncondition = torch.randn(2, 1, SMALL_DIT.text_len, SMALL_DIT.text_dim, generator=generator)
    noise = torch.randn(1, 16, 3, 4, 4, generator=generator)
    windowed, plain = windowed_stage(latent_frames=5, overlap=2), windowed_stage()
    notes = {}
    assert torch.equal(windowed.denoise(noise, condition, uncondition, notes), plain.denoise(noise, condition, uncondition, {}))
    assert notes["windows"] == [[0, 3]]


def test_teacache_decides_per_window():
    """Each window has its own cache: every window runs its blocks on the same steps (their time
    modulations are the same), so the passes are the windows times one window's passes."""
    stage = windowed_stage(steps=8, latent_frames=3, overlap=1)
    stage.config = dataclasses.replace(stage.config, teacache=TeaCacheConfig(0.3, [1.0, 0.0], warmup_steps=1))
    generator = torch.Generator().manual_seed(5)
    condition, uncondition = torch.randn(2, 1, SMALL_DIT.text_len, SMALL_DIT.text_dim, generator=generator)
    notes, single = {}, {}
    stage.denoise(torch.randn(1, 16, 7, 4, 4, generator=generator), condition, uncondition, notes)
    stage.denoise(torch.randn(1, 16, 3, 4, 4, generator=generator), condition, uncondition, single)
    assert len(notes["windows"]) == 3 and single["model_calls"] < 8
    assert notes["model_calls"] == 3 * single["model_calls"]


def test_the_long_clip_check_reads_the_changes_at_the_joints():
    """49 frames in windows [0, 5), [3, 8), [5, 10), [8, 13): the joints are the latent boundaries 3,
    5, 8 and 10, so the frame changes 8→9, 16→17, 28→29 and 36→37. A grey ramp changes by 1 level
    per frame; a jump of 10 more lands at a joint or inside a window."""
    case = held_out_prompts(1)[0]
    ramp = np.broadcast_to(np.arange(49, dtype=np.uint8)[:, None, None, None], (49, 8, 8, 3)).copy()
    at_joint, inside = ramp.copy(), ramp.copy()
    at_joint[17:] += 10  # the change 16 → 17
    inside[21:] += 10  # the change 20 → 21
    check = check_long_clip(at_joint, case, WINDOWS_49)
    assert (check.joint_change, check.inside_change, check.joints_smooth) == (11.0, 1.0, False)
    assert len(check.segments) == 3  # frames 0–16, 16–32, 32–48
    check = check_long_clip(inside, case, WINDOWS_49)
    assert (check.joint_change, check.inside_change, check.joints_smooth) == (1.0, 11.0, True)


def test_the_long_clip_check_measures_how_far_the_object_falls_back():
    """The world's own 49-frame clip of a slow object moving up and to the left never falls back.
    Spliced so that frames 25-48 replay frames 9-32 (its path started again 16 frames back), it
    falls back by what the world's geometry says the object moves from frame 9 to frame 24."""
    case = PromptCase("a red circle drifting up and to the left", "red", "circle", "up-left", "slow")
    clip = clip_for(case.colour, case.shape, case.direction, case.speed, np.random.default_rng(3), 49)
    frames = render_clip(clip, 49, 128)
    check = check_long_clip(frames, case, WINDOWS_49)
    assert check.fall_back < 0.5 / 128 and check.keeps_going  # under half a pixel: rasterisation alone
    restarted = np.concatenate([frames[:25], frames[9:33]])
    obj = clip.objects[0]
    moved = np.subtract(object_centre(obj, 24), object_centre(obj, 9)) @ np.asarray(DIRECTIONS[case.direction][0])
    check = check_long_clip(restarted, case, WINDOWS_49)
    assert check.fall_back == pytest.approx(moved, abs=0.5 / 128) and moved > 0.1
    assert not check.keeps_going


@pytest.mark.parametrize("override, message", [
    (["stages.base.window.latent_frames=5", "stages.base.window.overlap=5"],
     r"stages.base.window.overlap=5 is not valid for latent_frames=5: from 0 to 4"),
    (["stages.base.window.latent_frames=-1"], r"stages.base.window.latent_frames=-1 is not valid: an integer ≥ 0"),
    (["stages.base.window.overlap=2"], r"stages.base.window.overlap=2 needs stages.base.window.latent_frames > 0"),
    (["stages.base.window.overview=true"], r"stages.base.window.overview=true needs stages.base.window.latent_frames ≥ 2, got 0"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)
