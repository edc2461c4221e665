"""TeaCache (stages/base/teacache.py) against its definition: which steps run the blocks follows the
published TeaCache4Wan2.1 rule (written out here as its loop, with its separate accumulators for
the conditional and unconditional branch), a skipped step is the head applied to the step's tokens
plus the residual of the last full pass, a cache that never skips changes no bit, the polynomial
fit recovers a known polynomial, the split stage skips the same steps as one rank, and bad
settings are named."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from cascade.config import load_config
from cascade.errors import ConfigError
from flows import flow_sigmas, get_sampler
from stages.base.dit import timestep_embedding
from stages.base.stage import BaseStage
from stages.base.teacache import TeaCache, TeaCacheConfig, fit_coefficients
from tests.conftest import FAST
from tests.test_parallel import SMALL_DIT, random_dit

STEPS = 12


def small_stage(sampler: str = "unipc", guidance: float = 5.0, compile: bool = False, **teacache) -> BaseStage:
    """The base stage with a random SMALL_DIT (every parameter random) and TeaCache set as given."""
    config = load_config(None, [f"stages.base.steps={STEPS}", f"stages.base.sampler={sampler}",
                                f"stages.base.guidance_scale={guidance}", "stages.base.shift=5"]).stages.base
    config = dataclasses.replace(config, dit=SMALL_DIT, dit_weights="", teacache=TeaCacheConfig(**teacache),
                                 compile=compile)
    stage = BaseStage(config)
    stage.dit.load_state_dict(random_dit().state_dict())
    return stage


def sampling_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The noise (1, 16, 2, 8, 8) and two random texts (1, text_len, text_dim) standing for the
    prompt and the negative prompt."""
    generator = torch.Generator().manual_seed(5)
    text = torch.randn(2, 1, SMALL_DIT.text_len, SMALL_DIT.text_dim, generator=generator)
    return torch.randn(1, 16, 2, 8, 8, generator=generator), text[0], text[1]


def denoise(stage: BaseStage) -> tuple[torch.Tensor, dict, list[int]]:
    """Final latents, the notes, and the steps whose DiT call ran the blocks."""
    calls, full_steps = [], []
    hooks = [stage.dit.register_forward_pre_hook(lambda module, inputs: calls.append(len(calls))),
             stage.dit.blocks[0].register_forward_pre_hook(lambda module, inputs: full_steps.append(calls[-1]))]
    notes = {}
    latents = stage.denoise(*sampling_inputs(), notes)
    for hook in hooks:
        hook.remove()
    assert len(calls) == STEPS  # one DiT call per step: the guidance pair is one call
    return latents, notes, full_steps


def published_full_steps(stage: BaseStage, config: TeaCacheConfig) -> list[int]:
    """The steps TeaCache4Wan2.1's loop computes in full: per branch (conditional, unconditional) an
    accumulator of poly1d(coefficients)(relative L1 change of e0), reset on a computed step; a step
    is computed while its index is below the retention steps, or when the sum reaches the threshold.
    Here also the last step is always computed. e0 = time_projection(time_embedding(sin(t))), from
    the sampler's timesteps."""
    sampler, sigmas = get_sampler(stage.config.sampler), flow_sigmas(STEPS, stage.config.shift)
    rescale = np.poly1d(config.coefficients)
    dit = stage.dit
    accumulated, previous, computed = {"cond": 0.0, "uncond": 0.0}, {}, {"cond": [], "uncond": []}
    for step, sigma in enumerate(sigmas[:-1]):
        timestep = sampler.model_timestep(sigma).float().reshape(1)
        with torch.no_grad():
            e0 = dit.time_projection(dit.time_embedding(timestep_embedding(timestep, SMALL_DIT.freq_dim)))
        for branch in ("cond", "uncond"):
            if step < config.warmup_steps or step == STEPS - 1:
                calculate, accumulated[branch] = True, 0.0
            else:
                change = ((e0 - previous[branch]).abs().mean() / previous[branch].abs().mean()).item()
                accumulated[branch] += rescale(change)
                calculate = accumulated[branch] >= config.threshold
                if calculate:
                    accumulated[branch] = 0.0
            previous[branch] = e0
            if calculate:
                computed[branch].append(step)
    assert computed["cond"] == computed["uncond"]  # e0 depends on the timestep only
    return computed["cond"]


# The random SMALL_DIT's time modulation changes by 0.26 to 0.52 from step to step (12 steps, shift
# 5); Wan2.1-1.3B's polynomial is fitted for changes below about 0.2 and negative above, so these
# tests rescale by the identity and by a quadratic instead.
IDENTITY, QUADRATIC = [1.0, 0.0], [3.0, -0.5, 0.0]


@pytest.mark.parametrize("coefficients, threshold, warmup_steps, skips", [
    (IDENTITY, 0.2, 1, False),  # every change is above the threshold
    (IDENTITY, 0.6, 2, True),
    (QUADRATIC, 0.8, 3, True),
    (IDENTITY, 1e9, 4, True),  # warm-up and the last step only
], ids=["never", "identity", "quadratic", "warm-up-only"])
@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_skipped_steps_follow_the_published_rule(sampler, coefficients, threshold, warmup_steps, skips):
    teacache = dict(threshold=threshold, coefficients=coefficients, warmup_steps=warmup_steps)
    stage = small_stage(sampler, **teacache)
    _, notes, full_steps = denoise(stage)
    expected = published_full_steps(stage, TeaCacheConfig(**teacache))
    assert full_steps == expected
    assert notes == {"steps": STEPS, "model_calls": len(expected)}
    assert (len(full_steps) < STEPS) == skips
    if threshold == 1e9:
        assert full_steps == [0, 1, 2, 3, STEPS - 1]


class AddResidual(nn.Module):
    """Stands in for the DiT's blocks: adds a fixed residual to the tokens."""

    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.residual = residual

    def forward(self, x, time_modulation, context, rope, self_attention):
        return x + self.residual


def test_a_skipped_step_is_the_head_of_tokens_plus_the_last_residual():
    dit = random_dit()
    generator = torch.Generator().manual_seed(6)
    latents = torch.randn(2, 16, 2, 8, 8, generator=generator)
    text = torch.randn(2, SMALL_DIT.text_len, SMALL_DIT.text_dim, generator=generator)
    captured = {}
    hooks = [dit.blocks[0].register_forward_pre_hook(lambda module, inputs: captured.update(start=inputs[0])),
             dit.blocks[-1].register_forward_hook(lambda module, inputs, output: captured.update(end=output))]
    cache = TeaCache(TeaCacheConfig(threshold=1e9, coefficients=[1.0], warmup_steps=1), steps=3)
    with torch.no_grad():
        dit(latents, torch.tensor([900.0, 900.0]), text, cache=cache)  # warm-up: runs the blocks
        residual = captured["end"] - captured["start"]
        captured.clear()
        skipped = dit(latents * 0.9, torch.tensor([850.0, 850.0]), text, cache=cache)
        assert captured == {}  # no block ran
        for hook in hooks:
            hook.remove()
        dit.blocks = nn.ModuleList([AddResidual(residual)])
        expected = dit(latents * 0.9, torch.tensor([850.0, 850.0]), text)
    torch.testing.assert_close(skipped, expected, rtol=0, atol=0)
    assert cache.full_passes == 1


def test_a_cache_that_never_skips_changes_nothing():
    """Coefficients [1, 0] make the rescaled change the change itself, always above 1e-9."""
    cached, notes, full_steps = denoise(small_stage(threshold=1e-9, coefficients=[1.0, 0.0]))
    plain, plain_notes, _ = denoise(small_stage(threshold=0.0))
    assert torch.equal(cached, plain)
    assert full_steps == list(range(STEPS)) and notes == plain_notes == {"steps": STEPS, "model_calls": STEPS}


def test_skipping_stays_close_and_without_guidance():
    """With guidance off the batch is one branch; the schedule of skips is the same (it depends on
    the timesteps alone) and the result stays near the uncached one."""
    teacache = dict(threshold=0.6, coefficients=IDENTITY, warmup_steps=2)
    guided_notes = denoise(small_stage(**teacache))[1]
    cached, notes, _ = denoise(small_stage(guidance=1.0, **teacache))
    plain = denoise(small_stage(guidance=1.0))[0]
    assert notes == guided_notes and notes["model_calls"] < STEPS
    assert ((cached - plain).abs().max() / plain.abs().max()).item() < 0.5


def test_compiled_blocks_sample_the_eager_clip():
    """stages.base.compile: torch.compile'd blocks give the eager stage's clip and skip the same steps."""
    teacache = dict(threshold=0.6, coefficients=IDENTITY, warmup_steps=2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    notes = {}
    compiled = small_stage(compile=True, **teacache).denoise(*sampling_inputs(), notes)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the blocks were compiled
    eager, eager_notes, _ = denoise(small_stage(**teacache))
    assert notes == eager_notes and notes["model_calls"] < STEPS
    assert ((compiled - eager).abs().max() / eager.abs().max()).item() < 1e-5


def test_fit_recovers_a_known_polynomial():
    changes = np.linspace(0.01, 0.4, 50)
    coefficients = [30.0, -20.0, 5.0, 0.4, -0.001]
    fitted = fit_coefficients(list(changes), list(np.polyval(coefficients, changes)))
    np.testing.assert_allclose(fitted, coefficients, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="more than 4 pairs"):
        fit_coefficients([0.1, 0.2], [0.1, 0.2])


def test_split_stage_skips_the_same_steps_as_one_rank(ray_cluster):
    """Ulysses 2 x CFG 2 ranks with TeaCache on give the one-rank latents and model calls."""
    import ray

    from cascade.actors import StageWorker, build_stage
    from cascade.groups import join_groups, start_group, stop_group
    from cascade.payload import Request

    # the identity rescaling and threshold 0.4 skip steps 2, 3, 5 and 6 of the tiny DiT
    cache = ["stages.base.steps=8", "stages.base.teacache.threshold=0.4", "stages.base.teacache.coefficients=[1,0]",
             "stages.base.teacache.warmup_steps=2"]
    config = load_config(None, FAST + cache + ["stages.base.parallel.ulysses=2", "stages.base.parallel.cfg=2"])
    video = config.video
    request = Request("a red circle moving to the right", "", 3, video.height, video.width, video.num_frames, video.fps)
    expected = build_stage("base", load_config(None, FAST + cache).stages.base, "cpu")(None, request)
    section = config.stages.base
    group = start_group(StageWorker, section.resources, section.parallel, "base", section, config.output)
    try:
        join_groups({"base": group})
        output, _ = group.leader.run.remote(None, request)
        latents = ray.get(output)
    finally:
        stop_group(group)
    assert 3 < expected.notes["model_calls"] < 8 and latents.notes == expected.notes
    reference = expected.numpy()
    assert np.abs(latents.data - reference).max() / np.abs(reference).max() < 1e-4


@pytest.mark.parametrize("override, message", [
    ("stages.base.teacache.threshold=-0.1", "stages.base.teacache.threshold=-0.1 is not valid: a number ≥ 0"),
    ("stages.base.teacache.warmup_steps=0", "stages.base.teacache.warmup_steps=0 is not valid: an integer ≥ 1"),
    ("stages.base.teacache.coefficients=[]", "stages.base.teacache.coefficients=[] is not valid: at least one"),
    ("stages.base.teacache.coefficients=[1,.inf]", "coefficients=[1.0, inf] is not valid"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, ["stages.base.teacache.threshold=0.1", override])
