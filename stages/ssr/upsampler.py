"""The wavelet upsampler of the spatial super-resolution stage.

Each level doubles the resolution. The input frame, scaled by the wavelet's low-band gain, IS the low
band (LL) of the output's one-level DWT; a small residual conv network predicts the three detail bands
(LH, HL, HH) of every colour channel at the input resolution, and the inverse DWT assembles the 2x
frame. Hence `dwt2(output)[:, :, 0] == LOW_BAND_GAIN * input` whatever the network predicts: the
network can only add detail, never shift colours or blur what the input already fixes.

The last conv of each level starts at zero, so an untrained model is the wavelet's "no detail"
upsample (for haar: every pixel repeated 2x2). Outputs are not clamped; a caller that needs [-1, 1]
clamps. Weights are loaded with `stages.weights.load_into(upsampler, state_dict, source)`; the module
holds parameters only (the wavelet filters are cached tensors, not buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stages.ssr.wavelet import LOW_BAND_GAIN, idwt2, orthonormal_filters

COLOUR_CHANNELS = 3
DETAIL_BANDS = 3  # LH, HL, HH
SUPPORTED_SCALES = {2: 1, 4: 2}  # output scale -> number of 2x levels


@dataclass
class WaveletUpsamplerConfig:
    wavelet: str = "haar"  # any orthogonal pywt wavelet: haar, dbN, symN, coifN
    channels: int = 32  # feature channels of the detail network
    num_blocks: int = 4  # residual blocks per level
    scale: int = 2  # 2 (one level) or 4 (two levels)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.activation = nn.SiLU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, channels, H, W)
        return features + self.conv2(self.activation(self.conv1(features)))


class DetailPredictor(nn.Module):
    """Predicts the detail bands of one 2x level from the frame at the input resolution."""

    def __init__(self, channels: int, num_blocks: int):
        super().__init__()
        self.head = nn.Conv2d(COLOUR_CHANNELS, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(num_blocks)))
        self.activation = nn.SiLU()
        self.tail = nn.Conv2d(channels, COLOUR_CHANNELS * DETAIL_BANDS, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # untrained: no detail at all
        nn.init.zeros_(self.tail.bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = frames.shape  # (B, 3, H, W)
        features = self.blocks(self.head(frames))
        details = self.tail(self.activation(features))  # (B, 3·3, H, W), colour-major
        return details.reshape(batch, COLOUR_CHANNELS, DETAIL_BANDS, height, width)


class WaveletUpsampler(nn.Module):
    """frames (B, 3, H, W) in [-1, 1]  ->  (B, 3, scale·H, scale·W)."""

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

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
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
        for predictor in self.levels:
            low_band = LOW_BAND_GAIN * frames  # (B, 3, H, W)
            details = predictor(frames)  # (B, 3, 3, H, W)
            bands = torch.cat([low_band.unsqueeze(2), details], dim=2)  # (B, 3, 4, H, W)
            frames = idwt2(bands, self.config.wavelet)  # (B, 3, 2H, 2W)
        return frames
