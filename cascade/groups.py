"""A stage's ranks on Ray: one actor per rank, kept together by a placement group and joined into
one torch.distributed group (NCCL on GPUs, gloo on CPUs), so that they compute as one model.

    placement group [bundle 0 | bundle 1 | … ]       each bundle: the stage's `resources`
                       │          │
                    rank 0     rank 1   …            actors; rank 0 leads: it is the stage's node of
                       └─ TCP store ─┘               the graph and starts the others' part of each call

A group of one rank is the same with no torch.distributed group. `check_placement` tells, before any
actor starts, whether the cluster could ever place every group; `start_group` and `join_groups`
start the ranks, join them and load their models.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cascade.errors import UserError
from cascade.signals import check_stop

log = logging.getLogger(__name__)

GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # a collective waiting longer than this fails
EPSILON = 1e-9  # fractional resources (0.5 GPU) compare with a tolerance
CONTROL_CALLS = "control"  # the concurrency group of a direct-transport actor's quick calls (`start_group`)


def rank_bundle(resources) -> dict[str, float]:
    """What one rank asks for, as a placement-group bundle: {"CPU": …, "GPU": …, custom…}."""
    bundle = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.custom}
    return {key: float(value) for key, value in bundle.items() if value > 0}


# --------------------------------------------------------------------------------------------------
# Can the cluster place the groups?


def _fits(bundle: dict[str, float], node: dict[str, float], count: int = 1) -> bool:
    return all(node.get(key, 0.0) + EPSILON >= count * value for key, value in bundle.items())


def _copies_on(bundle: dict[str, float], node: dict[str, float]) -> int:
    return min(int((node.get(key, 0.0) + EPSILON) // value) for key, value in bundle.items())


def _describe(resources: dict[str, float]) -> str:
    shown = {key: (int(value) if float(value).is_integer() else value) for key, value in sorted(resources.items())
             if key in ("CPU", "GPU") or not (key.startswith("node:") or key in ("memory", "object_store_memory"))}
    return "{" + ", ".join(f"{key}: {value}" for key, value in shown.items()) + "}"


def placement_problem(key: str, bundle: dict[str, float], count: int, strategy: str,
                      nodes: list[dict[str, float]]) -> str | None:
    """Why `count` bundles placed with `strategy` can never fit nodes of these total resources, or
    None when they can. `key` names the config section in the message."""
    ask = f"{key} asks for {count} rank(s) of {_describe(bundle)}"
    if strategy == "STRICT_PACK":
        if any(_fits(bundle, node, count) for node in nodes):
            return None
        total = {name: value * count for name, value in bundle.items()}
        largest = max(nodes, key=lambda node: _copies_on(bundle, node), default={})
        return (f"{ask} on one node (placement STRICT_PACK), {_describe(total)} in all, but no node offers "
                f"that (the best offers {_describe(largest)}): use fewer ranks or {key}.placement=PACK")
    if sum(_copies_on(bundle, node) for node in nodes) >= count:
        return None
    offered = {name: sum(node.get(name, 0.0) for node in nodes) for name in bundle}
    return f"{ask} (placement {strategy}), but the whole cluster offers {_describe(offered)}: use fewer ranks"


def stage_groups(config) -> list[tuple[str, dict[str, float], int, str]]:
    """(stage, bundle of a rank, ranks, placement) of every group the config asks for, one per replica."""
    from cascade.actors import STAGE_NAMES

    groups = []
    for name in STAGE_NAMES:
        section = getattr(config.stages, name)
        group = (name, rank_bundle(section.resources), section.parallel.world_size, section.parallel.placement)
        groups += [group] * section.replicas
    return groups


def requested_resources(config) -> dict[str, float]:
    """What all ranks of all replicas of all stages ask for together."""
    total: dict[str, float] = {}
    for _, bundle, count, _ in stage_groups(config):
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + count * value
    return total


def check_machine(config) -> None:
    """Raises `UserError` when this one machine (a local Ray's only node) offers less than all ranks
    of all replicas of all stages ask for together, naming the overrides that run it anyway."""
    from cascade.actors import STAGE_NAMES

    [node] = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    needed = requested_resources(config)
    short = sorted(key for key, value in needed.items() if node.get(key, 0.0) + EPSILON < value)
    if not short:
        return
    fixes = []
    for name in STAGE_NAMES:
        resources = getattr(config.stages, name).resources
        if "GPU" in short and resources.num_gpus > 0:
            fixes.append(f"stages.{name}.resources.num_gpus=0")
        fixes += [f"stages.{name}.resources.custom.{key}=0" for key in short if resources.custom.get(key, 0) > 0]
    offered = {key: node.get(key, 0.0) for key in needed}
    fix = f"to run it here anyway, add {' '.join(fixes)}" if fixes else "lower stages.<stage>.replicas or .parallel"
    raise UserError(f"the stages ask for {_describe(needed)} and this machine offers {_describe(offered)} "
                    f"(short of {', '.join(short)}): {fix}")


def check_placement(config) -> None:
    """Raises `UserError` naming the first stage whose ranks the connected Ray cluster can never
    place (by its nodes' total resources): one of its groups alone, or all replicas of all stages
    together, packed largest first (a STRICT_PACK group on one node, other ranks anywhere)."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    groups = stage_groups(config)
    for name, bundle, count, strategy in groups:
        problem = placement_problem(f"stages.{name}.parallel", bundle, count, strategy, nodes)
        if problem:
            raise UserError(problem)
    free = [dict(node) for node in nodes]
    for name, bundle, count, strategy in sorted(
        groups, key=lambda group: tuple(-group[2] * group[1].get(key, 0.0) for key in ("GPU", "CPU"))
    ):
        for piece in [count] if strategy == "STRICT_PACK" else [1] * count:
            node = next((node for node in free if _fits(bundle, node, piece)), None)
            if node is None:
                needed = requested_resources(config)
                offered = {key: sum(node.get(key, 0.0) for node in nodes) for key in needed}
                raise UserError(
                    f"the stages' ranks together ask for {_describe(needed)} and cannot all be placed on this "
                    f"cluster ({len(nodes)} node(s), {_describe(offered)} in all): stages.{name} does not fit "
                    f"beside the others; lower stages.<stage>.replicas, .parallel or .resources"
                )
            for key, value in bundle.items():
                node[key] -= piece * value


# --------------------------------------------------------------------------------------------------
# One rank of a group


class GroupMember:
    """What an actor needs to be one rank of a torch.distributed group. The actor class sets `rank`,
    `world_size` and `device` ("cpu" or "cuda") and defines `start(address, peers)`, which
    `join_groups` calls on every rank: it joins the group at `address` (None for one rank)."""

    rank: int
    world_size: int
    device: str

    def open_rendezvous(self) -> tuple[str, int]:
        """Rank 0: starts the group's key-value store on a free port of this node; (host, port)."""
        import torch.distributed as dist

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, self.world_size, is_master=True, timeout=GROUP_TIMEOUT,
                                    wait_for_workers=False)
        return host, self._store.port

    def join_group(self, host: str, port: int) -> None:
        """Joins the default torch.distributed group of this process (every rank at once)."""
        import torch
        import torch.distributed as dist

        store = getattr(self, "_store", None) or dist.TCPStore(host, port, self.world_size, is_master=False,
                                                                timeout=GROUP_TIMEOUT)
        backend = "gloo"
        if self.device.startswith("cuda"):
            torch.cuda.set_device(0)  # Ray shows each rank its own GPU as device 0
            backend = "nccl"
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                timeout=GROUP_TIMEOUT)

    def leave_default_group(self) -> None:
        """Destroys this process's default torch.distributed group, if it has one. Ray's gloo collective
        group is built on that group and leaves it behind when destroyed: a process must leave it
        before it joins a new one."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class StageGroup:
    """One stage's ranks: actors in rank order (rank 0 leads) and the placement group holding them."""

    ranks: list  # ray.actor.ActorHandle, rank order
    placement: PlacementGroup

    @property
    def leader(self):
        return self.ranks[0]

    @property
    def rank_resources(self) -> dict[str, float]:
        return self.placement.bundle_specs[0]

    def placed(self) -> bool:
        """Whether the group holds its resources (not while they wait for a node, or a lost node's
        bundles wait for another)."""
        return ray.util.placement_group_table(self.placement).get("state") == "CREATED"


def rank_actor_name(group_name: str, rank: int) -> str:
    """The Ray actor name of one rank: the group's name for its leader, `<name>-rank<r>` for the others."""
    return group_name if rank == 0 else f"{group_name}-rank{rank}"


def start_group(actor_class: type, resources, parallel, *args: Any, group_name: str | None = None,
                direct_transport: bool = False, retries: int = 0, **kwargs: Any) -> StageGroup:
    """Starts `parallel.world_size` actors of `actor_class` (constructed with `*args`, `rank=`,
    `world_size=` and `**kwargs`) in one placement group of `parallel.placement`; returns at once
    (the actors start when the group is placed). With `group_name`, the actors are named after it (see
    `rank_actor_name`; names are unique within a Ray namespace, and each run is its own namespace).
    `direct_transport` gives them the thread that Ray Direct Transport receives on, and a `control`
    concurrency group whose calls run beside a long stage call (the driver asks there whether the
    process is still the one that joined the hop's collective group). With `retries`,
    the actor of a one-rank group is restarted whenever its process dies and a call it lost runs
    again, up to `retries` times per call (a rank of a larger group is not: its group would have to
    form again)."""
    count = parallel.world_size
    restarts = {"max_restarts": -1, "max_task_retries": retries} if retries and count == 1 else {}
    group = placement_group([rank_bundle(resources)] * count, strategy=parallel.placement)
    if direct_transport:
        actor = ray.remote(enable_tensor_transport=True, concurrency_groups={CONTROL_CALLS: 1})(actor_class)
    else:
        actor = ray.remote(actor_class)
    ranks = [
        actor.options(
            name=None if group_name is None else rank_actor_name(group_name, rank),
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            resources={key: value for key, value in resources.custom.items() if value > 0} or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            **restarts,
        ).remote(*args, rank=rank, world_size=count, **kwargs)
        for rank in range(count)
    ]
    return StageGroup(ranks, group)


def waiting_message(waiting: dict[str, StageGroup], what: str) -> str:
    """What the ranks still waiting for are waiting on: resources no node has free yet (their
    placement group is pending), or their own start."""
    pending = {label: group for label, group in waiting.items() if not group.placed()}
    parts = []
    if pending:
        asks = "; ".join(f"{label} asks for {len(group.ranks)} × {_describe(group.rank_resources)}"
                         for label, group in pending.items())
        available = ray.available_resources()
        free = {key: available.get(key, 0.0) for group in pending.values() for key in group.rank_resources}
        parts.append(f"still waiting for resources: {asks}, and the cluster has {_describe(free)} "
                     f"free. The run goes on when nodes offering them join (an autoscaler may add them); "
                     f"stop it with Ctrl-C")
    placed = [label for label in waiting if label not in pending]
    if placed:
        parts.append(f"still waiting for {', '.join(placed)} to {what}")
    return ". ".join(parts)


def wait_patiently(refs: list, labels: list[str], groups: list[StageGroup], patience_s: float, what: str) -> list:
    """ray.get of every ref, raising the first error at once; every `patience_s` seconds, says which
    (by label) are still waiting and on what (an actor whose resources no node has free waits).
    Looks for a stopping signal (`cascade.signals`) every half second."""
    of_ref = {ref: (label, group) for ref, label, group in zip(refs, labels, groups)}
    waiting = list(refs)
    said = time.monotonic()
    while waiting:
        check_stop()
        done, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
        for ref in done:
            ray.get(ref)  # a failure is raised now, not after the others
        if waiting and time.monotonic() - said >= patience_s:
            log.warning("%s", waiting_message(dict(of_ref[ref] for ref in waiting), what))
            said = time.monotonic()
    return ray.get(refs)


def join_groups(groups: dict[str, StageGroup], patience_s: float = 30.0) -> dict[str, list]:
    """Joins each group's ranks into one torch.distributed group and calls `start(address, peers)`
    on every rank at once (address None for a group of one rank; the leader gets the other ranks'
    handles as peers); returns each group's results in rank order. Errors of any rank are raised."""
    grouped = [name for name, group in groups.items() if len(group.ranks) > 1]
    opened = wait_patiently([groups[name].leader.open_rendezvous.remote() for name in grouped], grouped,
                            [groups[name] for name in grouped], patience_s, "start")
    addresses = dict(zip(grouped, opened))
    refs, owners = [], []
    for name, group in groups.items():
        for rank, actor in enumerate(group.ranks):
            refs.append(actor.start.remote(addresses.get(name), group.ranks[1:] if rank == 0 else []))
            owners.append(name)
    results: dict[str, list] = {name: [] for name in groups}
    loaded = wait_patiently(refs, owners, [groups[name] for name in owners], patience_s, "start and load")
    for name, value in zip(owners, loaded):
        results[name].append(value)
    return results


def stop_group(group: StageGroup) -> None:
    """Kills the ranks and frees their placement group."""
    for actor in group.ranks:
        ray.kill(actor)
    remove_placement_group(group.placement)
