"""The embedded tiny cascade obeys its prompt: its shipped weights, on held-out prompts of the
procedural world (stages/world.py), read back by stages/world_checks.py.

The references are independent of the models: the colour is read from the pixels' hue, the motion
from the dominant object's centroid, the detail from a Laplacian compared with bicubic upsampling.
The prompts are in phrasings no model saw in training, half of them Chinese, each with its own
seed. bench/eval_world.py runs the same checks and records the rates in docs/eval_world.md.
"""

from __future__ import annotations

import pytest
import torch

from cascade.config import load_config
from stages.base.stage import BaseStage
from stages.ssr.stage import SsrStage
from stages.tsr.stage import TsrStage
from stages.world import held_out_prompts
from stages.world_checks import (
    base_frames, check_base_clip, check_long_clip, detail_over_bicubic, interpolated_frames, is_monotonic,
    request_in_config,
)

PROMPTS = 48
SEED = 1234  # + the prompt's index; the seeds bench/eval_world.py uses
REQUIRED_PASS_RATE = 0.9
MONOTONIC_CLIPS = 8
DETAIL_CLIPS = 4
LONG_CLIPS = 6
LONG_VIDEO = ["video.num_frames=49", "stages.base.window.latent_frames=5", "stages.base.window.overlap=2"]
# the DiT trained on overview windows too (docs/long_video.md, "The overview window"), with the overview on
# and TeaCache off, the setting of that page's headline row
OVERVIEW_VIDEO = [*LONG_VIDEO, "stages.base.window.overview=true",
                  "stages.base.dit_weights=weights/base/dit_overview.safetensors", "stages.base.teacache.threshold=0"]
OVERVIEW_CLIPS = 8  # the first slow held-out prompts: a fast object cannot stay in view for 49 frames
# docs/long_video.md measures 19 of the 21 slow prompts (90%) in this setting, 7 of these 8 (the same
# with the tiny config's TeaCache); the shipped DiT's windows hold 0-19%, the world's own clips 100%
OVERVIEW_REQUIRED_RATE = 0.75


@pytest.fixture(scope="module", autouse=True)
def both_cores():
    """These tests run no Ray work beside them, so the sampling may use both cores (about 1.25x faster
    than conftest's one thread; docs/eval_world.md and docs/long_video.md measure with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The default config's three stages, as `python run_cascade.py` loads them."""
    config = load_config(None, [])
    if not config.stages.base.dit_weights:
        pytest.skip("configs/tiny.yaml has no trained DiT yet (stages.base.dit_weights is empty): "
                    "its clips are noise, so there is no prompt to obey; see docs/eval_world.md")
    stages = BaseStage(config.stages.base), TsrStage(config.stages.tsr), SsrStage(config.stages.ssr)
    assert not any(stage.warnings for stage in stages), [stage.warnings for stage in stages]
    return config, stages


@pytest.fixture(scope="module")
def generated(tiny):
    """(case, request, base latents, decoded base frames, check) of every held-out prompt."""
    config, (base, tsr, _) = tiny
    results = []
    for index, case in enumerate(held_out_prompts(PROMPTS)):
        request = request_in_config(case, SEED + index, config)
        latents, frames = base_frames(base, tsr, request)
        results.append((case, request, latents, frames, check_base_clip(frames, case)))
    return results


def test_held_out_prompts_are_many_and_partly_chinese(generated):
    prompts = [case.prompt for case, *_ in generated]
    assert len(set(prompts)) >= 40
    assert sum(any("\u4e00" <= char <= "\u9fff" for char in prompt) for prompt in prompts) >= len(prompts) // 3


def test_base_clips_have_the_prompted_colour_and_direction(generated):
    checks = [check for *_, check in generated]
    passed = sum(check.passed for check in checks)
    failures = [f"{check.case.prompt!r}: wanted {check.case.colour} {check.case.direction}, "
                f"got {check.colour} {check.direction} ({check.motion:.0f} px)" for check in checks if not check.passed]
    assert passed >= REQUIRED_PASS_RATE * len(checks), f"{passed}/{len(checks)} obeyed; failures:\n" + "\n".join(failures)


def test_interpolated_clips_keep_the_motion_monotonic(tiny, generated):
    """Interpolation keeps the motion it is given: where a base clip obeys and its object advances
    at every frame, the tsr output's object does too (a base clip that steps back is the base
    stage's fault, counted in bench/eval_world.py)."""
    _, (_, tsr, _) = tiny
    monotonic = [(case, request, latents) for case, request, latents, frames, check in generated
                 if check.passed and is_monotonic(frames, case.direction)]
    assert len(monotonic) >= MONOTONIC_CLIPS
    for case, request, latents in monotonic[:MONOTONIC_CLIPS]:
        frames = interpolated_frames(tsr, latents, request)
        assert frames.shape[0] > latents.request.num_frames  # more frames than the base clip
        assert is_monotonic(frames, case.direction), case.prompt


def test_super_resolved_clips_have_more_detail_than_bicubic(tiny, generated):
    _, (_, _, ssr) = tiny
    for case, request, _, frames, _ in generated[:DETAIL_CLIPS]:
        assert detail_over_bicubic(ssr, frames, request) > 1.0, case.prompt


def test_long_clips_by_windows_keep_the_colour_with_smooth_joints(tiny):
    """49 frames (13 latent frames) from windows of 5 latent frames (the DiT's 17 training frames)
    overlapping by 2: every 17-frame segment shows the prompt's colour, and no frame-to-frame change
    at a window joint exceeds the largest change elsewhere in the clip. Whether each segment also
    keeps the prompt's direction is measured in docs/long_video.md: with this DiT it does not (the
overview window's test below does that, with the DiT trained for it)."""
    _, (_, tsr, _) = tiny
    config = load_config(None, LONG_VIDEO)
    base = BaseStage(config.stages.base)
    for index, case in enumerate(held_out_prompts(LONG_CLIPS)):
        latents, frames = base_frames(base, tsr, request_in_config(case, SEED + index, config))
        assert frames.shape[0] == 49 and latents.notes["windows"] == [[0, 5], [3, 8], [5, 10], [8, 13]]
        check = check_long_clip(frames, case, latents.notes["windows"])
        assert check.colour_holds, (case.prompt, [segment.colour for segment in check.segments])
        assert check.joints_smooth, (case.prompt, check.joint_change, check.inside_change)


def test_long_clips_with_the_overview_window_keep_the_direction_of_slow_prompts(tiny):
    """49 frames from windows of 5 and the overview window (latent frames 0, 3, 6, 9, 12 at their
    places in the clip), sampled by the DiT trained on overview windows without TeaCache: every
    clip keeps the prompt's colour with smooth joints, and the object keeps the prompt's direction
    in all three 17-frame segments in at least OVERVIEW_REQUIRED_RATE of the first slow prompts."""
    _, (_, tsr, _) = tiny
    config = load_config(None, OVERVIEW_VIDEO)
    base = BaseStage(config.stages.base)
    slow = [(index, case) for index, case in enumerate(held_out_prompts(PROMPTS)) if case.speed == "slow"]
    holds, failures = 0, []
    for index, case in slow[:OVERVIEW_CLIPS]:
        latents, frames = base_frames(base, tsr, request_in_config(case, SEED + index, config))
        assert latents.notes["overview"] == [0, 3, 6, 9, 12]
        check = check_long_clip(frames, case, latents.notes["windows"])
        assert check.colour_holds and check.joints_smooth, (case.prompt, [segment.colour for segment in check.segments])
        holds += check.direction_holds
        if not check.direction_holds:
            failures.append(f"{case.prompt!r}: wanted {case.direction}, got {[segment.direction for segment in check.segments]}")
    assert holds >= OVERVIEW_REQUIRED_RATE * OVERVIEW_CLIPS, f"{holds}/{OVERVIEW_CLIPS} held; failures:\n" + "\n".join(failures)
