"""Shared fixtures. Starting Ray costs ~10 s, so the whole session shares one simulated two-node
cluster: tests that need Ray in-process connect to it, CLI tests join it with --address, and the
placement tests pin stages to its nodes by custom resources and place ranks on its simulated GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

# The in-process tests share 2 cores with Ray's worker processes; one torch thread avoids the
# spin-waiting of oversubscribed thread pools, which made small ops 100x slower here.
torch.set_num_threads(1)

# Small enough to run in seconds on 2 cores, large enough to exercise every stage's structure.
FAST = ["stages.base.steps=3", "video.num_frames=9", "video.height=64", "video.width=64"]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of two nodes: node_a with 10 CPUs and 8 simulated GPUs (Ray hands out
    their ids; torch sees none, so stages compute on the CPU), node_b with 8 CPUs; they offer the
    custom resources `node_a` and `node_b`."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 10, "num_gpus": 8, "resources": {"node_a": 8}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=8, resources={"node_b": 8})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@contextmanager
def cluster_beside_session(**head_node_args) -> Iterator:
    """A `ray.cluster_utils.Cluster` of its own (a head with `head_node_args`) beside the session's.
    Starting a head points this process's internal KV at it, and its shutdown clears it; after it
    the KV is the session connection's again (Ray's collective groups rendezvous there)."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.experimental import internal_kv

    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **head_node_args})
    try:
        yield cluster
    finally:
        cluster.shutdown()
        if ray.is_initialized():
            internal_kv._initialize_internal_kv(ray._private.worker.global_worker.gcs_client)


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs run_cascade.py as a user would, from the repo root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_cascade.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )


# A prompts file run once, one rank and one replica per stage, through the object store: what the
# runs with replicas, with the direct transport, with split stages and of a prompt alone must
# reproduce. Lossless, so that a video differs only where its frames do.
REFERENCE_PROMPTS = ["a red circle moving right", "一个蓝色的方块向上移动", "a green triangle moving left",
                     "a yellow square moving down"]
REFERENCE_SEED = 7  # prompt k gets seed 7 + k
REFERENCE = [*FAST, "output.video_quality=0"]  # the reference run's overrides: x264 at QP 0


def outputs_by_prompt(out: Path) -> dict[int, tuple[bytes, dict]]:
    """{prompt index: (its video.mp4's bytes, its manifest)} of a run's folders, each of which wrote
    its video."""
    runs = {}
    for folder in (path for path in out.iterdir() if path.is_dir()):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["status"] == "ok", manifest.get("error")
        runs[manifest["prompt_index"]] = ((folder / "video.mp4").read_bytes(), manifest)
    return runs


@dataclass
class ReferenceRun:
    prompts_file: Path  # REFERENCE_PROMPTS, a line each
    outputs: dict[int, tuple[bytes, dict]]  # outputs_by_prompt of the run


@pytest.fixture(scope="session")
def reference_run(ray_cluster, tmp_path_factory) -> ReferenceRun:
    root = tmp_path_factory.mktemp("reference")
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join(REFERENCE_PROMPTS) + "\n")
    result = run_cli("--prompts-file", str(prompts_file), "--out", str(root / "out"), "--seed", str(REFERENCE_SEED),
                     "--address", ray_cluster.address, *REFERENCE)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = outputs_by_prompt(root / "out")
    assert sorted(outputs) == list(range(len(REFERENCE_PROMPTS)))
    return ReferenceRun(prompts_file, outputs)
