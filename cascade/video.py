"""Encoding and decoding video in memory: MP4 through PyAV (which carries its own FFmpeg), GIF and
PNG through Pillow. Frames are uint8 arrays `(T, H, W, 3)` in RGB."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from cascade.errors import UserError


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")


def encode_mp4(frames: np.ndarray, fps: float, quality: int = 18) -> bytes:
    """H.264 MP4 (yuv420p, so height and width must be even) of `frames` at `fps`."""
    _check_frames(frames)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {width}x{height}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(quality), "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def read_video(source: str | bytes) -> tuple[np.ndarray, float]:
    """Decodes a video file (path) or its bytes into uint8 frames `(T, H, W, 3)` and its frame
    rate. Raises `UserError` naming the file when it is missing or not a video."""
    name = "video bytes" if isinstance(source, bytes) else str(source)
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
            if not container.streams.video:
                raise UserError(f"{name} has no video stream")
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
    except FileNotFoundError:
        raise UserError(f"video file not found: {name}") from None
    except av.FFmpegError as error:
        raise UserError(f"cannot read {name} as a video: {error}") from None
    if not frames:
        raise UserError(f"{name} holds no video frames")
    return np.stack(frames), fps


def _downscale(frames: np.ndarray, max_side: int) -> list[Image.Image]:
    height, width = frames.shape[1:3]
    ratio = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    return [Image.fromarray(frame).resize(size, Image.BILINEAR) for frame in frames]


def encode_gif(frames: np.ndarray, fps: float, max_side: int = 256) -> bytes:
    """A looping animated GIF, downscaled so its longer side is at most `max_side`."""
    _check_frames(frames)
    # Fast octree palettes: Pillow's default median cut takes ~0.15 s a frame at 256².
    images = [image.quantize(256, method=Image.Quantize.FASTOCTREE) for image in _downscale(frames, max_side)]
    buffer = io.BytesIO()
    duration_ms = max(20, round(1000 / fps))  # browsers clamp shorter GIF delays
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buffer.getvalue()


def contact_sheet(frames: np.ndarray, count: int = 4, max_side: int = 256) -> bytes:
    """A PNG of `count` evenly spaced frames side by side."""
    _check_frames(frames)
    picks = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    images = _downscale(frames[picks], max_side)
    width, height = images[0].size
    sheet = Image.new("RGB", (width * len(images), height))
    for position, image in enumerate(images):
        sheet.paste(image, (position * width, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
