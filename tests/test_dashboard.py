"""What the Ray dashboard and a Prometheus server see of a run, on a real `ray start --head` cluster
with token authentication (Ray's default when the head has a token), joined by host:port:

- the actors are named by stage and replica and each call's task by stage and prompt (the state
  API that the dashboard's Actors and Tasks pages read);
- the cascade's metrics at the head's metrics export port, scraped as Prometheus does, hold the
  run's figures (one latency sample per stage and prompt, every prompt finished, frames and bytes);
- the terminal gets one line per stage and prompt, with no progress-bar fragments;
- with no token, or a wrong one, the run stops with one line naming the fix.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT

RAY = Path(sys.executable).with_name("ray")
PROMPTS = ["a red circle moving right", "a blue square moving up", "a green triangle moving left",
           "a yellow circle moving down", "a purple square moving right", "a orange triangle moving up"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TokenCluster:
    """A one-node cluster started by `ray start --head --block` with token authentication; its
    token is in `home`/.ray/auth_token (where Ray looks for it when HOME is `home`)."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        (self.home / ".ray").mkdir(parents=True)
        self.token = secrets.token_hex(32)
        (self.home / ".ray" / "auth_token").write_text(self.token)
        self.port, self.metrics_port, self.dashboard_port = free_port(), free_port(), free_port()
        env = {**os.environ, "HOME": str(self.home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        command = [str(RAY), "start", "--head", "--block", "--port", str(self.port), "--num-cpus", "4",
                   "--metrics-export-port", str(self.metrics_port), "--dashboard-host", "127.0.0.1",
                   "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                   "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]
        self.log = root / "head.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"ray start --head did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stops the head by the process id of its `ray start --block`, which stops what it started."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    cluster = TokenCluster(tmp_path_factory.mktemp("token_cluster"))
    yield cluster
    cluster.stop()


def run_command(*args: str, home: Path, extra_env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    env.update({"HOME": str(home), "PYTHONUNBUFFERED": "1", **(extra_env or {})})
    return subprocess.run([sys.executable, str(ROOT / "run_cascade.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """The cascade's samples at a Prometheus endpoint: (name, labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(ray_cascade_\w+)\{(.*)\} (\S+)$", line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def total(samples: dict, name: str, **tags: str) -> float:
    """Sum of a metric's samples whose labels include `tags` (over workers, replicas, nodes)."""
    wanted = set(tags.items())
    return sum(value for (metric, labels), value in samples.items() if metric == name and wanted <= labels)


STATE_QUERY = """
import json, sys
from ray.util.state import list_actors, list_tasks
actors = [actor.name for actor in list_actors(address=sys.argv[1], limit=1000) if actor.class_name == "StageWorker"]
tasks = [task.name for task in list_tasks(address=sys.argv[1], limit=10000)]
print(json.dumps([actors, tasks]))
"""


def dashboard_names(cluster: TokenCluster) -> tuple[list[str], list[str]]:
    """The names of the stage actors and of all tasks, as the dashboard lists them."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}
    result = subprocess.run([sys.executable, "-c", STATE_QUERY, f"http://127.0.0.1:{cluster.dashboard_port}"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    actors, tasks = json.loads(result.stdout.strip().splitlines()[-1])
    return actors, tasks


def test_token_cluster_run_is_named_measured_and_quiet(token_cluster, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    result = run_command("--prompts-file", str(prompts_file), "--out", str(out), "--seed", "3",
                         "--address", token_cluster.address, *FAST, home=token_cluster.home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([path for path in out.iterdir() if (path / "video.mp4").is_file()]) == len(PROMPTS)

    # The terminal: one line per stage and prompt, no progress-bar fragments.
    done_lines = re.findall(r"^prompt (\d+): (base|tsr|ssr) done in ", result.stderr, flags=re.MULTILINE)
    assert sorted(done_lines) == sorted((str(index), stage) for index in range(len(PROMPTS))
                                        for stage in ("base", "tsr", "ssr"))
    assert "\r" not in result.stderr and "it/s" not in result.stderr, result.stderr[-3000:]

    # The dashboard's Actors and Tasks pages (the state API, asked with the cluster's token).
    actors, tasks = dashboard_names(token_cluster)
    assert set(actors) == {"cascade-base-0", "cascade-tsr-0", "cascade-ssr-0"}
    assert {f"{stage} prompt {index}" for stage in ("base", "tsr", "ssr") for index in range(len(PROMPTS))} <= set(tasks)

    # The metrics endpoint, as Prometheus scrapes it (a driver's last figures arrive within seconds).
    deadline = time.monotonic() + 60
    samples = scrape(token_cluster.metrics_port)
    while total(samples, "ray_cascade_prompts_finished_total") < len(PROMPTS) and time.monotonic() < deadline:
        time.sleep(1)
        samples = scrape(token_cluster.metrics_port)
    count = len(PROMPTS)
    steps, frames, height, width = (int(item.split("=", 1)[1]) for item in FAST)
    latent_frames, factor = (frames - 1) // 4 + 1, 3  # the tiny config's tsr factor
    assert total(samples, "ray_cascade_prompts_finished_total") == count
    assert total(samples, "ray_cascade_prompts_failed_total") == 0
    for stage in ("base", "tsr", "ssr"):
        assert total(samples, "ray_cascade_stage_seconds_count", stage=stage) == count
        assert total(samples, "ray_cascade_stage_seconds_sum", stage=stage) > 0
        assert total(samples, "ray_cascade_prompts_in_flight", stage=stage) == 0
        assert total(samples, "ray_cascade_peak_memory_bytes", stage=stage) > 0
    assert total(samples, "ray_cascade_frames_produced_total", stage="base") == count * latent_frames
    assert total(samples, "ray_cascade_frames_produced_total", stage="ssr") == count * ((frames - 1) * factor + 1)
    # base -> tsr carries float32 latents (16 channels, 8× smaller frames); tsr -> ssr uint8 RGB frames
    latent_bytes = 16 * latent_frames * (height // 8) * (width // 8) * 4
    assert total(samples, "ray_cascade_hop_bytes_total", hop="base->tsr") == count * latent_bytes
    rgb_bytes = 3 * ((frames - 1) * factor + 1) * height * width
    assert total(samples, "ray_cascade_hop_bytes_total", hop="tsr->ssr") == count * rgb_bytes
    videos = sum((path / "video.mp4").stat().st_size for path in out.iterdir() if path.is_dir())
    assert total(samples, "ray_cascade_hop_bytes_total", hop="ssr->driver") == videos

    # Every series the shipped Grafana dashboard queries is one the run exported.
    grafana = json.loads((ROOT / "docs" / "grafana" / "cascade_dashboard.json").read_text())
    queried = {name for panel in grafana["panels"] for target in panel["targets"]
               for name in re.findall(r"ray_cascade_\w+", target["expr"])}
    missing = queried - {name for name, _ in samples}
    assert queried and missing == {"ray_cascade_prompts_failed_total"}, missing  # no series until a prompt fails


@pytest.mark.parametrize("case", ["no token", "wrong token"])
def test_token_cluster_without_its_token_is_named(token_cluster, tmp_path, case):
    home = tmp_path / "home"
    home.mkdir()
    extra = {"RAY_AUTH_TOKEN": secrets.token_hex(32)} if case == "wrong token" else {}
    out = tmp_path / "out"
    result = run_command("--out", str(out), "--address", token_cluster.address, *FAST, home=home, extra_env=extra,
                         timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr
    assert "~/.ray/auth_token" in line and "RAY_AUTH_TOKEN" in line, line
    if case == "wrong token":
        assert "refused the token from RAY_AUTH_TOKEN" in line, line
    else:
        assert "uses token authentication and no token was found" in line, line
    assert not out.exists() or not any(out.iterdir())
