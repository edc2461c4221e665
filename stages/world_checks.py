"""Checks that the tiny cascade obeys its prompt, on the procedural world (stages/world.py).

Used by the tests (tests/test_world_cascade.py) and the evaluation (bench/eval_world.py):

- `check_base_clip`: the dominant object colour of a generated clip matches the prompt's colour
  (by hue, nearest of the six world hues) and its centroid moves in the prompt's direction (the
  nearest of the eight world directions to its motion, over at least `MIN_MOTION` of the frame);
- `is_monotonic`: after frame interpolation the centroid still advances along the direction at
  every frame, up to `MONOTONIC_TOLERANCE` pixels of jitter;
- `check_long_clip`: a clip longer than the base stage's window, read as segments of one window's
  frames: the colour and the direction of every segment, the frame-to-frame change at the windows'
  joints against the largest change elsewhere, and how far the object ever falls back along the
  prompt's direction (a window that starts the object's path again);
- `detail_over_bicubic`: the high-frequency energy (mean squared Laplacian of the luma) of the
  spatial super-resolution over that of bicubic upsampling of the same frames.

`base_frames`, `interpolated_frames`, `super_resolved_frames` and `detail_over_bicubic` run the
stages on one request (`request_in_config` makes it as the cascade would).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cascade.payload import Clip, Request
from stages.base.stage import TIME_COMPRESSION
from stages.world import DIRECTIONS, PromptCase, measure_clip, motion_direction

MIN_MOTION = 0.06  # share of the frame side the object must move over the clip (the slow speed moves 0.19)
MONOTONIC_TOLERANCE = 1.0  # pixels a centroid may step back along the direction between two frames
FALL_BACK_LIMIT = 0.1  # share of the frame's longer side a long clip's object may fall back along its direction


class PromptCheck(NamedTuple):
    case: PromptCase
    colour: str  # measured
    hue: float
    direction: str  # measured
    motion: float  # pixels

    @property
    def colour_matches(self) -> bool:
        return self.colour == self.case.colour

    @property
    def direction_matches(self) -> bool:
        return self.direction == self.case.direction

    @property
    def passed(self) -> bool:
        return self.colour_matches and self.direction_matches


def check_base_clip(frames: np.ndarray, case: PromptCase) -> PromptCheck:
    """frames (T, H, W, 3) uint8 of a clip generated for `case.prompt`."""
    measurement = measure_clip(frames)
    direction, motion = motion_direction(measurement.centroids)
    if motion < MIN_MOTION * frames.shape[2]:
        direction = "none"
    return PromptCheck(case, measurement.colour, measurement.hue, direction, motion)


class LongClipCheck(NamedTuple):
    segments: list[PromptCheck]  # one per segment of one window's frames
    joint_change: float  # largest mean |frame − previous| across a window's first or last latent frame
    inside_change: float  # largest one elsewhere
    fall_back: float  # farthest the object falls back along the prompt's direction, share of the frame's longer side

    @property
    def colour_holds(self) -> bool:
        return all(segment.colour_matches for segment in self.segments)

    @property
    def direction_holds(self) -> bool:
        return all(segment.direction_matches for segment in self.segments)

    @property
    def joints_smooth(self) -> bool:
        return self.joint_change <= self.inside_change

    @property
    def keeps_going(self) -> bool:
        """The object never falls back along the prompt's direction by more than `FALL_BACK_LIMIT`."""
        return self.fall_back <= FALL_BACK_LIMIT


def check_long_clip(frames: np.ndarray, case: PromptCase, windows: list[list[int]]) -> LongClipCheck:
    """frames (T, H, W, 3) uint8 decoded from latents denoised as `windows` ([start, stop) latent
    frames, as the base stage notes them). Segments are the frames of one window's length (1 +
    4·(W − 1)), one every 4·(W − 1) frames, each checked as `check_base_clip` does. A joint is
    the boundary between two latent frames where a window starts or stops: latent frame b decodes to
    frames 4b − 3 … 4b (b ≥ 1), so the change across it is from frame 4b − 4 to frame 4b − 3. The
    fall back is the largest drop of the object's progress along the prompt's direction from any
    sighting to a later one (`fall_back`), over the frame's longer side."""
    window = windows[0][1] - windows[0][0]
    segment, stride = 1 + TIME_COMPRESSION * (window - 1), TIME_COMPRESSION * (window - 1)
    starts = range(0, frames.shape[0] - segment + 1, stride)
    segments = [check_base_clip(frames[start:start + segment], case) for start in starts]
    latent_frames = windows[-1][1]
    boundaries = {bound for span in windows for bound in span if 0 < bound < latent_frames}
    joints = {TIME_COMPRESSION * (bound - 1) for bound in boundaries}  # index into the changes
    changes = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # (T − 1,)
    inside = [change for index, change in enumerate(changes) if index not in joints]
    joint = max((changes[index] for index in joints), default=0.0)
    farthest = fall_back(frames, case.direction) / max(frames.shape[1:3])
    return LongClipCheck(segments, float(joint), float(max(inside)), farthest)


def progress_along(frames: np.ndarray, direction: str) -> np.ndarray:
    """(T,) the dominant object's centroid projected on `direction`, in pixels (NaN where unseen)."""
    centroids = measure_clip(frames).centroids
    return centroids @ np.asarray(DIRECTIONS[direction][0])


def fall_back(frames: np.ndarray, direction: str) -> float:
    """The farthest, in pixels, the object's centroid falls back along `direction` from any frame it
    is seen in to a later one: 0 for an object that never steps back (nor one seen in < 2 frames)."""
    progress = progress_along(frames, direction)
    seen = progress[~np.isnan(progress)]
    if len(seen) < 2:
        return 0.0
    return float((np.maximum.accumulate(seen) - seen).max())


def is_monotonic(frames: np.ndarray, direction: str, tolerance: float = MONOTONIC_TOLERANCE) -> bool:
    """Whether the object advances along `direction` at every frame (steps back at most `tolerance`)."""
    progress = progress_along(frames, direction)
    if np.isnan(progress).any():
        return False
    return bool((np.diff(progress) >= -tolerance).all())


def high_frequency_energy(frames: np.ndarray) -> float:
    """Mean squared 3x3 Laplacian of the luma of frames (T, H, W, 3) uint8, in levels²."""
    luma = torch.from_numpy(frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    response = F.conv2d(luma[:, None], kernel)  # valid part only: no border effects
    return float(response.square().mean())


def request_for(case: PromptCase, seed: int, negative_prompt: str, height: int = 128, width: int = 128,
                num_frames: int = 17, fps: float = 16.0) -> Request:
    """The cascade request of a prompt case."""
    return Request(case.prompt, negative_prompt, seed, height, width, num_frames, fps)


def request_in_config(case: PromptCase, seed: int, config) -> Request:
    """The request `run_cascade.py` makes for `case` with `seed` under a cascade config: its video
    size and frame rate, its base stage's negative prompt."""
    video = config.video
    return request_for(case, seed, config.stages.base.negative_prompt, video.height, video.width,
                       video.num_frames, video.fps)


def base_frames(base_stage, tsr_stage, request: Request) -> tuple[Clip, np.ndarray]:
    """The base stage's latents for `request` and their clip decoded by the tsr stage's VAE:
    (T, H, W, 3) uint8, the frames the base stage meant before any interpolation."""
    latents = base_stage(None, request)
    frames = tsr_stage.decode(latents.tensor(tsr_stage.device), lambda done: None)  # (T, 3, H, W)
    return latents, frames.permute(0, 2, 3, 1).cpu().numpy()


def interpolated_frames(tsr_stage, latents: Clip, request: Request) -> np.ndarray:
    """The tsr stage's output for the base stage's `latents`: (T·factor-ish, H, W, 3) uint8."""
    return tsr_stage(latents, request).numpy()[0].transpose(1, 2, 3, 0)


def super_resolved_frames(ssr_stage, frames: np.ndarray, request: Request) -> np.ndarray:
    """The ssr stage's output for frames (T, H, W, 3) uint8: (T, sH, sW, 3) uint8."""
    clip = Clip(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)[None]), "pixel", request.fps, request)
    return ssr_stage(clip, request).numpy()[0].transpose(1, 2, 3, 0)


def bicubic_upsample(frames: np.ndarray, scale: int) -> np.ndarray:
    """frames (T, H, W, 3) uint8 -> (T, sH, sW, 3) uint8 by Pillow's bicubic resize."""
    size = (frames.shape[2] * scale, frames.shape[1] * scale)
    return np.stack([np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC)) for frame in frames])


def detail_over_bicubic(ssr_stage, frames: np.ndarray, request: Request) -> float:
    """High-frequency energy of the ssr stage's upsampling of `frames` (T, H, W, 3) uint8, divided by
    that of bicubic upsampling of the same frames to the same size (above 1: more detail)."""
    upsampled = super_resolved_frames(ssr_stage, frames, request)
    bicubic = bicubic_upsample(frames, upsampled.shape[1] // frames.shape[1])
    return high_frequency_energy(upsampled) / max(high_frequency_energy(bicubic), 1e-9)
