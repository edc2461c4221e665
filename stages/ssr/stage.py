"""The spatial super-resolution stage: frames -> wavelet upsampler, ×2 or ×4 height and width.

The upsampler is recurrent (each frame sees the previous frame's output), so every video of the
clip is processed frame by frame in order; the videos of a batch go through together.

Given a group of ranks (stages/parallel.py), the frames are split into one contiguous range per
rank. A rank's recurrence cannot start from the true previous output, which the rank before it is
still computing, so it starts `warmup_frames` earlier and drops those outputs: the state carried in
is then built from the same frames, and the split's effect on the video is what docs/PARALLEL.md
measures. Every rank runs the same call; the leader returns the clip, the others None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cascade.payload import Clip, Request
from stages.parallel import SINGLE_RANK, RankGroup, broadcast_shape, map_frame_ranges, split_evenly
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
    def __init__(
        self, config: SsrStageConfig, device: str = "cpu", ranks: RankGroup = SINGLE_RANK, warmup_frames: int = 0
    ):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype_from_name(config.dtype)
        self.ranks = ranks
        self.warmup_frames = warmup_frames  # frames each rank's recurrence runs before its range
        self.warnings: list[str] = []
        self.upsampler = load_upsampler(config, self.warnings).to(self.device, self.dtype)

    @torch.no_grad()
    def upsample(self, frames: torch.Tensor, skip: int, progress: Optional[Callable[[int, int], None]]) -> torch.Tensor:
        """(B, 3, T, H, W) uint8 -> (B, 3, T − skip, scale·H, scale·W) uint8: the frames in order
        through the recurrence, the first `skip` outputs (the warm-up) dropped."""
        batch, _, count, height, width = frames.shape
        scale = self.config.upsampler.scale
        output = torch.empty((batch, 3, count - skip, height * scale, width * scale), dtype=torch.uint8, device=self.device)
        inputs = (to_model_range(frames[:, :, index], self.dtype) for index in range(count))  # (B, 3, H, W) in [-1, 1]
        for index, upsampled in enumerate(upsample_frames(self.upsampler, inputs)):
            if index >= skip:
                output[:, :, index - skip] = to_uint8(upsampled)
            if progress is not None:
                progress(index + 1, count)
        return output

    @torch.no_grad()
    def __call__(
        self, clip: Optional[Clip], request: Request, progress: Optional[Callable[[int, int], None]] = None
    ) -> Optional[Clip]:
        if self.ranks.is_leader and clip.space != "pixel":
            raise ValueError(f"the ssr stage takes a pixel clip, got a {clip.space!r} one")
        count = broadcast_shape(clip.shape if self.ranks.is_leader else None, self.ranks)[2]
        ranges = split_evenly(count, self.ranks.size)
        inputs = [range(max(part.start - self.warmup_frames, 0), part.stop) if len(part) else part for part in ranges]

        def compute(frames: torch.Tensor, rank: int) -> torch.Tensor:
            return self.upsample(frames, ranges[rank].start - inputs[rank].start, progress if rank == 0 else None)

        frames = clip.tensor(self.device) if self.ranks.is_leader else None
        output = map_frame_ranges(compute, frames, inputs, 2, torch.uint8, self.ranks)
        if output is None:
            return None
        return Clip(output, "pixel", clip.fps, request)  # on this stage's device
