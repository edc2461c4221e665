"""A learned frame interpolator: coarse-to-fine intermediate flows, occlusion-aware fusion, residual
refinement. In the spirit of RIFE's IFNet (Huang et al., "Real-Time Intermediate Flow Estimation for
Video Frame Interpolation", ECCV 2022), small enough to train on a CPU.

For a pair (frame 0, frame 1) and a time t in [0, 1]:

1. Flow blocks, coarsest first, estimate two motion fields u0, u1 on the grid of the unseen frame t:
   u0(q) is how far the point at q moves from frame 0 to frame 1 as seen from frame 0's side, u1 the
   same from frame 1's side (they differ where something is hidden in one frame). Under linear
   motion the intermediate flows are then F_t0 = −t·u0 and F_t1 = (1 − t)·u1. Each block sees both
   frames, both frames warped by the current estimate, the estimate itself, the fusion logit and t,
   all at its own resolution, and adds a correction to u0, u1 and the logit. It also sees a local
   bilateral cost volume: for every offset d within its search radius, how much frame 0 warped by
   −t·(u0 + d) differs from frame 1 warped by (1 − t)·(u1 + d) (Park et al., "BMBC", ECCV 2020,
   match symmetrically around the frame to be made like this), and the offset that soft-minimises
   it. The matching evidence is given, not learned, which is what lets this net train in minutes on
   a CPU; the convs learn to trust it, smooth it and fix it where it fails (occlusions, flat areas).
2. Fusion: the warped frames are blended with weights (1 − t)·σ(m) and t·σ(−m), where the learned
   logit m says which frame shows each pixel (occlusion).
3. Refinement: a small network at half resolution adds a residual scaled by 4·t·(1 − t).

At t = 0 the flow to frame 0 is zero, frame 1's weight is zero and the residual is zero, so the
output IS frame 0, by construction rather than by a special case; t = 1 likewise gives frame 1.
Frames of any size are padded (replicating the border) to a multiple of the coarsest stride and
cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from stages.tsr.warp import backward_warp
from stages.weights import load_into, read_state_dict

COLOUR_CHANNELS = 3
MAX_LOGIT = 20.0  # the fusion logit is clamped so that neither weight underflows to exactly zero
COST_TEMPERATURE = 0.02  # of the soft minimum over the cost volume, in mean absolute difference
# Per block: frame0, frame1, the two warped frames (4 × 3), u0 and u1 (4), the fusion logit, t, the
# soft-minimising offset (2), then the cost volume ((2r + 1)² for search radius r).
BLOCK_INPUTS = 4 * COLOUR_CHANNELS + 4 + 1 + 1 + 2
# Refinement: the two frames, the two warped frames and the fused frame (5 × 3), u0, u1, logit, t.
REFINE_INPUTS = 5 * COLOUR_CHANNELS + 4 + 1 + 1


@dataclass
class LearnedInterpolatorConfig:
    strides: List[int] = field(default_factory=lambda: [16, 8, 4])  # feature stride of each flow block, coarse to fine
    widths: List[int] = field(default_factory=lambda: [96, 64, 48])  # feature channels of each flow block
    search_radii: List[int] = field(default_factory=lambda: [4, 2, 1])  # cost volume reach, in pooled pixels
    block_depth: int = 4  # 3×3 convs in the body of each flow block
    refine_width: int = 32  # feature channels of the refinement network (at half resolution)
    refine_depth: int = 3

    def __post_init__(self) -> None:
        if not self.strides or not len(self.strides) == len(self.widths) == len(self.search_radii):
            raise ValueError(
                f"strides, widths and search_radii need one entry per flow block, got strides="
                f"{list(self.strides)}, widths={list(self.widths)} and search_radii={list(self.search_radii)}"
            )
        if min(self.search_radii) < 0:
            raise ValueError(f"every search radius must be >= 0, got search_radii={list(self.search_radii)}")
        for stride in self.strides:
            if stride < 4 or stride & (stride - 1):
                raise ValueError(f"every stride must be a power of two >= 4, got strides={list(self.strides)}")
        if list(self.strides) != sorted(self.strides, reverse=True) or len(set(self.strides)) != len(self.strides):
            raise ValueError(f"strides must decrease from coarse to fine, got {list(self.strides)}")
        for name in ("block_depth", "refine_width", "refine_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"LearnedInterpolatorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.widths) < 2:
            raise ValueError(f"every width must be >= 2, got widths={list(self.widths)}")


def conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, padding=1), nn.PReLU(out_channels))


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    return images if factor == 1 else F.avg_pool2d(images, factor)


def upsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    return images if factor == 1 else F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False)


@torch.no_grad()
def bilateral_costs(
    frame0: torch.Tensor, frame1: torch.Tensor, motion: torch.Tensor, t: torch.Tensor, radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching costs of the offsets around the current motion, and their soft-minimising offset.

    frame0, frame1 (B, 3, h, w); motion (B, 4, h, w): u0, u1 in pixels of this grid; t (B, 1, 1, 1).
    For each offset d in [−radius, radius]², the 3 × 3-box-averaged mean absolute difference between
    frame0 warped by −t·(u0 + d) and frame1 warped by (1 − t)·(u1 + d): (B, (2·radius + 1)², h, w),
    and the softmin-weighted mean offset (B, 2, h, w). No gradient: this is evidence, not a path.
    """
    steps = torch.arange(-radius, radius + 1, dtype=frame0.dtype, device=frame0.device)
    offsets = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), dim=-1).reshape(-1, 2)  # (K, 2) as (x, y)
    count, batch = offsets.shape[0], frame0.shape[0]
    shifted = offsets.view(count, 1, 2, 1, 1)
    flows_0 = (-t * (motion[:, :2] + shifted)).flatten(0, 1)  # (K·B, 2, h, w)
    flows_1 = ((1 - t) * (motion[:, 2:] + shifted)).flatten(0, 1)
    warped_0 = backward_warp(frame0.repeat(count, 1, 1, 1), flows_0)
    warped_1 = backward_warp(frame1.repeat(count, 1, 1, 1), flows_1)
    costs = (warped_0 - warped_1).abs().mean(dim=1).view(count, batch, *frame0.shape[-2:]).transpose(0, 1)
    costs = F.avg_pool2d(costs, 3, stride=1, padding=1, count_include_pad=False)  # (B, K, h, w)
    weights = torch.softmax(-costs / COST_TEMPERATURE, dim=1)
    expected = torch.einsum("bkhw,kc->bchw", weights, offsets)
    return costs, expected


class FlowBlock(nn.Module):
    """One level of the coarse-to-fine estimate.

    Its inputs are average-pooled by stride/4, two stride-2 convs bring the features to 1/stride,
    a residual stack of convs works there, and a transposed conv returns corrections at 1/(stride/2)
    that are upsampled bilinearly to the frame. Motions enter the network in pixels of its pooled grid
    and leave it scaled to frame pixels, so blocks of every stride work with values of similar size.
    """

    def __init__(self, stride: int, width: int, depth: int, search_radius: int):
        super().__init__()
        self.stride = stride
        self.search_radius = search_radius
        inputs = BLOCK_INPUTS + (2 * search_radius + 1) ** 2
        self.encode = nn.Sequential(conv(inputs, width // 2, stride=2), conv(width // 2, width, stride=2))
        self.body = nn.Sequential(*(conv(width, width) for _ in range(depth)))
        self.decode = nn.ConvTranspose2d(width, 4 + 1, 4, stride=2, padding=1)  # Δu0, Δu1, Δlogit
        nn.init.zeros_(self.decode.weight)  # untrained: no correction, so the previous estimate stands
        nn.init.zeros_(self.decode.bias)

    def forward(
        self, images: torch.Tensor, motion: torch.Tensor, logit: torch.Tensor, t_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 12, H, W): the two frames and the two warped frames; motion (B, 4, H, W): u0, u1
        in frame pixels; logit, t_map (B, 1, H, W) → corrections to the motion (B, 4, H, W), in frame
        pixels, and to the logit (B, 1, H, W). Everything is pooled to the block's grid first; motion
        goes into the network in pixels of that grid."""
        pooling = self.stride // 4
        images, motion, logit, t_map = (downsample(x, pooling) for x in (images, motion / pooling, logit, t_map))
        costs, offset = bilateral_costs(
            images[:, :3], images[:, 3:6], motion.detach(), t_map[:, :, :1, :1], self.search_radius
        )
        features = self.encode(torch.cat((images, motion, logit, t_map, offset, costs), dim=1))
        features = features + self.body(features)
        corrections = upsample(self.decode(features), self.stride // 2)  # (B, 5, H, W)
        return corrections[:, :4] * (self.stride // 2), corrections[:, 4:]


class Refiner(nn.Module):
    """A residual for the fused frame, computed at half resolution."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.encode = conv(REFINE_INPUTS, width, stride=2)
        self.body = nn.Sequential(*(conv(width, width) for _ in range(depth)))
        self.decode = nn.ConvTranspose2d(width, COLOUR_CHANNELS, 4, stride=2, padding=1)
        nn.init.zeros_(self.decode.weight)  # untrained: no residual
        nn.init.zeros_(self.decode.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # (B, REFINE_INPUTS, H, W) → (B, 3, H, W)
        features = self.encode(inputs)
        return torch.tanh(self.decode(features + self.body(features)))


class Interpolation(NamedTuple):
    """What one pass computes; the training loss reads the intermediate steps."""

    frame: torch.Tensor  # (B, 3, H, W) the interpolated frame
    flows_t0: list[torch.Tensor]  # per flow block, coarse to fine: F_t0 (B, 2, H, W) after that block
    flows_t1: list[torch.Tensor]


class LearnedInterpolator(nn.Module):
    """Implements the `FrameInterpolator` protocol: frames in [−1, 1], (B, 3, H, W), any size."""

    def __init__(self, config: LearnedInterpolatorConfig | None = None):
        super().__init__()
        self.config = config or LearnedInterpolatorConfig()
        self.blocks = nn.ModuleList(
            FlowBlock(stride, width, self.config.block_depth, radius)
            for stride, width, radius in zip(self.config.strides, self.config.widths, self.config.search_radii)
        )
        self.refiner = Refiner(self.config.refine_width, self.config.refine_depth)

    @classmethod
    def from_pretrained(cls, path: str, config: LearnedInterpolatorConfig | None = None) -> "LearnedInterpolator":
        model = cls(config)
        load_into(model, read_state_dict(path), str(path))
        return model.eval()

    def interpolate(self, frame0: torch.Tensor, frame1: torch.Tensor, times: torch.Tensor) -> Interpolation:
        """frame0, frame1 (B, 3, H, W) with H, W multiples of the coarsest stride; times (B,)."""
        batch, _, height, width = frame0.shape
        t = times.to(frame0.dtype).view(batch, 1, 1, 1)
        t_map = t.expand(batch, 1, height, width)
        motion = frame0.new_zeros(batch, 4, height, width)  # u0, u1
        logit = frame0.new_zeros(batch, 1, height, width)
        warped_0, warped_1 = frame0, frame1
        flows_t0, flows_t1 = [], []
        for block in self.blocks:
            images = torch.cat((frame0, frame1, warped_0, warped_1), dim=1)
            motion_correction, logit_correction = block(images, motion, logit, t_map)
            motion = motion + motion_correction
            logit = logit + logit_correction
            flow_t0, flow_t1 = -t * motion[:, :2], (1 - t) * motion[:, 2:]
            warped_0, warped_1 = backward_warp(frame0, flow_t0), backward_warp(frame1, flow_t1)
            flows_t0.append(flow_t0)
            flows_t1.append(flow_t1)
        logit = logit.clamp(-MAX_LOGIT, MAX_LOGIT)
        weight_0 = (1 - t) * torch.sigmoid(logit)
        weight_1 = t * torch.sigmoid(-logit)
        weight_0 = weight_0 / (weight_0 + weight_1)  # exactly 1 at t = 0 and 0 at t = 1
        fused = weight_0 * warped_0 + (1 - weight_0) * warped_1
        residual = self.refiner(torch.cat((frame0, frame1, warped_0, warped_1, fused, motion, logit, t_map), dim=1))
        return Interpolation(fused + 4 * t * (1 - t) * residual, flows_t0, flows_t1)

    def forward(self, frame0: torch.Tensor, frame1: torch.Tensor, times: list[float]) -> torch.Tensor:
        """frame0, frame1 (B, 3, H, W) in [−1, 1], times in [0, 1] → (len(times), B, 3, H, W)."""
        if frame0.dim() != 4 or frame0.shape != frame1.shape or frame0.shape[1] != COLOUR_CHANNELS:
            raise ValueError(
                f"frame0 and frame1 must both be (B, 3, H, W) of one shape, got {tuple(frame0.shape)} "
                f"and {tuple(frame1.shape)}"
            )
        for t in times:
            if not 0 <= t <= 1:
                raise ValueError(f"interpolation times must lie in [0, 1], got {t}")
        height, width = frame0.shape[-2:]
        multiple = self.config.strides[0]
        padding = (0, -width % multiple, 0, -height % multiple)  # right and bottom
        parameter = next(self.parameters())
        pair = F.pad(torch.cat((frame0, frame1)).to(parameter), padding, mode="replicate")
        padded_0, padded_1 = pair.chunk(2)
        frames = []
        for t in times:
            times_tensor = torch.full((frame0.shape[0],), float(t), device=parameter.device)
            frame = self.interpolate(padded_0, padded_1, times_tensor).frame
            frames.append(frame[..., :height, :width].to(frame0.dtype))
        return torch.stack(frames)
