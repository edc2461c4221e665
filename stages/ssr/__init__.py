"""Spatial super-resolution: an orthonormal wavelet transform and the recurrent wavelet upsampler."""

from stages.ssr.upsampler import WaveletUpsampler, WaveletUpsamplerConfig, upsample_frames
from stages.ssr.wavelet import dwt2, idwt2

__all__ = ["dwt2", "idwt2", "WaveletUpsampler", "WaveletUpsamplerConfig", "upsample_frames"]
