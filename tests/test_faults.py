"""Nothing lost: a stage actor's process killed in the middle of a prompts file is restarted, reloads
its models and runs the lost call again (with direct hops: the hops form again and the prompts they
lost run again), and every video equals the fault-free run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from cascade.errors import UserError
from cascade.video import read_video
from tests.conftest import FAST, ROOT, cluster_beside_session

PROMPTS = ["a red circle moving right", "a blue square moving up", "a green triangle moving left",
           "a yellow circle moving down", "a purple square moving right", "a orange triangle moving up"]
SLOWER = ["stages.base.steps=12"]  # long enough that prompts are still running when the kill comes
# a removed node is declared dead after 3 missed health checks 0.5 s apart (Ray's default: 5 missed, 3 s apart)
QUICK_NODE_DEATH = {"_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}}


def start_run(out: Path, prompts_file: Path, address: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "run_cascade.py"), "--prompts-file", str(prompts_file), "--out", str(out),
               "--seed", "21", "--address", address, *FAST, *SLOWER, *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def videos(out: Path) -> dict[int, np.ndarray]:
    found = {}
    for folder in out.iterdir():
        manifest_path = folder / "manifest.json"
        if folder.is_dir() and manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest["status"] == "ok":
                found[manifest["prompt_index"]] = read_video(str(folder / "video.mp4"))[0]
    return found


def first_manifest(out: Path, process: subprocess.Popen, timeout: float = 180) -> dict:
    """The manifest of the first prompt whose video is written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in out.glob("*/manifest.json") if out.exists() else []:
            manifest = json.loads(path.read_text())
            if manifest["status"] == "ok":
                return manifest
        if process.poll() is not None:
            pytest.fail(f"the run ended before any prompt finished:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail("no prompt finished in time")


@dataclass
class FaultFree:
    videos: dict[int, np.ndarray]
    out: Path  # the run's folder, with its run.json
    prompts_file: Path


@pytest.fixture(scope="module")
def fault_free(ray_cluster, tmp_path_factory) -> FaultFree:
    root = tmp_path_factory.mktemp("fault_free")
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    process = start_run(root / "out", prompts_file, ray_cluster.address)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    found = videos(root / "out")
    assert sorted(found) == list(range(len(PROMPTS)))
    return FaultFree(found, root / "out", prompts_file)


def written_manifests(out: Path) -> list[dict]:
    """The manifests of the prompts whose video is written, in the order they were."""
    manifests = [json.loads(path.read_text()) for path in out.glob("*/manifest.json")] if out.exists() else []
    written = [manifest for manifest in manifests if manifest["status"] == "ok"]
    return sorted(written, key=lambda manifest: manifest["stages"]["ssr"]["finished_at"])


def run_with_faults(out: Path, address: str, faults: list[Callable[[dict], None]], *extra: str) -> tuple[int, str]:
    """Runs the prompts file and calls `faults[k]` with the manifest of the k-th video written, as it
    is written; the run's exit code and stderr."""
    prompts_file = out.parent / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    process = start_run(out, prompts_file, address, *extra)
    try:
        for count, fault in enumerate(faults, start=1):
            deadline = time.monotonic() + 180
            while len(written := written_manifests(out)) < count:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
                time.sleep(0.05)
            fault(written[count - 1])
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr


def check_every_video(out: Path, fault_free: FaultFree, stderr: str) -> None:
    found = videos(out)
    assert sorted(found) == list(range(len(PROMPTS))), stderr[-3000:]
    for index, video in found.items():
        np.testing.assert_array_equal(video, fault_free.videos[index], err_msg=f"prompt {index}")
    assert len([path for path in out.iterdir() if path.is_dir()]) == len(PROMPTS)


def test_stage_actors_killed_in_turn_lose_nothing(ray_cluster, fault_free, tmp_path):
    """base's process killed when the first video is written, tsr's at the second, ssr's at the third."""
    killed = []

    def kill(stage: str) -> Callable[[dict], None]:
        def fault(manifest: dict) -> None:
            [rank] = manifest["stages"][stage]["ranks"]
            os.kill(rank["pid"], signal.SIGKILL)  # as the kernel's out-of-memory killer would
            killed.append((stage, rank["pid"]))
        return fault

    returncode, stderr = run_with_faults(tmp_path / "out", ray_cluster.address, [kill("base"), kill("tsr"), kill("ssr")])
    assert returncode == 0, stderr[-3000:]
    assert [stage for stage, _ in killed] == ["base", "tsr", "ssr"]
    check_every_video(tmp_path / "out", fault_free, stderr)
    pids = {stage: {json.loads(path.read_text())["stages"][stage]["ranks"][0]["pid"]
                    for path in (tmp_path / "out").glob("*/manifest.json")} for stage in ("base", "tsr", "ssr")}
    assert all(len(pids[stage]) == 2 for stage in pids), pids  # every stage ran on its restarted process too


def test_a_killed_stage_with_direct_hops_loses_nothing(ray_cluster, fault_free, tmp_path):
    """Both hops direct (gloo), two tsr replicas, and the process of the tsr replica that made the
    first video killed as it is written. Ray then kills both ends of the transfer that failed and
    destroys the hops' group; the run forms it again, with new actors where Ray killed them, and
    runs the prompts not ended again: every video equals the fault-free run's (through the object
    store), every hop went direct, both tsr replicas worked."""
    killed = []

    def kill_tsr(manifest: dict) -> None:
        [rank] = manifest["stages"]["tsr"]["ranks"]
        os.kill(rank["pid"], signal.SIGKILL)
        killed.append(rank["pid"])

    returncode, stderr = run_with_faults(tmp_path / "out", ray_cluster.address, [kill_tsr], "transport=direct",
                                         "stages.tsr.replicas=2")
    assert returncode == 0, stderr[-3000:]
    assert len(killed) == 1 and "the direct hops are formed again" in stderr, stderr[-3000:]
    check_every_video(tmp_path / "out", fault_free, stderr)
    manifests = [json.loads(path.read_text()) for path in (tmp_path / "out").glob("*/manifest.json")]
    assert all(manifest["stages"][stage]["input_transport"] == "direct" for manifest in manifests
               for stage in ("tsr", "ssr"))
    assert {manifest["stages"]["tsr"]["replica"] for manifest in manifests} == {0, 1}
    tsr_pids = {manifest["stages"]["tsr"]["ranks"][0]["pid"] for manifest in manifests}
    assert len(tsr_pids - set(killed)) >= 1 and killed[0] in tsr_pids  # videos from before the kill and after


def files_of(out: Path) -> dict[str, bytes]:
    return {str(path.relative_to(out)): path.read_bytes() for path in out.rglob("*") if path.is_file()}


@pytest.mark.parametrize("signum, resume", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_interrupted_run_records_where_it_stopped_and_resume_finishes_it(ray_cluster, fault_free, tmp_path, signum,
                                                                          resume):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    process = start_run(out, prompts_file, ray_cluster.address)
    first = first_manifest(out, process)
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=30)  # "within seconds"
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "--resume" in stderr, stderr[-3000:]
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp")]
    manifests = {path.parent.name: json.loads(path.read_text()) for path in out.glob("*/manifest.json")}
    assert first["status"] == "ok" and manifests[first["run_id"]]["status"] == "ok"
    for manifest in manifests.values():
        if manifest["status"] != "ok":
            assert manifest["status"] == "interrupted"
            assert manifest["last_finished_stage"] == list(manifest["stages"])[-1]
    written_before = {name: data for name, data in files_of(out).items() if name.startswith(first["run_id"])}
    if not resume:  # how a stopped run is resumed does not depend on the signal that stopped it
        return

    process = start_run(out, prompts_file, ray_cluster.address, "--resume")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    folders = [path for path in out.iterdir() if path.is_dir()]
    assert len(folders) == len(PROMPTS)
    found = videos(out)
    assert sorted(found) == list(range(len(PROMPTS)))
    for index, video in found.items():
        np.testing.assert_array_equal(video, fault_free.videos[index], err_msg=f"prompt {index}")
    after = files_of(out)
    assert {name: after[name] for name in written_before} == written_before  # the finished prompt: untouched
    resumed = [json.loads((folder / "manifest.json").read_text()) for folder in folders]
    from_kept = [manifest["resumed"] for manifest in resumed if manifest.get("resumed", {}).get("kept_output_of")]
    # prompts in flight at the interrupt had their base latents kept, and go on from tsr
    assert from_kept and all(entry["from_stage"] == "tsr" and entry["kept_output_of"] == "base" for entry in from_kept)
    assert not [path for path in out.rglob("*") if "resume" in path.parts]  # kept outputs go once written


def test_second_interrupt_stops_at_once(ray_cluster, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    process = start_run(tmp_path / "out", prompts_file, ray_cluster.address)
    first_manifest(tmp_path / "out", process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130


@pytest.mark.parametrize("change, message", [
    (["stages.base.steps=13"], "stages.base.steps was 12, now 13"),
    (["--seed", "5"], "--seed 5 differs"),
])
def test_resume_refuses_a_different_run(ray_cluster, fault_free, tmp_path, change, message):
    """--resume of the fault-free run with something that changes the videos: one line, nothing touched."""
    out = tmp_path / "out"
    shutil.copytree(fault_free.out, out)
    before = files_of(out)
    command = [sys.executable, str(ROOT / "run_cascade.py"), "--prompts-file", str(fault_free.prompts_file),
               "--out", str(out), "--address", ray_cluster.address, *FAST, *SLOWER, "--resume", *change]
    if "--seed" not in change:
        command += ["--seed", "21"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert message in line, line
    assert files_of(out) == before


def test_resume_with_other_prompts_is_refused(tmp_path, capsys):
    import run_cascade

    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"prompts": ["a red ball"], "seed": 1, "config": {}, "folders": {}}))
    assert run_cascade.main(["--prompt", "a blue ball", "--out", str(out), "--resume"]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "prompt 0 was 'a red ball', now 'a blue ball'" in line, line


def test_resume_takes_other_speed_settings_but_not_other_videos(tmp_path):
    """Where and how fast a stage runs (its resources, split, replicas, compiled blocks) may change on
    --resume; what it makes (here the base stage's steps) may not."""
    from cascade.config import load_config, to_plain_dict
    from cascade.outputs import read_run_record, write_run_record

    prompts = ["a red ball"]
    write_run_record(tmp_path, prompts, 1, to_plain_dict(load_config(None, [])), {})
    faster = ["stages.base.compile=true", "stages.base.replicas=2", "stages.ssr.resources.num_cpus=2"]
    assert read_run_record(tmp_path, prompts, to_plain_dict(load_config(None, faster)), None)["seed"] == 1
    with pytest.raises(UserError, match="stages.base.steps was 20, now 7"):
        read_run_record(tmp_path, prompts, to_plain_dict(load_config(None, [*faster, "stages.base.steps=7"])), None)


FULL_DISK = """
import errno, os, sys
import cascade.outputs as outputs
real_fdopen = os.fdopen

class FullDisk:
    '''A file that takes half of what it is given, then says the disk is full.'''
    def __init__(self, file):
        self.file = file
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()
    def write(self, data):
        self.file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

def fdopen(descriptor, mode="r", *args, **kwargs):
    file = real_fdopen(descriptor, mode, *args, **kwargs)
    name = os.readlink(f"/proc/self/fd/{descriptor}")
    return FullDisk(file) if "-p001" in name and ".video.mp4." in name else file

outputs.os.fdopen = fdopen
import run_cascade
sys.exit(run_cascade.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_full_disk_fails_that_prompt_only_and_leaves_no_partial_video(ray_cluster, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:3]) + "\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", FULL_DISK, "--prompts-file", str(prompts_file), "--out", str(out),
                             "--seed", "21", "--address", ray_cluster.address, *FAST],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "failed" in line]
    assert line.startswith("prompt 1 failed: cannot write its video") and "No space left on device" in line, line
    assert sorted(videos(out)) == [0, 2]
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp") or
                (path.name == "video.mp4" and "-p001" in str(path))]


def test_lost_node_stage_comes_back_on_another(fault_free, tmp_path):
    """A cluster of a head and two nodes that offer `spare`; tsr asks for it, so it runs on one of
    them. That node is removed after the first video: tsr restarts on the other and the run ends
    with every video, equal to the fault-free run's."""
    with cluster_beside_session(num_cpus=3, **QUICK_NODE_DEATH) as cluster:
        nodes = [cluster.add_node(num_cpus=1, resources={"spare": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        lost = []

        def remove_node(manifest: dict) -> None:
            [rank] = manifest["stages"]["tsr"]["ranks"]
            lost.extend(node for node in nodes if node.node_id in rank["node"])
            cluster.remove_node(lost[0], allow_graceful=False)

        out = tmp_path / "out"
        returncode, stderr = run_with_faults(out, cluster.address, [remove_node], "stages.tsr.resources.custom={spare: 1}",
                                             "stages.tsr.resources.num_cpus=0")
        assert returncode == 0, stderr[-3000:]
        check_every_video(out, fault_free, stderr)
        moved = [json.loads((folder / "manifest.json").read_text())["stages"]["tsr"]["ranks"][0]["node"]
                 for folder in out.iterdir() if folder.is_dir()]
        assert any(lost[0].node_id not in node for node in moved)  # later prompts ran on the other node


def test_lost_node_with_no_other_stops_clearly_and_resume_finishes(fault_free, tmp_path):
    """The only node that offers `spare` (tsr's) is removed after the first video: the run waits
    `patience_s` for another, stops with exit code 1 and one line, the begun prompts' manifests say
    `interrupted`; once a node offering `spare` joins, --resume writes every video."""
    with cluster_beside_session(num_cpus=3, **QUICK_NODE_DEATH) as cluster:
        node = cluster.add_node(num_cpus=1, resources={"spare": 1})
        cluster.wait_for_nodes()
        extra = ["stages.tsr.resources.custom={spare: 1}", "stages.tsr.resources.num_cpus=0", "patience_s=6"]
        out = tmp_path / "out"
        returncode, stderr = run_with_faults(out, cluster.address, [lambda manifest: cluster.remove_node(node)], *extra)
        assert returncode == 1, stderr[-3000:]
        assert "Traceback" not in stderr
        [line] = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
        assert "tsr replica 0 lost its node" in line and "--resume" in line, line
        statuses = [json.loads(path.read_text())["status"] for path in out.glob("*/manifest.json")]
        assert "ok" in statuses and set(statuses) <= {"ok", "interrupted"}, statuses

        cluster.add_node(num_cpus=1, resources={"spare": 1})
        cluster.wait_for_nodes()
        process = start_run(out, out.parent / "prompts.txt", cluster.address, *extra, "--resume")
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        check_every_video(out, fault_free, stderr)
