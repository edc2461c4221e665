"""The one small object that travels between stages: a clip and the request it answers.

Frames travel as uint8 numpy arrays and latents as float32 numpy arrays: through Ray's object
store numpy costs about a third of what a torch tensor does, and a reader on the same node maps it
without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Space = Literal["latent", "pixel"]


@dataclass(frozen=True)
class Request:
    """What the user asked for: everything a stage needs besides its own config."""

    prompt: str
    negative_prompt: str
    seed: int
    height: int
    width: int
    num_frames: int
    fps: float
    index: int = 0  # position of the prompt in a prompts file; names the progress bar


@dataclass(frozen=True)
class Clip:
    """A batch of videos in one space: latents `(B, 16, T', H/8, W/8)` float32 or frames
    `(B, 3, T, H, W)` uint8 (RGB)."""

    data: np.ndarray  # (B, C, T, H, W)
    space: Space
    fps: float
    request: Request
    notes: dict = field(default_factory=dict)  # small facts a stage wants in the manifest

    def __post_init__(self) -> None:
        if self.data.ndim != 5:
            raise ValueError(f"a clip holds (B, C, T, H, W) data, got shape {self.data.shape}")
        expected = np.float32 if self.space == "latent" else np.uint8
        if self.space not in ("latent", "pixel") or self.data.dtype != expected:
            raise ValueError(
                f"a {self.space!r} clip must hold {np.dtype(expected).name} data, got {self.data.dtype}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def num_frames(self) -> int:
        return self.data.shape[2]
