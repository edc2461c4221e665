"""How clips go from stage to stage: the choice of transport per hop, the direct path (Ray Direct
Transport) tested through its gloo variant on the CPU, and the clip's two forms."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import run_cascade
from cascade.actors import StageWorker
from cascade.config import hop_backend, load_config
from cascade.graph import StagePool, load_pools, stop_pools
from cascade.groups import start_group
from cascade.payload import Clip, Request
from cascade.previews import shrink_on_device
from tests.conftest import FAST, REFERENCE, REFERENCE_SEED, cluster_beside_session, outputs_by_prompt, run_cli

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


def test_direct_transport_over_gloo_makes_the_same_videos(reference_run, ray_cluster, tmp_path):
    """The direct path between single-rank CPU stages, with two tsr replicas in the collective group,
    against the reference run through the object store. On a cluster of its own: twice in CI, on the
    session's cluster after the tests before it, a transfer into a stage never arrived (Ray's RDT
    store gave up after 60 s); it has not happened on a fresh cluster."""
    with cluster_beside_session(num_cpus=6) as cluster:
        result = run_cli("--prompts-file", str(reference_run.prompts_file), "--out", str(tmp_path), "--seed",
                         str(REFERENCE_SEED), "--address", cluster.address, *REFERENCE, "transport=direct",
                         "stages.tsr.replicas=2")
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = outputs_by_prompt(tmp_path)
    assert sorted(outputs) == sorted(reference_run.outputs)
    for index, (video, manifest) in outputs.items():
        assert video == reference_run.outputs[index][0], f"prompt {index}: the videos differ"
        assert {stage: manifest["stages"][stage]["input_transport"] for stage in ("base", "tsr", "ssr")} == {
            "base": None, "tsr": "direct", "ssr": "direct"}
        assert reference_run.outputs[index][1]["stages"]["ssr"]["input_transport"] == "object store"
    assert {manifest["stages"]["tsr"]["replica"] for _, manifest in outputs.values()} == {0, 1}


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
