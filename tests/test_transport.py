"""How clips go from stage to stage: the choice of transport per hop, the direct path (Ray Direct
Transport) tested through its gloo variant on the CPU, and the clip's two forms."""

from __future__ import annotations

import collections
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import run_cascade
from cascade.actors import StageWorker
from cascade.config import hop_backend, load_config
from cascade import graph
from cascade.graph import StagePool, load_pools, run_pipelined, stop_pools
from cascade.groups import start_group
from cascade.payload import Clip, Request
from cascade.previews import shrink_on_device
from tests.conftest import FAST

GPU_STAGES = [f"stages.{stage}.resources.num_gpus=1" for stage in ("base", "tsr", "ssr")]


@pytest.mark.parametrize("overrides, expected", [
    ([], [None, None]),  # CPUs: the object store, the fastest there
    (["transport=direct"], ["gloo", "gloo"]),
    (GPU_STAGES, ["nccl", "nccl"]),  # GPU to GPU: direct by default
    ([*GPU_STAGES, "transport=object_store"], [None, None]),
    ([*GPU_STAGES, "stages.ssr.resources.num_gpus=0"], ["nccl", None]),  # a GPU to CPU hop: the object store
    ([*GPU_STAGES, "stages.ssr.resources.num_gpus=0", "transport=direct"], ["nccl", None]),
])
def test_each_hop_takes_the_transport_of_its_ends(overrides, expected):
    config = load_config(None, overrides)
    assert [hop_backend(config, "base", "tsr"), hop_backend(config, "tsr", "ssr")] == expected


@pytest.mark.parametrize("override, message", [
    ("transport=pigeon", "one of ('auto', 'object_store', 'direct')"),
    ("stages.ssr.parallel.frames=2", "stages.ssr runs on 2 CPU ranks"),
])
def test_impossible_transport_settings_exit_2(tmp_path, capsys, override, message):
    assert run_cascade.main(["--out", str(tmp_path), "transport=direct", override]) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines


def test_clip_holds_an_array_or_a_tensor():
    request = Request("p", "", 0, 16, 16, 1, 16.0)
    frames = np.zeros((1, 3, 2, 4, 4), dtype=np.uint8)
    frames.flags.writeable = False  # as the object store hands arrays out
    clip = Clip(frames, "pixel", 16.0, request)
    tensor = clip.tensor("cpu")
    tensor += 1  # a copy: the read-only array is untouched
    assert frames.max() == 0 and tensor.dtype == torch.uint8
    assert Clip(torch.zeros(1, 16, 1, 2, 2), "latent", 16.0, request).shape == (1, 16, 1, 2, 2)
    with pytest.raises(ValueError, match="must hold float32 data, got float64"):
        Clip(torch.zeros(1, 16, 1, 2, 2, dtype=torch.float64), "latent", 16.0, request)


def test_previews_shrink_frames_where_they_are():
    """What a GPU stage does before its preview leaves the device: the longer side to max_side, a
    flat frame stays flat, a ramp keeps its mean."""
    ramp = torch.arange(256, dtype=torch.float32).repeat(64, 1)[None, None].expand(3, 2, 64, 256)  # (3, T, H, W)
    frames = torch.cat([ramp, torch.full((3, 1, 64, 256), 77.0)], dim=1).to(torch.uint8)
    small = shrink_on_device(frames, 32)
    assert small.shape == (3, 3, 8, 32) and small.dtype == torch.uint8
    assert (small[:, 2] == 77).all()
    assert small[:, 0].float().mean().item() == pytest.approx(127.5, abs=0.5)
    assert shrink_on_device(frames, 512) is frames


class AddsThePromptIndex:
    """Stands in for a stage's models: its clip is its input (zeros for the first stage) plus the
    prompt's index; the first stage cannot make prompt 1."""

    warnings = ()

    def __call__(self, clip, request: Request, progress=None) -> Clip:
        if clip is None and request.index == 1:
            raise ValueError("the first stage cannot make prompt 1")
        data = torch.zeros(1, 16, 2, 4, 4) if clip is None else clip.data  # (B, C, T, H, W)
        return Clip(data + request.index, "latent", 16.0, request)


class ScriptedWorker(StageWorker):
    """The real actor shell (its direct calls and their reports) around the stand-in stage."""

    def load(self) -> dict:
        if self.stage is None:
            self.stage = AddsThePromptIndex()
        return super().load()


def test_a_direct_calls_report_waits_for_it_and_fails_with_its_error(ray_cluster):
    """Three stages with direct hops between them, every call submitted at once, before any input
    exists. A report ends only after its call, and a call whose input failed reports the failure
    where it began (a call whose input never arrived once reported only that its report was missing)."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    config = load_config(None, FAST + ["transport=direct"])
    section = config.stages.base
    pools = {name: StagePool(name, [start_group(ScriptedWorker, section.resources, section.parallel, name, section,
                                                config.output, direct_transport=True)], direct=direct)
             for name, direct in (("base", "gloo"), ("tsr", "gloo"), ("ssr", None))}
    try:
        load_pools(pools)
        requests = [Request("p", "", 0, 64, 64, 9, 16.0, index) for index in range(3)]
        calls = {index: [] for index in range(3)}  # prompt -> (output ref, report ref) of each stage
        for request in requests:
            clip = None
            for pool in pools.values():
                _, clip, report = pool.submit(clip, request)
                calls[request.index].append((clip, report))
        for index in (0, 2):
            reports = [ray.get(report) for _, report in calls[index]]
            assert [(report.prompt_index, report.input_transport) for report in reports] == [
                (index, None), (index, "direct"), (index, "direct")]
            final = ray.get(calls[index][-1][0])
            assert isinstance(final.data, np.ndarray) and (final.data == 3 * index).all()
        for _, report in calls[1]:
            with pytest.raises(ray.exceptions.RayTaskError, match="the first stage cannot make prompt 1"):
                ray.get(report)
    finally:
        stop_pools(pools)


class ScriptedCall:
    """Stands in for an actor method: `.options(...)` is ignored, `.remote(...)` calls `function`."""

    def __init__(self, function):
        self.function = function

    def options(self, **options) -> "ScriptedCall":
        return self

    def remote(self, *args):
        return self.function(*args)


@pytest.mark.parametrize("lost, retries", [({("tsr", 0): None}, 2), ({}, 2), ({("tsr", 0): None}, 0)])
def test_a_prompt_whose_direct_hop_is_lost_runs_again_at_most_retries_times(ray_cluster, monkeypatch, lost, retries):
    """Three stages whose calls are Ray tasks, the first two at direct hops. tsr fails prompt 0 once
    and prompt 1 every time. Where the leaders check finds a lost leader, the loop waits for the calls
    in flight, restores the hops and runs each prompt not ended again from its start: prompt 0 then
    ends well, prompt 1 fails after 1 + retries tries. Where it finds none, a failure is final; with
    no retries too, though the hops are restored for the prompts after it."""
    import ray

    @ray.remote
    def call(stage: str, index: int, fails: bool) -> str:
        if fails:
            raise ValueError(f"{stage} lost prompt {index}'s input")
        return f"{stage} output of {index}"

    attempts = collections.Counter()  # (stage, prompt) -> calls

    def leader(stage: str) -> SimpleNamespace:
        def run_direct(clip, request):
            attempts[stage, request.index] += 1
            fails = stage == "tsr" and (request.index == 1 or (request.index == 0 and attempts[stage, 0] == 1))
            return call.remote(stage, request.index, fails)

        # the report is the output itself, so it fails with its call
        return SimpleNamespace(run_direct=ScriptedCall(run_direct), direct_report=ScriptedCall(lambda output, index: output),
                               run=ScriptedCall(lambda clip, request: (output := run_direct(clip, request), output)))

    pools = {name: StagePool(name, [SimpleNamespace(leader=leader(name), placed=lambda: True)], direct=direct,
                             communicators=["the hops' group"])
             for name, direct in (("base", "gloo"), ("tsr", "gloo"), ("ssr", None))}
    restores = []

    def restore(pools, lost, patience_s):
        assert all(pool.outstanding == [0] for pool in pools.values()), "restored with calls in flight"
        restores.append(lost)

    monkeypatch.setattr(graph, "lost_direct_leaders", lambda pools: dict(lost))
    monkeypatch.setattr(graph, "restore_direct_hops", restore)
    requests = [Request("p", "", 0, 64, 64, 9, 16.0, index) for index in range(3)]
    results = run_pipelined(pools, requests, 3, lambda request, report, output: None, lambda result: None,
                            retries=retries)
    outcome = {result.request.index: (result.failed_stage, result.error is None) for result in results}
    if lost and retries:
        assert outcome == {0: (None, True), 1: ("tsr", False), 2: (None, True)}
        assert attempts["tsr", 1] == 1 + retries and attempts["base", 1] >= 1 + retries  # each try from the start
        # (a try may also start again unspent: a base output made while the hops are restored goes with them)
        assert attempts["tsr", 0] >= 2
        # one restore after each of prompt 1's failures, the last included; prompt 0's may share the first
        assert len(restores) in (1 + retries, 2 + retries) and all(found == lost for found in restores)
    else:
        assert outcome == {0: ("tsr", False), 1: ("tsr", False), 2: (None, True)}
        assert attempts["tsr", 0] == attempts["tsr", 1] == 1
        assert bool(restores) == bool(lost)
    assert "lost prompt 1's input" in str(results[1].error)
