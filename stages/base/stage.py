"""The base stage: prompt -> text embeddings -> DiT denoised by a flow-matching sampler with
classifier-free guidance -> latents `(1, 16, 1 + (T−1)/4, H/8, W/8)`.

The stage only wires the models to the sampling math in flows/; it knows nothing of Ray. Given a
`DiTParallel` (stages/parallel.py), every rank of the group runs the same call: the leader alone
holds the text encoder and broadcasts the prompt embeddings, every rank draws the same noise from the
seed and runs the same sampler, and each DiT call is split over the group, which returns the whole
velocity to every rank. The leader returns the clip, the other ranks None. With TeaCache on
(`teacache.threshold` > 0) every rank skips the same steps (stages/base/teacache.py).

With windows on (`window.latent_frames` > 0) a clip longer than a window is denoised as overlapping
windows whose velocities are blended at every step (flows/windows.py); each window is its own DiT
call, with its own TeaCache. With `window.overview` one more window sees frames spread over the whole
clip, at their places in it as the DiT's rotary positions.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cascade.payload import Clip, Request
from flows import flow_sigmas, get_sampler, guided_velocity
from flows.windows import WindowConfig, overview_frames, window_spans, windowed_velocity
from stages.base.dit import WAN_DIT_SIZES, WanDiT, WanDiTConfig
from stages.base.teacache import TeaCache, TeaCacheConfig
from stages.base.text_encoder import TEXT_ENCODER_SIZES, TextEncoder, TextEncoderConfig
from stages.compiling import require_compiler
from stages.parallel import DiTParallel
from stages.weights import dtype_from_name, load_or_init

TIME_COMPRESSION, SPACE_COMPRESSION = 4, 8  # Wan VAE: 1 + 4k frames -> 1 + k latent frames, 8× space


@dataclass
class BaseStageConfig:
    text_encoder: TextEncoderConfig = field(default_factory=lambda: dataclasses.replace(TEXT_ENCODER_SIZES["tiny"]))
    dit: WanDiTConfig = field(default_factory=lambda: dataclasses.replace(WAN_DIT_SIZES["tiny"]))
    text_encoder_weights: str = ""  # empty: random weights (with a warning)
    dit_weights: str = ""
    sampler: str = "euler"  # euler, dpm++2m or unipc
    steps: int = 20
    shift: float = 5.0
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    dtype: str = "float32"
    offload_text_encoder: bool = True  # keep the text encoder on the CPU except while encoding
    teacache: TeaCacheConfig = field(default_factory=TeaCacheConfig)  # off unless its threshold is above 0
    window: WindowConfig = field(default_factory=WindowConfig)  # off unless latent_frames is above 0
    # torch.compile each DiT block (WanDiT.compile_blocks): faster steps once the first call at each
    # new latent shape has compiled (seconds); on a CPU it needs a C++ compiler
    compile: bool = False


class BaseStage:
    def __init__(self, config: BaseStageConfig, device: str = "cpu", parallel: Optional[DiTParallel] = None):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype_from_name(config.dtype)
        self.parallel = parallel
        self.is_leader = parallel is None or parallel.world.is_leader
        self.warnings: list[str] = []
        self.text_encoder = None  # only the leader encodes prompts
        if self.is_leader:
            self.text_encoder = load_or_init(
                config.text_encoder_weights,
                lambda path: TextEncoder.from_pretrained(path, config.text_encoder, dtype=self.dtype),
                lambda: TextEncoder(config.text_encoder).to(self.dtype),
                "the text encoder", "stages.base.text_encoder_weights", self.warnings,
            ).eval()
            self.text_encoder.to("cpu" if config.offload_text_encoder else self.device)
        self.dit = load_or_init(
            config.dit_weights,
            lambda path: WanDiT.from_pretrained(path, config.dit, dtype=self.dtype),
            lambda: WanDiT(config.dit).to(self.dtype),
            "the DiT", "stages.base.dit_weights", self.warnings,
        ).eval().to(self.device)
        if config.compile:
            require_compiler(self.device, "stages.base.compile")
            self.dit.compile_blocks()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), text_len, text_dim), zero past each prompt's tokens."""
        if self.config.offload_text_encoder:
            self.text_encoder.to(self.device)
        embeddings, _ = self.text_encoder.encode(prompts)
        if self.config.offload_text_encoder:
            self.text_encoder.to("cpu")
        return embeddings.to(self.device, self.dtype)

    def latent_shape(self, request: Request) -> tuple[int, ...]:
        return (
            1,
            self.config.dit.in_dim,
            1 + (request.num_frames - 1) // TIME_COMPRESSION,
            request.height // SPACE_COMPRESSION,
            request.width // SPACE_COMPRESSION,
        )

    def prompt_embeddings(self, request: Request, notes: dict) -> torch.Tensor:
        """(2, text_len, text_dim): the prompt's and the negative prompt's embeddings, encoded by the
        leader and broadcast to the group."""
        embeddings = None
        if self.is_leader:
            limit = self.config.text_encoder.text_len
            tokens = self.text_encoder.token_count(request.prompt)
            if tokens > limit:
                notes["prompt_truncated"] = f"prompt has {tokens} tokens, the text encoder takes {limit}: truncated"
            embeddings = self.encode_prompts([request.prompt, request.negative_prompt])
        if self.parallel is not None:
            dit = self.config.dit
            embeddings = self.parallel.broadcast(embeddings, (2, dit.text_len, dit.text_dim), self.dtype)
        return embeddings

    @torch.no_grad()
    def __call__(
        self, clip: Optional[Clip], request: Request, progress: Optional[Callable[[int, int], None]] = None
    ) -> Optional[Clip]:
        notes = {}
        condition, uncondition = self.prompt_embeddings(request, notes).chunk(2)
        generator = torch.Generator().manual_seed(request.seed)  # CPU noise: the same on any device
        noise = torch.randn(self.latent_shape(request), generator=generator).to(self.device)
        latents = self.denoise(noise, condition, uncondition, notes, progress)  # (1, 16, T', h, w)
        if not self.is_leader:
            return None
        return Clip(latents.float(), "latent", request.fps, request, notes)

    @torch.no_grad()
    def denoise(
        self, noise: torch.Tensor, condition: torch.Tensor, uncondition: torch.Tensor, notes: dict,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Runs the sampler from `noise` (B, 16, T', h, w) at the schedule's first σ to the latents at
        σ = 0, with guidance between `condition` and `uncondition` (B, text_len, text_dim). Records in
        `notes` the sampler's `steps` and the `model_calls`: DiT passes that ran the blocks (a guidance
        pair counting one, each window counting one; fewer than steps × windows with TeaCache), and
        with windows on, the `windows` as [start, stop) latent frames and any `overview` frames."""
        config = self.config
        sampler = get_sampler(config.sampler)
        # float64 on the CPU: the solver steps on these σ, and the timestep rule truncates them as the
        # reference samplers do (from float64)
        sigmas = flow_sigmas(config.steps, config.shift)
        frames = noise.shape[2]
        window = config.window
        spans = window_spans(frames, window.latent_frames, window.overlap) if window.enabled else [(0, frames)]
        overview = overview_frames(frames, window.latent_frames) if window.overview and len(spans) > 1 else []
        positions = [None] * len(spans) + ([overview] if overview else [])  # each window's frame positions
        caches = [TeaCache(config.teacache, config.steps) if config.teacache.enabled else None for _ in positions]

        def window_dit(
            cache: TeaCache | None, frame_positions: list[int] | None,
        ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
            dit = functools.partial(self.dit, cache=cache, frame_positions=frame_positions)
            run_dit = dit if self.parallel is None else functools.partial(self.parallel.forward, dit)

            def dit_velocity(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
                timestep = sampler.model_timestep(sigma).expand(x.shape[0]).to(self.device, torch.float32)
                return run_dit(x.to(self.dtype), timestep, text).float()

            return dit_velocity

        guided = [guided_velocity(window_dit(cache, frame_positions), condition, uncondition, config.guidance_scale)
                  for cache, frame_positions in zip(caches, positions)]
        velocity = windowed_velocity(lambda index, x, sigma: guided[index](x, sigma), spans, overview)

        def report(step: dict) -> None:
            if progress is not None:
                progress(step["i"] + 1, config.steps)

        latents = sampler.sample(velocity, noise, sigmas, callback=report)
        notes["steps"] = config.steps
        if window.enabled:
            notes["windows"] = [list(span) for span in spans]
        if overview:
            notes["overview"] = overview
        notes["model_calls"] = sum(config.steps if cache is None else cache.full_passes for cache in caches)
        return latents
