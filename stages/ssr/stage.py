"""The spatial super-resolution stage: frames -> wavelet upsampler, ×2 or ×4 height and width.

The upsampler is recurrent (each frame sees the previous frame's output), so every video of the
clip is processed frame by frame in order; the videos of a batch go through together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from cascade.payload import Clip, Request
from stages.pixels import to_model_range, to_uint8
from stages.ssr.upsampler import WaveletUpsampler, WaveletUpsamplerConfig, upsample_frames
from stages.weights import dtype_from_name, load_into, load_or_init, read_state_dict, shipped_weights_path

SHIPPED_WEIGHTS = "weights/ssr/upsampler_x{scale}.safetensors"


@dataclass
class SsrStageConfig:
    upsampler: WaveletUpsamplerConfig = field(default_factory=WaveletUpsamplerConfig)
    # `{scale}` is replaced by upsampler.scale; a relative path is taken from the repository root.
    # The default is the shipped weights (trained for the default upsampler size and haar);
    # empty: random weights (with a warning).
    weights: str = SHIPPED_WEIGHTS
    dtype: str = "float32"


def weights_path(config: SsrStageConfig) -> str:
    """The weights file `config` names, `{scale}` filled in and made absolute ("" stays "")."""
    return shipped_weights_path(config.weights.replace("{scale}", str(config.upsampler.scale)))


def load_upsampler(config: SsrStageConfig, warnings: list[str]) -> WaveletUpsampler:
    """The upsampler with the weights `config` names, or random ones (warning added to `warnings`)."""

    def load(path: str) -> WaveletUpsampler:
        model = WaveletUpsampler(config.upsampler)
        load_into(model, read_state_dict(path), path)
        return model

    return load_or_init(
        weights_path(config), load, lambda: WaveletUpsampler(config.upsampler),
        "the wavelet upsampler", "stages.ssr.weights", warnings,
    ).eval()


class SsrStage:
    def __init__(self, config: SsrStageConfig, device: str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype_from_name(config.dtype)
        self.warnings: list[str] = []
        self.upsampler = load_upsampler(config, self.warnings).to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(
        self, clip: Clip, request: Request, progress: Optional[Callable[[int, int], None]] = None
    ) -> Clip:
        if clip.space != "pixel":
            raise ValueError(f"the ssr stage takes a pixel clip, got a {clip.space!r} one")
        batch, _, count, height, width = clip.shape
        scale = self.config.upsampler.scale
        output = np.empty((batch, 3, count, height * scale, width * scale), dtype=np.uint8)
        frames = (  # frame t of every video, (B, 3, H, W) in [-1, 1]
            to_model_range(torch.from_numpy(np.ascontiguousarray(clip.data[:, :, index])).to(self.device), self.dtype)
            for index in range(count)
        )
        for index, upsampled in enumerate(upsample_frames(self.upsampler, frames)):
            output[:, :, index] = to_uint8(upsampled).cpu().numpy()
            if progress is not None:
                progress(index + 1, count)
        return Clip(output, "pixel", clip.fps, request)
