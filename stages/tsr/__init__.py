"""Temporal super-resolution: optical-flow-guided frame interpolation, classical or learned."""

from stages.tsr.flow import ClassicalFlowConfig, estimate_flow
from stages.tsr.interpolator import (
    ClassicalFlowInterpolator,
    FrameInterpolator,
    interpolate_frames,
    interpolate_with_flows,
)
from stages.tsr.learned import LearnedInterpolator, LearnedInterpolatorConfig
from stages.tsr.warp import backward_warp

__all__ = [
    "ClassicalFlowConfig",
    "ClassicalFlowInterpolator",
    "FrameInterpolator",
    "LearnedInterpolator",
    "LearnedInterpolatorConfig",
    "backward_warp",
    "estimate_flow",
    "interpolate_frames",
    "interpolate_with_flows",
]
