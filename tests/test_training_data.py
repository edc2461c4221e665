"""Training clips: photos, the held-out split, synthetic camera motion, overlays, video folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade.video import encode_mp4, read_video
from stages import training_data
from stages.training_data import (
    HELD_OUT_PHOTOS,
    TRAINING_PHOTOS,
    CameraMotion,
    Overlay,
    clip_batch,
    composite_overlay,
    load_photo,
    render_camera,
    synthetic_clip,
    video_clips,
)


def test_photos_load_as_rgb_uint8_and_the_split_is_disjoint():
    assert not set(HELD_OUT_PHOTOS) & set(TRAINING_PHOTOS)
    assert len(HELD_OUT_PHOTOS) >= 3 and len(TRAINING_PHOTOS) >= 8
    fingerprints = {}
    for name in HELD_OUT_PHOTOS + TRAINING_PHOTOS:
        photo = load_photo(name)
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3, (name, photo.shape)
        assert min(photo.shape[:2]) >= 256, name
        fingerprints[name] = (photo.shape, photo[::37, ::41].tobytes())
    # No picture sits in both splits under two names (skimage's `cat` is `chelsea`, for one).
    held_out = {fingerprints[name] for name in HELD_OUT_PHOTOS}
    assert not held_out & {fingerprints[name] for name in TRAINING_PHOTOS}
    camera = load_photo("camera")  # a grey photo: three equal channels
    assert np.array_equal(camera[..., 0], camera[..., 2])
    with pytest.raises(ValueError, match="'lena'.*astronaut"):
        load_photo("lena")


def test_clip_batch_shape_and_determinism_in_step_and_seed():
    batch = clip_batch(step=3, seed=1, batch_size=2, num_frames=3, size=32)
    assert batch.shape == (2, 3, 32, 32, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch, clip_batch(step=3, seed=1, batch_size=2, num_frames=3, size=32))
    assert not np.array_equal(batch, clip_batch(step=4, seed=1, batch_size=2, num_frames=3, size=32))
    assert not np.array_equal(batch, clip_batch(step=3, seed=2, batch_size=2, num_frames=3, size=32))
    assert batch.std() > 5  # pictures, not a flat fill


@pytest.mark.parametrize("split, photos", [("train", TRAINING_PHOTOS), ("held_out", HELD_OUT_PHOTOS)])
def test_clip_batch_draws_photos_and_overlays_from_its_split_only(monkeypatch, split, photos):
    used = []

    def recording_load_photo(name):
        used.append(name)
        return load_photo(name)

    monkeypatch.setattr(training_data, "load_photo", recording_load_photo)
    for step in range(3):
        clip_batch(step, seed=0, batch_size=4, num_frames=2, size=16, split=split)
    assert used and set(used) <= set(photos)
    with pytest.raises(ValueError, match="'test'.*held_out"):
        clip_batch(0, 0, 1, 2, 16, split="test")


def test_the_middle_frame_of_a_pure_pan_is_the_photo_at_the_halfway_offset():
    photo = load_photo("astronaut")
    velocity = (2.5, -1.5)  # per frame: the end frames sit at half-pixel offsets
    frames = render_camera(photo, CameraMotion(centre=(200.5, 150.5), velocity=velocity), num_frames=3, size=40)
    assert frames.shape == (3, 3, 40, 40)
    # Frame centre (19.5, 19.5) sits on (200.5, 150.5): pixel (0, 0) of the middle frame is (181, 131).
    crop = photo[131:171, 181:221].transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_allclose(frames[1].numpy(), crop, atol=0.01)  # float32 grid rounding only
    # The end frames sit half a pixel off the grid, on either side: not copies of the crop.
    assert np.abs(frames[0].numpy() - crop).mean() > 3 and np.abs(frames[2].numpy() - crop).mean() > 3

    whole_pixels = render_camera(photo, CameraMotion(centre=(200.5, 150.5), velocity=(3.0, -2.0)), 3, 40)
    np.testing.assert_allclose(whole_pixels[0].numpy(), photo[133:173, 178:218].transpose(2, 0, 1), atol=0.01)
    np.testing.assert_allclose(whole_pixels[2].numpy(), photo[129:169, 184:224].transpose(2, 0, 1), atol=0.01)


def test_a_flat_rectangle_overlay_covers_its_box_and_moves_at_its_velocity():
    colour = np.array([200, 40, 90], dtype=np.uint8)
    overlay = Overlay(
        texture=np.broadcast_to(colour, (12, 16, 3)).copy(),
        elliptical=False,
        centre=(10.0, 20.0),
        velocity=(4.0, 1.0),
        half_size=(5.0, 3.0),  # edges at ±5 and ±3 px from the centre: half-covered pixels there
    )
    frames = composite_overlay(torch.zeros(3, 3, 32, 32), overlay)
    for index, offset in enumerate((-1, 0, 1)):
        centre_x, centre_y = 10 + 4 * offset, 20 + offset
        expected = np.zeros((32, 32), dtype=np.float32)
        expected[centre_y - 3 : centre_y + 4, centre_x - 5 : centre_x + 6] = 0.5  # the edge pixels
        expected[centre_y - 2 : centre_y + 3, centre_x - 4 : centre_x + 5] = 1.0
        expected[centre_y - 3 : centre_y + 4, [centre_x - 5, centre_x + 5]] = 0.5
        expected[[centre_y - 3, centre_y + 3], centre_x - 5 : centre_x + 6] = 0.5
        coverage = frames[index, 0].numpy() / 200
        np.testing.assert_allclose(coverage, expected, atol=1e-4)


def test_synthetic_clips_stand_still_without_motion_and_move_with_it():
    photo = load_photo("chelsea")
    still = synthetic_clip(photo, 5, 48, np.random.default_rng(0), max_motion=0.0)
    assert still.shape == (5, 48, 48, 3) and still.dtype == np.uint8
    assert all(np.array_equal(frame, still[0]) for frame in still)
    moving = synthetic_clip(photo, 5, 48, np.random.default_rng(0), max_motion=8.0)
    assert np.abs(moving[0].astype(int) - moving[-1]).mean() > 2
    again = synthetic_clip(photo, 5, 48, np.random.default_rng(0), max_motion=8.0)
    assert np.array_equal(moving, again)
    with pytest.raises(ValueError, match="max_motion.*-1"):
        synthetic_clip(photo, 5, 48, np.random.default_rng(0), max_motion=-1.0)


@pytest.fixture
def video_folder(tmp_path):
    """One 12-frame 40 × 56 MP4 of a diagonal gradient moving right, and one too small to use."""
    ys, xs = np.mgrid[0:40, 0:56]
    frames = np.stack(
        [np.stack([(3 * (xs - 2 * t) + 2 * ys) % 256, 4 * ys, (255 - 3 * xs) % 256], -1) for t in range(12)]
    ).astype(np.uint8)
    (tmp_path / "moving.mp4").write_bytes(encode_mp4(frames, fps=12))
    (tmp_path / "tiny.mp4").write_bytes(encode_mp4(frames[:, :16, :16], fps=12))
    (tmp_path / "notes.txt").write_text("not a video")
    return tmp_path


def test_video_clips_are_crops_of_consecutive_decoded_frames(video_folder):
    decoded, _ = read_video(str(video_folder / "moving.mp4"))
    clips = video_clips(video_folder, num_frames=4, size=24, rng=np.random.default_rng(0))
    for _ in range(3):
        clip = next(clips)
        assert clip.shape == (4, 24, 24, 3) and clip.dtype == np.uint8
        matches = [
            (start, top, left)
            for start in range(len(decoded) - 3)
            for top in range(40 - 23)
            for left in range(56 - 23)
            if np.array_equal(decoded[start : start + 4, top : top + 24, left : left + 24], clip)
        ]
        assert matches, "the clip is not a crop of four consecutive frames"

    batch = clip_batch(5, seed=0, batch_size=3, num_frames=4, size=24, videos=video_folder)
    assert batch.shape == (3, 4, 24, 24, 3)
    assert np.array_equal(batch, clip_batch(5, seed=0, batch_size=3, num_frames=4, size=24, videos=video_folder))


def test_video_folders_that_cannot_serve_are_named(video_folder, tmp_path_factory):
    with pytest.raises(ValueError, match="no video.*13 frames of at least 24"):
        clip_batch(0, 0, 1, num_frames=13, size=24, videos=video_folder)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match="no videos.*empty"):
        next(video_clips(empty, 2, 8, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="not found.*missing"):
        clip_batch(0, 0, 1, 2, 8, videos=empty / "missing")
    with pytest.raises(ValueError, match="training data only.*held_out"):
        clip_batch(0, 0, 1, 2, 8, videos=video_folder, split="held_out")
