"""The cascade's figures, exported with `ray.util.metrics` to Ray's Prometheus endpoint (each node's
metrics export port; Ray puts `ray_` before each name) and so to the dashboard's Metrics view once
Prometheus and Grafana are attached (`ray metrics launch-prometheus`; docs/grafana/ holds the
cascade's Grafana dashboard):

    name (after Ray's prefix)            kind       tags                       recorded by
    ray_cascade_stage_seconds            histogram  stage, replica, node       the stage's leader, per call
    ray_cascade_frames_produced_total    counter    stage, replica             the stage's leader, per call
    ray_cascade_hop_bytes_total          counter    hop, transport             the producing leader, per call
    ray_cascade_peak_memory_bytes        gauge      stage, replica, rank, node every rank, per call
    ray_cascade_prompts_in_flight        gauge      stage                      the driver
    ray_cascade_prompts_queued           gauge      stage                      the driver
    ray_cascade_prompts_finished_total   counter    (none)                     the driver
    ray_cascade_prompts_failed_total     counter    stage                      the driver

In flight: prompts whose call a stage's replicas hold (running or queued); queued: those of them
waiting behind another call on their replica. Ray 2.60 exports a histogram's `_sum` from the
midpoints of the buckets its samples fell in, not from the samples, so a mean taken as sum/count is
only as fine as `STAGE_SECONDS_BOUNDARIES`; the counts per bucket are exact. Peak memory is the device's (CUDA's allocator peak on
a GPU, the process's peak resident memory on the CPU) since the rank started.
"""

from __future__ import annotations

import functools
import resource
import sys

import torch
from ray.util.metrics import Counter, Gauge, Histogram

STAGE_SECONDS_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]


@functools.cache
def _stage_metrics() -> dict:
    """Created once per process, on first use (a metric belongs to the process that records it)."""
    return {
        "seconds": Histogram("cascade_stage_seconds", "Wall time of one stage call (seconds)",
                             boundaries=STAGE_SECONDS_BOUNDARIES, tag_keys=("stage", "replica", "node")),
        "frames": Counter("cascade_frames_produced", "Frames (latent frames for base) a stage produced",
                          tag_keys=("stage", "replica")),
        "hop_bytes": Counter("cascade_hop_bytes", "Bytes a stage handed to the next one (or the video to the driver)",
                             tag_keys=("hop", "transport")),
        "peak_memory": Gauge("cascade_peak_memory_bytes", "Peak device memory of a stage's rank (bytes)",
                             tag_keys=("stage", "replica", "rank", "node")),
    }


@functools.cache
def _driver_metrics() -> dict:
    return {
        "in_flight": Gauge("cascade_prompts_in_flight", "Prompts a stage's replicas hold, running or queued",
                           tag_keys=("stage",)),
        "queued": Gauge("cascade_prompts_queued", "Prompts waiting behind another call on a stage's replica",
                        tag_keys=("stage",)),
        "finished": Counter("cascade_prompts_finished", "Prompts whose video was written"),
        "failed": Counter("cascade_prompts_failed", "Prompts that failed, by the stage that failed",
                          tag_keys=("stage",)),
    }


def peak_memory_bytes(device: str) -> int:
    """CUDA's allocator peak on a GPU; on the CPU the process's peak resident memory."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def record_stage_call(stage: str, replica: int, node: str, seconds: float, frames: int, hop: str, transport: str,
                      hop_bytes: int) -> None:
    """A leader's figures of one call."""
    metrics = _stage_metrics()
    metrics["seconds"].observe(seconds, tags={"stage": stage, "replica": str(replica), "node": node})
    if frames > 0:  # a counter only goes up
        metrics["frames"].inc(frames, tags={"stage": stage, "replica": str(replica)})
    if hop_bytes > 0:
        metrics["hop_bytes"].inc(hop_bytes, tags={"hop": hop, "transport": transport})


def record_peak_memory(stage: str, replica: int, rank: int, node: str, device: str) -> None:
    _stage_metrics()["peak_memory"].set(peak_memory_bytes(device), tags={
        "stage": stage, "replica": str(replica), "rank": str(rank), "node": node})


def record_load(stage: str, outstanding: list[int]) -> None:
    """The driver's view of one stage's replicas: calls each holds (one runs, the rest queue)."""
    metrics = _driver_metrics()
    metrics["in_flight"].set(sum(outstanding), tags={"stage": stage})
    metrics["queued"].set(sum(max(count - 1, 0) for count in outstanding), tags={"stage": stage})


def record_prompt_end(failed_stage: str | None) -> None:
    metrics = _driver_metrics()
    if failed_stage is None:
        metrics["finished"].inc()
    else:
        metrics["failed"].inc(tags={"stage": failed_stage})
