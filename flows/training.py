"""The flow-matching training target (Wan2.1 convention).

A training example mixes data x0 and Gaussian noise ε at a noise level σ ∈ [0, 1],

    x_σ = (1 − σ)·x0 + σ·ε,

and the model is trained to predict the velocity dx_σ/dσ = ε − x0 (for instance with an MSE
loss). Noise levels are drawn uniformly and then shifted like the sampling schedule, so that
training spends as much effort at high noise as sampling does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flows.schedules import shift_sigmas


def noisy_sample_and_target(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """x0, noise: (B, ...); sigma: (B,), one noise level per sample.

    Returns (x_sigma, velocity_target), both shaped like x0.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if sigma.shape != x0.shape[:1]:
        raise ValueError(
            f"sigma must have shape ({x0.shape[0]},), one per sample, got {tuple(sigma.shape)}"
        )
    sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
    x_sigma = (1.0 - sigma) * x0 + sigma * noise
    return x_sigma, noise - x0


def sample_training_sigmas(
    batch: int, shift: float, generator: torch.Generator | None = None
) -> Tensor:
    """(batch,) float32 noise levels: uniform on [0, 1), then shifted by `shift` (1 = no shift).

    Drawn on the generator's device when one is given, else on the default device.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    device = generator.device if generator is not None else None
    uniform = torch.rand(batch, generator=generator, device=device)
    return shift_sigmas(uniform, shift)
