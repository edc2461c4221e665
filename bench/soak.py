"""A long prompts file through the real command: does the driver's memory or the object store grow?

    python bench/soak.py [--prompts 50] [overrides ...]

Starts a one-node Ray cluster (ray.cluster_utils, 4 CPUs), runs `run_cascade.py --prompts-file`
against it with the tiny config (and any overrides), and each time a prompt's video is written
samples the driver process's resident memory (/proc/<pid>/status, Linux) and the object store's use
(`ray memory --stats-only`, the plasma bytes and objects held). Prints the figures after the first
and the last 10 prompts and a markdown table of every sample.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
DIRECTIONS = ["right", "left", "up", "down"]


def resident_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def object_store(address: str) -> tuple[float, int]:
    """(MiB, objects) the cluster's object stores hold now."""
    report = subprocess.run([str(RAY), "memory", "--address", address, "--stats-only"], capture_output=True,
                            text=True, timeout=60).stdout
    match = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", report)
    return (float(match.group(1)), int(match.group(2))) if match else (float("nan"), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    samples = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            prompts = [f"a {COLOURS[i % 6]} {SHAPES[i % 3]} moving {DIRECTIONS[i % 4]}" for i in range(args.prompts)]
            prompts_file = Path(folder) / "prompts.txt"
            prompts_file.write_text("\n".join(prompts) + "\n")
            command = [sys.executable, str(ROOT / "run_cascade.py"), "--prompts-file", str(prompts_file),
                       "--out", str(Path(folder) / "out"), "--seed", "1", "--address", cluster.address, *args.overrides]
            started = time.perf_counter()
            process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            for line in process.stderr:
                if re.match(r"prompt \d+: wrote ", line):
                    store_mib, objects = object_store(cluster.address)
                    samples.append((len(samples) + 1, time.perf_counter() - started, resident_mib(process.pid),
                                    store_mib, objects))
            if process.wait() != 0:
                raise SystemExit(f"the run failed with exit code {process.returncode}")
    finally:
        cluster.shutdown()

    def summary(rows) -> str:
        return (f"driver {min(row[2] for row in rows):.0f}–{max(row[2] for row in rows):.0f} MiB, object store "
                f"{min(row[3] for row in rows):.0f}–{max(row[3] for row in rows):.0f} MiB, "
                f"{min(row[4] for row in rows)}–{max(row[4] for row in rows)} objects")

    print(f"first 10 prompts: {summary(samples[:10])}")
    print(f"last 10 prompts:  {summary(samples[-10:])}")
    print("\n| videos written | time (s) | driver resident (MiB) | object store (MiB) | objects |")
    print("|---|---|---|---|---|")
    for count, seconds, driver, store, objects in samples:
        print(f"| {count} | {seconds:.1f} | {driver:.0f} | {store:.0f} | {objects} |")


if __name__ == "__main__":
    main()
