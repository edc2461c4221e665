"""The thin shell that puts one rank of a stage on one Ray actor.

`StageWorker` is a plain class: tests and users can run it without Ray. `ray.remote(StageWorker)`
places it on a node with the stage's resources (cascade/groups.py starts one per rank). It builds
its stage in `load()` (so a bad checkpoint is reported as an error of that call), and each `run()`
returns two objects: the clip for the next stage (or, for the last stage, the encoded MP4) and a
small report with timing and previews, so the driver writes previews without ever fetching the
frames.

A stage of several ranks is still one node of the graph: the leader (rank 0) is called with the
clip, starts the same call on the other ranks (its peers), which take their part through the
torch.distributed group, and reports for all of them.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import ray
import torch

from cascade.groups import GroupMember, rank_actor_name
from cascade.metrics import record_peak_memory, record_stage_call
from cascade.payload import Clip, Request
from cascade.previews import Preview, clip_frames, make_preview
from cascade.progress import progress_reporter
from cascade.video import encode_mp4

log = logging.getLogger(__name__)

STAGE_NAMES = ("base", "tsr", "ssr")


def build_stage(name: str, section, device: str, grouped: bool = False):
    """The stage object for a config section; imported here so the driver never loads models.
    With `grouped`, this process is one rank of the default torch.distributed group and the stage
    splits its work over the group as `section.parallel` says."""
    from stages.parallel import SINGLE_RANK, make_dit_parallel, world_ranks

    if name == "base":
        from stages.base.stage import BaseStage

        split = section.parallel
        parallel = make_dit_parallel(split.ulysses, split.ring, split.cfg, device) if grouped else None
        return BaseStage(section, device=device, parallel=parallel)
    ranks = world_ranks(device) if grouped else SINGLE_RANK
    if name == "tsr":
        from stages.tsr.stage import TsrStage

        return TsrStage(section, device=device, ranks=ranks)
    if name == "ssr":
        from stages.ssr.stage import SsrStage

        return SsrStage(section, device=device, ranks=ranks, warmup_frames=section.parallel.warmup_frames)
    raise ValueError(f"unknown stage {name!r}: expected one of {STAGE_NAMES}")


@dataclass(frozen=True)
class StageReport:
    stage: str
    replica: int  # which of the stage's replicas ran the call
    prompt_index: int
    input_shape: Optional[tuple]
    input_transport: Optional[str]  # how the input came: "object store" or "direct" (Ray Direct Transport)
    output_shape: tuple
    input_fps: Optional[float]
    output_fps: float
    wall_time_s: float
    started_at: float  # epoch seconds, for ordering stages across actors
    finished_at: float
    device: str
    node: str  # host name and Ray node id
    preview: Preview
    ranks: list = field(default_factory=list)  # `StageWorker.describe()` of every rank, leader first
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedVideo:
    mp4: bytes
    shape: tuple  # (T, H, W, 3)
    fps: float


def _device_for(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _can_send_over_nccl(device: str) -> bool:
    """Whether Ray Direct Transport can send from this process over NCCL (a GPU, and CuPy for Ray)."""
    if not device.startswith("cuda"):
        return False
    from ray.util.collective.collective import nccl_available

    return nccl_available()


def _describe_node() -> str:
    if ray.is_initialized():
        return f"{platform.node()} ({ray.get_runtime_context().get_node_id()})"
    return platform.node()


class StageWorker(GroupMember):
    def __init__(self, name: str, section, output_config, encode_output: bool = False, replica: int = 0,
                 rank: int = 0, world_size: int = 1, progress_board=None, next_stage: Optional[str] = None):
        if name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}: expected one of {STAGE_NAMES}")
        self.name = name
        self.section = section
        self.output_config = output_config
        self.encode_output = encode_output
        self.replica, self.rank, self.world_size = replica, rank, world_size
        self.peers: list = []  # the leader's handles of ranks 1, 2, …
        self.stage = None
        self.device = _device_for(section.resources.num_gpus)
        self.progress_board = progress_board  # a `cascade.progress.ProgressBoard` actor, or None
        self.hop = f"{name}->{next_stage or 'driver'}"  # where this stage's output goes, for the metrics
        self.direct_reports: dict[int, StageReport] = {}  # prompt index -> report of its `run_direct` call

    def __repr__(self) -> str:
        """How Ray's log lines and the dashboard name this actor: `cascade-base-0`, `cascade-base-0-rank1`."""
        return rank_actor_name(f"cascade-{self.name}-{self.replica}", self.rank)

    def start(self, address: Optional[tuple[str, int]] = None, peers: list = ()) -> dict:
        """Joins the group at `address` (a group of several ranks; see cascade/groups.py), keeps the
        peers a leader calls, and loads the stage."""
        if address is not None:
            self.join_group(*address)
        self.peers = list(peers)
        return self.load()

    def load(self) -> dict:
        """Builds the stage's models (reading weights); returns the rank, device, node and warnings."""
        if self.stage is None:
            self.stage = build_stage(self.name, self.section, self.device, grouped=self.world_size > 1)
        return {**self.describe(), "warnings": list(self.stage.warnings), "nccl": _can_send_over_nccl(self.device)}

    def describe(self) -> dict:
        """This rank's place: its device, its node and the node's GPUs Ray gave it (ids; empty on CPUs)."""
        gpus = [str(gpu) for gpu in ray.get_gpu_ids()] if ray.is_initialized() else []
        return {"rank": self.rank, "device": _describe_device(self.device), "node": _describe_node(), "gpus": gpus,
                "pid": os.getpid()}

    @ray.method(num_returns=2)
    def run(self, clip: Optional[Clip], request: Request):
        """The leader returns (clip or video, report); another rank (None, its description)."""
        output, report = self.compute(clip, request)
        if self.rank != 0:
            return None, report
        if self.encode_output:
            frames = clip_frames(output)
            out = self.output_config
            sent = EncodedVideo(encode_mp4(frames, output.fps, out.video_quality), frames.shape, output.fps)
            self.record(report, len(sent.mp4), "object store")
            return sent, report
        sent = replace(output, data=output.numpy())  # numpy: the object store's fast form
        self.record(report, sent.data.nbytes, "object store")
        return sent, report

    def record(self, report: StageReport, sent_bytes: int, transport: str) -> None:
        """The call's figures for Ray's metrics endpoint (cascade/metrics.py)."""
        batch, _, frames = report.output_shape[:3]  # (B, C, T, H, W); base: latent frames
        record_stage_call(self.name, self.replica, report.node, report.wall_time_s, batch * frames, self.hop, transport,
                          sent_bytes)

    def run_direct(self, clip: Optional[Clip], request: Request) -> Clip:
        """The leader's call when its output goes by Ray Direct Transport (called with
        `.options(tensor_transport=…)`): the stage's clip, a tensor on this rank's device, which Ray
        sends straight to the next stage. Such a call has one return, so its report waits here for
        `direct_report`."""
        output, report = self.compute(clip, request)
        self.direct_reports[request.index] = report
        self.record(report, output.data.nbytes, "direct")
        return output

    def direct_report(self, output: Clip, prompt_index: int) -> StageReport:
        """The report of the `run_direct` call that made `output`. The driver passes that call's
        output ref, so Ray runs this call only once that call has ended (whatever order the two calls
        reach the actor in, retries included) and, if it failed, fails this one with its error. The
        clip comes from this actor's own store: nothing is copied."""
        report = self.direct_reports.pop(prompt_index, None)
        if report is None:
            raise RuntimeError(f"{self!r} holds no report of prompt {prompt_index}'s direct call (was the actor "
                               "restarted since it made the output, or was the report taken already?)")
        return report

    def compute(self, clip: Optional[Clip], request: Request) -> tuple[Optional[Clip], Any]:
        """Runs the stage (with the peers, on a leader): (its output, its report) on the leader,
        (None, this rank's description) on another rank."""
        self.load()
        peer_calls = [peer.run.options(name=f"{self.name} prompt {request.index} rank {rank}").remote(None, request)
                      for rank, peer in enumerate(self.peers, start=1)]  # they join this call
        progress = None
        if self.rank == 0 and self.progress_board is not None:
            progress = progress_reporter(self.progress_board, request.index, self.name)
        started_at, started = time.time(), time.perf_counter()
        output = self.stage(clip, request, progress=progress)
        wall_time, finished_at = time.perf_counter() - started, time.time()
        ranks = [self.describe(), *(ray.get([description for _, description in peer_calls]) if peer_calls else [])]
        record_peak_memory(self.name, self.replica, self.rank, ranks[0]["node"], self.device)
        if self.rank != 0:
            return None, ranks[0]
        out = self.output_config
        return output, StageReport(
            stage=self.name,
            replica=self.replica,
            prompt_index=request.index,
            input_shape=clip.shape if clip is not None else None,
            input_transport=None if clip is None else "direct" if isinstance(clip.data, torch.Tensor) else "object store",
            output_shape=output.shape,
            input_fps=clip.fps if clip is not None else None,
            output_fps=output.fps,
            wall_time_s=round(wall_time, 3),
            started_at=started_at,
            finished_at=finished_at,
            device=ranks[0]["device"],
            node=ranks[0]["node"],
            preview=make_preview(output, out.preview_max_side, out.contact_sheet_frames),
            ranks=ranks,
            notes=dict(output.notes),
        )
