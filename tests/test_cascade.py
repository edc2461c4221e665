"""The cascade's shape: stages run directly, the same stages through the Ray DAG give the same
result, stages land on the nodes their custom resources name, and many prompts are pipelined."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from cascade.actors import StageWorker, build_stage
from cascade.config import load_config
from cascade.graph import create_pools, load_pools, run_pipelined, stop_pools
from cascade.payload import Request
from cascade.video import encode_mp4, read_video
from tests.conftest import FAST


@pytest.fixture(scope="module")
def config():
    return load_config(None, FAST)


def request_for(config, prompt="a red circle moving to the right", seed=3, index=0) -> Request:
    video = config.video
    return Request(prompt, config.stages.base.negative_prompt, seed, video.height, video.width, video.num_frames, video.fps, index)


@pytest.fixture
def start_workers(ray_cluster):
    """Creates and loads stage actors, and stops them after the test so their CPU slots free up."""
    started = []

    def start(config):
        pools = create_pools(config)
        started.append(pools)
        return pools, {name: leaders[0] for name, leaders in load_pools(pools).items()}

    yield start
    for pools in started:
        stop_pools(pools)


@pytest.fixture(scope="module")
def direct_outputs(config):
    """The three stages called in order as plain objects, no Ray."""
    request = request_for(config)
    latents = build_stage("base", config.stages.base, "cpu")(None, request)
    frames = build_stage("tsr", config.stages.tsr, "cpu")(latents, request)
    final = build_stage("ssr", config.stages.ssr, "cpu")(frames, request)
    return request, latents, frames, final


def test_stage_shapes_follow_the_contract(config, direct_outputs):
    request, latents, frames, final = direct_outputs
    video, factor, scale = config.video, config.stages.tsr.factor, config.stages.ssr.upsampler.scale
    latent_frames = 1 + (video.num_frames - 1) // 4
    assert latents.space == "latent" and latents.shape == (1, 16, latent_frames, video.height // 8, video.width // 8)
    decoded = 1 + 4 * (latent_frames - 1)
    assert frames.space == "pixel" and frames.shape == (1, 3, (decoded - 1) * factor + 1, video.height, video.width)
    assert frames.fps == video.fps * factor
    assert final.shape == (1, 3, frames.num_frames, video.height * scale, video.width * scale)
    assert final.fps == frames.fps and final.request == request


def test_base_stage_is_deterministic_per_seed(config, direct_outputs):
    request, latents, _, _ = direct_outputs
    stage = build_stage("base", config.stages.base, "cpu")
    again = stage(None, request)
    other = stage(None, dataclasses.replace(request, seed=request.seed + 1))
    np.testing.assert_array_equal(again.numpy(), latents.numpy())
    assert not np.allclose(other.numpy(), latents.numpy())


def test_worker_runs_without_ray(config, direct_outputs):
    request, latents, _, _ = direct_outputs
    worker = StageWorker("base", config.stages.base, config.output)
    clip, report = worker.run(None, request)
    np.testing.assert_array_equal(clip.data, latents.numpy())  # the shell hands numpy to the object store
    assert report.output_shape == latents.shape and report.preview.gif.startswith(b"GIF8")
    assert report.preview.contact_sheet_png.startswith(b"\x89PNG")


def test_ray_actors_give_the_direct_result(start_workers, config, direct_outputs):
    request, latents, frames, final = direct_outputs
    pools, loaded = start_workers(config)
    # tiny ships trained weights for every model
    assert {stage: info["warnings"] for stage, info in loaded.items()} == {"base": [], "tsr": [], "ssr": []}
    reports, done, videos = [], [], []
    results = run_pipelined(pools, [request], 1, lambda req, rep, output: reports.append(rep),
                            lambda result: (done.append(result), videos.append(result.video)))
    assert results[0].error is None and done == results
    assert results[0].video is None  # handed to on_done, then let go
    assert [report.stage for report in sorted(reports, key=lambda r: r.finished_at)] == ["base", "tsr", "ssr"]
    by_stage = {report.stage: report for report in reports}
    assert by_stage["base"].output_shape == latents.shape
    assert by_stage["tsr"].input_shape == latents.shape and by_stage["tsr"].output_shape == frames.shape
    assert by_stage["ssr"].output_shape == final.shape
    # the same frames as the direct path: the MP4 bytes are identical (x264 is deterministic)
    frames_direct = np.ascontiguousarray(final.numpy()[0].transpose(1, 2, 3, 0))
    assert videos[0].mp4 == encode_mp4(frames_direct, final.fps, config.output.video_quality)
    decoded, fps = read_video(videos[0].mp4)
    assert decoded.shape == frames_direct.shape and fps == pytest.approx(final.fps)


def test_stages_are_placed_by_custom_resources(start_workers, config):
    import ray

    node_ids = {name: node["NodeID"] for node in ray.nodes() if node["Alive"]
                for name in ("node_a", "node_b") if name in node["Resources"]}
    placed = copy.deepcopy(config)
    placed.stages.base.resources.custom = {"node_a": 1}
    placed.stages.tsr.resources.custom = {"node_b": 1}
    placed.stages.ssr.resources.custom = {"node_b": 1}
    pools, loaded = start_workers(placed)
    assert node_ids["node_a"] in loaded["base"]["node"]
    assert node_ids["node_b"] in loaded["tsr"]["node"] and node_ids["node_b"] in loaded["ssr"]["node"]
    reports = []
    results = run_pipelined(pools, [request_for(placed)], 1, lambda req, rep, output: reports.append(rep), lambda r: None)
    assert results[0].error is None
    assert {report.stage: node_ids["node_a"] in report.node for report in reports} == {"base": True, "tsr": False, "ssr": False}


def test_prompts_are_pipelined(start_workers, config):
    pools, _ = start_workers(config)
    requests = [request_for(config, prompt, seed=index, index=index)
                for index, prompt in enumerate(["a red circle", "a blue square", "a green triangle"])]
    reports, finished = [], []
    results = run_pipelined(pools, requests, 3, lambda req, rep, output: reports.append(rep),
                            lambda result: finished.append(result.request.index))
    assert all(result.error is None for result in results) and sorted(finished) == [0, 1, 2]
    at = {(report.prompt_index, report.stage): report for report in reports}
    # the base stage starts prompt k+1 before prompt k has left the cascade
    for index in (0, 1):
        assert at[(index + 1, "base")].started_at < at[(index, "ssr")].finished_at
        assert at[(index + 1, "base")].started_at >= at[(index, "base")].finished_at  # one at a time per actor
