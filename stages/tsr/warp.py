"""Backward warping: sample an image at positions displaced by a dense flow field, in pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """output(p) = image(p + flow(p)), bilinear, clamped to the border.

    image (B, C, H, W); flow (B, 2, H, W) in pixels, channel 0 horizontal (x), channel 1 vertical
    (y). Pixel centres sit at integer coordinates 0 … W−1 and 0 … H−1, so a zero flow returns the
    image unchanged and an integer flow shifts it by whole pixels.
    """
    height, width = image.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(height, device=flow.device, dtype=flow.dtype),
        torch.arange(width, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    x = xs + flow[:, 0]  # (B, H, W) sample positions in pixels
    y = ys + flow[:, 1]
    # grid_sample with align_corners=True maps −1 and +1 to the first and last pixel centres.
    grid = torch.stack((x * (2 / max(width - 1, 1)) - 1, y * (2 / max(height - 1, 1)) - 1), dim=-1)
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=True)
