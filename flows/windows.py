"""Long clips by overlapping windows: a velocity model trained on clips of W latent frames samples a
longer clip by denoising it as windows of W frames that overlap by at least O frames.

At every sampler step each window's velocity is predicted on its own (the model sees the window at
the positions it was trained on, 0 … W − 1), and the clip's velocity is the windows' velocities
blended frame by frame with weights that ramp linearly across each overlap; then the solver steps
the whole clip. Because the blend happens at every step, neighbouring windows agree on their shared
frames from the first (noisiest) step on, and no seam is frozen in early. Each window costs one
model call per step, so time grows linearly with the clip's length and the model's memory stays
that of one window.

Windows of neighbouring frames each see a stretch of the clip as long as a training clip, and none
sees where the clip as a whole goes. An overview window can: W frames spread evenly from the clip's
first to its last (`overview_frames`), at their places in the clip as positions (a model whose
rotary embedding takes positions, such as stages/base/dit.py's, sees frames 3 apart as 3 apart).
Its velocity replaces the blend at those frames, so it lays out the motion over the whole clip and
the windows fill in the frames between. A model must be trained on such strided windows for this to
help (docs/long_video.md).

    spans = window_spans(13, window=5, overlap=2)     # [(0, 5), (3, 8), (5, 10), (8, 13)]
    overview = overview_frames(13, window=5)          # [0, 3, 6, 9, 12]
    velocity = windowed_velocity(per_window_velocity, spans, overview)  # the overview is window 4
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

WindowVelocityFn = Callable[[int, Tensor, Tensor], Tensor]  # (window index, x of the window, σ) -> velocity


@dataclass
class WindowConfig:
    """`stages.base.window`: latent frames per window and the least overlap between neighbours.
    `latent_frames` 0 turns windows off (the model sees the whole clip at once). `overview` adds the
    overview window (`overview_frames`) to a clip longer than one window."""

    latent_frames: int = 0
    overlap: int = 0
    overview: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return self.latent_frames > 0

    def validate(self, key: str = "stages.base.window") -> None:
        """Raises ValueError naming the first field that cannot work, and what is valid."""
        for name in ("latent_frames", "overlap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}.{name}={value!r} is not valid: an integer ≥ 0")
        if self.enabled and self.overlap >= self.latent_frames:
            raise ValueError(
                f"{key}.overlap={self.overlap} is not valid for latent_frames={self.latent_frames}: "
                f"from 0 to {self.latent_frames - 1} (neighbouring windows must each add a frame)"
            )
        if not self.enabled and self.overlap:
            raise ValueError(f"{key}.overlap={self.overlap} needs {key}.latent_frames > 0 (windows are off)")
        if not isinstance(self.overview, bool):
            raise ValueError(f"{key}.overview={self.overview!r} is not valid: true or false")
        if self.overview and self.latent_frames < 2:
            raise ValueError(f"{key}.overview=true needs {key}.latent_frames ≥ 2, got {self.latent_frames}")


def window_spans(length: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) of each window over `length` frames: windows of `window` frames, the first at 0,
    the last ending at `length`, and between them the fewest windows that keep every neighbouring
    pair overlapping by at least `overlap` frames, spread evenly. A clip no longer than one window is
    one span (the whole clip)."""
    if length < 1 or window < 1 or not 0 <= overlap < window:
        raise ValueError(
            f"window_spans needs length ≥ 1, window ≥ 1 and 0 ≤ overlap < window; got length={length}, "
            f"window={window}, overlap={overlap}"
        )
    if length <= window:
        return [(0, length)]
    count = 1 + math.ceil((length - window) / (window - overlap))
    starts = [round(index * (length - window) / (count - 1)) for index in range(count)]
    return [(start, start + window) for start in starts]


def overview_frames(length: int, window: int) -> list[int]:
    """The overview window's `window` latent frames, spread evenly from the first of `length` frames
    to the last (rounded to the nearest frame): [0, 3, 6, 9, 12] for 13 frames and windows of 5."""
    if window < 2 or length <= window:
        raise ValueError(f"an overview window needs window ≥ 2 and a clip longer than it; got length={length}, "
                         f"window={window}")
    return [round(index * (length - 1) / (window - 1)) for index in range(window)]


def blend_weights(spans: list[tuple[int, int]], length: int) -> Tensor:
    """(windows, length) float64 weights, summing to 1 over the windows at every frame and 0 outside a
    window. Inside a window the weight ramps up linearly over the frames it shares with the window
    before it and down over those it shares with the window after it, so each window hands over to
    the next gradually across their overlap."""
    raw = torch.zeros(len(spans), length, dtype=torch.float64)
    for index, (start, stop) in enumerate(spans):
        position = torch.arange(stop - start, dtype=torch.float64)
        weight = torch.ones(stop - start, dtype=torch.float64)
        if index > 0:  # shared with the previous window: frames start … previous stop − 1
            shared = spans[index - 1][1] - start
            if shared > 0:
                weight = torch.minimum(weight, (position + 1) / (shared + 1))
        if index < len(spans) - 1:  # shared with the next window: frames next start … stop − 1
            shared = stop - spans[index + 1][0]
            if shared > 0:
                weight = torch.minimum(weight, (stop - start - position) / (shared + 1))
        raw[index, start:stop] = weight
    return raw / raw.sum(dim=0, keepdim=True)


def windowed_velocity(
    window_velocity: WindowVelocityFn, spans: list[tuple[int, int]], overview: Sequence[int] = (),
    frame_dim: int = 2,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The sampler-facing `fn(x, sigma) -> v` of a clip denoised by windows: `window_velocity(i, x_i,
    sigma)` predicts window i's velocity from its frames x_i = x[..., start_i:stop_i, ...] (along
    `frame_dim`), and the clip's velocity is their blend (`blend_weights`). With `overview` frames,
    window len(spans) is x at those frames, and its velocity is the clip's there."""
    length = spans[-1][1]
    weights = blend_weights(spans, length)  # (windows, length)
    overview_index = torch.tensor(list(overview), dtype=torch.long)

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        if x.shape[frame_dim] != length:
            raise ValueError(f"x has {x.shape[frame_dim]} frames along dim {frame_dim}, the windows cover {length}")
        blended = torch.zeros_like(x)
        shape = [1] * x.ndim
        shape[frame_dim] = -1
        for index, (start, stop) in enumerate(spans):
            window = window_velocity(index, x.narrow(frame_dim, start, stop - start).contiguous(), sigma)
            weight = weights[index, start:stop].to(x.device, x.dtype).view(shape)  # on x's device (a GPU)
            blended.narrow(frame_dim, start, stop - start).add_(window * weight)
        if len(overview_index):
            index = overview_index.to(x.device)
            seen = window_velocity(len(spans), x.index_select(frame_dim, index), sigma)
            blended.index_copy_(frame_dim, index, seen.to(blended.dtype))
        return blended

    return velocity
