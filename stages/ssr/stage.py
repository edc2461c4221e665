"""The spatial super-resolution stage: frames -> wavelet upsampler, ×2 or ×4 height and width,
a batch of frames at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from cascade.payload import Clip, Request
from stages.pixels import to_model_range, to_uint8
from stages.ssr.upsampler import WaveletUpsampler, WaveletUpsamplerConfig
from stages.weights import dtype_from_name, load_into, load_or_init, read_state_dict


@dataclass
class SsrStageConfig:
    upsampler: WaveletUpsamplerConfig = field(default_factory=WaveletUpsamplerConfig)
    weights: str = ""  # empty: random weights (with a warning)
    frames_per_batch: int = 8
    dtype: str = "float32"


class SsrStage:
    def __init__(self, config: SsrStageConfig, device: str = "cpu"):
        if config.frames_per_batch < 1:
            raise ValueError(f"stages.ssr.frames_per_batch must be ≥ 1, got {config.frames_per_batch}")
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype_from_name(config.dtype)
        self.warnings: list[str] = []

        def load(path: str) -> WaveletUpsampler:
            model = WaveletUpsampler(config.upsampler)
            load_into(model, read_state_dict(path), path)
            return model

        self.upsampler = load_or_init(
            config.weights, load, lambda: WaveletUpsampler(config.upsampler),
            "the wavelet upsampler", "stages.ssr.weights", self.warnings,
        ).eval().to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(
        self, clip: Clip, request: Request, progress: Optional[Callable[[int, int], None]] = None
    ) -> Clip:
        if clip.space != "pixel":
            raise ValueError(f"the ssr stage takes a pixel clip, got a {clip.space!r} one")
        batch, _, count, height, width = clip.shape
        scale = self.config.upsampler.scale
        frames = clip.data.transpose(0, 2, 1, 3, 4).reshape(batch * count, 3, height, width)  # (B·T, 3, H, W)
        output = torch.empty(batch * count, 3, height * scale, width * scale, dtype=torch.uint8)
        for start in range(0, len(frames), self.config.frames_per_batch):
            chunk = torch.from_numpy(np.ascontiguousarray(frames[start : start + self.config.frames_per_batch]))
            output[start : start + len(chunk)] = to_uint8(self.upsampler(to_model_range(chunk.to(self.device), self.dtype))).cpu()
            if progress is not None:
                progress(start + len(chunk), len(frames))
        data = output.reshape(batch, count, 3, height * scale, width * scale).permute(0, 2, 1, 3, 4)
        return Clip(data.contiguous().numpy(), "pixel", clip.fps, request)
