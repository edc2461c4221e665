"""Flow-matching math, free of models: sigma schedules and shift, samplers, classifier-free
guidance and the training target (Wan2.1 convention x_σ = (1 − σ)·x0 + σ·ε, v = ε − x0)."""

from flows.guidance import guided_velocity
from flows.samplers import (
    SAMPLERS,
    Sampler,
    get_sampler,
    sample_dpmpp_2m,
    sample_euler,
    sample_unipc,
)
from flows.schedules import (
    SIGMA_MAX,
    TRAIN_TIMESTEPS,
    flow_sigmas,
    model_timestep_float,
    model_timestep_truncated,
    shift_sigmas,
)
from flows.training import noisy_sample_and_target, sample_training_sigmas

__all__ = [
    "SAMPLERS",
    "SIGMA_MAX",
    "TRAIN_TIMESTEPS",
    "Sampler",
    "flow_sigmas",
    "get_sampler",
    "guided_velocity",
    "model_timestep_float",
    "model_timestep_truncated",
    "noisy_sample_and_target",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_training_sigmas",
    "sample_unipc",
    "shift_sigmas",
]
