"""Classical dense optical flow: coarse-to-fine, iterative Lucas–Kanade on Gaussian windows.

The method, level by level from the coarsest image of a pyramid to the finest:

1. upsample the flow found so far (zero at the coarsest level) and warp the target with it;
2. linearise the brightness constancy target(p + flow + δ) ≈ source(p) around the warped target and
   solve for δ by least squares over a Gaussian window around every pixel (dense Lucas–Kanade),
   with a small Tikhonov term so that textureless windows move little instead of exploding;
3. repeat 2. a few times (warp and refine), then median-filter the flow, which removes isolated
   outliers and keeps motion edges sharp (Sun, Roth & Black, "Secrets of optical flow", 2010).

It runs on luminance, normalised per pair to zero mean and unit variance, so frames in [0, 1] and
in [−1, 1] give the same flow. No weights, nothing learned; everything is batched torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stages.tsr.warp import backward_warp

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, for 3-channel frames


@dataclass
class ClassicalFlowConfig:
    levels: int = 5  # pyramid levels at most; fewer when the coarsest side would drop below min_size
    min_size: int = 8  # smallest side, in pixels, of the coarsest pyramid level
    iterations: int = 3  # warp-and-refine passes per level
    window_sigma: float = 2.0  # std of the Gaussian Lucas–Kanade window, in pixels of each level
    regularization: float = 0.05  # Tikhonov weight: update damping where the window has little texture
    median_size: int = 3  # median filter applied to the flow after each level (1 disables)

    def __post_init__(self) -> None:
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if self.min_size < 2:
            raise ValueError(f"min_size must be >= 2, got {self.min_size}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.window_sigma <= 0:
            raise ValueError(f"window_sigma must be > 0, got {self.window_sigma}")
        if self.regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {self.regularization}")
        if self.median_size < 1 or self.median_size % 2 == 0:
            raise ValueError(f"median_size must be a positive odd number, got {self.median_size}")


def luminance(frames: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 1, H, W): BT.601 luma for RGB, the channel mean otherwise."""
    if frames.shape[1] == 3:
        weights = frames.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
        return (frames * weights).sum(dim=1, keepdim=True)
    return frames.mean(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel, replicate padding. images (B, C, H, W)."""
    radius = max(1, math.ceil(2.5 * sigma))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    images = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    images = F.conv2d(images, horizontal, groups=channels)
    return F.conv2d(images, vertical, groups=channels)


def image_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences d/dx and d/dy, replicate padding. images (B, C, H, W)."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    grad_x = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
    grad_y = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
    return grad_x, grad_y


def median_of_three(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def separable_median(images: torch.Tensor) -> torch.Tensor:
    """3 × 3 separable median (median of the column medians of row triples), replicate padding."""
    padded = F.pad(images, (1, 1, 0, 0), mode="replicate")
    rows = median_of_three(padded[..., :-2], padded[..., 1:-1], padded[..., 2:])
    padded = F.pad(rows, (0, 0, 1, 1), mode="replicate")
    return median_of_three(padded[..., :-2, :], padded[..., 1:-1, :], padded[..., 2:, :])


def pyramid_sizes(height: int, width: int, config: ClassicalFlowConfig) -> list[tuple[int, int]]:
    """Level sizes, finest first; each level halves the previous one (rounding up)."""
    sizes = [(height, width)]
    while len(sizes) < config.levels:
        next_height, next_width = (math.ceil(side / 2) for side in sizes[-1])
        if min(next_height, next_width) < config.min_size:
            break
        sizes.append((next_height, next_width))
    return sizes


def resize_image(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a flow (B, 2, h, w) to `size` and rescale its pixel units to the new grid."""
    height, width = flow.shape[-2:]
    resized = F.interpolate(flow, size=size, mode="bilinear", align_corners=False)
    scale = flow.new_tensor([size[1] / width, size[0] / height]).view(1, 2, 1, 1)
    return resized * scale


def lucas_kanade_update(
    source: torch.Tensor, warped_target: torch.Tensor, valid: torch.Tensor, config: ClassicalFlowConfig
) -> torch.Tensor:
    """Least-squares flow increment δ (B, 2, H, W) with warped_target(p + δ) ≈ source(p) in each window.

    source, warped_target (B, 1, H, W); valid (B, 1, H, W) is 0 where the flow points outside the
    target, so clamped border pixels cast no vote.
    """
    grad_x, grad_y = image_gradients(0.5 * (source + warped_target))  # symmetric gradients
    difference = warped_target - source
    products = valid * torch.cat(
        (grad_x * grad_x, grad_x * grad_y, grad_y * grad_y, grad_x * difference, grad_y * difference), dim=1
    )
    sxx, sxy, syy, sxt, syt = gaussian_blur(products, config.window_sigma).unbind(dim=1)  # each (B, H, W)
    sxx = sxx + config.regularization
    syy = syy + config.regularization
    determinant = sxx * syy - sxy * sxy
    # Solve [[sxx, sxy], [sxy, syy]] δ = −[sxt, syt] by Cramer's rule (the matrix is positive definite).
    delta_x = (sxy * syt - syy * sxt) / determinant
    delta_y = (sxy * sxt - sxx * syt) / determinant
    return torch.stack((delta_x, delta_y), dim=1)


def inside_mask(flow: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): 1 where p + flow(p) lies inside the frame, else 0."""
    height, width = flow.shape[-2:]
    xs = torch.arange(width, device=flow.device, dtype=flow.dtype).view(1, 1, -1)
    ys = torch.arange(height, device=flow.device, dtype=flow.dtype).view(1, -1, 1)
    x = xs + flow[:, 0]
    y = ys + flow[:, 1]
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    return inside.unsqueeze(1).to(flow.dtype)


def shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """images(p + (dx, dy)) with replicate padding. images (B, C, H, W)."""
    r = max(abs(dx), abs(dy))
    padded = F.pad(images, (r, r, r, r), mode="replicate")
    height, width = images.shape[-2:]
    return padded[..., r + dy : r + dy + height, r + dx : r + dx + width]


def window_cost(source, target, flow, sigma):
    return gaussian_blur((backward_warp(target, flow) - source).square(), sigma)


def propagate(source, target, flow, config):
    step = PROPAGATION_STEP
    candidates = [flow] + [shifted(flow, dx, dy) for dx, dy in ((step, 0), (-step, 0), (0, step), (0, -step))]
    k = len(candidates)
    warped = backward_warp(target.repeat(k,1,1,1), torch.cat(candidates))  # (K·B, 1, H, W)
    sq = (warped - source.repeat(k,1,1,1)).square()
    b = source.shape[0]
    sq = sq.view(k, b, *sq.shape[-2:]).transpose(0, 1)  # (B, K, H, W)
    costs = gaussian_blur(sq, config.window_sigma).split(1, dim=1)
    best_flow, best_cost = candidates[0], costs[0]
    for c, cost in zip(candidates[1:], costs[1:]):
        better = cost < best_cost
        best_flow = torch.where(better, c, best_flow)
        best_cost = torch.minimum(cost, best_cost)
    return best_flow

PROPAGATION_STEP = 3
PROPAGATE = True
MEDIAN = True
PROP_ITERS = 3

def estimate_flow(
    source: torch.Tensor, target: torch.Tensor, config: ClassicalFlowConfig = ClassicalFlowConfig()
) -> torch.Tensor:
    """Dense flow (B, 2, H, W) in pixels with source(p) ≈ target(p + flow(p)).

    source, target (B, C, H, W) of any value range; `backward_warp(target, flow)` approximates source.
    Channel 0 of the flow is horizontal (x), channel 1 vertical (y).
    """
    if source.shape != target.shape or source.dim() != 4:
        raise ValueError(
            f"source and target must both be (B, C, H, W) of one shape, got {tuple(source.shape)} "
            f"and {tuple(target.shape)}"
        )
    source_luma = luminance(source.float())
    target_luma = luminance(target.float())
    both = torch.cat((source_luma, target_luma), dim=1)  # (B, 2, H, W)
    mean = both.mean(dim=(1, 2, 3), keepdim=True)
    std = both.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    both = (both - mean) / std

    sizes = pyramid_sizes(*source.shape[-2:], config)
    flow = both.new_zeros(both.shape[0], 2, *sizes[-1])
    for size in reversed(sizes):  # coarsest first
        level = resize_image(both, size)
        level_source, level_target = level[:, :1], level[:, 1:]
        flow = resize_flow(flow, size)
        for it in range(config.iterations):
            if PROPAGATE and it < PROP_ITERS:
                flow = propagate(level_source, level_target, flow, config)
            warped_target = backward_warp(level_target, flow)
            flow = flow + lucas_kanade_update(level_source, warped_target, inside_mask(flow), config)
        flow = separable_median(flow) if MEDIAN else flow
    return flow
