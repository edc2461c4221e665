"""A capacity plan: the replicas and ranks per stage that give the most prompts per hour on a cluster.

    python -m cascade.plan --gpus 8 base=240 tsr=20 ssr=30
    python -m cascade.plan --gpus 8 --nodes 4 --config configs/wan2.1-t2v-14b.yaml base=1860 tsr=20 ssr=30
    python -m cascade.plan --gpus 8 --manifests outputs/

Each stage's time is the seconds one prompt takes it on one GPU, given as `stage=seconds` or read
from the manifests of earlier runs (the median over prompts, brought back to one GPU by the same
speed-up model). A stage on p ranks is assumed `p · efficiency^log2(p)` times faster (`--efficiency`,
0.9 per doubling by default: communication is not free); a replica is a whole copy, so r replicas
take r prompts at once. Every group of ranks stays on one node, every rank takes a whole GPU.

Throughput is set by the slowest stage: min over stages of replicas / seconds per prompt. The plan
tries every rank count per stage (the base stage splits any count: CFG 2 when even, Ulysses as far as
the DiT's heads allow, a ring for the rest), gives each the fewest replicas that reach a throughput, and keeps the highest throughput whose groups
pack onto the nodes; among equals, the one with the lowest latency of a prompt, then the fewest GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from cascade.actors import STAGE_NAMES
from cascade.config import DEFAULT_CONFIG, CascadeConfig
from cascade.errors import UserError


@dataclass(frozen=True)
class StagePlan:
    stage: str
    ranks: int  # per replica
    replicas: int
    seconds: float  # per prompt on one replica

    @property
    def gpus(self) -> int:
        return self.ranks * self.replicas

    @property
    def throughput(self) -> float:  # prompts per second
        return self.replicas / self.seconds


def speedup(ranks: int, efficiency: float) -> float:
    return ranks * efficiency ** math.log2(ranks)


def base_split(ranks: int, heads: int, guidance: bool) -> dict[str, int]:
    """The base stage's split on `ranks` ranks: CFG 2 when guidance is on and the count is even (one
    all-gather a step), then the most Ulysses the heads allow, the rest as a ring."""
    cfg = 2 if guidance and ranks % 2 == 0 else 1
    sequence = ranks // cfg
    ulysses = max(divisor for divisor in range(1, sequence + 1) if sequence % divisor == 0 and heads % divisor == 0)
    return {"ulysses": ulysses, "ring": sequence // ulysses, "cfg": cfg}


def packs(groups: list[int], nodes: int, gpus_per_node: int) -> bool:
    """Whether groups of these GPU counts fit the nodes, each group on one node (first fit, largest first)."""
    free = [gpus_per_node] * nodes
    for size in sorted(groups, reverse=True):
        node = next((index for index, left in enumerate(free) if left >= size), None)
        if node is None:
            return False
        free[node] -= size
    return True


def best_plan(seconds: dict[str, float], nodes: int, gpus_per_node: int, efficiency: float) -> list[StagePlan]:
    """The plan of the highest throughput (then lowest latency, then fewest GPUs); see the module."""
    total = nodes * gpus_per_node
    options = {  # stage -> [(ranks, seconds per prompt on a replica of that many ranks)]
        stage: [(ranks, time / speedup(ranks, efficiency)) for ranks in range(1, gpus_per_node + 1)]
        for stage, time in seconds.items()
    }
    best, best_key = None, None
    for choice in _combinations([options[stage] for stage in STAGE_NAMES]):
        # candidate throughputs: those where some stage's replicas are exactly used up
        candidates = sorted({replicas / time for ranks, time in choice
                             for replicas in range(1, total // ranks + 1)}, reverse=True)
        for target in candidates:
            replicas = [math.ceil(target * time - 1e-9) for _, time in choice]
            plan = [StagePlan(stage, ranks, count, time)
                    for stage, (ranks, time), count in zip(STAGE_NAMES, choice, replicas)]
            if sum(stage.gpus for stage in plan) > total:
                continue
            if not packs([stage.ranks for stage in plan for _ in range(stage.replicas)], nodes, gpus_per_node):
                continue
            key = (-min(stage.throughput for stage in plan), sum(stage.seconds for stage in plan),
                   sum(stage.gpus for stage in plan))
            if best_key is None or key < best_key:
                best, best_key = plan, key
            break  # lower targets of this choice cannot beat this one
    if best is None:
        raise UserError(f"no plan fits {nodes} node(s) of {gpus_per_node} GPUs: each stage needs at least one")
    return best


def _combinations(lists: list[list]) -> list[tuple]:
    combos: list[tuple] = [()]
    for options in lists:
        combos = [combo + (option,) for combo in combos for option in options]
    return combos


def times_from_manifests(folder: Path, efficiency: float) -> dict[str, float]:
    """Median seconds per prompt on one GPU of each stage, from the manifests of successful runs."""
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGE_NAMES}
    for manifest_file in sorted(folder.rglob("manifest.json")):
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {manifest_file}: {error}") from None
        if manifest.get("status") != "ok":
            continue
        for stage, record in manifest.get("stages", {}).items():
            if stage in per_stage:
                ranks = max(1, len(record.get("ranks", [])))
                per_stage[stage].append(record["wall_time_s"] * speedup(ranks, efficiency))
    missing = [stage for stage, times in per_stage.items() if not times]
    if missing:
        raise UserError(f"no finished run under {folder} has a manifest with stage(s) {', '.join(missing)}")
    return {stage: statistics.median(times) for stage, times in per_stage.items()}


def parse_times(items: list[str]) -> dict[str, float]:
    times = {}
    for item in items:
        stage, _, value = item.partition("=")
        if stage not in STAGE_NAMES:
            raise UserError(f"{item!r}: expected stage=seconds with stage one of {', '.join(STAGE_NAMES)}")
        try:
            times[stage] = float(value)
        except ValueError:
            raise UserError(f"{item!r}: the seconds must be a number") from None
        if not times[stage] > 0:
            raise UserError(f"{item!r}: the seconds must be positive")
    missing = [stage for stage in STAGE_NAMES if stage not in times]
    if missing:
        raise UserError(f"give the seconds per prompt of {', '.join(missing)} (e.g. {missing[0]}=30) or --manifests")
    return times


def overrides(plan: list[StagePlan], heads: int, guidance: bool) -> list[str]:
    """The run_cascade.py overrides that run the plan."""
    result = []
    for stage in plan:
        result.append(f"stages.{stage.stage}.replicas={stage.replicas}")
        if stage.ranks > 1 and stage.stage == "base":
            result += [f"stages.base.parallel.{key}={value}"
                       for key, value in base_split(stage.ranks, heads, guidance).items() if value > 1]
        elif stage.ranks > 1:
            result.append(f"stages.{stage.stage}.parallel.frames={stage.ranks}")
    # enough prompts inside the cascade to keep every replica busy, and one waiting at the slowest stage
    in_flight = sum(stage.replicas for stage in plan) + min(plan, key=lambda stage: stage.throughput).replicas
    return result + [f"output.max_prompts_in_flight={in_flight}"]


def describe(plan: list[StagePlan], heads: int, guidance: bool) -> str:
    slowest = min(plan, key=lambda stage: stage.throughput)
    lines = ["| stage | ranks per replica | split | replicas | GPUs | seconds per prompt on a replica | prompts per hour |",
             "|---|---|---|---|---|---|---|"]
    for stage in plan:
        split = "–"
        if stage.stage == "base" and stage.ranks > 1:
            split = " × ".join(f"{key} {value}" for key, value in base_split(stage.ranks, heads, guidance).items()
                               if value > 1)
        elif stage.ranks > 1:
            split = f"frames {stage.ranks}"
        lines.append(f"| {stage.stage} | {stage.ranks} | {split} | {stage.replicas} | {stage.gpus} | "
                     f"{stage.seconds:.1f} | {3600 * stage.throughput:.1f} |")
    lines += [
        "",
        f"expected throughput: {3600 * slowest.throughput:.1f} prompts per hour (set by {slowest.stage}), "
        f"{sum(stage.gpus for stage in plan)} GPUs; one prompt takes {sum(stage.seconds for stage in plan):.0f} s",
        "overrides: " + " ".join(overrides(plan, heads, guidance)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cascade.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the cascade config (for the DiT's heads)")
    parser.add_argument("--efficiency", type=float, default=0.9, help="parallel efficiency per doubling of ranks (0.9)")
    parser.add_argument("--manifests", type=Path, help="a folder of earlier runs to take the stage times from")
    parser.add_argument("times", nargs="*", metavar="stage=seconds", help="seconds per prompt on one GPU")
    args = parser.parse_args(argv)
    try:
        if args.gpus < 1 or args.nodes < 1:
            raise UserError(f"--gpus {args.gpus} --nodes {args.nodes}: both must be at least 1")
        if not 0 < args.efficiency <= 1:
            raise UserError(f"--efficiency {args.efficiency} must lie in (0, 1]")
        if not args.config.is_file():
            raise UserError(f"config file not found: {args.config}")
        base = OmegaConf.merge(OmegaConf.structured(CascadeConfig), OmegaConf.load(args.config)).stages.base
        heads, guidance = base.dit.num_heads, base.guidance_scale != 1
        if args.manifests is not None:
            times = times_from_manifests(args.manifests, args.efficiency)
            source = f"medians of the manifests under {args.manifests}"
        else:
            times = parse_times(args.times)
            source = "given"
        plan = best_plan(times, args.nodes, args.gpus, args.efficiency)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.nodes} node(s) of {args.gpus} GPUs; seconds per prompt on one GPU ({source}): "
          + ", ".join(f"{stage} {time:g}" for stage, time in times.items())
          + f"; {args.efficiency:g} parallel efficiency per doubling (assumed)\n")
    print(describe(plan, heads, guidance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
