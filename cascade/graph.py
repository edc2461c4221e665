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
every leader at either end of such hops joins. Such a group does not outlive one of its processes:
a restarted actor is in no group, and when a transfer fails Ray kills both its ends and destroys
the group. `run_pipelined` then forms the groups again (`restore_direct_hops`) and runs the prompts
it lost again.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import ray

from cascade.actors import STAGE_NAMES, EncodedVideo, StageReport, StageWorker
from cascade.config import CascadeConfig, hop_backend
from cascade.groups import CONTROL_CALLS, StageGroup, join_groups, start_group, stop_group
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
    start_replica: Optional[Callable[[int], StageGroup]] = None  # starts a new group for replica i (`create_pools`)
    leader_pids: list[int] = field(default_factory=list)  # each replica's leader's process when it joined them

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


def start_replica(config: CascadeConfig, name: str, direct_transport: bool, progress_board, replica: int) -> StageGroup:
    """Replica `replica` of stage `name`: `parallel.world_size` actors, each asking for the section's
    resources (custom resources pin stages to nodes of a cluster) and named `cascade-<stage>-<replica>`
    (`-rank<r>` after the leader's name for the others). The leader sends its progress to
    `progress_board` (a `cascade.progress.ProgressBoard` actor) if given."""
    section = getattr(config.stages, name)
    index = STAGE_NAMES.index(name)
    return start_group(StageWorker, section.resources, section.parallel, name, section, config.output,
                       group_name=f"cascade-{name}-{replica}", direct_transport=direct_transport, retries=config.retries,
                       encode_output=(name == STAGE_NAMES[-1]), replica=replica, progress_board=progress_board,
                       next_stage=STAGE_NAMES[index + 1] if index + 1 < len(STAGE_NAMES) else None)


def create_pools(config: CascadeConfig, progress_board=None) -> dict[str, StagePool]:
    """Each stage's `replicas` groups (`start_replica`)."""
    hops = [hop_backend(config, producer, consumer) for producer, consumer in zip(STAGE_NAMES, STAGE_NAMES[1:])]
    pools = {}
    for index, name in enumerate(STAGE_NAMES):
        direct_ends = [hops[index - 1] if index > 0 else None, hops[index] if index < len(hops) else None]
        start = functools.partial(start_replica, config, name, any(direct_ends), progress_board)
        replicas = [start(replica) for replica in range(getattr(config.stages, name).replicas)]
        pools[name] = StagePool(name, replicas, direct=direct_ends[1], start_replica=start)
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
    for name, pool in pools.items():
        pool.leader_pids = [leader["pid"] for leader in leaders[name]]
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

    for backend, members in direct_members(pools).items():
        leaders = [group.leader for pool in members for group in pool.replicas]
        communicator = create_collective_group(leaders, backend="torch_gloo" if backend == "gloo" else "nccl")
        for pool in members:
            pool.communicators.append(communicator)


def direct_members(pools: dict[str, StagePool]) -> dict[str, list[StagePool]]:
    """backend -> the stages at either end of a hop over it, in graph order."""
    members: dict[str, list[StagePool]] = {}
    for producer, consumer in zip(STAGE_NAMES, STAGE_NAMES[1:]):
        backend = pools[producer].direct
        if backend is not None:
            stages = members.setdefault(backend, [])
            stages += [pools[name] for name in (producer, consumer) if pools[name] not in stages]
    return members


def leave_direct_hops(pools: dict[str, StagePool]) -> None:
    """Destroys the direct hops' collective groups (those Ray has not destroyed already)."""
    from ray.experimental.collective import destroy_collective_group

    communicators = {id(communicator): communicator for pool in pools.values() for communicator in pool.communicators}
    for communicator in communicators.values():
        try:
            destroy_collective_group(communicator)
        except ValueError:  # Ray destroyed it after a failed transfer
            pass
    for pool in pools.values():
        pool.communicators = []


def lost_direct_leaders(pools: dict[str, StagePool], timeout_s: float = 60.0) -> dict[tuple[str, int], Optional[int]]:
    """The leaders at a direct hop that are no longer the process that joined its collective group:
    (stage, replica) -> the restarted process's id, or None for a leader that is dead (or has not
    answered in `timeout_s`). Asked in the actors' control calls, which a long stage call does not hold up."""
    members = [(name, replica, group) for name, pool in pools.items() if pool.communicators
               for replica, group in enumerate(pool.replicas)]
    pings = [group.leader.describe.options(concurrency_group=CONTROL_CALLS).remote() for _, _, group in members]
    answered = set(ray.wait(pings, num_returns=len(pings), timeout=timeout_s)[0]) if pings else set()
    lost: dict[tuple[str, int], Optional[int]] = {}
    for (name, replica, _), ping in zip(members, pings):
        try:
            pid = ray.get(ping)["pid"] if ping in answered else None
        except ray.exceptions.RayActorError:
            pid = None
        if pid is None or pid != pools[name].leader_pids[replica]:
            lost[name, replica] = pid
    return lost


def restore_direct_hops(pools: dict[str, StagePool], lost: dict[tuple[str, int], Optional[int]],
                        patience_s: float = 30.0) -> None:
    """Forms the direct hops' collective groups again once no call is in flight: leaves the old
    groups, replaces each replica whose leader is dead (`lost`, from `lost_direct_leaders`) by a new
    one that loads its models, and joins every leader at a direct hop, restarted ones included, into
    new groups."""
    leave_direct_hops(pools)
    dead = {key for key, pid in lost.items() if pid is None}
    # Ray's gloo group is built on each process's default torch.distributed group, which outlives it
    # (`GroupMember.leave_default_group`); its NCCL groups are separate
    survivors = [group.leader for pool in direct_members(pools).get("gloo", [])
                 for replica, group in enumerate(pool.replicas) if (pool.name, replica) not in dead]
    ray.get([leader.leave_default_group.options(concurrency_group=CONTROL_CALLS).remote() for leader in survivors])
    replaced = {}
    for (name, replica), pid in lost.items():
        if pid is None:
            stop_group(pools[name].replicas[replica])
            replaced[f"{name} replica {replica}"] = (name, replica, pools[name].start_replica(replica))
        else:
            pools[name].leader_pids[replica] = pid
    loaded = join_groups({label: group for label, (_, _, group) in replaced.items()}, patience_s)
    for label, (name, replica, group) in replaced.items():
        pools[name].replicas[replica] = group
        pools[name].leader_pids[replica] = loaded[label][0]["pid"]
    connect_direct_hops(pools)


def stop_pools(pools: dict[str, StagePool]) -> None:
    """Leaves the collective groups, kills every rank and frees the placement groups."""
    leave_direct_hops(pools)
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
    retries: int = 2,
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
    `IDLE_INTERVAL_S`.

    A direct hop does not survive a dead process (see the module's docstring). When a call at a
    direct hop fails and `lost_direct_leaders` finds one of its leaders dead or restarted, the loop
    submits nothing more until every call in flight has ended, then forms the hops again
    (`restore_direct_hops`) and runs each prompt not ended again from the last input it still has:
    an object-store output, or the prompt's start (a direct output went with its group). A prompt
    runs again so at most `retries` times; after that its failure stands."""
    pending_requests = iter(requests)
    starts = starts or {}
    # report ref -> (request, stage, replica, output ref, input ref, when first unreachable)
    waiting: dict[ray.ObjectRef, tuple[Request, int, int, ray.ObjectRef, Optional[ray.ObjectRef], Optional[float]]] = {}
    again: list[tuple[float, Request, int, Optional[ray.ObjectRef], float]] = []  # (due, request, stage, input, since)
    results: dict[int, PromptResult] = {}
    inside: set[int] = set()  # prompts admitted and not ended
    held: list[tuple[Request, int, Optional[ray.ObjectRef]]] = []  # calls to submit once the direct hops are restored
    reruns_left: dict[int, int] = {}  # prompt -> how many more times a lost direct hop may run it again
    restoring = False  # a direct hop was lost: submit nothing until no call is in flight

    def start_of(request: Request) -> tuple[int, Optional[ray.ObjectRef]]:
        return starts.get(request.index, (0, None))

    def hop_lost(request: Request, stage: int) -> bool:
        """Called when the prompt's call at `stage` failed, or could not be submitted. Finds out
        whether a direct hop was lost (then the loop restores the hops once no call is in flight) and
        returns whether the prompt waits to run again after that."""
        nonlocal restoring
        if not pools[STAGE_NAMES[stage]].communicators:
            return False
        if not restoring:
            lost = lost_direct_leaders(pools)
            if not lost:
                return False
            restoring = True
            log.warning("WARNING prompt %d failed in %s and the direct hops lost %s: waiting for the calls in flight, "
                        "then forming the hops again and running the prompts not ended again", request.index,
                        STAGE_NAMES[stage], ", ".join(f"{name} replica {replica} ({'dead' if pid is None else 'restarted'})"
                                                      for (name, replica), pid in lost.items()))
        left = reruns_left.get(request.index, retries)
        if left == 0:
            return False  # its failure stands
        reruns_left[request.index] = left - 1
        held.append((request, *start_of(request)))
        return True

    def end(result: PromptResult, error: Optional[BaseException] = None, stage: Optional[int] = None) -> None:
        if error is not None:
            result.error, result.failed_stage = error, STAGE_NAMES[stage]
        record_prompt_end(result.failed_stage)
        on_done(result)
        result.video = None  # handed over: a long prompts file must not keep every video in memory
        inside.discard(result.request.index)

    def submit(request: Request, stage: int, clip: Optional[ray.ObjectRef], unreachable_since: Optional[float] = None) -> None:
        if restoring:
            held.append((request, stage, clip))
            return
        try:
            replica, output, report = pools[STAGE_NAMES[stage]].submit(clip, request)
        except Exception as error:  # Ray refuses a direct call to an actor that left the hop's collective group
            if not pools[STAGE_NAMES[stage]].communicators:
                raise
            if not hop_lost(request, stage):
                end(results[request.index], error, stage)
            return
        waiting[report] = (request, stage, replica, output, clip, unreachable_since)

    def admit() -> None:
        while len(inside) < max_in_flight and not restoring:
            request = next(pending_requests, None)
            if request is None:
                return
            results[request.index] = PromptResult(request)
            inside.add(request.index)
            submit(request, *start_of(request))

    unplaced: dict[tuple[str, int], float] = {}  # (stage, replica) -> since when its group is not placed
    checked = 0.0
    while True:
        admit()
        if not (waiting or again or held or restoring):
            break
        check_stop()
        if restoring and not waiting:
            try:
                restore_direct_hops(pools, lost_direct_leaders(pools), patience_s)
            except Exception as error:
                raise StageLost(f"the direct hops could not be formed again: {error}") from error
            restoring = False
            log.info("the direct hops are formed again; %d prompt(s) run again", len(held))
            calls, held[:] = list(held), []
            for call in calls:
                submit(*call)
            continue
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
            end(result, error, stage)
        except Exception as error:  # the stage failed: the prompt ends here, unless a direct hop was lost
            if not hop_lost(request, stage):
                end(result, error, stage)
        else:
            on_report(request, report, output)
            if stage + 1 == len(STAGE_NAMES):
                result.video = ray.get(output)
                end(result)
            elif restoring and pools[STAGE_NAMES[stage]].direct is not None:
                submit(request, *start_of(request))  # its output went with the hop's group
            else:
                submit(request, stage + 1, output)
    return list(results.values())
