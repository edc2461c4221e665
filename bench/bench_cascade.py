"""Times the tiny cascade on a local Ray: each stage for one prompt, and N prompts pipelined against
N × one prompt. Prints a markdown table (record it in docs/BENCHMARKS.md).

    python bench/bench_cascade.py [--prompts 6] [key=value ...]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from cascade.config import load_config  # noqa: E402
from cascade.graph import create_pools, load_pools, run_pipelined  # noqa: E402
from cascade.groups import requested_resources  # noqa: E402
from run_cascade import make_requests  # noqa: E402

PROMPTS = [
    "a red circle moving to the right",
    "一个蓝色的方块向上移动",
    "a green triangle moving left on a striped background",
    "黄色的圆向左下方移动",
    "a white square moving down slowly",
    "紫色的三角形向右上方快速移动",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(None, args.overrides)
    asked = requested_resources(config).get("CPU", 0.0)

    started = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(asked)), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    started = time.perf_counter()
    pools = create_pools(config)
    load_pools(pools)
    actors_start = time.perf_counter() - started

    prompts = (PROMPTS * math.ceil(args.prompts / len(PROMPTS)))[: args.prompts]
    requests = make_requests(prompts, config, seed=0)

    def timed(batch, in_flight):
        reports = []
        started = time.perf_counter()
        results = run_pipelined(pools, batch, in_flight, lambda request, report, output: reports.append(report), lambda result: None)
        assert all(result.error is None for result in results), [result.error for result in results]
        return time.perf_counter() - started, reports

    timed(requests[:1], 1)  # warm-up: first calls pay for lazy initialisation
    singles = [timed([request], 1) for request in requests]
    single_total = sum(seconds for seconds, _ in singles)
    pipelined, _ = timed(requests, config.output.max_prompts_in_flight)
    stage_times = {stage: [report.wall_time_s for _, reports in singles for report in reports if report.stage == stage]
                   for stage in ("base", "tsr", "ssr")}

    print("| what | seconds |\n|---|---|")
    print(f"| ray.init (local) | {ray_start:.1f} |")
    print(f"| start the stage actors and load models | {actors_start:.1f} |")
    for stage, times in stage_times.items():
        print(f"| {stage} stage, one prompt (median of {len(times)}) | {sorted(times)[len(times) // 2]:.2f} |")
    print(f"| one prompt through the DAG (mean) | {single_total / len(singles):.2f} |")
    print(f"| {len(requests)} prompts one after another (sum) | {single_total:.2f} |")
    print(f"| {len(requests)} prompts pipelined ({config.output.max_prompts_in_flight} in flight) | {pipelined:.2f} |")
    print(f"\npipelined / sequential = {pipelined / single_total:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
