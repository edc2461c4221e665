"""Throughput at scale, simulated with the real orchestrator: the cascade's pools, routing,
pipelining and object-store hops (cascade/graph.py, cascade/groups.py) drive stand-in stages that
sleep for a stage's time scaled down and pass payloads of the real sizes scaled down, on a simulated
node of 8 GPUs (`ray.cluster_utils.Cluster`; Ray hands out the GPU ids, nothing computes on them).

    python bench/bench_throughput.py                  # 480p, 81 frames; times / 100, sizes / 10
    python bench/bench_throughput.py --prompts 1 2 4 8 16 32

The replicas are the capacity plan's (`python -m cascade.plan`) for the scaled times. For n prompts
the ideal is the plan run with no overhead at all: each prompt's stage starts on the first replica
free once its previous stage is done (what the slowest stage's replicas kept busy allow). The table
gives the time achieved, the ideal, achieved / ideal throughput, and the peak of the object store
(its plasma memory, polled every 50 ms).
"""

from __future__ import annotations

import argparse
import heapq
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from cascade.actors import STAGE_NAMES  # noqa: E402
from cascade.config import FrameParallelConfig, Resources  # noqa: E402
from cascade.graph import StagePool, run_pipelined  # noqa: E402
from cascade.groups import GroupMember, join_groups, start_group, stop_group  # noqa: E402
from cascade.payload import Request  # noqa: E402
from cascade.plan import best_plan  # noqa: E402

MiB = 2**20
GPUS = 8
# Seconds per prompt on one GPU, assumed (not measured: the example of a base stage far
# slower than the others), and what each stage hands on at 480p, 81 frames: latents float32
# (16, 21, 60, 104), frames uint8 ×3 in time (241, 480, 832, 3), the encoded video (about 10 MiB).
STAGE_SECONDS = {"base": 240.0, "tsr": 20.0, "ssr": 30.0}
OUTPUT_BYTES = {"base": 16 * 21 * 60 * 104 * 4, "tsr": 241 * 480 * 832 * 3, "ssr": 10 * MiB}


@dataclass(frozen=True)
class SimulatedReport:
    stage: str
    replica: int
    prompt_index: int
    started_at: float
    finished_at: float


class SleepingStage(GroupMember):
    """A stand-in stage: reads its input, sleeps for the stage's time, returns a payload of its size."""

    def __init__(self, name: str, seconds: float, output_bytes: int, replica: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.name, self.seconds, self.output_bytes = name, seconds, output_bytes
        self.replica, self.rank, self.world_size, self.device = replica, rank, world_size, "cpu"

    def start(self, address, peers) -> dict:
        import cascade.payload  # noqa: F401  (Request's module imports torch: seconds, paid here, not in a timed call)

        return {"rank": self.rank}

    @ray.method(num_returns=2)
    def run(self, clip, request: Request):
        started = time.time()
        if clip is not None:
            assert clip[-1] == 1  # the payload really arrived
        time.sleep(self.seconds)
        output = np.ones(self.output_bytes, dtype=np.uint8)
        return output, SimulatedReport(self.name, self.replica, request.index, started, time.time())


def ideal_makespan(prompts: int, replicas: dict[str, int], seconds: dict[str, float]) -> float:
    """The plan with no overhead: prompts in order, each stage on its first free replica."""
    ready = [0.0] * prompts  # when each prompt's previous stage is done
    for stage in STAGE_NAMES:
        free = [0.0] * replicas[stage]  # heap of the times the replicas become free
        for prompt in range(prompts):
            start = max(ready[prompt], heapq.heappop(free))
            ready[prompt] = start + seconds[stage]
            heapq.heappush(free, ready[prompt])
    return max(ready)


class ObjectStorePeak:
    """Polls the cluster's plasma memory in a thread; `peak` in bytes."""

    def __init__(self, interval: float = 0.05):
        from ray._private.internal_api import memory_summary

        self.peak, self._interval, self._summary = 0, interval, memory_summary
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            match = re.search(r"Plasma memory usage (\d+) MiB", self._summary(stats_only=True))
            if match:
                self.peak = max(self.peak, int(match.group(1)) * MiB)
            self._stop.wait(self._interval)

    def __enter__(self) -> "ObjectStorePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-scale", type=float, default=0.01, help="stage seconds × this (default 1/100)")
    parser.add_argument("--size-scale", type=float, default=0.1, help="payload bytes × this (default 1/10)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = parser.parse_args()
    seconds = {stage: value * args.time_scale for stage, value in STAGE_SECONDS.items()}
    sizes = {stage: int(value * args.size_scale) for stage, value in OUTPUT_BYTES.items()}
    plan = best_plan(seconds, nodes=1, gpus_per_node=GPUS, efficiency=0.9)
    replicas = {stage.stage: stage.replicas for stage in plan}
    assert all(stage.ranks == 1 for stage in plan), "the stand-in stages run one rank per replica"
    in_flight = sum(replicas.values()) + min(plan, key=lambda stage: stage.throughput).replicas
    print(f"stage seconds (× {args.time_scale:g}): " + ", ".join(f"{s} {t:g}" for s, t in seconds.items())
          + "; payloads (× " + f"{args.size_scale:g}): " + ", ".join(f"{s} {b / MiB:.1f} MiB" for s, b in sizes.items()))
    print(f"plan on {GPUS} GPUs: " + ", ".join(f"{s} ×{r}" for s, r in replicas.items())
          + f"; max_prompts_in_flight {in_flight}\n")

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": GPUS + 4, "num_gpus": GPUS, "include_dashboard": False, "object_store_memory": 2 * 2**30})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    pools = {}
    try:
        one_gpu = Resources(num_gpus=1, num_cpus=1)
        for stage in STAGE_NAMES:
            pools[stage] = StagePool(stage, [
                start_group(SleepingStage, one_gpu, FrameParallelConfig(1), stage, seconds[stage], sizes[stage],
                            replica=replica)
                for replica in range(replicas[stage])
            ])
        join_groups({f"{stage} {replica}": group for stage, pool in pools.items()
                     for replica, group in enumerate(pool.replicas)})
        print("| prompts | achieved (s) | ideal (s) | achieved / ideal throughput | prompts per second | "
              "object store peak (MiB) | replicas used (base/tsr/ssr) |")
        print("|---|---|---|---|---|---|---|")
        for count in args.prompts:
            requests = [Request(f"prompt {index}", "", index, 720, 1280, 81, 16.0, index) for index in range(count)]
            used = {stage: set() for stage in STAGE_NAMES}
            with ObjectStorePeak() as store:
                started = time.perf_counter()
                results = run_pipelined(pools, requests, in_flight,
                                        lambda request, report, output: used[report.stage].add(report.replica),
                                        lambda result: None)
                achieved = time.perf_counter() - started
            assert all(result.error is None for result in results), [result.error for result in results]
            ideal = ideal_makespan(count, replicas, seconds)
            print(f"| {count} | {achieved:.2f} | {ideal:.2f} | {ideal / achieved:.1%} | {count / achieved:.2f} | "
                  f"{store.peak / MiB:.0f} | {'/'.join(str(len(used[stage])) for stage in STAGE_NAMES)} |")
    finally:
        for pool in pools.values():
            for group in pool.replicas:
                stop_group(group)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
