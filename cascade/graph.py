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
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import ray

from cascade.actors import STAGE_NAMES, EncodedVideo, StageReport, StageWorker
from cascade.config import CascadeConfig, hop_backend
from cascade.groups import StageGroup, join_groups, start_group, stop_group
from cascade.metrics import record_load, record_prompt_end
from cascade.payload import Request
from cascade.signals import check_stop

log = logging.getLogger(__name__)

IDLE_INTERVAL_S = 0.5  # how often the pipeline loop calls `on_idle` while it waits
UNREACHABLE_RETRY_S = 5  # a call whose actor could not be reached is submitted again after this
PLACEMENT_CHECK_S = 2.0  # how often the pipeline loop asks whether every replica is still placed


class StageLost(Exception):
    """A stage's replica lost its node and no node has offered its resources for `patience_s`."""


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
        record_load(self.name, self.outstanding)
        leader = self.replicas[replica].leader
        task = f"{self.name} prompt {request.index}"  # the name the dashboard's Tasks and Timeline show
        if self.direct is None:
            output, report = leader.run.options(name=task).remote(clip, request)
        else:  # a direct call has one return: the report comes from a second call that takes its output
            output = leader.run_direct.options(tensor_transport=self.direct, name=task).remote(clip, request)
            report = leader.direct_report.options(name=f"{task} report").remote(output, request.index)
        return replica, output, report

    def finished(self, replica: int) -> None:
        self.outstanding[replica] -= 1
        record_load(self.name, self.outstanding)


def create_pools(config: CascadeConfig, progress_board=None) -> dict[str, StagePool]:
    """Each stage's `replicas` groups of `parallel.world_size` actors, each actor asking for the
    section's resources (custom resources pin stages to nodes of a cluster) and named
    `cascade-<stage>-<replica>` (`-rank<r>` after the leader's name for the others). The leaders
    send their progress to `progress_board` (a `cascade.progress.ProgressBoard` actor) if given."""
    hops = [hop_backend(config, producer, consumer) for producer, consumer in zip(STAGE_NAMES, STAGE_NAMES[1:])]
    pools = {}
    for index, name in enumerate(STAGE_NAMES):
        section = getattr(config.stages, name)
        direct_ends = [hops[index - 1] if index > 0 else None, hops[index] if index < len(hops) else None]
        replicas = [
            start_group(StageWorker, section.resources, section.parallel, name, section, config.output,
                        group_name=f"cascade-{name}-{replica}", direct_transport=any(direct_ends), retries=config.retries,
                        encode_output=(name == STAGE_NAMES[-1]), replica=replica, progress_board=progress_board,
                        next_stage=STAGE_NAMES[index + 1] if index + 1 < len(STAGE_NAMES) else None)
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

    # Each direct output goes back to the actor that made it, for its report (`StagePool.submit`), and
    # on to the next stage; Ray warns of that, for each output, in case one end changed the tensor
    # the other reads. `StageWorker.direct_report` only reads it.
    warnings.filterwarnings("ignore", message=r"RDT ObjectRef.*is being passed back to the actor that created it",
                            category=UserWarning)

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


def check_placed(pools: dict[str, StagePool], unplaced: dict[tuple[str, int], float], patience_s: float) -> None:
    """Notes the replicas whose placement group is not placed (its node lost) and says what they
    wait for; raises `StageLost` once one has waited `patience_s`."""
    now = time.monotonic()
    for name, pool in pools.items():
        for replica, group in enumerate(pool.replicas):
            key = (name, replica)
            if group.placed():
                if unplaced.pop(key, None) is not None:
                    log.info("%s replica %d is placed again", name, replica)
                continue
            bundle = group.rank_resources
            if key not in unplaced:
                unplaced[key] = now
                log.warning("WARNING %s replica %d lost its place (a node lost?): waiting up to %.0f s for a node "
                            "that offers %s per rank", name, replica, patience_s, bundle)
            elif now - unplaced[key] >= patience_s:
                raise StageLost(f"{name} replica {replica} lost its node and no node has offered {bundle} per rank "
                                f"for {patience_s:.0f} s")


@dataclass
class PromptResult:
    """How a prompt ended. `video` is set only while `on_done` runs."""

    request: Request
    video: Optional[EncodedVideo] = None
    error: Optional[BaseException] = None
    failed_stage: Optional[str] = None


def run_pipelined(
    pools: dict[str, StagePool],
    requests: Iterable[Request],
    max_in_flight: int,
    on_report: Callable[[Request, StageReport, ray.ObjectRef], None],
    on_done: Callable[[PromptResult], None],
    on_idle: Optional[Callable[[], None]] = None,
    starts: Optional[dict[int, tuple[int, ray.ObjectRef]]] = None,
    patience_s: float = 180.0,
) -> list[PromptResult]:
    """Runs every request through the stages with at most `max_in_flight` prompts inside the cascade.
    Calls `on_report` as each stage of each prompt finishes (with the ref of the stage's output),
    `on_done` as each prompt ends (with its video, or the error and the stage that raised it) and
    `on_idle` every `IDLE_INTERVAL_S` seconds in which nothing ended. A failed prompt does not stop
    the rest. `starts` maps a prompt's index to the stage it starts at and that stage's input (a
    resumed prompt); the others start at the first stage.

    Ray reruns a call whose actor died on the restarted actor (`retries` in the config). A call
    whose actor could not be reached (its node lost: Ray has not yet declared it dead and restarted
    the actor elsewhere) is submitted again with the same input every `UNREACHABLE_RETRY_S`, for up to
    `patience_s`. A replica whose placement group lost its node waits for a node that offers its
    resources; after `patience_s` without one, `StageLost` is raised (the prompts not ended can be
    resumed). The loop looks for a stopping signal (`cascade.signals`) at least every
    `IDLE_INTERVAL_S`."""
    pending_requests = iter(requests)
    starts = starts or {}
    # report ref -> (request, stage, replica, output ref, input ref, when first unreachable)
    waiting: dict[ray.ObjectRef, tuple[Request, int, int, ray.ObjectRef, Optional[ray.ObjectRef], Optional[float]]] = {}
    again: list[tuple[float, Request, int, Optional[ray.ObjectRef], float]] = []  # (due, request, stage, input, since)
    results: dict[int, PromptResult] = {}

    def submit(request: Request, stage: int, clip: Optional[ray.ObjectRef], unreachable_since: Optional[float] = None) -> None:
        replica, output, report = pools[STAGE_NAMES[stage]].submit(clip, request)
        waiting[report] = (request, stage, replica, output, clip, unreachable_since)

    def admit_next() -> None:
        request = next(pending_requests, None)
        if request is not None:
            results[request.index] = PromptResult(request)
            submit(request, *starts.get(request.index, (0, None)))

    for _ in range(max_in_flight):
        admit_next()
    unplaced: dict[tuple[str, int], float] = {}  # (stage, replica) -> since when its group is not placed
    checked = 0.0
    while waiting or again:
        check_stop()
        now = time.monotonic()
        if now - checked >= PLACEMENT_CHECK_S:
            check_placed(pools, unplaced, patience_s)
            checked = now
        for item in [item for item in again if item[0] <= now]:
            again.remove(item)
            submit(*item[1:])
        ready_list = ray.wait(list(waiting), num_returns=1, timeout=IDLE_INTERVAL_S)[0] if waiting else []
        if not ready_list:
            if not waiting:  # only calls due again later
                time.sleep(IDLE_INTERVAL_S)
            if on_idle is not None:
                on_idle()
            continue
        [ready] = ready_list
        request, stage, replica, output, clip, unreachable_since = waiting.pop(ready)
        pools[STAGE_NAMES[stage]].finished(replica)
        result = results[request.index]
        try:
            report = ray.get(ready)  # a report is ready only once its call's output is
        except ray.exceptions.ActorUnavailableError as error:
            since = unreachable_since or time.monotonic()
            if time.monotonic() - since < patience_s:
                log.warning("prompt %d: %s cannot reach its actor (a lost node?); trying again in %d s", request.index,
                            STAGE_NAMES[stage], UNREACHABLE_RETRY_S)
                again.append((time.monotonic() + UNREACHABLE_RETRY_S, request, stage, clip, since))
                continue
            result.error, result.failed_stage = error, STAGE_NAMES[stage]
        except Exception as error:  # the stage failed: the prompt ends here
            result.error, result.failed_stage = error, STAGE_NAMES[stage]
        else:
            on_report(request, report, output)
            if stage + 1 < len(STAGE_NAMES):
                submit(request, stage + 1, output)
                continue
            result.video = ray.get(output)
        record_prompt_end(result.failed_stage)
        on_done(result)
        result.video = None  # handed over: a long prompts file must not keep every video in memory
        admit_next()
    return list(results.values())
