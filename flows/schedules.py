"""Noise-level (sigma) schedules for flow-matching sampling.

Convention (Wan2.1): x_σ = (1 − σ)·x0 + σ·ε, σ = 1 is pure noise and σ = 0 is data; the model's
timestep is t = 1000·σ, fed as its reference sampler feeds it (`model_timestep_float`,
`model_timestep_truncated` below). The timestep shift σ' = shift·σ / (1 + (shift − 1)·σ) moves sampling
steps towards high noise (shift > 1) where large video models need them most.

`flow_sigmas` reproduces the schedule of the official Wan2.1 UniPC sampler (its default) and of
diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`:

    σ_k = shift(σ_max · (1 − k / steps)),  k = 0 … steps,  σ_max = 1 − 1/1000 = 0.999

so the first step starts at the highest noise level among the 1000 training timesteps (t = 999
for shift 1) and the last one lands exactly on σ = 0 (shift(0) = 0).

Two neighbouring schedules were deliberately not chosen: diffusers' `UniPCMultistepScheduler`
(the scheduler of the diffusers Wan pipelines) spaces `linspace(1, 1/1000, steps + 1)[:-1]`
instead and lowers a first σ of exactly 1 by 1e-6; `FlowMatchEulerDiscreteScheduler(shift=...)`
applies the shift twice by default (once to its training sigmas, once again in `set_timesteps`).
The samplers in `flows.samplers` accept any decreasing schedule in [0, 1], so either can still
be passed explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

TRAIN_TIMESTEPS = 1000
"""Number of discrete training timesteps of Wan2.1; the model sees t = TRAIN_TIMESTEPS·σ."""

TimestepRule = Callable[[Tensor], Tensor]
"""How a sampler's reference implementation turns a noise level σ into the DiT's timestep."""

SIGMA_MAX = 1.0 - 1.0 / TRAIN_TIMESTEPS
"""Highest noise level of the training grid σ_j = j / 1000, j = 0 … 999."""


def _check_shift(shift: float) -> None:
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0 (1 means no shift), got {shift!r}")


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Timestep shift σ' = shift·σ / (1 + (shift − 1)·σ); keeps 0 → 0 and 1 → 1, monotone."""
    _check_shift(shift)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(steps: int, shift: float) -> Tensor:
    """Sampling schedule of `steps` steps: float64 tensor of shape (steps + 1,), descending from
    shift(0.999) to exactly 0 (see the module docstring for the exact rule and its sources)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _check_shift(shift)
    evenly_spaced = torch.linspace(SIGMA_MAX, 0.0, steps + 1, dtype=torch.float64)
    return shift_sigmas(evenly_spaced, shift)


def model_timestep_float(sigma: Tensor) -> Tensor:
    """t = 1000·σ as a float, as diffusers' `FlowMatchEulerDiscreteScheduler` feeds it (the official
    Wan2.1 release has no Euler solver). Formed in σ's dtype; give the float64 schedule."""
    return sigma * TRAIN_TIMESTEPS


def model_timestep_truncated(sigma: Tensor) -> Tensor:
    """t = int64(1000·σ), truncated toward zero and returned as a float tensor (σ ≥ 0, so truncation
    is floor): what the official Wan2.1 UniPC and DPM-Solver++ samplers and diffusers'
    `UniPCMultistepScheduler` feed the DiT, while their solvers step on the float σ. They truncate
    the float64 product; so must the caller, by passing the float64 schedule (in float32, a σ whose
    product lands just on an integer can come out one below it)."""
    return torch.trunc(sigma * TRAIN_TIMESTEPS)
