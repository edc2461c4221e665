"""The temporal super-resolution stage: latents -> Wan VAE decode (one latent frame at a time,
with the causal cache) -> frames -> optical-flow-guided interpolation, ×factor frame rate.

The interpolator is the learned one (stages/tsr/learned.py, shipped weights in weights/tsr/) or the
classical-flow one (no weights); both take any factor, since both are conditioned on the time t.

T decoded frames become (T − 1)·factor + 1: factor − 1 new frames between each pair, the decoded
frames kept exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cascade.payload import Clip, Request
from stages.base.vae import WAN_VAE_SIZES, WanVAE, WanVAEConfig
from stages.pixels import to_model_range, to_uint8
from stages.tsr.flow import ClassicalFlowConfig
from stages.tsr.interpolator import ClassicalFlowInterpolator, FrameInterpolator, interpolate_frames
from stages.tsr.learned import LearnedInterpolator, LearnedInterpolatorConfig
from stages.weights import dtype_from_name, load_or_init

SHIPPED_WEIGHTS = "weights/tsr/interpolator.safetensors"
INTERPOLATORS = ("learned", "classical")


@dataclass
class TsrStageConfig:
    vae: WanVAEConfig = field(default_factory=lambda: dataclasses.replace(WAN_VAE_SIZES["tiny"]))
    vae_weights: str = ""  # empty: random weights (with a warning)
    factor: int = 3  # 16 fps -> 48 fps
    interpolator: str = "learned"  # "learned" or "classical"
    # A relative path is taken from the repository root. The default is the shipped weights (trained
    # for the default `learned` size); empty: random weights (with a warning).
    interpolator_weights: str = SHIPPED_WEIGHTS
    learned: LearnedInterpolatorConfig = field(default_factory=LearnedInterpolatorConfig)
    flow: ClassicalFlowConfig = field(default_factory=ClassicalFlowConfig)  # of the classical interpolator
    dtype: str = "float32"  # of the VAE; interpolation runs in float32


def make_interpolator(config: TsrStageConfig, warnings: list[str], device: str = "cpu") -> FrameInterpolator:
    """The interpolator `config` names; random learned weights add a warning to `warnings`."""
    if config.interpolator == "classical":
        return ClassicalFlowInterpolator(config.flow)
    if config.interpolator != "learned":
        raise ValueError(f"stages.tsr.interpolator must be one of {list(INTERPOLATORS)}, got {config.interpolator!r}")
    return load_or_init(
        config.interpolator_weights,
        lambda weights: LearnedInterpolator.from_pretrained(weights, config.learned),
        lambda: LearnedInterpolator(config.learned),
        "the learned frame interpolator", "stages.tsr.interpolator_weights", warnings,
    ).eval().to(device)


class TsrStage:
    def __init__(self, config: TsrStageConfig, device: str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype_from_name(config.dtype)
        self.warnings: list[str] = []
        self.vae = load_or_init(
            config.vae_weights,
            lambda path: WanVAE.from_pretrained(path, config.vae, dtype=self.dtype),
            lambda: WanVAE(config.vae).to(self.dtype),
            "the VAE", "stages.tsr.vae_weights", self.warnings,
        ).eval().to(self.device)
        self.interpolator = make_interpolator(config, self.warnings, device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress: Callable[[int], None]) -> torch.Tensor:
        """(1, 16, T', h, w) latents -> (T, 3, H, W) uint8 frames, one latent frame at a time."""
        chunks = []
        for done, chunk in enumerate(self.vae.iter_decode(latents.to(self.device, self.dtype)), start=1):
            chunks.append(to_uint8(chunk[0].transpose(0, 1)).cpu())  # (t, 3, H, W)
            progress(done)
        return torch.cat(chunks)

    @torch.no_grad()
    def __call__(
        self, clip: Clip, request: Request, progress: Optional[Callable[[int, int], None]] = None
    ) -> Clip:
        if clip.space != "latent":
            raise ValueError(f"the tsr stage takes a latent clip, got a {clip.space!r} one")
        latent_frames = clip.num_frames
        decoded_frames = 1 + 4 * (latent_frames - 1)
        total = latent_frames + max(decoded_frames - 1, 0)  # decode steps + interpolated pairs
        report = progress or (lambda done, total: None)

        videos = []
        for latents in torch.from_numpy(clip.data.copy()).split(1):  # one video of the batch at a time
            frames = self.decode(latents, lambda done: report(done, total))
            frames = interpolate_frames(
                to_model_range(frames).to(self.device),
                self.config.factor,
                self.interpolator,
                progress=lambda pairs, _: report(latent_frames + pairs, total),
            )
            videos.append(to_uint8(frames).transpose(0, 1).cpu())  # (3, T, H, W)
        data = torch.stack(videos).numpy()
        return Clip(data, "pixel", clip.fps * self.config.factor, request, {"decoded_frames": decoded_frames})
