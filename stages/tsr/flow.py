"""Classical dense optical flow: coarse-to-fine, iterative Lucas–Kanade with candidate propagation.

No weights, nothing learned; everything is batched torch and runs on CPU or GPU. The method, level
by level from the coarsest image of a pyramid to the finest:

1. upsample the flow found so far (zero at the coarsest level);
2. propagate: every pixel compares its flow with the flows of its four neighbours `propagation_step`
   pixels away and keeps whichever matches source to target best over its window (as in
   PatchMatch). Near a motion edge, where coarse levels blur the flow of an object onto its
   background, this pulls the right flow back across the edge;
3. refine: warp the target with the flow, linearise brightness constancy
   target(p + flow + δ) ≈ source(p) around the warped target and solve for δ by least squares over a
   Gaussian window around every pixel (dense Lucas–Kanade), with a Tikhonov term so that windows
   with little texture move little instead of exploding;
4. repeat 2–3 `iterations` times, then take a 3 × 3 median of the flow, which removes isolated
   outliers and keeps motion edges sharp (Sun, Roth & Black, "Secrets of optical flow", 2010).

It runs on luminance, normalised per pair to zero mean and unit variance, so frames in [0, 1] and
in [−1, 1] give the same flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from stages.tsr.warp import backward_warp

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, for 3-channel frames


@dataclass
class ClassicalFlowConfig:
    levels: int = 7  # pyramid levels at most; fewer where the coarsest side would drop below min_size
    min_size: int = 8  # smallest side, in pixels, a pyramid level may have
    iterations: int = 3  # propagate-and-refine passes per level
    window_sigma: float = 2.0  # std of the Gaussian matching window, in pixels of each level
    regularization: float = 0.05  # Tikhonov weight: damps updates where the window has little texture
    propagation_step: int = 3  # distance, in pixels of each level, of the neighbours whose flow is tried

    def __post_init__(self) -> None:
        for name, lowest in (("levels", 1), ("min_size", 2), ("iterations", 1), ("propagation_step", 1)):
            if getattr(self, name) < lowest:
                raise ValueError(f"ClassicalFlowConfig.{name} must be >= {lowest}, got {getattr(self, name)}")
        for name in ("window_sigma", "regularization"):  # regularization > 0 keeps flat windows solvable
            if getattr(self, name) <= 0:
                raise ValueError(f"ClassicalFlowConfig.{name} must be > 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------
# Image filters (all take and return (B, C, H, W) and pad by replicating the border)


def luminance(frames: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 1, H, W): BT.601 luma for RGB, the channel mean otherwise."""
    if frames.shape[1] == 3:
        return (frames * frames.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return frames.mean(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel, truncated at 2.5 sigma."""
    radius = max(1, math.ceil(2.5 * sigma))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    images = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    images = F.conv2d(images, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(images, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def image_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences d/dx and d/dy."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    grad_x = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
    grad_y = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
    return grad_x, grad_y


def shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """images(p + (dx, dy)) at every pixel p, for integer dx, dy."""
    reach = max(abs(dx), abs(dy))
    padded = F.pad(images, (reach, reach, reach, reach), mode="replicate")
    height, width = images.shape[-2:]
    return padded[..., reach + dy : reach + dy + height, reach + dx : reach + dx + width]


def median_of_three(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def separable_median(images: torch.Tensor) -> torch.Tensor:
    """3 × 3 separable median: the median of three row medians; much cheaper than sorting nine."""
    rows = median_of_three(shifted(images, -1, 0), images, shifted(images, 1, 0))
    return median_of_three(shifted(rows, 0, -1), rows, shifted(rows, 0, 1))


# ---------------------------------------------------------------------------------------------------
# Pyramid


def pyramid_sizes(height: int, width: int, config: ClassicalFlowConfig) -> list[tuple[int, int]]:
    """Level sizes, finest first; each level halves the previous one, rounding up."""
    sizes = [(height, width)]
    while len(sizes) < config.levels:
        smaller = (math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2))
        if min(smaller) < config.min_size:
            break
        sizes.append(smaller)
    return sizes


def resize_image(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a flow (B, 2, h, w) to `size` and rescale its pixel units to the new grid."""
    height, width = flow.shape[-2:]
    if (height, width) == size:
        return flow
    resized = F.interpolate(flow, size=size, mode="bilinear", align_corners=False)
    return resized * flow.new_tensor([size[1] / width, size[0] / height]).view(1, 2, 1, 1)


# ---------------------------------------------------------------------------------------------------
# One level: propagate, refine


def propagate(
    source: torch.Tensor, target: torch.Tensor, flow: torch.Tensor, config: ClassicalFlowConfig
) -> torch.Tensor:
    """Per pixel, the best matching flow among its own and its four neighbours' at `propagation_step`.

    source, target (B, 1, H, W); flow (B, 2, H, W). The match is the window-summed squared
    difference between source and the target warped by the candidate flow.
    """
    step = config.propagation_step
    candidates = [flow] + [shifted(flow, dx, dy) for dx, dy in ((step, 0), (-step, 0), (0, step), (0, -step))]
    count, batch = len(candidates), flow.shape[0]
    warped = backward_warp(target.repeat(count, 1, 1, 1), torch.cat(candidates))  # (K·B, 1, H, W)
    errors = (warped.view(count, batch, *warped.shape[-2:]) - source[:, 0]).square()  # (K, B, H, W)
    costs = gaussian_blur(errors.transpose(0, 1), config.window_sigma).split(1, dim=1)  # K × (B, 1, H, W)
    best_flow, best_cost = candidates[0], costs[0]
    for candidate, cost in zip(candidates[1:], costs[1:]):
        best_flow = torch.where(cost < best_cost, candidate, best_flow)
        best_cost = torch.minimum(cost, best_cost)
    return best_flow


def inside_mask(flow: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): 1 where p + flow(p) lies inside the frame, else 0."""
    height, width = flow.shape[-2:]
    x = torch.arange(width, device=flow.device, dtype=flow.dtype) + flow[:, 0]  # (B, H, W)
    y = torch.arange(height, device=flow.device, dtype=flow.dtype).view(-1, 1) + flow[:, 1]
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    return inside.unsqueeze(1).to(flow.dtype)


def lucas_kanade_update(
    source: torch.Tensor, target: torch.Tensor, flow: torch.Tensor, config: ClassicalFlowConfig
) -> torch.Tensor:
    """Least-squares increment δ (B, 2, H, W) with target(p + flow + δ) ≈ source(p) over each window.

    source, target (B, 1, H, W). Pixels whose flow points outside the target cast no vote, since the
    warp there only repeats the border.
    """
    warped_target = backward_warp(target, flow)
    grad_x, grad_y = image_gradients(0.5 * (source + warped_target))  # symmetric gradients
    difference = warped_target - source
    products = inside_mask(flow) * torch.cat(
        (grad_x * grad_x, grad_x * grad_y, grad_y * grad_y, grad_x * difference, grad_y * difference), dim=1
    )
    sxx, sxy, syy, sxt, syt = gaussian_blur(products, config.window_sigma).unbind(dim=1)  # each (B, H, W)
    sxx = sxx + config.regularization
    syy = syy + config.regularization
    determinant = sxx * syy - sxy * sxy  # > 0: the regularised matrix is positive definite
    # Solve [[sxx, sxy], [sxy, syy]] δ = −[sxt, syt] by Cramer's rule.
    delta_x = (sxy * syt - syy * sxt) / determinant
    delta_y = (sxy * sxt - sxx * syt) / determinant
    return torch.stack((delta_x, delta_y), dim=1)


def estimate_flow(
    source: torch.Tensor, target: torch.Tensor, config: Optional[ClassicalFlowConfig] = None
) -> torch.Tensor:
    """Dense flow (B, 2, H, W) in pixels, float32, with source(p) ≈ target(p + flow(p)).

    source, target (B, C, H, W) of any value range; `backward_warp(target, flow)` approximates source.
    Channel 0 of the flow is horizontal (x), channel 1 vertical (y).
    """
    config = config or ClassicalFlowConfig()
    if source.dim() != 4 or source.shape != target.shape:
        raise ValueError(
            f"source and target must both be (B, C, H, W) of one shape, got {tuple(source.shape)} "
            f"and {tuple(target.shape)}"
        )
    pair = torch.cat((luminance(source.float()), luminance(target.float())), dim=1)  # (B, 2, H, W)
    mean = pair.mean(dim=(1, 2, 3), keepdim=True)
    std = pair.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    pair = (pair - mean) / std

    sizes = pyramid_sizes(*source.shape[-2:], config)
    flow = pair.new_zeros(pair.shape[0], 2, *sizes[-1])
    for size in reversed(sizes):  # coarsest first
        level = resize_image(pair, size)
        level_source, level_target = level[:, :1], level[:, 1:]
        flow = resize_flow(flow, size)
        for _ in range(config.iterations):
            flow = propagate(level_source, level_target, flow, config)
            flow = flow + lucas_kanade_update(level_source, level_target, flow, config)
        flow = separable_median(flow)
    return flow
