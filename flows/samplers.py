"""Flow-matching samplers as small pure functions (k-diffusion style).

Every sampler has the signature

    sample_<name>(velocity_fn, x, sigmas, callback=None) -> x at sigmas[-1]

and integrates the probability-flow ODE dx/dσ = v(x, σ) from sigmas[0] down to sigmas[-1].
`velocity_fn(x, sigma)` gets a 0-d tensor sigma (an element of `sigmas`) and returns the velocity
v = ε − x0 of the convention x_σ = (1 − σ)·x0 + σ·ε. The solvers step on the float σ; the model's
timestep is the caller's business, and `SAMPLERS` pairs each sampler with the rule its reference
implementation uses for it (`Sampler.model_timestep`: truncated to an integer for UniPC and
DPM-Solver++, as the official Wan2.1 samplers and diffusers' UniPC do; 1000·σ for Euler). After every step `callback({"x", "i", "sigma", "denoised"})` is called
with the new x, the step index, the step's starting σ and the model's clean-sample estimate
("denoised" = x − σ·v).

The multistep solvers work in data prediction on the log signal-to-noise ratio
λ = log(α/σ), α = 1 − σ (DPM-Solver++ and UniPC with predict_x0). In flow form their
first-order step needs no logarithm at all: with D the denoised estimate held constant over the
step, the exact solution is the interpolation

    x_next = (σ_next/σ)·x + (1 − σ_next/σ)·D,

which is also what a flow Euler step gives. Higher orders only replace D by an extrapolated
estimate built from earlier denoised values; only those weights need λ. Both multistep solvers
take a first-order first step (no history yet) and a first-order last step, as diffusers does:
to σ = 0 the λ-step is infinite and the first-order step lands exactly on the estimate D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from flows.schedules import TimestepRule, model_timestep_float, model_timestep_truncated

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None]


def _check_sigmas(sigmas: Tensor) -> list[float]:
    """The schedule as Python floats (float64) after checking it is usable."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got {shape}")
    values = sigmas.tolist()
    for i, sigma in enumerate(values):
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"sigmas must lie in [0, 1], got sigmas[{i}] = {sigma}")
        if i > 0 and sigma >= values[i - 1]:
            raise ValueError(
                f"sigmas must be strictly decreasing, got sigmas[{i - 1}] = {values[i - 1]} "
                f"followed by sigmas[{i}] = {sigma}"
            )
    return values


def _denoised(x: Tensor, sigma: float, velocity: Tensor) -> Tensor:
    """The clean-sample estimate x0 = x − σ·v implied by a velocity prediction."""
    return x - sigma * velocity


def _log_snr(sigma: float) -> float:
    """λ = log((1 − σ)/σ): −inf at pure noise (σ = 1), +inf at data (σ = 0)."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _first_order_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Exact ODE step from σ to σ_next if the denoised estimate were constant over the step."""
    ratio = sigma_next / sigma
    return ratio * x + (1.0 - ratio) * denoised


def _multistep_order(i: int, steps: int) -> int:
    """Order 1 on the first step (no history) and the last step (infinite λ-step to σ = 0)."""
    return 1 if i == 0 or i == steps - 1 else 2


def _step_ratio(sigma_before: float, sigma: float, sigma_next: float) -> float:
    """r = h_previous / h, the previous λ-step relative to the current one (inf after σ = 1)."""
    return (_log_snr(sigma) - _log_snr(sigma_before)) / (_log_snr(sigma_next) - _log_snr(sigma))


def _multistep_predictor(
    x: Tensor, sigma_values: list[float], i: int, denoised: Tensor, previous_denoised: Tensor | None
) -> Tensor:
    """One DPM-Solver++(2M) step from sigma_values[i] to sigma_values[i + 1].

    Order 2 extrapolates the denoised estimate linearly in λ: D = D_i + (D_i − D_{i−1}) / (2r).
    This is also the UniPC bh2 order-2 predictor, whose single weight is fixed to ½.
    """
    sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
    if _multistep_order(i, len(sigma_values) - 1) == 2:
        ratio = _step_ratio(sigma_values[i - 1], sigma, sigma_next)
        denoised = denoised + (denoised - previous_denoised) / (2.0 * ratio)
    return _first_order_step(x, denoised, sigma, sigma_next)


def _unic_weights(h: float, ratio: float) -> tuple[float, float]:
    """Weights (ρ_history, ρ_new) of the order-2 UniC corrector with B(h) = e^(−h) − 1 (bh2).

    They solve [[1, 1], [−r, 1]]·ρ = [b_1, b_2] with b_k = k!·hh·φ_(k+1)(hh) / B(h), hh = −h, in
    the notation of the UniPC paper (φ_1(z) = (e^z − 1)/z, φ_(k+1)(z) = (φ_k(z) − 1/k!)/z).
    """
    hh = -h  # data prediction integrates towards growing λ, so the paper's h enters negated
    b_of_h = math.expm1(hh)
    phi_2 = b_of_h / hh - 1.0  # hh·φ_2(hh)
    phi_3 = phi_2 / hh - 0.5  # hh·φ_3(hh)
    b_1 = phi_2 / b_of_h
    b_2 = 2.0 * phi_3 / b_of_h
    rho_history = (b_1 - b_2) / (1.0 + ratio)
    return rho_history, b_1 - rho_history


def _unipc_corrector(
    x_before: Tensor,
    sigma_values: list[float],
    i: int,
    new_denoised: Tensor,
    history: list[Tensor],
    order: int,
) -> Tensor:
    """UniC: redo the step sigma_values[i − 1] → sigma_values[i] from `x_before`, now also using
    the denoised estimate at the predicted point (no extra model call).

    history[-1] is D_{i−1}, history[-2] is D_{i−2}; `order` is the order of the predictor that
    produced the point being corrected (order 1 gives the trapezoidal rule ρ = ½).
    """
    sigma_before, sigma = sigma_values[i - 1], sigma_values[i]
    denoised_before = history[-1]
    if order == 1:
        estimate = denoised_before + 0.5 * (new_denoised - denoised_before)
    else:
        ratio = _step_ratio(sigma_values[i - 2], sigma_before, sigma)
        rho_history, rho_new = _unic_weights(_log_snr(sigma) - _log_snr(sigma_before), ratio)
        estimate = (
            denoised_before
            + (rho_history / ratio) * (denoised_before - history[-2])
            + rho_new * (new_denoised - denoised_before)
        )
    return _first_order_step(x_before, estimate, sigma_before, sigma)


@torch.no_grad()
def sample_euler(
    velocity_fn: VelocityFn, x: Tensor, sigmas: Tensor, callback: Callback | None = None
) -> Tensor:
    """First-order flow Euler: x ← x + (σ_next − σ)·v."""
    sigma_values = _check_sigmas(sigmas)
    for i in range(len(sigma_values) - 1):
        sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
        velocity = velocity_fn(x, sigmas[i])
        denoised = _denoised(x, sigma, velocity)
        x = x + (sigma_next - sigma) * velocity
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    velocity_fn: VelocityFn, x: Tensor, sigmas: Tensor, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver++(2M): multistep, second order, data prediction; one model call per step.

    Step for step equal to diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True)` (midpoint form;
    as there with its default final σ = 0, the last step is first order).
    """
    sigma_values = _check_sigmas(sigmas)
    previous_denoised = None
    for i in range(len(sigma_values) - 1):
        denoised = _denoised(x, sigma_values[i], velocity_fn(x, sigmas[i]))
        x = _multistep_predictor(x, sigma_values, i, denoised, previous_denoised)
        previous_denoised = denoised
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
    return x


@torch.no_grad()
def sample_unipc(
    velocity_fn: VelocityFn, x: Tensor, sigmas: Tensor, callback: Callback | None = None
) -> Tensor:
    """UniPC (B(h) = bh2, order 2, data prediction): the DPM-Solver++(2M) predictor followed, once
    the model has been evaluated at the predicted point, by the UniC corrector of that point.

    Step for step equal to diffusers' `UniPCMultistepScheduler(solver_type="bh2", solver_order=2,
    prediction_type="flow_prediction", use_flow_sigmas=True)` with its defaults (corrector on
    every step but the first, lower order on the first and last step). As there, the x passed
    to the callback is the predictor's output; it is corrected at the start of the next step,
    and the last step is not corrected.
    """
    sigma_values = _check_sigmas(sigmas)
    steps = len(sigma_values) - 1
    history: list[Tensor] = []  # denoised estimates of the previous steps, newest last
    x_before = x  # the (corrected) point the last predictor step started from
    for i in range(steps):
        denoised = _denoised(x, sigma_values[i], velocity_fn(x, sigmas[i]))
        if i > 0:
            x = _unipc_corrector(
                x_before, sigma_values, i, denoised, history, _multistep_order(i - 1, steps)
            )
        history = (history + [denoised])[-2:]
        x_before = x
        previous_denoised = history[-2] if len(history) == 2 else None
        x = _multistep_predictor(x, sigma_values, i, denoised, previous_denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
    return x


SampleFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Sampler:
    """A sampler and how its reference implementation feeds the model's timestep."""

    sample: SampleFn  # sample(velocity_fn, x, sigmas, callback=None) -> x at sigmas[-1]
    model_timestep: TimestepRule  # σ (a float64 element of the schedule) -> the DiT's timestep


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(sample_euler, model_timestep_float),  # diffusers' FlowMatchEulerDiscreteScheduler
    "dpm++2m": Sampler(sample_dpmpp_2m, model_timestep_truncated),  # Wan2.1's FlowDPMSolverMultistepScheduler
    "unipc": Sampler(sample_unipc, model_timestep_truncated),  # Wan2.1's and diffusers' UniPC
}


def get_sampler(name: str) -> Sampler:
    """The sampler registered under `name` in SAMPLERS."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names are {sorted(SAMPLERS)}")
    return SAMPLERS[name]
