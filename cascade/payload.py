"""The one small object that travels between stages: a clip and the request it answers.

A stage returns its clip as a torch tensor on its device (uint8 frames, float32 latents). Through
Ray's object store it travels as a numpy array (`numpy()`): numpy costs there a fraction of what a
torch tensor does (docs/SCALING.md), and a reader on the same node maps it without a copy. On a
direct hop (Ray Direct Transport between GPU actors) the tensor stays on the GPU and Ray sends it
to the next stage's device. A stage reads either form with `tensor(device)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np
import torch

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

    data: Union[np.ndarray, torch.Tensor]  # (B, C, T, H, W)
    space: Space
    fps: float
    request: Request
    notes: dict = field(default_factory=dict)  # small facts a stage wants in the manifest

    def __post_init__(self) -> None:
        if self.data.ndim != 5:
            raise ValueError(f"a clip holds (B, C, T, H, W) data, got shape {self.data.shape}")
        expected = "float32" if self.space == "latent" else "uint8"
        dtype = str(self.data.dtype).removeprefix("torch.")  # numpy's and torch's names agree
        if self.space not in ("latent", "pixel") or dtype != expected:
            raise ValueError(f"a {self.space!r} clip must hold {expected} data, got {dtype}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def num_frames(self) -> int:
        return self.data.shape[2]

    def numpy(self) -> np.ndarray:
        """The data in host memory, as numpy (a CPU tensor's array shares its memory)."""
        return self.data if isinstance(self.data, np.ndarray) else self.data.cpu().numpy()

    def tensor(self, device: torch.device | str) -> torch.Tensor:
        """The data as a torch tensor on `device`; a read-only array (as the object store hands it
        out) is copied first, so the tensor may be written."""
        data = self.data
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data if data.flags.writeable else data.copy())
        return data.to(device)


def clip_to_safetensors(clip: Clip) -> bytes:
    """A clip as safetensors bytes: its data, and its space, fps and notes as metadata."""
    from safetensors.numpy import save

    metadata = {"space": clip.space, "fps": repr(clip.fps), "notes": json.dumps(clip.notes, ensure_ascii=False)}
    return save({"data": np.ascontiguousarray(clip.numpy())}, metadata=metadata)


def clip_from_safetensors(data: bytes, request: Request) -> Clip:
    """The clip `clip_to_safetensors` wrote, for `request`."""
    from safetensors.numpy import load

    header_size = int.from_bytes(data[:8], "little")  # the format: an 8-byte length, then a JSON header
    metadata = json.loads(data[8 : 8 + header_size])["__metadata__"]
    data_array = load(data)["data"]
    return Clip(data_array, metadata["space"], float(metadata["fps"]), request, json.loads(metadata["notes"]))
