"""Tests of flows/: schedules and samplers against diffusers' schedulers, convergence order on a
Gaussian mixture whose exact velocity is known in closed form, guidance and the training target."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from flows import (
    SAMPLERS,
    flow_sigmas,
    get_sampler,
    guided_velocity,
    model_timestep_float,
    model_timestep_truncated,
    noisy_sample_and_target,
    sample_dpmpp_2m,
    sample_euler,
    sample_training_sigmas,
    sample_unipc,
    shift_sigmas,
)


@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread():
    """The tensors here are tiny; on a loaded 2-core machine torch's intra-op thread pool makes a
    5x5 matmul cost milliseconds instead of microseconds. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (10, 3.0), (50, 5.0), (50, 12.0)])
def test_flow_sigmas_equal_diffusers_dpm_solver_flow_sigmas(steps, shift):
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
    )
    scheduler.set_timesteps(steps)
    sigmas = flow_sigmas(steps, shift)
    assert sigmas.shape == (steps + 1,)
    torch.testing.assert_close(sigmas, scheduler.sigmas.double(), rtol=0, atol=1e-7)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_flow_sigmas_equal_official_wan_unipc_rule():
    # The official Wan2.1 UniPC scheduler: training sigmas 1 - linspace(1, 1/1000, 1000)[::-1]
    # give sigma_max = 0.999 and sigma_min = 0; sampling uses shift(linspace(max, min, N+1)[:-1])
    # followed by a final 0.
    steps, shift = 8, 5.0
    grid = [0.999 * (1 - k / steps) for k in range(steps)]
    expected = [shift * s / (1 + (shift - 1) * s) for s in grid] + [0.0]
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(flow_sigmas(steps, shift), expected)


def test_shift_sigmas_closed_form():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    # shift 5: 5σ / (1 + 4σ)
    expected = torch.tensor([0.0, 1.25 / 2.0, 2.5 / 3.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(sigmas, 5.0), expected)
    torch.testing.assert_close(shift_sigmas(sigmas, 1.0), sigmas)


# ---------------------------------------------------------------------------------------------
# Trajectory parity with diffusers' schedulers


def _test_velocity_fn():
    """A fixed nonlinear velocity field of x and σ (float64)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 5, generator=generator, dtype=torch.float64) / 5**0.5
    bias = torch.randn(5, generator=generator, dtype=torch.float64)

    def velocity_fn(x, sigma):
        sigma = float(sigma)
        return torch.tanh(x @ weight) * (1 + sigma) + sigma**2 * bias - 0.5 * x

    return velocity_fn


def _euler_scheduler(shift):
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def _dpm_scheduler(shift):
    return DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
    )


def _unipc_scheduler(shift):
    return UniPCMultistepScheduler(
        solver_type="bh2", prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
    )


def _diffusers_trajectory(scheduler, velocity_fn, x):
    """Loop over a diffusers scheduler; returns the x after every step and the x0 estimates
    the multistep schedulers keep (None for Euler, which keeps none)."""
    scheduler.set_begin_index(0)
    sigmas = scheduler.sigmas
    xs, denoised = [], []
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity_fn(x, sigmas[i]), timestep, x).prev_sample
        xs.append(x)
        outputs = getattr(scheduler, "model_outputs", None)
        denoised.append(None if outputs is None else outputs[-1])
    return xs, denoised


def _assert_trajectories_match(sampler, scheduler, sigmas, record_property):
    """Records the largest step error relative to the scheduler's state (bench/parity_report.py)."""
    velocity_fn = _test_velocity_fn()
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected_xs, expected_denoised = _diffusers_trajectory(scheduler, velocity_fn, x.clone())

    steps = []
    sampler(velocity_fn, x.clone(), sigmas, callback=steps.append)

    assert [step["i"] for step in steps] == list(range(len(sigmas) - 1))
    previous_x, errors = x, []
    for step, expected_x, expected_x0 in zip(steps, expected_xs, expected_denoised):
        # diffusers computes its coefficients in float32, hence the tolerance
        errors.append(((step["x"] - expected_x).abs().max() / expected_x.abs().max()).item())
        assert errors[-1] <= 1e-5
        assert step["sigma"].item() == sigmas[step["i"]].item()
        if expected_x0 is not None:
            assert (step["denoised"] - expected_x0).abs().max() <= 1e-5 * expected_x0.abs().max()
        else:
            velocity = velocity_fn(previous_x, step["sigma"])
            torch.testing.assert_close(step["denoised"], previous_x - step["sigma"] * velocity)
        previous_x = step["x"]
    record_property("relative_error", max(errors))


CASES = [(1, 1.0), (2, 3.0), (7, 5.0), (30, 3.0), (50, 5.0)]


@pytest.mark.parametrize(
    "sampler, make_scheduler",
    [
        (sample_euler, _euler_scheduler),
        (sample_dpmpp_2m, _dpm_scheduler),
        (sample_unipc, _unipc_scheduler),
    ],
    ids=["euler", "dpm++2m", "unipc"],
)
@pytest.mark.parametrize("steps, shift", CASES, ids=[f"{steps}-steps-shift-{shift:g}" for steps, shift in CASES])
def test_trajectory_matches_diffusers_scheduler(sampler, make_scheduler, steps, shift, record_property):
    """Our sampler, given the scheduler's own sigmas, retraces the scheduler's loop step by step."""
    scheduler = make_scheduler(shift)
    scheduler.set_timesteps(steps)
    _assert_trajectories_match(sampler, scheduler, scheduler.sigmas.double(), record_property)


@pytest.mark.parametrize("steps, shift", [(3, 1.0), (20, 5.0)])
def test_unipc_matches_diffusers_on_the_wan_schedule(steps, shift, record_property):
    # diffusers' UniPC shifts explicit sigmas by its flow_shift: give it ours with flow_shift 1
    sigmas = flow_sigmas(steps, shift)
    scheduler = _unipc_scheduler(1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].numpy())
    torch.testing.assert_close(scheduler.sigmas.double(), sigmas, rtol=0, atol=1e-7)
    _assert_trajectories_match(sample_unipc, scheduler, sigmas, record_property)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_schedule_starting_at_pure_noise_stays_finite(name):
    """A first σ of exactly 1 (Wan's DPM++ schedule) has an infinite log-SNR; the multistep
    weights must take their limits instead of producing NaN."""
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, 11, dtype=torch.float64), 5.0)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = get_sampler(name).sample(_test_velocity_fn(), x, sigmas)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# The model's timestep: what each sampler's reference feeds the DiT


def _model_timesteps(name, sigmas):
    """The timesteps our stage feeds the DiT for each step of the float64 schedule `sigmas`."""
    return torch.stack([get_sampler(name).model_timestep(sigma) for sigma in sigmas[:-1]])


@pytest.mark.parametrize("steps, shift", [(10, 5.0), (50, 5.0), (30, 3.0), (3, 1.0), (50, 12.0)])
def test_unipc_feeds_truncated_integer_timesteps(steps, shift):
    """diffusers' UniPC scheduler hands the model int64(1000·σ) of the float64 schedule, as the
    official Wan2.1 samplers do; given our schedule, it gives exactly our timesteps."""
    sigmas = flow_sigmas(steps, shift)
    scheduler = _unipc_scheduler(1.0)  # explicit sigmas are shifted by flow_shift: 1 keeps ours
    scheduler.set_timesteps(sigmas=sigmas[:-1].numpy())
    assert scheduler.timesteps.dtype == torch.int64
    ours = _model_timesteps("unipc", sigmas)
    assert torch.equal(ours, scheduler.timesteps.double())
    assert not torch.equal(ours, sigmas[:-1] * 1000)  # the schedule has non-integer timesteps


@pytest.mark.parametrize("steps, shift", [(10, 5.0), (3, 1.0), (50, 12.0)])
def test_dpm_solver_feeds_truncated_integer_timesteps(steps, shift):
    """diffusers' DPM-Solver++ scheduler takes no explicit sigmas; its own float64 flow schedule,
    shift(1 − linspace(1, 1/1000)), equals ours to rounding (test_flow_sigmas_equal_diffusers_...),
    and on it the rule gives exactly its int64 timesteps (not on ours: (3, 1.0) has 665 against its 666)."""
    scheduler = _dpm_scheduler(shift)
    scheduler.set_timesteps(steps)
    grid = torch.from_numpy(1.0 - np.linspace(1.0, 1.0 / 1000, steps + 1))  # numpy's linspace, as there
    sigmas = shift_sigmas(grid, shift).flip(0)
    assert scheduler.timesteps.dtype == torch.int64
    assert torch.equal(_model_timesteps("dpm++2m", sigmas), scheduler.timesteps.double())


def test_truncated_timesteps_of_diffusers_unipc_own_schedule():
    """diffusers' UniPCMultistepScheduler(flow_shift=5).set_timesteps(10) gives 999, 978, 952, ...:
    the rule applied to the float64 schedule it builds (linspace(1, 1/1000), shifted, first σ less 1e-6)."""
    scheduler = _unipc_scheduler(5.0)
    scheduler.set_timesteps(10)
    grid = torch.from_numpy(np.linspace(1.0, 1.0 / 1000, 11))[:-1]
    sigmas = shift_sigmas(grid, 5.0)
    sigmas[0] -= 1e-6
    assert scheduler.timesteps[:3].tolist() == [999, 978, 952]
    assert torch.equal(torch.stack([model_timestep_truncated(sigma) for sigma in sigmas]), scheduler.timesteps.double())


def test_euler_feeds_float_timesteps_like_diffusers_flow_match_euler():
    sigmas = flow_sigmas(10, 3.0)
    scheduler = _euler_scheduler(1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].float().numpy())
    # diffusers forms 1000·σ in float32 from float32 sigmas; we form it in float64 from the float64 schedule
    torch.testing.assert_close(_model_timesteps("euler", sigmas).float(), scheduler.timesteps, rtol=1e-6, atol=0)
    assert not torch.equal(_model_timesteps("euler", sigmas), _model_timesteps("unipc", sigmas))


def test_truncation_uses_the_float64_product():
    # σ_1 of 3 unshifted steps is 0.999·2/3 = 0.66599999...: the float64 product truncates to 665,
    # as diffusers has it (the (3, 1.0) case above), the float32 one rounds up to 666
    sigma = flow_sigmas(3, 1.0)[1]
    assert model_timestep_truncated(sigma).item() == 665.0
    assert model_timestep_truncated(sigma.float()).item() == 666.0
    assert model_timestep_float(sigma).item() == pytest.approx(666.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Convergence order on a Gaussian mixture with exact velocity


MIXTURE_MEANS = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
MIXTURE_LOG_WEIGHTS = torch.log(torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64))
MIXTURE_STD = 0.5


def mixture_velocity(x, sigma):
    """Exact v(x, σ) = E[ε − x0 | x_σ = x] for x0 ~ Σ_k w_k N(μ_k, s² I), ε ~ N(0, I).

    Per component x_σ ~ N((1 − σ)μ_k, τ² I) with τ² = (1 − σ)² s² + σ²; Gaussian conditioning
    gives, with c = x − (1 − σ)μ_k, E[ε | x, k] = σ/τ²·c and E[x0 | x, k] = μ_k + (1 − σ)s²/τ²·c,
    and the responsibilities follow from Bayes (τ is shared, so only the distances matter).
    """
    sigma = float(sigma)
    alpha = 1.0 - sigma
    variance = alpha**2 * MIXTURE_STD**2 + sigma**2
    centered = x[:, None, :] - alpha * MIXTURE_MEANS  # (B, K, d)
    responsibilities = torch.softmax(
        MIXTURE_LOG_WEIGHTS - (centered**2).sum(-1) / (2 * variance), dim=-1
    )  # (B, K)
    per_component = (sigma - alpha * MIXTURE_STD**2) / variance * centered - MIXTURE_MEANS
    return (responsibilities[..., None] * per_component).sum(1)  # (B, d)


def rk4_reference(x, grid):
    """Classical 4th-order Runge-Kutta along a fine σ grid, for the reference solution."""
    for sigma, sigma_next in zip(grid, grid[1:]):
        h = sigma_next - sigma
        k1 = mixture_velocity(x, sigma)
        k2 = mixture_velocity(x + 0.5 * h * k1, sigma + 0.5 * h)
        k3 = mixture_velocity(x + 0.5 * h * k2, sigma + 0.5 * h)
        k4 = mixture_velocity(x + h * k3, sigma_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _shifted_grid(start, end, steps, shift):
    return shift_sigmas(torch.linspace(start, end, steps + 1, dtype=torch.float64), shift)


CONVERGENCE_NOISE = torch.randn(
    64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64
)  # (B, d) starting points at σ = shift(0.999)


@functools.lru_cache(maxsize=None)
def _reference_solution(shift, end):
    """The ODE solution from shift(0.999) to shift(end) by RK4 with 400 steps (it differs from
    800 steps by ~1e-11, far below the solvers' errors measured here, >= 1e-6)."""
    return rk4_reference(CONVERGENCE_NOISE, _shifted_grid(0.999, end, 400, shift).tolist())


def _measured_orders(sampler, sigmas_for_steps, reference, step_counts):
    """log2(error(N) / error(2N)), error = RMS distance to the reference solution."""
    errors = []
    for steps in step_counts:
        out = sampler(mixture_velocity, CONVERGENCE_NOISE.clone(), sigmas_for_steps(steps))
        errors.append(((out - reference) ** 2).mean().sqrt().item())
    return [math.log2(coarse / fine) for coarse, fine in zip(errors, errors[1:])]


@pytest.mark.parametrize("shift", [1.0, 5.0])
@pytest.mark.parametrize(
    "sampler, min_order",
    [(sample_euler, 0.9), (sample_dpmpp_2m, 1.8), (sample_unipc, 1.8)],
    ids=["euler", "dpm++2m", "unipc"],
)
def test_convergence_order_away_from_data(sampler, min_order, shift, record_property):
    """From shift(0.999) down to shift(0.2) every solver shows its order. Measured log2 error
    ratios for N = 32 -> 64 -> 128: euler 1.00, 1.00 without shift and 0.99, 1.00 with shift 5;
    dpm++2m 1.99, 1.95 / 1.88, 1.94; unipc 1.98, 1.98 / 1.89, 1.95."""
    orders = _measured_orders(
        sampler,
        lambda steps: _shifted_grid(0.999, 0.2, steps, shift),
        _reference_solution(shift, 0.2),
        step_counts=[32, 64, 128],
    )
    record_property("orders", " ".join(f"{order:.2f}" for order in orders))
    assert min(orders) >= min_order, orders


@pytest.mark.parametrize(
    "sampler, min_order",
    [(sample_euler, 0.9), (sample_dpmpp_2m, 1.5), (sample_unipc, 1.8)],
    ids=["euler", "dpm++2m", "unipc"],
)
def test_convergence_order_of_the_full_schedule(sampler, min_order, record_property):
    """The full schedule down to σ = 0 (flow_sigmas, no shift). Measured log2 error ratios for
    N = 32 -> 64 -> 128 (-> 256 -> 512, not run here): euler 0.99, 0.99 (1.00, 1.00);
    unipc 2.03, 2.07 (2.07, 2.05); dpm++2m only 1.55, 1.69 (1.76, 1.79).

    DPM-Solver++(2M)'s error here is O(log N / N²), not O(1/N²): a schedule linear in σ near 0
    makes the last few λ-steps O(1) long whatever N is (λ_k ≈ log(N/k)), and each of those
    second-order steps adds an error of order σ_k²·h_k³ ≈ 1/(k N²); summed that is log N / N²
    (N²·error grows linearly in log N in the measurements). The final first-order step is not
    the cause: it lands on the denoised estimate, an O(σ_(N−1)²) error. UniPC's corrector
    removes the log term. With shift 5 the steps near σ = 0 are 5x longer and up to N = 256 the
    ratios still wander (dpm++2m 1.70, 1.39, 1.40; unipc 2.46, 1.84, 1.60 for 32 -> 256; unipc
    settles at ~2 by N ~ 1000), so only the unshifted schedule is asserted here.
    """
    orders = _measured_orders(
        sampler,
        lambda steps: flow_sigmas(steps, 1.0),
        _reference_solution(1.0, 0.0),
        step_counts=[32, 64, 128],
    )
    record_property("orders", " ".join(f"{order:.2f}" for order in orders))
    assert min(orders) >= min_order, orders


# ---------------------------------------------------------------------------------------------
# Guidance


class RecordingVelocity:
    """A conditional velocity model that records the batch sizes it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, condition):
        self.calls.append((x.shape[0], condition.clone()))
        return torch.sin(x) * condition.mean(dim=(1, 2)).view(-1, 1, 1) + sigma * x


def test_guidance_combines_cond_and_uncond_in_one_batched_call():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, generator=generator)
    condition = torch.randn(2, 6, 8, generator=generator)
    uncondition = torch.randn(2, 6, 8, generator=generator)
    sigma = torch.tensor(0.7)
    scale = 5.0

    model = RecordingVelocity()
    guided = guided_velocity(model, condition, uncondition, scale)(x, sigma)

    assert len(model.calls) == 1 and model.calls[0][0] == 4
    reference_model = RecordingVelocity()
    v_cond = reference_model(x, sigma, condition)
    v_uncond = reference_model(x, sigma, uncondition)
    torch.testing.assert_close(guided, v_uncond + scale * (v_cond - v_uncond))


def test_guidance_scale_one_skips_the_unconditional_pass():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, generator=generator)
    condition = torch.randn(2, 6, 8, generator=generator)
    uncondition = torch.randn(2, 6, 8, generator=generator)
    sigma = torch.tensor(0.3)

    model = RecordingVelocity()
    out = guided_velocity(model, condition, uncondition, 1.0)(x, sigma)

    assert len(model.calls) == 1 and model.calls[0][0] == 2
    torch.testing.assert_close(model.calls[0][1], condition)
    torch.testing.assert_close(out, RecordingVelocity()(x, sigma, condition))


# ---------------------------------------------------------------------------------------------
# Training target


def test_noisy_sample_and_target_closed_form():
    generator = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 2, 4, 5, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 5, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)

    x_sigma, target = noisy_sample_and_target(x0, noise, sigma)

    for b, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(x_sigma[b], (1 - s) * x0[b] + s * noise[b])
    torch.testing.assert_close(target, noise - x0)
    # the target is the derivative of x_σ along σ, and the samplers' x0 = x − σ·v recovers x0
    delta = 1e-6
    x_later, _ = noisy_sample_and_target(x0, noise, sigma + delta)
    torch.testing.assert_close((x_later - x_sigma) / delta, target, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_sigma - sigma.view(-1, 1, 1, 1) * target, x0)


def test_training_sigmas_follow_the_shifted_uniform_distribution():
    shift = 3.0
    sigmas = sample_training_sigmas(20000, shift, generator=torch.Generator().manual_seed(7))
    assert sigmas.shape == (20000,) and sigmas.dtype == torch.float32
    assert bool(((sigmas >= 0) & (sigmas < 1)).all())
    # P(σ' <= y) = P(u <= y / (shift − (shift − 1)·y)) for u uniform: Kolmogorov–Smirnov distance
    ordered = sigmas.double().sort().values
    cdf = ordered / (shift - (shift - 1) * ordered)
    empirical = torch.arange(1, len(ordered) + 1, dtype=torch.float64) / len(ordered)
    assert (empirical - cdf).abs().max().item() < 0.015
    again = sample_training_sigmas(20000, shift, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, sigmas, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Registry and argument errors


def test_registry():
    assert {name: sampler.sample for name, sampler in SAMPLERS.items()} == {
        "euler": sample_euler, "dpm++2m": sample_dpmpp_2m, "unipc": sample_unipc
    }
    assert get_sampler("unipc") is SAMPLERS["unipc"]
    with pytest.raises(ValueError, match=r"'heun'.*\['dpm\+\+2m', 'euler', 'unipc'\]"):
        get_sampler("heun")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: flow_sigmas(0, 5.0), "steps .* got 0"),
        (lambda: flow_sigmas(2.5, 5.0), "steps .* got 2.5"),
        (lambda: flow_sigmas(10, 0.0), "shift .* got 0.0"),
        (lambda: flow_sigmas(10, -2.0), "shift .* got -2.0"),
        (lambda: shift_sigmas(torch.ones(3), float("nan")), "shift .* got nan"),
        (lambda: sample_training_sigmas(0, 1.0), "batch .* got 0"),
        (lambda: sample_training_sigmas(4, -1.0), "shift .* got -1.0"),
    ],
)
def test_bad_schedule_arguments_name_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize(
    "sigmas, message",
    [
        (torch.tensor([1.0]), r"at least 2 .* \(1,\)"),
        (torch.ones(2, 3), r"1-D .* \(2, 3\)"),
        (
            torch.tensor([0.5, 0.75, 0.0]),
            r"strictly decreasing.*sigmas\[0\] = 0.5.*sigmas\[1\] = 0.75",
        ),
        (torch.tensor([1.5, 0.5, 0.0]), r"\[0, 1\].*sigmas\[0\] = 1.5"),
    ],
)
def test_bad_sigmas_name_the_value(name, sigmas, message):
    with pytest.raises(ValueError, match=message):
        get_sampler(name).sample(lambda x, sigma: x, torch.zeros(1, 2), sigmas)


def test_bad_guidance_and_training_arguments_name_the_value():
    model = RecordingVelocity()
    with pytest.raises(ValueError, match=r"\(2, 6, 8\) and \(2, 5, 8\)"):
        guided_velocity(model, torch.zeros(2, 6, 8), torch.zeros(2, 5, 8), 5.0)
    with pytest.raises(ValueError, match="got nan"):
        guided_velocity(model, torch.zeros(2, 6, 8), torch.zeros(2, 6, 8), float("nan"))
    with pytest.raises(ValueError, match=r"batch size 3 .* 2"):
        guided_velocity(model, torch.zeros(2, 6, 8), torch.zeros(2, 6, 8), 5.0)(
            torch.zeros(3, 4), torch.tensor(0.5)
        )
    with pytest.raises(ValueError, match=r"sigma must have shape \(2,\).* \(2, 1\)"):
        noisy_sample_and_target(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"noise must have .*\(2, 3\).* \(2, 4\)"):
        noisy_sample_and_target(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))
