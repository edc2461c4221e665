"""The Ray side of the cascade: each stage's replicas, the routing of every call to the least-loaded
one, and the loop that pipelines many prompts through the stage graph.

    request ──► base ──latents──► tsr ──frames──► ssr ──► MP4 bytes        (STAGE_NAMES: the graph)
                 │                 │                │
                 └─ report         └─ report        └─ report               (previews, timings)

Each stage is a `StagePool` of `stages.<name>.replicas` groups of ranks (cascade/groups.py); a group's
leader takes the stage's calls. When a prompt's stage finishes, the driver hands the object ref of
its output to the next stage's least-loaded replica, so data goes from actor to actor and never
through the driver, and any replica of the next stage may take any prompt. A replica runs its calls
in the order given, so calls queued on it keep it busy; `max_in_flight` bounds the prompts inside
the cascade, and with them the memory their clips hold.

A hop goes through Ray's object store as numpy, or, between GPU stages (`transport`, see
`cascade.config.hop_backend`), by Ray Direct Transport: the producing leaders' outputs are torch
tensors that Ray sends to the consuming leader over a collective group (NCCL; gloo on CPUs) that
every leader at either end of such hops joins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import ray

from cascade.actors import STAGE_NAMES, EncodedVideo, StageReport, StageWorker
from cascade.config import CascadeConfig, hop_backend
from cascade.groups import StageGroup, join_groups, start_group, stop_group
from cascade.payload import Request

log = logging.getLogger(__name__)


@dataclass
class StagePool:
    """A stage's replicas and the calls each one holds; a call goes to the one holding fewest (ties:
    the one that has taken fewest so far, then the first)."""

    name: str
    replicas: list[StageGroup]
    direct: Optional[str] = None  # backend of the Ray Direct Transport of its outputs (None: object store)
    outstanding: list[int] = field(default_factory=list)  # calls submitted and not yet finished
    taken: list[int] = field(default_factory=list)  # calls submitted in all
    communicators: list = field(default_factory=list)  # the collective groups its leaders joined

    def __post_init__(self) -> None:
        self.outstanding = [0] * len(self.replicas)
        self.taken = [0] * len(self.replicas)

    def submit(self, clip: Optional[ray.ObjectRef], request: Request) -> tuple[int, ray.ObjectRef, ray.ObjectRef]:
        """(replica, output ref, report ref) of the stage's call on its least-loaded replica."""
        replica = min(range(len(self.replicas)), key=lambda index: (self.outstanding[index], self.taken[index], index))
        self.outstanding[replica] += 1
        self.taken[replica] += 1
        leader = self.replicas[replica].leader
        if self.direct is None:
            output, report = leader.run.remote(clip, request)
        else:  # a direct call has one return: the report follows in the next call
            output = leader.run_direct.options(tensor_transport=self.direct).remote(clip, request)
            report = leader.last_report.remote()
        return replica, output, report

    def finished(self, replica: int) -> None:
        self.outstanding[replica] -= 1


def create_pools(config: CascadeConfig) -> dict[str, StagePool]:
    """Each stage's `replicas` groups of `parallel.world_size` actors, each actor asking for the
    section's resources (custom resources pin stages to nodes of a cluster)."""
    hops = [hop_backend(config, producer, consumer) for producer, consumer in zip(STAGE_NAMES, STAGE_NAMES[1:])]
    pools = {}
    for index, name in enumerate(STAGE_NAMES):
        section = getattr(config.stages, name)
        direct_ends = [hops[index - 1] if index > 0 else None, hops[index] if index < len(hops) else None]
        replicas = [
            start_group(StageWorker, section.resources, section.parallel, name, section, config.output,
                        direct_transport=any(direct_ends), encode_output=(name == STAGE_NAMES[-1]), replica=replica)
            for replica in range(section.replicas)
        ]
        pools[name] = StagePool(name, replicas, direct=direct_ends[1])
    return pools


def load_pools(pools: dict[str, StagePool], patience_s: float = 30.0) -> dict[str, list[dict]]:
    """Joins every group's ranks and builds every model in parallel; re-raises the first rank's error
    (a `WeightsError` stays a `WeightsError`). Returns, per stage, each replica's leader's rank,
    device, node, GPUs and warnings. Says which are still waiting every `patience_s` seconds: a rank
    whose resources no node has free waits for them."""
    def label(name: str, replica: int) -> str:
        return name if len(pools[name].replicas) == 1 else f"{name} replica {replica}"

    groups = {label(name, replica): group for name, pool in pools.items() for replica, group in enumerate(pool.replicas)}
    loaded = join_groups(groups, patience_s)
    leaders = {name: [loaded[label(name, replica)][0] for replica in range(len(pool.replicas))]
               for name, pool in pools.items()}
    for producer, consumer in zip(STAGE_NAMES, STAGE_NAMES[1:]):
        ends = [leader for name in (producer, consumer) for leader in leaders[name]]
        if pools[producer].direct == "nccl" and not all(leader["nccl"] for leader in ends):
            log.warning("%s -> %s goes through the object store: NCCL direct transport needs a GPU that torch "
                        "sees and CuPy for Ray (pip install cupy-cuda12x) on both ends (devices: %s)",
                        producer, consumer, ", ".join(sorted({leader["device"] for leader in ends})))
            pools[producer].direct = None
    connect_direct_hops(pools)
    return leaders


def connect_direct_hops(pools: dict[str, StagePool]) -> None:
    """One Ray collective group per direct backend, of the leaders of every stage at either end of a
    hop that uses it (an actor joins at most one group per backend)."""
    from ray.experimental.collective import create_collective_group

    for backend in {pool.direct for pool in pools.values()} - {None}:
        members: list[StagePool] = []  # the stages at either end of a hop over `backend`, in graph order
        for producer, consumer in zip(STAGE_NAMES, STAGE_NAMES[1:]):
            if pools[producer].direct == backend:
                members += [pools[name] for name in (producer, consumer) if pools[name] not in members]
        leaders = [group.leader for pool in members for group in pool.replicas]
        communicator = create_collective_group(leaders, backend="torch_gloo" if backend == "gloo" else "nccl")
        for pool in members:
            pool.communicators.append(communicator)


def stop_pools(pools: dict[str, StagePool]) -> None:
    """Leaves the collective groups, kills every rank and frees the placement groups."""
    from ray.experimental.collective import destroy_collective_group

    communicators = {id(communicator): communicator for pool in pools.values() for communicator in pool.communicators}
    for communicator in communicators.values():
        destroy_collective_group(communicator)
    for pool in pools.values():
        for group in pool.replicas:
            stop_group(group)


@dataclass
class PromptResult:
    request: Request
    video: Optional[EncodedVideo] = None
    error: Optional[BaseException] = None
    failed_stage: Optional[str] = None


def run_pipelined(
    pools: dict[str, StagePool],
    requests: Iterable[Request],
    max_in_flight: int,
    on_report: Callable[[Request, StageReport], None],
    on_done: Callable[[PromptResult], None],
) -> list[PromptResult]:
    """Runs every request through the stages with at most `max_in_flight` prompts inside the cascade.
    Calls `on_report` as each stage of each prompt finishes and `on_done` as each prompt ends (with
    its video, or the error and the stage that raised it). A failed prompt does not stop the rest."""
    pending_requests = iter(requests)
    waiting: dict[ray.ObjectRef, tuple[Request, int, int, ray.ObjectRef]] = {}  # report -> (request, stage, replica, output)
    results: dict[int, PromptResult] = {}

    def submit(request: Request, stage: int, clip: Optional[ray.ObjectRef]) -> None:
        replica, output, report = pools[STAGE_NAMES[stage]].submit(clip, request)
        waiting[report] = (request, stage, replica, output)

    def admit_next() -> None:
        request = next(pending_requests, None)
        if request is not None:
            results[request.index] = PromptResult(request)
            submit(request, 0, None)

    for _ in range(max_in_flight):
        admit_next()
    while waiting:
        [ready], _ = ray.wait(list(waiting), num_returns=1)
        request, stage, replica, output = waiting.pop(ready)
        pools[STAGE_NAMES[stage]].finished(replica)
        result = results[request.index]
        try:
            report = ray.get(ready)  # the call's two returns are ready together
        except Exception as error:  # the stage failed: the prompt ends here
            result.error, result.failed_stage = error, STAGE_NAMES[stage]
        else:
            on_report(request, report)
            if stage + 1 < len(STAGE_NAMES):
                submit(request, stage + 1, output)
                continue
            result.video = ray.get(output)
        on_done(result)
        admit_next()
    return list(results.values())
