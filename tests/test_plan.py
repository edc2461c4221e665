"""The capacity plan (cascade/plan.py) against an exhaustive search and hand-worked cases, and its
command: stage times given or read from manifests, bad input refused with exit code 2."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest

from cascade.plan import best_plan, main, packs, speedup
from tests.conftest import ROOT


def exhaustive_throughput(seconds: dict[str, float], nodes: int, gpus: int, efficiency: float) -> float:
    """Every (ranks, replicas) of every stage that fits: the best min(replicas / time)."""
    per_stage = []
    for time in seconds.values():
        per_stage.append([(ranks, replicas, replicas * speedup(ranks, efficiency) / time)
                          for ranks in range(1, gpus + 1) for replicas in range(1, nodes * gpus // ranks + 1)])
    best = 0.0
    for choice in itertools.product(*per_stage):
        groups = [ranks for ranks, replicas, _ in choice for _ in range(replicas)]
        if sum(groups) <= nodes * gpus and packs(groups, nodes, gpus):
            best = max(best, min(rate for _, _, rate in choice))
    return best


def test_eight_gpus_go_to_the_slowest_stage():
    plan = {stage.stage: stage for stage in best_plan({"base": 240, "tsr": 20, "ssr": 30}, 1, 8, 0.9)}
    # base needs 240/20 = 12 times tsr's GPUs for the same rate: 6 + 1 + 1, 6 / 240 s = 90 per hour
    assert [(plan[s].ranks, plan[s].replicas) for s in ("base", "tsr", "ssr")] == [(1, 6), (1, 1), (1, 1)]
    assert 3600 * min(stage.throughput for stage in plan.values()) == pytest.approx(90.0)


def test_perfect_scaling_prefers_the_lowest_latency():
    """At efficiency 1 a group of p ranks is worth p replicas, so the tie goes to the fastest prompt."""
    plan = {stage.stage: stage for stage in best_plan({"base": 240, "tsr": 20, "ssr": 30}, 1, 8, 1.0)}
    assert plan["base"].ranks == 6 and plan["base"].replicas == 1 and plan["base"].seconds == pytest.approx(40)


@pytest.mark.parametrize("seconds, nodes, gpus, efficiency", [
    ({"base": 100, "tsr": 7, "ssr": 13}, 1, 4, 0.9),
    ({"base": 50, "tsr": 45, "ssr": 5}, 2, 3, 0.8),
    ({"base": 30, "tsr": 30, "ssr": 30}, 1, 5, 1.0),
])
def test_plan_reaches_the_exhaustive_optimum(seconds, nodes, gpus, efficiency):
    plan = best_plan(seconds, nodes, gpus, efficiency)
    assert min(stage.throughput for stage in plan) == pytest.approx(exhaustive_throughput(seconds, nodes, gpus, efficiency))
    assert sum(stage.gpus for stage in plan) <= nodes * gpus
    assert packs([stage.ranks for stage in plan for _ in range(stage.replicas)], nodes, gpus)


def test_groups_stay_on_one_node():
    assert packs([4, 4, 2, 2], 2, 6) and not packs([4, 4, 4], 2, 6)


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cascade.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_command_prints_the_plan_and_its_overrides():
    result = run_plan("--gpus", "8", "base=240", "tsr=20", "ssr=30")
    assert result.returncode == 0, result.stderr
    assert "expected throughput: 90.0 prompts per hour (set by base)" in result.stdout
    assert "stages.base.replicas=6 stages.tsr.replicas=1 stages.ssr.replicas=1" in result.stdout


def test_plan_from_manifests(tmp_path, capsys):
    """Stage times are the medians of the manifests' wall times, a 2-rank stage's brought back to one GPU."""
    for index, (base, tsr) in enumerate([(100.0, 9.0), (120.0, 10.0), (140.0, 11.0)]):
        folder = tmp_path / f"run-{index}"
        folder.mkdir()
        stages = {"base": {"wall_time_s": base, "ranks": [{}, {}]}, "tsr": {"wall_time_s": tsr, "ranks": [{}]},
                  "ssr": {"wall_time_s": 5.0, "ranks": [{}]}}
        (folder / "manifest.json").write_text(json.dumps({"status": "ok", "stages": stages}))
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "manifest.json").write_text(json.dumps({"status": "failed", "stages": {}}))
    assert main(["--gpus", "4", "--manifests", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"base {120 * speedup(2, 0.9):g}, tsr 10, ssr 5" in out
    assert math.isclose(speedup(2, 0.9), 1.8)


@pytest.mark.parametrize("args, message", [
    (["--gpus", "8", "base=240", "tsr=20"], "give the seconds per prompt of ssr"),
    (["--gpus", "8", "base=fast", "tsr=20", "ssr=30"], "must be a number"),
    (["--gpus", "8", "vae=3", "tsr=20", "ssr=30"], "stage one of base, tsr, ssr"),
    (["--gpus", "0", "base=1", "tsr=1", "ssr=1"], "must be at least 1"),
    (["--gpus", "2", "base=1", "tsr=1", "ssr=1"], "no plan fits"),
])
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1 and message in lines[0], lines
