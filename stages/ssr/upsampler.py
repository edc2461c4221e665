"""The wavelet upsampler of the spatial super-resolution stage.

Each level doubles the resolution. The input frame, scaled by the wavelet's low-band gain, IS the low
band (LL) of the output's one-level DWT; a small residual conv network predicts the three detail bands
(LH, HL, HH) of every colour channel at the input resolution, and the inverse DWT assembles the 2x
frame. Hence `dwt2(output)[:, :, 0] == LOW_BAND_GAIN * input` whatever the network predicts: the
network can only add detail, never shift colours or blur what the input already fixes.

Detail must not flicker, so the upsampler is recurrent: besides the frame, each level sees the
wavelet bands of the PREVIOUS frame's output at that level (its low band is the previous frame, its
detail bands are the detail predicted for it, so together they are the previous high-resolution
output, losslessly rearranged to the input resolution). The network can copy detail that is still
valid, re-estimate it where the content moved, and keep new detail consistent with what it drew a
frame earlier. Alignment is left to the network (no optical flow): its receptive field, 2·num_blocks
+ 2 convs of 3x3, covers motions of several pixels per frame at every level, and flow estimation
would cost more than the whole upsampler. The price is that frames must be processed in order,
video by video (`upsample_frames`). For the first frame the "previous output" is the frame itself
without detail, so a single image is upsampled the same way.

The last conv of each level starts at zero, so an untrained model is the wavelet's "no detail"
upsample (for haar: every pixel repeated 2x2). Outputs are not clamped; a caller that needs [-1, 1]
clamps. Weights are loaded with `stages.weights.load_into(upsampler, state_dict, source)`; the module
holds parameters only (the wavelet filters are cached tensors, not buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from stages.ssr.wavelet import LOW_BAND_GAIN, idwt2, orthonormal_filters

COLOUR_CHANNELS = 3
BANDS = 4  # LL, LH, HL, HH
DETAIL_BANDS = 3  # LH, HL, HH
SUPPORTED_SCALES = {2: 1, 4: 2}  # output scale -> number of 2x levels


@dataclass
class WaveletUpsamplerConfig:
    wavelet: str = "haar"  # any orthogonal pywt wavelet: haar, dbN, symN, coifN
    channels: int = 32  # feature channels of the detail network
    num_blocks: int = 4  # residual blocks per level
    scale: int = 2  # 2 (one level) or 4 (two levels, each with its own weights)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.activation = nn.SiLU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, channels, H, W)
        return features + self.conv2(self.activation(self.conv1(features)))


class DetailPredictor(nn.Module):
    """Predicts the detail bands of one 2x level from the frame and the previous output's bands,
    all at the input resolution."""

    def __init__(self, channels: int, num_blocks: int):
        super().__init__()
        self.head = nn.Conv2d(COLOUR_CHANNELS * (1 + BANDS), channels, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(num_blocks)))
        self.activation = nn.SiLU()
        self.tail = nn.Conv2d(channels, COLOUR_CHANNELS * DETAIL_BANDS, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # untrained: no detail at all
        nn.init.zeros_(self.tail.bias)

    def forward(self, frames: torch.Tensor, previous_bands: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = frames.shape  # (B, 3, H, W)
        inputs = torch.cat([frames, previous_bands.flatten(1, 2)], dim=1)  # (B, 3 + 3·4, H, W)
        features = self.blocks(self.head(inputs))
        details = self.tail(self.activation(features))  # (B, 3·3, H, W), colour-major
        return details.reshape(batch, COLOUR_CHANNELS, DETAIL_BANDS, height, width)


class WaveletUpsampler(nn.Module):
    """One step of the recurrence: frame t of B videos, (B, 3, H, W) in [-1, 1], and the bands of
    frame t−1's output  ->  the output (B, 3, scale·H, scale·W) and its bands, to pass with frame t+1.

    The bands are a list with one (B, 3, 4, h, w) tensor per level, [LL, LH, HL, HH] of that level's
    output, h × w being the level's input size. Pass `previous=None` for the first frame of a video.
    """

    def __init__(self, config: WaveletUpsamplerConfig):
        super().__init__()
        if config.scale not in SUPPORTED_SCALES:
            raise ValueError(f"upsampler scale must be one of {sorted(SUPPORTED_SCALES)}, got {config.scale}")
        if config.channels < 1:
            raise ValueError(f"upsampler channels must be >= 1, got {config.channels}")
        if config.num_blocks < 0:
            raise ValueError(f"upsampler num_blocks must be >= 0, got {config.num_blocks}")
        orthonormal_filters(config.wavelet)  # raises for an unknown or non-orthogonal wavelet
        self.config = config
        self.levels = nn.ModuleList(
            DetailPredictor(config.channels, config.num_blocks) for _ in range(SUPPORTED_SCALES[config.scale])
        )

    def forward(
        self, frames: torch.Tensor, previous: Optional[list[torch.Tensor]] = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if frames.dim() != 4 or frames.shape[1] != COLOUR_CHANNELS:
            raise ValueError(
                f"upsampler expects frames shaped (B, 3, H, W), got shape {tuple(frames.shape)}"
            )
        if frames.shape[0] == 0 or frames.shape[2] == 0 or frames.shape[3] == 0:
            raise ValueError(
                f"upsampler needs a non-empty batch and frame size, got shape {tuple(frames.shape)}"
            )
        if not frames.is_floating_point():
            raise ValueError(
                f"upsampler expects floating-point frames in [-1, 1], got dtype {frames.dtype}"
            )
        if previous is not None and len(previous) != len(self.levels):
            raise ValueError(
                f"previous output bands must hold one tensor per level ({len(self.levels)}), got {len(previous)}"
            )
        bands_per_level = []
        for index, predictor in enumerate(self.levels):
            low_band = LOW_BAND_GAIN * frames  # (B, 3, H, W)
            if previous is None:  # first frame: as if the previous output were this frame, no detail
                details = torch.zeros_like(low_band).unsqueeze(2).expand(-1, -1, DETAIL_BANDS, -1, -1)
                previous_bands = torch.cat([low_band.unsqueeze(2), details], dim=2)
            else:
                previous_bands = previous[index]
                expected = (*low_band.shape[:2], BANDS, *low_band.shape[2:])
                if tuple(previous_bands.shape) != expected:
                    raise ValueError(
                        f"previous output bands of level {index} must be shaped {expected} for frames "
                        f"shaped {tuple(frames.shape)}, got {tuple(previous_bands.shape)}"
                    )
            details = predictor(frames, previous_bands)  # (B, 3, 3, H, W)
            bands = torch.cat([low_band.unsqueeze(2), details], dim=2)  # (B, 3, 4, H, W)
            bands_per_level.append(bands)
            frames = idwt2(bands, self.config.wavelet)  # (B, 3, 2H, 2W)
        return frames, bands_per_level


def upsample_frames(upsampler: WaveletUpsampler, frames: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Upsamples the consecutive frames of B videos in order: each item (B, 3, H, W) in [-1, 1]
    yields (B, 3, scale·H, scale·W), the recurrent state carried from one frame to the next."""
    previous = None
    for frame in frames:
        output, previous = upsampler(frame, previous)
        yield output
