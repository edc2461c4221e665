"""The temporal super-resolution stage: latents -> Wan VAE decode (one latent frame at a time,
with the causal cache) -> frames -> optical-flow-guided interpolation, ×factor frame rate.

The interpolator is the learned one (stages/tsr/learned.py, shipped weights in weights/tsr/) or the
classical-flow one (no weights); both take any factor, since both are conditioned on the time t.

T decoded frames become (T − 1)·factor + 1: factor − 1 new frames between each pair, the decoded
frames kept exactly.

Given a group of ranks (stages/parallel.py), the leader alone holds the VAE and decodes (the causal
cache makes decoding sequential in time); the frame pairs, which interpolate independently, are
split into one contiguous range per rank, and the leader gathers the result. Every rank runs the
same call; the leader returns the clip, the others None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cascade.payload import Clip, Request
from stages.base.vae import WAN_VAE_SIZES, WanVAE, WanVAEConfig
from stages.parallel import SINGLE_RANK, RankGroup, broadcast_shape, map_frame_ranges, split_evenly
from stages.pixels import to_uint8
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
    def __init__(self, config: TsrStageConfig, device: str = "cpu", ranks: RankGroup = SINGLE_RANK):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype_from_name(config.dtype)
        self.ranks = ranks
        self.warnings: list[str] = []
        self.vae = None  # only the leader decodes
        if ranks.is_leader:
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
            chunks.append(to_uint8(chunk[0].transpose(0, 1)))  # (t, 3, H, W)
            progress(done)
        return torch.cat(chunks)

    @torch.no_grad()
    def interpolate(
        self, frames: Optional[torch.Tensor], count: int, progress: Callable[[int, int], None]
    ) -> Optional[torch.Tensor]:
        """The leader's (count, 3, H, W) uint8 frames -> ((count − 1)·factor + 1, 3, H, W), the pairs
        split over the ranks (rank k gets the frames of its pairs; each range's last frame, which
        starts the next range, is kept only by the last). Others pass and return None."""
        factor = self.config.factor
        pairs = split_evenly(count - 1, self.ranks.size)
        # a rank's frames are those of its pairs; the leader has at least the first frame
        inputs = [range(part.start, part.stop + 1) if len(part) or rank == 0 else part for rank, part in enumerate(pairs)]

        def compute(local: torch.Tensor, rank: int) -> torch.Tensor:
            report = progress if rank == 0 else None
            output = interpolate_frames(local, factor, self.interpolator, progress=report)  # uint8, in bounded memory
            return output if pairs[rank].stop >= count - 1 else output[:-1]

        return map_frame_ranges(compute, frames, inputs, 0, torch.uint8, self.ranks)

    @torch.no_grad()
    def __call__(
        self, clip: Optional[Clip], request: Request, progress: Optional[Callable[[int, int], None]] = None
    ) -> Optional[Clip]:
        if self.ranks.is_leader and clip.space != "latent":
            raise ValueError(f"the tsr stage takes a latent clip, got a {clip.space!r} one")
        shape = broadcast_shape(clip.shape if self.ranks.is_leader else None, self.ranks)
        batch, latent_frames = shape[0], shape[2]
        decoded_frames = 1 + 2 ** sum(self.config.vae.temporal_downsample) * (latent_frames - 1)
        own_pairs = len(split_evenly(decoded_frames - 1, self.ranks.size)[0])
        total = latent_frames + own_pairs  # the leader's progress: decode steps + its interpolated pairs
        report = progress or (lambda done, total: None)

        videos = []
        for index in range(batch):  # one video of the batch at a time
            frames = None
            if self.ranks.is_leader:
                latents = clip.tensor(self.device)[index:index + 1]
                frames = self.decode(latents, lambda done: report(done, total))
            frames = self.interpolate(frames, decoded_frames, lambda pairs, _: report(latent_frames + pairs, total))
            if frames is not None:
                videos.append(frames.transpose(0, 1))  # (3, T, H, W)
        if not self.ranks.is_leader:
            return None
        data = torch.stack(videos)  # on this stage's device
        return Clip(data, "pixel", clip.fps * self.config.factor, request, {"decoded_frames": decoded_frames})
