"""The Ray side of the cascade: each stage's group of ranks, the DAG that links their leaders,
and the loop that pipelines many prompts through it.

    request ──► base.run ──latents──► tsr.run ──frames──► ssr.run ──► MP4 bytes
                   │                     │                   │
                   └─ report             └─ report           └─ report      (previews, timings)

A stage of several ranks (stages.<name>.parallel) is one node of the DAG all the same: its leader
takes the call and brings in the other ranks (cascade/actors.py, cascade/groups.py).

Each `dag.execute(request)` returns the three reports and the video as separate object refs, so the
driver writes a stage's preview the moment that stage finishes. Actors run their calls in
submission order, so submitting prompt k+1 while k is still in tsr keeps every stage busy.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import ray
from ray.dag import InputNode, MultiOutputNode

from cascade.actors import STAGE_NAMES, EncodedVideo, StageReport, StageWorker
from cascade.config import CascadeConfig
from cascade.groups import StageGroup, join_groups, start_group, stop_group
from cascade.payload import Request

log = logging.getLogger(__name__)

OUTPUTS = (*STAGE_NAMES, "video")  # what dag.execute returns refs to, in pipeline order


def create_groups(config: CascadeConfig) -> dict[str, StageGroup]:
    """Each stage's ranks: `parallel.world_size` actors, each asking for the section's resources
    (custom resources pin stages to nodes of a cluster), kept together by a placement group."""
    return {
        name: start_group(StageWorker, name, getattr(config.stages, name).resources, getattr(config.stages, name).parallel,
                          name, getattr(config.stages, name), config.output, encode_output=(name == "ssr"))
        for name in STAGE_NAMES
    }


def load_groups(groups: dict[str, StageGroup], patience_s: float = 30.0) -> dict[str, dict]:
    """Joins each stage's ranks and builds every model in parallel; re-raises the first rank's error
    (a `WeightsError` stays a `WeightsError`). Returns each stage leader's rank, device, node, GPUs and
    warnings. Says which stages are still waiting every `patience_s` seconds: a rank whose resources
    no node has free waits for them."""
    return {name: infos[0] for name, infos in join_groups(groups, "start", patience_s).items()}


def stop_groups(groups: dict[str, StageGroup]) -> None:
    for group in groups.values():
        stop_group(group)


def build_dag(groups: dict[str, StageGroup]) -> MultiOutputNode:
    with InputNode() as request:
        latents, base_report = groups["base"].leader.run.bind(None, request)
        frames, tsr_report = groups["tsr"].leader.run.bind(latents, request)
        video, ssr_report = groups["ssr"].leader.run.bind(frames, request)
        dag = MultiOutputNode([base_report, tsr_report, ssr_report, video])
    return dag


@dataclass
class PromptResult:
    request: Request
    video: Optional[EncodedVideo] = None
    error: Optional[BaseException] = None
    failed_stage: Optional[str] = None


def run_pipelined(
    dag: MultiOutputNode,
    requests: Iterable[Request],
    max_in_flight: int,
    on_report: Callable[[Request, StageReport], None],
    on_done: Callable[[PromptResult], None],
) -> list[PromptResult]:
    """Runs every request through the DAG with at most `max_in_flight` prompts inside the cascade.
    Calls `on_report` as each stage of each prompt finishes and `on_done` as each prompt ends (with
    its video, or the error and the stage that raised it). A failed prompt does not stop the rest."""
    pending_requests = iter(requests)
    waiting: dict[ray.ObjectRef, tuple[Request, str]] = {}  # ref -> (request, what it holds)
    outstanding: dict[int, int] = {}  # prompt index -> refs not yet finished
    results: dict[int, PromptResult] = {}
    order: list[int] = []

    def submit_next() -> bool:
        request = next(pending_requests, None)
        if request is None:
            return False
        with warnings.catch_warnings():
            # Ray 2.60 marks the classic DAG's execute() deprecated without a CPU replacement;
            # compiled graphs (experimental_compile) are the GPU path, see docs/.
            warnings.filterwarnings("ignore", message="DAGNode.execute", category=DeprecationWarning)
            refs = dag.execute(request)
        for ref, kind in zip(refs, OUTPUTS):
            waiting[ref] = (request, kind)
        outstanding[request.index] = len(refs)
        results[request.index] = PromptResult(request)
        order.append(request.index)
        return True

    while len(outstanding) < max_in_flight and submit_next():
        pass
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1)
        ref = ready[0]
        request, kind = waiting.pop(ref)
        result = results[request.index]
        try:
            value = ray.get(ref)
        except Exception as error:  # a stage failed, and every later stage of the prompt with it
            if result.error is None or OUTPUTS.index(kind) < OUTPUTS.index(result.failed_stage):
                result.error, result.failed_stage = error, kind
        else:
            if kind == "video":
                result.video = value
            else:
                on_report(request, value)
        outstanding[request.index] -= 1
        if outstanding[request.index] == 0:
            del outstanding[request.index]
            on_done(result)
            submit_next()
    return [results[index] for index in order]
