"""The procedural world: rendering against its own descriptions, captions, and reading clips back."""

import colorsys

import numpy as np
import pytest

from stages import world
from stages.world_checks import check_base_clip, high_frequency_energy, is_monotonic

FRAMES, SIZE = 17, 128


def test_rendered_clips_read_back_as_described():
    """Every colour with every direction: the measured colour and motion are the described ones."""
    rng = np.random.default_rng(0)
    for colour in world.COLOURS:
        for direction in world.DIRECTIONS:
            clip = world.clip_for(colour, str(rng.choice(list(world.SHAPES))), direction,
                                  str(rng.choice(list(world.SPEEDS))), rng, FRAMES)
            frames = world.render_clip(clip, FRAMES, SIZE)
            measurement = world.measure_clip(frames)
            assert measurement.colour == colour
            assert world.motion_direction(measurement.centroids)[0] == direction
            assert is_monotonic(frames, direction)


def test_centroid_of_a_circle_is_its_centre_at_any_size():
    """Closed form: a disc's centroid is its centre; positions are shares of the frame side."""
    rng = np.random.default_rng(1)
    clip = world.clip_for("blue", "circle", "down-right", "fast", rng, FRAMES)
    obj = clip.objects[0]
    for size in (64, 128, 256):
        centroids = world.measure_clip(world.render_clip(clip, FRAMES, size)).centroids
        expected = np.array([world.object_centre(obj, index) for index in range(FRAMES)]) * size
        np.testing.assert_allclose(centroids, expected, atol=0.2)  # pixels: the mask is thresholded


def test_objects_stay_inside_the_frame():
    rng = np.random.default_rng(2)
    for _ in range(300):
        for obj in world.random_clip(rng, FRAMES, two_object_share=1.0).objects:
            for frame in (0, FRAMES - 1):
                x, y = world.object_centre(obj, frame)
                assert obj.radius < x < 1 - obj.radius and obj.radius < y < 1 - obj.radius


def test_the_longest_clips_keep_their_object_inside_and_one_frame_more_is_named():
    """`frames_in_view` is the world's limit: at that many frames every size of object still stays
    wholly inside from the first frame to the last; one frame more is refused, naming the value
    (a fast object's 49-frame path is longer than the frame)."""
    rng = np.random.default_rng(4)
    for speed in world.SPEEDS:
        for direction in world.DIRECTIONS:
            frames = world.frames_in_view(speed, direction)
            for _ in range(50):
                [obj] = world.clip_for("red", "circle", direction, speed, rng, frames).objects
                for frame in (0, frames - 1):
                    x, y = world.object_centre(obj, frame)
                    assert obj.radius < x < 1 - obj.radius and obj.radius < y < 1 - obj.radius
            with pytest.raises(ValueError, match=f"num_frames={frames + 1} .* at most {frames} frames"):
                world.clip_for("red", "circle", direction, speed, rng, frames + 1)
            # and the limit is tight: the largest shape, started as far back as the edge allows, is
            # past the far edge at the frame one more would add (the world's own motion)
            radius = world.SIZE_RANGE[1]
            back = radius + world.EDGE_GAP
            (dx, dy) = world.DIRECTIONS[direction][0]
            start = tuple(back if d > 0 else 1 - back if d < 0 else 0.5 for d in (dx, dy))
            largest = world.WorldObject("red", "circle", direction, speed, start, radius, (1.0, 0.0, 0.0))
            x, y = world.object_centre(largest, frames)
            assert not (back <= x <= 1 - back and back <= y <= 1 - back)
    shortest = min(world.frames_in_view(speed, direction) for speed in world.SPEEDS for direction in world.DIRECTIONS)
    assert world.frames_in_view("fast", "right") == shortest < 49
    world.random_clip(rng, shortest)
    with pytest.raises(ValueError, match=f"num_frames={shortest + 1} is too long"):
        world.random_clip(rng, shortest + 1)


def test_hue_and_saturation_match_colorsys():
    pixels = np.random.default_rng(3).integers(0, 256, (500, 3), dtype=np.uint8)
    hue, saturation = world._hue_saturation(pixels)
    for pixel, h, s in zip(pixels, hue, saturation):
        expected_h, expected_s, _ = colorsys.rgb_to_hsv(*(pixel / 255.0))
        assert s == pytest.approx(expected_s, abs=1e-5)
        if expected_s > 1e-3:
            assert (h - 360 * expected_h + 180) % 360 - 180 == pytest.approx(0, abs=1e-3)


def test_backgrounds_are_not_read_as_objects():
    rng = np.random.default_rng(4)
    for _ in range(30):
        background = world._random_background(rng)
        frames = world.render_clip(world.WorldClip((), background), 2, SIZE)
        assert np.isnan(world.measure_clip(frames).centroids).all()


def test_captions_name_the_attributes_in_both_languages():
    rng = np.random.default_rng(5)
    for _ in range(200):
        clip = world.random_clip(rng, FRAMES, two_object_share=0.0)
        obj = clip.objects[0]
        for language, column in (("en", 0), ("zh", 1)):
            for split in world.PHRASINGS:
                text = world.caption(clip, rng, split, language)
                assert any(word in text for word in world.COLOURS[obj.colour][1 + column])
                assert any(word in text for word in world.SHAPES[obj.shape][column])
                assert any(word in text for word in world.DIRECTIONS[obj.direction][1 + column])


def test_captions_name_the_speed_for_the_share_asked():
    """The speed words come from the world's vocabulary (SPEEDS), read off the text, not the template."""
    rng = np.random.default_rng(12)
    for share, expected in ((1.0, 1.0), (0.0, 0.0), (0.5, 0.5)):
        named = []
        for _ in range(400):
            clip = world.random_clip(rng, FRAMES, two_object_share=0.0)
            language = str(rng.choice(world.LANGUAGES))
            text = world.caption(clip, rng, "train", language, speed_named_share=share)
            named.append(any(word in text for word in world.SPEEDS[clip.objects[0].speed][1:]))
        assert abs(np.mean(named) - expected) < 0.07, (share, np.mean(named))
    with pytest.raises(ValueError, match="speed_named_share"):
        world.caption(clip, rng, "train", speed_named_share=1.5)


@pytest.mark.parametrize("num_frames, expected", [(17, ["slow", "fast"]), (29, ["slow", "fast"]), (33, ["slow"]),
                                                 (49, ["slow"]), (59, ["slow"]), (60, [])])
def test_speeds_in_view_are_those_the_world_can_draw_in_every_direction(num_frames, expected):
    """A speed is listed exactly when clips of it stay in view in every direction: each listed speed
    draws clips whose rendered objects never touch the frame's edge, and an unlisted one is refused."""
    assert world.speeds_in_view(num_frames) == expected
    rng = np.random.default_rng(num_frames)
    for speed in world.SPEEDS:
        if speed not in expected:
            with pytest.raises(ValueError, match="too long for the world"):
                world.random_clip(rng, num_frames, speeds=[speed])
            continue
        for direction in world.DIRECTIONS:
            clip = world.clip_for("red", "circle", direction, speed, rng, num_frames)
            frames = world.render_clip(clip, num_frames, 64)
            border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
            assert not world.object_pixels(border).any(), (speed, direction)


def test_two_object_captions_describe_both():
    rng = np.random.default_rng(6)
    clip = world.random_clip(rng, FRAMES, two_object_share=1.0)
    assert len(clip.objects) == 2 and clip.objects[0].colour != clip.objects[1].colour
    text = world.caption(clip, rng, "train", "en")
    assert " and " in text
    for obj in clip.objects:
        assert any(word in text for word in world.COLOURS[obj.colour][1])


def test_held_out_phrasings_are_new_and_the_held_out_prompts_cover_the_world():
    for language in world.LANGUAGES:
        assert not set(world.PHRASINGS["train"][language]) & set(world.PHRASINGS["held_out"][language])
    cases = world.held_out_prompts()
    assert len(cases) >= 40
    assert sum(any("\u4e00" <= char <= "\u9fff" for char in case.prompt) for case in cases) == len(cases) // 2
    assert {case.colour for case in cases} == set(world.COLOURS)
    assert {case.direction for case in cases} == set(world.DIRECTIONS)
    # no held-out prompt is a sentence the training captions can produce
    rng = np.random.default_rng(8)
    training_captions = {world.caption(world.random_clip(rng, FRAMES, 0.0), rng, "train") for _ in range(20000)}
    assert not {case.prompt for case in cases} & training_captions


def test_batches_are_a_function_of_step_and_seed():
    first, clips = world.world_batch(3, 9, 4, 5, 32)
    again, _ = world.world_batch(3, 9, 4, 5, 32)
    other, _ = world.world_batch(4, 9, 4, 5, 32)
    assert first.shape == (4, 5, 32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert clips == world.world_clips(3, 9, 4, 5)


def test_check_of_a_clip_against_its_prompt():
    rng = np.random.default_rng(9)
    case = world.held_out_prompts()[0]
    frames = world.render_clip(world.clip_for(case.colour, case.shape, case.direction, case.speed, rng, FRAMES),
                               FRAMES, SIZE)
    assert check_base_clip(frames, case).passed
    wrong = case._replace(direction="left" if case.direction != "left" else "right")
    assert not check_base_clip(frames, wrong).passed
    still = np.repeat(frames[:1], FRAMES, axis=0)  # an object that does not move has no direction
    assert check_base_clip(still, case).direction == "none"


def test_high_frequency_energy_grows_with_detail():
    rng = np.random.default_rng(10)
    smooth = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    noisy = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert high_frequency_energy(smooth) == 0.0
    assert high_frequency_energy(noisy) > 1000.0


def test_made_up_words_leave_the_attribute_words_whole():
    rng = np.random.default_rng(11)
    for _ in range(300):
        clip = world.random_clip(rng, FRAMES, two_object_share=0.0)
        obj = clip.objects[0]
        for language, column in (("en", 0), ("zh", 1)):
            plain_rng, noisy_rng = np.random.default_rng(1), np.random.default_rng(1)
            plain = world.caption(clip, plain_rng, "train", language)
            noisy = world.caption(clip, noisy_rng, "train", language, made_up_share=1.0)
            assert world.SLOT not in noisy and len(noisy) > len(plain)
            assert any(word in noisy for word in world.COLOURS[obj.colour][1 + column])
            assert any(word in noisy for word in world.SHAPES[obj.shape][column])
            if language == "zh":  # Chinese direction phrases have no spaces: they stay whole
                assert any(word in noisy for word in world.DIRECTIONS[obj.direction][2])
