"""Video encoding round trips and previews, against the frames that went in."""

import numpy as np
import pytest

from cascade.errors import UserError
from cascade.payload import Clip, Request
from cascade.previews import latent_to_rgb, make_preview
from cascade.video import encode_gif, encode_mp4, read_video


def smooth_clip(frames=12, height=64, width=96) -> np.ndarray:
    """A gradient with a bright square moving right: (T, H, W, 3) uint8."""
    y, x = np.mgrid[0:height, 0:width]
    video = np.zeros((frames, height, width, 3), np.uint8)
    for t in range(frames):
        video[t, ..., 0] = (x * 255 / width).astype(np.uint8)
        video[t, ..., 1] = (y * 255 / height).astype(np.uint8)
        video[t, 20:36, 10 + 4 * t : 26 + 4 * t, :] = 240
    return video


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / error)


def test_mp4_round_trip_keeps_frames_fps_and_content():
    video = smooth_clip()
    decoded, fps = read_video(encode_mp4(video, 48.0, quality=18))
    assert decoded.shape == video.shape and fps == pytest.approx(48.0)
    assert psnr(decoded, video) > 35


def test_mp4_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        encode_mp4(smooth_clip(height=63), 16.0)


def test_read_video_names_a_missing_or_bad_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_video(str(tmp_path / "absent.mp4"))
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"this is not a video")
    with pytest.raises(UserError, match="cannot read"):
        read_video(str(bogus))


def test_gif_preview_has_every_frame():
    from PIL import Image
    import io

    gif = encode_gif(smooth_clip(frames=5), 16.0, max_side=48)
    image = Image.open(io.BytesIO(gif))
    assert image.n_frames == 5 and max(image.size) == 48


def test_latent_preview_separates_what_differs():
    """Two latent regions with different channel vectors get different colours; 8x enlarged."""
    latents = np.zeros((16, 2, 4, 4), np.float32)
    latents[:, :, :, :2] = np.random.default_rng(0).normal(size=(16, 1, 1, 1))
    rgb = latent_to_rgb(latents)
    assert rgb.shape == (2, 32, 32, 3)
    assert np.abs(rgb[:, :, :16].astype(int).mean((0, 1, 2)) - rgb[:, :, 16:].astype(int).mean((0, 1, 2))).max() > 100
    request = Request("p", "", 0, 32, 32, 5, 16.0)
    preview = make_preview(Clip(latents[None], "latent", 16.0, request), 64, 2)
    assert preview.gif.startswith(b"GIF8") and preview.contact_sheet_png.startswith(b"\x89PNG")
