"""What each stage shows the user as soon as it finishes: an animated GIF and a PNG contact sheet.

Pixel clips are shown as they are. Latent clips (the base stage's output) are shown without the
VAE, which lives on the tsr actor: the 16 latent channels are projected onto their three principal
components (taken over the whole clip, so colours are stable across frames) and enlarged 8× with
nearest-neighbour sampling, so structure and motion are visible long before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from cascade.payload import Clip
from cascade.video import contact_sheet, encode_gif

LATENT_PIXELS = 8  # one latent pixel covers 8×8 frame pixels in Wan's VAE


@dataclass(frozen=True)
class Preview:
    gif: bytes
    contact_sheet_png: bytes


def latent_to_rgb(latents: np.ndarray) -> np.ndarray:
    """(C, T, h, w) float latents -> (T, 8h, 8w, 3) uint8 false-colour frames."""
    channels = latents.shape[0]
    samples = latents.reshape(channels, -1).T.astype(np.float64)  # (T·h·w, C)
    samples -= samples.mean(axis=0)
    _, _, components = np.linalg.svd(samples, full_matrices=False)
    projected = samples @ components[:3].T  # (T·h·w, ≤3)
    if projected.shape[1] < 3:
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    low, high = np.percentile(projected, [1, 99], axis=0)
    scaled = np.clip((projected - low) / np.maximum(high - low, 1e-8), 0, 1)
    frames = (scaled * 255).round().astype(np.uint8).reshape(*latents.shape[1:], 3)  # (T, h, w, 3)
    return frames.repeat(LATENT_PIXELS, axis=1).repeat(LATENT_PIXELS, axis=2)


def shrink_on_device(frames: torch.Tensor, max_side: int) -> torch.Tensor:
    """(3, T, H, W) uint8 frames on any device, scaled (bilinear, antialiased) so the longer side is
    at most `max_side`, there: only preview-sized frames need to reach host memory."""
    height, width = frames.shape[2:]
    ratio = max_side / max(height, width)
    if ratio >= 1:
        return frames
    size = (max(1, round(height * ratio)), max(1, round(width * ratio)))
    small = F.interpolate(frames.transpose(0, 1).float(), size=size, mode="bilinear", antialias=True)
    return small.round().clamp(0, 255).to(torch.uint8).transpose(0, 1)


def clip_frames(clip: Clip, max_side: Optional[int] = None) -> np.ndarray:
    """The first video of a clip as (T, H, W, 3) uint8 frames fit for viewing. Frames on a GPU are
    first shrunk there to at most `max_side` (when given)."""
    if clip.space == "latent":
        return latent_to_rgb(clip.numpy()[0])
    video = clip.data[0]
    if isinstance(video, torch.Tensor):
        if max_side is not None and video.device.type != "cpu":
            video = shrink_on_device(video, max_side)
        video = video.cpu().numpy()
    return np.ascontiguousarray(video.transpose(1, 2, 3, 0))


def make_preview(clip: Clip, max_side: int, sheet_frames: int) -> Preview:
    frames = clip_frames(clip, max_side)
    return Preview(
        gif=encode_gif(frames, clip.fps, max_side),
        contact_sheet_png=contact_sheet(frames, sheet_frames, max_side),
    )
