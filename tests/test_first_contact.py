"""A new user's first commands, through the installed `run-cascade` in a subprocess: options and
`key=value` overrides in any order, from any working directory; stages asking for more than a Ray
started here can offer stop at once with the override that runs them anyway; on a cluster that
cannot place them yet, the run waits and says what for."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ray.util.placement_group import placement_group, remove_placement_group

from cascade.groups import StageGroup, waiting_message
from cascade.video import read_video
from tests.conftest import FAST

COMMAND = Path(sys.executable).with_name("run-cascade")


def run_command(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    if not COMMAND.exists():
        pytest.fail(f"{COMMAND.name} is not installed beside {sys.executable}: run `pip install -e .`")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(COMMAND), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_options_and_overrides_mix_in_any_order_from_any_folder(ray_cluster, tmp_path):
    """Overrides before, between and after options; the working directory holds no configs or
    weights, so the relative --config path and the shipped weights come from the project."""
    steps, frames, height, width = (item.split("=", 1)[1] for item in FAST)
    result = run_command(
        f"stages.base.steps={steps}", "--prompt", "a green circle moving down", f"video.num_frames={frames}",
        "--seed", "4", f"video.height={height}", "--config", "configs/tiny.yaml", f"video.width={width}",
        "--out", "out", "--address", ray_cluster.address, "stages.tsr.factor=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [folder] = [path for path in (tmp_path / "out").iterdir() if path.is_dir()]
    manifest = json.loads((folder / "manifest.json").read_text())
    config = manifest["config"]
    assert (manifest["seed"], manifest["prompt"]) == (4, "a green circle moving down")
    assert config["stages"]["base"]["steps"] == int(steps) and config["stages"]["tsr"]["factor"] == 2
    assert (config["video"]["num_frames"], config["video"]["height"], config["video"]["width"]) == (
        int(frames), int(height), int(width))
    assert manifest["warnings"] == []  # every shipped weights file was found from this folder
    video, fps = read_video(str(folder / "video.mp4"))
    scale = config["stages"]["ssr"]["upsampler"]["scale"]
    assert video.shape == ((int(frames) - 1) * 2 + 1, int(height) * scale, int(width) * scale, 3)
    assert fps == config["video"]["fps"] * 2


def test_help_shows_options_and_overrides_together(tmp_path):
    result = run_command("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert any(re.search(r"--\w+.* \w+(\.\w+)+=\S+.* --\w+", line) for line in result.stdout.splitlines()), result.stdout
    assert "mix in any order" in result.stdout


def test_a_bare_word_exits_2_with_one_line(tmp_path):
    result = run_command("--prompt", "a red ball", "stray", "video.height=64", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "'stray'" in line and "key=value" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_local_ray_without_the_resources_asked_for_stops_and_names_the_fix(tmp_path):
    """A GPU and a custom resource asked of a Ray started here, on a machine without them: exit 2
    with what is asked, what there is, and the overrides that run it anyway; those overrides do."""
    asks = ["stages.base.resources.num_gpus=1", "stages.ssr.resources.num_gpus=0.5",
            "stages.tsr.resources.custom={big_node: 1}"]
    result = run_command("--out", "out", "--seed", "2", *FAST, *asks, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert "GPU: 1.5" in line and "big_node: 1" in line and "this machine offers" in line, line
    fixes = line.split("add ", 1)[1].split()
    assert fixes == ["stages.base.resources.num_gpus=0", "stages.tsr.resources.custom.big_node=0",
                     "stages.ssr.resources.num_gpus=0"], line
    assert not (tmp_path / "out").exists() or not any(path.is_dir() for path in (tmp_path / "out").iterdir())

    result = run_command("--out", "out", "--seed", "2", *FAST, *asks, *fixes, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [folder] = [path for path in (tmp_path / "out").iterdir() if path.is_dir()]
    assert (folder / "video.mp4").is_file()


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def test_a_cluster_that_cannot_place_the_stages_is_waited_for(ray_cluster, tmp_path):
    """9 GPUs asked of a cluster of 8: the run says so, waits (an autoscaler may add a node) and
    writes nothing; Ctrl-C stops it cleanly and leaves the cluster's resources free."""
    command = [str(COMMAND), "--out", "out", "--address", ray_cluster.address, *FAST,
               "stages.base.resources.num_gpus=1", "stages.base.parallel.ulysses=4", "stages.base.parallel.cfg=2",
               "stages.tsr.resources.num_gpus=1"]
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stderr, lines), daemon=True).start()
    try:
        seen = []
        deadline = time.monotonic() + 120
        while not any("cannot place every stage" in line for line in seen) and time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert process.poll() is None, "".join(seen)
        [warning] = [line for line in seen if "cannot place every stage" in line]
        assert "together ask for {CPU: 10, GPU: 9}" in warning and "Ctrl-C" in warning, warning
        time.sleep(3)
        assert process.poll() is None, "the run stopped instead of waiting:\n" + "".join(seen)
        assert not any(path.is_dir() for path in (tmp_path / "out").iterdir())
        process.send_signal(signal.SIGINT)  # Ctrl-C while it waits: a clean stop
        assert process.wait(timeout=15) == 130
        time.sleep(0.5)  # the reader thread takes the last lines
        while not lines.empty():
            seen.append(lines.get())
        assert "Traceback" not in "".join(seen) and "interrupted by SIGINT" in "".join(seen), "".join(seen)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
    deadline = time.monotonic() + 60  # Ray frees the job's placement groups once it sees the driver gone
    import ray

    while ray.available_resources().get("GPU", 0) < 8 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("GPU", 0) == 8


def test_waiting_message_names_what_is_missing(ray_cluster):
    """What the run repeats every 30 s while a stage's placement group waits for resources."""
    pending = placement_group([{"GPU": 6.0, "CPU": 1.0}] * 2, strategy="STRICT_PACK")
    try:
        message = waiting_message({"base": StageGroup([None, None], pending)}, "start")
    finally:
        remove_placement_group(pending)
    assert "base asks for 2 × {CPU: 1, GPU: 6}" in message, message
    assert re.search(r"the cluster has \{CPU: [\d.]+, GPU: 8\} free", message) and "Ctrl-C" in message, message
