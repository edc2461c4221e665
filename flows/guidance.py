"""Classifier-free guidance for velocity models.

The guided velocity extrapolates from the unconditional towards the conditional prediction,

    v = v_uncond + scale·(v_cond − v_uncond),

so scale 1 is the plain conditional model and scale 0 the unconditional one. Both predictions
come from one model call on a doubled batch (better GPU use than two calls); scale 1 skips the
unconditional half entirely.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

ConditionalVelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def guided_velocity(
    velocity_fn: ConditionalVelocityFn, condition: Tensor, uncondition: Tensor, scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn `velocity_fn(x, sigma, condition) -> v` into the sampler-facing `fn(x, sigma) -> v`
    with classifier-free guidance.

    condition, uncondition: (B, L, D) text embeddings of the prompt and of the negative/empty
    prompt, matching x's batch (B, ...). sigma is passed through unchanged (a 0-d tensor).
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(
            f"guidance scale must be a finite number (1 disables guidance), got {scale!r}"
        )
    if condition.shape != uncondition.shape:
        raise ValueError(
            "condition and uncondition must have the same shape to share one batched call, got "
            f"{tuple(condition.shape)} and {tuple(uncondition.shape)}"
        )

    if scale == 1:
        return lambda x, sigma: velocity_fn(x, sigma, condition)

    both_conditions = torch.cat([condition, uncondition])  # (2B, L, D)

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        if x.shape[0] != condition.shape[0]:
            raise ValueError(
                f"x has batch size {x.shape[0]} but the condition has {condition.shape[0]}"
            )
        velocity = velocity_fn(torch.cat([x, x]), sigma, both_conditions)  # (2B, ...)
        velocity_cond, velocity_uncond = velocity.chunk(2)
        return velocity_uncond + scale * (velocity_cond - velocity_uncond)

    return guided
