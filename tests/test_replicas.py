"""Replicas of a stage (stages.<stage>.replicas): calls routed to the least-loaded replica, the same
videos whatever the replica count, every replica used, and counts that cannot work refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import run_cascade
from cascade.config import load_config
from cascade.errors import UserError
from cascade.graph import StagePool
from cascade.groups import check_placement
from tests.conftest import FAST, REFERENCE, REFERENCE_SEED, outputs_by_prompt, run_cli

REPLICAS = ["stages.base.replicas=2", "stages.tsr.replicas=2", "stages.ssr.replicas=2"]


class RecordingMethod:
    def __init__(self, calls: list, replica: int):
        self.calls, self.replica = calls, replica

    def options(self, name: str):
        assert name.startswith("tsr prompt "), name  # the task's name on the dashboard
        return self

    def remote(self, clip, request):
        self.calls.append((self.replica, request.index))
        return f"output of {request.index} on {self.replica}", f"report of {request.index} on {self.replica}"


class RecordingGroup:
    """Stands in for a StageGroup: its leader's run.remote records the call."""

    def __init__(self, calls: list, replica: int):
        self.leader = type("Leader", (), {"run": RecordingMethod(calls, replica)})()


def test_calls_go_to_the_replica_holding_fewest():
    calls: list = []
    pool = StagePool("tsr", [RecordingGroup(calls, replica) for replica in range(3)])
    prompt = [SimpleNamespace(index=index) for index in range(6)]  # stand-ins for Request
    assert [pool.submit(None, prompt[index])[0] for index in range(4)] == [0, 1, 2, 0]  # spread, then the first again
    pool.finished(1)  # replica 1 is free, 0 holds two calls, 2 holds one
    assert pool.submit(None, prompt[4])[0] == 1
    pool.finished(0), pool.finished(0), pool.finished(2)  # 0 and 2 free; 1 holds one
    assert pool.submit(None, prompt[5])[0] == 2  # of the free ones, the one that has taken fewest calls
    assert pool.outstanding == [0, 1, 1] and pool.taken == [2, 2, 2]
    assert calls[-1] == (2, 5)


def test_replicas_make_the_same_videos_and_all_work(reference_run, ray_cluster, tmp_path):
    """Two replicas of every stage against the reference run's one: the same videos, and every
    replica of every stage takes a prompt."""
    result = run_cli("--prompts-file", str(reference_run.prompts_file), "--out", str(tmp_path), "--seed",
                     str(REFERENCE_SEED), "--address", ray_cluster.address, *REFERENCE, *REPLICAS)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = outputs_by_prompt(tmp_path)
    assert sorted(outputs) == sorted(reference_run.outputs)
    for index, (video, manifest) in outputs.items():
        assert video == reference_run.outputs[index][0], f"prompt {index}: the videos differ"  # x264 is deterministic
        assert manifest["seed"] == REFERENCE_SEED + index
    for stage in ("base", "tsr", "ssr"):
        assert {manifest["stages"][stage]["replica"] for _, manifest in outputs.values()} == {0, 1}
        assert {manifest["stages"][stage]["replica"] for _, manifest in reference_run.outputs.values()} == {0}


def test_replicas_below_one_are_refused(tmp_path, capsys):
    assert run_cascade.main(["--out", str(tmp_path), "stages.tsr.replicas=0"]) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "stages.tsr.replicas=0" in error_lines[0] and "at least 1" in error_lines[0]


@pytest.mark.parametrize("overrides", [
    ["stages.base.replicas=17"],  # 17 + 1 + 1 CPUs; 18 in all
    ["stages.base.parallel.ring=6", "stages.base.replicas=3"],  # 3 groups of 6 on one node each; nodes of 10 and 8
])
def test_more_replicas_than_the_cluster_places_are_named(ray_cluster, overrides):
    """What the run says before it waits on a cluster (tests/test_first_contact.py runs the command)."""
    with pytest.raises(UserError, match="cannot all be placed"):
        check_placement(load_config(None, [*FAST, *overrides]))
