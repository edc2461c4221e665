"""Frame interpolation guided by optical flow, and the loop that raises a clip's frame rate with it.

For a pair (frame 0, frame 1) and a time t in (0, 1) the classical interpolator:

1. estimates flow both ways once, F01 and F10 (`estimate_flow`), so frame0(p) ≈ frame1(p + F01(p));
2. finds, for every pixel q of the unseen frame t, where it came from in frame 0 and where it goes in
   frame 1 under linear motion: F_t0(q) = −t·F01(q + F_t0(q)) and F_t1(q) = −(1−t)·F10(q + F_t1(q)).
   The equations are solved by fixed-point iteration started from the linear combination of Super
   SloMo (Jiang et al. 2018), F_t0 ≈ −(1−t)t·F01 + t²·F10 and F_t1 ≈ (1−t)²·F01 − t(1−t)·F10,
   which alone smears motion edges. Where the iteration does not settle, no pixel of that frame
   lands on q: q is hidden in it;
3. warps both frames to t and blends them, each weighted by its temporal closeness ((1−t) or t),
   by how well its fixed point settled, and by whether the source pixel is seen in the other frame
   too (forward–backward consistency). A pixel about to be covered or just uncovered is therefore
   taken from the one frame that shows it.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

from stages.pixels import to_model_range, to_uint8
from stages.tsr.flow import ClassicalFlowConfig, estimate_flow
from stages.tsr.warp import backward_warp

MAX_FACTOR = 8
FIXED_POINT_ITERATIONS = 4  # the Super SloMo start is close; each step is one warp of a flow
CONSISTENCY_RELATIVE = 0.01  # tolerance on |residual|² as a share of |flow|² (Sundaram et al. 2010)
CONSISTENCY_ABSOLUTE = 0.5  # tolerance on |residual|², in pixels²
HIDDEN_WEIGHT = 0.05  # weight of a source pixel that the other frame does not show, relative to 1


class FrameInterpolator(Protocol):
    """Anything that renders frames between two: classical here, learned later."""

    def __call__(self, frame0: torch.Tensor, frame1: torch.Tensor, times: list[float]) -> torch.Tensor:
        """frame0, frame1 (B, C, H, W), times in [0, 1] → (len(times), B, C, H, W)."""
        ...


def consistency(residual: torch.Tensor, flow_a: torch.Tensor, flow_b: torch.Tensor) -> torch.Tensor:
    """Soft agreement in (0, 1], (B, 1, H, W): 1 where the residual (B, 2, H, W) is 0, falling off
    past a tolerance that grows with the magnitudes of the two flows compared."""
    tolerance = CONSISTENCY_RELATIVE * (flow_a.square().sum(1, keepdim=True) + flow_b.square().sum(1, keepdim=True))
    return torch.exp(-residual.square().sum(1, keepdim=True) / (tolerance + CONSISTENCY_ABSOLUTE))


def seen_in_other_frame(flow_ab: torch.Tensor, flow_ba: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): how surely each pixel of frame a reappears in frame b, by going there along
    flow_ab and coming back along flow_ba."""
    flow_back = backward_warp(flow_ba, flow_ab)
    return consistency(flow_ab + flow_back, flow_ab, flow_back)


def flow_from_time(flow_ab: torch.Tensor, flow_ba: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow from the frame at `fraction` of the way from a to b back to frame a, and how well it settled.

    Solves F(q) = −fraction·flow_ab(q + F(q)) by fixed-point iteration. Returns F (B, 2, H, W) and
    the agreement (B, 1, H, W) of the last iterate with its own equation.
    """
    flow = -(1 - fraction) * fraction * flow_ab + fraction**2 * flow_ba  # Super SloMo approximation
    for _ in range(FIXED_POINT_ITERATIONS):
        flow = -fraction * backward_warp(flow_ab, flow)
    moved = -fraction * backward_warp(flow_ab, flow)
    return flow, consistency(flow - moved, flow, moved)


def interpolate_with_flows(
    frame0: torch.Tensor, frame1: torch.Tensor, flow_01: torch.Tensor, flow_10: torch.Tensor, times: list[float]
) -> torch.Tensor:
    """Frames at `times` between frame0 and frame1 (B, C, H, W), given the flows between them.

    flow_01, flow_10 (B, 2, H, W) in pixels: frame0(p) ≈ frame1(p + flow_01(p)) and the reverse.
    Returns (len(times), B, C, H, W); t = 0 and t = 1 give the inputs exactly.
    """
    flow_01, flow_10 = flow_01.float(), flow_10.float()
    seen_0 = seen_in_other_frame(flow_01, flow_10)  # (B, 1, H, W) on frame 0's grid
    seen_1 = seen_in_other_frame(flow_10, flow_01)
    frames = []
    for t in times:
        if t == 0 or t == 1:
            frames.append((frame0 if t == 0 else frame1).clone())
            continue
        flow_t0, settled_0 = flow_from_time(flow_01, flow_10, t)
        flow_t1, settled_1 = flow_from_time(flow_10, flow_01, 1 - t)
        # A tiny floor keeps the division defined where neither frame shows q: a plain blend there.
        weight_0 = (1 - t) * (settled_0 * (backward_warp(seen_0, flow_t0) + HIDDEN_WEIGHT) + 1e-6)
        weight_1 = t * (settled_1 * (backward_warp(seen_1, flow_t1) + HIDDEN_WEIGHT) + 1e-6)
        warped_0 = backward_warp(frame0.float(), flow_t0)
        warped_1 = backward_warp(frame1.float(), flow_t1)
        fused = (weight_0 * warped_0 + weight_1 * warped_1) / (weight_0 + weight_1)
        frames.append(fused.to(frame0.dtype))
    return torch.stack(frames)


class ClassicalFlowInterpolator:
    """Interpolates between two frames with classical optical flow and occlusion-aware blending."""

    def __init__(self, config: Optional[ClassicalFlowConfig] = None) -> None:
        self.config = config or ClassicalFlowConfig()

    def __call__(self, frame0: torch.Tensor, frame1: torch.Tensor, times: list[float]) -> torch.Tensor:
        """frame0, frame1 (B, C, H, W), times in [0, 1] → (len(times), B, C, H, W); t = 0 and t = 1
        return the inputs exactly."""
        if frame0.dim() != 4 or frame0.shape != frame1.shape:
            raise ValueError(
                f"frame0 and frame1 must both be (B, C, H, W) of one shape, got {tuple(frame0.shape)} "
                f"and {tuple(frame1.shape)}"
            )
        for t in times:
            if not 0 <= t <= 1:
                raise ValueError(f"interpolation times must lie in [0, 1], got {t}")
        batch = frame0.shape[0]
        # Both directions in one batch: (2B, 2, H, W), forward flows first.
        flows = estimate_flow(torch.cat((frame0, frame1)), torch.cat((frame1, frame0)), self.config)
        return interpolate_with_flows(frame0, frame1, flows[:batch], flows[batch:], times)


def blend_linearly(frame0: torch.Tensor, frame1: torch.Tensor, times: list[float]) -> torch.Tensor:
    """The baseline a flow-based interpolator must beat: (1 − t)·frame0 + t·frame1 for each t,
    (len(times), B, C, H, W)."""
    return torch.stack([(1 - t) * frame0 + t * frame1 for t in times])


def interpolate_frames(
    frames: torch.Tensor,
    factor: int,
    interpolator: FrameInterpolator,
    progress: Optional[Callable[[int, int], None]] = None,
    pairs_per_batch: int = 8,
) -> torch.Tensor:
    """Raise the frame rate of a clip by an integer factor.

    frames (T, C, H, W) → ((T − 1)·factor + 1, C, H, W): factor − 1 new frames between each
    neighbouring pair, the originals kept exactly at positions i·factor. Frames are float in
    [−1, 1] or uint8; uint8 frames are brought to [−1, 1] a batch at a time and the new frames
    rounded back, so a long uint8 clip never exists in float. Pairs go through the interpolator
    `pairs_per_batch` at a time to bound memory; `progress(done_pairs, total_pairs)` is called
    after each batch.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or not 1 <= factor <= MAX_FACTOR:
        raise ValueError(f"factor must be an int from 1 to {MAX_FACTOR}, got {factor!r}")
    if frames.dim() != 4 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (T, C, H, W) with T >= 1, got shape {tuple(frames.shape)}")
    as_uint8 = frames.dtype == torch.uint8
    if not (frames.is_floating_point() or as_uint8):
        raise ValueError(f"frames must be floating point in [-1, 1] or uint8, got {frames.dtype}")
    if pairs_per_batch < 1:
        raise ValueError(f"pairs_per_batch must be >= 1, got {pairs_per_batch}")
    if factor == 1 or frames.shape[0] == 1:
        return frames
    total_pairs = frames.shape[0] - 1
    times = [step / factor for step in range(1, factor)]
    output = frames.new_empty(total_pairs * factor + 1, *frames.shape[1:])
    output[::factor] = frames
    for start in range(0, total_pairs, pairs_per_batch):
        stop = min(start + pairs_per_batch, total_pairs)
        batch = to_model_range(frames[start : stop + 1]) if as_uint8 else frames[start : stop + 1]
        middles = interpolator(batch[:-1], batch[1:], times)  # (factor−1, P, C, H, W)
        if as_uint8:
            middles = to_uint8(middles)
        for step in range(1, factor):
            output[start * factor + step : stop * factor : factor] = middles[step - 1]
        if progress is not None:
            progress(stop, total_pairs)
    return output
