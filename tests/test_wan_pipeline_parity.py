"""The base stage's sampling end to end against diffusers' WanPipeline (the independent reference):
the same random Wan-architecture weights, prompt embeddings, initial noise and sigma schedule give
the same final latents, for the UniPC and the flow-matching Euler schedulers, with and without
guidance. The pipeline steps its scheduler as diffusers does (UniPC feeding the transformer int64
timesteps, Euler float ones); the stage feeds what `flows.SAMPLERS` declares for each sampler."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
)

import flows.samplers
from flows import flow_sigmas, model_timestep_float
from stages.base.dit import WanDiTConfig
from stages.base.stage import BaseStage, BaseStageConfig
from tests.test_dit import random_diffusers_model, relative_error

PARITY_TOLERANCE = 1e-4  # max |ours − diffusers| / max |diffusers| of the final latents, float32
SHIFT = 5.0
TEXT_LEN = 16  # the pipeline passes prompt_embeds as given; our DiT takes them at its text_len
SIZES = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=64, text_dim=24,
             freq_dim=32, eps=1e-6, patch_size=(1, 2, 2))
DIT = WanDiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=24, text_len=TEXT_LEN, freq_dim=32, eps=1e-6)
LATENT_SHAPE = (1, 16, 3, 8, 12)  # 9 frames of 64x96: 3 x 4 x 6 tokens after the patch
SCHEDULERS = {
    "unipc": lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0),
    "euler": lambda: FlowMatchEulerDiscreteScheduler(shift=1.0),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random diffusers Wan transformer, saved in the diffusers layout; the object itself."""
    reference = random_diffusers_model(seed=3, **SIZES)
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    reference.save_pretrained(folder)
    return folder, reference


@pytest.fixture(scope="module")
def inputs():
    """Prompt and negative prompt embeddings (zero past their tokens) and the initial noise."""
    generator = torch.Generator().manual_seed(4)
    condition, uncondition = torch.zeros(2, 1, TEXT_LEN, SIZES["text_dim"])
    condition[:, :5] = torch.randn(1, 5, SIZES["text_dim"], generator=generator)
    uncondition[:, :3] = torch.randn(1, 3, SIZES["text_dim"], generator=generator)
    return condition, uncondition, torch.randn(LATENT_SHAPE, generator=generator)


def on_our_schedule(scheduler, sigmas: torch.Tensor):
    """The scheduler with `set_timesteps(steps)`, as WanPipeline calls it, set to our schedule
    (both schedulers shift explicit sigmas by their shift, here 1)."""
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda steps, device=None: set_timesteps(sigmas=sigmas[:-1].numpy(), device=device)
    return scheduler


def diffusers_latents(reference, sampler: str, steps: int, guidance: float, inputs) -> torch.Tensor:
    condition, uncondition, noise = inputs
    scheduler = on_our_schedule(SCHEDULERS[sampler](), flow_sigmas(steps, SHIFT))
    pipeline = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=reference)
    pipeline.set_progress_bar_config(disable=True)
    _, _, frames, height, width = LATENT_SHAPE
    with torch.no_grad():
        return pipeline(
            prompt_embeds=condition, negative_prompt_embeds=uncondition, height=height * 8, width=width * 8,
            num_frames=4 * (frames - 1) + 1, num_inference_steps=steps, guidance_scale=guidance,
            latents=noise.clone(), output_type="latent", return_dict=False,
        )[0]


def our_latents(folder, sampler: str, steps: int, guidance: float, inputs) -> tuple[torch.Tensor, dict]:
    condition, uncondition, noise = inputs
    config = BaseStageConfig(dit=dataclasses.replace(DIT), dit_weights=str(folder), sampler=sampler, steps=steps,
                             shift=SHIFT, guidance_scale=guidance)
    notes = {}
    return BaseStage(config).denoise(noise.clone(), condition, uncondition, notes), notes


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-guidance", "guidance-5"])
@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_base_stage_matches_wan_pipeline(checkpoint, inputs, sampler, steps, guidance, record_property):
    folder, reference = checkpoint
    expected = diffusers_latents(reference, sampler, steps, guidance, inputs)
    ours, notes = our_latents(folder, sampler, steps, guidance, inputs)
    error = relative_error(ours, expected)
    record_property("relative_error", error)  # collected by bench/parity_report.py
    assert error < PARITY_TOLERANCE
    assert notes == {"steps": steps, "model_calls": steps}
    assert relative_error(ours, inputs[2]) > 0.1  # sampling moved far from the noise


def test_float_timesteps_would_miss_the_pipeline(checkpoint, inputs, monkeypatch, record_property):
    """The tolerance sees the timestep rule: UniPC fed float 1000·σ drifts from the pipeline."""
    folder, reference = checkpoint
    expected = diffusers_latents(reference, "unipc", 10, 5.0, inputs)
    monkeypatch.setitem(flows.samplers.SAMPLERS, "unipc",
                        flows.samplers.Sampler(flows.samplers.sample_unipc, model_timestep_float))
    ours, _ = our_latents(folder, "unipc", 10, 5.0, inputs)
    error = relative_error(ours, expected)
    record_property("relative_error", error)
    assert error > 10 * PARITY_TOLERANCE
