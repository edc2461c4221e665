"""Frames between the two forms they take: uint8 [0, 255] for storage and transport, float
[-1, 1] for the models (the Wan VAE's range)."""

import torch


def to_model_range(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return frames.to(dtype) / 127.5 - 1.0


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] (clamped) -> uint8 [0, 255], rounded to nearest."""
    return ((frames.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
