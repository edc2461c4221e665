"""Temporal super-resolution: optical-flow-guided frame interpolation."""

from stages.tsr.flow import ClassicalFlowConfig, estimate_flow
from stages.tsr.interpolator import (
    ClassicalFlowInterpolator,
    FrameInterpolator,
    interpolate_frames,
    interpolate_with_flows,
)
from stages.tsr.warp import backward_warp

__all__ = [
    "ClassicalFlowConfig",
    "ClassicalFlowInterpolator",
    "FrameInterpolator",
    "backward_warp",
    "estimate_flow",
    "interpolate_frames",
    "interpolate_with_flows",
]
